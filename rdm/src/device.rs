//! Finding a mapping's LUN on this machine by identity, and the LUN an open mapping is.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lun::{CasScope, CompareAndWrite, IoRequest, Lun, LunIdentity, Reach};
use vmfs::FileHandle;

use crate::error::{Error, Result};
use crate::mapping::Mapping;
use crate::{DeviceKind, Mode};

/// The LUN a mapping resolved to.
pub(crate) struct Found {
    pub path: String,
    pub lun: Arc<dyn Lun>,
}

/// Finds the mapping's LUN: the recorded path first, then (block devices) every device of
/// this machine with the same identity. Exactly one must claim it, with the size and
/// sector size recorded at creation. `write` opens it read-write.
pub(crate) fn resolve(mapping: &Mapping, write: bool) -> Result<Found> {
    let identity = mapping.lun_identity();
    let options = lun::OpenOptions {
        read_only: !write,
        direct: mapping.mode == Mode::Physical,
        ..Default::default()
    };
    let missing = |looked: String| Error::DeviceMissing {
        path: mapping.path.clone(),
        expected: identity.to_string(),
        looked,
    };
    let found = match mapping.device {
        DeviceKind::Nbd => {
            let lun =
                lun::open(&mapping.recorded_path, &options).map_err(|e| missing(e.to_string()))?;
            Found {
                path: mapping.recorded_path.clone(),
                lun,
            }
        }
        DeviceKind::File => {
            let path = Path::new(&mapping.recorded_path);
            let is_it = std::fs::metadata(path).is_ok_and(|md| {
                md.is_file()
                    && identity.is_exactly(&LunIdentity::File {
                        dev: md.dev(),
                        ino: md.ino(),
                        offset: 0,
                        path: String::new(),
                    })
            });
            if !is_it {
                return Err(missing(mapping.recorded_path.clone()));
            }
            Found {
                path: mapping.recorded_path.clone(),
                lun: lun::open(&mapping.recorded_path, &options)?,
            }
        }
        DeviceKind::BlockDevice => {
            let mut candidates = vec![PathBuf::from(&mapping.recorded_path)];
            candidates.extend(identity.block_devices());
            let mut claiming: Vec<(PathBuf, u64)> = Vec::new();
            for candidate in &candidates {
                let Ok(md) = std::fs::metadata(candidate) else {
                    continue;
                };
                if !md.file_type().is_block_device()
                    || claiming.iter().any(|(_, rdev)| *rdev == md.rdev())
                {
                    continue;
                }
                let probe = lun::open(
                    &candidate.to_string_lossy(),
                    &lun::OpenOptions {
                        read_only: true,
                        ..Default::default()
                    },
                );
                if probe
                    .ok()
                    .and_then(|l| l.identity())
                    .is_some_and(|i| identity.is_exactly(&i))
                {
                    claiming.push((candidate.clone(), md.rdev()));
                }
            }
            match claiming.as_slice() {
                [] => {
                    return Err(missing(format!(
                        "{} and every block device of this machine",
                        mapping.recorded_path
                    )));
                }
                [(path, _)] => {
                    let path = path.to_string_lossy().into_owned();
                    let lun = lun::open(&path, &options)?;
                    Found { path, lun }
                }
                many => {
                    return Err(Error::Ambiguous {
                        path: mapping.path.clone(),
                        expected: identity.to_string(),
                        found: many
                            .iter()
                            .map(|(p, _)| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
        }
    };
    if found.lun.sector_size() != mapping.sector_size {
        return Err(Error::SectorSizeChanged {
            path: mapping.path.clone(),
            expected: identity.to_string(),
            device: found.path,
            recorded: mapping.sector_size,
            actual: found.lun.sector_size(),
        });
    }
    if found.lun.size() != mapping.size {
        return Err(Error::SizeChanged {
            path: mapping.path.clone(),
            expected: identity.to_string(),
            device: found.path,
            recorded: mapping.size,
            actual: found.lun.size(),
        });
    }
    if found.path != mapping.recorded_path {
        tracing::info!(mapping = %mapping.path, recorded = %mapping.recorded_path, found = %found.path, "mapped LUN found at another path");
    }
    Ok(found)
}

/// An open raw device mapping: the mapped LUN, reached by identity, with the mapping file's
/// lock held until it is dropped.
pub struct RdmLun {
    name: String,
    mapping: Mapping,
    device_path: String,
    lun: Arc<dyn Lun>,
    serial: Option<String>,
    // Held for its lock: dropping it releases the mapping for the next opener.
    _handle: FileHandle,
}

impl std::fmt::Debug for RdmLun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmLun")
            .field("name", &self.name)
            .field("device", &self.device_path)
            .field("mode", &self.mapping.mode)
            .finish()
    }
}

impl RdmLun {
    pub(crate) fn new(name: String, mapping: Mapping, found: Found, handle: FileHandle) -> RdmLun {
        let serial = lun::device_serial(Path::new(&found.path)).or_else(|| mapping.serial.clone());
        RdmLun {
            name,
            device_path: found.path,
            lun: found.lun,
            serial,
            mapping,
            _handle: handle,
        }
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    pub fn mode(&self) -> Mode {
        self.mapping.mode
    }

    /// Where the LUN was found when opened (a device path, a file, an NBD URI).
    pub fn device_path(&self) -> &str {
        &self.device_path
    }

    /// The device's own serial number, for a guest's GET_ID in physical mode; `None` when
    /// the device has none (a loop device, a file, NBD).
    pub fn serial(&self) -> Option<&str> {
        self.serial.as_deref()
    }

    /// Passes a discard of `len` bytes at `offset` to the device (BLKDISCARD on a block
    /// device, a punched hole in a file); the range may then read back as anything the
    /// device chooses, usually zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        lun::check_request(self, offset, len)?;
        if self.lun.is_read_only() {
            return Err(lun::LunError::ReadOnly {
                lun: self.name.clone(),
            }
            .into());
        }
        let unsupported = |reason: String| Error::Unsupported {
            path: self.mapping.path.clone(),
            what: "discard",
            device: self.device_path.clone(),
            reason,
        };
        match self.mapping.device {
            DeviceKind::BlockDevice => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.device_path)
                    .map_err(|e| unsupported(e.to_string()))?;
                let range = [offset, len];
                // BLKDISCARD = _IO(0x12, 119)
                const BLKDISCARD: libc::c_ulong = 0x1277;
                // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
                if rc != 0 {
                    return Err(unsupported(std::io::Error::last_os_error().to_string()));
                }
                Ok(())
            }
            DeviceKind::File => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.device_path)
                    .map_err(|e| unsupported(e.to_string()))?;
                // SAFETY: fallocate on an owned descriptor; no memory is passed.
                let rc = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if rc != 0 {
                    return Err(unsupported(std::io::Error::last_os_error().to_string()));
                }
                Ok(())
            }
            DeviceKind::Nbd => Err(unsupported("NBD trim is not wired up yet".into())),
        }
    }
}

