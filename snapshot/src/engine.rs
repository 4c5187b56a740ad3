//! The engine's state: the header, the slot table mirrored in memory, and the per-chunk
//! index the hot path consults. Everything here changes under `Engine::state`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use lun::Lun;
use tracing::{info, warn};

use crate::error::{Result, SnapError};
use crate::format::{
    ENTRY, Entry, HEADER_SEALED, HEADER_SLOT, Header, Kind, Layout, MAX_NAME, MAX_SESSIONS,
    SESSION_INVALID, SESSION_WRITABLE, SessionRecord, TABLE_OFFSET, UNIT, bad_pool,
};

/// Where a chunk's preserved copies live.
#[derive(Debug, Default)]
pub(crate) struct ChunkIndex {
    /// Highest `hi` of this chunk's shared copies: every valid session with a generation
    /// below it has a copy, so a write needs one only if a valid session is at or above it.
    pub preserved_to: u64,
    /// (entry, slot) of every copy of this chunk still needed.
    pub copies: Vec<(Entry, u64)>,
}

#[derive(Debug)]
pub(crate) struct State {
    pub header: Header,
    pub slots: Vec<Option<Entry>>,
    pub free: Vec<u64>,
    pub chunks: HashMap<u64, ChunkIndex>,
    /// Highest generation of a valid session, cached so a write decides in O(1).
    pub max_valid_gen: Option<u64>,
    /// Chunks already restored by the running rollback (mirrors the on-disk bitmap).
    pub restored: Option<Vec<u8>>,
    pub rollback_cursor: u64,
    /// The last sequential preservation: (the chunk after it, its length in chunks).
    pub ahead: Option<(u64, u64)>,
    /// Chunks copied ahead of a sequential writer and not written since, with their slot:
    /// the first space to take back when the pool fills.
    pub speculative: HashMap<u64, u64>,
    /// Sequence number the next batch of copies gets.
    pub next_copy_seq: u64,
    /// Every batch of copies up to this sequence number is durable; the next header
    /// written records it.
    pub verified_seq: u64,
    /// A batch of copies failed: its entries may be on disk without their data, so the
    /// watermark stays where it was until the pool is opened again and checks them.
    pub copies_failed: bool,
    /// Fracture logs by clone slot (mirrors the on-disk bitmaps).
    pub clone_bits: HashMap<u32, Vec<u8>>,
    /// Clone LUNs attached in this process, by clone name.
    pub clone_luns: HashMap<String, Arc<dyn Lun>>,
}

