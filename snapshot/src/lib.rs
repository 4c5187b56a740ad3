//! Array-style snapshots of any [`Lun`]: copy-on-first-write sessions kept in a reserved
//! pool (itself a LUN), writable sessions, rollback, consistency groups across sources,
//! and clones on other LUNs with fracture logs.
//!
//! # Design
//!
//! The source keeps serving I/O through [`Snapshots::source`], a `Lun` that wraps it. Every
//! session has a generation number; writes to the source belong to the current epoch, the
//! generation the next session will get. A pool slot holding a chunk's old contents records
//! the range of generations it serves (`lo..hi`), and each chunk remembers the highest `hi`
//! of its copies (`preserved_to`). A write must copy a chunk only if some valid session's
//! generation is at or above `preserved_to`; since that is a comparison with the highest
//! valid generation, the cost of a write does not grow with the number of sessions, and a
//! chunk is stored once however many sessions share it. Copies are durable in the pool,
//! data before the table entry naming it, before the source write is issued (see
//! `cofw.rs`), so a crash at any point leaves every surviving session reading exactly the
//! source's contents at its point in time. Deleting a session only rewrites the header:
//! slots no valid session needs are free at once, in memory and on the next open.
//! A sequential writer preserves the chunks ahead of it in one copy, so the pool's
//! flushes are paid per run rather than per chunk.
//!
//! Rollback (`rollback.rs`) and clone sync (`clones.rs`) are persisted state machines
//! with a progress value; a crash resumes them. A consistency group (`group.rs`) closes
//! the write gates of all its members before taking their sessions. Clones keep a
//! fracture log per clone in the pool, so sync and reverse sync copy only what changed.
//! The on-disk layout is in `FORMAT.md`.
//!
//! Finding a LUN's sessions from the LUN alone: the pool's header names its source (the
//! source LUN's name, e.g. `file:/srv/vm1.img`, and its size), and [`Snapshots::open`]
//! refuses a pool of another source. The source itself carries no marker (its every byte
//! belongs to its user), so the convention for a LUN outside a datastore is a pool beside
//! it ([`pool_beside`]: for `/srv/vm1.img`, `/srv/vm1.img.snap`); [`pool_source`] reads
//! which source a pool belongs to without opening that source.

mod clones;
mod cofw;
mod engine;
mod error;
mod format;
mod fsck;
mod group;
mod rollback;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use lun::{IoRequest, Lun, LunError, check_request};
use tracing::{error, info};

use engine::{Engine, State, check_name, lock, read_header};
use format::{
    Header, Layout, MAX_SOURCE_NAME, SESSION_INVALID, SESSION_WRITABLE, SessionRecord,
    TABLE_OFFSET, bad_pool,
};

pub use clones::CloneInfo;
pub use error::{Result, SnapError};
pub use format::CloneState;
pub use fsck::{FsckReport, fsck};
pub use group::create_group_session;
pub use rollback::RollbackProgress;

/// Default chunk size: the unit of copy-on-first-write.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;
/// Most sessions one pool (one source) holds.
pub const MAX_SESSIONS: usize = format::MAX_SESSIONS;

/// How a pool is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    /// A power of two from the sector size to [`MAX_CHUNK_SIZE`].
    pub chunk_size: u32,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// Whether a session can still be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Valid,
    /// The pool filled up before one of this session's chunks could be preserved.
    Invalid,
}

/// One session as [`Snapshots::list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub name: String,
    pub generation: u64,
    pub created_unix: u64,
    pub writable: bool,
    pub state: SessionState,
    /// Pool chunks this session reads (shared ones count for every session sharing them).
    pub chunks_in_pool: u64,
    /// The consistency group it was taken with, the same number on every member.
    pub group: Option<u64>,
}

/// Pool space as chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    pub chunk_size: u32,
    pub used: u64,
    pub total: u64,
}