impl Lun for RdmLun {
    fn name(&self) -> &str {
        &self.name
    }
    fn sector_size(&self) -> u32 {
        self.lun.sector_size()
    }
    fn size(&self) -> u64 {
        self.lun.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.lun.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.lun.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        self.lun.flush()
    }
    fn is_read_only(&self) -> bool {
        self.lun.is_read_only()
    }
    fn supports_compare_and_write(&self) -> bool {
        self.lun.supports_compare_and_write()
    }
    fn compare_and_write_scope(&self) -> CasScope {
        self.lun.compare_and_write_scope()
    }
    fn reach(&self) -> Reach {
        self.lun.reach()
    }
    fn identity(&self) -> Option<LunIdentity> {
        self.lun.identity()
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> lun::Result<CompareAndWrite> {
        self.lun.compare_and_write(expected, new, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        self.lun.write_zeroes(offset, len)
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> lun::Result<bool> {
        self.lun.may_hold_data(offset, len)
    }
    fn submit(&self, batch: &mut [IoRequest<'_>]) -> lun::Result<()> {
        self.lun.submit(batch)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::RdmRecord;

    fn mapping_of(file: &Path, size: u64) -> Mapping {
        let md = std::fs::metadata(file).unwrap();
        let identity = LunIdentity::File {
            dev: md.dev(),
            ino: md.ino(),
            offset: 0,
            path: file.to_string_lossy().into_owned(),
        };
        Mapping::new(
            "/vms/a/f.rdm",
            7,
            RdmRecord {
                mode: Mode::Virtual,
                device: DeviceKind::File,
                sector_size: 512,
                size,
                created_ns: 0,
                datastore_uuid: uuid::Uuid::nil(),
                identity: identity.serialise(),
                serial: String::new(),
                spec: file.to_string_lossy().into_owned(),
            },
        )
    }

    #[test]
    fn a_file_is_found_at_its_path_only_while_it_is_the_same_file_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lun.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let mapping = mapping_of(&file, 1 << 20);
        let found = resolve(&mapping, false).unwrap();
        assert_eq!(found.path, file.to_string_lossy());
        assert_eq!(found.lun.size(), 1 << 20);

        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let e = resolve(&mapping, false).err().unwrap();
        assert!(
            matches!(e, Error::SizeChanged { recorded, actual, .. } if recorded == 1 << 20 && actual == 2 << 20),
            "{e}"
        );

        // Another file put in its place is not the mapped LUN.
        let other = dir.path().join("other.img");
        std::fs::File::create(&other)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        std::fs::rename(&other, &file).unwrap();
        let e = resolve(&mapping, false).err().unwrap();
        assert!(matches!(e, Error::DeviceMissing { .. }), "{e}");
        assert!(
            e.to_string().starts_with("/vms/a/f.rdm: mapped LUN file"),
            "{e}"
        );
    }
}
