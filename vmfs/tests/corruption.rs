//! Bad input: not a datastore, newer format, truncated image, damaged superblock, a bit flip
//! in every kind of metadata unit, a full datastore, a LUN too small. Each gets a clear error
//! naming the object, never wrong data, and fsck finds (and where safe repairs) it.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;

use common::*;
use vmfs::{Datastore, Error, FormatOptions, FsckOptions, NewFile, OpenOptions};

fn flip(t: &TestDs, offset: u64) {
    let f = FsOpen::new().read(true).write(true).open(&t.path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x04;
    f.write_all_at(&b, offset).unwrap();
}

fn superblock(t: &TestDs) -> vmfs::Superblock {
    t.open_ro().superblock().clone()
}

fn fsck(t: &TestDs, repair: bool) -> vmfs::FsckReport {
    let lun = if repair { t.lun() } else { t.lun_ro() };
    vmfs::fsck(
        lun,
        &FsckOptions {
            repair,
            open: Some(host()),
        },
    )
    .unwrap()
}

fn assert_found(report: &vmfs::FsckReport, object: &str) {
    assert!(
        report.findings.iter().any(|f| f.object.contains(object)),
        "no finding names {object:?}: {:#?}",
        report.findings
    );
    assert!(!report.clean);
}

#[test]
fn not_a_datastore() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk");
    std::fs::write(&path, pattern(4 << 20, 3)).unwrap();
    let lun = lun::open(path.to_str().unwrap(), &lun::OpenOptions::default()).unwrap();
    let e = Datastore::open(lun.clone(), &OpenOptions::read_only())
        .err()
        .unwrap();
    assert!(matches!(e, Error::NotADatastore { .. }), "{e}");
    assert!(e.to_string().contains("junk"), "{e}");
    assert!(vmfs::fsck(lun, &FsckOptions::default()).is_err());
}

#[test]
fn newer_format_version_is_refused() {
    let t = TestDs::new(128 << 20);
    let sb = superblock(&t);
    let f = FsOpen::new().read(true).write(true).open(&t.path).unwrap();
    for at in [0, sb.backup_offset()] {
        let mut rec = vec![0u8; 512];
        f.read_exact_at(&mut rec, at).unwrap();
        rec[24..28].copy_from_slice(&(vmfs::FORMAT_VERSION + 1).to_le_bytes());
        rec[4..8].fill(0);
        let crc = crc32c::crc32c(&rec);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&rec, at).unwrap();
    }
    let e = Datastore::open(t.lun(), &host()).err().unwrap();
    assert!(
        matches!(e, Error::NewerVersion { found, .. } if found == vmfs::FORMAT_VERSION + 1),
        "{e}"
    );
}

#[test]
fn truncated_image_is_refused() {
    let t = TestDs::new(128 << 20);
    let f = FsOpen::new().write(true).open(&t.path).unwrap();
    f.set_len(100 << 20).unwrap();
    let e = Datastore::open(t.lun(), &host()).err().unwrap();
    assert!(
        matches!(e, Error::Truncated { expected, actual, .. } if expected == 128 << 20 && actual == 100 << 20),
        "{e}"
    );
}

