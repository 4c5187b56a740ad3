//! Open files of the mount and the datastore locks behind them.
//!
//! The mount is one host of the cluster. Processes on this host share files with POSIX
//! semantics (any number of readers and writers), so their opens of one inode share one vmfs
//! handle, whose access mode is what the other hosts see:
//!
//! - while any local open writes, the host holds the file **exclusive**; a write open that
//!   cannot get it (another host holds the file) fails with EBUSY, naming the holder;
//! - while only local readers remain, the host holds it **read-only shared**, so no other
//!   host can take it exclusive under them;
//! - a reader of a file another host holds exclusive (a running VM's disk) reads without a
//!   lock, with direct I/O: that data changes under us, so nothing of it is cached.
//!
//! Changing between shared and exclusive means dropping one handle before taking the other
//! (vmfs refuses the two together). Dropping the last handle of an unlinked file frees it,
//! so a file that has no name left is never converted: it is reachable only through this
//! host's open descriptors, no other host can ask for it, and it keeps the handle it has
//! (`Orphan`) until the last local close. Unlinks and renames wait while a conversion checks
//! the link count and swaps handles, so a file cannot lose its last name in between.
//!
//! Conversions happen under the inode's write guard, which waits for I/O in flight on the
//! old handle; I/O runs under read guards, in parallel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use vmfs::{Access, Datastore, FileHandle};

/// How many inodes' "page cache still valid" versions are remembered.
const CACHED_VERSIONS_MAX: usize = 1 << 16;

/// The datastore lock this host holds on an inode.
enum Lock {
    /// Nobody on this host has the file open.
    Free,
    Shared(FileHandle),
    Exclusive(FileHandle),
    /// Unlinked while open here: the handle only keeps the file from being freed.
    Orphan {
        _pin: FileHandle,
    },
    /// Open for reading while another host holds it (or on a read-only datastore, where no
    /// locks exist).
    Unlocked,
}

impl Lock {
    fn is_held(&self) -> bool {
        matches!(
            self,
            Lock::Shared(_) | Lock::Exclusive(_) | Lock::Orphan { .. }
        )
    }
}

struct LockState {
    readers: u32,
    writers: u32,
    lock: Lock,
}

pub(crate) struct InodeLock {
    ino: u64,
    state: RwLock<LockState>,
}

/// What the kernel should do with its page cache for a new open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CachePolicy {
    /// The file is unchanged since this host last had it open under a lock: keep its pages.
    pub keep_cache: bool,
    /// Another host may write it right now: bypass the page cache.
    pub direct_io: bool,
}

struct Open {
    inode: Arc<InodeLock>,
    write: bool,
}

#[derive(Default)]
struct Table {
    inodes: HashMap<u64, Arc<InodeLock>>,
    opens: HashMap<u64, Open>,
    /// Inode generation and version when the last local open under a lock closed: if they
    /// are the same at the next open, nobody changed the file in between and the kernel's
    /// pages are valid.
    versions: HashMap<u64, (u64, u64)>,
}

pub(crate) struct OpenFiles {
    table: Mutex<Table>,
    next_fh: AtomicU64,
    read_only: bool,
    /// Write opens bypass the page cache (see `CachePolicy`); only when the kernel keeps
    /// cached readers coherent with such writes.
    direct_writes: AtomicBool,
    /// Held shared by operations that can remove a file's last name, exclusively while a
    /// lock conversion checks the link count and swaps handles.
    removals: RwLock<()>,
}

/// A read guard on an inode's lock for the duration of one I/O.
pub(crate) struct Io<'a> {
    ino: u64,
    guard: RwLockReadGuard<'a, LockState>,
}

/// Retries `attempt` while it fails with `Busy`, for up to one I/O timeout: a host gives up
/// a lock at its next commit point after its last close (every half I/O timeout), so a file
/// another host has just closed is often still recorded as held. A holder that keeps the
/// file open (a running VM) is still there after the wait, and the `Busy` is returned.
fn waiting<T>(ds: &Datastore, mut attempt: impl FnMut() -> vmfs::Result<T>) -> vmfs::Result<T> {
    let timing = ds.timing();
    let deadline = Instant::now() + timing.io_timeout;
    let poll =
        (timing.commit_interval() / 4).clamp(Duration::from_millis(5), Duration::from_millis(100));
    loop {
        match attempt() {
            Err(vmfs::Error::Busy { .. }) if Instant::now() < deadline => std::thread::sleep(poll),
            done => return done,
        }
    }
}

