//! The pool's on-disk layout, byte for byte as FORMAT.md describes it: fixed little-endian
//! fields, every record sealed with crc32c.

use crate::error::{Result, SnapError};

pub(crate) const MAGIC: &[u8; 8] = b"VSNPPOOL";
pub(crate) const VERSION: u32 = 2;
/// Each header copy: 4 KiB of fixed fields, then the session records.
pub(crate) const HEADER_SLOT: u64 = 32 * 1024;
pub(crate) const HEADER_SEALED: usize = 4096 + MAX_SESSIONS * SESSION_RECORD;
pub(crate) const SESSION_RECORD: usize = 64;
pub(crate) const MAX_SESSIONS: usize = 256;
pub(crate) const MAX_NAME: usize = 32;
pub(crate) const MAX_SOURCE_NAME: usize = 256;
pub(crate) const TABLE_OFFSET: u64 = 2 * HEADER_SLOT;
pub(crate) const ENTRY: usize = 64;
/// Where an entry's own crc32c sits: it seals bytes `0..ENTRY_CRC`.
const ENTRY_CRC: usize = 60;
/// Metadata regions are aligned to this unit so any sector size up to 4 KiB works.
pub(crate) const UNIT: u64 = 4096;

/// Clones one pool keeps; each has a fracture-log bitmap after the rollback bitmap.
pub(crate) const MAX_CLONES: usize = 8;
const CLONE_RECORDS: usize = 1024;
const CLONE_RECORD: usize = 320;

pub(crate) const SESSION_WRITABLE: u32 = 1;
pub(crate) const SESSION_INVALID: u32 = 2;

/// One snapshot session as recorded in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionRecord {
    pub generation: u64,
    pub created_unix: u64,
    pub flags: u32,
    /// Consistency group id, 0 for a session taken alone.
    pub group: u64,
    pub name: String,
}

/// Where everything lives in the pool; fixed when the pool is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub chunk_size: u32,
    pub slots: u64,
    pub table_len: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub data_offset: u64,
}

impl Layout {
    /// Places table, rollback bitmap and data for a pool of `pool_size` bytes; `None` when
    /// not even one chunk fits.
    pub fn compute(pool_size: u64, source_size: u64, chunk_size: u32) -> Option<Layout> {
        let chunk = u64::from(chunk_size);
        let source_chunks = source_size.div_ceil(chunk);
        let bitmap_len = source_chunks.div_ceil(8).next_multiple_of(UNIT);
        // The table for pool_size/chunk slots is at least as large as the one needed, so
        // shrinking the slot count to what remains keeps everything inside the pool.
        let mut slots = pool_size / chunk;
        let table_len = (slots * ENTRY as u64).next_multiple_of(UNIT);
        let bitmap_offset = TABLE_OFFSET + table_len;
        let bitmaps = (1 + MAX_CLONES as u64) * bitmap_len;
        let data_offset = (bitmap_offset + bitmaps).next_multiple_of(chunk);
        slots = pool_size.checked_sub(data_offset)? / chunk;
        (slots > 0).then_some(Layout {
            chunk_size,
            slots,
            table_len,
            bitmap_offset,
            bitmap_len,
            data_offset,
        })
    }

    /// Where clone slot `i`'s fracture log lives.
    pub fn clone_bitmap(&self, i: u32) -> u64 {
        self.bitmap_offset + (1 + u64::from(i)) * self.bitmap_len
    }

    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.data_offset + slot * u64::from(self.chunk_size)
    }
}

/// The pool header: one of two alternating copies, the valid one with the higher sequence
/// number wins, so a torn header write never loses the previous state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub seq: u64,
    pub uuid: [u8; 16],
    pub source_size: u64,
    pub source_name: String,
    pub next_gen: u64,
    pub layout: Layout,
    /// Generation of the session the source is being rolled back to.
    pub rollback: Option<u64>,
    pub sessions: Vec<SessionRecord>,
    pub clones: Vec<CloneRecord>,
    /// Every shared copy with a sequence number up to this one was durable, data and
    /// entry, when this header was written: open checks only the copies after it.
    pub verified_seq: u64,
}

/// Where a clone stands; the numbers are the on-disk state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneState {
    /// Copying the chunks its fracture log names from the source; writes are mirrored.
    Syncing = 1,
    /// A copy of the source kept equal by mirrored writes.
    Synchronized = 2,
    /// Independent: both sides take writes, logged for the next sync.
    Fractured = 3,
    /// Copying the chunks its fracture log names back to the source; the source reads
    /// them from the clone meanwhile, and writes are mirrored.
    ReverseSyncing = 4,
}

