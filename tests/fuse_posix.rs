//! The mount behaves as ext4 does where a POSIX conformance suite looks: FIFOs, device nodes
//! and sockets; ENAMETOOLONG for a name over 255 bytes in every call that takes a path;
//! symbolic links to targets of up to 4,095 bytes; and, for users other than root on an
//! `--allow-other` mount, permission bits and supplementary groups, the sticky bit,
//! set-group-id directories, set-user-id cleared on write, truncate and chown, and ctime
//! changes.
#![allow(clippy::unwrap_used)]

mod fuse_support;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use fuse_support::{Fixture, Mounted, fuse_available, ok, vapp};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// The errno a libc call left, or 0 when it returned 0 or more.
fn errno_of(ret: libc::c_int) -> i32 {
    if ret >= 0 {
        if ret > 2 {
            // A descriptor: close it.
            // SAFETY: `ret` is a descriptor this test just opened.
            unsafe { libc::close(ret) };
        }
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

/// Lets other users reach mount points inside the fixture's directory.
fn open_to_others(fx: &Fixture) {
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn fixture() -> Option<Fixture> {
    if !fuse_available() {
        return None;
    }
    let fx = Fixture::new("256M");
    open_to_others(&fx);
    Some(fx)
}

#[test]
fn fifos_device_nodes_and_sockets_are_created_and_behave_as_files() {
    let Some(fx) = fixture() else { return };
    let m = Mounted::new(&fx, "mp", &[]);
    let fifo = m.path("fifo");
    // SAFETY: valid C strings; mkfifo and mknod touch no memory of ours.
    unsafe {
        assert_eq!(errno_of(libc::mkfifo(cpath(&fifo).as_ptr(), 0o644)), 0);
        let chr = cpath(&m.path("null"));
        let dev = libc::makedev(1, 3);
        assert_eq!(
            errno_of(libc::mknod(chr.as_ptr(), libc::S_IFCHR | 0o666, dev)),
            0
        );
        let blk = cpath(&m.path("loop7"));
        let dev = libc::makedev(7, 7);
        assert_eq!(
            errno_of(libc::mknod(blk.as_ptr(), libc::S_IFBLK | 0o660, dev)),
            0
        );
    }
    let listener = std::os::unix::net::UnixListener::bind(m.path("sock")).unwrap();
    drop(listener);

    let meta = |n: &str| std::fs::symlink_metadata(m.path(n)).unwrap();
    assert!(meta("fifo").file_type().is_fifo());
    assert!(meta("null").file_type().is_char_device());
    assert_eq!(meta("null").rdev(), libc::makedev(1, 3));
    assert!(meta("loop7").file_type().is_block_device());
    assert_eq!(meta("loop7").rdev(), libc::makedev(7, 7));
    assert!(meta("sock").file_type().is_socket());

    // The FIFO carries data between two processes' ends.
    let writer_path = fifo.clone();
    let writer = std::thread::spawn(move || {
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(writer_path)
            .unwrap();
        w.write_all(b"through the fifo").unwrap();
    });
    let mut got = String::new();
    std::fs::File::open(&fifo)
        .unwrap()
        .read_to_string(&mut got)
        .unwrap();
    writer.join().unwrap();
    assert_eq!(got, "through the fifo");

    // rename, link, chmod, chown, utimens and unlink as on any file.
    std::fs::create_dir(m.path("dev")).unwrap();
    std::fs::rename(m.path("loop7"), m.path("dev/loop7")).unwrap();
    std::fs::hard_link(m.path("dev/loop7"), m.path("dev/loop7-again")).unwrap();
    std::fs::set_permissions(m.path("dev/loop7"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::lchown(m.path("dev/loop7"), Some(6), Some(7)).unwrap();
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(m.path("sock"))
        .map(drop)
        .unwrap_err();
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        },
    ];
    let sock = cpath(&m.path("sock"));
    // SAFETY: valid C string and timespec array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, sock.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(errno_of(r), 0);
    assert_eq!(meta("sock").modified().unwrap(), when);
    let d = meta("dev/loop7-again");
    assert_eq!(
        (d.nlink(), d.mode() & 0o7777, d.uid(), d.gid()),
        (2, 0o600, 6, 7)
    );
    std::fs::remove_file(m.path("fifo")).unwrap();
    m.unmount();

    let listing = ok(&["-d", fx.lun(), "ls", "-l", "/"]);
    let line = |name: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} not listed: {listing}"))
            .to_string()
    };
    assert!(line("null").starts_with('c'), "{listing}");
    assert!(line("null").contains(" 1, 3 "), "{listing}");
    assert!(line("sock").starts_with('s'), "{listing}");
    assert!(!listing.contains(" fifo"), "{listing}");
    let stat: serde_json::Value =
        serde_json::from_str(&ok(&["-d", fx.lun(), "stat", "/dev/loop7", "--json"])).unwrap();
    assert_eq!(stat["type"], "block_device");
    assert_eq!(stat["device"]["major"], 7);
    assert_eq!(stat["device"]["minor"], 7);
    assert_eq!(stat["nlink"], 2);
    let fsck = ok(&["datastore", "fsck", fx.lun()]);
    assert!(fsck.contains("3 special files"), "{fsck}");
    fx.assert_clean();
}

#[test]
fn a_name_over_255_bytes_is_enametoolong_in_every_call_that_takes_a_path() {
    let Some(fx) = fixture() else { return };
    let m = Mounted::new(&fx, "mp", &[]);
    std::fs::write(m.path("file"), b"x").unwrap();
    std::fs::create_dir(m.path("dir")).unwrap();
    let long_name = "n".repeat(256);
    let long = cpath(&m.path(&long_name));
    let long_in_dir = cpath(&m.path(&format!("dir/{long_name}")));
    let file = cpath(&m.path("file"));
    let other = cpath(&m.path("other"));
    let times = [libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_NOW,
    }; 2];
    // SAFETY: every pointer is a valid C string or the timespec array above.
    let calls: Vec<(&str, libc::c_int)> = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        vec![
            ("lstat", libc::lstat(long.as_ptr(), &mut st)),
            (
                "stat in a subdirectory",
                libc::stat(long_in_dir.as_ptr(), &mut st),
            ),
            ("open", libc::open(long.as_ptr(), libc::O_RDONLY)),
            (
                "open O_CREAT",
                libc::open(long.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644),
            ),
            ("creat", libc::creat(long_in_dir.as_ptr(), 0o644)),
            ("mkdir", libc::mkdir(long.as_ptr(), 0o755)),
            (
                "mknod",
                libc::mknod(long.as_ptr(), libc::S_IFIFO | 0o644, 0),
            ),
            ("link", libc::link(file.as_ptr(), long.as_ptr())),
            ("symlink", libc::symlink(file.as_ptr(), long.as_ptr())),
            ("rename from", libc::rename(long.as_ptr(), other.as_ptr())),
            ("rename to", libc::rename(file.as_ptr(), long.as_ptr())),
            ("unlink", libc::unlink(long.as_ptr())),
            ("rmdir", libc::rmdir(long.as_ptr())),
            ("chmod", libc::chmod(long.as_ptr(), 0o600)),
            ("chown", libc::chown(long.as_ptr(), 1, 1)),
            ("truncate", libc::truncate(long.as_ptr(), 0)),
            (
                "utimensat",
                libc::utimensat(libc::AT_FDCWD, long.as_ptr(), times.as_ptr(), 0),
            ),
        ]
    };
    let wrong: Vec<String> = calls
        .into_iter()
        .map(|(call, r)| (call, if r < 0 { errno_of(r) } else { 0 }))
        .filter(|&(_, e)| e != libc::ENAMETOOLONG)
        .map(|(call, e)| format!("{call}: {}", std::io::Error::from_raw_os_error(e)))
        .collect();
    assert!(wrong.is_empty(), "expected ENAMETOOLONG from: {wrong:?}");
    // 255 bytes is a legal name, and nothing above created anything.
    let longest = "m".repeat(255);
    std::fs::write(m.path(&longest), b"ok").unwrap();
    assert_eq!(std::fs::read(m.path(&longest)).unwrap(), b"ok");
    let mut names: Vec<_> = std::fs::read_dir(&m.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["dir", "file", longest.as_str()]);
    m.unmount();

    let out = vapp(&["-d", fx.lun(), "stat", &format!("/dir/{long_name}")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("name of 256 bytes is longer than 255 bytes") && stderr.len() < 120,
        "{stderr}"
    );
    fx.assert_clean();
}

