//! Shared test fixtures: real files as LUNs, and a power cut that hits the source and the
//! pool at the same instant.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lun::fault::{CrashMode, FaultLun};
use lun::{FileLun, Lun};

pub const S: u64 = 512;

pub struct Files {
    pub dir: tempfile::TempDir,
    pub source: PathBuf,
    pub pool: PathBuf,
}

/// A source and a pool file of the given sizes in a new directory.
pub fn files(source_size: u64, pool_size: u64) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let pool = snapshot::pool_beside(&source);
    FileLun::create(&source, source_size).unwrap();
    FileLun::create(&pool, pool_size).unwrap();
    Files { dir, source, pool }
}

pub fn open(path: &Path) -> Arc<dyn Lun> {
    Arc::new(FileLun::open(path, false).unwrap())
}

pub fn read_all(lun: &dyn Lun) -> Vec<u8> {
    let mut buf = vec![0u8; lun.size() as usize];
    lun.read_at(&mut buf, 0).unwrap();
    buf
}

/// The power supply both LUNs share: after `left` more writes (counted over both) the
/// next one is cut, torn if asked, and every write since each LUN's last flush is lost
/// (in `CrashMode::DropUnflushed`).
pub struct Machine {
    left: Mutex<Option<u64>>,
    writes: Mutex<u64>,
    crashed: AtomicBool,
    faults: Mutex<Vec<Arc<FaultLun>>>,
    tear: bool,
    /// The write the cut caught: (LUN name, offset, length). Its bytes are undefined.
    cut: Mutex<Option<(String, u64, u64)>>,
}

impl Machine {
    pub fn new(tear: bool) -> Arc<Machine> {
        Arc::new(Machine {
            left: Mutex::new(None),
            writes: Mutex::new(0),
            crashed: AtomicBool::new(false),
            faults: Mutex::new(Vec::new()),
            tear,
            cut: Mutex::new(None),
        })
    }

    /// Wraps a file in a fault LUN powered by this machine; its name is the file's, so the
    /// pool recognises the bare file as the same source after the crash.
    pub fn lun(self: &Arc<Machine>, path: &Path, mode: CrashMode) -> Arc<dyn Lun> {
        let fault = Arc::new(FaultLun::new(open(path)));
        fault.set_crash_mode(mode);
        fault.tear_writes(self.tear);
        self.faults.lock().unwrap().push(fault.clone());
        Arc::new(PowerLun {
            name: fault.inner().name().to_string(),
            fault,
            machine: self.clone(),
        })
    }

    pub fn crash_after(&self, writes: u64) {
        *self.left.lock().unwrap() = Some(writes);
    }

    pub fn writes(&self) -> u64 {
        *self.writes.lock().unwrap()
    }

    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// The byte range of `lun` that the write caught by the cut may have torn.
    pub fn torn_range(&self, lun: &str) -> Option<std::ops::Range<usize>> {
        let cut = self.cut.lock().unwrap();
        let (name, offset, len) = cut.as_ref()?;
        (name == lun && self.tear).then(|| *offset as usize..(*offset + *len) as usize)
    }

    /// Counts one write; true when it is the one the power cut catches.
    fn tick(&self, me: &FaultLun, offset: u64, len: u64) -> bool {
        *self.writes.lock().unwrap() += 1;
        let mut left = self.left.lock().unwrap();
        match *left {
            Some(0) => {
                *left = None;
                self.crashed.store(true, Ordering::SeqCst);
                *self.cut.lock().unwrap() = Some((me.inner().name().to_string(), offset, len));
                for f in self.faults.lock().unwrap().iter() {
                    if std::ptr::eq(f.as_ref(), me) {
                        f.crash_after_writes(0);
                    } else {
                        f.crash().unwrap();
                    }
                }
                true
            }
            Some(n) => {
                *left = Some(n - 1);
                false
            }
            None => false,
        }
    }
}

#[derive(Debug)]
struct PowerLun {
    name: String,
    fault: Arc<FaultLun>,
    machine: Arc<Machine>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Machine")
    }
}

impl Lun for PowerLun {
    fn name(&self) -> &str {
        &self.name
    }
    fn sector_size(&self) -> u32 {
        self.fault.sector_size()
    }
    fn size(&self) -> u64 {
        self.fault.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.fault.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        lun::check_request(self, offset, buf.len() as u64)?;
        self.machine.tick(&self.fault, offset, buf.len() as u64);
        self.fault.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        lun::check_request(self, offset, len)?;
        self.machine.tick(&self.fault, offset, len);
        self.fault.write_zeroes(offset, len)
    }
    fn flush(&self) -> lun::Result<()> {
        self.fault.flush()
    }
}

/// `actual` equals `expected` except, possibly, inside `torn` (a write caught by the cut,
/// never acknowledged, whose bytes are undefined).
pub fn same_outside(actual: &[u8], expected: &[u8], torn: Option<std::ops::Range<usize>>) -> bool {
    match torn {
        None => actual == expected,
        Some(r) => {
            actual.len() == expected.len()
                && actual[..r.start] == expected[..r.start]
                && actual[r.end..] == expected[r.end..]
        }
    }
}
