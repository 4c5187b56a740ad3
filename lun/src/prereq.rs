//! Test prerequisites: a test that needs KVM, FUSE, root or an external tool skips with a
//! printed reason on a machine without it, but fails when `CI=true`.

use std::path::Path;
use std::process::{Command, Stdio};

/// Returns true when the test may go on. When `available` is false it prints why the test is
/// skipped and returns false, or panics under `CI=true`, where every prerequisite must exist.
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("prerequisite missing under CI=true: {what}");
    }
    eprintln!("SKIPPED: prerequisite missing: {what}");
    false
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when `program` is on PATH and runs.
pub fn have_command(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// True when the device node exists and this process can open it read-write.
pub fn have_device(path: &str) -> bool {
    Path::new(path).exists()
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .is_ok()
}
