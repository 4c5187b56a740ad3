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
    /// Atomic compare-and-write of one sector (SCSI ATS; VMFS's "ATS-only" datastores).
    CompareAndWrite,
    /// Plain sector-atomic reads and writes: delta leases and Disk Paxos (works over NBD).
    DiskPaxos,
}

impl LockProtocol {
    pub(crate) fn code(self) -> u32 {
        match self {
            LockProtocol::CompareAndWrite => 1,
            LockProtocol::DiskPaxos => 2,
        }
    }

    pub(crate) fn from_code(code: u32) -> Option<LockProtocol> {
        match code {
            1 => Some(LockProtocol::CompareAndWrite),
            2 => Some(LockProtocol::DiskPaxos),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LockProtocol::CompareAndWrite => "compare-and-write",
            LockProtocol::DiskPaxos => "disk-paxos",
        }
    }
}

impl std::str::FromStr for LockProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cas" | "ats" | "compare-and-write" => Ok(LockProtocol::CompareAndWrite),
            "paxos" | "disk-paxos" => Ok(LockProtocol::DiskPaxos),
            other => Err(format!(
                "unknown lock protocol {other:?} (use cas or paxos)"
            )),
        }
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
