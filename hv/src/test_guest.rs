//! The test guest (hv/guest/): a tiny PVH kernel built with this crate that checks SMP
//! bring-up, ACPI and virtio-blk from the inside and powers off with a status. Tests, benches
//! and demos boot it; its disk protocol is defined here and in guest/main.c, in step.
//!
//! Command line: `mode=test` (default: CPUs and disk checks), `mode=boot` (CPUs only),
//! `mode=wait` (checks, then idle until stopped), `mode=fault` (triple fault), `mode=reset`
//! (ACPI reset), `mode=read read_mib=N req_kib=K depth=D` (sequential read of disk 0);
//! `mode=counter counter_sectors=N` writes an increasing counter over the first N sectors of
//! its disks in a known order until stopped (see [`counter_prefix`]);
//! `prompt=login` ends mode=wait's output with a getty's `login: ` and no newline.
//!
//! Disk protocol, per disk `i`: the host writes [`host_pattern`]`(i)` at byte 0; the guest
//! checks it, writes [`guest_pattern`]`(i)` at byte [`GUEST_PATTERN_OFFSET`], flushes and reads
//! it back.

/// Bytes of each pattern.
pub const PATTERN_BYTES: usize = 4096;
pub const HOST_PATTERN_OFFSET: u64 = 0;
pub const GUEST_PATTERN_OFFSET: u64 = 4096;

/// Bits of the power-off status (0: every check passed).
pub mod status {
    pub const BOOT_INFO: u32 = 0x01;
    pub const CPUS: u32 = 0x02;
    pub const DISK_SETUP: u32 = 0x04;
    pub const HOST_PATTERN: u32 = 0x08;
    pub const DISK_IO: u32 = 0x10;
    pub const ERROR_PATH: u32 = 0x20;
    pub const VERIFY: u32 = 0x40;
}

const HOST_TAG: u64 = 0x686f_7374_7061_7474; // "hostpatt"
const GUEST_TAG: u64 = 0x6775_6573_7470_6174; // "guestpat"
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn pattern(tag: u64, disk: u32) -> Vec<u8> {
    (0..(PATTERN_BYTES / 8) as u64)
        .flat_map(|k| (tag ^ (u64::from(disk + 1) << 48) ^ k.wrapping_mul(GOLDEN)).to_le_bytes())
        .collect()
}

/// What the host writes at [`HOST_PATTERN_OFFSET`] of disk `disk` for the guest to check.
pub fn host_pattern(disk: u32) -> Vec<u8> {
    pattern(HOST_TAG, disk)
}

/// What the guest writes at [`GUEST_PATTERN_OFFSET`] of disk `disk`.
pub fn guest_pattern(disk: u32) -> Vec<u8> {
    pattern(GUEST_TAG, disk)
}

/// Checks that `disks` (the first `sectors` sectors of each of the disks of a
/// `mode=counter` guest, in order) hold one point of its write sequence: write `k` (from 1)
/// went to disk `k % n`, sector `(k / n) % sectors`, filling it with `k` (little-endian
/// words), each write complete before the next. Returns how many writes that point holds, or
/// the first sector that no prefix of the sequence explains.
pub fn counter_prefix(disks: &[Vec<u8>], sectors: u64) -> Result<u64, String> {
    let n = disks.len() as u64;
    if n == 0 || sectors == 0 {
        return Err("no disk or no sector to check".into());
    }
    let mut values = Vec::new();
    for (d, bytes) in disks.iter().enumerate() {
        for s in 0..sectors {
            let at = usize::try_from(s * 512).map_err(|e| e.to_string())?;
            let sector = bytes
                .get(at..at + 512)
                .ok_or_else(|| format!("disk {d}: shorter than {sectors} sectors"))?;
            let first = u64::from_le_bytes(sector[..8].try_into().map_err(|_| "short")?);
            if sector
                .chunks_exact(8)
                .any(|w| w != first.to_le_bytes().as_slice())
            {
                return Err(format!("disk {d}, sector {s}: torn (words differ)"));
            }
            values.push((d as u64, s, first));
        }
    }
    let writes = values.iter().map(|v| v.2).max().unwrap_or(0);
    for &(d, s, v) in &values {
        // The last write k <= writes with k % n == d and (k / n) % sectors == s.
        let period = n * sectors;
        let slot = s * n + d;
        let expected = if writes < slot {
            0
        } else {
            writes - (writes - slot) % period
        };
        if v != expected {
            return Err(format!(
                "disk {d}, sector {s}: holds write {v}, but after {writes} writes it holds {expected}"
            ));
        }
    }
    Ok(writes)
}

static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// The test guest's ELF image, or why it was not built.
pub fn image() -> Result<&'static [u8], &'static str> {
    if IMAGE.is_empty() {
        Err("the hv test guest was not built: gcc was missing when hv was compiled")
    } else {
        Ok(IMAGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_per_disk_and_side() {
        assert_eq!(host_pattern(0).len(), PATTERN_BYTES);
        assert_ne!(host_pattern(0), host_pattern(1));
        assert_ne!(host_pattern(0), guest_pattern(0));
        // The first word, as the guest computes it: tag ^ (disk + 1) << 48 ^ 0.
        assert_eq!(host_pattern(0)[..8], (HOST_TAG ^ (1 << 48)).to_le_bytes());
    }
}

#[cfg(test)]
mod counter_tests {
    use super::counter_prefix;

    fn after(writes: u64, n: u64, sectors: u64) -> Vec<Vec<u8>> {
        let mut disks = vec![vec![0u8; (sectors * 512) as usize]; n as usize];
        for k in 1..=writes {
            let at = ((k / n) % sectors * 512) as usize;
            for w in disks[(k % n) as usize][at..at + 512].chunks_exact_mut(8) {
                w.copy_from_slice(&k.to_le_bytes());
            }
        }
        disks
    }

    #[test]
    fn every_prefix_is_recognised_and_a_mix_of_two_points_is_not() {
        for writes in [0, 1, 5, 127, 128, 129, 1000] {
            assert_eq!(counter_prefix(&after(writes, 2, 64), 64), Ok(writes));
        }
        let mut mixed = after(300, 2, 64);
        mixed[1] = after(200, 2, 64)[1].clone();
        assert!(counter_prefix(&mixed, 64).is_err());
    }
}
