//! Runs `vapp export` as a child process for the export and guest tests, and the `vapp`
//! commands around it on a datastore in a sparse temporary file.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// A running `vapp export`, killed when dropped.
pub struct Export {
    pub child: Child,
    /// The URL it printed once listening.
    pub url: String,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

/// A `vapp` command with none of the caller's environment that would change its meaning.
fn command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vapp"));
    command
        .env_remove("VAPP_DATASTORE")
        .env_remove("VAPP_HOST_NAME")
        .env_remove("VAPP_HOST_UUID");
    command
}

impl Export {
    /// Starts `vapp export FILE ARGS...` and waits until it prints its URL.
    pub fn start(file: &Path, args: &[&str]) -> Export {
        let mut full = vec!["export", file.to_str().unwrap()];
        full.extend_from_slice(args);
        Export::launch(&full, &[]).unwrap_or_else(|stderr| panic!("vapp export failed: {stderr}"))
    }

    /// Starts `vapp ARGS...` (an export command) with `envs`; returns its stderr if it
    /// exits instead of printing a URL.
    pub fn launch(args: &[&str], envs: &[(&str, String)]) -> Result<Export, String> {
        let mut child = command()
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.is_empty() {
            let mut text = String::new();
            stderr.read_to_string(&mut text).unwrap();
            child.wait().unwrap();
            return Err(text);
        }
        // Its log stays visible with the test's output, and is kept for assertions.
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut chunk) {
                let _ = std::io::Write::write_all(&mut std::io::stderr(), &chunk[..n]);
                kept.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        let url = line.trim().to_string();
        assert!(
            url.starts_with("nbd"),
            "vapp export printed {line:?} instead of its URL"
        );
        Ok(Export {
            child,
            url,
            stderr: log,
        })
    }