/// The snapshot engine of one source LUN and its pool.
#[derive(Debug)]
pub struct Snapshots {
    engine: Arc<Engine>,
    rollback_thread: Mutex<Option<JoinHandle<()>>>,
    /// Tells the background rollback to stop between steps (the engine is going away;
    /// the next open resumes it from the pool).
    stop: Arc<AtomicBool>,
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.rollback_thread).take() {
            let _ = h.join();
        }
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Snapshots {
    /// Makes `pool` a snapshot pool for `source`. Refuses, changing nothing, a chunk size
    /// that is not a power of two between the sector size and 1 MiB, a pool that holds no
    /// chunk after its metadata, and a pool that already is one.
    pub fn create(
        source: Arc<dyn Lun>,
        pool: Arc<dyn Lun>,
        options: PoolOptions,
    ) -> Result<Snapshots> {
        let pool_name = pool.name().to_string();
        let chunk = options.chunk_size;
        let sector = source.sector_size().max(pool.sector_size());
        let bad_chunk = |reason: String| SnapError::BadChunkSize {
            pool: pool_name.clone(),
            chunk_size: chunk,
            reason,
        };
        if !chunk.is_power_of_two() || chunk < sector || chunk > MAX_CHUNK_SIZE {
            return Err(bad_chunk(format!(
                "use a power of two from {sector} to {MAX_CHUNK_SIZE}"
            )));
        }
        if u64::from(pool.sector_size()) > format::UNIT {
            return Err(bad_pool(&pool_name, "sector size above 4096 bytes"));
        }
        if source.name().len() > MAX_SOURCE_NAME {
            return Err(bad_pool(
                &pool_name,
                "the source's name is longer than 256 bytes",
            ));
        }
        if pool.is_read_only() {
            return Err(LunError::ReadOnly { lun: pool_name }.into());
        }
        let layout =
            Layout::compute(pool.size(), source.size(), chunk).ok_or(SnapError::PoolTooSmall {
                pool: pool_name.clone(),
                size: pool.size(),
                chunk_size: chunk,
            })?;
        if let Ok(h) = read_header(pool.as_ref()) {
            return Err(bad_pool(
                &pool_name,
                format!(
                    "already the snapshot pool of {}; delete its sessions and wipe it first",
                    h.source_name
                ),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        let header = Header {
            seq: 1,
            uuid,
            source_size: source.size(),
            source_name: source.name().to_string(),
            next_gen: 1,
            layout,
            rollback: None,
            sessions: Vec::new(),
            clones: Vec::new(),
            verified_seq: 0,
        };
        // The other header copy is cleared too: a stale copy with a higher sequence
        // number would otherwise win on open.
        pool.write_zeroes(0, TABLE_OFFSET + layout.table_len)?;
        pool.flush()?;
        pool.write_at(&header.encode(), header.offset())?;
        pool.flush()?;
        info!(pool = %pool_name, source = source.name(), chunk_size = chunk, slots = layout.slots, "snapshot pool created");
        Snapshots::open(source, pool)
    }

    /// Opens the pool of `source`, refusing a pool of another source. A rollback cut short
    /// by a crash resumes in the background. Clones are attached with
    /// [`Snapshots::attach_clone`]; until then source writes are only logged for them.
    pub fn open(source: Arc<dyn Lun>, pool: Arc<dyn Lun>) -> Result<Snapshots> {
        let state: State = Engine::load(&source, &pool)?;
        let resume = state.header.rollback.is_some();
        let engine = Arc::new(Engine {
            source_view_name: format!("snap-source:{}", source.name()),
            source,
            pool,
            gate: RwLock::new(()),
            state: Mutex::new(state),
            mirror_order: Mutex::new(()),
            compare_and_write: Mutex::new(()),
        });
        let snaps = Snapshots {
            engine,
            rollback_thread: Mutex::new(None),
            stop: Arc::new(AtomicBool::new(false)),
        };
        if resume {
            info!(
                pool = snaps.engine.pool_name(),
                "resuming an interrupted rollback"
            );
            snaps.spawn_rollback();
        }
        Ok(snaps)
    }

    /// The source as a `Lun`: every write goes through copy-on-first-write.
    pub fn source(&self) -> Arc<SourceLun> {
        Arc::new(SourceLun {
            engine: self.engine.clone(),
        })
    }

    /// Takes a session: the source is flushed, then the session is durable in the pool
    /// before this returns. A writable session takes writes into the pool.
    pub fn create_session(&self, name: &str, writable: bool) -> Result<SessionInfo> {
        let e = &self.engine;
        check_name(e.pool_name(), name)?;
        let _gate = e.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&e.state);
        e.check_new_session(&st, name)?;
        // Writes acknowledged before this point must survive a crash with the session.
        e.source.flush()?;
        let record = e.add_session(&mut st, name, writable, 0)?;
        Ok(info_of(&st, &record))
    }

    /// Deletes a session; the pool space only it used is free at once.
    pub fn delete_session(&self, name: &str) -> Result<()> {
        let e = &self.engine;
        let mut st = lock(&e.state);
        let Some(s) = st.session(name).cloned() else {
            return Err(SnapError::UnknownSession {
                pool: e.pool_name().to_string(),
                name: name.to_string(),
            });
        };
        if st.header.rollback == Some(s.generation) {
            return Err(SnapError::RollbackInProgress {
                pool: e.pool_name().to_string(),
                name: name.to_string(),
            });
        }
        let mut next = st.header.clone();
        next.sessions.retain(|r| r.name != name);
        e.persist_header(&mut st, next)?;
        st.rebuild();
        info!(
            pool = e.pool_name(),
            session = name,
            free_slots = st.free.len(),
            "snapshot session deleted"
        );
        Ok(())
    }

    /// A session as a `Lun`: read-only unless the session was made writable.
    pub fn session(&self, name: &str) -> Result<Arc<SessionLun>> {
        let e = &self.engine;
        let st = lock(&e.state);
        let s = st.session(name).ok_or_else(|| SnapError::UnknownSession {
            pool: e.pool_name().to_string(),
            name: name.to_string(),
        })?;
        if s.flags & SESSION_INVALID != 0 {
            return Err(SnapError::SessionInvalid {
                pool: e.pool_name().to_string(),
                name: name.to_string(),
            });
        }
        Ok(Arc::new(SessionLun {
            engine: e.clone(),
            generation: s.generation,
            session: name.to_string(),
            lun_name: format!("snapshot:{}@{}", e.source.name(), name),
            writable: s.flags & SESSION_WRITABLE != 0,
        }))
    }

    /// Every session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let st = lock(&self.engine.state);
        st.header.sessions.iter().map(|s| info_of(&st, s)).collect()
    }

    pub fn usage(&self) -> PoolUsage {
        let st = lock(&self.engine.state);
        let total = st.layout().slots;
        PoolUsage {
            chunk_size: st.layout().chunk_size,
            used: total - st.free.len() as u64,
            total,
        }
    }

    /// Starts returning the source to session `name`'s point in time and runs the copy back
    /// in a background thread. The source is usable at once.
    pub fn rollback(&self, name: &str) -> Result<()> {
        self.engine.start_rollback(name)?;
        self.spawn_rollback();
        Ok(())
    }

    /// Records the start of a rollback without copying anything yet; the caller drives it
    /// with [`Snapshots::rollback_step`].
    pub fn start_rollback(&self, name: &str) -> Result<()> {
        self.engine.start_rollback(name)
    }

    /// Copies back up to `max_chunks` chunks; `None` once the rollback is complete.
    pub fn rollback_step(&self, max_chunks: u64) -> Result<Option<RollbackProgress>> {
        self.engine.rollback_step(max_chunks)
    }

    /// The running rollback's progress, `None` when none runs.
    pub fn rollback_progress(&self) -> Option<RollbackProgress> {
        lock(&self.engine.state).rollback_progress()
    }

    /// Waits for a background rollback to finish; the error it stopped on, if any.
    pub fn wait_rollback(&self) -> Result<()> {
        let handle = lock(&self.rollback_thread).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        match self.rollback_progress() {
            None => Ok(()),
            // The thread stopped early: run the rest here to report its error.
            Some(_) => {
                while self.engine.rollback_step(ROLLBACK_BATCH)?.is_some() {}
                Ok(())
            }
        }
    }

    fn spawn_rollback(&self) {
        let engine = self.engine.clone();
        let stop = self.stop.clone();
        let handle = std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match engine.rollback_step(ROLLBACK_BATCH) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(err) => {
                        error!(pool = engine.pool_name(), error = %err, "rollback stopped");
                        break;
                    }
                }
            }
        });
        *lock(&self.rollback_thread) = Some(handle);
    }
}

