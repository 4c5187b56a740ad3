//! A fault-injecting LUN for crash and error tests.
//!
//! [`FaultLun`] wraps any LUN and, on command, behaves like a disk that loses power or fails:
//! a crash point after a number of writes (later writes are silently lost, as the doomed
//! process sees a power cut), optionally losing everything since the last flush (a volatile
//! write cache) and tearing the write caught by the cut, I/O errors on chosen byte ranges,
//! and added latency. Crash-consistency tests count a workload's writes with
//! [`FaultLun::writes`], then rerun it crashing after every k-th write.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::{CompareAndWrite, IoRequest, Lun, LunError, Result, check_request, lock};

/// What a crash loses besides the writes issued after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrashMode {
    /// Every write that landed before the crash point survives: a disk without a volatile
    /// write cache (or with one that was flushed after every write).
    #[default]
    DropLater,
    /// When the crash point is hit, every write since the last completed flush is reverted
    /// too: a volatile write cache lost with the power. Pre-images are kept from the moment
    /// this mode is set, so set it before the workload starts.
    DropUnflushed,
}

/// A LUN that injects crashes, torn writes, I/O errors and latency into an inner LUN.
///
/// Every write-type request counts as one write: `write_at`, `write_zeroes`,
/// `compare_and_write`, and each write request of a [`Lun::submit`] batch. Requests refused
/// for alignment or range never reach the wrapper's logic and are not counted.
#[derive(Debug)]
pub struct FaultLun {
    inner: Arc<dyn Lun>,
    name: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Writes that reached the wrapper, including dropped and failed ones.
    writes: u64,
    /// Writes still allowed before the crash point; `Some(0)` means the next write hits it.
    crash_countdown: Option<u64>,
    crashed: bool,
    mode: CrashMode,
    tear: bool,
    failing_reads: Vec<Range<u64>>,
    failing_writes: Vec<Range<u64>>,
    failing_flushes: bool,
    latency: Duration,
    /// Pre-images of the writes since the last completed flush, oldest first
    /// (kept only in [`CrashMode::DropUnflushed`]).
    undo: Vec<PreImage>,
}

#[derive(Debug)]
struct PreImage {
    offset: u64,
    old: Vec<u8>,
}

/// A write-type request on its way through the wrapper.
#[derive(Clone, Copy)]
enum Write<'a> {
    Data(&'a [u8]),
    Zeroes,
}

impl FaultLun {
    /// Wraps `inner`; no fault is armed until asked for.
    pub fn new(inner: Arc<dyn Lun>) -> FaultLun {
        let name = format!("fault:{}", inner.name());
        FaultLun {
            inner,
            name,
            state: Mutex::new(State::default()),
        }
    }

    /// The wrapped LUN, e.g. to inspect what really reached it.
    pub fn inner(&self) -> &Arc<dyn Lun> {
        &self.inner
    }

    /// Arms the crash point: the next `n` writes are carried out (a write failed by
    /// [`FaultLun::fail_writes`] still counts), the one after hits the crash point, and from
    /// then on every write is silently dropped and flush returns `Ok` without reaching the
    /// inner LUN.
    pub fn crash_after_writes(&self, n: u64) {
        self.state().crash_countdown = Some(n);
    }

    /// Cuts the power now, as if the crash point had just been hit.
    pub fn crash(&self) -> Result<()> {
        let mut state = self.state();
        self.power_cut(&mut state)
    }

    pub fn set_crash_mode(&self, mode: CrashMode) {
        let mut state = self.state();
        if mode != state.mode {
            state.undo.clear();
        }
        state.mode = mode;
    }

    /// When on, the write that hits the crash point lands the first half of its sectors
    /// (rounded down, so a one-sector write lands nothing): sector-atomic tearing.
    /// A compare-and-write is never torn; like SCSI ATS it lands whole or not at all.
    pub fn tear_writes(&self, on: bool) {
        self.state().tear = on;
    }

    /// Reads overlapping `range` (bytes) fail with [`LunError::Injected`]. Ranges accumulate.
    pub fn fail_reads(&self, range: Range<u64>) {
        self.state().failing_reads.push(range);
    }

    /// Writes overlapping `range` (bytes) fail with [`LunError::Injected`] and change nothing.
    /// Ranges accumulate.
    pub fn fail_writes(&self, range: Range<u64>) {
        self.state().failing_writes.push(range);
    }

    /// When on, flush fails with [`LunError::Injected`] and pending writes stay unflushed.
    pub fn fail_flushes(&self, on: bool) {
        self.state().failing_flushes = on;
    }

    /// Every read, write and flush first sleeps this long (outside any lock, so concurrent
    /// requests overlap their delays as on a real device).
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// Disarms every fault and restores power: writes reach the inner LUN again.
    /// The write counter is kept.
    pub fn clear_faults(&self) {
        let mut state = self.state();
        let writes = state.writes;
        *state = State {
            writes,
            ..State::default()
        };
    }

    /// Writes that reached the wrapper so far, including dropped and failed ones.
    pub fn writes(&self) -> u64 {
        self.state().writes
    }