#[test]
fn symbolic_links_to_targets_of_up_to_4095_bytes_are_stored() {
    let Some(fx) = fixture() else { return };
    let m = Mounted::new(&fx, "mp", &[]);
    let target = |len: usize| "d/".repeat(len / 2) + &"x".repeat(len % 2);
    let lens = [3968, 3969, 4095];
    for len in lens {
        std::os::unix::fs::symlink(target(len), m.path(&format!("l{len}"))).unwrap();
    }
    let e = std::os::unix::fs::symlink(target(4096), m.path("l4096")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    m.unmount();

    let m = Mounted::new(&fx, "mp", &[]);
    for len in lens {
        let link = m.path(&format!("l{len}"));
        let read = std::fs::read_link(&link).unwrap();
        assert_eq!(read.as_os_str().as_bytes(), target(len).as_bytes(), "{len}");
        assert_eq!(std::fs::symlink_metadata(&link).unwrap().len(), len as u64);
    }
    std::fs::remove_file(m.path("l3969")).unwrap();
    m.unmount();
    fx.assert_clean();
}

/// Runs `script` with `sh -e` as `uid`:`gid` with the supplementary `groups`.
fn as_user(uid: u32, gid: u32, groups: &[u32], script: &str) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.args(["sh", "-ec", script])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn succeeds(uid: u32, gid: u32, groups: &[u32], script: &str) {
    let out = as_user(uid, gid, groups, script);
    assert!(
        out.status.success(),
        "as {uid}:{gid} `{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn refused(uid: u32, gid: u32, groups: &[u32], script: &str, message: &str) {
    let out = as_user(uid, gid, groups, script);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(message),
        "as {uid}:{gid} `{script}` should fail with {message:?}: {stderr}"
    );
}

/// One change a test makes, named for its failure message.
type Change<'a> = Box<dyn Fn() + 'a>;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn ctime(p: &Path) -> (i64, i64) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.ctime(), m.ctime_nsec())
}

