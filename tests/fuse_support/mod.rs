//! Real FUSE mounts of a datastore for the `fuse_*` tests: `vapp mount` as a daemon, always
//! unmounted by a guard so a failing test leaves no mount behind.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn vapp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(args)
        .env_remove("VAPP_DATASTORE")
        .env_remove("VAPP_HOST_NAME")
        .env_remove("VAPP_HOST_UUID")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn ok(args: &[&str]) -> String {
    let out = vapp(args);
    assert!(
        out.status.success(),
        "vapp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Mounts need /dev/fuse, and root for mount(2).
pub fn fuse_available() -> bool {
    lun::prereq::require(
        lun::prereq::have_device("/dev/fuse") && lun::prereq::is_root(),
        "/dev/fuse and root (vapp mount uses mount(2))",
    )
}

/// A datastore in a sparse file, with a mount point next to it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub lun: PathBuf,
}

impl Fixture {
    pub fn new(size: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let lun = dir.path().join("ds.vmfs");
        ok(&[
            "datastore",
            "format",
            lun.to_str().unwrap(),
            "--name",
            "fuse-test",
            "--size",
            size,
            // Dead hosts are recognised (and recovered) after 8 × this, fast enough for tests.
            "--io-timeout",
            "100ms",
        ]);
        Fixture { dir, lun }
    }

    pub fn lun(&self) -> &str {
        self.lun.to_str().unwrap()
    }

    pub fn mountpoint(&self, name: &str) -> PathBuf {
        let mp = self.dir.path().join(name);
        std::fs::create_dir_all(&mp).unwrap();
        mp
    }

    /// `vapp datastore fsck` finds nothing.
    pub fn assert_clean(&self) {
        let out = vapp(&["datastore", "fsck", self.lun(), "--json"]);
        let report = String::from_utf8_lossy(&out.stdout);
        let parsed: Option<serde_json::Value> = serde_json::from_str(&report).ok();
        assert!(
            out.status.success() && parsed.is_some_and(|r| r["clean"] == true),
            "fsck is not clean: {report}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The datastore's heartbeat slots, as `datastore info --json` lists them.
    pub fn live_hosts(&self) -> usize {
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["datastore", "info", self.lun(), "--json"])).unwrap();
        info["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["state"] == "live")
            .count()
    }
}

/// A mounted datastore; dropping it unmounts (forcefully if it must).
pub struct Mounted {
    pub mountpoint: PathBuf,
    pub log: PathBuf,
}

impl Mounted {
    /// `vapp -d LUN mount MP EXTRA...`, as a background daemon logging to a file.
    pub fn new(fx: &Fixture, name: &str, extra: &[&str]) -> Mounted {
        Self::with_env(fx, name, extra, &[])
    }

    pub fn with_env(fx: &Fixture, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Mounted {
        let mountpoint = fx.mountpoint(name);
        let log = fx.dir.path().join(format!("{name}.log"));
        let mut args = vec![
            "--log",
            "info",
            "-d",
            fx.lun(),
            "mount",
            mountpoint.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_vapp"))
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vapp mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mounted = Mounted { mountpoint, log };
        assert!(
            mounted.is_mounted(),
            "vapp mount returned but nothing is mounted"
        );
        mounted
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.mountpoint)
    }

    /// The daemon's pid, from its log line "datastore mounted".
    pub fn daemon_pid(&self) -> i32 {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(table.contains(self.mountpoint.to_str().unwrap()));
        let dir = Path::new("/run/vapp/mounts");
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
            if text.contains(&format!("mountpoint {}\n", self.mountpoint.display())) {
                return text
                    .lines()
                    .find_map(|l| l.strip_prefix("pid "))
                    .unwrap()
                    .parse()
                    .unwrap();
            }
        }
        panic!("no registration for {}", self.mountpoint.display());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `vapp umount`, asserting it succeeds.
    pub fn unmount(self) {
        ok(&["umount", self.mountpoint.to_str().unwrap()]);
        assert!(!self.is_mounted(), "still mounted after vapp umount");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.is_mounted() {
            return;
        }
        let _ = vapp(&[
            "umount",
            "--force",
            "--timeout",
            "10",
            self.mountpoint.to_str().unwrap(),
        ]);
        if self.is_mounted() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

pub fn is_mounted(mountpoint: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = mountpoint.to_str().unwrap().replace(' ', "\\040");
    table
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mp.as_str()))
}

pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Runs a shell command line, asserting success.
pub fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-ec").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "`{script}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to `pid`.
pub fn kill(pid: i32, signal: i32) {
    // SAFETY: kill(2) touches no memory of ours.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
}

/// True while `pid` exists (and is not a zombie we could reap).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
                != Some('Z')
        })
        .unwrap_or(false)
}
