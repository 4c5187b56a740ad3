//! Open-file handles with an access mode, and virtual disks as LUNs.
//!
//! A handle holds its inode's on-disk lock in the handle's mode for as long as it is open:
//! read-only shared opens coexist, multi-writer opens coexist, an exclusive open excludes
//! everything else, across hosts (the lock record) and within this process (the holder list).
//! A conflict with a live host fails at once with `Busy` naming the holder; a holder that
//! stopped renewing its heartbeat is recovered and its lock broken. Read-only datastores
//! take no locks. When the last handle of a host closes, what was done under the lock is
//! committed and the lock given up at once: a host that reopens the file must queue behind
//! the others again, so a host opening and closing in a loop cannot starve them.

use std::fmt;
use std::sync::Arc;

use lun::{Lun, LunError};
use serde::Serialize;

use crate::datastore::Datastore;
use crate::error::{Error, Result};
use crate::inode::{InodeView, Kind};
use crate::state::Holder;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Read-only shared: many readers, no writers.
    ReadOnly,
    /// One holder, reading and writing.
    Exclusive,
    /// Many holders that all write (clustered applications that coordinate themselves).
    MultiWriter,
}

impl Access {
    pub fn can_write(self) -> bool {
        self != Access::ReadOnly
    }
    fn compatible(self, other: Access) -> bool {
        matches!(
            (self, other),
            (Access::ReadOnly, Access::ReadOnly) | (Access::MultiWriter, Access::MultiWriter)
        )
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::ReadOnly => "read-only shared",
            Access::Exclusive => "exclusive",
            Access::MultiWriter => "multi-writer",
        })
    }
}

/// An open file. Dropping it releases the lock (and frees the file if it was unlinked
/// while open).
pub struct FileHandle {
    ds: Datastore,
    ino: u64,
    access: Access,
    id: u64,
}

impl Datastore {
    /// Opens inode `ino` with `access`, refusing with `Busy` (naming the holder) when an
    /// incompatible handle exists.
    /// A virtual disk with snapshot sessions, or a snapshot pool, is refused for writing:
    /// only the snapshot engine writes them ([`Datastore::open_lun_through_engine`]).
    pub fn open_file(&self, ino: u64, access: Access) -> Result<FileHandle> {
        self.open_file_as(ino, access, false)
    }

    fn open_file_as(&self, ino: u64, access: Access, engine: bool) -> Result<FileHandle> {
        if access.can_write() && self.is_read_only() {
            return Err(Error::ReadOnly {
                lun: self.lun().name().to_string(),
            });
        }
        let holder_name = self.holder_name();
        let register = |s: &mut crate::state::State| {
            let u = s.inode(ino)?;
            if u.kind() == Some(Kind::Dir) && access.can_write() {
                return Err(Error::IsADirectory {
                    object: format!("inode {ino}"),
                });
            }
            if access.can_write() && !engine {
                crate::datastore::check_unprotected(&u, || format!("inode {ino}"))?;
            }
            let holders = s.locks.entry(ino).or_default();
            if let Some(h) = holders.iter().find(|h| !access.compatible(h.access)) {
                return Err(Error::Busy {
                    object: format!("inode {ino}"),
                    holder: format!("{holder_name}, handle {}", h.id),
                    mode: h.access.to_string(),
                });
            }
            if u.kind() != Some(Kind::Dir) && s.node.is_some() {
                s.lock_open(ino, access)?;
            }
            let id = s.next_holder;
            s.next_holder += 1;
            s.locks.entry(ino).or_default().push(Holder { id, access });
            Ok(id)
        };
        let id = if self.is_read_only() {
            self.read_op(register)?
        } else {
            self.write_op(register)?
        };
        tracing::debug!(ino, handle = id, access = %access, "file opened");
        Ok(FileHandle {
            ds: self.share(),
            ino,
            access,
            id,
        })
    }

    /// Opens the file at `path`.
    pub fn open_path(&self, path: &str, access: Access) -> Result<FileHandle> {
        let ino = self.resolve(path)?;
        self.open_file(ino, access).map_err(|e| e.at(path))
    }

    fn holder_name(&self) -> String {
        match &self.inner.host {
            Some(h) => format!("host {} ({}, slot {})", h.name, h.uuid, h.slot),
            None => "a read-only open of this process".to_string(),
        }
    }

    /// A virtual disk file as a LUN with 512-byte sectors (its size must be a multiple of
    /// 512). Flush makes writes durable.
    pub fn open_lun(&self, path: &str, access: Access) -> Result<Arc<dyn Lun>> {
        let handle = self.open_path(path, access)?;
        self.vdisk_lun(path, handle, None)
    }

    /// [`Datastore::open_lun`] for the snapshot engine: a virtual disk with snapshot
    /// sessions, or its pool, may be opened for writing. The LUN's name stays the same
    /// while the file exists (`vmfs-inode:INO.GENERATION`), whatever path reaches it, so a
    /// pool recognises its source after a relabel.
    pub fn open_lun_through_engine(&self, path: &str, access: Access) -> Result<Arc<dyn Lun>> {
        let ino = self.resolve(path)?;
        let handle = self
            .open_file_as(ino, access, true)
            .map_err(|e| e.at(path))?;
        let generation = self.getattr(ino)?.generation;
        self.vdisk_lun(path, handle, Some(format!("vmfs-inode:{ino}.{generation}")))
    }

