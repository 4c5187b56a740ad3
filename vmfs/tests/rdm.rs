//! Raw device mappings as a file type: stored, listed and locked as a file the size of its
//! LUN, never read or written as file data, refused on a datastore of an older version, and
//! checked by fsck.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;

use common::*;
use vmfs::{Access, Datastore, Kind, RdmDevice, RdmMode, RdmRecord};

fn record(ds: &Datastore) -> RdmRecord {
    RdmRecord {
        mode: RdmMode::Physical,
        device: RdmDevice::BlockDevice,
        sector_size: 4096,
        size: 64 << 20,
        created_ns: 1_795_598_011_873_132_631,
        datastore_uuid: ds.superblock().uuid,
        identity: "file:fe00:98c0a1:0 /srv/lun0.img".into(),
        serial: String::new(),
        spec: "/dev/loop3".into(),
    }
}

#[test]
fn a_mapping_is_a_file_the_size_of_its_lun_whose_data_is_elsewhere() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    ds.mkdir_all("/vms/a", 0o755, creds()).unwrap();
    let r = record(&ds);
    let attr = ds.create_rdm_path("/vms/a/db.rdm", &r, creds()).unwrap();
    assert_eq!(
        (attr.kind, attr.size, attr.allocated),
        (Kind::Rdm, 64 << 20, 0)
    );
    assert_eq!(attr.mode() & libc::S_IFMT, libc::S_IFREG);
    let listed = ds.list("/vms/a").unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1.kind, Kind::Rdm);
    assert_eq!(ds.rdm_record(attr.ino).unwrap(), r);

    // Its bytes are on the LUN: reading or writing it as a file is refused, not made up.
    let mut buf = [0u8; 512];
    let e = ds.read(attr.ino, 0, &mut buf).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(e.to_string().contains("raw device mapping"), "{e}");
    let e = ds.write(attr.ino, 0, &buf).unwrap_err();
    assert!(e.to_string().contains("raw device mapping"), "{e}");
    assert!(ds.open_lun("/vms/a/db.rdm", Access::ReadOnly).is_err());
    let e = ds
        .put(
            &mut &b"data"[..],
            "/vms/a/db.rdm",
            &vmfs::PutOptions {
                overwrite: true,
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert!(e.to_string().contains("is a raw device mapping"), "{e}");
    assert_eq!(ds.rdm_record(attr.ino).unwrap(), r);

    // Its lock is a file's: one writer.
    let held = ds.open_path("/vms/a/db.rdm", Access::Exclusive).unwrap();
    let e = ds
        .open_path("/vms/a/db.rdm", Access::Exclusive)
        .err()
        .unwrap();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    drop(held);
    ds.close().unwrap();
    t.assert_clean();

    // It survives a remount, and it is removed like a file.
    let ds = t.open();
    let again = ds.stat_path("/vms/a/db.rdm").unwrap();
    assert_eq!(ds.rdm_record(again.ino).unwrap(), r);
    ds.remove_path("/vms/a/db.rdm", false).unwrap();
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn a_malformed_record_is_refused_and_changes_nothing() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    let mut r = record(&ds);
    r.sector_size = 1000;
    let e = ds.create_rdm_path("/x.rdm", &r, creds()).unwrap_err();
    assert!(e.to_string().contains("sector size 1000"), "{e}");
    let mut r = record(&ds);
    r.identity.clear();
    assert!(ds.create_rdm_path("/x.rdm", &r, creds()).is_err());
    assert!(ds.list("/").unwrap().is_empty());
    ds.close().unwrap();
}

#[test]
fn a_version_2_datastore_refuses_mappings_and_changes_nothing() {
    let t = TestDs::new(128 << 20);
    assert_eq!(t.open_ro().superblock().version, vmfs::RDM_VERSION);
    let sb = t.open_ro().superblock().clone();
    let f = FsOpen::new().read(true).write(true).open(&t.path).unwrap();
    for at in [0, sb.backup_offset()] {
        let mut rec = vec![0u8; 512];
        f.read_exact_at(&mut rec, at).unwrap();
        rec[24..28].copy_from_slice(&2u32.to_le_bytes());
        rec[4..8].fill(0);
        let crc = crc32c::crc32c(&rec);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&rec, at).unwrap();
    }
    let ds = t.open();
    let e = ds
        .create_rdm_path("/db.rdm", &record(&ds), creds())
        .unwrap_err();
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    assert!(
        e.to_string().contains("need datastore format version 3")
            && e.to_string().contains("this datastore is version 2"),
        "{e}"
    );
    assert!(ds.list("/").unwrap().is_empty());
    ds.close().unwrap();
}

#[test]
fn fsck_reports_a_damaged_mapping_payload() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    let attr = ds
        .create_rdm_path("/db.rdm", &record(&ds), creds())
        .unwrap();
    let off = vmfs::debug::inode_offset(ds.superblock(), attr.ino);
    ds.close().unwrap();
    t.assert_clean();

    let f = FsOpen::new().read(true).write(true).open(&t.path).unwrap();
    let mut unit = vec![0u8; vmfs::debug::UNIT];
    f.read_exact_at(&mut unit, off).unwrap();
    unit[vmfs::debug::RDM_MODE_OFFSET] = 9;
    vmfs::debug::reseal_inode(&mut unit, off);
    f.write_all_at(&unit, off).unwrap();

    let report = vmfs::fsck(t.lun_ro(), &vmfs::FsckOptions::default()).unwrap();
    assert!(!report.clean);
    assert!(
        report.findings.iter().any(|f| f.object
            == format!("raw device mapping inode {}", attr.ino)
            && f.problem.contains("unknown mapping mode 9")),
        "{:#?}",
        report.findings
    );
    let ds = t.open_ro();
    let e = ds.rdm_record(attr.ino).unwrap_err();
    assert!(e.to_string().contains("unknown mapping mode 9"), "{e}");
}

#[test]
fn fsck_reports_one_lun_mapped_twice() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    ds.create_rdm_path("/a.rdm", &record(&ds), creds()).unwrap();
    let mut other = record(&ds);
    other.identity = "file:fe00:98c0a1:0 /elsewhere/lun0.img".into();
    let second = ds.create_rdm_path("/b.rdm", &other, creds()).unwrap();
    ds.close().unwrap();
    let report = vmfs::fsck(t.lun_ro(), &vmfs::FsckOptions::default()).unwrap();
    assert!(!report.clean);
    assert!(
        report.findings.iter().any(|f| f.object
            == format!("raw device mapping inode {}", second.ino)
            && f.problem
                .contains("maps the same LUN as raw device mapping inode")),
        "{:#?}",
        report.findings
    );
}
