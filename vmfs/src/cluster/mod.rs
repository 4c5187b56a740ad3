//! Clustering: many hosts on one LUN, coordinating only through the disk.
//!
//! - `heartbeat`: host ids are heartbeat slots held as delta leases (sanlock) and renewed by
//!   a background thread; a host that cannot renew fences itself (`lease`).
//! - `monitor`: other hosts are judged alive or dead by watching their renewal counters on
//!   our own monotonic clock.
//! - `record`: lock records next to every inode and resource cluster (free, exclusive,
//!   read-only shared, multi-writer), changed atomically by compare-and-write or, on LUNs
//!   without it, under a Disk Paxos lease (`paxos`).
//! - [`Node`]: a joined host tying these together.
//! - [`survey`]: what `vapp datastore hosts` shows, read without joining.
//!
//! The datastore layer adds journal replay before lock breaking (recovery) and the rule that
//! every metadata change happens under the lock of what it changes.

pub(crate) mod heartbeat;
pub(crate) mod lease;
pub(crate) mod monitor;
pub(crate) mod node;
pub(crate) mod paxos;
pub(crate) mod record;
pub mod survey;
mod timing;

use lun::{CasScope, Lun, Reach};
use serde::Serialize;

use crate::layout::{ResourceKind, Superblock};

pub use node::{HostId, Identity, Node};
pub use record::{Holder, LockMode, LockRecord, Verdict};
pub use timing::Timing;

/// How hosts of a datastore change shared records. Fixed at format time and recorded in the
/// superblock: a host using one protocol does not exclude a host using the other, so a LUN
/// that cannot do what the superblock says is refused for read-write mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockProtocol {
    /// Atomic compare-and-write of one sector that every host reaching the LUN sees: the
    /// device's own (SCSI ATS; VMFS's "ATS-only" datastores), or a host-local lock on a
    /// file no other machine can reach.
    CompareAndWrite,
    /// Plain sector-atomic reads and writes: delta leases and Disk Paxos (works over NBD).
    DiskPaxos,
    /// Compare-and-write that may be atomic on this machine only (an OFD lock), because
    /// the user stated at format that only one machine reaches the LUN.
    HostLocal,
}

impl LockProtocol {
    pub(crate) fn code(self) -> u32 {
        match self {
            LockProtocol::CompareAndWrite => 1,
            LockProtocol::DiskPaxos => 2,
            LockProtocol::HostLocal => 3,
        }
    }

    pub(crate) fn from_code(code: u32) -> Option<LockProtocol> {
        match code {
            1 => Some(LockProtocol::CompareAndWrite),
            2 => Some(LockProtocol::DiskPaxos),
            3 => Some(LockProtocol::HostLocal),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LockProtocol::CompareAndWrite => "compare-and-write",
            LockProtocol::DiskPaxos => "disk-paxos",
            LockProtocol::HostLocal => "host-local",
        }
    }
}

impl std::str::FromStr for LockProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cas" | "ats" | "compare-and-write" => Ok(LockProtocol::CompareAndWrite),
            "paxos" | "disk-paxos" => Ok(LockProtocol::DiskPaxos),
            "local" | "host-local" => Ok(LockProtocol::HostLocal),
            other => Err(format!(
                "unknown lock protocol {other:?} (use cas, paxos or local)"
            )),
        }
    }
}

/// What a datastore's locks rest on when reached through one LUN, and whether they hold
/// when other machines reach the same LUN.
#[derive(Debug, Clone, Serialize)]
pub struct LockSafety {
    pub protocol: LockProtocol,
    /// The primitive doing the work, e.g. "SCSI COMPARE AND WRITE".
    pub primitive: String,
    /// How this machine reaches the LUN, e.g. "a loop block device".
    pub reach: String,
    /// True when two machines reaching this LUN can never both hold one lock.
    pub safe_across_machines: bool,
    /// Why a read-write mount through this LUN is refused; `None` when it is allowed.
    pub refused: Option<String>,
}

/// Judges `protocol` on `lun`: the one rule format, mount and `datastore info` share.
pub fn lock_safety(protocol: LockProtocol, lun: &dyn Lun) -> LockSafety {
    let reach = lun.reach();
    let scope = lun.compare_and_write_scope();
    let cas_primitive = match scope {
        CasScope::AllMachines(command) => command.to_string(),
        CasScope::ThisMachine => "OFD byte-range lock (this machine only)".to_string(),
        CasScope::None => "none".to_string(),
    };
    let no_cas = || {
        format!(
            "formatted for {} locking, but reached as {reach}, which cannot do \
             compare-and-write; hosts using plain reads and writes would not exclude hosts \
             using compare-and-write: read-write mount refused (with no host mounting it, \
             switch it with `vapp datastore set-lock-protocol LUN paxos`, or mount it \
             read-only)",
            protocol.name(),
        )
    };
    let (primitive, safe_across_machines, refused) = match (protocol, scope) {
        (LockProtocol::DiskPaxos, _) => (
            "Disk Paxos over plain sector reads and writes".to_string(),
            true,
            None,
        ),
        (_, CasScope::None) => (cas_primitive, false, Some(no_cas())),
        (_, CasScope::AllMachines(_)) => (cas_primitive, true, None),
        (LockProtocol::HostLocal, CasScope::ThisMachine) => (cas_primitive, false, None),
        (LockProtocol::CompareAndWrite, CasScope::ThisMachine) if reach == Reach::LocalFile => {
            (cas_primitive, false, None)
        }
        (LockProtocol::CompareAndWrite, CasScope::ThisMachine) => (
            cas_primitive,
            false,
            Some(format!(
                "formatted for compare-and-write, but reached as {reach}, whose \
                 compare-and-write is an OFD lock other machines do not see, so two machines \
                 could hold one lock: read-write mount refused (with no host mounting it, \
                 switch it with `vapp datastore set-lock-protocol LUN paxos`, or `local` if \
                 no other machine can reach the LUN; or open it through the local file it \
                 was formatted on, or mount it read-only)"
            )),
        ),
    };
    LockSafety {
        protocol,
        primitive,
        reach: reach.to_string(),
        safe_across_machines,
        refused,
    }
}

