//! The one abstraction of vapp: a [`Lun`] is a block-addressable volume.
//!
//! Every layer consumes LUNs and most produce them: a file or block device, an NBD export,
//! a virtual disk inside a datastore, a snapshot, a replica, a fault-injecting wrapper.
//! The trait is deliberately small; speed lives in the implementations.

mod blockdev;
mod direct;
mod engine;
mod error;
pub mod fault;
mod file;
mod identity;
mod keeping;
pub mod nbd;
mod open;
pub mod prereq;
mod range_lock;
mod reach;
mod scsi;
mod switch;
mod uring;

pub use direct::AlignedBuf;
pub use engine::{IO_ENGINE_ENV, IoEngine};
pub use error::{LunError, Result};
pub use file::{Backing, FileLun};
pub use identity::{IDENTITY_MAX, LunIdentity, device_serial};
pub use keeping::Keeping;
pub use nbd::{NbdLun, NbdOptions, NbdServer, NbdTarget};
pub use open::{LunSpec, NBD_DEFAULT_PORT, OpenOptions, open};
pub use reach::{CasScope, DeviceKind, Reach, shared_fs_name};
pub use switch::{SwitchError, SwitchLun};

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A block-addressable volume with a fixed logical sector size.
///
/// All offsets and lengths are in bytes and must be multiples of [`Lun::sector_size`];
/// a request that is not gets [`LunError::Misaligned`], one past the end gets
/// [`LunError::OutOfRange`]. Implementations call [`check_request`] for both.
///
/// A write is sector-atomic: after a crash each sector holds either its old or its new
/// contents, never a mix. Nothing more is promised across sectors; durability needs
/// [`Lun::flush`].
pub trait Lun: Send + Sync + fmt::Debug {
    /// Identity used in errors and logs, e.g. `file:/srv/ds1.vmfs` or `nbd://10.0.0.2/ds1`.
    fn name(&self) -> &str;

    /// Logical sector size in bytes: 512 or 4096 (any power of two ≥ 512 is legal).
    fn sector_size(&self) -> u32;

    /// Length in bytes, a multiple of the sector size.
    fn size(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`. Returns once the LUN has accepted the data, which is not
    /// yet durable: see [`Lun::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> Result<()>;

    /// True when writes are refused with [`LunError::ReadOnly`].
    fn is_read_only(&self) -> bool {
        false
    }

    /// True when [`Lun::compare_and_write`] is implemented atomically (SCSI ATS semantics),
    /// at least among the processes of this machine: see [`Lun::compare_and_write_scope`].
    fn supports_compare_and_write(&self) -> bool {
        false
    }

    /// Who [`Lun::compare_and_write`] excludes (on a read-only LUN: would exclude, were it
    /// opened read-write). The default claims no more than this machine; only a device's
    /// own atomic command excludes other machines.
    fn compare_and_write_scope(&self) -> CasScope {
        if self.supports_compare_and_write() {
            CasScope::ThisMachine
        } else {
            CasScope::None
        }
    }

    /// How this machine reaches the LUN, which says whether other machines might too.
    fn reach(&self) -> Reach {
        Reach::Other
    }

    /// What the LUN is, whatever path reached it (see [`LunIdentity`]); `None` when it
    /// cannot be told (a test wrapper, a block device with no stable id).
    fn identity(&self) -> Option<LunIdentity> {
        None
    }

    /// Atomic test-and-set: if the bytes at `offset` equal `expected`, replace them with
    /// `new` and return [`CompareAndWrite::Written`]; otherwise change nothing and return
    /// [`CompareAndWrite::Miscompare`] carrying the current contents, so callers can retry
    /// from them without another read.
    ///
    /// `expected` and `new` have the same length, a whole number of sectors. Backends
    /// without an atomic primitive return [`LunError::Unsupported`]; callers must then use
    /// a protocol that needs only sector-atomic reads and writes.
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> Result<CompareAndWrite> {
        let _ = (expected, new, offset);
        Err(LunError::Unsupported {
            lun: self.name().to_string(),
            op: "compare-and-write",
        })
    }

    /// Makes `len` bytes at `offset` read back as zeroes. Backends that can deallocate
    /// (punch a hole, NBD WRITE_ZEROES/TRIM) do so; the default writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self, offset, len)?;
        write_zero_buffers(self, offset, len)
    }