#[derive(Debug)]
pub(crate) struct Engine {
    pub source: Arc<dyn Lun>,
    pub pool: Arc<dyn Lun>,
    /// Source writes hold it shared; taking a session holds it exclusive, so a session's
    /// point in time falls between writes, never inside one.
    pub gate: RwLock<()>,
    pub state: Mutex<State>,
    /// Held across a source write and its mirrored copies.
    pub mirror_order: Mutex<()>,
    /// Held across a compare-and-write's read, compare and write: every user of the source
    /// and its sessions goes through this engine (one writer process), so this makes the
    /// test-and-set atomic among them, as an OFD lock does among a machine's processes.
    pub compare_and_write: Mutex<()>,
    pub source_view_name: String,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update of the state is completed or undone before an error returns, so a panic
    // elsewhere leaves it consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    pub fn layout(&self) -> Layout {
        self.header.layout
    }

    pub fn chunk_size(&self) -> u64 {
        u64::from(self.header.layout.chunk_size)
    }

    /// Generation the source's writes belong to now.
    pub fn epoch(&self) -> u64 {
        self.header.next_gen
    }

    pub fn session(&self, name: &str) -> Option<&SessionRecord> {
        self.header.sessions.iter().find(|s| s.name == name)
    }

    pub fn session_by_gen(&self, generation: u64) -> Option<&SessionRecord> {
        self.header
            .sessions
            .iter()
            .find(|s| s.generation == generation)
    }

    fn is_needed(&self, e: &Entry) -> bool {
        let pinned = self.header.rollback;
        let valid = |g: u64| {
            pinned == Some(g)
                || self
                    .session_by_gen(g)
                    .is_some_and(|s| s.flags & SESSION_INVALID == 0)
        };
        match e.kind {
            Kind::Private => valid(e.lo),
            Kind::Shared => self
                .header
                .sessions
                .iter()
                .any(|s| e.covers(s.generation) && valid(s.generation)),
        }
    }

    /// Rebuilds the chunk index and free list from the slot table and the sessions: a
    /// copy no valid session needs is free at once.
    pub fn rebuild(&mut self) {
        self.max_valid_gen = self
            .header
            .sessions
            .iter()
            .filter(|s| s.flags & SESSION_INVALID == 0)
            .map(|s| s.generation)
            .max();
        self.chunks.clear();
        self.free.clear();
        // A slot freed here may be reused for anything: no longer a copy made ahead.
        self.speculative.clear();
        self.ahead = None;
        for slot in (0..self.slots.len() as u64).rev() {
            let entry = self.slots[slot as usize];
            match entry {
                Some(e) if self.is_needed(&e) => {
                    let index = self.chunks.entry(e.chunk).or_default();
                    if e.kind == Kind::Shared {
                        index.preserved_to = index.preserved_to.max(e.hi);
                    }
                    index.copies.push((e, slot));
                }
                _ => {
                    self.slots[slot as usize] = None;
                    self.free.push(slot);
                }
            }
        }
    }

    /// True when the first write of this epoch to `chunk` must preserve its old contents.
    pub fn needs_copy(&self, chunk: u64) -> bool {
        let preserved_to = self.chunks.get(&chunk).map_or(0, |c| c.preserved_to);
        self.max_valid_gen.is_some_and(|g| g >= preserved_to)
    }

    /// The pool slot holding session `generation`'s view of `chunk`, or `None` when the session
    /// sees the source itself.
    pub fn locate(&self, generation: u64, chunk: u64) -> Option<u64> {
        let index = self.chunks.get(&chunk)?;
        let private = index
            .copies
            .iter()
            .find(|(e, _)| e.kind == Kind::Private && e.lo == generation);
        private
            .or_else(|| {
                index
                    .copies
                    .iter()
                    .find(|(e, _)| e.kind == Kind::Shared && e.covers(generation))
            })
            .map(|&(_, slot)| slot)
    }

    pub fn insert(&mut self, slot: u64, e: Entry) {
        self.slots[slot as usize] = Some(e);
        let index = self.chunks.entry(e.chunk).or_default();
        if e.kind == Kind::Shared {
            index.preserved_to = index.preserved_to.max(e.hi);
        }
        index.copies.push((e, slot));
    }

    /// Writes `count` consecutive table sectors of `pool`, the first holding `slot`'s
    /// entry, as this table has them, in one write (each sector still written whole, so
    /// each stays atomic).
    pub fn write_entry_sectors(&self, pool: &dyn Lun, slot: u64, count: u64) -> Result<()> {
        let sector = u64::from(pool.sector_size());
        let per = sector / ENTRY as u64;
        let first = slot / per * per;
        let mut buf = vec![0u8; (count * sector) as usize];
        for i in 0..per * count {
            if let Some(e) = self.slots.get((first + i) as usize) {
                Entry::encode(e.as_ref(), &mut buf[(i as usize) * ENTRY..]);
            }
        }
        pool.write_at(&buf, TABLE_OFFSET + first * ENTRY as u64)?;
        Ok(())
    }

    /// Length of `chunk` on the source (the last one may be short).
    pub fn chunk_len(&self, chunk: u64) -> u64 {
        let cs = self.chunk_size();
        cs.min(self.header.source_size - chunk * cs)
    }

    pub fn source_chunks(&self) -> u64 {
        self.header.source_size.div_ceil(self.chunk_size())
    }
}

impl Engine {
    pub fn pool_name(&self) -> &str {
        self.pool.name()
    }