/// A clone as recorded in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloneRecord {
    pub state: CloneState,
    /// Which fracture-log bitmap it owns.
    pub slot: u32,
    pub name: String,
    pub lun_name: String,
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// crc32c of `b` with the 4 bytes at `at` read as zero.
fn seal_crc(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

impl Header {
    /// The header copy this one goes to: sequence numbers alternate between the two.
    pub fn offset(&self) -> u64 {
        (self.seq % 2) * HEADER_SLOT
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SEALED];
        b[0..8].copy_from_slice(MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u64(&mut b, 16, self.seq);
        b[24..40].copy_from_slice(&self.uuid);
        put_u32(&mut b, 40, self.layout.chunk_size);
        put_u64(&mut b, 48, self.source_size);
        put_u64(&mut b, 56, self.next_gen);
        put_u64(&mut b, 64, self.layout.slots);
        put_u64(&mut b, 72, self.layout.table_len);
        put_u64(&mut b, 80, self.layout.bitmap_offset);
        put_u64(&mut b, 88, self.layout.bitmap_len);
        put_u64(&mut b, 96, self.layout.data_offset);
        put_u32(&mut b, 104, u32::from(self.rollback.is_some()));
        put_u64(&mut b, 112, self.rollback.unwrap_or(0));
        put_u32(&mut b, 120, self.sessions.len() as u32);
        put_u32(&mut b, 124, self.clones.len() as u32);
        put_u64(&mut b, 512, self.verified_seq);
        for (i, c) in self.clones.iter().enumerate() {
            let r = CLONE_RECORDS + i * CLONE_RECORD;
            put_u32(&mut b, r, c.state as u32);
            put_u32(&mut b, r + 4, c.slot);
            b[r + 8] = c.name.len() as u8;
            b[r + 16..r + 16 + c.name.len()].copy_from_slice(c.name.as_bytes());
            b[r + 48..r + 50].copy_from_slice(&(c.lun_name.len() as u16).to_le_bytes());
            b[r + 50..r + 50 + c.lun_name.len()].copy_from_slice(c.lun_name.as_bytes());
        }
        let name = self.source_name.as_bytes();
        b[128..130].copy_from_slice(&(name.len() as u16).to_le_bytes());
        b[130..130 + name.len()].copy_from_slice(name);
        for (i, s) in self.sessions.iter().enumerate() {
            let r = 4096 + i * SESSION_RECORD;
            put_u64(&mut b, r, s.generation);
            put_u64(&mut b, r + 8, s.created_unix);
            put_u32(&mut b, r + 16, s.flags);
            b[r + 20] = s.name.len() as u8;
            b[r + 24..r + 24 + s.name.len()].copy_from_slice(s.name.as_bytes());
            put_u64(&mut b, r + 56, s.group);
        }
        let crc = seal_crc(&b, 12);
        put_u32(&mut b, 12, crc);
        b
    }

    /// Decodes one header copy; the error says which check failed.
    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_SEALED {
            return Err("short header".into());
        }
        let b = &b[..HEADER_SEALED];
        if &b[0..8] != MAGIC {
            return Err("bad magic (not a snapshot pool)".into());
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return Err(format!(
                "unsupported version {version} (this build reads {VERSION})"
            ));
        }
        if get_u32(b, 12) != seal_crc(b, 12) {
            return Err("header checksum mismatch".into());
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        let count = get_u32(b, 120) as usize;
        let name_len = usize::from(u16::from_le_bytes([b[128], b[129]]));
        if count > MAX_SESSIONS || name_len > MAX_SOURCE_NAME {
            return Err("session count or source name length out of range".into());
        }
        let source_name = String::from_utf8(b[130..130 + name_len].to_vec())
            .map_err(|_| "source name is not UTF-8".to_string())?;
        let mut sessions = Vec::with_capacity(count);
        for i in 0..count {
            let r = 4096 + i * SESSION_RECORD;
            let len = usize::from(b[r + 20]);
            if len == 0 || len > MAX_NAME {
                return Err(format!("session record {i}: bad name length {len}"));
            }
            let name = String::from_utf8(b[r + 24..r + 24 + len].to_vec())
                .map_err(|_| format!("session record {i}: name is not UTF-8"))?;
            sessions.push(SessionRecord {
                generation: get_u64(b, r),
                created_unix: get_u64(b, r + 8),
                flags: get_u32(b, r + 16),
                group: get_u64(b, r + 56),
                name,
            });
        }
        let clone_count = get_u32(b, 124) as usize;
        if clone_count > MAX_CLONES {
            return Err(format!(
                "{clone_count} clones recorded, at most {MAX_CLONES}"
            ));
        }
        let mut clones = Vec::with_capacity(clone_count);
        for i in 0..clone_count {
            let r = CLONE_RECORDS + i * CLONE_RECORD;
            let state = match get_u32(b, r) {
                1 => CloneState::Syncing,
                2 => CloneState::Synchronized,
                3 => CloneState::Fractured,
                4 => CloneState::ReverseSyncing,
                s => return Err(format!("clone record {i}: unknown state {s}")),
            };
            let slot = get_u32(b, r + 4);
            let len = usize::from(b[r + 8]);
            let lun_len = usize::from(u16::from_le_bytes([b[r + 48], b[r + 49]]));
            if slot as usize >= MAX_CLONES
                || len == 0
                || len > MAX_NAME
                || lun_len > MAX_SOURCE_NAME
            {
                return Err(format!("clone record {i}: slot or name out of range"));
            }
            let text = |at: usize, n: usize| {
                String::from_utf8(b[at..at + n].to_vec())
                    .map_err(|_| format!("clone record {i}: name is not UTF-8"))
            };
            clones.push(CloneRecord {
                state,
                slot,
                name: text(r + 16, len)?,
                lun_name: text(r + 50, lun_len)?,
            });
        }
        let chunk_size = get_u32(b, 40);
        if !chunk_size.is_power_of_two() {
            return Err(format!("chunk size {chunk_size} is not a power of two"));
        }
        Ok(Header {
            seq: get_u64(b, 16),
            uuid,
            source_size: get_u64(b, 48),
            source_name,
            next_gen: get_u64(b, 56),
            layout: Layout {
                chunk_size,
                slots: get_u64(b, 64),
                table_len: get_u64(b, 72),
                bitmap_offset: get_u64(b, 80),
                bitmap_len: get_u64(b, 88),
                data_offset: get_u64(b, 96),
            },
            rollback: (get_u32(b, 104) != 0).then(|| get_u64(b, 112)),
            sessions,
            clones,
            verified_seq: get_u64(b, 512),
        })
    }
}

/// What a pool slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The old contents of a source chunk, serving sessions with generation in `lo..hi`.
    Shared,
    /// A writable session's own copy of a chunk; the session's generation is `lo`.
    Private,
}

