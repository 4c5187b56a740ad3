//! The mount as a process: crash and recovery, signals, busy and hung mounts, read-only
//! mounts, and bad input that must leave nothing mounted.
#![allow(clippy::unwrap_used)]

mod fuse_support;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fuse_support::{
    Fixture, Mounted, alive, fuse_available, is_mounted, kill, ok, vapp, wait_until,
};

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

/// Writes a file through the mount and fsyncs it.
fn durable_write(path: &std::path::Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn kill_9_leaves_a_datastore_the_next_mount_recovers() {
    if !fuse_available()
        || !lun::prereq::require(
            lun::prereq::have_command("fusermount3"),
            "fusermount3 (fuse3)",
        )
    {
        return;
    }
    let fx = Fixture::new("1G");
    let m = Mounted::new(&fx, "mnt", &[]);
    std::fs::create_dir_all(m.path("vms/web01")).unwrap();
    let durable: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            (
                format!("vms/web01/file{i}"),
                pattern(i, 1000 + i as usize * 300_000),
            )
        })
        .collect();
    for (name, data) in &durable {
        durable_write(&m.path(name), data);
    }
    std::fs::rename(m.path("vms/web01/file0"), m.path("vms/renamed")).unwrap();
    File::open(m.path("vms")).unwrap().sync_all().unwrap();

    // Metadata and data in flight when the process dies.
    let path = m.path("vms/in-flight");
    let writer = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut n = 0u64;
        while Instant::now() < deadline {
            let Ok(mut f) = File::create(path.with_extension(n.to_string())) else {
                break;
            };
            if f.write_all(&[n as u8; 200_000]).is_err() {
                break;
            }
            n += 1;
        }
        n
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = m.daemon_pid();
    kill(pid, libc::SIGKILL);
    wait_until(Duration::from_secs(5), "the killed daemon to go", || {
        !alive(pid)
    });
    let written = writer.join().unwrap();
    assert!(written > 0, "nothing was in flight");
    // The dead mount answers ENOTCONN (for what the kernel has not cached), or
    // ECONNABORTED for a request that met the kernel still aborting the connection, and
    // fuse3's own tool can remove it.
    let dead = std::fs::metadata(m.path("never-looked-up"))
        .unwrap_err()
        .raw_os_error();
    assert!(
        matches!(dead, Some(libc::ENOTCONN | libc::ECONNABORTED)),
        "{dead:?}"
    );
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(&m.mountpoint)
        .status()
        .unwrap();
    assert!(status.success() && !m.is_mounted());
    drop(m);

    // The next mount recovers the crashed run (its journal replayed, its slot freed); what
    // was fsynced is all there.
    let m = Mounted::new(&fx, "mnt", &[]);
    wait_until(
        Duration::from_secs(10),
        "the crashed run's slot to be recovered",
        || fx.live_hosts() == 1,
    );
    assert_eq!(std::fs::read(m.path("vms/renamed")).unwrap(), durable[0].1);
    for (name, data) in &durable[1..] {
        assert_eq!(&std::fs::read(m.path(name)).unwrap(), data, "{name}");
    }
    m.unmount();
    fx.assert_clean();
    assert_eq!(fx.live_hosts(), 0);
}