#[test]
fn other_users_get_the_kernels_permission_rules_and_ctime_moves_as_posix_says() {
    let Some((fx, m)) = mounted_for_others() else {
        return;
    };
    let at = |p: &str| m.path(p);
    let q = |p: &str| m.path(p).to_str().unwrap().to_string();

    // Owner, group (also as a supplementary group) and other bits.
    std::fs::write(at("secret"), b"data").unwrap();
    std::os::unix::fs::chown(at("secret"), Some(1000), Some(2000)).unwrap();
    std::fs::set_permissions(at("secret"), std::fs::Permissions::from_mode(0o640)).unwrap();
    succeeds(1000, 1000, &[], &format!("cat {} >/dev/null", q("secret")));
    succeeds(
        1001,
        1001,
        &[2000],
        &format!("cat {} >/dev/null", q("secret")),
    );
    refused(
        1001,
        1001,
        &[2000],
        &format!("echo x >> {}", q("secret")),
        "Permission denied",
    );
    refused(
        1002,
        1002,
        &[],
        &format!("cat {}", q("secret")),
        "Permission denied",
    );
    std::fs::create_dir(at("private")).unwrap();
    std::os::unix::fs::chown(at("private"), Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(at("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    refused(
        1002,
        1002,
        &[],
        &format!("ls {}", q("private")),
        "Permission denied",
    );
    refused(
        1002,
        1002,
        &[],
        &format!("touch {}/f", q("private")),
        "Permission denied",
    );

    // The sticky bit: only a file's owner (or the directory's) removes or renames it.
    std::fs::create_dir(at("tmp")).unwrap();
    std::fs::set_permissions(at("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    succeeds(1000, 1000, &[], &format!("echo mine > {}", q("tmp/a")));
    succeeds(1001, 1001, &[], &format!("echo theirs > {}", q("tmp/b")));
    refused(
        1001,
        1001,
        &[],
        &format!("rm -f {}", q("tmp/a")),
        "Operation not permitted",
    );
    refused(
        1001,
        1001,
        &[],
        &format!("mv {} {}", q("tmp/a"), q("tmp/c")),
        "Operation not permitted",
    );
    refused(
        1001,
        1001,
        &[],
        &format!("mv -f {} {}", q("tmp/b"), q("tmp/a")),
        "Operation not permitted",
    );
    assert_eq!(std::fs::read(at("tmp/a")).unwrap(), b"mine\n");
    succeeds(
        1000,
        1000,
        &[],
        &format!("mv {} {} && rm {}", q("tmp/a"), q("tmp/c"), q("tmp/c")),
    );

    // A set-group-id directory passes its group on, and the bit to subdirectories.
    std::fs::create_dir(at("shared")).unwrap();
    std::os::unix::fs::chown(at("shared"), Some(0), Some(3000)).unwrap();
    std::fs::set_permissions(at("shared"), std::fs::Permissions::from_mode(0o2777)).unwrap();
    succeeds(
        1001,
        1001,
        &[],
        &format!("touch {} && mkdir {}", q("shared/f"), q("shared/d")),
    );
    let f = std::fs::metadata(at("shared/f")).unwrap();
    let d = std::fs::metadata(at("shared/d")).unwrap();
    assert_eq!((f.uid(), f.gid()), (1001, 3000));
    assert_eq!(d.gid(), 3000);
    assert_ne!(
        d.mode() & libc::S_ISGID,
        0,
        "subdirectory lost set-group-id"
    );

    // ctime moves with every change of the inode; a directory's mtime and ctime with every
    // change of its entries.
    let file = at("tmp/times");
    std::fs::write(&file, b"x").unwrap();
    let changes: Vec<(&str, Change)> = vec![
        (
            "chmod",
            Box::new(|| {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap()
            }),
        ),
        (
            "chown",
            Box::new(|| std::os::unix::fs::chown(&file, Some(5), Some(5)).unwrap()),
        ),
        (
            "write",
            Box::new(|| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&file)
                    .unwrap()
                    .write_all(b"y")
                    .unwrap()
            }),
        ),
        (
            "truncate",
            Box::new(|| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&file)
                    .unwrap()
                    .set_len(1)
                    .unwrap()
            }),
        ),
        (
            "utimens",
            Box::new(|| {
                std::fs::File::options()
                    .write(true)
                    .open(&file)
                    .unwrap()
                    .set_modified(std::time::UNIX_EPOCH)
                    .unwrap()
            }),
        ),
        (
            "link",
            Box::new(|| std::fs::hard_link(&file, at("tmp/times2")).unwrap()),
        ),
        (
            "unlink of another name",
            Box::new(|| std::fs::remove_file(at("tmp/times2")).unwrap()),
        ),
    ];
    for (what, change) in changes {
        let before = ctime(&file);
        std::thread::sleep(Duration::from_millis(20));
        change();
        assert!(ctime(&file) > before, "{what} left ctime alone");
    }
    let dir = at("tmp");
    let dir_times = || {
        let m = std::fs::metadata(&dir).unwrap();
        ((m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec()))
    };
    let dir_changes: Vec<(&str, Change)> = vec![
        (
            "create",
            Box::new(|| std::fs::write(at("tmp/new"), b"").unwrap()),
        ),
        (
            "rename",
            Box::new(|| std::fs::rename(at("tmp/new"), at("tmp/renamed")).unwrap()),
        ),
        (
            "unlink",
            Box::new(|| std::fs::remove_file(at("tmp/renamed")).unwrap()),
        ),
        (
            "mkfifo",
            Box::new(|| {
                // SAFETY: a valid C string.
                assert_eq!(
                    errno_of(unsafe { libc::mkfifo(cpath(&at("tmp/p")).as_ptr(), 0o600) }),
                    0
                )
            }),
        ),
    ];
    for (what, change) in dir_changes {
        let (mtime, ctime) = dir_times();
        std::thread::sleep(Duration::from_millis(20));
        change();
        let (m2, c2) = dir_times();
        assert!(
            m2 > mtime && c2 > ctime,
            "{what} left the directory's times alone"
        );
    }
    m.unmount();
    let listing = ok(&["-d", fx.lun(), "ls", "-l", "/"]);
    let line = |name: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} not listed: {listing}"))
            .to_string()
    };
    assert!(line("tmp").starts_with("drwxrwxrwt"), "{listing}");
    assert!(line("shared").starts_with("drwxrwsrwx"), "{listing}");
    fx.assert_clean();
}