    fn vdisk_lun(
        &self,
        path: &str,
        handle: FileHandle,
        name: Option<String>,
    ) -> Result<Arc<dyn Lun>> {
        let attr = self.getattr(handle.ino)?;
        if attr.kind != Kind::File || attr.size % 512 != 0 || attr.size == 0 {
            return Err(Error::Invalid {
                object: path.to_string(),
                reason: format!(
                    "a virtual disk must be a regular file whose size is a non-zero multiple of 512 (size {})",
                    attr.size
                ),
            });
        }
        Ok(Arc::new(VdiskLun {
            name: name.unwrap_or_else(|| format!("vmfs:{}:{}", self.superblock().label, path)),
            size: attr.size,
            handle,
        }))
    }
}

impl FileHandle {
    pub fn ino(&self) -> u64 {
        self.ino
    }
    pub fn access(&self) -> Access {
        self.access
    }
    pub fn datastore(&self) -> &Datastore {
        &self.ds
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        self.ds.read(self.ino, off, buf)
    }

    /// Fills `buf` completely; bytes past end of file read as zeroes.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let n = self.ds.read(self.ino, off, buf)?;
        buf[n..].fill(0);
        Ok(())
    }

    fn check_write(&self) -> Result<()> {
        if !self.access.can_write() {
            return Err(Error::NotPermitted {
                object: format!("inode {}", self.ino),
                reason: "handle is open read-only".into(),
            });
        }
        Ok(())
    }

    pub fn write_at(&self, data: &[u8], off: u64) -> Result<usize> {
        self.check_write()?;
        self.ds.write(self.ino, off, data)
    }

    pub fn truncate(&self, size: u64) -> Result<()> {
        self.check_write()?;
        self.ds.truncate(self.ino, size)
    }

    pub fn punch_hole(&self, off: u64, len: u64) -> Result<()> {
        self.check_write()?;
        self.ds.punch_hole(self.ino, off, len)
    }

    pub fn size(&self) -> Result<u64> {
        Ok(self.ds.getattr(self.ino)?.size)
    }

    pub fn sync(&self) -> Result<()> {
        self.ds.fsync(self.ino)
    }
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        let (last, orphan) = {
            let mut s = self.ds.lock();
            let mut last = false;
            if let Some(holders) = s.locks.get_mut(&self.ino) {
                holders.retain(|h| h.id != self.id);
                last = holders.is_empty();
                if last {
                    s.locks.remove(&self.ino);
                    s.handles_closed(self.ino);
                }
            }
            let orphan = s.orphans.iter().any(
                |o| matches!(o, crate::journal::Orphan::Unlinked { ino, .. } if *ino == self.ino),
            );
            (last, orphan)
        };
        if last && orphan {
            if let Err(e) = self.ds.reap(self.ino) {
                tracing::error!(ino = self.ino, error = %e, "freeing an unlinked file at close failed; it is freed at next mount");
            }
        }
        if last {
            let mut s = self.ds.lock();
            if s.node.is_some() && s.st.check_writable().is_ok() {
                if let Err(e) = s.sync_point() {
                    tracing::warn!(ino = self.ino, error = %e, "releasing a file lock at close failed; retried at the next commit point");
                }
            }
        }
    }
}

impl fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileHandle")
            .field("ino", &self.ino)
            .field("access", &self.access)
            .field("id", &self.id)
            .finish()
    }
}

/// A virtual disk on the datastore seen as a LUN.
pub struct VdiskLun {
    name: String,
    size: u64,
    handle: FileHandle,
}

impl fmt::Debug for VdiskLun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VdiskLun")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish()
    }
}

impl VdiskLun {
    fn lun_error(&self, offset: u64, len: u64, e: Error) -> LunError {
        match e {
            Error::Lun(inner) => inner,
            other => LunError::Io {
                lun: self.name.clone(),
                offset,
                len,
                source: std::io::Error::from_raw_os_error(other.errno()),
            },
        }
    }
}

impl Lun for VdiskLun {
    fn name(&self) -> &str {
        &self.name
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        lun::check_request(self, offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        self.handle
            .read_exact_at(buf, offset)
            .map_err(|e| self.lun_error(offset, len, e))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        lun::check_request(self, offset, buf.len() as u64)?;
        if !self.handle.access.can_write() {
            return Err(LunError::ReadOnly {
                lun: self.name.clone(),
            });
        }
        let len = buf.len() as u64;
        self.handle
            .write_at(buf, offset)
            .map(|_| ())
            .map_err(|e| self.lun_error(offset, len, e))
    }
    fn flush(&self) -> lun::Result<()> {
        self.handle.sync().map_err(|e| self.lun_error(0, 0, e))
    }
    fn is_read_only(&self) -> bool {
        !self.handle.access.can_write()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        lun::check_request(self, offset, len)?;
        if !self.handle.access.can_write() {
            return Err(LunError::ReadOnly {
                lun: self.name.clone(),
            });
        }
        self.handle
            .punch_hole(offset, len)
            .map_err(|e| self.lun_error(offset, len, e))
    }
}
