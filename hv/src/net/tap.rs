use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{IfReq, NetError};

/// A tap device this process created. It is not persistent: the kernel removes it when the
/// last descriptor closes, so a VM killed with -9 leaves no interface behind.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates tap `name` (nonblocking, no packet information header) and brings it up.
    pub fn create(name: &str) -> Result<Tap, NetError> {
        let mut req = IfReq::new(name)?;
        let os = |source: io::Error| NetError::Os {
            what: "cannot create tap",
            name: name.to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(os)?;
        req.set_short((libc::IFF_TAP | libc::IFF_NO_PI) as i16);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(os(io::Error::last_os_error()));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        super::set_up(name)?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is ours and `len` bytes long.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: the buffer is ours and `len` bytes long.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