#[test]
fn corrupt_primary_superblock_falls_back_to_backup_and_repairs() {
    let t = TestDs::new(128 << 20);
    {
        let ds = t.open();
        let a = ds.create_path("/keep", &NewFile::default()).unwrap();
        ds.write(a.ino, 0, b"still here").unwrap();
        ds.close().unwrap();
    }
    flip(&t, 100);
    let ds = t.open_ro();
    assert!(matches!(
        ds.superblock_source(),
        vmfs::SuperblockSource::Backup(_)
    ));
    let info = ds.info().unwrap();
    assert_eq!(info.superblock, "backup");
    assert!(
        info.superblock_warning
            .unwrap()
            .contains("primary superblock")
    );
    let mut buf = [0u8; 10];
    ds.read(ds.resolve("/keep").unwrap(), 0, &mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    drop(ds);
    assert_found(&fsck(&t, false), "primary superblock");
    let repaired = fsck(&t, true);
    assert!(repaired.clean, "{:#?}", repaired.findings);
    assert_eq!(t.open_ro().info().unwrap().superblock, "primary");
    t.assert_clean();
}

/// Offsets of the first unit with a given magic inside a region of the image.
fn find_magic(t: &TestDs, start: u64, len: u64, magic: &[u8; 4]) -> Vec<u64> {
    let f = std::fs::File::open(&t.path).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut at = start;
    while at < start + len {
        f.read_exact_at(&mut buf, at).unwrap();
        if &buf[..4] == magic {
            out.push(at);
        }
        at += 4096;
    }
    out
}

#[test]
fn bit_flip_in_an_inode_is_detected_named_and_repaired() {
    let t = TestDs::new(128 << 20);
    let ino = {
        let ds = t.open();
        let a = ds.create_path("/victim", &NewFile::default()).unwrap();
        ds.write(a.ino, 0, &pattern(300_000, 1)).unwrap();
        ds.create_path("/bystander", &NewFile::default()).unwrap();
        ds.close().unwrap();
        a.ino
    };
    let sb = superblock(&t);
    flip(&t, vmfs::debug::inode_offset(&sb, ino) + 70);
    let ds = t.open();
    let e = ds.stat_path("/victim").unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    assert!(e.to_string().contains(&format!("inode {ino}")), "{e}");
    assert!(e.to_string().contains("checksum"), "{e}");
    let mut buf = vec![0u8; 100];
    assert!(
        ds.read(ino, 0, &mut buf).is_err(),
        "no data from a corrupt inode"
    );
    ds.close().unwrap();
    assert_found(&fsck(&t, false), &format!("inode {ino}"));
    let r = fsck(&t, true);
    assert!(r.clean, "{:#?}", r.findings);
    let ds = t.open_ro();
    assert!(ds.stat_path("/bystander").is_ok());
    assert!(ds.stat_path("/victim").is_err());
    drop(ds);
    t.assert_clean();
}

#[test]
fn bit_flip_in_a_directory_unit_is_detected_and_entries_go_to_lost_found() {
    let t = TestDs::new(128 << 20);
    {
        let ds = t.open();
        ds.mkdir_path("/d", 0o755, creds()).unwrap();
        let a = ds.create_path("/d/file", &NewFile::default()).unwrap();
        ds.write(a.ino, 0, b"orphaned data").unwrap();
        ds.close().unwrap();
    }
    let dir_ino = t.open_ro().resolve("/d").unwrap();
    // The directory's first unit is in its sub-block: find the unit that names it.
    let sb = superblock(&t);
    let units = find_magic(
        &t,
        sb.sub_blocks.area_offset,
        sb.sub_blocks.count * sb.sub_blocks.size,
        b"VMDR",
    );
    let f = std::fs::File::open(&t.path).unwrap();
    let target = units
        .into_iter()
        .find(|&off| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, off + 16).unwrap();
            u64::from_le_bytes(b) == dir_ino
        })
        .unwrap();
    flip(&t, target + 40);
    let ds = t.open();
    let e = ds.stat_path("/d/file").unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("directory inode {dir_ino} unit 0")),
        "{e}"
    );
    ds.close().unwrap();
    assert_found(
        &fsck(&t, false),
        &format!("directory inode {dir_ino} unit 0"),
    );
    let r = fsck(&t, true);
    assert!(r.clean, "{:#?}", r.findings);
    let ds = t.open_ro();
    let lost = ds.list("/lost+found").unwrap();
    assert_eq!(lost.len(), 1, "{lost:?}");
    let mut buf = [0u8; 13];
    ds.read(lost[0].1.ino, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"orphaned data");
    drop(ds);
    t.assert_clean();
}

#[test]
fn bit_flip_in_a_bitmap_is_detected_and_rebuilt() {
    let t = TestDs::new(128 << 20);
    {
        let ds = t.open();
        let a = ds.create_path("/f", &NewFile::default()).unwrap();
        ds.write(a.ino, 0, &pattern(3 << 20, 2)).unwrap();
        ds.close().unwrap();
    }
    let sb = superblock(&t);
    let maps = find_magic(
        &t,
        sb.file_blocks.meta_offset,
        sb.file_blocks.area_offset - sb.file_blocks.meta_offset,
        b"VMBM",
    );
    let f = std::fs::File::open(&t.path).unwrap();
    let used = maps
        .into_iter()
        .find(|&off| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, off + 64).unwrap();
            b.iter().any(|&x| x != 0)
        })
        .unwrap();
    flip(&t, used + 64);
    let ds = t.open();
    let e = ds.statfs().unwrap_err();
    assert!(
        e.to_string().contains("file blocks bitmap of cluster"),
        "{e}"
    );
    ds.close().unwrap();
    assert_found(&fsck(&t, false), "file blocks bitmap of cluster");
    let r = fsck(&t, true);
    assert!(r.clean, "{:#?}", r.findings);
    let ds = t.open_ro();
    let mut back = vec![0u8; 3 << 20];
    ds.read(ds.resolve("/f").unwrap(), 0, &mut back).unwrap();
    assert!(back == pattern(3 << 20, 2));
}

#[test]
fn bit_flip_in_a_pointer_block_never_returns_wrong_data() {
    let t = TestDs::with(
        128 << 20,
        FormatOptions {
            label: "pb".into(),
            block_size: 64 << 10,
            ..Default::default()
        },
    );
    let ino = {
        let ds = t.open();
        let a = ds.create_path("/big", &NewFile::default()).unwrap();
        // Past the 480 direct addresses: needs a pointer block.
        ds.write(a.ino, 500 * 65536, &pattern(65536, 4)).unwrap();
        ds.close().unwrap();
        a.ino
    };
    let sb = superblock(&t);
    let units = find_magic(
        &t,
        sb.pointer_blocks.area_offset,
        sb.pointer_blocks.count * sb.pointer_blocks.size,
        b"VMPB",
    );
    assert_eq!(units.len(), 16);
    for u in &units {
        flip(&t, u + 100);
    }
    let ds = t.open();
    let mut buf = vec![0u8; 65536];
    let e = ds.read(ino, 500 * 65536, &mut buf).unwrap_err();
    assert!(
        e.to_string().contains("pointer block")
            && e.to_string().contains(&format!("of inode {ino}")),
        "{e}"
    );
    ds.close().unwrap();
    assert_found(&fsck(&t, false), "pointer block");
    let r = fsck(&t, true);
    assert!(r.clean, "{:#?}", r.findings);
    t.assert_clean();
}

