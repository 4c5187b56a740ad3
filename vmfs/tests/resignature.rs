//! Resignaturing a crash-consistent copy of a datastore (an array snapshot taken while a
//! host had it mounted): the host's committed journal transactions are replayed, its slot
//! and locks freed, and a power cut at any write of the resignature leaves the old
//! signature or the new one, never a datastore that does not open.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::{CutAfterCommit, TestDs, creds, host_named};
use lun::fault::{CrashMode, FaultLun};
use vmfs::{Access, Datastore, LockProtocol, NewFile};

const DOOMED_ENV: &str = "VMFS_TEST_DOOMED_LUN";

/// Run by [`crashed_copy`] in a child process: mounts the datastore, leaves a rename in
/// its journal only (the power goes right after the commit) with a file held open, and
/// exits without unmounting, as a host that died.
#[test]
fn doomed_host_helper() {
    let Ok(path) = std::env::var(DOOMED_ENV) else {
        return;
    };
    let lun = lun::open(&path, &lun::OpenOptions::default()).unwrap();
    let fault = Arc::new(CutAfterCommit::new(lun));
    let a = Datastore::open(fault.clone(), &host_named("doomed")).unwrap();
    a.mkdir_path("/d", 0o755, creds()).unwrap();
    a.create_path("/d/f", &NewFile::default()).unwrap();
    a.sync().unwrap();
    let _held = a.open_path("/d/f", Access::Exclusive).unwrap();
    fault.arm();
    a.rename_path("/d/f", "/d/renamed").unwrap();
    a.sync().unwrap();
    assert!(fault.is_cut());
    std::process::exit(0);
}

/// A datastore whose host died with a committed rename still in its journal and a lock
/// held, and a `cp --sparse=always` of it, as an array copy would find it.
fn crashed_copy() -> (TestDs, std::path::PathBuf) {
    let t = TestDs::cluster(LockProtocol::CompareAndWrite, 100);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "doomed_host_helper", "--nocapture"])
        .env(DOOMED_ENV, &t.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let copy = t.dir.path().join("copy.vmfs");
    cp(&t.path, &copy);
    (t, copy)
}

fn cp(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

fn open_lun(path: &Path) -> Arc<dyn lun::Lun> {
    lun::open(path.to_str().unwrap(), &lun::OpenOptions::default()).unwrap()
}

fn fsck_clean(path: &Path) {
    let lun = lun::open(
        path.to_str().unwrap(),
        &lun::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let report = vmfs::fsck(lun, &vmfs::FsckOptions::default()).unwrap();
    assert!(report.clean, "{:#?}", report.findings);
}

#[test]
fn resignature_replays_the_copys_journals_and_frees_its_locks() {
    let (t, copy) = crashed_copy();
    let old = vmfs::read_superblock(&*open_lun(&copy)).unwrap().0;

    let report = vmfs::resignature(open_lun(&copy), Some("clone")).unwrap();
    assert!(report.transactions_replayed >= 1, "{report:?}");
    assert_eq!(report.slots_cleared, 1, "{report:?}");
    assert!(report.locks_cleared >= 1, "{report:?}");
    assert_eq!(report.label, "clone");

    let sb = vmfs::read_superblock(&*open_lun(&copy)).unwrap().0;
    assert_ne!(sb.uuid, old.uuid);
    assert_eq!(sb.label, "clone");
    assert_eq!(sb.lun_identity, open_lun(&copy).identity());
    fsck_clean(&copy);

    // The rename only the journal held is in place, and the dead host's open-file lock is
    // gone at once, not after a dead-host timeout.
    let started = Instant::now();
    let ds = Datastore::open(open_lun(&copy), &host_named("new")).unwrap();
    let h = ds.open_path("/d/renamed", Access::Exclusive).unwrap();
    assert!(started.elapsed() < ds.timing().dead_after());
    drop(h);
    ds.close().unwrap();
    fsck_clean(&copy);
    drop(t);
}

#[test]
fn a_power_cut_during_resignature_leaves_the_old_signature_or_the_new_one() {
    let (t, pristine) = crashed_copy();
    let old = vmfs::read_superblock(&*open_lun(&pristine)).unwrap().0;
    let work = t.dir.path().join("work.vmfs");

    cp(&pristine, &work);
    let counter = Arc::new(FaultLun::new(open_lun(&work)));
    vmfs::resignature(counter.clone(), Some("clone")).unwrap();
    let writes = counter.writes();
    assert!(writes >= 4, "{writes} writes");

    for k in 0..writes {
        std::fs::remove_file(&work).unwrap();
        cp(&pristine, &work);
        let fault = Arc::new(FaultLun::new(open_lun(&work)));
        fault.set_crash_mode(CrashMode::DropUnflushed);
        fault.crash_after_writes(k);
        let _ = vmfs::resignature(fault.clone(), Some("clone"));
        assert!(fault.crashed(), "crash point {k} of {writes} not reached");
        drop(fault);

        let sb = vmfs::read_superblock(&*open_lun(&work))
            .unwrap_or_else(|e| panic!("crash after {k} writes: {e}"))
            .0;
        if sb.uuid == old.uuid {
            assert_eq!(sb.label, old.label, "crash after {k} writes");
            // The old signature: resignature runs again to the end.
            vmfs::resignature(open_lun(&work), Some("clone")).unwrap();
        } else {
            assert_eq!(sb.label, "clone", "crash after {k} writes");
        }
        fsck_clean(&work);
        let ds = Datastore::open(open_lun(&work), &host_named("after")).unwrap();
        ds.stat_path("/d/renamed")
            .unwrap_or_else(|e| panic!("crash after {k} writes: {e}"));
        ds.close().unwrap();
    }
}

/// A datastore formatted before vapp recorded LUN identities is never judged a copy: its
/// copies open read-write as before, until a resignature records an identity.
#[test]
fn a_datastore_without_a_recorded_identity_is_never_a_copy() {
    let t = TestDs::cluster(LockProtocol::CompareAndWrite, 100);
    let lun = open_lun(&t.path);
    let (mut sb, _) = vmfs::read_superblock(&*lun).unwrap();
    assert!(sb.lun_identity.is_some(), "format records the LUN identity");
    sb.lun_identity = None;
    lun.write_at(&sb.encode(0)[..], 0).unwrap();
    lun.write_at(&sb.encode(sb.backup_offset())[..], sb.backup_offset())
        .unwrap();
    lun.flush().unwrap();
    drop(lun);
    let copy = t.dir.path().join("old-copy.vmfs");
    cp(&t.path, &copy);

    for path in [&t.path, &copy] {
        let ds = Datastore::open(open_lun(path), &host_named("legacy")).unwrap();
        assert_eq!(ds.info().unwrap().copy, "unknown");
        ds.mkdir_path("/written", 0o755, creds()).unwrap();
        ds.close().unwrap();
        fsck_clean(path);
    }

    vmfs::resignature(open_lun(&copy), None).unwrap();
    let ds = Datastore::open(open_lun(&copy), &host_named("legacy")).unwrap();
    assert_eq!(ds.info().unwrap().copy, "no");
    ds.close().unwrap();
}
