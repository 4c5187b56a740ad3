//! The hot path: every write to the source, and every read or write of a session, in the
//! order it happens. Rollback and clone sync reuse `preserve` from here when they write
//! the source.
//!
//! A source write, chunk by chunk: if a valid session still sees the chunk's current
//! contents on the source (some session generation at or above the chunk's
//! `preserved_to`), the old contents are read, then the slot's table entry (chunk,
//! generations `preserved_to..epoch`, crc32c of the contents) and the contents are written
//! to a free pool slot and flushed once; only then is the source written. A batch of
//! requests (`submit`) shares that one flush among all the chunks it writes first. One
//! copy serves every session in the entry's range, so the cost of a write does not depend
//! on how many sessions there are, and a later write to the chunk in the same epoch goes
//! straight to the source. With clones, the chunks are then logged in their fracture logs
//! (durably) and the write mirrored to the clones that follow the source. Because the pool
//! is durable before the source write is issued, a flush of the source only has to flush
//! the source and those clones.

use std::sync::PoisonError;

use lun::IoRequest;
use tracing::warn;

use crate::engine::{Engine, State, lock};
use crate::error::{Result, SnapError};
use crate::format::{Entry, Kind, SESSION_INVALID};

/// Most chunks one sequential copy-on-first-write preserves at once (16 MiB of 64 KiB
/// chunks): the most pool space a sequential writer can hold ahead of itself.
const PRESERVE_AHEAD: u64 = 256;

/// One piece of a request that falls inside one chunk.
struct Piece {
    chunk: u64,
    /// Offset inside the chunk.
    within: u64,
    /// Range of the caller's buffer.
    start: usize,
    end: usize,
}

fn pieces(offset: u64, len: u64, chunk_size: u64) -> impl Iterator<Item = Piece> {
    let mut at = offset;
    let end = offset + len;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let chunk = at / chunk_size;
        let within = at % chunk_size;
        let n = (chunk_size - within).min(end - at);
        let piece = Piece {
            chunk,
            within,
            start: (at - offset) as usize,
            end: (at - offset + n) as usize,
        };
        at += n;
        Some(piece)
    })
}

impl Engine {
    fn chunk_size(&self) -> u64 {
        lock(&self.state).chunk_size()
    }

    /// A write to the source through the engine.
    pub fn write_source(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let cs = self.chunk_size();
        self.prepare_to_write(offset, buf.len() as u64)?;
        // Clones: the chunks are logged before either side changes, then the write is
        // mirrored to every clone that follows the source.
        let mirrors = {
            let mut st = lock(&self.state);
            if st.header.clones.is_empty() {
                Vec::new()
            } else {
                let last = (offset + buf.len() as u64 - 1) / cs;
                self.log_changes(&mut st, offset / cs..=last, None)?;
                st.mirrors()
            }
        };
        if mirrors.is_empty() {
            self.source.write_at(buf, offset)?;
            return Ok(());
        }
        // Two overlapping writes must land in the same order on the source and its mirrors.
        let _order = lock(&self.mirror_order);
        self.source.write_at(buf, offset)?;
        for (name, lun) in mirrors {
            if let Err(e) = lun.write_at(buf, offset) {
                self.fracture_on_error(&name, e)?;
            }
        }
        Ok(())
    }

    /// Makes the chunks of a source range ready to be overwritten: restored first during
    /// a rollback, preserved for the sessions that still need them. The caller holds the
    /// gate.
    fn prepare_to_write(&self, offset: u64, len: u64) -> Result<()> {
        let cs = self.chunk_size();
        for p in pieces(offset, len, cs) {
            let mut st = lock(&self.state);
            if st.header.rollback.is_some() {
                self.restore_before_write(&mut st, p.chunk)?;
            }
            if st.needs_copy(p.chunk) {
                self.preserve(&mut st, p.chunk)?;
            }
            st.speculative.remove(&p.chunk);
        }
        Ok(())
    }