#[test]
fn damaged_journal_header_and_heartbeat_slot_are_found_and_reset() {
    let t = TestDs::new(128 << 20);
    let sb = superblock(&t);
    flip(&t, sb.journal_area(5) + 30);
    flip(&t, sb.heartbeat_slot_offset(0) + 30);
    let r = fsck(&t, false);
    assert_found(&r, "journal header of host slot 5");
    assert_found(&r, "heartbeat slot 0");
    let r = fsck(&t, true);
    assert!(r.clean, "{:#?}", r.findings);
    t.assert_clean();
}

#[test]
fn full_datastore_gives_enospc_and_stays_consistent() {
    let t = TestDs::with(
        128 << 20,
        FormatOptions {
            label: "full".into(),
            max_files: Some(1024),
            ..Default::default()
        },
    );
    let ds = t.open();
    let keep = ds.create_path("/keep", &NewFile::default()).unwrap();
    ds.write(keep.ino, 0, &pattern(1 << 20, 5)).unwrap();
    let free = ds.statfs().unwrap().blocks_free;
    let a = ds.create_path("/fill", &NewFile::default()).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match ds.write(a.ino, written, &chunk) {
            Ok(_) => written += 1 << 20,
            Err(e) => break e,
        }
        assert!(written <= free << 20, "wrote more than the free space");
    };
    assert!(matches!(err, Error::NoSpace { .. }), "{err}");
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(written, free << 20);
    assert_eq!(
        ds.getattr(a.ino).unwrap().size,
        written,
        "the failed write changed nothing"
    );
    // A thick file that cannot be fully allocated is not created at all.
    let e = ds
        .create_vdisk("/thick.vdisk", 64 << 20, true, creds())
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert!(ds.stat_path("/thick.vdisk").is_err());
    // Freeing space makes room again.
    ds.remove_path("/fill", false).unwrap();
    ds.write(
        ds.create_path("/after", &NewFile::default()).unwrap().ino,
        0,
        &chunk,
    )
    .unwrap();
    let mut back = vec![0u8; 1 << 20];
    ds.read(keep.ino, 0, &mut back).unwrap();
    assert!(back == pattern(1 << 20, 5));
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn running_out_of_file_descriptors_is_enospc() {
    let t = TestDs::with(
        128 << 20,
        FormatOptions {
            label: "fds".into(),
            max_files: Some(128),
            ..Default::default()
        },
    );
    let ds = t.open();
    let mut n = 0;
    let err = loop {
        match ds.create_path(&format!("/f{n}"), &NewFile::default()) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(n, 127, "root uses one descriptor");
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert!(err.to_string().contains("file descriptors"));
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn lun_too_small_names_the_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny");
    let lun = lun::open(
        path.to_str().unwrap(),
        &lun::OpenOptions {
            create_size: Some(16 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let e = vmfs::format(lun, &FormatOptions::default()).unwrap_err();
    let Error::TooSmall { min, .. } = &e else {
        panic!("{e}")
    };
    assert!(e.to_string().contains("minimum"));
    let path2 = dir.path().join("minimal");
    let lun = lun::open(
        path2.to_str().unwrap(),
        &lun::OpenOptions {
            create_size: Some(*min),
            ..Default::default()
        },
    )
    .unwrap();
    vmfs::format(lun, &FormatOptions::default()).unwrap();
}

#[test]
fn format_refuses_an_existing_datastore_without_force() {
    let t = TestDs::new(128 << 20);
    let e = vmfs::format(t.lun(), &FormatOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::AlreadyFormatted { ref label, .. } if label == "test"),
        "{e}"
    );
    vmfs::format(
        t.lun(),
        &FormatOptions {
            force: true,
            label: "new".into(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(t.open_ro().superblock().label, "new");
    t.assert_clean();
}

#[test]
fn read_only_open_writes_nothing() {
    let t = TestDs::new(128 << 20);
    {
        let ds = t.open();
        ds.mkdir_all("/a/b", 0o755, creds()).unwrap();
        ds.close().unwrap();
    }
    let before = std::fs::read(&t.path).unwrap();
    let ds = t.open_ro();
    ds.list("/a").unwrap();
    ds.info().unwrap();
    assert!(matches!(
        ds.mkdir_path("/x", 0o755, creds()),
        Err(Error::ReadOnly { .. })
    ));
    drop(ds);
    vmfs::fsck(t.lun_ro(), &FsckOptions::default()).unwrap();
    assert!(
        std::fs::read(&t.path).unwrap() == before,
        "read-only use changed the LUN"
    );
}
