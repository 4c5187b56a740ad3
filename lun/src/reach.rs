//! How this machine reaches a LUN, which decides who a compare-and-write on it excludes:
//! an OFD lock excludes processes of this machine only, so it is enough for a file on a
//! local file system and for nothing another machine could also reach.

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// How a LUN is reached. See [`crate::Lun::reach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// A regular file on a local file system: no other machine can open it.
    LocalFile,
    /// A regular file on a network or FUSE file system, named: another machine may open
    /// the same file.
    SharedFile(&'static str),
    /// A block device of this kind: it may be a LUN other machines see too.
    BlockDevice(DeviceKind),
    /// An NBD export.
    Nbd,
    /// Anything else (a virtual disk inside a datastore, a test wrapper): assumed shared.
    Other,
}

/// The kind of a block device, from its kernel name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// sd*: SCSI, SAS, FC and iSCSI LUNs.
    Scsi,
    Nvme,
    Loop,
    VirtioBlk,
    DeviceMapper,
    Md,
    Nbd,
    Other,
}

impl DeviceKind {
    /// Classifies a block device by its kernel name (partitions included: `sda1` is SCSI).
    pub fn from_kernel_name(name: &str) -> DeviceKind {
        let prefixed = |p: &str| name.starts_with(p);
        if prefixed("sd") {
            DeviceKind::Scsi
        } else if prefixed("nvme") {
            DeviceKind::Nvme
        } else if prefixed("loop") {
            DeviceKind::Loop
        } else if prefixed("vd") {
            DeviceKind::VirtioBlk
        } else if prefixed("dm-") {
            DeviceKind::DeviceMapper
        } else if prefixed("md") {
            DeviceKind::Md
        } else if prefixed("nbd") {
            DeviceKind::Nbd
        } else {
            DeviceKind::Other
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Scsi => "SCSI",
            DeviceKind::Nvme => "NVMe",
            DeviceKind::Loop => "loop",
            DeviceKind::VirtioBlk => "virtio-blk",
            DeviceKind::DeviceMapper => "device-mapper",
            DeviceKind::Md => "md",
            DeviceKind::Nbd => "nbd",
            DeviceKind::Other => "other",
        }
    }
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reach::LocalFile => write!(f, "a file on a local file system"),
            Reach::SharedFile(fs) => write!(f, "a file on a {fs} file system"),
            Reach::BlockDevice(kind) => write!(f, "a {} block device", kind.name()),
            Reach::Nbd => write!(f, "an NBD export"),
            Reach::Other => write!(f, "a LUN of unknown reach"),
        }
    }
}

/// Who a LUN's compare-and-write excludes. See [`crate::Lun::compare_and_write_scope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasScope {
    /// No compare-and-write at all.
    None,
    /// Processes of this machine only: an OFD byte-range lock around read, compare, write.
    ThisMachine,
    /// Every machine that reaches the device: the device's own atomic command, named.
    AllMachines(&'static str),
}

/// The network and FUSE file systems, by statfs `f_type`: a file on one of them can be
/// opened from another machine, where this machine's OFD locks are not seen.
pub fn shared_fs_name(f_type: i64) -> Option<&'static str> {
    Some(match f_type {
        0x6969 => "NFS",
        0x517B => "SMB",
        0xFF53_4D42 => "CIFS",
        0xFE53_4D42 => "SMB2",
        0x0102_1997 => "9p",
        0x6573_5546 => "FUSE",
        0x00C3_6400 => "CephFS",
        0x0116_1970 => "GFS2",
        0x7461_636F => "OCFS2",
        0x5346_414F => "AFS",
        0x0BD0_0BD0 => "Lustre",
        _ => return None,
    })
}

/// How `file` (opened from the given metadata) is reached: the statfs type of the file
/// system holding a regular file, the kernel name of a block device.
pub(crate) fn of_file(file: &File, metadata: &std::fs::Metadata, block_device: bool) -> Reach {
    if block_device {
        let rdev = metadata.rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        let name = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
            .ok()
            .and_then(|uevent| {
                uevent
                    .lines()
                    .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))
            })
            .unwrap_or_default();
        return Reach::BlockDevice(DeviceKind::from_kernel_name(&name));
    }
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: st is a writable statfs buffer and the descriptor is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        // Unknown file system: claim nothing about who else can reach it.
        return Reach::SharedFile("unknown");
    }
    // SAFETY: fstatfs succeeded and filled the (zeroed) buffer.
    // f_type is i64 on 64-bit targets and narrower on others.
    #[allow(clippy::unnecessary_cast)]
    let f_type = unsafe { st.assume_init() }.f_type as i64;
    match shared_fs_name(f_type) {
        Some(fs) => Reach::SharedFile(fs),
        None => Reach::LocalFile,
    }
}

/// Where a partition starts on its disk, in bytes (0 for a whole disk): commands sent
/// through SG_IO address the whole disk, not the partition.
pub(crate) fn partition_start(metadata: &std::fs::Metadata) -> Option<u64> {
    let rdev = metadata.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    match std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/start")) {
        // sysfs counts partition starts in 512-byte units whatever the sector size.
        Ok(start) => start.trim().parse::<u64>().ok().map(|s| s * 512),
        Err(_) => Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_kinds_from_kernel_names() {
        assert_eq!(DeviceKind::from_kernel_name("sdb"), DeviceKind::Scsi);
        assert_eq!(DeviceKind::from_kernel_name("sdb2"), DeviceKind::Scsi);
        assert_eq!(DeviceKind::from_kernel_name("nvme0n1p1"), DeviceKind::Nvme);
        assert_eq!(DeviceKind::from_kernel_name("loop7"), DeviceKind::Loop);
        assert_eq!(DeviceKind::from_kernel_name("vda"), DeviceKind::VirtioBlk);
        assert_eq!(
            DeviceKind::from_kernel_name("dm-3"),
            DeviceKind::DeviceMapper
        );
        assert_eq!(DeviceKind::from_kernel_name("md127"), DeviceKind::Md);
        assert_eq!(DeviceKind::from_kernel_name("nbd0"), DeviceKind::Nbd);
        assert_eq!(DeviceKind::from_kernel_name(""), DeviceKind::Other);
    }

    #[test]
    fn network_and_fuse_file_systems_are_shared() {
        assert_eq!(shared_fs_name(0x6969), Some("NFS"));
        assert_eq!(shared_fs_name(0x6573_5546), Some("FUSE"));
        assert_eq!(shared_fs_name(0xFF53_4D42), Some("CIFS"));
        assert_eq!(shared_fs_name(0x0102_1997), Some("9p"));
        assert_eq!(shared_fs_name(0xEF53), None, "ext4 is local");
        assert_eq!(shared_fs_name(0x0102_1994), None, "tmpfs is local");
    }

    #[test]
    fn a_temporary_file_is_local() {
        let file = tempfile::tempfile().unwrap();
        let md = file.metadata().unwrap();
        assert_eq!(of_file(&file, &md, false), Reach::LocalFile);
    }
}
