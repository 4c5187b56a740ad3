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

/// Changing the lock protocol is refused while a host has the datastore mounted, naming
/// the host; unmounted, it changes, and the datastore mounts and checks clean under it.
#[test]
fn lock_protocol_changes_only_while_unmounted() {
    let dir = tempfile::tempdir().unwrap();
    let lun: Arc<dyn lun::Lun> =
        Arc::new(lun::FileLun::create(&dir.path().join("ds.vmfs"), 256 << 20).unwrap());
    vmfs::format(lun.clone(), &FormatOptions::default()).unwrap();
    let ds = Datastore::open(lun.clone(), &host()).unwrap();
    ds.mkdir_all("/vms/a", 0o755, creds()).unwrap();
    let err = vmfs::set_lock_protocol(lun.clone(), LockProtocol::DiskPaxos).unwrap_err();
    assert!(
        err.to_string().contains("test-host") && err.to_string().contains("mounted"),
        "{err}"
    );
    assert_eq!(
        vmfs::read_superblock(&*lun).unwrap().0.lock_protocol,
        LockProtocol::CompareAndWrite,
        "a refused change writes nothing"
    );
    ds.close().unwrap();

    let safety = vmfs::set_lock_protocol(lun.clone(), LockProtocol::DiskPaxos).unwrap();
    assert!(safety.safe_across_machines);
    let ds = Datastore::open(lun.clone(), &host()).unwrap();
    assert_eq!(ds.info().unwrap().lock_protocol, LockProtocol::DiskPaxos);
    ds.mkdir_all("/vms/b", 0o755, creds()).unwrap();
    assert_eq!(ds.list("/vms").unwrap().len(), 2);
    ds.close().unwrap();
    let report = vmfs::fsck(lun, &vmfs::FsckOptions::default()).unwrap();
    assert!(report.clean, "{:#?}", report.findings);
}
