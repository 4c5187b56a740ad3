//! Block device geometry and zeroing through the kernel's block ioctls.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

// <linux/fs.h>
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Size of the device in bytes (BLKGETSIZE64).
pub(crate) fn size(device: &File) -> io::Result<u64> {
    let mut bytes = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    unsafe { blkgetsize64(device.as_raw_fd(), &mut bytes) }?;
    Ok(bytes)
}

/// Logical sector size: the smallest unit the device can address (BLKSSZGET).
pub(crate) fn logical_sector_size(device: &File) -> io::Result<u32> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
    unsafe { blksszget(device.as_raw_fd(), &mut bytes) }?;
    u32::try_from(bytes).map_err(|_| io::Error::other(format!("BLKSSZGET returned {bytes}")))
}

/// Zeroes `len` bytes at `offset` (BLKZEROOUT). The kernel uses the device's WRITE ZEROES
/// (which thin devices and loop devices turn into deallocation) and falls back to writing
/// zero pages; it also drops the range from the page cache.
pub(crate) fn zero_out(device: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    loop {
        // SAFETY: BLKZEROOUT reads two u64 (start, length) through the pointer.
        match unsafe { blkzeroout(device.as_raw_fd(), &range) } {
            Err(nix::errno::Errno::EINTR) => continue,
            result => return result.map(drop).map_err(io::Error::from),
        }
    }
}
