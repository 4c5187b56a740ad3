//! Raw device mappings: a small mapping file on a datastore that names a raw LUN, locks it
//! and moves with the VM, as VMware's RDM does.
//!
//! The mapping (a vmfs inode of type 4, see `vmfs/FORMAT.md`) stores the LUN's identity
//! (`lun::LunIdentity`: a loop device's backing file and offset, a disk's WWN or serial, an
//! NBD URI, a file's device and inode), the path it was named by, its size and logical
//! sector size when mapped, the compatibility mode and the UUID of the datastore it was
//! made on. [`open`] resolves the LUN by that identity (the recorded path first, then a scan
//! of this machine's block devices), refuses a LUN that is missing, changed size or sector
//! size, or is claimed by two devices, and holds the mapping file's on-disk lock for as
//! long as the returned [`RdmLun`] lives: the lock a virtual disk's file has, so a second
//! writer anywhere in the cluster is refused naming the holder.
//!
//! Virtual mode hands the LUN to vapp's stack like any virtual disk; physical mode opens the
//! device O_DIRECT and exposes its serial ([`RdmLun::serial`]) and discard
//! ([`RdmLun::discard`]) to whoever presents it to a guest.
//!
//! ```no_run
//! # fn main() -> Result<(), rdm::Error> {
//! # let ds: vmfs::Datastore = unimplemented!();
//! rdm::create(&ds, "/vms/a/db.rdm", "/dev/sdb", rdm::Mode::Physical)?;
//! let lun = rdm::open(&ds, "/vms/a/db.rdm", vmfs::Access::Exclusive)?;
//! # let _ = lun; Ok(()) }
//! ```

mod device;
mod error;
mod mapping;

pub use device::RdmLun;
pub use error::{Error, Result};
pub use mapping::{Mapping, Verified, create, is_mapping, open, open_ino, show, verify};
pub use vmfs::{RdmDevice as DeviceKind, RdmMode as Mode, RdmRecord};
