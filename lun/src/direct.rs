//! Direct I/O (O_DIRECT): the alignment the kernel demands and buffers that satisfy it.
//!
//! With O_DIRECT the kernel moves data straight between the device and the caller's memory,
//! so offsets, lengths and the memory address must all be aligned. Offsets and lengths are
//! whole sectors already; memory is the caller's `Vec<u8>`, which is rarely aligned, so
//! unaligned buffers go through pooled [`AlignedBuf`] bounce buffers.

use std::alloc::{self, Layout};
use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Mutex;

/// A zero-filled heap buffer whose address is aligned, e.g. for O_DIRECT.
///
/// Callers that do a lot of I/O on a direct LUN can read and write through these to avoid
/// the bounce copy; page alignment (the default) satisfies every device.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub const PAGE: usize = 4096;

    /// A page-aligned buffer of `len` zero bytes.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf::with_alignment(len, AlignedBuf::PAGE)
    }

    /// A buffer of `len` zero bytes at an address that is a multiple of `align`
    /// (rounded up to a power of two).
    pub fn with_alignment(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(1).next_power_of_two();
        // A zero-sized allocation is not allowed, so an empty buffer still owns `align` bytes.
        let layout = match Layout::from_size_align(len.max(align), align) {
            Ok(layout) => layout,
            Err(_) => panic!("AlignedBuf of {len} bytes aligned to {align} exceeds isize::MAX"),
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    pub fn alignment(&self) -> usize {
        self.layout.align()
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points at `layout.size() >= len` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in with_alignment with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .finish()
    }
}

/// What O_DIRECT requires of one open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DioAlignment {
    /// Required alignment of the memory address.
    pub memory: usize,
    /// Required alignment of file offsets and lengths.
    pub offset: u32,
}

impl DioAlignment {
    pub fn is_aligned(&self, buf: &[u8]) -> bool {
        buf.as_ptr() as usize % self.memory == 0
    }
}

/// Asks the kernel (statx STATX_DIOALIGN, Linux 6.1+) what O_DIRECT needs on `file`.
/// `Ok(None)` means the kernel or file system does not say; `Err` that it says O_DIRECT is
/// not supported here.
pub(crate) fn statx_alignment(file: &File) -> Result<Option<DioAlignment>, String> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: an empty path with AT_EMPTY_PATH stats the descriptor itself; stx is a valid
    // writable statx buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Ok(None);
    }
    // SAFETY: statx succeeded and filled the buffer (and it was zeroed before).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    if stx.stx_dio_offset_align == 0 || stx.stx_dio_mem_align == 0 {
        return Err("the file system does not support direct I/O (O_DIRECT) on this file".into());
    }
    Ok(Some(DioAlignment {
        memory: stx.stx_dio_mem_align as usize,
        offset: stx.stx_dio_offset_align,
    }))
}

/// The logical block size of the block device `major:minor` from sysfs, for kernels or file
/// systems that do not report STATX_DIOALIGN. A partition has no queue/ of its own; its
/// parent disk's applies.
pub(crate) fn sysfs_logical_block_size(major: u32, minor: u32) -> Option<u32> {
    let dev = format!("/sys/dev/block/{major}:{minor}");
    ["queue/logical_block_size", "../queue/logical_block_size"]
        .iter()
        .find_map(|rel| std::fs::read_to_string(format!("{dev}/{rel}")).ok())
        .and_then(|s| s.trim().parse().ok())
}

/// Bounce buffers for one direct LUN, kept for reuse: a fresh large allocation costs an mmap
/// and a page fault per page, more than the copy itself.
#[derive(Debug)]
pub(crate) struct BouncePool {
    align: usize,
    idle: Mutex<Vec<AlignedBuf>>,
}

impl BouncePool {
    /// Largest bounce buffer callers ask for: they bounce larger requests in pieces.
    pub const CHUNK: usize = 1 << 20;
    const MAX_IDLE_BYTES: usize = 8 * BouncePool::CHUNK;

    pub fn new(align: usize) -> BouncePool {
        BouncePool {
            align,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of `len` bytes (contents unspecified): a pooled one if one is big enough.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let pooled = self.idle.lock().ok().and_then(|mut idle| {
            let fits = idle.iter().position(|buf| buf.capacity() >= len)?;
            Some(idle.swap_remove(fits))
        });
        let mut buf = pooled.unwrap_or_else(|| {
            AlignedBuf::with_alignment(len.next_multiple_of(AlignedBuf::PAGE), self.align)
        });
        // Both a pooled buffer that fits and a fresh one have capacity >= len.
        buf.len = len;
        buf
    }

    pub fn give_back(&self, buf: AlignedBuf) {
        if let Ok(mut idle) = self.idle.lock() {
            let held: usize = idle.iter().map(AlignedBuf::capacity).sum();
            if held + buf.capacity() <= BouncePool::MAX_IDLE_BYTES {
                idle.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_zeroed_and_sized() {
        for align in [512, 4096, 65536] {
            let mut buf = AlignedBuf::with_alignment(12345, align);
            assert_eq!(buf.as_ptr() as usize % align, 0);
            assert_eq!(buf.len(), 12345);
            assert!(buf.iter().all(|&b| b == 0));
            buf[12344] = 7;
            assert_eq!(buf[12344], 7);
        }
        assert!(AlignedBuf::new(0).is_empty());
    }

    #[test]
    fn bounce_pool_reuses_buffers() {
        let pool = BouncePool::new(4096);
        let buf = pool.take(8192);
        let addr = buf.as_ptr();
        assert_eq!(buf.len(), 8192);
        pool.give_back(buf);
        let again = pool.take(4096);
        assert_eq!(again.as_ptr(), addr, "a pooled buffer that fits is reused");
        assert_eq!(again.len(), 4096);
        let bigger = pool.take(BouncePool::CHUNK);
        assert_eq!(bigger.len(), BouncePool::CHUNK);
        assert_eq!(bigger.as_ptr() as usize % 4096, 0);
    }
}