#[test]
fn set_user_id_goes_on_a_write_or_truncate_by_anyone_but_root_and_on_chown() {
    let Some((fx, m)) = mounted_for_others() else {
        return;
    };
    let q = |p: &str| m.path(p).to_str().unwrap().to_string();
    std::fs::create_dir(m.path("tmp")).unwrap();
    std::fs::set_permissions(m.path("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // Set-user-id (and set-group-id with group execute) go on a write, a truncate and a
    // chown by anyone but root; a write by root keeps them, as on ext4.
    let prog = m.path("tmp/prog");
    succeeds(1000, 1000, &[], &format!("echo v1 > {}", q("tmp/prog")));
    let setid = |bits: u32| {
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(bits)).unwrap();
        assert_eq!(mode(&prog), bits);
    };
    setid(0o6755);
    succeeds(1000, 1000, &[], &format!("echo v2 >> {}", q("tmp/prog")));
    assert_eq!(mode(&prog), 0o755, "write by the owner");
    setid(0o6755);
    succeeds(1000, 1000, &[], &format!(": > {}", q("tmp/prog")));
    assert_eq!(mode(&prog), 0o755, "O_TRUNC by the owner");
    setid(0o6755);
    succeeds(
        1000,
        1000,
        &[],
        &format!("truncate -s 100 {}", q("tmp/prog")),
    );
    assert_eq!(mode(&prog), 0o755, "truncate by the owner");
    setid(0o2745);
    succeeds(1000, 1000, &[], &format!("echo v3 >> {}", q("tmp/prog")));
    assert_eq!(
        mode(&prog),
        0o2745,
        "set-group-id without group execute stays"
    );
    setid(0o6755);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&prog)
        .unwrap()
        .write_all(b"root\n")
        .unwrap();
    assert_eq!(mode(&prog), 0o6755, "a write by root");
    std::os::unix::fs::chown(&prog, Some(1001), None).unwrap();
    assert_eq!(mode(&prog), 0o755, "chown");

    m.unmount();
    fx.assert_clean();
}

/// A datastore mounted with `--allow-other`, for tests that run commands as other users.
fn mounted_for_others() -> Option<(Fixture, Mounted)> {
    let fx = fixture()?;
    if !lun::prereq::require(lun::prereq::have_command("setpriv"), "setpriv (util-linux)") {
        return None;
    }
    let m = Mounted::new(&fx, "mp", &["--allow-other"]);
    Some((fx, m))
}
