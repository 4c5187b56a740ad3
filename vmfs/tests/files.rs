//! Files and directories: round trips of many sizes, sparse and huge files, namespace
//! operations, persistence across remounts.
#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsStr;

use common::*;
use vmfs::{Access, Error, Kind, NewFile, ROOT_INO};

fn write_read(ds: &vmfs::Datastore, path: &str, data: &[u8]) {
    let attr = ds.create_path(path, &NewFile::default()).unwrap();
    if !data.is_empty() {
        ds.write(attr.ino, 0, data).unwrap();
    }
    let mut back = vec![0u8; data.len() + 100];
    let n = ds.read(attr.ino, 0, &mut back).unwrap();
    assert_eq!(n, data.len(), "{path}");
    assert!(back[..n] == *data, "{path} differs");
    assert_eq!(ds.getattr(attr.ino).unwrap().size, data.len() as u64);
}

#[test]
fn round_trips_of_many_sizes_survive_remount() {
    let t = TestDs::new(256 << 20);
    let sizes: Vec<usize> = vec![
        0,
        1,
        100,
        vmfs::INLINE_MAX,
        vmfs::INLINE_MAX + 1,
        8191,
        64 << 10,
        (64 << 10) + 1,
        (1 << 20) - 1,
        1 << 20,
        (1 << 20) + 1,
        5 * (1 << 20) + 12345,
    ];
    {
        let ds = t.open();
        for (i, &size) in sizes.iter().enumerate() {
            write_read(&ds, &format!("/f{i}"), &pattern(size, i as u64));
        }
        ds.close().unwrap();
    }
    let ds = t.open_ro();
    for (i, &size) in sizes.iter().enumerate() {
        let attr = ds.stat_path(&format!("/f{i}")).unwrap();
        assert_eq!(attr.size, size as u64);
        let mut back = vec![0u8; size];
        assert_eq!(ds.read(attr.ino, 0, &mut back).unwrap(), size);
        assert!(
            back == pattern(size, i as u64),
            "file of {size} bytes differs after remount"
        );
    }
    drop(ds);
    t.assert_clean();
}

