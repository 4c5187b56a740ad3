//! `vm start` prints the guest's serial console on standard output and its own messages and
//! logs on standard error, usually one terminal or one pipe (`2>&1`). Guest bytes arrive one
//! at a time from vCPU threads, so a host message could land in the middle of a guest line:
//! here both sides take one lock, and a host message first ends a line the guest left open
//! on the same file.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Mutex, OnceLock, PoisonError};

/// True while standard output ends in a guest line without its newline.
static GUEST_LINE_OPEN: Mutex<bool> = Mutex::new(false);

/// Standard output and standard error are the same file (terminal, pipe or log file).
fn shared() -> bool {
    static SHARED: OnceLock<bool> = OnceLock::new();
    *SHARED.get_or_init(|| {
        let id = |fd: std::os::fd::BorrowedFd<'_>| {
            nix::sys::stat::fstat(fd)
                .ok()
                .map(|st| (st.st_dev, st.st_ino, st.st_rdev))
        };
        match (id(io::stdout().as_fd()), id(io::stderr().as_fd())) {
            (Some(out), Some(err)) => out == err,
            _ => false,
        }
    })
}

/// Writes guest console bytes to standard output.
pub fn guest_output(buf: &[u8]) -> io::Result<()> {
    let mut open = GUEST_LINE_OPEN
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut out = io::stdout().lock();
    out.write_all(buf)?;
    out.flush()?;
    if let Some(&last) = buf.last() {
        *open = last != b'\n';
    }
    Ok(())
}

/// Standard error for host messages and logs: each write starts on a line of its own.
pub struct HostStderr;

impl Write for HostStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut open = GUEST_LINE_OPEN
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut err = io::stderr().lock();
        if *open && shared() {
            err.write_all(b"\n")?;
            *open = false;
        }
        err.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// `eprintln!` through [`HostStderr`]: the message is one write, on a line of its own.
#[macro_export]
macro_rules! hostln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = $crate::console::HostStderr.write_all(line.as_bytes());
    }};
}