    /// Refuses a session that cannot be taken now: name in use, no room, a rollback running.
    pub fn check_new_session(&self, st: &State, name: &str) -> Result<()> {
        if st.session(name).is_some() {
            return Err(SnapError::SessionExists {
                pool: self.pool_name().to_string(),
                name: name.to_string(),
            });
        }
        check_room(self.pool_name(), st)?;
        if let Some(p) = st.rollback_progress() {
            return Err(SnapError::RollbackInProgress {
                pool: self.pool_name().to_string(),
                name: p.session,
            });
        }
        // The source's contents are still partly on the clone: a session would not see them.
        if let Some(c) = st.reverse_syncing() {
            return Err(SnapError::CloneBusy {
                pool: self.pool_name().to_string(),
                name: c.name.clone(),
                reason: "it is being copied back to the source; wait for it to finish".into(),
            });
        }
        Ok(())
    }

    /// Records a new session durably. The caller holds the gate exclusively and has
    /// flushed the source, so the session's point in time is the source as flushed.
    pub fn add_session(
        &self,
        st: &mut State,
        name: &str,
        writable: bool,
        group: u64,
    ) -> Result<SessionRecord> {
        let mut next = st.header.clone();
        let generation = next.next_gen;
        next.next_gen += 1;
        let record = SessionRecord {
            generation,
            created_unix: crate::now_unix(),
            flags: if writable { SESSION_WRITABLE } else { 0 },
            group,
            name: name.to_string(),
        };
        next.sessions.push(record.clone());
        self.persist_header(st, next)?;
        st.rebuild();
        info!(
            pool = self.pool_name(),
            source = self.source.name(),
            session = name,
            generation,
            group,
            "snapshot session created"
        );
        Ok(record)
    }

    /// Writes the header to the copy its sequence number selects and flushes: after this
    /// returns the new state survives a power cut, and a torn write leaves the other copy.
    pub fn persist_header(&self, st: &mut State, mut next: Header) -> Result<()> {
        next.seq = st.header.seq + 1;
        next.verified_seq = st.verified_seq;
        self.pool.write_at(&next.encode(), next.offset())?;
        self.pool.flush()?;
        st.header = next;
        Ok(())
    }

    /// Writes the table sector holding `slot`'s entry as the in-memory table has it.
    pub fn write_entry_sector(&self, st: &State, slot: u64) -> Result<()> {
        self.write_entry_sectors(st, slot, 1)
    }

    fn write_entry_sectors(&self, st: &State, slot: u64, count: u64) -> Result<()> {
        st.write_entry_sectors(self.pool.as_ref(), slot, count)
    }

    /// Makes `chunk`'s slot hold `data` for `entry`; `None` when the pool is full.
    pub fn store_copy(&self, st: &mut State, data: &[u8], entry: Entry) -> Result<Option<u64>> {
        if st.free.is_empty() {
            return Ok(None);
        }
        Ok(self.store_copies(st, data, &[entry])?.first().copied())
    }