/// Clones: full copies of the source on other LUNs, mirrored until fractured.
impl Snapshots {
    /// Makes `lun` (the source's size and sector size) a clone named `name`: every chunk is
    /// logged for copying and writes are mirrored from now on. Run [`Snapshots::sync_step`]
    /// or [`Snapshots::run_sync`] to copy.
    pub fn add_clone(&self, name: &str, lun: Arc<dyn Lun>) -> Result<()> {
        self.engine.add_clone(name, lun)
    }

    /// Attaches a clone's LUN after [`Snapshots::open`]; until then writes to the source
    /// are only logged for it.
    pub fn attach_clone(&self, name: &str, lun: Arc<dyn Lun>) -> Result<()> {
        self.engine.attach_clone(name, lun)
    }

    pub fn remove_clone(&self, name: &str) -> Result<()> {
        self.engine.remove_clone(name)
    }

    /// Stops mirroring to a synchronized clone; both sides then change independently and
    /// the fracture log records which chunks.
    pub fn fracture(&self, name: &str) -> Result<()> {
        self.engine.fracture(name)
    }

    /// Starts copying the logged chunks from the source to the clone.
    pub fn sync(&self, name: &str) -> Result<()> {
        self.engine.start_sync(name, false)
    }

    /// Starts copying the logged chunks from the clone back to the source; the source reads
    /// them from the clone until they are copied.
    pub fn reverse_sync(&self, name: &str) -> Result<()> {
        self.engine.start_sync(name, true)
    }