fn open_waiting(ds: &Datastore, ino: u64, access: Access) -> vmfs::Result<FileHandle> {
    waiting(ds, || ds.open_file(ino, access))
}

fn not_locked(ino: u64) -> vmfs::Error {
    vmfs::Error::NotPermitted {
        object: format!("inode {ino}"),
        reason: "this host does not hold the file exclusive".into(),
    }
}

impl Io<'_> {
    pub fn read(&self, ds: &Datastore, buf: &mut [u8], off: u64) -> vmfs::Result<usize> {
        match &self.guard.lock {
            Lock::Shared(h) | Lock::Exclusive(h) => h.read_at(buf, off),
            Lock::Orphan { .. } | Lock::Unlocked | Lock::Free => ds.read(self.ino, off, buf),
        }
    }

    pub fn write(&self, ds: &Datastore, data: &[u8], off: u64) -> vmfs::Result<usize> {
        match &self.guard.lock {
            Lock::Exclusive(h) => h.write_at(data, off),
            Lock::Orphan { .. } => ds.write(self.ino, off, data),
            _ => Err(not_locked(self.ino)),
        }
    }

    pub fn truncate(&self, ds: &Datastore, size: u64) -> vmfs::Result<()> {
        match &self.guard.lock {
            Lock::Exclusive(h) => h.truncate(size),
            Lock::Orphan { .. } => ds.truncate(self.ino, size),
            _ => Err(not_locked(self.ino)),
        }
    }

    pub fn punch_hole(&self, ds: &Datastore, off: u64, len: u64) -> vmfs::Result<()> {
        match &self.guard.lock {
            Lock::Exclusive(h) => h.punch_hole(off, len),
            Lock::Orphan { .. } => ds.punch_hole(self.ino, off, len),
            _ => Err(not_locked(self.ino)),
        }
    }

    pub fn fallocate(
        &self,
        ds: &Datastore,
        off: u64,
        len: u64,
        keep_size: bool,
    ) -> vmfs::Result<()> {
        match &self.guard.lock {
            Lock::Exclusive(_) | Lock::Orphan { .. } => ds.fallocate(self.ino, off, len, keep_size),
            _ => Err(not_locked(self.ino)),
        }
    }
}

impl OpenFiles {
    pub fn new(read_only: bool) -> OpenFiles {
        OpenFiles {
            table: Mutex::new(Table::default()),
            next_fh: AtomicU64::new(1),
            read_only,
            direct_writes: AtomicBool::new(false),
            removals: RwLock::new(()),
        }
    }

    /// The kernel invalidates cached pages around direct writes (FUSE_DIRECT_IO_ALLOW_MMAP),
    /// so write opens may bypass the cache without leaving readers stale.
    pub fn set_direct_writes(&self, on: bool) {
        self.direct_writes.store(on, Ordering::Relaxed);
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held around an unlink, rmdir or rename.
    pub fn removal(&self) -> RwLockReadGuard<'_, ()> {
        self.removals.read().unwrap_or_else(|e| e.into_inner())
    }

