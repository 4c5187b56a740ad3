//! Which lock protocol a datastore gets by default, and which ones it may keep using, by
//! how the LUN is reached. Loop devices are covered in blockdev.rs, files on a FUSE file
//! system in the root package's fuse_tools.rs.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use vmfs::{Datastore, FormatOptions, LockProtocol};

/// A file on a local file system can be reached from this machine only, so the host-local
/// compare-and-write is safe there and stays the default.
#[test]
fn a_local_file_keeps_compare_and_write() {
    let dir = tempfile::tempdir().unwrap();
    let lun: Arc<dyn lun::Lun> =
        Arc::new(lun::FileLun::create(&dir.path().join("ds.vmfs"), 256 << 20).unwrap());
    assert_eq!(lun.reach(), lun::Reach::LocalFile);
    let report = vmfs::format(lun.clone(), &FormatOptions::default()).unwrap();
    assert_eq!(report.lock_protocol, LockProtocol::CompareAndWrite);
    let ds = Datastore::open(lun.clone(), &host()).unwrap();
    let info = ds.info().unwrap();
    assert_eq!(info.lock_protocol, LockProtocol::CompareAndWrite);
    assert_eq!(info.lock_safety.refused, None);
    assert_eq!(info.lock_safety.reach, "a file on a local file system");
    ds.close().unwrap();
}