    /// Copies up to `max_chunks` chunks of a running sync; `None` once synchronized.
    pub fn sync_step(&self, name: &str, max_chunks: u64) -> Result<Option<CloneInfo>> {
        self.engine.sync_step(name, max_chunks)
    }

    /// Runs a sync (started by [`Snapshots::sync`], [`Snapshots::reverse_sync`] or
    /// [`Snapshots::add_clone`]) to its end.
    pub fn run_sync(&self, name: &str) -> Result<()> {
        while self.engine.sync_step(name, ROLLBACK_BATCH)?.is_some() {}
        Ok(())
    }

    pub fn clones(&self) -> Vec<CloneInfo> {
        lock(&self.engine.state).clone_infos()
    }

    /// A fractured clone as a `Lun` whose writes are logged for the next sync.
    pub fn clone_view(&self, name: &str) -> Result<Arc<CloneLun>> {
        let lun = self.engine.clone_lun(name)?;
        Ok(Arc::new(CloneLun {
            engine: self.engine.clone(),
            clone: name.to_string(),
            lun_name: format!("clone:{}", lun.name()),
            lun,
        }))
    }
}

/// A clone LUN seen through the engine: reads go to it, writes are logged first.
#[derive(Debug)]
pub struct CloneLun {
    engine: Arc<Engine>,
    clone: String,
    lun_name: String,
    lun: Arc<dyn Lun>,
}