#[test]
fn unaligned_overwrites_and_growth_read_back() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    let ino = ds.create_path("/x", &NewFile::default()).unwrap().ino;
    let mut model = Vec::new();
    let writes: &[(u64, usize)] = &[
        (0, 10),
        (3000, 2000),
        (100, 70_000),
        (1 << 20, 3),
        ((1 << 20) - 7, 20),
        (333, 1),
        // Into a fresh block, misaligned at both ends and covering whole sectors between:
        // the body goes straight to the LUN, the partial sectors are padded or patched.
        ((3 << 20) + 16, (1 << 20) - 16),
        ((3 << 20) + 1000, 5000),
    ];
    for (k, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(len, k as u64 + 50);
        ds.write(ino, off, &data).unwrap();
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
        let mut back = vec![0u8; model.len()];
        assert_eq!(ds.read(ino, 0, &mut back).unwrap(), model.len());
        assert!(back == model, "after write {k}");
        // Misaligned reads around the write: partial sectors at the ends, whole ones between.
        let from = off.saturating_sub(1) as usize;
        let to = (end + 1).min(model.len());
        let mut part = vec![0u8; to - from];
        assert_eq!(ds.read(ino, from as u64, &mut part).unwrap(), to - from);
        assert!(part == model[from..to], "misaligned read after write {k}");
    }
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn sparse_3_gib_file_reads_zero_holes_and_stays_thin() {
    let t = TestDs::new(512 << 20);
    let ds = t.open();
    let ino = ds.create_path("/sparse", &NewFile::default()).unwrap().ino;
    let size = 3u64 << 30;
    let marks = [0u64, (1 << 30) + 17, size - 4096];
    for (i, &off) in marks.iter().enumerate() {
        ds.write(ino, off, &pattern(4096, i as u64)).unwrap();
    }
    let attr = ds.getattr(ino).unwrap();
    assert_eq!(attr.size, size);
    assert!(attr.allocated <= 4 << 20, "allocated {}", attr.allocated);
    for (i, &off) in marks.iter().enumerate() {
        let mut back = vec![0u8; 4096];
        ds.read(ino, off, &mut back).unwrap();
        assert!(back == pattern(4096, i as u64));
    }
    let mut hole = vec![1u8; 1 << 20];
    ds.read(ino, 2 << 30, &mut hole).unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    assert_eq!(ds.seek_data(ino, 4096).unwrap(), Some(4096));
    assert_eq!(ds.seek_data(ino, 1 << 20).unwrap(), Some(1 << 30));
    assert_eq!(ds.seek_hole(ino, 0).unwrap(), Some(1 << 20));
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn files_beyond_2_and_16_tib_are_addressable() {
    let t = TestDs::new(256 << 20);
    let ds = t.open();
    let ino = ds
        .create_path("/huge.vdisk", &NewFile::default())
        .unwrap()
        .ino;
    let offsets = [3u64 << 40, (17u64 << 40) + 4096, (20u64 << 40) - 512];
    for (i, &off) in offsets.iter().enumerate() {
        ds.write(ino, off, &pattern(512, i as u64)).unwrap();
    }
    assert_eq!(ds.getattr(ino).unwrap().size, 20u64 << 40);
    ds.close().unwrap();
    let ds = t.open();
    for (i, &off) in offsets.iter().enumerate() {
        let mut back = vec![0u8; 512];
        ds.read(ino, off, &mut back).unwrap();
        assert!(back == pattern(512, i as u64), "data at {off}");
    }
    assert_eq!(ds.seek_data(ino, 0).unwrap(), Some(3u64 << 40));
    // Truncating frees every block and pointer block.
    let free_before = ds.statfs().unwrap().blocks_free;
    ds.truncate(ino, 0).unwrap();
    assert_eq!(ds.statfs().unwrap().blocks_free, free_before + 3);
    assert_eq!(ds.getattr(ino).unwrap().allocated, 0);
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn truncate_shrink_then_grow_reads_zeroes() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    for (i, size) in [3000usize, 40_000, 3 << 20].into_iter().enumerate() {
        let ino = ds
            .create_path(&format!("/t{i}"), &NewFile::default())
            .unwrap()
            .ino;
        ds.write(ino, 0, &vec![0xaa; size]).unwrap();
        ds.truncate(ino, 10).unwrap();
        ds.truncate(ino, size as u64).unwrap();
        let mut back = vec![0u8; size];
        ds.read(ino, 0, &mut back).unwrap();
        assert!(back[..10].iter().all(|&b| b == 0xaa));
        assert!(
            back[10..].iter().all(|&b| b == 0),
            "stale bytes after regrow of {size}"
        );
    }
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn namespace_operations() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    ds.mkdir_all("/vms/web01", 0o755, creds()).unwrap();
    ds.mkdir_all("/vms/web01", 0o755, creds()).unwrap();
    let f = ds
        .create_path("/vms/web01/a.txt", &NewFile::default())
        .unwrap();
    ds.write(f.ino, 0, b"hello").unwrap();
    assert!(matches!(
        ds.create_path("/vms/web01/a.txt", &NewFile::default()),
        Err(Error::Exists { .. })
    ));
    assert!(matches!(
        ds.stat_path("/vms/nope"),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        ds.create_path("/vms/web01/a.txt/x", &NewFile::default()),
        Err(Error::NotADirectory { .. })
    ));
    // rename, including over an existing file
    let g = ds
        .create_path("/vms/web01/b.txt", &NewFile::default())
        .unwrap();
    ds.write(g.ino, 0, b"bbb").unwrap();
    ds.rename_path("/vms/web01/a.txt", "/vms/web01/b.txt")
        .unwrap();
    assert!(matches!(
        ds.stat_path("/vms/web01/a.txt"),
        Err(Error::NotFound { .. })
    ));
    let b = ds.stat_path("/vms/web01/b.txt").unwrap();
    assert_eq!(b.ino, f.ino);
    assert!(
        matches!(ds.getattr(g.ino), Err(Error::NotFound { .. })),
        "replaced file freed"
    );
    // directories: rename across parents, rmdir rules, link counts
    ds.mkdir_path("/other", 0o755, creds()).unwrap();
    ds.rename_path("/vms/web01", "/other/web01").unwrap();
    assert_eq!(ds.stat_path("/vms").unwrap().nlink, 2);
    assert_eq!(ds.stat_path("/other").unwrap().nlink, 3);
    let dotdot = ds.readdir(ds.resolve("/other/web01").unwrap(), 1).unwrap();
    assert_eq!(dotdot[0].name, OsStr::new(".."));
    assert_eq!(dotdot[0].ino, ds.resolve("/other").unwrap());
    assert!(matches!(
        ds.rename_path("/other", "/other/web01/x"),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        ds.remove_path("/other", false),
        Err(Error::NotEmpty { .. })
    ));
    // symlinks and hard links
    let root = ROOT_INO;
    ds.symlink(root, OsStr::new("ln"), OsStr::new("/other/web01"), creds())
        .unwrap();
    assert_eq!(ds.resolve("/ln/b.txt").unwrap(), f.ino);
    ds.link(f.ino, root, OsStr::new("hard")).unwrap();
    assert_eq!(ds.getattr(f.ino).unwrap().nlink, 2);
    ds.remove_path("/other/web01/b.txt", false).unwrap();
    let mut buf = [0u8; 5];
    assert_eq!(ds.read(f.ino, 0, &mut buf).unwrap(), 5);
    assert_eq!(&buf, b"hello");
    ds.remove_path("/other", true).unwrap();
    let names: Vec<_> = ds.list("/").unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 3, "{names:?}"); // vms, ln, hard
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn bad_names_are_refused_and_change_nothing() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    let long = "n".repeat(256);
    for (name, errno) in [
        (long.as_str(), libc::ENAMETOOLONG),
        (".", libc::EINVAL),
        ("..", libc::EINVAL),
        ("", libc::EINVAL),
    ] {
        let e = ds
            .create(ROOT_INO, OsStr::new(name), &NewFile::default())
            .unwrap_err();
        assert_eq!(e.errno(), errno, "{name:?}: {e}");
    }
    let e = ds
        .create(ROOT_INO, OsStr::new("a/b"), &NewFile::default())
        .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    ds.create(ROOT_INO, OsStr::new(&"n".repeat(255)), &NewFile::default())
        .unwrap();
    assert_eq!(ds.list("/").unwrap().len(), 1);
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn many_files_in_one_directory_with_stable_readdir() {
    let t = TestDs::with(
        256 << 20,
        vmfs::FormatOptions {
            label: "many".into(),
            max_files: Some(4096),
            ..Default::default()
        },
    );
    let ds = t.open();
    let dir = ds.mkdir_path("/many", 0o755, creds()).unwrap().ino;
    for i in 0..3000 {
        ds.create(
            dir,
            OsStr::new(&format!("file-{i:05}")),
            &NewFile::default(),
        )
        .unwrap();
    }
    // Remove every third entry in the middle of a readdir: the rest come back exactly once.
    let first = ds.readdir(dir, 0).unwrap();
    let resume = first.last().unwrap().cookie;
    for i in (0..3000).step_by(3) {
        ds.unlink(dir, OsStr::new(&format!("file-{i:05}"))).unwrap();
    }
    let mut seen: Vec<String> = first
        .iter()
        .filter(|e| e.cookie > 2)
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect();
    let mut after = resume;
    loop {
        let batch = ds.readdir(dir, after).unwrap();
        let Some(last) = batch.last() else { break };
        after = last.cookie;
        seen.extend(batch.iter().map(|e| e.name.to_string_lossy().into_owned()));
    }
    for i in 0..3000 {
        let name = format!("file-{i:05}");
        let count = seen.iter().filter(|s| **s == name).count();
        if i % 3 != 0 {
            assert_eq!(count, 1, "{name}");
        }
    }
    ds.close().unwrap();
    let ds = t.open_ro();
    assert_eq!(ds.list("/many").unwrap().len(), 2000);
    drop(ds);
    t.assert_clean();
}

#[test]
fn open_unlinked_file_stays_readable_until_closed() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    let f = ds.create_path("/v", &NewFile::default()).unwrap();
    ds.write(f.ino, 0, &pattern(3 << 20, 1)).unwrap();
    let free0 = ds.statfs().unwrap().blocks_free;
    let h = ds.open_file(f.ino, Access::ReadOnly).unwrap();
    ds.remove_path("/v", false).unwrap();
    let mut back = vec![0u8; 3 << 20];
    h.read_exact_at(&mut back, 0).unwrap();
    assert!(back == pattern(3 << 20, 1));
    assert_eq!(ds.statfs().unwrap().blocks_free, free0);
    drop(h);
    assert_eq!(ds.statfs().unwrap().blocks_free, free0 + 3);
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn thick_files_are_allocated_and_zeroed() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    let attr = ds
        .create_vdisk("/thick.vdisk", 8 << 20, true, creds())
        .unwrap();
    assert!(attr.thick && attr.vdisk);
    assert_eq!(attr.allocated, 8 << 20);
    let mut buf = vec![1u8; 8 << 20];
    ds.read(attr.ino, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let thin = ds
        .create_vdisk("/thin.vdisk", 8 << 20, false, creds())
        .unwrap();
    assert_eq!(thin.allocated, 0);
    assert_eq!(ds.seek_data(thin.ino, 0).unwrap(), None);
    ds.close().unwrap();
    t.assert_clean();
}

#[test]
fn kinds_are_reported() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    ds.mkdir_path("/d", 0o700, creds()).unwrap();
    let a = ds.stat_path("/d").unwrap();
    assert_eq!(a.kind, Kind::Dir);
    assert_eq!(a.mode(), libc::S_IFDIR | 0o700);
    assert_eq!((a.uid, a.gid), (1000, 1000));
    ds.close().unwrap();
}

