//! fsck against damage found by overwriting 1 MiB of a datastore with random bytes: the Disk
//! Paxos lease areas, the first file descriptors (the root's included), and the descriptors'
//! bitmaps. fsck finds it in a few times the time of a clean check, `--repair` makes the
//! datastore usable again, and what it can find of the tree is reattached under /lost+found.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::*;
use vmfs::{Datastore, FsckOptions, FsckReport, LockProtocol, NewFile, Severity};

fn fsck(t: &TestDs, repair: bool) -> (FsckReport, Duration) {
    let lun = if repair { t.lun() } else { t.lun_ro() };
    let start = Instant::now();
    let report = vmfs::fsck(
        lun,
        &FsckOptions {
            repair,
            open: Some(host()),
        },
    )
    .unwrap();
    (report, start.elapsed())
}

/// Overwrites `len` bytes at `offset` with random bytes.
fn scribble(t: &TestDs, offset: u64, len: usize) {
    let f = FsOpen::new().write(true).open(&t.path).unwrap();
    f.write_all_at(&pattern(len, offset ^ 0x5eed), offset)
        .unwrap();
}

fn errors(r: &FsckReport) -> Vec<&vmfs::Finding> {
    r.findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect()
}

#[test]
fn random_bytes_over_the_lease_areas_are_found_and_rewritten() {
    let p = LockProtocol::DiskPaxos;
    let t = TestDs::cluster(p, 100);
    {
        let ds = Datastore::open(t.host_lun(p), &host()).unwrap();
        let a = ds.create_path("/before", &NewFile::default()).unwrap();
        ds.write(a.ino, 0, b"written before the damage").unwrap();
        ds.close().unwrap();
    }
    let sb = t.open_ro().superblock().clone();
    scribble(&t, sb.lease_offset, 1 << 20);

    let (check, _) = fsck(&t, false);
    assert!(!check.clean, "{:#?}", check.findings);
    assert!(
        errors(&check)
            .iter()
            .any(|f| f.object.contains("lease area") && f.repair.is_some()),
        "{:#?}",
        check.findings
    );
    let (repair, _) = fsck(&t, true);
    assert!(repair.clean, "{:#?}", repair.findings);
    assert!(repair.repaired > 0);
    let (after, _) = fsck(&t, false);
    assert!(after.clean && after.problems == 0, "{:#?}", after.findings);

    // Hosts change lock records under those leases again.
    let ds = Datastore::open(t.host_lun(p), &host()).unwrap();
    let a = ds.create_path("/after", &NewFile::default()).unwrap();
    ds.write(a.ino, 0, b"and after the repair").unwrap();
    ds.remove_path("/before", false).unwrap();
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn random_bytes_over_the_first_inodes_are_repaired_and_the_rest_found_in_lost_found() {
    // 1 MiB is 128 descriptors: the root and ones no file uses, when this host's
    // allocations start in another cluster (the cluster it starts in follows its slot,
    // which is drawn at random: draw again until they do).
    let (t, sb, early_ino, late_ino) = loop {
        let t = TestDs::new(1 << 30);
        let ds = t.open();
        let sb = ds.superblock().clone();
        let early_ino = ds.mkdir_path("/early", 0o755, creds()).unwrap().ino;
        if early_ino <= 128 || early_ino + 300 > sb.inodes.count {
            ds.close().unwrap();
            continue;
        }
        for n in 0..150 {
            ds.create_path(&format!("/early/f-{n}"), &NewFile::default())
                .unwrap();
        }
        let late_ino = ds.mkdir_path("/late", 0o755, creds()).unwrap().ino;
        let keep = ds.create_path("/late/keep", &NewFile::default()).unwrap();
        ds.write(keep.ino, 0, &pattern(300_000, 9)).unwrap();
        ds.close().unwrap();
        break (t, sb, early_ino, late_ino);
    };
    assert!(late_ino > 128);
    let (clean, clean_took) = fsck(&t, false);
    assert!(clean.clean);
    scribble(&t, sb.inode_lock_offset(1), 1 << 20);

    let (check, took) = fsck(&t, false);
    eprintln!("fsck: clean {clean_took:?}, damaged {took:?}");
    assert!(!check.clean);
    assert!(
        took <= clean_took * 4 + Duration::from_millis(500),
        "fsck of the damaged datastore took {took:?}, of the clean one {clean_took:?}"
    );
    // One line per kind of damage, not per unit.
    assert!(
        check.groups.len() <= 16 && check.findings.len() >= 128,
        "{} groups of {} findings: {:#?}",
        check.groups.len(),
        check.findings.len(),
        check.groups
    );

    let (repair, took) = fsck(&t, true);
    assert!(repair.clean, "{:#?}", errors(&repair));
    assert!(
        took <= clean_took * 8 + Duration::from_secs(2),
        "repair took {took:?}"
    );
    let (after, _) = fsck(&t, false);
    assert!(after.clean && after.problems == 0, "{:#?}", errors(&after));

    let ds = t.open();
    let names: Vec<String> = ds
        .readdir(ds.resolve("/lost+found").unwrap(), 0)
        .unwrap()
        .into_iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&format!("#{late_ino}")), "{names:?}");
    let keep = ds
        .resolve(&format!("/lost+found/#{late_ino}/keep"))
        .unwrap();
    let mut back = vec![0u8; 300_000];
    ds.read(keep, 0, &mut back).unwrap();
    assert_eq!(back, pattern(300_000, 9));
    assert!(names.contains(&format!("#{early_ino}")), "{names:?}");
    let early = ds.resolve(&format!("/lost+found/#{early_ino}")).unwrap();
    assert_eq!(ds.readdir(early, 0).unwrap().len(), 150 + 2);
    let a = ds.create_path("/new", &NewFile::default()).unwrap();
    ds.write(a.ino, 0, b"usable again").unwrap();
    ds.remove_path(&format!("/lost+found/#{late_ino}/keep"), false)
        .unwrap();
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn random_bytes_over_the_descriptor_bitmaps_are_checked_without_waiting_on_each_unit() {
    let t = TestDs::new(256 << 20);
    let mut files = Vec::new();
    let sb;
    {
        let ds = t.open();
        sb = ds.superblock().clone();
        ds.mkdir_path("/d", 0o755, creds()).unwrap();
        for n in 0..20u64 {
            let a = ds
                .create_path(&format!("/d/f-{n}"), &NewFile::default())
                .unwrap();
            ds.write(a.ino, 0, &pattern(5000, n)).unwrap();
            files.push((a.ino, n));
        }
        ds.close().unwrap();
    }
    let (_, clean_took) = fsck(&t, false);
    // The descriptors' cluster metadata (bitmaps and cluster locks), then the first
    // descriptors.
    let damaged = sb.inodes.meta_offset..sb.inodes.meta_offset + (1 << 20);
    scribble(&t, damaged.start, 1 << 20);
    let (check, took) = fsck(&t, false);
    eprintln!("fsck: clean {clean_took:?}, damaged {took:?}");
    assert!(!check.clean);
    assert!(
        took <= clean_took * 4 + Duration::from_millis(500),
        "fsck of the damaged datastore took {took:?}, of the clean one {clean_took:?}"
    );
    assert!(check.groups.len() <= 16, "{:#?}", check.groups);
    let (repair, _) = fsck(&t, true);
    assert!(repair.clean, "{:#?}", errors(&repair));
    t.assert_clean();

    // Every file whose descriptor survived still holds its bytes, wherever it now hangs.
    let ds = t.open();
    let mut survived = 0;
    for (ino, n) in files {
        if damaged.contains(&sb.inode_offset(ino)) {
            continue;
        }
        let mut back = vec![0u8; 5000];
        ds.read(ino, 0, &mut back).unwrap();
        assert_eq!(back, pattern(5000, n), "inode {ino}");
        survived += 1;
    }
    eprintln!("{survived} of 20 files survived");
    let a = ds.create_path("/new", &NewFile::default()).unwrap();
    ds.write(a.ino, 0, b"usable again").unwrap();
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn a_disk_with_snapshots_is_written_only_through_the_engine_and_fsck_pairs_it_with_its_pool() {
    use vmfs::{Access, Error, SnapshotRole};
    const DISK: &str = "/vms/a/disk0.vdisk";
    const POOL: &str = "/vms/a/.disk0.vdisk.snap";
    let t = TestDs::new(128 << 20);
    {
        let ds = t.open();
        ds.mkdir_all("/vms/a", 0o755, creds()).unwrap();
        let disk = ds.create_vdisk(DISK, 1 << 20, false, creds()).unwrap();
        let pool = ds.create_vdisk(POOL, 1 << 20, false, creds()).unwrap();
        ds.set_snapshot_role(pool.ino, SnapshotRole::Pool).unwrap();
        ds.set_snapshot_role(disk.ino, SnapshotRole::Source)
            .unwrap();
        let refused = ds.open_lun(DISK, Access::Exclusive).unwrap_err();
        assert!(
            matches!(&refused, Error::SnapshotProtected { pool: false, .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains(POOL), "{refused}");
        assert_eq!(refused.errno(), libc::EPERM);
        let refused = ds.remove_path(POOL, false).unwrap_err();
        assert!(
            matches!(refused, Error::SnapshotProtected { pool: true, .. }),
            "{refused}"
        );
        assert!(ds.open_lun(DISK, Access::ReadOnly).is_ok());
        let through = ds.open_lun_through_engine(DISK, Access::Exclusive).unwrap();
        through.write_at(&[1u8; 512], 0).unwrap();
        drop(through);
        ds.close().unwrap();
    }
    let (check, _) = fsck(&t, false);
    assert!(check.clean, "{:#?}", check.findings);

    // The pool lost (by a tool that ignores the flags): the disk's flag is found and cleared.
    {
        let ds = t.open();
        let pool = ds.stat_path(POOL).unwrap();
        ds.set_snapshot_role(pool.ino, SnapshotRole::None).unwrap();
        ds.remove_path(POOL, false).unwrap();
        ds.close().unwrap();
    }
    let (check, _) = fsck(&t, false);
    assert!(!check.clean);
    assert!(
        errors(&check)
            .iter()
            .any(|f| f.problem.contains(".disk0.vdisk.snap is missing")),
        "{:#?}",
        check.findings
    );
    fsck(&t, true);
    let (after, _) = fsck(&t, false);
    assert!(after.clean, "{:#?}", after.findings);
    let ds = t.open();
    assert!(ds.open_lun(DISK, Access::Exclusive).is_ok());
    ds.close().unwrap();
}