impl Lun for CloneLun {
    fn name(&self) -> &str {
        &self.lun_name
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
        check_request(self, offset, buf.len() as u64)?;
        self.engine
            .write_clone(&self.clone, buf, offset)
            .map_err(|e| e.into_lun(&self.lun_name, offset, buf.len() as u64))
    }
    fn flush(&self) -> lun::Result<()> {
        self.lun.flush()
    }
}

/// Chunks copied back per step: small enough that a source write waits little.
const ROLLBACK_BATCH: u64 = 64;

pub(crate) fn info_of(st: &State, s: &SessionRecord) -> SessionInfo {
    let chunks_in_pool = st
        .chunks
        .values()
        .flat_map(|c| c.copies.iter())
        .filter(|(e, _)| e.covers(s.generation))
        .count() as u64;
    SessionInfo {
        name: s.name.clone(),
        generation: s.generation,
        created_unix: s.created_unix,
        writable: s.flags & SESSION_WRITABLE != 0,
        state: if s.flags & SESSION_INVALID != 0 {
            SessionState::Invalid
        } else {
            SessionState::Valid
        },
        chunks_in_pool,
        group: (s.group != 0).then_some(s.group),
    }
}

/// Where the pool of a source outside a datastore lives by convention: beside it, with
/// `.snap` appended (`/srv/vm1.img` -> `/srv/vm1.img.snap`), so a LUN's sessions are found
/// from the LUN alone.
pub fn pool_beside(source: &std::path::Path) -> std::path::PathBuf {
    let mut name = source.as_os_str().to_os_string();
    name.push(".snap");
    std::path::PathBuf::from(name)
}

/// Which source a pool belongs to (its name and size), read from the pool alone.
pub fn pool_source(pool: &dyn Lun) -> Result<(String, u64)> {
    let h = read_header(pool)?;
    Ok((h.source_name, h.source_size))
}

/// The source seen through the engine.
#[derive(Debug)]
pub struct SourceLun {
    engine: Arc<Engine>,
}