    /// Zeroes a range of the source through the engine: chunks are prepared as for a
    /// write, then the source deallocates the range (a thin source stays thin). Clones
    /// follow the source byte for byte, so with clones the zeroes are written as data.
    pub fn write_zeroes_source(&self, offset: u64, len: u64) -> Result<()> {
        let gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        if lock(&self.state).header.clones.is_empty() {
            self.prepare_to_write(offset, len)?;
            self.source.write_zeroes(offset, len)?;
            return Ok(());
        }
        // Each write takes the gate itself.
        drop(gate);
        const PIECE: u64 = 1 << 20;
        let zeroes = vec![0u8; PIECE.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done) as usize;
            self.write_source(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// A batch of independent source requests (an io_uring or NBD queue): the chunks its
    /// writes reach for the first time are preserved together, sharing one pool flush, and
    /// the batch then goes to the source as one submission. During a rollback, with
    /// clones, or when the pool cannot hold every copy, it is run request by request.
    pub fn submit_source(&self, batch: &mut [IoRequest<'_>]) -> Result<()> {
        let gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let cs = st.chunk_size();
        let mut written: Vec<u64> = batch
            .iter()
            .filter_map(|r| match r {
                IoRequest::Write { buf, offset } if !buf.is_empty() => {
                    Some(*offset / cs..=(*offset + buf.len() as u64 - 1) / cs)
                }
                _ => None,
            })
            .flatten()
            .collect();
        written.sort_unstable();
        written.dedup();
        let needed: Vec<u64> = written
            .iter()
            .copied()
            .filter(|&c| st.needs_copy(c))
            .collect();
        let simple = st.header.rollback.is_none()
            && st.header.clones.is_empty()
            && needed.len() <= st.free.len();
        if simple {
            if !needed.is_empty() {
                self.preserve_chunks(&mut st, &needed)?;
            }
            for c in &written {
                st.speculative.remove(c);
            }
            drop(st);
            self.source.submit(batch)?;
            return Ok(());
        }
        drop(st);
        // Each request takes the gate itself.
        drop(gate);
        for request in batch.iter_mut() {
            match request {
                IoRequest::Read { buf, offset } => self.read_source(buf, *offset)?,
                IoRequest::Write { buf, offset } => self.write_source(buf, *offset)?,
            }
        }
        Ok(())
    }

    /// Preserves `chunks` (sorted, each needing a copy, no more than the free slots) with
    /// one pool flush; their old contents are read as one batch.
    fn preserve_chunks(&self, st: &mut State, chunks: &[u64]) -> Result<()> {
        let cs = st.chunk_size() as usize;
        let hi = st.epoch();
        let mut data = vec![0u8; chunks.len() * cs];
        {
            let mut reads: Vec<IoRequest<'_>> = data
                .chunks_mut(cs)
                .zip(chunks)
                .map(|(buf, &c)| IoRequest::Read {
                    buf: &mut buf[..st.chunk_len(c) as usize],
                    offset: c * cs as u64,
                })
                .collect();
            self.source.submit(&mut reads)?;
        }
        let entries: Vec<Entry> = chunks
            .iter()
            .map(|&c| Entry {
                chunk: c,
                lo: st.chunks.get(&c).map_or(0, |i| i.preserved_to),
                hi,
                kind: Kind::Shared,
                // Sealed by store_copies.
                data_crc: 0,
                seq: 0,
            })
            .collect();
        self.store_copies(st, &data, &entries)?;
        Ok(())
    }

    /// Copies `chunk`'s current source contents into the pool for every session that still
    /// sees them. When the pool has no free slot, those sessions cannot be kept whole: they
    /// are invalidated (durably, before the source changes) and the write goes on.
    ///
    /// A write right after the previous chunk's copy is taken as sequential, and the next
    /// chunks that need a copy are preserved with it (as readahead does for reads): the
    /// flushes, which dominate the cost, are then paid once per run instead of per chunk.
    /// A chunk that already has its copy ends the run.
    /// A chunk preserved early holds exactly what its sessions see, so this only spends
    /// pool space a sequential writer is about to need anyway.
    pub(crate) fn preserve(&self, st: &mut State, chunk: u64) -> Result<()> {
        let hi = st.epoch();
        let lo_of = |st: &State, c: u64| st.chunks.get(&c).map_or(0, |i| i.preserved_to);
        if st.free.is_empty() && !self.reclaim_speculative(st)? {
            let lo = lo_of(st, chunk);
            return self.invalidate_from(st, chunk, lo);
        }
        // Like readahead, the run doubles while the writer keeps consuming it.
        let wanted = match st.ahead {
            Some((next, len)) if next == chunk => (len * 2).min(PRESERVE_AHEAD),
            _ if chunk > 0 && lo_of(st, chunk - 1) == hi => 4,
            _ => 1,
        };
        let limit = wanted.min(st.free.len() as u64);
        let mut run = 1;
        while run < limit && chunk + run < st.source_chunks() && st.needs_copy(chunk + run) {
            run += 1;
        }
        st.ahead = Some((chunk + run, run));
        let cs = st.chunk_size();
        let mut data = vec![0u8; (run * cs) as usize];
        let len = (run - 1) * cs + st.chunk_len(chunk + run - 1);
        self.source.read_at(&mut data[..len as usize], chunk * cs)?;
        let entries: Vec<Entry> = (chunk..chunk + run)
            .map(|c| Entry {
                chunk: c,
                lo: lo_of(st, c),
                hi,
                kind: Kind::Shared,
                // Sealed by store_copies.
                data_crc: 0,
                seq: 0,
            })
            .collect();
        let slots = self.store_copies(st, &data, &entries)?;
        for (e, &slot) in entries.iter().zip(&slots).skip(1) {
            st.speculative.insert(e.chunk, slot);
        }
        Ok(())
    }

    /// Frees the copies made ahead of a sequential writer that it never reached: their
    /// chunks are unchanged on the source, so the sessions read them there again. The
    /// entries are cleared durably before their slots can be reused.
    fn reclaim_speculative(&self, st: &mut State) -> Result<bool> {
        let spec: Vec<(u64, u64)> = st.speculative.drain().collect();
        if spec.is_empty() {
            return Ok(false);
        }
        for &(chunk, slot) in &spec {
            st.slots[slot as usize] = None;
            if let Some(index) = st.chunks.get_mut(&chunk) {
                index.copies.retain(|&(_, s)| s != slot);
                index.preserved_to = index
                    .copies
                    .iter()
                    .filter(|(e, _)| e.kind == Kind::Shared)
                    .map(|(e, _)| e.hi)
                    .max()
                    .unwrap_or(0);
            }
        }
        for &(_, slot) in &spec {
            self.write_entry_sector(st, slot)?;
        }
        self.pool.flush()?;
        st.free.extend(spec.iter().map(|&(_, slot)| slot));
        st.ahead = None;
        Ok(true)
    }

    fn invalidate_from(&self, st: &mut State, chunk: u64, lo: u64) -> Result<()> {
        let mut next = st.header.clone();
        let mut lost = Vec::new();
        for s in next.sessions.iter_mut() {
            if s.generation >= lo && s.flags & SESSION_INVALID == 0 {
                s.flags |= SESSION_INVALID;
                lost.push(s.name.clone());
            }
        }
        self.persist_header(st, next)?;
        st.rebuild();
        warn!(
            pool = self.pool_name(),
            source = self.source.name(),
            chunk,
            sessions = ?lost,
            free_slots = st.free.len(),
            "snapshot pool full: sessions invalidated to keep the source writable"
        );
        Ok(())
    }

    fn session_check(&self, st: &State, generation: u64, name: &str) -> Result<()> {
        match st.session_by_gen(generation) {
            None => Err(SnapError::UnknownSession {
                pool: self.pool_name().to_string(),
                name: name.to_string(),
            }),
            Some(s) if s.flags & SESSION_INVALID != 0 => Err(SnapError::SessionInvalid {
                pool: self.pool_name().to_string(),
                name: name.to_string(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Reads session `generation`'s point in time. The slot is looked up, the data read without the
    /// lock, and the lookup repeated: a concurrent source write preserves the chunk before
    /// it changes the source, so an unchanged lookup proves the bytes read are the right ones.
    pub fn read_session(
        &self,
        generation: u64,
        name: &str,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let cs = self.chunk_size();
        for p in pieces(offset, buf.len() as u64, cs) {
            let piece = &mut buf[p.start..p.end];
            loop {
                let (slot, slot_offset) = {
                    let st = lock(&self.state);
                    self.session_check(&st, generation, name)?;
                    let slot = st.locate(generation, p.chunk);
                    (slot, slot.map(|s| st.layout().slot_offset(s)))
                };
                match slot_offset {
                    Some(at) => self.pool.read_at(piece, at + p.within)?,
                    None => self.source.read_at(piece, p.chunk * cs + p.within)?,
                }
                let st = lock(&self.state);
                self.session_check(&st, generation, name)?;
                if st.locate(generation, p.chunk) == slot {
                    break;
                }
            }
        }
        Ok(())
    }

    /// A write to a writable session: the first write to a chunk gives the session its own
    /// copy (its current view merged with the new bytes, durable before its table entry);
    /// later writes go to that copy. The source is never touched.
    pub fn write_session(
        &self,
        generation: u64,
        name: &str,
        buf: &[u8],
        offset: u64,
    ) -> Result<()> {
        let mut st = lock(&self.state);
        self.session_check(&st, generation, name)?;
        // The source is being copied from this session: it must hold still until done.
        if st.header.rollback == Some(generation) {
            return Err(SnapError::RollbackInProgress {
                pool: self.pool_name().to_string(),
                name: name.to_string(),
            });
        }
        let cs = st.chunk_size();
        for p in pieces(offset, buf.len() as u64, cs) {
            let own = st.chunks.get(&p.chunk).and_then(|c| {
                c.copies
                    .iter()
                    .find(|(e, _)| e.kind == Kind::Private && e.lo == generation)
                    .map(|&(_, slot)| slot)
            });
            if let Some(slot) = own {
                let at = st.layout().slot_offset(slot) + p.within;
                self.pool.write_at(&buf[p.start..p.end], at)?;
                continue;
            }
            let mut data = vec![0u8; cs as usize];
            let len = st.chunk_len(p.chunk) as usize;
            match st.locate(generation, p.chunk) {
                Some(slot) => self
                    .pool
                    .read_at(&mut data[..len], st.layout().slot_offset(slot))?,
                None => self.source.read_at(&mut data[..len], p.chunk * cs)?,
            }
            let w = p.within as usize;
            data[w..w + (p.end - p.start)].copy_from_slice(&buf[p.start..p.end]);
            let entry = Entry {
                chunk: p.chunk,
                lo: generation,
                hi: generation + 1,
                kind: Kind::Private,
                data_crc: 0,
                seq: 0,
            };
            if self.store_copy(&mut st, &data, entry)?.is_none() {
                return Err(SnapError::PoolFull {
                    pool: self.pool_name().to_string(),
                });
            }
        }
        Ok(())
    }

    /// A read of the source: during a rollback, chunks not yet copied back are read from
    /// the session being restored.
    /// Whether the source view may hold data in the range: the source's own answer,
    /// except while a rollback or reverse sync redirects reads elsewhere.
    pub fn source_may_hold_data(&self, offset: u64, len: u64) -> Result<bool> {
        let st = lock(&self.state);
        if st.header.rollback.is_some() || st.reverse_syncing().is_some() {
            return Ok(true);
        }
        drop(st);
        Ok(self.source.may_hold_data(offset, len)?)
    }

    pub fn read_source(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let st = lock(&self.state);
        if st.header.rollback.is_none() && st.reverse_syncing().is_none() {
            drop(st);
            self.source.read_at(buf, offset)?;
            return Ok(());
        }
        let cs = st.chunk_size();
        for p in pieces(offset, buf.len() as u64, cs) {
            let piece = &mut buf[p.start..p.end];
            if let Some(clone) = st.reverse_source(p.chunk) {
                clone.read_at(piece, p.chunk * cs + p.within)?;
                continue;
            }
            let from_pool = match st.header.rollback {
                Some(target) if !st.is_restored(p.chunk) => st.locate(target, p.chunk),
                _ => None,
            };
            match from_pool {
                Some(slot) => self
                    .pool
                    .read_at(piece, st.layout().slot_offset(slot) + p.within)?,
                None => self.source.read_at(piece, p.chunk * cs + p.within)?,
            }
        }
        Ok(())
    }
}
