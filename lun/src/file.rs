//! A LUN on a regular file (created sparse) or a raw block device.
//!
//! Both are one open file descriptor driven by an I/O engine (io_uring or pread/pwrite).
//! They differ in where geometry comes from (a file gets the sector size it is opened with,
//! a device reports its own through ioctls), in how ranges are zeroed, and in caching: a
//! block device is always opened O_DIRECT, because a LUN shared between hosts must never be
//! served from one host's page cache; a file may be, on request.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

use nix::fcntl::{FallocateFlags, fallocate};

use crate::direct::{self, AlignedBuf, BouncePool, DioAlignment};
use crate::engine::{Engine, Failure, IoEngine};
use crate::range_lock::RangeLock;
use crate::reach::{self, CasScope, DeviceKind, Reach};
use crate::scsi;
use crate::{CompareAndWrite, IoRequest, Lun, LunError, OpenOptions, Result, check_request, lock};

/// Largest logical sector size accepted.
const MAX_SECTOR_SIZE: u32 = 64 * 1024;
/// Bounced O_DIRECT requests are cut into pieces of this size. Other requests go to the
/// kernel whole: cutting a large request into pieces transferred in parallel was measured
/// to gain nothing buffered and to lose 20-30 % with O_DIRECT, where the kernel already
/// spreads one large request over the device queue.
const PIECE: usize = BouncePool::CHUNK;
/// Most bounce-buffer bytes one call holds at once, however large its requests.
const BOUNCE_WINDOW: usize = 8 * PIECE;

/// What a [`FileLun`] was opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    RegularFile,
    BlockDevice,
}

#[derive(Debug)]
struct Direct {
    align: DioAlignment,
    bounce: BouncePool,
}

/// The device's own COMPARE AND WRITE, as probed at open.
#[derive(Debug, Clone, Copy)]
struct Ats {
    /// The device's logical block size: COMPARE AND WRITE counts these.
    block_size: u32,
    /// Where the opened partition starts on its disk, in bytes.
    start: u64,
}

/// A LUN on a regular file or a block device. See the module docs.
///
/// [`Lun::compare_and_write`] is the device's own SCSI COMPARE AND WRITE where a SCSI
/// device offers it, atomic among every machine that reaches the device. Everywhere else
/// it is atomic among vapp processes on this machine only: it holds an OFD byte-range lock
/// over the sectors while it reads, compares and writes, which other machines cannot see,
/// and which plain writes do not take ([`Lun::compare_and_write_scope`] says which).
#[derive(Debug)]
pub struct FileLun {
    name: String,
    file: File,
    backing: Backing,
    size: u64,
    sector_size: u32,
    read_only: bool,
    direct: Option<Direct>,
    engine: Engine,
    reach: Reach,
    identity: Option<crate::LunIdentity>,
    ats: Option<Ats>,
    /// OFD locks exclude other open files, not other threads using this one.
    cas: Mutex<()>,
}