impl Lun for SourceLun {
    fn name(&self) -> &str {
        &self.engine.source_view_name
    }
    fn sector_size(&self) -> u32 {
        self.engine.source.sector_size()
    }
    fn size(&self) -> u64 {
        self.engine.source.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        self.engine
            .read_source(buf, offset)
            .map_err(|e| e.into_lun(self.name(), offset, buf.len() as u64))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        self.engine
            .write_source(buf, offset)
            .map_err(|e| e.into_lun(self.name(), offset, buf.len() as u64))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        check_request(self, offset, len)?;
        self.engine
            .write_zeroes_source(offset, len)
            .map_err(|e| e.into_lun(self.name(), offset, len))
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> lun::Result<bool> {
        check_request(self, offset, len)?;
        self.engine
            .source_may_hold_data(offset, len)
            .map_err(|e| e.into_lun(self.name(), offset, len))
    }
    /// The engine is in the source's I/O path, not another volume: a datastore on the source
    /// seen through it is the original, not a copy.
    fn identity(&self) -> Option<lun::LunIdentity> {
        self.engine.source.identity()
    }
    fn reach(&self) -> lun::Reach {
        self.engine.source.reach()
    }
    /// A datastore on the source locks through it (its lock records take compare-and-write):
    /// see [`compare_and_write_through`].
    fn supports_compare_and_write(&self) -> bool {
        true
    }
    fn compare_and_write_scope(&self) -> lun::CasScope {
        lun::CasScope::ThisMachine
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> lun::Result<lun::CompareAndWrite> {
        compare_and_write_through(self, &self.engine, expected, new, offset)
    }
    /// Copies for the whole batch share one pool flush, and the batch reaches the source
    /// as one submission (io_uring callers keep their queue depth).
    fn submit(&self, batch: &mut [IoRequest<'_>]) -> lun::Result<()> {
        for request in batch.iter() {
            let (offset, len) = match request {
                IoRequest::Read { buf, offset } => (*offset, buf.len()),
                IoRequest::Write { buf, offset } => (*offset, buf.len()),
            };
            check_request(self, offset, len as u64)?;
        }
        self.engine
            .submit_source(batch)
            .map_err(|e| e.into_lun(self.name(), 0, 0))
    }
    /// Copies are durable in the pool before the source write they protect, so only the
    /// source, and the clones its writes are mirrored to, need flushing.
    fn flush(&self) -> lun::Result<()> {
        self.engine
            .flush_source()
            .map_err(|e| e.into_lun(self.name(), 0, 0))
    }
}

/// A session's point in time as a `Lun`.
#[derive(Debug)]
pub struct SessionLun {
    engine: Arc<Engine>,
    generation: u64,
    session: String,
    lun_name: String,
    writable: bool,
}

impl Lun for SessionLun {
    fn name(&self) -> &str {
        &self.lun_name
    }
    fn supports_compare_and_write(&self) -> bool {
        self.writable
    }
    fn compare_and_write_scope(&self) -> lun::CasScope {
        if self.writable {
            lun::CasScope::ThisMachine
        } else {
            lun::CasScope::None
        }
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> lun::Result<lun::CompareAndWrite> {
        compare_and_write_through(self, &self.engine, expected, new, offset)
    }
    /// A session is another volume than its source, with an identity of its own, so a
    /// datastore found on it is a copy of the one on the source (see `lun::LunIdentity`).
    fn identity(&self) -> Option<lun::LunIdentity> {
        let pool = self.engine.pool.identity().map(|i| i.to_string());
        let key = format!(
            "{}\n{}",
            pool.as_deref().unwrap_or(self.engine.pool.name()),
            self.generation
        );
        Some(lun::LunIdentity::Device {
            id: format!(
                "vapp-snapshot.{:08x}.{}",
                crc32c::crc32c(key.as_bytes()),
                self.generation
            ),
            start: 0,
            path: self.lun_name.clone(),
        })
    }
    fn sector_size(&self) -> u32 {
        self.engine.source.sector_size()
    }
    fn size(&self) -> u64 {
        self.engine.source.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        self.engine
            .read_session(self.generation, &self.session, buf, offset)
            .map_err(|e| e.into_lun(&self.lun_name, offset, buf.len() as u64))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        if !self.writable {
            return Err(LunError::ReadOnly {
                lun: self.lun_name.clone(),
            });
        }
        self.engine
            .write_session(self.generation, &self.session, buf, offset)
            .map_err(|e| e.into_lun(&self.lun_name, offset, buf.len() as u64))
    }
    /// A session's own writes live in the pool.
    fn flush(&self) -> lun::Result<()> {
        self.engine.pool.flush()
    }
    fn is_read_only(&self) -> bool {
        !self.writable
    }
}

/// Compare-and-write on a view of the engine (the source or a writable session): read,
/// compare and write under the engine's one compare-and-write lock. A source or session
/// with snapshots is only ever written through its engine, in one process (the CLI's claim
/// and the datastore's locks see to that), so no other writer can slip in between; the
/// write itself takes the copy-on-first-write path as any other.
fn compare_and_write_through(
    view: &dyn Lun,
    engine: &Engine,
    expected: &[u8],
    new: &[u8],
    offset: u64,
) -> lun::Result<lun::CompareAndWrite> {
    if expected.len() != new.len() {
        return Err(LunError::Misaligned {
            lun: view.name().to_string(),
            offset,
            len: new.len() as u64,
            sector_size: view.sector_size(),
        });
    }
    check_request(view, offset, new.len() as u64)?;
    let _atomic = lock(&engine.compare_and_write);
    let mut current = vec![0u8; expected.len()];
    view.read_at(&mut current, offset)?;
    if current != expected {
        return Ok(lun::CompareAndWrite::Miscompare(current));
    }
    view.write_at(new, offset)?;
    Ok(lun::CompareAndWrite::Written)
}
