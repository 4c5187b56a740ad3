//! What ext4 stores and vmfs must too: FIFOs, device nodes and sockets, symbolic link
//! targets up to PATH_MAX - 1 bytes, and ENAMETOOLONG (not ENOENT) for a name no directory
//! can hold. A datastore of format version 1 still opens and refuses only what it cannot
//! store.
#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsStr;
use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;

use common::*;
use vmfs::{Datastore, Kind, ROOT_INO, SetAttr};

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn special_files_are_stored_and_behave_as_files() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    let dev = libc::makedev(8, 17);
    for (n, kind, rdev) in [
        ("fifo", Kind::Fifo, 0),
        ("chr", Kind::CharDevice, libc::makedev(1, 3)),
        ("blk", Kind::BlockDevice, dev),
        ("sock", Kind::Socket, 0),
    ] {
        let a = ds
            .mknod(ROOT_INO, name(n), kind, 0o640, rdev, creds())
            .unwrap();
        assert_eq!((a.kind, a.perm, a.rdev, a.size), (kind, 0o640, rdev, 0));
        assert_eq!(a.mode() & libc::S_IFMT, kind.type_bits());
    }
    // Not a way to make regular files or directories.
    let e = ds
        .mknod(ROOT_INO, name("d"), Kind::Dir, 0o755, 0, creds())
        .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");

    ds.mkdir(ROOT_INO, name("sub"), 0o755, creds()).unwrap();
    let sub = ds.lookup(ROOT_INO, name("sub")).unwrap().ino;
    ds.rename(ROOT_INO, name("blk"), sub, name("disk"), false)
        .unwrap();
    let blk = ds.lookup(sub, name("disk")).unwrap();
    ds.link(blk.ino, ROOT_INO, name("disk-link")).unwrap();
    let changed = ds
        .setattr(
            blk.ino,
            &SetAttr {
                mode: Some(0o600),
                uid: Some(7),
                gid: Some(8),
                mtime_ns: Some(1_000_000_000),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(
        (changed.perm, changed.uid, changed.gid, changed.mtime_ns),
        (0o600, 7, 8, 1_000_000_000)
    );
    ds.unlink(ROOT_INO, name("fifo")).unwrap();
    ds.close().unwrap();

    let ds = t.open();
    assert!(ds.lookup(ROOT_INO, name("fifo")).is_err());
    let a = ds.lookup(ROOT_INO, name("disk-link")).unwrap();
    assert_eq!(
        (a.kind, a.rdev, a.nlink, a.perm),
        (Kind::BlockDevice, dev, 2, 0o600)
    );
    let kinds: Vec<_> = ds
        .readdir(ROOT_INO, 0)
        .unwrap()
        .into_iter()
        .map(|e| (e.name.to_string_lossy().into_owned(), e.kind))
        .collect();
    assert!(
        kinds.contains(&("chr".into(), Kind::CharDevice)),
        "{kinds:?}"
    );
    assert!(kinds.contains(&("sock".into(), Kind::Socket)), "{kinds:?}");
    ds.close().unwrap();
    t.assert_clean();
    let report = vmfs::fsck(t.lun_ro(), &vmfs::FsckOptions::default()).unwrap();
    assert_eq!(report.stats.special, 3);
}

#[test]
fn symbolic_link_targets_up_to_4095_bytes_are_stored() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    let target = |len: usize| "t/".repeat(len / 2) + &"x".repeat(len % 2);
    for len in [1, vmfs::INLINE_MAX, vmfs::INLINE_MAX + 1, 4095] {
        let a = ds
            .symlink(
                ROOT_INO,
                name(&format!("l{len}")),
                name(&target(len)),
                creds(),
            )
            .unwrap();
        assert_eq!(a.size, len as u64);
    }
    let e = ds
        .symlink(ROOT_INO, name("l4096"), name(&target(4096)), creds())
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENAMETOOLONG, "{e}");
    assert!(e.to_string().contains("4096 bytes"), "{e}");
    ds.close().unwrap();
    t.assert_clean();

    let ds = t.open();
    for len in [1, vmfs::INLINE_MAX, vmfs::INLINE_MAX + 1, 4095] {
        let a = ds.lookup(ROOT_INO, name(&format!("l{len}"))).unwrap();
        assert_eq!(ds.readlink(a.ino).unwrap(), name(&target(len)), "{len}");
    }
    // Removing a long link frees its storage.
    ds.unlink(ROOT_INO, name("l4095")).unwrap();
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn a_name_over_255_bytes_is_too_long_for_every_call() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    let long = "n".repeat(256);
    let long = name(&long);
    let file = ds.create_path("/f", &Default::default()).unwrap().ino;
    ds.mkdir(ROOT_INO, name("d"), 0o755, creds()).unwrap();
    let results = [
        ("lookup", ds.lookup(ROOT_INO, long).map(drop)),
        ("unlink", ds.unlink(ROOT_INO, long)),
        ("rmdir", ds.rmdir(ROOT_INO, long)),
        (
            "rename from",
            ds.rename(ROOT_INO, long, ROOT_INO, name("x"), false),
        ),
        (
            "rename to",
            ds.rename(ROOT_INO, name("f"), ROOT_INO, long, false),
        ),
        ("link", ds.link(file, ROOT_INO, long).map(drop)),
        (
            "symlink",
            ds.symlink(ROOT_INO, long, name("f"), creds()).map(drop),
        ),
        ("mkdir", ds.mkdir(ROOT_INO, long, 0o755, creds()).map(drop)),
        (
            "mknod",
            ds.mknod(ROOT_INO, long, Kind::Fifo, 0o644, 0, creds())
                .map(drop),
        ),
    ];
    for (op, r) in results {
        let e = r.expect_err(op);
        assert_eq!(e.errno(), libc::ENAMETOOLONG, "{op}: {e}");
        assert!(e.to_string().contains("longer than 255 bytes"), "{op}: {e}");
    }
    let e = ds
        .stat_path(&format!("/d/{}", "n".repeat(300)))
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENAMETOOLONG, "{e}");
    assert_eq!(ds.list("/").unwrap().len(), 2);
    ds.close().unwrap();
    t.assert_clean();
}