/// The protocol `datastore format` picks when none is asked for: compare-and-write where it
/// excludes every machine that can reach the LUN, Disk Paxos everywhere else.
pub(crate) fn default_protocol(lun: &dyn Lun) -> LockProtocol {
    if lock_safety(LockProtocol::CompareAndWrite, lun)
        .refused
        .is_none()
    {
        LockProtocol::CompareAndWrite
    } else {
        LockProtocol::DiskPaxos
    }
}

/// Something a lock record guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockTarget {
    /// A file descriptor (file, directory or symlink).
    Inode(u64),
    /// A resource cluster of one kind.
    Cluster(ResourceKind, u64),
}

impl LockTarget {
    /// LUN offset of the record's unit.
    pub fn offset(&self, sb: &Superblock) -> u64 {
        match *self {
            LockTarget::Inode(ino) => sb.inode_lock_offset(ino),
            LockTarget::Cluster(kind, c) => sb.area(kind).lock_offset(c),
        }
    }

    /// The object id stored in the record (catches records copied to the wrong place).
    pub fn code(&self) -> u64 {
        match *self {
            LockTarget::Inode(ino) => ino,
            LockTarget::Cluster(kind, c) => (u64::from(kind.code()) << 56) | c,
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            LockTarget::Inode(ino) => format!("inode {ino}"),
            LockTarget::Cluster(kind, c) => format!("{} cluster {c}", kind.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only what the policy reads: how the LUN is reached and who its compare-and-write
    /// excludes. No I/O is ever done.
    #[derive(Debug)]
    struct Reached(Reach, CasScope);

    impl Lun for Reached {
        fn name(&self) -> &str {
            "test"
        }
        fn sector_size(&self) -> u32 {
            512
        }
        fn size(&self) -> u64 {
            0
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> lun::Result<()> {
            unreachable!("the policy does no I/O")
        }
        fn write_at(&self, _: &[u8], _: u64) -> lun::Result<()> {
            unreachable!("the policy does no I/O")
        }
        fn flush(&self) -> lun::Result<()> {
            unreachable!("the policy does no I/O")
        }
        fn supports_compare_and_write(&self) -> bool {
            self.1 != CasScope::None
        }
        fn compare_and_write_scope(&self) -> CasScope {
            self.1
        }
        fn reach(&self) -> Reach {
            self.0
        }
    }

    const ATS: CasScope = CasScope::AllMachines("SCSI COMPARE AND WRITE");

    #[test]
    fn defaults_follow_who_compare_and_write_excludes() {
        use lun::DeviceKind::*;
        let cases = [
            (Reach::BlockDevice(Scsi), ATS, LockProtocol::CompareAndWrite),
            (
                Reach::BlockDevice(Scsi),
                CasScope::ThisMachine,
                LockProtocol::DiskPaxos,
            ),
            (
                Reach::BlockDevice(Nvme),
                CasScope::ThisMachine,
                LockProtocol::DiskPaxos,
            ),
            (
                Reach::BlockDevice(Loop),
                CasScope::ThisMachine,
                LockProtocol::DiskPaxos,
            ),
            (
                Reach::LocalFile,
                CasScope::ThisMachine,
                LockProtocol::CompareAndWrite,
            ),
            (
                Reach::SharedFile("NFS"),
                CasScope::ThisMachine,
                LockProtocol::DiskPaxos,
            ),
            (Reach::Nbd, CasScope::None, LockProtocol::DiskPaxos),
            (Reach::Other, CasScope::ThisMachine, LockProtocol::DiskPaxos),
        ];
        for (reach, scope, expected) in cases {
            assert_eq!(
                default_protocol(&Reached(reach, scope)),
                expected,
                "{reach} with {scope:?}"
            );
        }
    }

    #[test]
    fn read_write_use_is_judged_by_the_path_opened() {
        let scsi = Reached(Reach::BlockDevice(lun::DeviceKind::Scsi), ATS);
        let ats = lock_safety(LockProtocol::CompareAndWrite, &scsi);
        assert!(ats.safe_across_machines && ats.refused.is_none());
        assert_eq!(ats.primitive, "SCSI COMPARE AND WRITE");

        let nfs = Reached(Reach::SharedFile("NFS"), CasScope::ThisMachine);
        let refused = lock_safety(LockProtocol::CompareAndWrite, &nfs);
        assert!(!refused.safe_across_machines);
        let why = refused.refused.unwrap();
        assert!(
            why.contains("NFS") && why.contains("set-lock-protocol LUN paxos"),
            "{why}"
        );

        // Stated single-machine: allowed anywhere compare-and-write exists, never "safe".
        let local = lock_safety(LockProtocol::HostLocal, &nfs);
        assert!(local.refused.is_none() && !local.safe_across_machines);
        let nbd = Reached(Reach::Nbd, CasScope::None);
        assert!(lock_safety(LockProtocol::HostLocal, &nbd).refused.is_some());
        assert!(lock_safety(LockProtocol::DiskPaxos, &nbd).safe_across_machines);
    }
}
