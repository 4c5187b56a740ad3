//! Rollback: the source returns to a session's point in time.
//!
//! A persisted state machine. `Idle -> Restoring(target) -> Idle`: starting zeroes the
//! restored-chunk bitmap, then records the target in the header; from then on the source
//! reads its not-yet-restored chunks from the target's view, so it is usable at once. The
//! copy back walks the chunks in batches: each chunk the target holds in the pool is written
//! to the source through the COFW path (other sessions keep their view), the source is
//! flushed, then the batch's bits are written and the pool flushed. A bit is therefore
//! only durable once its chunk is, and a source write to an unrestored chunk restores that
//! chunk first. After a crash the next open resumes from the bitmap; redoing a chunk whose
//! bit was lost writes the same bytes again.

use std::sync::PoisonError;

use tracing::{info, warn};

use crate::engine::{Engine, State, lock};
use crate::error::{Result, SnapError};
use crate::format::{SESSION_INVALID, UNIT};

/// Where a rollback stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackProgress {
    /// The session the source is returning to.
    pub session: String,
    /// Chunks done (restored, or found identical) out of `total`.
    pub done: u64,
    pub total: u64,
}

impl RollbackProgress {
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        }
    }
}

impl State {
    pub(crate) fn is_restored(&self, chunk: u64) -> bool {
        self.restored
            .as_ref()
            .is_none_or(|bits| bits[(chunk / 8) as usize] & (1 << (chunk % 8)) != 0)
    }

    pub(crate) fn rollback_progress(&self) -> Option<RollbackProgress> {
        let target = self.header.rollback?;
        let bits = self.restored.as_ref()?;
        let total = self.source_chunks();
        let done = bits.iter().map(|b| u64::from(b.count_ones())).sum();
        Some(RollbackProgress {
            session: self
                .session_by_gen(target)
                .map_or_else(|| format!("generation {target}"), |s| s.name.clone()),
            done,
            total,
        })
    }
}

impl Engine {
    pub fn start_rollback(&self, name: &str) -> Result<()> {
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let pool = self.pool_name().to_string();
        if let Some(p) = st.rollback_progress() {
            return Err(SnapError::RollbackInProgress {
                pool,
                name: p.session,
            });
        }
        if let Some(c) = st.reverse_syncing() {
            return Err(SnapError::CloneBusy {
                pool,
                name: c.name.clone(),
                reason: "it is being copied back to the source; wait for it to finish".into(),
            });
        }
        let session = st.session(name).cloned().ok_or(SnapError::UnknownSession {
            pool: pool.clone(),
            name: name.to_string(),
        })?;
        if session.flags & SESSION_INVALID != 0 {
            return Err(SnapError::SessionInvalid {
                pool,
                name: name.to_string(),
            });
        }
        let layout = st.layout();
        self.pool
            .write_zeroes(layout.bitmap_offset, layout.bitmap_len)?;
        self.pool.flush()?;
        let mut next = st.header.clone();
        next.rollback = Some(session.generation);
        self.persist_header(&mut st, next)?;
        st.restored = Some(vec![0u8; layout.bitmap_len as usize]);
        st.rollback_cursor = 0;
        info!(
            pool = self.pool_name(),
            source = self.source.name(),
            session = name,
            "rollback started"
        );
        Ok(())
    }

    /// Writes the target's view of `chunk` to the source, preserving the source's current
    /// contents first for any session that still needs them.
    fn restore_chunk(&self, st: &mut State, target: u64, chunk: u64) -> Result<()> {
        let Some(slot) = st.locate(target, chunk) else {
            // The target sees the source itself: nothing written since its point in time.
            return Ok(());
        };
        let len = st.chunk_len(chunk) as usize;
        let mut data = vec![0u8; len];
        self.pool
            .read_at(&mut data, st.layout().slot_offset(slot))?;
        if st.needs_copy(chunk) {
            self.preserve(st, chunk)?;
        }
        self.log_changes(st, chunk..=chunk, None)?;
        st.speculative.remove(&chunk);
        let at = chunk * st.chunk_size();
        self.source.write_at(&data, at)?;
        // Clones that follow the source follow its rollback too.
        for (name, lun) in st.mirrors() {
            if let Err(e) = lun.write_at(&data, at) {
                warn!(pool = self.pool_name(), clone = %name, error = %e, "mirroring a restored chunk failed; the clone's log keeps it for the next sync");
            }
        }
        Ok(())
    }

    /// Sets the bits of `chunks` (already restored and flushed on the source) and makes
    /// them durable.
    fn mark_restored(&self, st: &mut State, chunks: std::ops::Range<u64>) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let layout = st.layout();
        let Some(bits) = st.restored.as_mut() else {
            return Ok(());
        };
        for c in chunks.clone() {
            bits[(c / 8) as usize] |= 1 << (c % 8);
        }
        let first = (chunks.start / 8) / UNIT * UNIT;
        let end = ((chunks.end - 1) / 8 / UNIT + 1) * UNIT;
        self.pool.write_at(
            &bits[first as usize..end as usize],
            layout.bitmap_offset + first,
        )?;
        self.pool.flush()?;
        Ok(())
    }

    /// Called under the gate before a source write to `chunk` during a rollback.
    pub(crate) fn restore_before_write(&self, st: &mut State, chunk: u64) -> Result<()> {
        let Some(target) = st.header.rollback else {
            return Ok(());
        };
        if st.is_restored(chunk) {
            return Ok(());
        }
        self.restore_chunk(st, target, chunk)?;
        self.source.flush()?;
        self.mark_restored(st, chunk..chunk + 1)
    }

    /// Restores up to `max_chunks` more chunks; returns the progress, `None` once the
    /// rollback is complete (the header is back to idle).
    pub fn rollback_step(&self, max_chunks: u64) -> Result<Option<RollbackProgress>> {
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let Some(target) = st.header.rollback else {
            return Ok(None);
        };
        let total = st.source_chunks();
        let start = st.rollback_cursor;
        let end = total.min(start + max_chunks.max(1));
        for c in start..end {
            if !st.is_restored(c) {
                self.restore_chunk(&mut st, target, c)?;
            }
        }
        self.source.flush()?;
        self.mark_restored(&mut st, start..end)?;
        st.rollback_cursor = end;
        if end < total {
            return Ok(st.rollback_progress());
        }
        let mut next = st.header.clone();
        next.rollback = None;
        self.persist_header(&mut st, next)?;
        st.restored = None;
        st.rebuild();
        info!(
            pool = self.pool_name(),
            source = self.source.name(),
            "rollback complete"
        );
        Ok(None)
    }
}
