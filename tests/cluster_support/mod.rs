//! Support for the multi-process cluster tests: each host is a separate process, the test
//! binary itself re-run with `--exact <test>` and a role in the environment, so the code a
//! host runs sits next to the test that checks it. A host reports to the test through
//! stdout lines starting with `@@ ` (the test harness prints its own lines too).
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ROLE: &str = "VAPP_CLUSTER_ROLE";

/// The role this process plays, when it was started as a host by [`spawn`].
pub fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// A variable the test passed to this host process.
pub fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("host process started without {name}"))
}

/// Reports one line to the test.
pub fn report(line: impl AsRef<str>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n@@ {}", line.as_ref()).unwrap();
    out.flush().unwrap();
}

/// Host processes log to stderr (captured by the test); `VAPP_LOG` overrides the filter.
pub fn init_host_logging() {
    let filter = std::env::var("VAPP_LOG").unwrap_or_else(|_| "vmfs=info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// A host process and what it reported so far.
pub struct Host {
    pub name: String,
    pub child: Child,
    reports: Receiver<String>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

/// Starts this test binary again as a host running `test` in `role`, optionally through a
/// wrapper command (e.g. `ip netns exec NS`).
pub fn spawn(
    test: &str,
    role: &str,
    name: &str,
    vars: &[(&str, String)],
    wrapper: &[&str],
) -> Host {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env("VAPP_HOST_NAME", name)
        .env("VAPP_HOST_UUID", host_uuid(name))
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let (tx, reports) = channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness prints "test NAME ... " without a newline before the test runs.
            if let Some(at) = line.find("@@ ") {
                if tx.send(line[at + 3..].to_string()).is_err() {
                    break;
                }
            }
        }
    });
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let sink = stderr.clone();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Host {
        name: name.to_string(),
        child,
        reports,
        stderr,
        started: Instant::now(),
    }
}

/// A stable UUID per host name.
pub fn host_uuid(name: &str) -> String {
    let mut b = [0u8; 16];
    for (i, c) in name.bytes().enumerate() {
        b[i % 16] = b[i % 16].wrapping_mul(31).wrapping_add(c);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_string(&b)
}

fn uuid_string(b: &[u8; 16]) -> String {
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

impl Host {
    /// Waits for the next report starting with `prefix` (earlier other reports are
    /// skipped); panics with the host's stderr after `timeout`.
    pub fn expect(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "host {} reported no {prefix:?} within {timeout:?} (exit: {:?}); stderr:\n{}",
                        self.name,
                        self.child.try_wait().ok().flatten(),
                        self.stderr_text()
                    )
                }
            }
        }
    }

    /// Every report up to and including the first one starting with `prefix`.
    pub fn collect_until(&mut self, prefix: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(line) => {
                    let last = line.starts_with(prefix);
                    out.push(line);
                    if last {
                        return out;
                    }
                }
                Err(_) => panic!(
                    "host {} reported no {prefix:?} within {timeout:?} (exit: {:?}); stderr:\n{}",
                    self.name,
                    self.child.try_wait().ok().flatten(),
                    self.stderr_text()
                ),
            }
        }
    }

    /// Every report received so far (and until the host exits, after `wait`).
    pub fn drain(&mut self) -> Vec<String> {
        self.reports.try_iter().collect()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Tells the host to finish (closes its stdin) and waits for it.
    pub fn finish(&mut self, timeout: Duration) -> ExitStatus {
        drop(self.child.stdin.take());
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads catch the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "host {} did not exit within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) -> Instant {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let at = Instant::now();
        let _ = self.child.wait();
        at
    }

    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Blocks a host process until the test closes its stdin.
pub fn wait_for_stdin_eof() {
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
    }
}

/// The `vapp` binary of this build.
pub fn vapp() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vapp"))
}

/// Formats a datastore file for cluster tests (sparse, on tmpfs when there is one).
pub fn format_datastore(dir: &Path, protocol: &str, io_timeout: &str) -> PathBuf {
    let path = dir.join("shared.vmfs");
    let out = Command::new(vapp())
        .args(["datastore", "format"])
        .arg(&path)
        .args([
            "--name",
            "cluster",
            "--size",
            "2G",
            "--block-size",
            "64K",
            "--lock-protocol",
            protocol,
            "--io-timeout",
            io_timeout,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "format failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// Runs `vapp` with arguments; returns (success, stdout, stderr).
pub fn run_vapp(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(vapp());
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// fsck (check only) must report the datastore clean.
pub fn assert_fsck_clean(lun: &str) {
    let (ok, out, err) = run_vapp(&["datastore", "fsck", lun, "--json"], &[]);
    assert!(ok, "fsck of {lun} not clean:\n{out}\n{err}");
}