    fn conversion(&self) -> RwLockWriteGuard<'_, ()> {
        self.removals.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens `ino` for this host, taking or converting the datastore lock as needed.
    /// Returns the FUSE file handle and what the kernel may cache.
    pub fn open(&self, ds: &Datastore, ino: u64, write: bool) -> vmfs::Result<(u64, CachePolicy)> {
        let inode = self
            .table()
            .inodes
            .entry(ino)
            .or_insert_with(|| {
                Arc::new(InodeLock {
                    ino,
                    state: RwLock::new(LockState {
                        readers: 0,
                        writers: 0,
                        lock: Lock::Free,
                    }),
                })
            })
            .clone();
        let policy = {
            let mut st = inode.state.write().unwrap_or_else(|e| e.into_inner());
            let held_before = st.readers + st.writers > 0 && st.lock.is_held();
            let acquired = if write {
                self.acquire_write(ds, ino, &mut st)
            } else {
                self.acquire_read(ds, ino, &mut st)
            };
            if let Err(e) = acquired {
                let unused = st.readers == 0 && st.writers == 0;
                drop(st);
                if unused {
                    self.forget_if_unused(&inode);
                }
                return Err(e);
            }
            if write {
                st.writers += 1;
            } else {
                st.readers += 1;
            }
            self.policy(ds, ino, &st, held_before, write)
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.table().opens.insert(fh, Open { inode, write });
        Ok((fh, policy))
    }

    fn acquire_read(&self, ds: &Datastore, ino: u64, st: &mut LockState) -> vmfs::Result<()> {
        if !matches!(st.lock, Lock::Free) {
            return Ok(());
        }
        if self.read_only {
            st.lock = Lock::Unlocked;
            return Ok(());
        }
        st.lock = match open_waiting(ds, ino, Access::ReadOnly) {
            Ok(h) => Lock::Shared(h),
            Err(vmfs::Error::Busy { holder, mode, .. }) => {
                tracing::info!(ino, %holder, %mode, "reading a file another host holds, without a lock and without caching");
                Lock::Unlocked
            }
            Err(e) => return Err(e),
        };
        Ok(())
    }

    fn acquire_write(&self, ds: &Datastore, ino: u64, st: &mut LockState) -> vmfs::Result<()> {
        let taken = match st.lock {
            Lock::Exclusive(_) | Lock::Orphan { .. } => return Ok(()),
            Lock::Free => open_waiting(ds, ino, Access::Exclusive).map(|h| {
                st.lock = Lock::Exclusive(h);
            }),
            // Local readers hold the file: convert their lock, one quick try at a time, so
            // that unlinks and renames (held off during a try) never wait on another host.
            Lock::Shared(_) | Lock::Unlocked => waiting(ds, || {
                let _no_removals = self.conversion();
                self.convert_to_exclusive(ds, ino, st)
            }),
        };
        if let Err(vmfs::Error::Busy { holder, mode, .. }) = &taken {
            tracing::warn!(ino, %holder, %mode, "write open refused (EBUSY): the file is held by another host");
        }
        taken
    }

    /// One try at trading the readers' lock for an exclusive one; on failure the readers keep
    /// (or get back) what they had.
    fn convert_to_exclusive(
        &self,
        ds: &Datastore,
        ino: u64,
        st: &mut LockState,
    ) -> vmfs::Result<()> {
        if self.is_orphan(ds, ino) {
            if let Lock::Shared(h) = std::mem::replace(&mut st.lock, Lock::Free) {
                st.lock = Lock::Orphan { _pin: h };
                return Ok(());
            }
        }
        st.lock = Lock::Free;
        match ds.open_file(ino, Access::Exclusive) {
            Ok(h) => {
                st.lock = Lock::Exclusive(h);
                Ok(())
            }
            Err(e) => {
                st.lock = match ds.open_file(ino, Access::ReadOnly) {
                    Ok(h) => Lock::Shared(h),
                    Err(_) => Lock::Unlocked,
                };
                Err(e)
            }
        }
    }

    fn is_orphan(&self, ds: &Datastore, ino: u64) -> bool {
        ds.getattr(ino).is_ok_and(|a| a.nlink == 0)
    }

    fn policy(
        &self,
        ds: &Datastore,
        ino: u64,
        st: &LockState,
        held_before: bool,
        write: bool,
    ) -> CachePolicy {
        if st.lock.is_held() {
            // Under our lock nobody else changes the file, so what the kernel cached while we
            // held it is valid; from before, only if the inode's version says it is unchanged.
            let keep_cache = held_before || {
                let now = ds.getattr(ino).map(|a| (a.generation, a.version)).ok();
                now.is_some() && now == self.table().versions.get(&ino).copied()
            };
            // Writes skip the page cache: one copy fewer per write, and the kernel drops
            // cached pages they overlap.
            return CachePolicy {
                keep_cache,
                direct_io: write && self.direct_writes.load(Ordering::Relaxed),
            };
        }
        CachePolicy {
            keep_cache: false,
            // Without locks on a read-only datastore: cache while open and drop the cache at
            // each open (close-to-open, as NFS). A file another host holds: no cache at all.
            direct_io: !self.read_only,
        }
    }

    /// The inode lock behind an open file handle, and whether it was opened for writing.
    pub fn get(&self, fh: u64) -> Option<(Arc<InodeLock>, bool)> {
        let t = self.table();
        t.opens.get(&fh).map(|o| (o.inode.clone(), o.write))
    }

    /// Closes a FUSE file handle: converts or releases the datastore lock when it was the
    /// last writer or the last open.
    pub fn release(&self, ds: &Datastore, fh: u64) {
        let Some(open) = self.table().opens.remove(&fh) else {
            return;
        };
        let inode = open.inode;
        let ino = inode.ino;
        let unused = {
            let mut st = inode.state.write().unwrap_or_else(|e| e.into_inner());
            if open.write {
                st.writers = st.writers.saturating_sub(1);
            } else {
                st.readers = st.readers.saturating_sub(1);
            }
            if st.readers == 0 && st.writers == 0 {
                let cacheable = matches!(st.lock, Lock::Shared(_) | Lock::Exclusive(_));
                // Dropping the handle releases the lock (and frees the file if it has no
                // name left), so read the version first.
                let version = ds.getattr(ino).map(|a| (a.generation, a.version)).ok();
                st.lock = Lock::Free;
                let mut t = self.table();
                match version {
                    Some(v) if cacheable => {
                        if t.versions.len() >= CACHED_VERSIONS_MAX {
                            t.versions.clear();
                        }
                        t.versions.insert(ino, v);
                    }
                    _ => {
                        t.versions.remove(&ino);
                    }
                }
                true
            } else {
                if st.writers == 0 && matches!(st.lock, Lock::Exclusive(_)) {
                    self.downgrade(ds, ino, &mut st);
                }
                false
            }
        };
        if unused {
            self.forget_if_unused(&inode);
        }
    }

    /// The last local writer closed and readers remain: let other hosts read too.
    fn downgrade(&self, ds: &Datastore, ino: u64, st: &mut LockState) {
        let _no_removals = self.conversion();
        if self.is_orphan(ds, ino) {
            if let Lock::Exclusive(h) = std::mem::replace(&mut st.lock, Lock::Free) {
                st.lock = Lock::Orphan { _pin: h };
            }
            return;
        }
        st.lock = Lock::Free;
        // One try, without waiting: nobody could take the file while we held it exclusive.
        st.lock = match ds.open_file(ino, Access::ReadOnly) {
            Ok(h) => Lock::Shared(h),
            Err(e) => {
                tracing::warn!(ino, error = %e, "re-taking a shared lock after the last writer closed failed; reading without a lock");
                Lock::Unlocked
            }
        };
    }

    /// Drops the table's entry for an inode nobody has open, unless someone is opening it
    /// right now (they hold a reference taken under the table lock).
    fn forget_if_unused(&self, inode: &Arc<InodeLock>) {
        let mut t = self.table();
        let ours = t
            .inodes
            .get(&inode.ino)
            .is_some_and(|i| Arc::ptr_eq(i, inode));
        if ours && Arc::strong_count(inode) == 2 {
            t.inodes.remove(&inode.ino);
        }
    }

    /// Releases every lock (at unmount).
    pub fn close_all(&self) {
        let inodes: Vec<Arc<InodeLock>> = {
            let mut t = self.table();
            t.opens.clear();
            t.inodes.drain().map(|(_, inode)| inode).collect()
        };
        for inode in inodes {
            let mut st = inode.state.write().unwrap_or_else(|e| e.into_inner());
            st.lock = Lock::Free;
        }
    }

    /// Number of open FUSE file handles.
    pub fn open_count(&self) -> usize {
        self.table().opens.len()
    }
}

impl InodeLock {
    pub fn io(&self) -> Io<'_> {
        Io {
            ino: self.ino,
            guard: self.state.read().unwrap_or_else(|e| e.into_inner()),
        }
    }
}