/// One slot-table entry: which source chunk a pool slot holds and for whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub chunk: u64,
    pub lo: u64,
    pub hi: u64,
    pub kind: Kind,
    /// Shared copies only: crc32c of the slot's chunk-size data. The entry and its data
    /// are made durable by one flush, so on open a copy whose data does not match was
    /// never completed (and the source write it protected never issued). 0 for private
    /// copies, whose data changes in place after the entry is written.
    pub data_crc: u32,
    /// Sequence number of the batch of copies that wrote this entry (see
    /// `Header::verified_seq`).
    pub seq: u64,
}

impl Entry {
    pub fn covers(&self, generation: u64) -> bool {
        self.lo <= generation && generation < self.hi
    }

    /// True when `data` (the slot's chunk-size contents) is what this entry was written
    /// for; always true for a private copy.
    pub fn holds(&self, data: &[u8]) -> bool {
        self.kind == Kind::Private || crc32c::crc32c(data) == self.data_crc
    }

    pub fn encode(entry: Option<&Entry>, b: &mut [u8]) {
        b[..ENTRY].fill(0);
        let Some(e) = entry else { return };
        put_u64(b, 0, e.chunk);
        put_u64(b, 8, e.lo);
        put_u64(b, 16, e.hi);
        b[24] = match e.kind {
            Kind::Shared => 1,
            Kind::Private => 2,
        };
        put_u32(b, 28, e.data_crc);
        put_u64(b, 32, e.seq);
        let crc = crc32c::crc32c(&b[..ENTRY_CRC]);
        put_u32(b, ENTRY_CRC, crc);
    }

    /// `Ok(None)` for a free entry (all zero).
    pub fn decode(b: &[u8]) -> Result<Option<Entry>, String> {
        let b = &b[..ENTRY];
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if get_u32(b, ENTRY_CRC) != crc32c::crc32c(&b[..ENTRY_CRC]) {
            return Err("checksum mismatch".into());
        }
        let kind = match b[24] {
            1 => Kind::Shared,
            2 => Kind::Private,
            k => return Err(format!("unknown kind {k}")),
        };
        let e = Entry {
            chunk: get_u64(b, 0),
            lo: get_u64(b, 8),
            hi: get_u64(b, 16),
            kind,
            data_crc: get_u32(b, 28),
            seq: get_u64(b, 32),
        };
        if e.lo >= e.hi {
            return Err(format!("empty generation range {}..{}", e.lo, e.hi));
        }
        Ok(Some(e))
    }
}

pub(crate) fn bad_pool(pool: &str, reason: impl Into<String>) -> SnapError {
    SnapError::BadPool {
        pool: pool.to_string(),
        reason: reason.into(),
    }
}