    /// Puts chunk-sized pieces of `data` in free slots for `entries` (the caller checked
    /// there are enough; all of one kind) and returns the slots, in order. Everything is
    /// durable before this returns.
    ///
    /// Shared copies are written entries first, then data, and flushed once: each entry
    /// carries its data's crc32c, so after a crash an entry whose data did not land is
    /// discarded on open, and the source write it protects is only issued after the flush.
    /// Private copies are changed in place later, so their data cannot be sealed in the
    /// entry: it is flushed before the entry, as two flushes.
    pub fn store_copies(&self, st: &mut State, data: &[u8], entries: &[Entry]) -> Result<Vec<u64>> {
        let cs = st.chunk_size() as usize;
        let sealed = entries.iter().all(|e| e.kind == Kind::Shared);
        let entries: Vec<Entry> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| Entry {
                data_crc: if sealed {
                    crc32c::crc32c(&data[i * cs..(i + 1) * cs])
                } else {
                    0
                },
                seq: st.next_copy_seq,
                ..*e
            })
            .collect();
        st.next_copy_seq += 1;
        let slots: Vec<u64> = (0..entries.len()).filter_map(|_| st.free.pop()).collect();
        let outcome = (|| {
            if slots.len() < entries.len() {
                return Err(SnapError::PoolFull {
                    pool: self.pool_name().to_string(),
                });
            }
            let write_entries = |st: &mut State| -> Result<()> {
                for (&slot, e) in slots.iter().zip(&entries) {
                    st.slots[slot as usize] = Some(*e);
                }
                let per = u64::from(self.pool.sector_size()) / ENTRY as u64;
                let mut sectors: Vec<u64> = slots.iter().map(|s| s / per).collect();
                sectors.sort_unstable();
                sectors.dedup();
                // Runs of consecutive sectors take one write.
                let mut i = 0;
                while i < sectors.len() {
                    let mut n = 1;
                    while i + n < sectors.len() && sectors[i + n] == sectors[i] + n as u64 {
                        n += 1;
                    }
                    self.write_entry_sectors(st, sectors[i] * per, n as u64)?;
                    i += n;
                }
                Ok(())
            };
            // Entries before data: the order makes no difference to a disk that reorders
            // within a flush, and a cut between the two then tests the discard on open.
            if sealed {
                write_entries(st)?;
            }
            // Consecutive slots (the usual case: the free list hands them out in order)
            // take one write.
            let mut i = 0;
            while i < slots.len() {
                let mut n = 1;
                while i + n < slots.len() && slots[i + n] == slots[i] + n as u64 {
                    n += 1;
                }
                self.pool.write_at(
                    &data[i * cs..(i + n) * cs],
                    st.layout().slot_offset(slots[i]),
                )?;
                i += n;
            }
            if !sealed {
                self.pool.flush()?;
                write_entries(st)?;
            }
            self.pool.flush()?;
            Ok(())
        })();
        for &slot in &slots {
            st.slots[slot as usize] = None;
        }
        match outcome {
            Ok(()) => {
                for (&slot, e) in slots.iter().zip(&entries) {
                    st.insert(slot, *e);
                }
                if !st.copies_failed {
                    st.verified_seq = st.next_copy_seq - 1;
                }
                Ok(slots)
            }
            Err(e) => {
                st.free.extend(slots.iter().rev());
                st.copies_failed = true;
                Err(e)
            }
        }
    }

    /// Reads the pool into a new engine state, checking every record.
    pub fn load(source: &Arc<dyn Lun>, pool: &Arc<dyn Lun>) -> Result<State> {
        let header = read_header(pool.as_ref())?;
        let name = pool.name();
        if header.source_name != source.name() || header.source_size != source.size() {
            return Err(SnapError::WrongSource {
                pool: name.to_string(),
                expected: format!("{} ({} bytes)", header.source_name, header.source_size),
                found: format!("{} ({} bytes)", source.name(), source.size()),
            });
        }
        let layout = header.layout;
        if Layout::compute(pool.size(), header.source_size, layout.chunk_size) != Some(layout) {
            return Err(bad_pool(name, "layout does not match the pool's size"));
        }
        let slots = read_table(pool.as_ref(), &layout)?
            .into_iter()
            .enumerate()
            .map(|(slot, entry)| entry.map_err(|r| bad_pool(name, format!("slot {slot}: {r}"))))
            .collect::<Result<Vec<_>>>()?;
        let mut restored = None;
        if header.rollback.is_some() {
            let mut bits = vec![0u8; layout.bitmap_len as usize];
            pool.read_at(&mut bits, layout.bitmap_offset)?;
            restored = Some(bits);
        }
        let mut clone_bits = HashMap::new();
        for c in &header.clones {
            let mut bits = vec![0u8; layout.bitmap_len as usize];
            pool.read_at(&mut bits, layout.clone_bitmap(c.slot))?;
            clone_bits.insert(c.slot, bits);
        }
        let header_seq_floor = header.verified_seq + 1;
        let mut st = State {
            clone_bits,
            clone_luns: HashMap::new(),
            header,
            slots,
            free: Vec::new(),
            chunks: HashMap::new(),
            max_valid_gen: None,
            restored,
            rollback_cursor: 0,
            ahead: None,
            speculative: HashMap::new(),
            next_copy_seq: header_seq_floor,
            verified_seq: 0,
            copies_failed: false,
        };
        // A crash can leave a shared copy's entry durable without its data; the source
        // write it protected was never issued, so its sessions still see the source.
        // Copies the header vouches for are not read again.
        let vouched = st.header.verified_seq;
        let mut buf = vec![0u8; layout.chunk_size as usize];
        let mut cut_short = Vec::new();
        for slot in 0..st.slots.len() {
            let Some(e) = st.slots[slot] else { continue };
            st.next_copy_seq = st.next_copy_seq.max(e.seq + 1);
            if e.seq > vouched
                && st.is_needed(&e)
                && !copy_landed(pool.as_ref(), &layout, slot as u64, &e, &mut buf)?
            {
                warn!(
                    pool = name,
                    slot,
                    chunk = e.chunk,
                    "discarding a copy cut short by a crash: its source write was never issued"
                );
                st.slots[slot] = None;
                cut_short.push(slot as u64);
            }
        }
        st.verified_seq = vouched;
        if !pool.is_read_only() {
            // Cleared before any header can vouch for their sequence numbers.
            for &slot in &cut_short {
                st.write_entry_sectors(pool.as_ref(), slot, 1)?;
            }
            if !cut_short.is_empty() {
                pool.flush()?;
            }
            st.verified_seq = st.next_copy_seq - 1;
        }
        st.rebuild();
        Ok(st)
    }
}

