//! Runs `vapp export` as a child process for the export and guest tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `vapp export`, killed when dropped.
pub struct Export {
    pub child: Child,
    /// The URL it printed once listening.
    pub url: String,
}

impl Export {
    /// Starts `vapp export FILE ARGS...` and waits until it prints its URL.
    pub fn start(file: &Path, args: &[&str]) -> Export {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vapp"))
            .arg("export")
            .arg(file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().to_string();
        assert!(
            url.starts_with("nbd"),
            "vapp export printed {line:?} instead of its URL"
        );
        Export { child, url }
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

pub fn require_tools(tools: &[(&str, &str)]) -> bool {
    tools.iter().all(|(tool, package)| {
        lun::prereq::require(
            lun::prereq::have_command(tool),
            &format!("{tool} (Debian package {package})"),
        )
    })
}
