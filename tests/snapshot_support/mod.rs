//! `vapp snapshot` and `vapp clone` as a user runs them: a private state and runtime
//! directory per test, real files, `vapp export` processes read and written over NBD.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lun::Lun;
use sha2::{Digest, Sha256};

pub const MIB: u64 = 1 << 20;

/// A temporary directory with this test's own registry and runtime directory.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn p(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vapp"));
        c.env_remove("VAPP_DATASTORE")
            .env_remove("VAPP_HOST_NAME")
            .env_remove("VAPP_HOST_UUID")
            .env("VAPP_STATE_DIR", self.path("state"))
            .env("VAPP_RUNTIME_DIR", self.path("run"));
        c
    }

    pub fn vapp(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Runs `vapp ARGS` and returns its stdout; panics with its stderr if it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vapp(args);
        assert!(
            out.status.success(),
            "vapp {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `vapp ARGS`, which must fail, and returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.vapp(args);
        assert!(
            !out.status.success(),
            "vapp {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// A sparse file of `size` bytes filled with a pattern derived from `seed`.
    pub fn file(&self, name: &str, size: u64, seed: u8) -> String {
        let path = self.path(name);
        std::fs::write(&path, pattern(size as usize, seed)).unwrap();
        path.to_str().unwrap().to_string()
    }

    pub fn list(&self, lun: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["snapshot", "list", lun, "--json"])).unwrap()
    }

    /// Starts `vapp export ARGS... --socket S` and waits until it listens.
    pub fn export(&self, spec: &str, extra: &[&str]) -> Export {
        let socket = self.path(&format!(
            "nbd-{}.sock",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut child = self
            .command()
            .args(["export", spec, "--socket", socket.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("nbd"), "vapp export {spec} did not start");
        Export {
            child,
            socket,
            url: line.trim().to_string(),
        }
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

pub fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

pub fn file_sha(path: &str) -> Vec<u8> {
    sha(&std::fs::read(path).unwrap())
}

/// A running `vapp export`, killed when dropped.
pub struct Export {
    pub child: Child,
    pub socket: PathBuf,
    pub url: String,
}

impl Export {
    pub fn client(&self) -> lun::NbdLun {
        lun::NbdLun::connect(
            lun::NbdTarget::Unix(self.socket.clone()),
            "",
            lun::NbdOptions::default(),
        )
        .unwrap()
    }

    /// Every byte the export serves.
    pub fn read_all(&self) -> Vec<u8> {
        let c = self.client();
        let mut buf = vec![0u8; c.size() as usize];
        c.read_at(&mut buf, 0).unwrap();
        buf
    }

    /// SIGTERM and the orderly exit that must follow.
    pub fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "vapp export after SIGTERM: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "vapp export did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `spec` (e.g. `FILE@NAME`) through a read-only `vapp export`.
pub fn read_through_export(env: &Env, spec: &str) -> Vec<u8> {
    let export = env.export(spec, &["--read-only"]);
    let data = export.read_all();
    export.stop();
    data
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