    /// True once the crash point has been hit (or [`FaultLun::crash`] called).
    pub fn crashed(&self) -> bool {
        self.state().crashed
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent (every field is updated
        // in one step), so a poisoned lock is still usable.
        lock(&self.state)
    }

    fn delay(&self) {
        let latency = self.state().latency;
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
    }

    fn injected(&self, offset: u64, len: u64) -> LunError {
        LunError::Injected {
            lun: self.name.clone(),
            offset,
            len,
        }
    }

    fn power_cut(&self, state: &mut State) -> Result<()> {
        state.crashed = true;
        state.crash_countdown = None;
        // Newest first, so a sector written twice ends up with its oldest pre-image.
        while let Some(image) = state.undo.pop() {
            self.inner.write_at(&image.old, image.offset)?;
        }
        Ok(())
    }

    /// Counts a write and decides its fate. Returns `Ok(true)` when it must be carried out,
    /// `Ok(false)` when it was swallowed by a crash (possibly after landing a torn prefix).
    fn admit_write(
        &self,
        state: &mut State,
        offset: u64,
        len: u64,
        write: Option<Write<'_>>,
    ) -> Result<bool> {
        state.writes += 1;
        if state.crashed {
            return Ok(false);
        }
        match state.crash_countdown {
            Some(0) => {
                self.power_cut(state)?;
                if let (true, Some(write)) = (state.tear, write) {
                    let sector = u64::from(self.inner.sector_size());
                    let prefix = len / sector / 2 * sector;
                    if prefix > 0 {
                        self.land(offset, prefix, write)?;
                    }
                }
                return Ok(false);
            }
            Some(n) => state.crash_countdown = Some(n - 1),
            None => {}
        }
        if overlaps(&state.failing_writes, offset, len) {
            return Err(self.injected(offset, len));
        }
        if state.mode == CrashMode::DropUnflushed {
            let mut old = vec![0u8; len as usize];
            self.inner.read_at(&mut old, offset)?;
            state.undo.push(PreImage { offset, old });
        }
        Ok(true)
    }

    fn land(&self, offset: u64, len: u64, write: Write<'_>) -> Result<()> {
        match write {
            Write::Data(buf) => self.inner.write_at(&buf[..len as usize], offset),
            Write::Zeroes => self.inner.write_zeroes(offset, len),
        }
    }

    fn write(&self, offset: u64, len: u64, write: Write<'_>) -> Result<()> {
        check_request(self, offset, len)?;
        self.delay();
        // The lock is held while the write lands so that pre-images are recorded in the
        // order the writes reach the inner LUN.
        let mut state = self.state();
        if self.admit_write(&mut state, offset, len, Some(write))? {
            self.land(offset, len, write)?;
        }
        Ok(())
    }

    fn check_read(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self, offset, len)?;
        self.delay();
        if overlaps(&self.state().failing_reads, offset, len) {
            return Err(self.injected(offset, len));
        }
        Ok(())
    }

    /// True when nothing is armed, so a batch can go to the inner LUN as one batch.
    fn is_transparent(state: &State) -> bool {
        state.crash_countdown.is_none()
            && !state.crashed
            && state.mode == CrashMode::DropLater
            && state.failing_reads.is_empty()
            && state.failing_writes.is_empty()
            && state.latency.is_zero()
    }
}

fn overlaps(ranges: &[Range<u64>], offset: u64, len: u64) -> bool {
    let end = offset.saturating_add(len);
    ranges.iter().any(|r| r.start < end && offset < r.end)
}

impl Lun for FaultLun {
    fn name(&self) -> &str {
        &self.name
    }

    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_read(offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write(offset, buf.len() as u64, Write::Data(buf))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.write(offset, len, Write::Zeroes)
    }

    fn flush(&self) -> Result<()> {
        self.delay();
        let mut state = self.state();
        if state.crashed {
            return Ok(());
        }
        if state.failing_flushes {
            return Err(self.injected(0, 0));
        }
        self.inner.flush()?;
        state.undo.clear();
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn supports_compare_and_write(&self) -> bool {
        self.inner.supports_compare_and_write()
    }

    fn compare_and_write_scope(&self) -> crate::CasScope {
        self.inner.compare_and_write_scope()
    }

    fn reach(&self) -> crate::Reach {
        self.inner.reach()
    }

    fn identity(&self) -> Option<crate::LunIdentity> {
        self.inner.identity()
    }

    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> Result<CompareAndWrite> {
        let len = new.len() as u64;
        check_request(self, offset, len)?;
        self.delay();
        let mut state = self.state();
        if !self.admit_write(&mut state, offset, len, None)? {
            return Ok(CompareAndWrite::Written);
        }
        let outcome = self.inner.compare_and_write(expected, new, offset);
        if !matches!(outcome, Ok(CompareAndWrite::Written))
            && state.mode == CrashMode::DropUnflushed
        {
            // Nothing changed, so the pre-image just recorded must not be replayed.
            state.undo.pop();
        }
        outcome
    }

    fn submit(&self, batch: &mut [IoRequest<'_>]) -> Result<()> {
        for request in batch.iter() {
            check_request(self, request.offset(), request.buf().len() as u64)?;
        }
        {
            let mut state = self.state();
            if Self::is_transparent(&state) {
                state.writes += batch
                    .iter()
                    .filter(|r| matches!(r, IoRequest::Write { .. }))
                    .count() as u64;
                drop(state);
                return self.inner.submit(batch);
            }
        }
        for request in batch.iter_mut() {
            match request {
                IoRequest::Read { buf, offset } => self.read_at(buf, *offset)?,
                IoRequest::Write { buf, offset } => self.write_at(buf, *offset)?,
            }
        }
        Ok(())
    }
}