#[test]
fn symbolic_links_are_followed_in_paths_and_loops_end_in_an_error() {
    let t = TestDs::new(128 << 20);
    let ds = t.open();
    ds.mkdir_all("/data/real", 0o755, creds()).unwrap();
    let d = ds.resolve("/data").unwrap();
    // Relative links, resolved from their own directory; a chain of two.
    ds.symlink(d, OsStr::new("alias"), OsStr::new("real"), creds())
        .unwrap();
    ds.symlink(d, OsStr::new("alias2"), OsStr::new("./alias"), creds())
        .unwrap();
    let f = ds
        .create_path("/data/alias2/f", &NewFile::default())
        .unwrap();
    assert_eq!(ds.resolve("/data/real/f").unwrap(), f.ino);
    assert_eq!(ds.resolve("/data/alias/f").unwrap(), f.ino);
    // A directory made through a link lands in its target.
    ds.mkdir_path("/data/alias/sub", 0o755, creds()).unwrap();
    assert_eq!(
        ds.stat_path("/data/real/sub").unwrap().kind,
        Kind::Dir,
        "mkdir through a link"
    );
    // The last component is not followed.
    assert_eq!(ds.stat_path("/data/alias").unwrap().kind, Kind::Symlink);

    // Links that point at each other, outside the root directory.
    ds.symlink(d, OsStr::new("x"), OsStr::new("y"), creds())
        .unwrap();
    ds.symlink(d, OsStr::new("y"), OsStr::new("x"), creds())
        .unwrap();
    let err = ds.resolve("/data/x/f").unwrap_err();
    assert!(
        err.to_string()
            .contains("too many levels of symbolic links"),
        "{err}"
    );
    let err = ds.mkdir_path("/data/y/new", 0o755, creds()).unwrap_err();
    assert!(err.to_string().contains("too many levels"), "{err}");
    ds.close().unwrap();
    t.assert_clean();
}
