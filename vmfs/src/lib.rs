//! A clustered VM datastore on one LUN (VMFS-style).
//!
//! The on-disk format is described in `FORMAT.md` next to this crate. In short: a superblock
//! (and its backup at the end of the LUN), 64 heartbeat slots, Disk Paxos lease areas, one
//! redo journal per host slot, and resource clusters (lock record + bitmap) for file
//! descriptors, sub-blocks, pointer blocks and file blocks. Every metadata unit is 4 KiB
//! with magic, location and crc32c, and every metadata change goes through the host's journal.
//!
//! Many hosts mount one LUN at once: a read-write [`Datastore::open`] joins the cluster
//! (a heartbeat slot renewed in the background, self-fencing when it cannot be), and every
//! metadata change runs under the on-disk lock of what it changes; a dead host's journal is
//! replayed before its locks are broken. See [`cluster`] and the "Clustering" section of
//! `FORMAT.md`.
//!
//! ```no_run
//! # fn main() -> vmfs::Result<()> {
//! let lun = lun::open("/srv/ds1.vmfs", &lun::OpenOptions { create_size: Some(8 << 30), ..Default::default() })?;
//! vmfs::format(lun.clone(), &vmfs::FormatOptions { label: "ds1".into(), ..Default::default() })?;
//! let ds = vmfs::Datastore::open(lun, &vmfs::OpenOptions::read_write())?;
//! ds.mkdir_all("/vms/web01", 0o755, vmfs::Creds::current())?;
//! ds.create_vdisk("/vms/web01/disk0.vdisk", 20 << 30, false, vmfs::Creds::current())?;
//! let disk = ds.open_lun("/vms/web01/disk0.vdisk", vmfs::Access::Exclusive)?;
//! # let _ = disk; Ok(()) }
//! ```

mod bitmap;
pub mod cluster;
mod codec;
mod copy;
mod datastore;
mod dir;
mod error;
mod format;
mod fsck;
mod handle;
mod inode;
mod io;
mod journal;
mod layout;
mod locks;
mod path;
mod rdm;
mod recovery;
mod state;
mod store;

pub use cluster::{LockMode, LockProtocol, LockSafety, Timing, lock_safety};
pub use copy::{CopyStatus, ResignatureReport, resignature, resignature_frozen};
pub use datastore::{
    Attr, Creds, Datastore, DirEntry, HOST_NAME_ENV, HOST_UUID_ENV, HostSlotInfo, Info,
    KEEP_SIGNATURE_ENV, NewFile, OpenOptions, ResourceInfo, SetAttr, SnapshotRole, StatFs,
    SuperblockSource, read_superblock,
};
pub use dir::NAME_MAX;
pub use error::{Error, Result};
pub use format::{FormatOptions, FormatReport, format, set_lock_protocol};
pub use fsck::{Finding, FindingGroup, FsckOptions, FsckReport, Severity, fsck};
pub use handle::{Access, FileHandle, VdiskLun};
pub use inode::{INLINE_MAX, Kind};
pub use layout::{
    FORMAT_VERSION, HOST_SLOTS, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, MIN_JOURNAL, RDM_VERSION, ROOT_INO,
    ResourceKind, Superblock,
};
pub use path::{PutOptions, snapshot_pool_path, snapshot_source_path};
pub use rdm::{RDM_IDENTITY_MAX, RDM_SERIAL_MAX, RDM_SPEC_MAX, RdmDevice, RdmMode, RdmRecord};

/// Offsets of on-disk structures, for tests and tools that inspect or damage a datastore.
pub mod debug {
    pub use crate::codec::UNIT;
    pub use crate::layout::Superblock;

    /// LUN offset of inode `ino`'s unit.
    pub fn inode_offset(sb: &Superblock, ino: u64) -> u64 {
        sb.inode_offset(ino)
    }

    /// Reseals an inode unit read from `location` after a test changed its bytes, so the
    /// damage is found by what checks the contents, not by the crc.
    pub fn reseal_inode(unit: &mut [u8], location: u64) {
        crate::codec::seal(unit, crate::codec::MAGIC_INODE, location, UNIT);
    }

    /// Offset of a raw device mapping's mode byte within its inode unit.
    pub const RDM_MODE_OFFSET: usize = crate::inode::TAIL + 6;
}
