//! Everyday tools on a mounted datastore: cp, dd, rsync, tar and sha256sum move a tree of
//! files of many sizes in and out byte for byte, and the POSIX details they rely on (rename
//! over a file, truncate, holes, fallocate, chmod/chown/utimens, links, statfs, files past
//! 4 GiB and 2 TiB) behave as on a local file system and are stored in the datastore.
#![allow(clippy::unwrap_used)]

mod fuse_support;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use fuse_support::{Fixture, Mounted, fuse_available, ok, sh, vapp};
use rand::{RngCore, SeedableRng, rngs::StdRng};

const MIB: u64 = 1 << 20;

/// Sizes around every boundary vmfs has: inline data (3968), sectors, the 64 KiB sub-block,
/// the 1 MiB block, and files spanning several blocks.
const SIZES: &[u64] = &[
    0,
    1,
    511,
    512,
    3967,
    3968,
    3969,
    4096,
    65535,
    65536,
    65537,
    MIB - 1,
    MIB,
    MIB + 1,
    3 * MIB + 17,
    9 * MIB,
];

fn random_bytes(rng: &mut StdRng, len: u64) -> Vec<u8> {
    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    data
}

/// A tree with every size, nested and empty directories, a sparse file, symlinks, a hard
/// link, and different permissions and times.
fn make_tree(root: &Path) {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    for (i, &size) in SIZES.iter().enumerate() {
        let dir = ["", "a", "a/b", "a/b/c"][i % 4];
        std::fs::write(
            root.join(dir).join(format!("f{i:02}-{size}")),
            random_bytes(&mut rng, size),
        )
        .unwrap();
    }
    // 2 MiB of data, a 6 MiB hole, 1 MiB of data and a 1 MiB hole at the end.
    let sparse = File::create(root.join("sparse.img")).unwrap();
    sparse
        .write_all_at(&random_bytes(&mut rng, 2 * MIB), 0)
        .unwrap();
    sparse
        .write_all_at(&random_bytes(&mut rng, MIB), 8 * MIB)
        .unwrap();
    sparse.set_len(10 * MIB).unwrap();
    std::os::unix::fs::symlink("a/b/c", root.join("link-to-c")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    std::fs::hard_link(root.join("a/f01-1"), root.join("hardlink-f01")).unwrap();
    std::fs::set_permissions(
        root.join("f04-3967"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("a/f05-3968"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o750)).unwrap();
    // Distinct times in the past, to the nanosecond: rsync skips setting a time it sees as
    // equal to the second, which a tree copied right after it was made would be.
    sh(&format!(
        "cd '{}' && i=0 && find . -mindepth 1 -depth | LC_ALL=C sort -r | \
         while read -r p; do i=$((i+1)); touch -h -d @$((1000000000 + i * 7919)).$((100000000 + i)) \"$p\"; done",
        root.display()
    ));
}

/// One line per entry: path, type, mode, size (files), link target, link count, and the
/// modification time to the nanosecond (`precise`) or the second (tar keeps seconds).
fn listing(root: &Path, precise: bool) -> String {
    let time = if precise { "%T@" } else { "%Ts" };
    sh(&format!(
        "cd '{}' && find . -mindepth 1 -printf '%P %y %m %n %l {time} ' \
         -a \\( -type f -printf '%s\\n' -o -printf '-\\n' \\) | LC_ALL=C sort",
        root.display()
    ))
}

fn checksums(root: &Path) -> String {
    sh(&format!(
        "cd '{}' && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum",
        root.display()
    ))
}

fn assert_same_tree(expected: &Path, actual: &Path, precise: bool, what: &str) {
    assert_eq!(
        checksums(expected),
        checksums(actual),
        "{what}: contents differ"
    );
    assert_eq!(
        listing(expected, precise),
        listing(actual, precise),
        "{what}: metadata differs"
    );
}

fn allocated(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().blocks() * 512
}

#[test]
fn cp_dd_rsync_tar_sha256sum_in_and_out_are_byte_identical() {
    if !fuse_available()
        || !lun::prereq::require(
            lun::prereq::have_command("rsync"),
            "rsync (apt-get install rsync)",
        )
    {
        return;
    }
    let fx = Fixture::new("1G");
    let src = fx.dir.path().join("src");
    make_tree(&src);
    let m = Mounted::new(&fx, "mnt", &[]);

    sh(&format!(
        "cp -a '{}' '{}'",
        src.display(),
        m.path("cp").display()
    ));
    sh(&format!(
        "rsync -aH '{}/' '{}/'",
        src.display(),
        m.path("rsync").display()
    ));
    std::fs::create_dir(m.path("tar")).unwrap();
    sh(&format!(
        "tar -C '{}' -cf - . | tar -C '{}' -xpf -",
        src.display(),
        m.path("tar").display()
    ));
    sh(&format!(
        "dd if='{}' of='{}' bs=1M conv=fsync status=none",
        src.join("a/b/f14-3145745").display(),
        m.path("dd.bin").display()
    ));
    assert_same_tree(&src, &m.path("cp"), true, "cp -a in");
    assert_same_tree(&src, &m.path("rsync"), true, "rsync -aH in");
    assert_same_tree(&src, &m.path("tar"), false, "tar in");
    assert_eq!(
        fuse_support::sha256_file(&src.join("a/b/f14-3145745")),
        fuse_support::sha256_file(&m.path("dd.bin"))
    );
    // cp found the hole (SEEK_HOLE on the source) and the datastore kept it thin.
    let sparse_in = m.path("cp/sparse.img");
    assert!(
        allocated(&sparse_in) <= 3 * MIB,
        "sparse file filled in: {} bytes allocated",
        allocated(&sparse_in)
    );

    // Out again.
    let out = fx.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    sh(&format!(
        "cp -a '{}' '{}'",
        m.path("cp").display(),
        out.join("cp").display()
    ));
    sh(&format!(
        "rsync -aH '{}/' '{}/'",
        m.path("rsync").display(),
        out.join("rsync").display()
    ));
    std::fs::create_dir(out.join("tar")).unwrap();
    sh(&format!(
        "tar -C '{}' -cf - . | tar -C '{}' -xpf -",
        m.path("tar").display(),
        out.join("tar").display()
    ));
    assert_same_tree(&src, &out.join("cp"), true, "cp -a out");
    assert_same_tree(&src, &out.join("rsync"), true, "rsync -aH out");
    assert_same_tree(&src, &out.join("tar"), false, "tar out");
    // SEEK_DATA/SEEK_HOLE through the mount let cp keep the hole on the way out too.
    assert!(allocated(&out.join("cp/sparse.img")) <= 3 * MIB);

    // Everything is in the datastore, not in the kernel's cache.
    m.unmount();
    fx.assert_clean();
    let m = Mounted::new(&fx, "mnt", &["--read-only"]);
    assert_same_tree(&src, &m.path("cp"), true, "cp -a after remount");
    assert_same_tree(&src, &m.path("tar"), false, "tar after remount");
}

#[test]
fn posix_details_behave_and_are_stored_in_the_datastore() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("1G");
    let m = Mounted::new(&fx, "mnt", &[]);

    // rename over an existing file replaces it atomically; a reader of the old file keeps it.
    std::fs::write(m.path("old"), b"old contents").unwrap();
    std::fs::write(m.path("new"), b"new contents").unwrap();
    let mut reader = File::open(m.path("old")).unwrap();
    std::fs::rename(m.path("new"), m.path("old")).unwrap();
    assert_eq!(std::fs::read(m.path("old")).unwrap(), b"new contents");
    assert!(!m.path("new").exists());
    let mut held = String::new();
    reader.read_to_string(&mut held).unwrap();
    assert_eq!(held, "old contents");
    drop(reader);
    // RENAME_NOREPLACE refuses an existing target.
    std::fs::write(m.path("third"), b"3").unwrap();
    let (from, to) = (cstr(&m.path("third")), cstr(&m.path("old")));
    // SAFETY: renameat2 with valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!((rc, errno()), (-1, libc::EEXIST));

    // A file unlinked while open keeps working, truncates included, and is freed at its
    // last close (fsck at the end finds no leak).
    let gone = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("gone"))
        .unwrap();
    gone.write_all_at(&vec![5u8; 3 * MIB as usize], 0).unwrap();
    std::fs::remove_file(m.path("gone")).unwrap();
    gone.set_len(MIB + 7).unwrap();
    let mut tail = [0u8; 8];
    gone.read_exact_at(&mut tail[..7], MIB).unwrap();
    assert_eq!(&tail[..7], &[5u8; 7]);
    assert_eq!(gone.metadata().unwrap().len(), MIB + 7);
    drop(gone);

    // truncate up reads zeroes, down drops the tail.
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("t"))
        .unwrap();
    f.write_all_at(b"0123456789", 0).unwrap();
    f.set_len(5000).unwrap();
    let mut all = Vec::new();
    (&f).read_to_end(&mut all).unwrap();
    assert_eq!(&all[..10], b"0123456789");
    assert!(all[10..].iter().all(|&b| b == 0) && all.len() == 5000);
    f.set_len(4).unwrap();
    assert_eq!(std::fs::read(m.path("t")).unwrap(), b"0123");
    // O_TRUNC on open.
    File::options()
        .write(true)
        .truncate(true)
        .open(m.path("t"))
        .unwrap();
    assert_eq!(std::fs::metadata(m.path("t")).unwrap().len(), 0);
    // O_APPEND.
    let mut app = File::options().append(true).open(m.path("t")).unwrap();
    app.write_all(b"ab").unwrap();
    app.write_all(b"cd").unwrap();
    assert_eq!(std::fs::read(m.path("t")).unwrap(), b"abcd");

    // fallocate: allocate and extend, keep size, punch a hole; SEEK_DATA/SEEK_HOLE see it.
    let fa = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("fa"))
        .unwrap();
    nix::fcntl::fallocate(&fa, nix::fcntl::FallocateFlags::empty(), 0, 4 * MIB as i64).unwrap();
    assert_eq!(fa.metadata().unwrap().len(), 4 * MIB);
    assert!(fa.metadata().unwrap().blocks() * 512 >= 4 * MIB);
    nix::fcntl::fallocate(
        &fa,
        nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        4 * MIB as i64,
        MIB as i64,
    )
    .unwrap();
    assert_eq!(fa.metadata().unwrap().len(), 4 * MIB);
    fa.write_all_at(&[7u8; 4096], MIB).unwrap();
    nix::fcntl::fallocate(
        &fa,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        MIB as i64,
        MIB as i64,
    )
    .unwrap();
    let mut back = vec![1u8; 4096];
    fa.read_exact_at(&mut back, MIB).unwrap();
    assert!(back.iter().all(|&b| b == 0), "punched range reads zeroes");
    assert_eq!(seek(&fa, 0, libc::SEEK_HOLE), Some(MIB));
    assert_eq!(seek(&fa, MIB, libc::SEEK_DATA), Some(2 * MIB));
    assert_eq!(seek(&fa, 5 * MIB, libc::SEEK_DATA), None);

    // chmod, chown, utimens; symlinks; hard links.
    std::fs::set_permissions(m.path("t"), std::fs::Permissions::from_mode(0o4751)).unwrap();
    // chown drops set-user-id, as everywhere; set it again.
    std::os::unix::fs::chown(m.path("t"), Some(1234), Some(5678)).unwrap();
    assert_eq!(
        std::fs::metadata(m.path("t")).unwrap().mode() & 0o7777,
        0o751
    );
    std::fs::set_permissions(m.path("t"), std::fs::Permissions::from_mode(0o4751)).unwrap();
    sh(&format!(
        "TZ=UTC touch -m -d '2010-01-02 03:04:05.123456789' '{}'",
        m.path("t").display()
    ));
    std::os::unix::fs::symlink("t", m.path("sym")).unwrap();
    assert_eq!(std::fs::read_link(m.path("sym")).unwrap(), Path::new("t"));
    assert_eq!(std::fs::read(m.path("sym")).unwrap(), b"abcd");
    std::fs::hard_link(m.path("t"), m.path("t2")).unwrap();
    assert_eq!(std::fs::metadata(m.path("t")).unwrap().nlink(), 2);
    // FIFOs are stored (see fuse_posix); no extended attributes.
    let fifo = cstr(&m.path("fifo"));
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert!(
        std::fs::symlink_metadata(m.path("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let out = std::process::Command::new("setfattr")
        .args(["-n", "user.x", "-v", "1"])
        .arg(m.path("t"))
        .output();
    if let Ok(out) = out {
        assert!(!out.status.success());
    }

    // statfs reports the datastore's real capacity and free space.
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["datastore", "info", fx.lun(), "--json"])).unwrap();
    let capacity = info["capacity_bytes"].as_u64().unwrap();
    let st = nix::sys::statvfs::statvfs(&m.mountpoint).unwrap();
    assert_eq!(st.blocks() * st.fragment_size(), capacity);
    assert!(st.blocks_free() < st.blocks() && st.blocks_free() > 0);
    assert_eq!(st.name_max(), 255);

    // Past 4 GiB and past 2 TiB (sparse): data lands where written, the rest is a hole.
    let big = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("big"))
        .unwrap();
    let tib = 1u64 << 40;
    for (at, byte) in [(5u64 << 30, 0x55u8), (2 * tib + (512 << 30) + 12345, 0xaa)] {
        big.write_all_at(&[byte; 3000], at).unwrap();
        let mut got = [0u8; 3001];
        big.read_exact_at(&mut got, at - 1).unwrap();
        assert_eq!(got[0], 0);
        assert!(got[1..].iter().all(|&b| b == byte));
    }
    assert_eq!(
        big.metadata().unwrap().len(),
        2 * tib + (512 << 30) + 12345 + 3000
    );
    assert_eq!(seek(&big, 0, libc::SEEK_DATA), Some(5 << 30));
    assert_eq!(seek(&big, 5 << 30, libc::SEEK_HOLE), Some((5 << 30) + MIB));
    assert!(big.metadata().unwrap().blocks() * 512 < 8 * MIB);
    let mut tail = File::open(m.path("big")).unwrap();
    tail.seek(SeekFrom::End(-3000)).unwrap();
    let mut last = Vec::new();
    tail.read_to_end(&mut last).unwrap();
    assert_eq!(last, vec![0xaa; 3000]);
    drop((f, fa, big, tail, app));

    // fsync makes all of it durable: a read-only look at the LUN beside the mount sees it.
    File::open(m.path("t")).unwrap().sync_all().unwrap();
    let stat: serde_json::Value =
        serde_json::from_str(&ok(&["-d", fx.lun(), "stat", "/t", "--json"])).unwrap();
    assert_eq!(stat["mode"], "4751", "{stat}");
    assert_eq!(
        (stat["uid"].as_u64(), stat["gid"].as_u64()),
        (Some(1234), Some(5678))
    );
    assert_eq!(stat["mtime_ns"].as_i64(), Some(1_262_401_445_123_456_789));
    assert_eq!(stat["nlink"].as_u64(), Some(2));
    m.unmount();
    fx.assert_clean();
    let listing = ok(&["-d", fx.lun(), "ls", "-l", "/"]);
    assert!(listing.contains("sym -> t"), "{listing}");
    let out = vapp(&["-d", fx.lun(), "cat", "/t2"]);
    assert_eq!(out.stdout, b"abcd");
}