    /// What it logged so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "vapp export did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the orderly exit (status 0) that must follow.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait(Duration::from_secs(20));
        assert_eq!(
            status.code(),
            Some(0),
            "vapp export after SIGTERM: {status}"
        );
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion and returns its stdout, failing the test on error.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `vapp ARGS...` to completion, whatever its exit status.
pub fn vapp(args: &[&str]) -> Output {
    command().args(args).output().unwrap()
}

/// `vapp ARGS...`, which must succeed; its stdout.
pub fn vapp_ok(args: &[&str]) -> String {
    let output = vapp(args);
    assert!(
        output.status.success(),
        "vapp {args:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

pub fn require_tools(tools: &[(&str, &str)]) -> bool {
    tools.iter().all(|(tool, package)| {
        lun::prereq::require(
            lun::prereq::have_command(tool),
            &format!("{tool} (Debian package {package})"),
        )
    })
}

/// Identity of a simulated host, for the environment of a `vapp` process.
pub fn host(n: u8) -> [(&'static str, String); 2] {
    [
        ("VAPP_HOST_NAME", format!("test-host-{n}")),
        (
            "VAPP_HOST_UUID",
            format!("00000000-0000-4000-8000-0000000000{n:02x}"),
        ),
    ]
}

/// The cluster timing of test datastores. Mounting without compare-and-write (over NBD)
/// waits 2 × this, but NBD requests, fsync of the peer's file included, must finish
/// within it, and a host must renew its heartbeat within 6 × this, on a busy machine too.
const IO_TIMEOUT: &str = "1s";

/// A datastore formatted in a sparse file, and the commands that work inside it.
pub struct Datastore {
    pub path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Datastore {
    /// Formats a fresh `size` datastore (e.g. "1G") in a temporary directory.
    pub fn format(size: &str) -> Datastore {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.vmfs");
        vapp_ok(&[
            "datastore",
            "format",
            path.to_str().unwrap(),
            "--name",
            "test",
            "--size",
            size,
            "--io-timeout",
            IO_TIMEOUT,
        ]);
        Datastore {
            path,
            _dir: Some(dir),
        }
    }

    /// A datastore on a LUN that `spec` names (an nbd:// URL); formats it.
    pub fn format_on(spec: &str) -> Datastore {
        vapp_ok(&[
            "datastore",
            "format",
            spec,
            "--name",
            "test",
            "--io-timeout",
            IO_TIMEOUT,
        ]);
        Datastore::existing(spec)
    }

    /// A datastore that exists already (or, for error tests, does not).
    pub fn existing(spec: &str) -> Datastore {
        Datastore {
            path: spec.into(),
            _dir: None,
        }
    }

    pub fn spec(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// `vapp -d DS ARGS...`, whatever its exit status.
    pub fn vapp(&self, args: &[&str]) -> Output {
        let mut full = vec!["-d", self.spec()];
        full.extend_from_slice(args);
        vapp(&full)
    }

    /// `vapp -d DS ARGS...`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let mut full = vec!["-d", self.spec()];
        full.extend_from_slice(args);
        vapp_ok(&full)
    }

    /// Creates a thin (or thick) virtual disk of `size` bytes in a new directory.
    pub fn vdisk(&self, path: &str, size: u64, thick: bool) {
        let parent = Path::new(path).parent().unwrap().to_str().unwrap();
        self.ok(&["mkdir", "-p", parent]);
        let size = size.to_string();
        let mut args = vec!["vdisk", "create", path, "--size", &size];
        if thick {
            args.push("--thick");
        }
        self.ok(&args);
    }

    /// `vapp -d DS export PATH ARGS...` as host `n`.
    pub fn export(&self, n: u8, path: &str, args: &[&str]) -> Result<Export, String> {
        let mut full = vec!["-d", self.spec(), "export", path];
        full.extend_from_slice(args);
        Export::launch(&full, &host(n))
    }

    /// A file's contents, read back with `vapp get`.
    pub fn get(&self, path: &str) -> Vec<u8> {
        let out = tempfile::NamedTempFile::new().unwrap();
        self.ok(&["get", path, out.path().to_str().unwrap()]);
        std::fs::read(out.path()).unwrap()
    }

    /// `vapp stat --json`.
    pub fn stat(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["stat", path, "--json"])).unwrap()
    }

    /// `vapp datastore fsck --json` must find the datastore clean.
    pub fn assert_clean(&self) {
        let output = vapp(&["datastore", "fsck", self.spec(), "--json"]);
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "fsck of {} is not clean: {report}\n{}",
            self.spec(),
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert_eq!(report["clean"], true, "{report}");
    }

    /// No host has the datastore mounted: every heartbeat slot ever used is free again.
    pub fn assert_no_live_host(&self) {
        let info: serde_json::Value =
            serde_json::from_str(&vapp_ok(&["datastore", "info", self.spec(), "--json"])).unwrap();
        let hosts = info["hosts"].as_array().unwrap();
        assert!(
            hosts.iter().all(|h| h["state"] != "live"),
            "a host is still mounted: {hosts:?}"
        );
    }
}

/// Reproducible bytes, cheap to make in a debug build.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Panics naming the first differing byte instead of printing megabytes.
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: differs from byte {at} on (got {:#04x}, expected {:#04x})",
            actual[at], expected[at]
        );
    }
}

/// An NBD server we did not write (qemu-nbd, nbdkit) on a Unix socket, killed when dropped.
///
/// Both answer FLUSH without syncing their file to disk: a datastore's NBD requests must
/// finish within its io_timeout, and an fsync on this shared machine's disk sometimes takes
/// longer than the test timing allows. What the peer does on power loss is not under test.
pub struct Peer {
    child: Child,
    pub url: String,
}

impl Peer {
    /// Sends `signal` to the server: SIGSTOP makes it a LUN that stops answering.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

impl Peer {
    /// qemu-nbd serving `file` raw, up to 8 clients at once.
    pub fn qemu_nbd(file: &Path, socket: &Path) -> Peer {
        let mut command = Command::new("qemu-nbd");
        command
            .args(["-f", "raw", "--cache=unsafe", "--persistent", "--shared=8"])
            .args(["-x", "ds", "-k"])
            .arg(socket)
            .arg(file);
        Peer::spawn(
            command,
            socket,
            format!("nbd+unix:///ds?socket={}", socket.display()),
        )
    }

    /// nbdkit's file plugin serving `file`.
    pub fn nbdkit(file: &Path, socket: &Path) -> Peer {
        let mut command = Command::new("nbdkit");
        command
            .args(["--foreground", "--exit-with-parent", "--filter=fua", "-U"])
            .arg(socket)
            .arg("file")
            .arg(file)
            .arg("fuamode=discard");
        Peer::spawn(
            command,
            socket,
            format!("nbd+unix:///?socket={}", socket.display()),
        )
    }

    fn spawn(mut command: Command, socket: &Path, url: String) -> Peer {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut peer = Peer { child, url };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !greets(socket) {
            if let Some(status) = peer.child.try_wait().unwrap() {
                panic!("{command:?} exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "{command:?} did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        peer
    }
}

/// True once an NBD server on `socket` greets; the probe then aborts the handshake the
/// polite way (NBD_OPT_ABORT), so the server has nothing to complain about.
fn greets(socket: &Path) -> bool {
    use std::io::Write;
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    if stream.read_exact(&mut [0u8; 18]).is_err() {
        return false;
    }
    let mut abort = Vec::new();
    abort.extend_from_slice(&1u32.to_be_bytes()); // NBD_FLAG_C_FIXED_NEWSTYLE
    abort.extend_from_slice(b"IHAVEOPT");
    abort.extend_from_slice(&2u32.to_be_bytes()); // NBD_OPT_ABORT
    abort.extend_from_slice(&0u32.to_be_bytes());
    let _ = stream.write_all(&abort);
    let _ = stream.read_exact(&mut [0u8; 20]);
    true
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
