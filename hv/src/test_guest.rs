//! The test guest (hv/guest/): a tiny PVH kernel built with this crate that checks SMP
//! bring-up, ACPI and virtio-blk from the inside and powers off with a status. Tests, benches
//! and demos boot it; its disk protocol is defined here and in guest/main.c, in step.
//!
//! Command line: `mode=test` (default: CPUs and disk checks), `mode=boot` (CPUs only),
//! `mode=wait` (checks, then idle until stopped), `mode=fault` (triple fault), `mode=reset`
//! (ACPI reset), `mode=read read_mib=N req_kib=K depth=D` (sequential read of disk 0);
//! `mode=counter counter_sectors=N` writes an increasing counter over the first N sectors of
//! its disks in a known order until stopped (see [`counter_prefix`]);
//! `mode=heartbeat [boot_id=N]` continues, on disk 0, the heartbeat counter the last boot of
//! the VM (on any host) left there (see [`HeartbeatHistory`]);
//! `prompt=login` ends mode=wait's output with a getty's `login: ` and no newline.
//!
//! Disk protocol, per disk `i`: the host writes [`host_pattern`]`(i)` at byte 0; the guest
//! checks it, writes [`guest_pattern`]`(i)` at byte [`GUEST_PATTERN_OFFSET`], flushes and reads
//! it back, prints the serial GET_ID returns (`disk i: id "SERIAL"`), and, when the device
//! offers discard, discards [`PATTERN_BYTES`] at byte [`DISCARD_OFFSET`] and says whether they
//! read back as zeroes.

/// Bytes of each pattern.
pub const PATTERN_BYTES: usize = 4096;
pub const HOST_PATTERN_OFFSET: u64 = 0;
pub const GUEST_PATTERN_OFFSET: u64 = 4096;
pub const DISCARD_OFFSET: u64 = 8192;

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

/// Sectors at the start of disk 0 that a `mode=heartbeat` guest writes in a ring.
pub const HEARTBEAT_SECTORS: u64 = 8;
const HB_MAGIC: u64 = 0x6862_6561_7472_6563; // "hbeatrec"
const HB_CHECK: u64 = GOLDEN;

/// One heartbeat record: write `counter` of boot `boot`, which started at `first` after the
/// last record of boot `prev` (0: the disk held none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub boot: u64,
    pub counter: u64,
    pub prev: u64,
    pub first: u64,
}

impl Heartbeat {
    /// The sector the guest writes for this record (what `write_heartbeat` in main.c does).
    pub fn sector(&self) -> Vec<u8> {
        let words = [
            HB_MAGIC,
            self.boot,
            self.counter,
            self.prev,
            self.first,
            HB_MAGIC ^ self.boot ^ self.counter ^ self.prev ^ self.first ^ HB_CHECK,
        ];
        let mut sector = vec![0u8; 512];
        for (at, w) in sector.chunks_exact_mut(8).zip(words) {
            at.copy_from_slice(&w.to_le_bytes());
        }
        sector
    }

    /// The record a sector holds; `None` for a blank or torn one.
    pub fn parse(sector: &[u8]) -> Option<Heartbeat> {
        let mut w = [0u64; 6];
        for (i, word) in w.iter_mut().enumerate() {
            *word = u64::from_le_bytes(sector.get(i * 8..i * 8 + 8)?.try_into().ok()?);
        }
        let sum = w[..5].iter().fold(HB_CHECK, |a, b| a ^ b);
        (w[0] == HB_MAGIC && sum == w[5]).then_some(Heartbeat {
            boot: w[1],
            counter: w[2],
            prev: w[3],
            first: w[4],
        })
    }
}

/// What the samples so far say of one boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boot {
    pub id: u64,
    pub prev: u64,
    pub first: u64,
    /// The highest counter seen written by it.
    pub last: u64,
}

/// The history of a `mode=heartbeat` guest's disk, built from samples of its first
/// [`HEARTBEAT_SECTORS`] sectors taken over time. It refuses a sample that shows the VM ran
/// twice: a counter written by two boots, two boots whose ranges of counters overlap (one
/// went on writing after the other started), a boot that continued from a boot other than the
/// one before it, or a sector whose counter went backwards.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatHistory {
    boots: Vec<Boot>,
    sectors: Vec<u64>,
    samples: usize,
}

impl HeartbeatHistory {
    /// Adds one sample (the ring's bytes, read at one moment).
    pub fn observe(&mut self, ring: &[u8]) -> Result<(), String> {
        let n = HEARTBEAT_SECTORS as usize;
        if ring.len() < n * 512 {
            return Err(format!(
                "sample of {} bytes, shorter than the ring",
                ring.len()
            ));
        }
        self.sectors.resize(n, 0);
        self.samples += 1;
        for (s, sector) in ring.chunks_exact(512).take(n).enumerate() {
            let Some(r) = Heartbeat::parse(sector) else {
                continue;
            };
            if r.counter % HEARTBEAT_SECTORS != s as u64 {
                return Err(format!(
                    "sector {s} holds counter {}, not its ring slot",
                    r.counter
                ));
            }
            if r.counter < self.sectors[s] {
                return Err(format!(
                    "sample {}: sector {s} went back from counter {} to {} (boot {:x})",
                    self.samples, self.sectors[s], r.counter, r.boot
                ));
            }
            self.sectors[s] = r.counter;
            if r.counter < r.first || (r.prev == 0) != (r.first == 1) {
                return Err(format!("record {r:x?} contradicts itself"));
            }
            match self.boots.iter_mut().find(|b| b.id == r.boot) {
                Some(b) if b.prev != r.prev || b.first != r.first => {
                    return Err(format!("boot {:x} wrote two different starts", r.boot));
                }
                Some(b) => b.last = b.last.max(r.counter),
                None => self.boots.push(Boot {
                    id: r.boot,
                    prev: r.prev,
                    first: r.first,
                    last: r.counter,
                }),
            }
        }
        self.check()
    }

