//! Resource-cluster bitmap units: one bit per resource, set = in use, with the cluster's free
//! count in the header so a host can skip full clusters without counting bits.

use crate::codec::*;
use crate::layout::ResourceKind;

const OFF_KIND: usize = 16;
const OFF_CLUSTER: usize = 24;
const OFF_COUNT: usize = 32;
const OFF_FREE: usize = 36;
const BITS_OFF: usize = 64;
pub const BITS_PER_UNIT: usize = (UNIT - BITS_OFF) * 8;

/// A fresh bitmap for `count` resources, all free, sealed at `location`.
pub fn new(kind: ResourceKind, cluster: u64, count: u64, location: u64) -> Box<Unit> {
    let mut u = zero_unit();
    put_u8(&mut u[..], OFF_KIND, kind.code());
    put_u64(&mut u[..], OFF_CLUSTER, cluster);
    put_u32(&mut u[..], OFF_COUNT, count as u32);
    put_u32(&mut u[..], OFF_FREE, count as u32);
    seal(&mut u[..], MAGIC_BITMAP, location, UNIT);
    u
}

pub fn free(u: &Unit) -> u64 {
    u64::from(get_u32(u, OFF_FREE))
}

pub fn count(u: &Unit) -> u64 {
    u64::from(get_u32(u, OFF_COUNT))
}

pub fn get(u: &Unit, bit: u64) -> bool {
    let bit = bit as usize;
    u[BITS_OFF + bit / 8] & (1 << (bit % 8)) != 0
}

/// Sets or clears `bit`, keeping the free count; returns false when it already had `value`.
pub fn set(u: &mut Unit, bit: u64, value: bool, location: u64) -> bool {
    if get(u, bit) == value {
        return false;
    }
    let b = bit as usize;
    u[BITS_OFF + b / 8] ^= 1 << (b % 8);
    let free = get_u32(u, OFF_FREE);
    put_u32(u, OFF_FREE, if value { free - 1 } else { free + 1 });
    seal(&mut u[..], MAGIC_BITMAP, location, UNIT);
    true
}

/// First clear bit at or after `from` (wrapping once), if any.
pub fn find_free(u: &Unit, from: u64) -> Option<u64> {
    let n = count(u);
    if free(u) == 0 || n == 0 {
        return None;
    }
    let from = from % n;
    (from..n).chain(0..from).find(|&i| !get(u, i))
}

/// Header and content consistency beyond the crc: the bitmap belongs to this cluster, and its
/// free count matches its bits.
pub fn check(
    u: &Unit,
    kind: ResourceKind,
    cluster: u64,
    count_expected: u64,
) -> Result<(), String> {
    check_header(u, kind, cluster, count_expected)?;
    let used = (0..count_expected).filter(|&i| get(u, i)).count() as u64;
    if count_expected - used != free(u) {
        return Err(format!(
            "free count {} disagrees with its bits ({} free)",
            free(u),
            count_expected - used
        ));
    }
    Ok(())
}

/// The cheap part of [`check`], done on every load: identity and a plausible free count.
pub fn check_header(
    u: &Unit,
    kind: ResourceKind,
    cluster: u64,
    count_expected: u64,
) -> Result<(), String> {
    if get_u8(u, OFF_KIND) != kind.code() || get_u64(u, OFF_CLUSTER) != cluster {
        return Err(format!(
            "belongs to resource type {} cluster {}",
            get_u8(u, OFF_KIND),
            get_u64(u, OFF_CLUSTER)
        ));
    }
    if count(u) != count_expected || free(u) > count_expected {
        return Err(format!(
            "covers {} resources with {} free, expected {count_expected}",
            count(u),
            free(u)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_free_and_count() {
        let mut u = new(ResourceKind::FileBlock, 3, 10, 4096);
        assert_eq!(verify(&u[..], MAGIC_BITMAP, 4096, UNIT), Ok(()));
        assert_eq!(free(&u), 10);
        assert!(set(&mut u, 4, true, 4096));
        assert!(!set(&mut u, 4, true, 4096));
        assert_eq!(free(&u), 9);
        assert_eq!(find_free(&u, 4), Some(5));
        assert_eq!(find_free(&u, 0), Some(0));
        for i in 0..10 {
            set(&mut u, i, true, 4096);
        }
        assert_eq!(find_free(&u, 0), None);
        assert_eq!(verify(&u[..], MAGIC_BITMAP, 4096, UNIT), Ok(()));
        check(&u, ResourceKind::FileBlock, 3, 10).unwrap();
        assert!(check(&u, ResourceKind::Inode, 3, 10).is_err());
        put_u32(&mut u[..], OFF_FREE, 5);
        assert!(check(&u, ResourceKind::FileBlock, 3, 10).is_err());
        assert!(check_header(&u, ResourceKind::FileBlock, 3, 10).is_ok());
    }
}