fn seek(f: &File, from: u64, whence: i32) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor.
    let at = unsafe { libc::lseek(f.as_raw_fd(), from as i64, whence) };
    if at < 0 {
        assert_eq!(errno(), libc::ENXIO);
        None
    } else {
        Some(at as u64)
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.to_str().unwrap()).unwrap()
}

/// A datastore file on a FUSE file system (this project's own mount) may be opened by other
/// machines too, and this machine's OFD locks mean nothing to them: `datastore format`
/// picks Disk Paxos there, refuses `cas`, and `datastore info` says what the locks rest on.
#[test]
fn a_datastore_file_on_a_fuse_file_system_gets_disk_paxos() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("1G");
    let m = Mounted::new(&fx, "mnt", &[]);
    let inner = m.path("inner.vmfs");
    let inner = inner.to_str().unwrap();
    let out = ok(&[
        "datastore",
        "format",
        inner,
        "--name",
        "inner",
        "--size",
        "256M",
    ]);
    assert!(out.contains("locking disk-paxos"), "{out}");
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["datastore", "info", inner, "--json"])).unwrap();
    assert_eq!(info["lock_protocol"], "disk-paxos");
    assert_eq!(info["lock_safety"]["safe_across_machines"], true);
    assert_eq!(info["lock_safety"]["reach"], "a file on a FUSE file system");

    let refused = m.path("cas.vmfs");
    let out = vapp(&[
        "datastore",
        "format",
        refused.to_str().unwrap(),
        "--name",
        "cas",
        "--size",
        "256M",
        "--lock-protocol",
        "cas",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--lock-protocol local"), "{stderr}");
    assert!(!refused.exists(), "a refused format leaves no file behind");
    drop(m);
    fx.assert_clean();
}
