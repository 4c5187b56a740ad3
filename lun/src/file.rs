//! A LUN backed by a regular file (sparse) or a block device, with pread/pwrite.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Lun, LunError, Result, check_request};

#[derive(Debug)]
pub struct FileLun {
    name: String,
    file: File,
    size: u64,
    sector_size: u32,
    read_only: bool,
}

impl FileLun {
    /// Opens an existing file as a LUN with 512-byte sectors.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let name = format!("file:{}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| LunError::Open {
                lun: name.clone(),
                reason: e.to_string(),
            })?;
        let size = file
            .metadata()
            .map_err(|e| LunError::Open {
                lun: name.clone(),
                reason: e.to_string(),
            })?
            .len();
        let sector_size = 512;
        Ok(Self {
            name,
            file,
            size: size - size % u64::from(sector_size),
            sector_size,
            read_only,
        })
    }

    /// Creates a sparse file of `size` bytes (refusing to replace an existing one).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let name = format!("file:{}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| LunError::Open {
                lun: name.clone(),
                reason: e.to_string(),
            })?;
        file.set_len(size).map_err(|e| LunError::Open {
            lun: name.clone(),
            reason: e.to_string(),
        })?;
        drop(file);
        Self::open(path, false)
    }

    fn io_error(&self, offset: u64, len: u64, source: std::io::Error) -> LunError {
        LunError::Io {
            lun: self.name.clone(),
            offset,
            len,
            source,
        }
    }
}

impl Lun for FileLun {
    fn name(&self) -> &str {
        &self.name
    }

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_request(self, offset, len)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_error(offset, len, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_request(self, offset, len)?;
        if self.read_only {
            return Err(LunError::ReadOnly {
                lun: self.name.clone(),
            });
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_error(offset, len, e))
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io_error(0, 0, e))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