/// Rewrites both superblock copies as format version 1, as a datastore made by an older vapp.
fn make_version_1(t: &TestDs) {
    let sb = t.open_ro().superblock().clone();
    let f = FsOpen::new().read(true).write(true).open(&t.path).unwrap();
    for at in [0, sb.backup_offset()] {
        let mut rec = vec![0u8; 512];
        f.read_exact_at(&mut rec, at).unwrap();
        rec[24..28].copy_from_slice(&1u32.to_le_bytes());
        rec[4..8].fill(0);
        let crc = crc32c::crc32c(&rec);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&rec, at).unwrap();
    }
}

#[test]
fn a_version_1_datastore_opens_and_refuses_only_what_it_cannot_store() {
    let t = TestDs::new(128 << 20);
    make_version_1(&t);
    let ds = Datastore::open(t.lun(), &host()).unwrap();
    assert_eq!(ds.superblock().version, 1);
    ds.mkdir(ROOT_INO, name("d"), 0o755, creds()).unwrap();
    ds.create_path("/d/f", &Default::default()).unwrap();
    let short = "s".repeat(vmfs::INLINE_MAX);
    ds.symlink(ROOT_INO, name("short"), name(&short), creds())
        .unwrap();

    let e = ds
        .mknod(ROOT_INO, name("fifo"), Kind::Fifo, 0o644, 0, creds())
        .unwrap_err();
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    assert!(
        e.to_string().contains("need datastore format version 2")
            && e.to_string().contains("this datastore is version 1"),
        "{e}"
    );
    let long = "l".repeat(vmfs::INLINE_MAX + 1);
    let e = ds
        .symlink(ROOT_INO, name("long"), name(&long), creds())
        .unwrap_err();
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    assert_eq!(ds.list("/").unwrap().len(), 2, "a refusal changes nothing");
    ds.close().unwrap();
    t.assert_clean();
    assert_eq!(t.open_ro().info().unwrap().format_version, 1);
}