    /// False only when no byte of `offset..offset + len` is stored: the range is a hole
    /// of a thin LUN and reads back as zeroes without touching the disk. A copy (an
    /// initial sync, a clone) skips such ranges unread. Backends that cannot tell say
    /// true, which is always safe.
    fn may_hold_data(&self, offset: u64, len: u64) -> Result<bool> {
        let _ = (offset, len);
        Ok(true)
    }

    /// Runs a batch of independent requests. Backends with a queue (io_uring, NBD) run
    /// them in parallel; the default runs them one after another. The first failure is
    /// returned; requests of a failed batch may or may not have been carried out.
    fn submit(&self, batch: &mut [IoRequest<'_>]) -> Result<()> {
        for request in batch.iter_mut() {
            match request {
                IoRequest::Read { buf, offset } => self.read_at(buf, *offset)?,
                IoRequest::Write { buf, offset } => self.write_at(buf, *offset)?,
            }
        }
        Ok(())
    }
}

/// One request of a [`Lun::submit`] batch.
#[derive(Debug)]
pub enum IoRequest<'a> {
    Read { buf: &'a mut [u8], offset: u64 },
    Write { buf: &'a [u8], offset: u64 },
}

impl IoRequest<'_> {
    pub(crate) fn offset(&self) -> u64 {
        match self {
            IoRequest::Read { offset, .. } | IoRequest::Write { offset, .. } => *offset,
        }
    }

    pub(crate) fn buf(&self) -> &[u8] {
        match self {
            IoRequest::Read { buf, .. } => buf,
            IoRequest::Write { buf, .. } => buf,
        }
    }
}

/// Outcome of [`Lun::compare_and_write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareAndWrite {
    /// The comparison matched and the new data is in place.
    Written,
    /// The comparison failed; nothing was written. Holds the current contents.
    Miscompare(Vec<u8>),
}

/// Validates alignment and range of a request against `lun`.
pub fn check_request<L: Lun + ?Sized>(lun: &L, offset: u64, len: u64) -> Result<()> {
    let sector = u64::from(lun.sector_size());
    if offset % sector != 0 || len % sector != 0 {
        return Err(LunError::Misaligned {
            lun: lun.name().to_string(),
            offset,
            len,
            sector_size: lun.sector_size(),
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= lun.size() => Ok(()),
        _ => Err(LunError::OutOfRange {
            lun: lun.name().to_string(),
            offset,
            len,
            size: lun.size(),
        }),
    }
}

/// Writes zero buffers over `len` sector-aligned bytes at `offset`, a megabyte at a time:
/// the default [`Lun::write_zeroes`], and how a range is zeroed that must stay allocated.
pub(crate) fn write_zero_buffers<L: Lun + ?Sized>(lun: &L, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        lun.write_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Locks `mutex`, ignoring poisoning: no critical section in this crate can panic halfway,
/// so the data stays consistent and one panicking thread must not take every later
/// request down with it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T: Lun + ?Sized> Lun for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn supports_compare_and_write(&self) -> bool {
        (**self).supports_compare_and_write()
    }
    fn compare_and_write_scope(&self) -> CasScope {
        (**self).compare_and_write_scope()
    }
    fn reach(&self) -> Reach {
        (**self).reach()
    }
    fn identity(&self) -> Option<LunIdentity> {
        (**self).identity()
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> Result<CompareAndWrite> {
        (**self).compare_and_write(expected, new, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> Result<bool> {
        (**self).may_hold_data(offset, len)
    }
    fn submit(&self, batch: &mut [IoRequest<'_>]) -> Result<()> {
        (**self).submit(batch)
    }
}