/// False when `slot`'s data is not what its entry `e` was written for: a shared copy whose
/// data a crash kept from landing. `buf` is chunk-size scratch space.
pub(crate) fn copy_landed(
    pool: &dyn Lun,
    layout: &Layout,
    slot: u64,
    e: &Entry,
    buf: &mut [u8],
) -> Result<bool> {
    if e.kind == Kind::Private {
        return Ok(true);
    }
    pool.read_at(buf, layout.slot_offset(slot))?;
    Ok(e.holds(buf))
}

/// The newer valid header copy; the error names what is wrong with both when neither is.
pub(crate) fn read_header(pool: &dyn Lun) -> Result<Header> {
    if pool.size() < TABLE_OFFSET {
        return Err(bad_pool(pool.name(), "too small to hold a pool header"));
    }
    let mut best: Option<Header> = None;
    let mut reasons = Vec::new();
    for copy in 0..2 {
        let mut b = vec![0u8; HEADER_SEALED];
        pool.read_at(&mut b, copy * HEADER_SLOT)?;
        match Header::decode(&b) {
            Ok(h) if h.offset() == copy * HEADER_SLOT => {
                if best.as_ref().is_none_or(|b| h.seq > b.seq) {
                    best = Some(h);
                }
            }
            Ok(_) => reasons.push(format!("copy {copy}: sequence in the wrong copy")),
            Err(r) => reasons.push(format!("copy {copy}: {r}")),
        }
    }
    best.ok_or_else(|| bad_pool(pool.name(), reasons.join("; ")))
}

/// Every slot-table entry, each decoded or with the reason it is damaged.
pub(crate) fn read_table(
    pool: &dyn Lun,
    layout: &Layout,
) -> Result<Vec<Result<Option<Entry>, String>>> {
    let mut out = Vec::with_capacity(layout.slots as usize);
    let step = 256 * UNIT;
    let mut at = 0;
    while at < layout.table_len {
        let n = step.min(layout.table_len - at);
        let mut b = vec![0u8; n as usize];
        pool.read_at(&mut b, TABLE_OFFSET + at)?;
        for e in b.chunks_exact(ENTRY) {
            if (out.len() as u64) < layout.slots {
                out.push(Entry::decode(e));
            }
        }
        at += n;
    }
    Ok(out)
}

/// A session name: 1 to 32 bytes of letters, digits, `-`, `_`, `.` (shown in lists and
/// used on command lines, so nothing that needs quoting).
pub(crate) fn check_name(pool: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SnapError::BadName {
            pool: pool.to_string(),
            name: name.to_string(),
            reason: format!("use 1 to {MAX_NAME} letters, digits, '-', '_' or '.'"),
        })
    }
}

pub(crate) fn check_room(pool: &str, st: &State) -> Result<()> {
    if st.header.sessions.len() >= MAX_SESSIONS {
        return Err(SnapError::TooManySessions {
            pool: pool.to_string(),
            max: MAX_SESSIONS,
        });
    }
    Ok(())
}