impl FileLun {
    /// Opens an existing file or block device with default options.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        FileLun::open_with(
            path,
            &OpenOptions {
                read_only,
                ..OpenOptions::default()
            },
        )
    }

    /// Creates a sparse file of `size` bytes with default options, refusing to replace an
    /// existing one.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        FileLun::create_with(path, size, &OpenOptions::default())
    }

    /// Creates a sparse file of `size` bytes (a whole number of sectors), refusing to
    /// replace an existing one, and opens it with `options`. If opening fails the new file
    /// is removed again.
    pub fn create_with(path: &Path, size: u64, options: &OpenOptions) -> Result<Self> {
        let name = format!("file:{}", path.display());
        let open_error = |reason: String| LunError::Open {
            lun: name.clone(),
            reason,
        };
        if options.read_only {
            return Err(open_error("cannot create a read-only LUN".into()));
        }
        let sector = requested_sector_size(options.sector_size).map_err(open_error)?;
        if size == 0 || size % u64::from(sector) != 0 {
            return Err(open_error(format!(
                "size {size} is not a positive multiple of the {sector}-byte sector"
            )));
        }
        let file = FsOpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| open_error(format!("cannot create: {e}")))?;
        if let Err(e) = file.set_len(size) {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(open_error(format!(
                "cannot set the size to {size} bytes: {e}"
            )));
        }
        drop(file);
        FileLun::open_with(path, options).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }

    /// Opens an existing regular file or block device.
    pub fn open_with(path: &Path, options: &OpenOptions) -> Result<Self> {
        let metadata = std::fs::metadata(path).map_err(|e| LunError::Open {
            lun: format!("file:{}", path.display()),
            reason: e.to_string(),
        })?;
        let backing = if metadata.file_type().is_block_device() {
            Backing::BlockDevice
        } else if metadata.is_file() {
            Backing::RegularFile
        } else {
            return Err(LunError::Open {
                lun: path.display().to_string(),
                reason: "not a regular file or a block device".into(),
            });
        };
        let name = match backing {
            Backing::RegularFile => format!("file:{}", path.display()),
            Backing::BlockDevice => format!("blockdev:{}", path.display()),
        };
        let open_error = |reason: String| LunError::Open {
            lun: name.clone(),
            reason,
        };
        let direct = options.direct || backing == Backing::BlockDevice;

        let file = FsOpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) if direct => open_error(
                    "the file system does not support direct I/O (O_DIRECT); open it without direct I/O"
                        .into(),
                ),
                _ => open_error(e.to_string()),
            })?;

        let (raw_size, device_sector) = match backing {
            Backing::RegularFile => (metadata.len(), None),
            Backing::BlockDevice => {
                let size = crate::blockdev::size(&file)
                    .map_err(|e| open_error(format!("BLKGETSIZE64 failed: {e}")))?;
                let sector = crate::blockdev::logical_sector_size(&file)
                    .map_err(|e| open_error(format!("BLKSSZGET failed: {e}")))?;
                (size, Some(sector))
            }
        };

        let align = if direct {
            Some(dio_alignment(&file, &metadata, device_sector).map_err(open_error)?)
        } else {
            None
        };
        let sector_size =
            choose_sector_size(options.sector_size, device_sector, align).map_err(open_error)?;
        let size = raw_size - raw_size % u64::from(sector_size);
        if size != raw_size {
            tracing::warn!(lun = %name, raw_size, size, "LUN length is not a whole number of sectors; the tail is unused");
        }
        let engine = Engine::select(options.engine).map_err(open_error)?;
        let reach = reach::of_file(&file, &metadata, backing == Backing::BlockDevice);
        let identity = crate::identity::of_file(&file, &metadata, path, reach);
        let ats = match reach {
            Reach::BlockDevice(DeviceKind::Scsi) => {
                probe_ats(&name, &file, &metadata, device_sector, sector_size)
            }
            Reach::BlockDevice(DeviceKind::Nvme) => {
                tracing::info!(lun = %name, "NVMe fused compare and write is not used: the kernel's NVMe passthrough refuses fused commands");
                None
            }
            _ => None,
        };
        let primitive = match (ats, backing) {
            (Some(_), _) => "SCSI COMPARE AND WRITE (atomic across machines)",
            (None, Backing::RegularFile) if reach == Reach::LocalFile => {
                "OFD byte-range lock (this machine only; nothing else reaches a local file)"
            }
            (None, _) => "OFD byte-range lock (atomic on this machine only)",
        };
        tracing::info!(lun = %name, reach = %reach, compare_and_write = primitive, "LUN compare-and-write primitive");
        tracing::debug!(
            lun = %name,
            size,
            sector_size,
            direct,
            engine = %engine.kind(),
            read_only = options.read_only,
            "opened LUN"
        );
        Ok(FileLun {
            name,
            file,
            backing,
            size,
            sector_size,
            read_only: options.read_only,
            direct: align.map(|align| Direct {
                align,
                bounce: BouncePool::new(align.memory.max(AlignedBuf::PAGE)),
            }),
            engine,
            reach,
            identity,
            ats,
            cas: Mutex::new(()),
        })
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The engine actually in use (never `Auto`).
    pub fn io_engine(&self) -> IoEngine {
        self.engine.kind()
    }

    /// True when I/O bypasses the page cache (O_DIRECT).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Buffers at this address alignment avoid a bounce copy (1 when any address will do).
    pub fn memory_alignment(&self) -> usize {
        self.direct.as_ref().map_or(1, |d| d.align.memory)
    }

    fn io_error(&self, failure: Failure) -> LunError {
        LunError::Io {
            lun: self.name.clone(),
            offset: failure.offset,
            len: failure.len,
            source: failure.error,
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(LunError::ReadOnly {
                lun: self.name.clone(),
            });
        }
        Ok(())
    }

    fn check_batch(&self, batch: &[IoRequest<'_>]) -> Result<()> {
        for request in batch {
            if matches!(request, IoRequest::Write { .. }) {
                self.check_writable()?;
            }
            check_request(self, request.offset(), request.buf().len() as u64)?;
        }
        Ok(())
    }

    /// Runs a validated batch, through bounce buffers when O_DIRECT cannot use the
    /// caller's memory.
    fn transfer(&self, batch: &mut [IoRequest<'_>]) -> Result<()> {
        match &self.direct {
            Some(direct) if batch.iter().any(|r| !direct.align.is_aligned(r.buf())) => {
                self.transfer_bounced(direct, &mut split(batch))
            }
            _ => self
                .engine
                .run(&self.file, batch)
                .map_err(|f| self.io_error(f)),
        }
    }

    /// Transfers pieces (each at most one bounce buffer long), copying those whose memory
    /// O_DIRECT cannot use through aligned buffers, a window of them at a time.
    fn transfer_bounced(&self, direct: &Direct, pieces: &mut [IoRequest<'_>]) -> Result<()> {
        let mut start = 0;
        while start < pieces.len() {
            let mut end = start;
            let mut bounced = 0;
            while end < pieces.len() && bounced < BOUNCE_WINDOW {
                let buf = pieces[end].buf();
                if !direct.align.is_aligned(buf) {
                    bounced += buf.len();
                }
                end += 1;
            }
            let window = &mut pieces[start..end];
            let mut bounces: Vec<Option<AlignedBuf>> = window
                .iter()
                .map(|piece| {
                    let buf = piece.buf();
                    (!direct.align.is_aligned(buf)).then(|| {
                        let mut bounce = direct.bounce.take(buf.len());
                        if matches!(piece, IoRequest::Write { .. }) {
                            bounce.copy_from_slice(buf);
                        }
                        bounce
                    })
                })
                .collect();
            let mut requests: Vec<IoRequest<'_>> = window
                .iter_mut()
                .zip(bounces.iter_mut())
                .map(|(piece, bounce)| match (piece, bounce) {
                    (IoRequest::Read { offset, .. }, Some(bounce)) => IoRequest::Read {
                        buf: &mut bounce[..],
                        offset: *offset,
                    },
                    (IoRequest::Read { buf, offset }, None) => IoRequest::Read {
                        buf: &mut buf[..],
                        offset: *offset,
                    },
                    (IoRequest::Write { offset, .. }, Some(bounce)) => IoRequest::Write {
                        buf: &bounce[..],
                        offset: *offset,
                    },
                    (IoRequest::Write { buf, offset }, None) => IoRequest::Write {
                        buf,
                        offset: *offset,
                    },
                })
                .collect();
            let outcome = self.engine.run(&self.file, &mut requests);
            drop(requests);
            for (piece, bounce) in window.iter_mut().zip(bounces) {
                if let Some(bounce) = bounce {
                    if let (Ok(()), IoRequest::Read { buf, .. }) = (&outcome, piece) {
                        buf.copy_from_slice(&bounce);
                    }
                    direct.bounce.give_back(bounce);
                }
            }
            outcome.map_err(|f| self.io_error(f))?;
            start = end;
        }
        Ok(())
    }

    /// COMPARE AND WRITE through SG_IO: the device compares and writes atomically for every
    /// machine; on a miscompare the current contents are read back for the caller.
    fn ats_compare_and_write(
        &self,
        ats: Ats,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> Result<CompareAndWrite> {
        let len = new.len() as u64;
        let io_error = |error: io::Error| self.io_error(Failure { offset, len, error });
        let blocks = u8::try_from(len / u64::from(ats.block_size)).map_err(|_| {
            io_error(io::Error::other(
                "compare-and-write longer than 255 device blocks",
            ))
        })?;
        let lba = (ats.start + offset) / u64::from(ats.block_size);
        let mut data = Vec::with_capacity(2 * new.len());
        data.extend_from_slice(expected);
        data.extend_from_slice(new);
        let cdb = scsi::compare_and_write_cdb(lba, blocks);
        match scsi::sg_io(&self.file, &cdb, scsi::Data::ToDevice(&data), 30_000)
            .map_err(io_error)?
        {
            scsi::Outcome::Good => Ok(CompareAndWrite::Written),
            scsi::Outcome::CheckCondition(sense) if sense.is_miscompare() => {
                let mut current = vec![0u8; new.len()];
                self.read_at(&mut current, offset)?;
                Ok(CompareAndWrite::Miscompare(current))
            }
            scsi::Outcome::CheckCondition(sense) => Err(io_error(io::Error::other(format!(
                "COMPARE AND WRITE failed: sense key {:#x}, ASC/ASCQ {:#04x}/{:#04x}",
                sense.key, sense.asc, sense.ascq
            )))),
        }
    }

    /// Writes zero buffers: the fallback when the kernel cannot zero a range for us.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = AlignedBuf::new(PIECE.min(len as usize));
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.transfer(&mut [IoRequest::Write {
                buf: &zeroes[..n],
                offset: offset + done,
            }])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Whether the SCSI device behind `file` has a COMPARE AND WRITE covering one LUN sector.
fn probe_ats(
    name: &str,
    file: &File,
    metadata: &std::fs::Metadata,
    device_sector: Option<u32>,
    sector_size: u32,
) -> Option<Ats> {
    let block_size = device_sector?;
    let Some(max_blocks) = scsi::probe(file) else {
        tracing::info!(lun = %name, "the SCSI device reports no COMPARE AND WRITE");
        return None;
    };
    if u64::from(max_blocks) * u64::from(block_size) < u64::from(sector_size) {
        tracing::info!(lun = %name, max_blocks, block_size, sector_size, "the device's COMPARE AND WRITE is shorter than one LUN sector; not used");
        return None;
    }
    let start = reach::partition_start(metadata)?;
    Some(Ats { block_size, start })
}

/// Cuts requests longer than [`PIECE`] into pieces of that size.
fn split<'a>(batch: &'a mut [IoRequest<'_>]) -> Vec<IoRequest<'a>> {
    let mut pieces = Vec::with_capacity(batch.len());
    for request in batch.iter_mut() {
        match request {
            IoRequest::Read { buf, offset } => {
                let base = *offset;
                for (i, chunk) in buf.chunks_mut(PIECE).enumerate() {
                    pieces.push(IoRequest::Read {
                        buf: chunk,
                        offset: base + (i * PIECE) as u64,
                    });
                }
            }
            IoRequest::Write { buf, offset } => {
                for (i, chunk) in buf.chunks(PIECE).enumerate() {
                    pieces.push(IoRequest::Write {
                        buf: chunk,
                        offset: *offset + (i * PIECE) as u64,
                    });
                }
            }
        }
    }
    pieces
}

fn requested_sector_size(requested: Option<u32>) -> std::result::Result<u32, String> {
    let size = requested.unwrap_or(512);
    if !size.is_power_of_two() || !(512..=MAX_SECTOR_SIZE).contains(&size) {
        return Err(format!(
            "sector size {size} is not a power of two between 512 and {MAX_SECTOR_SIZE}"
        ));
    }
    Ok(size)
}

/// The LUN's sector size: the one asked for, else the device's logical sector size, else
/// 512; never smaller than what the device or O_DIRECT can address.
fn choose_sector_size(
    requested: Option<u32>,
    device_sector: Option<u32>,
    align: Option<DioAlignment>,
) -> std::result::Result<u32, String> {
    let floor = device_sector
        .unwrap_or(512)
        .max(align.map_or(512, |a| a.offset));
    match requested {
        None => Ok(floor.max(512)),
        Some(_) => {
            let size = requested_sector_size(requested)?;
            if size % floor != 0 {
                let why = match device_sector {
                    Some(sector) if size % sector != 0 => {
                        format!("the device's logical sector size is {sector} bytes")
                    }
                    _ => format!("direct I/O here needs {floor}-byte alignment"),
                };
                return Err(format!("sector size {size} cannot be used: {why}"));
            }
            Ok(size)
        }
    }
}

/// What O_DIRECT needs on this file: the kernel's statx answer when it gives one, else the
/// logical block size of the device (the file's own, or the one holding the file).
fn dio_alignment(
    file: &File,
    metadata: &std::fs::Metadata,
    device_sector: Option<u32>,
) -> std::result::Result<DioAlignment, String> {
    if let Some(align) = direct::statx_alignment(file)? {
        return Ok(align);
    }
    let block = device_sector
        .or_else(|| {
            let dev = metadata.dev();
            direct::sysfs_logical_block_size(
                nix::sys::stat::major(dev) as u32,
                nix::sys::stat::minor(dev) as u32,
            )
        })
        .unwrap_or(512);
    Ok(DioAlignment {
        memory: block as usize,
        offset: block,
    })
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
        let mut batch = [IoRequest::Read { buf, offset }];
        self.check_batch(&batch)?;
        self.transfer(&mut batch)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut batch = [IoRequest::Write { buf, offset }];
        self.check_batch(&batch)?;
        self.transfer(&mut batch)
    }

    fn submit(&self, batch: &mut [IoRequest<'_>]) -> Result<()> {
        self.check_batch(batch)?;
        self.transfer(batch)
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|error| {
            self.io_error(Failure {
                offset: 0,
                len: 0,
                error,
            })
        })
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn supports_compare_and_write(&self) -> bool {
        !self.read_only
    }

    /// What a writable open of this path would use, so a read-only open can tell.
    fn compare_and_write_scope(&self) -> CasScope {
        match self.ats {
            Some(_) => CasScope::AllMachines("SCSI COMPARE AND WRITE"),
            None => CasScope::ThisMachine,
        }
    }

    fn reach(&self) -> Reach {
        self.reach
    }

    fn identity(&self) -> Option<crate::LunIdentity> {
        self.identity.clone()
    }

    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> Result<CompareAndWrite> {
        self.check_writable()?;
        let len = new.len() as u64;
        if expected.len() != new.len() {
            return Err(self.io_error(Failure {
                offset,
                len,
                error: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "compare-and-write: expected data is {} bytes but new data is {len}",
                        expected.len()
                    ),
                ),
            }));
        }
        check_request(self, offset, len)?;
        if let Some(ats) = self.ats {
            return self.ats_compare_and_write(ats, expected, new, offset);
        }
        let _threads = lock(&self.cas);
        let _processes = RangeLock::acquire(&self.file, offset, len)
            .map_err(|error| self.io_error(Failure { offset, len, error }))?;
        let mut current = vec![0u8; new.len()];
        self.read_at(&mut current, offset)?;
        if current != expected {
            return Ok(CompareAndWrite::Miscompare(current));
        }
        self.write_at(new, offset)?;
        Ok(CompareAndWrite::Written)
    }

    /// Files get a hole punched (thin files stay thin), block devices BLKZEROOUT; where the
    /// kernel cannot do either, zeroes are written.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_request(self, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let io_error = |error: io::Error| self.io_error(Failure { offset, len, error });
        let unsupported = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS)
            )
        };
        match self.backing {
            Backing::BlockDevice => match crate::blockdev::zero_out(&self.file, offset, len) {
                Err(e) if unsupported(&e) => self.write_zero_buffers(offset, len),
                other => other.map_err(io_error),
            },
            Backing::RegularFile => {
                let (start, length) = match (i64::try_from(offset), i64::try_from(len)) {
                    (Ok(start), Ok(length)) => (start, length),
                    _ => return self.write_zero_buffers(offset, len),
                };
                for mode in [
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                ] {
                    match fallocate(&self.file, mode, start, length).map_err(io::Error::from) {
                        Ok(()) => return Ok(()),
                        Err(e) if unsupported(&e) => continue,
                        Err(e) => return Err(io_error(e)),
                    }
                }
                self.write_zero_buffers(offset, len)
            }
        }
    }

    /// A sparse file's holes, told by SEEK_DATA; a block device cannot tell.
    fn may_hold_data(&self, offset: u64, len: u64) -> Result<bool> {
        check_request(self, offset, len)?;
        if self.backing == Backing::BlockDevice || len == 0 {
            return Ok(len != 0);
        }
        let Ok(start) = i64::try_from(offset) else {
            return Ok(true);
        };
        match nix::unistd::lseek(&self.file, start, nix::unistd::Whence::SeekData) {
            Ok(data) => Ok((data as u64) < offset + len),
            // No data at or after `offset`.
            Err(nix::errno::Errno::ENXIO) => Ok(false),
            // A file system without SEEK_DATA support: assume data.
            Err(_) => Ok(true),
        }
    }
}