    fn check(&mut self) -> Result<(), String> {
        self.boots.sort_by_key(|b| b.first);
        for pair in self.boots.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if a.last >= b.first {
                return Err(format!(
                    "fork: boot {:x} wrote counter {} after boot {:x} started at {}",
                    a.id, a.last, b.id, b.first
                ));
            }
        }
        for (i, b) in self.boots.iter().enumerate() {
            // A predecessor that was never sampled (a boot shorter than the sampling period)
            // is unknown; a known one must be the boot just before.
            let known = self.boots.iter().position(|p| p.id == b.prev);
            if let Some(p) = known {
                if p + 1 != i {
                    return Err(format!(
                        "fork: boot {:x} continued boot {:x}, but boot {:x} ran in between",
                        b.id,
                        b.prev,
                        self.boots[i - 1].id
                    ));
                }
            }
        }
        Ok(())
    }

    /// The boots seen, in order.
    pub fn boots(&self) -> &[Boot] {
        &self.boots
    }

    /// The highest counter seen.
    pub fn last(&self) -> u64 {
        self.boots.last().map_or(0, |b| b.last)
    }
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

#[cfg(test)]
mod heartbeat_tests {
    use super::{HEARTBEAT_SECTORS, Heartbeat, HeartbeatHistory};

    /// A disk's ring after `records` were written in order.
    fn ring(records: &[Heartbeat]) -> Vec<u8> {
        let mut disk = vec![0u8; (HEARTBEAT_SECTORS * 512) as usize];
        for r in records {
            let at = (r.counter % HEARTBEAT_SECTORS * 512) as usize;
            disk[at..at + 512].copy_from_slice(&r.sector());
        }
        disk
    }

    fn boot(id: u64, prev: u64, first: u64, upto: u64) -> Vec<Heartbeat> {
        (first..=upto)
            .map(|counter| Heartbeat {
                boot: id,
                counter,
                prev,
                first,
            })
            .collect()
    }

    #[test]
    fn a_clean_handover_is_accepted() {
        let mut written = boot(0xa, 0, 1, 30);
        let mut h = HeartbeatHistory::default();
        h.observe(&ring(&written)).unwrap();
        written.extend(boot(0xb, 0xa, 31, 40));
        h.observe(&ring(&written)).unwrap();
        written.extend(boot(0xc, 0xb, 41, 100));
        h.observe(&ring(&written)).unwrap();
        let ids: Vec<u64> = h.boots().iter().map(|b| b.id).collect();
        assert_eq!(ids, [0xa, 0xb, 0xc]);
        assert_eq!(h.last(), 100);
    }

    #[test]
    fn a_boot_that_goes_on_writing_after_its_successor_started_is_a_fork() {
        let a = boot(0xa, 0, 1, 30);
        let b = boot(0xb, 0xa, 31, 34);
        let mut h = HeartbeatHistory::default();
        h.observe(&ring(&a)).unwrap();
        // Both write alternately: the old boot's 32 lands after the new boot's 31.
        let mut both = a.clone();
        both.push(b[0]);
        both.extend(boot(0xa, 0, 1, 40).into_iter().skip(31).take(1));
        let e = h.observe(&ring(&both)).unwrap_err();
        assert!(e.contains("fork"), "{e}");
    }

    #[test]
    fn two_boots_continuing_one_record_are_a_fork() {
        let a = boot(0xa, 0, 1, 20);
        let mut h = HeartbeatHistory::default();
        h.observe(&ring(&a)).unwrap();
        let mut one = a.clone();
        one.extend(boot(0xb, 0xa, 21, 24));
        h.observe(&ring(&one)).unwrap();
        // A second host also started the VM from counter 20 and overwrote the ring.
        let mut two = a.clone();
        two.extend(boot(0xc, 0xa, 21, 26));
        assert!(h.observe(&ring(&two)).is_err());
    }

    #[test]
    fn a_counter_going_backwards_is_refused() {
        let mut h = HeartbeatHistory::default();
        h.observe(&ring(&boot(0xa, 0, 1, 50))).unwrap();
        let e = h.observe(&ring(&boot(0xa, 0, 1, 45))).unwrap_err();
        assert!(e.contains("back"), "{e}");
    }

    #[test]
    fn continuing_from_a_boot_that_was_not_the_last_is_a_fork() {
        let mut written = boot(0xa, 0, 1, 10);
        written.extend(boot(0xb, 0xa, 11, 20));
        let mut h = HeartbeatHistory::default();
        h.observe(&ring(&boot(0xa, 0, 1, 10))).unwrap();
        h.observe(&ring(&written)).unwrap();
        // Boot c read a stale disk (a's last record) but numbered after b.
        written.extend(boot(0xc, 0xa, 21, 25));
        assert!(h.observe(&ring(&written)).is_err());
    }

    #[test]
    fn blank_and_torn_sectors_are_ignored() {
        let mut disk = ring(&boot(0xa, 0, 1, 5));
        disk[3 * 512 + 20] ^= 1;
        let mut h = HeartbeatHistory::default();
        h.observe(&disk).unwrap();
        assert_eq!(h.last(), 5);
        assert_eq!(h.boots().len(), 1);
    }
}
