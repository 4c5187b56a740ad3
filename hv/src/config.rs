//! What a VM is made of. Everything arrives as bytes or LUNs, never as host paths: the caller
//! reads the kernel and initrd from wherever the VM lives (a datastore), so `hv` never learns
//! about files.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lun::Lun;

use crate::net::{MacAddr, RateLimit, Tap};

/// The description of one VM, checked by [`crate::Vm::create`] before any guest code runs.
#[derive(Debug)]
pub struct VmConfig {
    /// Name used in logs and errors.
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// A bzImage, or an x86-64 ELF (booted through its PVH entry when it has one).
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    /// Kernel command line. `hv` appends the `virtio_mmio.device=` entries of the disks.
    pub cmdline: String,
    /// virtio-blk devices, in order: the first is /dev/vda in a Linux guest.
    pub disks: Vec<Disk>,
    /// virtio-net devices, in order after the disks: the first is eth0 in a Linux guest.
    pub nics: Vec<Nic>,
    /// Where the guest's serial port (COM1) goes.
    pub console: Console,
}

impl VmConfig {
    /// One vCPU, 128 MiB, no disks, console discarded.
    pub fn new(name: impl Into<String>, kernel: Vec<u8>) -> Self {
        VmConfig {
            name: name.into(),
            vcpus: 1,
            memory_bytes: 128 << 20,
            kernel,
            initrd: None,
            cmdline: String::new(),
            disks: Vec::new(),
            nics: Vec::new(),
            console: Console::Null,
        }
    }
}

/// A virtio-blk device backed by any LUN.
#[derive(Clone)]
pub struct Disk {
    pub lun: Arc<dyn Lun>,
    /// Offer the device read-only (VIRTIO_BLK_F_RO) and refuse writes even if the LUN takes them.
    pub read_only: bool,
    /// The host's disk scheduler slot of this VM: each request waits for its turn there.
    pub clock: Option<Arc<sched::Clock>>,
    /// What the guest reads with GET_ID (`/sys/block/vda/serial`, `/dev/disk/by-id/virtio-…`):
    /// at most [`SERIAL_BYTES`] bytes. `None` gives `vapp-diskN`, which names only the slot.
    pub serial: Option<String>,
    /// Offer discard (VIRTIO_BLK_F_DISCARD) and pass each range of whole LUN sectors the guest
    /// discards to this (a device's BLKDISCARD, a punched hole). `None` offers none: where
    /// the disk cannot give space back, discarding would mean writing zeroes.
    pub discard: Option<Discard>,
}

/// Discards `len` bytes at `offset`, both multiples of the LUN's sector size; the range may
/// read back as anything afterwards.
pub type Discard = Arc<dyn Fn(u64, u64) -> Result<(), DiscardError> + Send + Sync>;
pub type DiscardError = Box<dyn std::error::Error + Send + Sync>;

/// The longest serial a virtio-blk device can report (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_BYTES: usize = 20;

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("lun", &self.lun.name())
            .field("read_only", &self.read_only)
            .field("scheduled", &self.clock.is_some())
            .field("serial", &self.serial)
            .field("discard", &self.discard.is_some())
            .finish()
    }
}

impl Disk {
    pub fn new(lun: Arc<dyn Lun>) -> Self {
        Disk {
            lun,
            read_only: false,
            clock: None,
            serial: None,
            discard: None,
        }
    }

    pub fn read_only(lun: Arc<dyn Lun>) -> Self {
        Disk {
            lun,
            read_only: true,
            clock: None,
            serial: None,
            discard: None,
        }
    }
}

/// A virtio-net device on a tap the caller created (and attached to whatever switch it
/// wants): the VM owns the tap from here, so the interface goes when the VM does.
pub struct Nic {
    pub tap: Tap,
    pub mac: MacAddr,
    /// Limits on what the guest receives.
    pub rx: NicLimits,
    /// Limits on what the guest sends.
    pub tx: NicLimits,
    /// The host's network scheduler slot of this VM, shared by all its NICs: every
    /// transmitted frame also waits for the VM-wide limit and its share of the host's capacity.
    pub clock: Option<Arc<sched::Clock>>,
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("tap", &self.tap)
            .field("mac", &self.mac)
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .field("scheduled", &self.clock.is_some())
            .finish()
    }
}

impl Nic {
    pub fn new(tap: Tap, mac: MacAddr) -> Nic {
        Nic {
            tap,
            mac,
            rx: NicLimits::default(),
            tx: NicLimits::default(),
            clock: None,
        }
    }
}

/// The token buckets of one direction of a NIC; None is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NicLimits {
    /// Bytes of Ethernet frames per second.
    pub bytes: Option<RateLimit>,
    pub packets: Option<RateLimit>,
}

/// The sink of the guest's serial console.
pub enum Console {
    /// Discard the output.
    Null,
    Stdout,
    /// Any writer, e.g. a log file.
    Writer(Box<dyn Write + Send>),
    /// An in-memory buffer the caller keeps a clone of.
    Buffer(ConsoleBuffer),
}

impl Console {
    pub(crate) fn into_writer(self) -> Box<dyn Write + Send> {
        match self {
            Console::Null => Box::new(io::sink()),
            Console::Stdout => Box::new(io::stdout()),
            Console::Writer(writer) => writer,
            Console::Buffer(buffer) => Box::new(buffer),
        }
    }
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Console::Null => f.write_str("Null"),
            Console::Stdout => f.write_str("Stdout"),
            Console::Writer(_) => f.write_str("Writer"),
            Console::Buffer(_) => f.write_str("Buffer"),
        }
    }
}

/// Console output kept in memory; clones share the same buffer.
#[derive(Clone, Default)]
pub struct ConsoleBuffer {
    inner: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

impl ConsoleBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything written so far, invalid UTF-8 replaced.
    pub fn contents(&self) -> String {
        let bytes = self.inner.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits until the output contains `needle`; false on timeout.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let needle = needle.as_bytes();
        if needle.is_empty() {
            return true;
        }
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.inner;
        let mut bytes = lock.lock().unwrap_or_else(PoisonError::into_inner);
        // The serial port writes byte by byte: only look at what arrived since the last wakeup.
        let mut searched = 0;
        loop {
            if bytes[searched..].windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            searched = bytes.len().saturating_sub(needle.len() - 1);
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            bytes = changed
                .wait_timeout(bytes, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Write for ConsoleBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (lock, changed) = &*self.inner;
        lock.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        changed.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for ConsoleBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.inner.0.lock().map(|b| b.len()).unwrap_or(0);
        write!(f, "ConsoleBuffer({len} bytes)")
    }
}
