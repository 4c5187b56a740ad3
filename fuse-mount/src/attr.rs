//! vmfs attributes and errors in the kernel's terms.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo, TimeOrNow};
use vmfs::{Attr, Kind};

pub(crate) fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File | Kind::Rdm => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

pub(crate) fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.allocated.div_ceil(512),
        atime: system_time(a.atime_ns),
        mtime: system_time(a.mtime_ns),
        ctime: system_time(a.ctime_ns),
        crtime: system_time(a.crtime_ns),
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        // The kernel's dev_t is 32 bits wide in FUSE; mknod gave no more.
        rdev: a.rdev as u32,
        // The datastore block: tools size their buffers from it, and 1 MiB requests are
        // what the mount serves fastest.
        blksize: a.block_size,
        flags: 0,
    }
}

fn system_time(ns: i64) -> SystemTime {
    let magnitude = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

pub(crate) fn time_ns(t: TimeOrNow) -> i64 {
    let t = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// The errno for a vmfs error, logged at a level that matches what it means: damage and
/// I/O failures are errors, lock conflicts warnings, the rest (ENOENT, EEXIST...) is the
/// normal life of a file system.
pub(crate) fn errno(op: &'static str, ino: u64, e: &vmfs::Error) -> Errno {
    let code = e.errno();
    match code {
        libc::EIO => tracing::error!(op, ino, error = %e, "datastore error"),
        libc::EBUSY => tracing::warn!(op, ino, error = %e, "lock conflict"),
        libc::ENOSPC => tracing::warn!(op, ino, error = %e, "datastore full"),
        _ => tracing::debug!(op, ino, error = %e, "request failed"),
    }
    Errno::from_i32(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_including_before_1970() {
        for ns in [0i64, 1, 1_700_000_000_123_456_789, -1, -86_400_000_000_007] {
            assert_eq!(time_ns(TimeOrNow::SpecificTime(system_time(ns))), ns);
        }
    }
}
