//! Raw device mappings opened through the mount: the file's data is the mapped LUN, reached
//! through `rdm::open` under the mapping file's lock (exclusive while this host writes it,
//! read-only shared otherwise), as a VM or an export reaches it.
//!
//! Opens of one mapping on this host share one `RdmLun`; a write open of a mapping this host
//! holds only for reading is refused with EBUSY until its readers close (the lock is not
//! converted under them). Reads and writes go straight to the LUN (direct I/O: no page
//! cache holds a device another host may write after us); a write that does not cover whole
//! sectors reads the sectors it touches first, one such write at a time per mapping.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fuser::Errno;
use lun::Lun;
use vmfs::{Access, Datastore};

/// File handles of mappings carry this bit, so they never collide with `OpenFiles`' ones.
const RDM_FH: u64 = 1 << 63;

/// A mapping open on this host.
struct Opened {
    lun: rdm::RdmLun,
    write: bool,
    /// Serialises writes that read the sectors they partly cover before writing them.
    partial: Mutex<()>,
}

struct Entry {
    opened: Arc<Opened>,
    opens: u32,
}

#[derive(Default)]
struct Table {
    by_ino: HashMap<u64, Entry>,
    /// fh -> ino
    opens: HashMap<u64, u64>,
}

#[derive(Default)]
pub(crate) struct RdmFiles {
    table: Mutex<Table>,
    next_fh: AtomicU64,
}

fn rdm_errno(op: &'static str, ino: u64, e: &rdm::Error) -> Errno {
    let code = e.errno();
    if code == libc::EIO {
        tracing::error!(op, ino, error = %e, "raw device mapping I/O failed");
    } else {
        tracing::warn!(op, ino, error = %e, "raw device mapping refused");
    }
    Errno::from_i32(code)
}

fn lun_errno(op: &'static str, ino: u64, e: &lun::LunError) -> Errno {
    tracing::error!(op, ino, error = %e, "raw device mapping I/O failed");
    Errno::EIO
}

impl RdmFiles {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_rdm(fh: u64) -> bool {
        fh & RDM_FH != 0
    }

    /// Opens mapping `ino` for this host; returns the file handle.
    pub fn open(&self, ds: &Datastore, ino: u64, write: bool) -> Result<u64, Errno> {
        let mut table = self.table();
        match table.by_ino.get_mut(&ino) {
            Some(entry) if write && !entry.opened.write => {
                tracing::warn!(
                    ino,
                    "raw device mapping open for reading here: a write open waits for its readers to close"
                );
                return Err(Errno::EBUSY);
            }
            Some(entry) => entry.opens += 1,
            None => {
                let access = if write {
                    Access::Exclusive
                } else {
                    Access::ReadOnly
                };
                let lun = rdm::open_ino(ds, ino, &format!("inode {ino}"), access)
                    .map_err(|e| rdm_errno("open", ino, &e))?;
                let opened = Arc::new(Opened {
                    lun,
                    write,
                    partial: Mutex::new(()),
                });
                table.by_ino.insert(ino, Entry { opened, opens: 1 });
            }
        }
        let fh = RDM_FH | self.next_fh.fetch_add(1, Ordering::Relaxed);
        table.opens.insert(fh, ino);
        Ok(fh)
    }

    fn entry(&self, fh: u64) -> Result<(u64, Arc<Opened>), Errno> {
        let table = self.table();
        let ino = *table.opens.get(&fh).ok_or(Errno::EBADF)?;
        let entry = table.by_ino.get(&ino).ok_or(Errno::EBADF)?;
        Ok((ino, entry.opened.clone()))
    }

    /// Up to `size` bytes at `offset`; fewer at the end of the LUN.
    pub fn read(&self, fh: u64, offset: u64, size: usize) -> Result<Vec<u8>, Errno> {
        let (ino, opened) = self.entry(fh)?;
        let lun = &opened.lun;
        let end = offset.saturating_add(size as u64).min(lun.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        let sector = u64::from(lun.sector_size());
        let (first, last) = (offset / sector * sector, end.div_ceil(sector) * sector);
        let mut buf = vec![0u8; usize::try_from(last - first).map_err(|_| Errno::EINVAL)?];
        lun.read_at(&mut buf, first)
            .map_err(|e| lun_errno("read", ino, &e))?;
        let skip = (offset - first) as usize;
        buf.drain(..skip);
        buf.truncate((end - offset) as usize);
        Ok(buf)
    }

    /// Writes `data` at `offset`; a write past the end of the LUN fails with EFBIG (a
    /// mapping's size is its device's).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let (ino, opened) = self.entry(fh)?;
        let lun = &opened.lun;
        if !opened.write {
            return Err(Errno::EBADF);
        }
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > lun.size() {
            return Err(Errno::EFBIG);
        }
        let sector = u64::from(lun.sector_size());
        if offset % sector == 0 && end % sector == 0 {
            lun.write_at(data, offset)
                .map_err(|e| lun_errno("write", ino, &e))?;
            return Ok(data.len());
        }
        let _one = opened.partial.lock().unwrap_or_else(|e| e.into_inner());
        let (first, last) = (offset / sector * sector, end.div_ceil(sector) * sector);
        let mut buf = vec![0u8; usize::try_from(last - first).map_err(|_| Errno::EINVAL)?];
        lun.read_at(&mut buf, first)
            .map_err(|e| lun_errno("write", ino, &e))?;
        let at = (offset - first) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        lun.write_at(&buf, first)
            .map_err(|e| lun_errno("write", ino, &e))?;
        Ok(data.len())
    }

    pub fn fsync(&self, fh: u64) -> Result<(), Errno> {
        let (ino, opened) = self.entry(fh)?;
        opened.lun.flush().map_err(|e| lun_errno("fsync", ino, &e))
    }

    /// Closes `fh`; the last close of a mapping flushes it and gives up its lock.
    pub fn release(&self, fh: u64) {
        let mut table = self.table();
        let Some(ino) = table.opens.remove(&fh) else {
            return;
        };
        let last = table.by_ino.get_mut(&ino).is_some_and(|e| {
            e.opens -= 1;
            e.opens == 0
        });
        if last && let Some(entry) = table.by_ino.remove(&ino) {
            if let Err(e) = entry.opened.lun.flush() {
                tracing::error!(ino, error = %e, "flushing a raw device mapping at its last close failed");
            }
        }
    }
}