#[test]
fn sigterm_and_sigint_unmount_cleanly_and_close_the_datastore() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("1G");
    let m = Mounted::new(&fx, "mnt", &[]);
    std::fs::write(m.path("a"), b"written before SIGTERM, never fsynced").unwrap();
    assert_eq!(fx.live_hosts(), 1);
    let pid = m.daemon_pid();
    kill(pid, libc::SIGTERM);
    wait_until(
        Duration::from_secs(10),
        "the daemon to exit on SIGTERM",
        || !alive(pid),
    );
    assert!(!m.is_mounted());
    assert_eq!(fx.live_hosts(), 0, "host slot not freed");
    fx.assert_clean();
    assert_eq!(
        vapp(&["-d", fx.lun(), "cat", "/a"]).stdout,
        b"written before SIGTERM, never fsynced"
    );

    // In the foreground, Ctrl-C.
    let mp = fx.mountpoint("fg");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args([
            "-d",
            fx.lun(),
            "mount",
            "--foreground",
            mp.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = MountpointGuard(mp.clone());
    wait_until(Duration::from_secs(10), "the foreground mount", || {
        is_mounted(&mp)
    });
    std::fs::write(mp.join("b"), b"foreground").unwrap();
    kill(i32::try_from(child.id()).unwrap(), libc::SIGINT);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success(),
        "foreground mount exited with {status}: {stderr}"
    );
    assert!(!is_mounted(&mp));
    drop(guard);
    assert_eq!(fx.live_hosts(), 0);
    fx.assert_clean();
    assert_eq!(vapp(&["-d", fx.lun(), "cat", "/b"]).stdout, b"foreground");
}

/// Unmounts whatever is left at a path (for mounts not made through `Mounted`).
struct MountpointGuard(std::path::PathBuf);

impl Drop for MountpointGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = vapp(&[
                "umount",
                "--force",
                "--timeout",
                "5",
                self.0.to_str().unwrap(),
            ]);
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn busy_mount_is_detached_and_served_until_the_last_file_closes() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("1G");
    let m = Mounted::new(&fx, "mnt", &[]);
    std::fs::write(m.path("held"), pattern(3, 300_000)).unwrap();
    let held = File::open(m.path("held")).unwrap();
    let pid = m.daemon_pid();
    let out = vapp(&["umount", m.mountpoint.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("busy") && stderr.contains("detached"),
        "{stderr}"
    );
    assert!(!m.is_mounted(), "still in the mount table");
    // The open file still works, served by the daemon.
    let mut buf = vec![0u8; 300_000];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(3, 300_000));
    assert!(alive(pid));
    drop(held);
    wait_until(
        Duration::from_secs(10),
        "the daemon to exit after the last close",
        || !alive(pid),
    );
    assert_eq!(fx.live_hosts(), 0);
    fx.assert_clean();
}

#[test]
fn hung_mount_is_unmountable_and_the_daemon_closes_when_resumed() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("1G");
    let m = Mounted::new(&fx, "mnt", &[]);
    std::fs::write(m.path("x"), b"x").unwrap();
    let pid = m.daemon_pid();
    kill(pid, libc::SIGSTOP);
    // A process that touches the mount now hangs in the kernel, waiting for the daemon.
    let mut stuck = Command::new("stat")
        .arg(m.path("not-cached-name"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        stuck.try_wait().unwrap().is_none(),
        "stat did not hang on a stopped daemon"
    );

    let started = Instant::now();
    let out = vapp(&["umount", m.mountpoint.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "vapp umount took {:?}",
        started.elapsed()
    );
    assert!(!m.is_mounted());
    // The stuck process was released with an error.
    let status = stuck.wait().unwrap();
    assert!(!status.success());

    // Resumed, the daemon finds its session gone and closes the datastore cleanly.
    kill(pid, libc::SIGCONT);
    wait_until(
        Duration::from_secs(10),
        "the resumed daemon to exit",
        || !alive(pid),
    );
    assert_eq!(fx.live_hosts(), 0);
    fx.assert_clean();
}

#[test]
fn read_only_mount_takes_no_host_slot_and_refuses_writes() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("1G");
    let rw = Mounted::new(&fx, "rw", &[]);
    durable_write(&rw.path("disk.img"), &pattern(9, 2_500_000));
    rw.unmount();

    let ro = Mounted::new(&fx, "ro", &["--read-only"]);
    assert_eq!(fx.live_hosts(), 0, "a read-only mount took a host slot");
    assert_eq!(
        std::fs::read(ro.path("disk.img")).unwrap(),
        pattern(9, 2_500_000)
    );
    let refused = [
        File::create(ro.path("new")).map(drop),
        File::options()
            .write(true)
            .open(ro.path("disk.img"))
            .map(drop),
        std::fs::create_dir(ro.path("d")),
        std::fs::remove_file(ro.path("disk.img")),
    ];
    for r in refused {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    }
    ro.unmount();
    fx.assert_clean();
}

