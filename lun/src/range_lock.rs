//! Host-wide exclusive byte-range locks on a LUN file or device node.
//!
//! Open file description (OFD) locks, unlike classic POSIX record locks, belong to the open
//! file rather than the process, so they are not silently dropped when some other descriptor
//! of the same file is closed, and two opens in one process exclude each other just as two
//! processes do. They do not exclude users of the *same* open file description, so callers
//! also serialise their own threads.

use std::fs::File;
use std::io;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};

/// Holds an exclusive lock on a byte range until dropped.
pub(crate) struct RangeLock<'a> {
    file: &'a File,
    offset: u64,
    len: u64,
}

impl<'a> RangeLock<'a> {
    /// Blocks until the range is exclusively ours.
    pub fn acquire(file: &'a File, offset: u64, len: u64) -> io::Result<RangeLock<'a>> {
        set(file, libc::F_WRLCK, offset, len, true)?;
        Ok(RangeLock { file, offset, len })
    }
}

impl Drop for RangeLock<'_> {
    fn drop(&mut self) {
        // Unlocking cannot fail for a range we hold; if it somehow did, closing the file
        // releases the lock anyway.
        if let Err(error) = set(self.file, libc::F_UNLCK, self.offset, self.len, false) {
            tracing::warn!(offset = self.offset, len = self.len, %error, "OFD unlock failed");
        }
    }
}

fn set(file: &File, kind: libc::c_int, offset: u64, len: u64, wait: bool) -> io::Result<()> {
    let to_off = |v: u64| {
        libc::off_t::try_from(v)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "lock range too large"))
    };
    let flock = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: to_off(offset)?,
        l_len: to_off(len)?,
        // OFD locks require 0 here.
        l_pid: 0,
    };
    loop {
        let arg = if wait {
            FcntlArg::F_OFD_SETLKW(&flock)
        } else {
            FcntlArg::F_OFD_SETLK(&flock)
        };
        match fcntl(file, arg) {
            Err(Errno::EINTR) => continue,
            result => return result.map(drop).map_err(io::Error::from),
        }
    }
}
