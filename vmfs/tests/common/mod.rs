//! Helpers shared by the vmfs integration tests: datastores in sparse temporary files.
#![allow(clippy::unwrap_used, dead_code)]

use std::sync::Arc;

use lun::Lun;
use vmfs::{Creds, Datastore, FormatOptions, OpenOptions};

pub struct TestDs {
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
}

impl TestDs {
    /// A freshly formatted datastore of `size` bytes in a sparse file.
    pub fn new(size: u64) -> TestDs {
        Self::with(
            size,
            FormatOptions {
                label: "test".into(),
                ..Default::default()
            },
        )
    }

    pub fn with(size: u64, options: FormatOptions) -> TestDs {
        Self::in_dir(tempfile::tempdir().unwrap(), size, options)
    }

    /// On tmpfs when there is one: tests that flush thousands of times stay fast.
    pub fn in_memory(size: u64, options: FormatOptions) -> TestDs {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        Self::in_dir(dir, size, options)
    }

    fn in_dir(dir: tempfile::TempDir, size: u64, options: FormatOptions) -> TestDs {
        let path = dir.path().join("ds.vmfs");
        let lun = lun::open(
            path.to_str().unwrap(),
            &lun::OpenOptions {
                create_size: Some(size),
                ..Default::default()
            },
        )
        .unwrap();
        vmfs::format(lun, &options).unwrap();
        TestDs { dir, path }
    }

    pub fn lun(&self) -> Arc<dyn Lun> {
        lun::open(self.path.to_str().unwrap(), &lun::OpenOptions::default()).unwrap()
    }

    pub fn lun_ro(&self) -> Arc<dyn Lun> {
        lun::open(
            self.path.to_str().unwrap(),
            &lun::OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap()
    }

    pub fn open(&self) -> Datastore {
        Datastore::open(self.lun(), &host()).unwrap()
    }

    pub fn open_ro(&self) -> Datastore {
        Datastore::open(self.lun_ro(), &OpenOptions::read_only()).unwrap()
    }

    /// Runs fsck (check only) and panics with the findings unless clean.
    pub fn assert_clean(&self) {
        let report = vmfs::fsck(self.lun_ro(), &vmfs::FsckOptions::default()).unwrap();
        assert!(report.clean, "fsck found problems: {:#?}", report.findings);
    }
}

/// A fixed test host identity.
pub fn host() -> OpenOptions {
    OpenOptions {
        read_only: false,
        host_name: "test-host".into(),
        host_uuid: uuid_for("test-host"),
        keep_signature: false,
    }
}

pub fn uuid_for(name: &str) -> uuid::Uuid {
    let mut b = [0u8; 16];
    for (i, c) in name.bytes().enumerate() {
        b[i % 16] ^= c;
    }
    b[15] ^= 0x5a;
    uuid::Uuid::from_bytes(b)
}

pub fn creds() -> Creds {
    Creds {
        uid: 1000,
        gid: 1000,
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A host identity of its own, for tests that run several hosts on one datastore.
pub fn host_named(name: &str) -> OpenOptions {
    OpenOptions {
        read_only: false,
        host_name: name.into(),
        host_uuid: uuid_for(name),
        keep_signature: false,
    }
}

impl TestDs {
    /// A datastore for cluster tests: small, on tmpfs, with the given lock protocol and
    /// io_timeout.
    pub fn cluster(protocol: vmfs::LockProtocol, io_timeout_ms: u64) -> TestDs {
        TestDs::in_memory(
            128 << 20,
            FormatOptions {
                label: "cluster".into(),
                block_size: 64 << 10,
                max_files: Some(1024),
                journal_size: Some(1 << 20),
                lock_protocol: Some(protocol),
                io_timeout: Some(std::time::Duration::from_millis(io_timeout_ms)),
                ..Default::default()
            },
        )
    }

    /// A LUN handle of its own (as another host would have), hiding compare-and-write when
    /// the datastore uses Disk Paxos.
    pub fn host_lun(&self, protocol: vmfs::LockProtocol) -> Arc<dyn Lun> {
        match protocol {
            vmfs::LockProtocol::CompareAndWrite | vmfs::LockProtocol::HostLocal => self.lun(),
            vmfs::LockProtocol::DiskPaxos => Arc::new(NoCas(self.lun())),
        }
    }
}

/// A LUN without compare-and-write: only sector-atomic reads and writes, like NBD.
#[derive(Debug)]
pub struct NoCas(pub Arc<dyn Lun>);

impl Lun for NoCas {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        self.0.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        self.0.write_zeroes(offset, len)
    }
    fn submit(&self, batch: &mut [lun::IoRequest<'_>]) -> lun::Result<()> {
        self.0.submit(batch)
    }
}

/// A LUN that loses power right after a host commits a journal transaction: once armed, the
/// first flush after a journal transaction was written completes, and every write after it
/// is silently lost (the host believes it succeeded). Deterministic whatever thread (an
/// operation or the background committer) commits.
#[derive(Debug)]
pub struct CutAfterCommit {
    inner: Arc<dyn Lun>,
    journals: std::ops::Range<u64>,
    armed: std::sync::atomic::AtomicBool,
    journaled: std::sync::atomic::AtomicBool,
    cut: std::sync::atomic::AtomicBool,
}

impl CutAfterCommit {
    pub fn new(inner: Arc<dyn Lun>) -> CutAfterCommit {
        let sb = vmfs::read_superblock(&*inner).unwrap().0;
        let journals =
            sb.journal_offset..sb.journal_offset + u64::from(sb.host_slots) * sb.journal_size;
        CutAfterCommit {
            inner,
            journals,
            armed: Default::default(),
            journaled: Default::default(),
            cut: Default::default(),
        }
    }

    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lost(&self) -> bool {
        self.is_cut()
    }
}

impl Lun for CutAfterCommit {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        use std::sync::atomic::Ordering;
        if self.lost() {
            return Ok(());
        }
        self.inner.write_at(buf, offset)?;
        if self.armed.load(Ordering::SeqCst) && self.journals.contains(&offset) && buf.len() > 4096
        {
            self.journaled.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn flush(&self) -> lun::Result<()> {
        use std::sync::atomic::Ordering;
        if self.lost() {
            return Ok(());
        }
        self.inner.flush()?;
        if self.journaled.load(Ordering::SeqCst) {
            self.cut.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn supports_compare_and_write(&self) -> bool {
        self.inner.supports_compare_and_write()
    }
    fn compare_and_write_scope(&self) -> lun::CasScope {
        self.inner.compare_and_write_scope()
    }
    fn reach(&self) -> lun::Reach {
        self.inner.reach()
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> lun::Result<lun::CompareAndWrite> {
        if self.lost() {
            return Ok(lun::CompareAndWrite::Written);
        }
        self.inner.compare_and_write(expected, new, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        if self.lost() {
            return Ok(());
        }
        self.inner.write_zeroes(offset, len)
    }
    fn submit(&self, batch: &mut [lun::IoRequest<'_>]) -> lun::Result<()> {
        for r in batch.iter_mut() {
            match r {
                lun::IoRequest::Read { buf, offset } => self.inner.read_at(buf, *offset)?,
                lun::IoRequest::Write { buf, offset } => self.write_at(buf, *offset)?,
            }
        }
        Ok(())
    }
}