#[test]
fn bad_input_is_refused_clearly_and_nothing_is_mounted() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("1G");
    // Other tests mount and unmount in parallel: look only below this test's directory.
    let ours = fx.dir.path().to_str().unwrap().to_string();
    let table = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&ours))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(table().is_empty());
    let fails = |args: &[&str], needle: &str| {
        let out = vapp(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "vapp {args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "vapp {args:?}: {stderr:?} lacks {needle:?}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line expected: {stderr}"
        );
    };
    let mp = fx.mountpoint("mnt");
    let mp = mp.to_str().unwrap();

    let junk = fx.dir.path().join("junk.img");
    File::create(&junk).unwrap().set_len(64 << 20).unwrap();
    fails(
        &["-d", junk.to_str().unwrap(), "mount", mp],
        "not a vapp datastore",
    );
    fails(
        &["-d", "/nonexistent/ds.vmfs", "mount", mp],
        "/nonexistent/ds.vmfs",
    );
    let missing = fx.dir.path().join("missing");
    fails(
        &["-d", fx.lun(), "mount", missing.to_str().unwrap()],
        "does not exist",
    );
    let file = fx.dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    fails(
        &["-d", fx.lun(), "mount", file.to_str().unwrap()],
        "not a directory",
    );
    assert_eq!(
        table(),
        Vec::<String>::new(),
        "a failed mount left something mounted"
    );
    assert_eq!(fx.live_hosts(), 0, "a failed mount left a host slot taken");

    let m = Mounted::new(&fx, "mnt", &[]);
    fails(&["-d", fx.lun(), "mount", mp], "busy");
    let mounts_at_mp = table()
        .iter()
        .filter(|l| l.split(' ').nth(4) == Some(mp))
        .count();
    assert_eq!(mounts_at_mp, 1);
    assert_eq!(fx.live_hosts(), 1, "the refused mount took a host slot");

    // umount of what is not a vapp mount.
    let plain = fx.mountpoint("plain");
    fails(&["umount", plain.to_str().unwrap()], "not mounted");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&plain)
        .status()
        .unwrap();
    assert!(status.success());
    let _tmpfs = TmpfsGuard(plain.clone());
    fails(&["umount", plain.to_str().unwrap()], "not a vapp mount");
    assert!(is_mounted(&plain));
    m.unmount();
    fx.assert_clean();
    // Nothing was written to the LUN that was not a datastore.
    let mut content = Vec::new();
    File::open(&junk)
        .unwrap()
        .read_to_end(&mut content)
        .unwrap();
    assert!(content.iter().all(|&b| b == 0));
    ok(&["datastore", "info", fx.lun()]);
}

struct TmpfsGuard(std::path::PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn allow_other_admits_other_users_and_the_stored_permissions_apply() {
    if !fuse_available()
        || !lun::prereq::require(lun::prereq::have_command("setpriv"), "setpriv (util-linux)")
    {
        return;
    }
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(args)
            .output()
            .unwrap()
    };
    let fx = Fixture::new("1G");
    let m = Mounted::new(&fx, "mnt", &[]);
    std::fs::write(m.path("public"), b"for everyone").unwrap();
    std::fs::write(m.path("secret"), b"root only").unwrap();
    std::fs::set_permissions(
        m.path("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let public = m.path("public");
    let public = public.to_str().unwrap();
    // Without --allow-other, FUSE admits only the user who mounted.
    assert!(!as_nobody(&["cat", public]).status.success());
    m.unmount();

    let m = Mounted::new(&fx, "mnt", &["--allow-other"]);
    let out = as_nobody(&["cat", public]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"for everyone");
    // The kernel checks the mode and owner stored in the datastore.
    let secret = m.path("secret");
    let out = as_nobody(&["cat", secret.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let new = m.path("new");
    let out = as_nobody(&["touch", new.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    m.unmount();
    fx.assert_clean();
}
