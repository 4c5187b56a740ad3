//! The metadata area of one side of a link (layout in FORMAT.md): two header copies, the
//! activity log and the dirty bitmap, all on a metadata LUN of their own so that every
//! byte of the replicated LUN stays its user's.

use std::collections::BTreeSet;
use std::sync::Arc;

use lun::Lun;

use crate::error::{ReplError, Result};

pub const MAGIC: [u8; 8] = *b"VAPPRPL1";
pub const AL_MAGIC: [u8; 8] = *b"VRPLACTL";
pub const VERSION: u32 = 1;
/// Every metadata write is a whole 4 KiB block, legal on 512- and 4096-byte sectors.
pub const BLOCK: u64 = 4096;
pub const HEADER_SLOTS: u64 = 2;
pub const AL_OFFSET: u64 = HEADER_SLOTS * BLOCK;
pub const AL_SLOTS: u64 = 2;
pub const BITMAP_OFFSET: u64 = AL_OFFSET + AL_SLOTS * BLOCK;
const CRC_AT: usize = 4092;
const AL_FIRST: usize = 24;
pub const AL_MAX_EXTENTS: u32 = ((CRC_AT - AL_FIRST) / 8) as u32;

/// This side is (or was last) the primary: writers reach the LUN here.
pub const FLAG_PRIMARY: u32 = 1 << 0;
/// Secondary only: a resync is being applied, the replica is not a point in time.
pub const FLAG_INCONSISTENT: u32 = 1 << 1;
/// Primary only: a resync is under way; `resync_cursor` says where it resumes.
pub const FLAG_RESYNC: u32 = 1 << 2;
/// The link was fractured on command and stays fractured across restarts until resumed.
pub const FLAG_FRACTURED: u32 = 1 << 3;
/// Secondary only: the operator chose this side to lose what it wrote that the primary
/// never got (`--discard-local`); the next resync overwrites those regions.
pub const FLAG_DISCARD: u32 = 1 << 4;
/// Secondary only: an asynchronous delta set is being applied; the `gold` snapshot holds
/// the last complete one, and a cut link or a restart rolls back to it.
pub const FLAG_APPLYING: u32 = 1 << 5;
/// Primary only: an online verify is under way; `verify_cursor` says where it resumes.
pub const FLAG_VERIFY: u32 = 1 << 6;
/// Secondary only, in a consistency group: a delta set (`ended_id`) is applied whole
/// here but waits for the group's commit; the `gold` snapshot still holds the last
/// committed one. Recovery commits it if any member of the group took part in commit
/// `ended_group_seq`, else rolls it back.
pub const FLAG_ENDED: u32 = 1 << 7;

/// Generation identifiers, as DRBD keeps them: the data's current generation, the
/// generation the bitmap started tracking from (0 when in sync), and two older ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gens {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

impl Gens {
    /// A fresh generation: random so that two sites never pick the same one.
    pub fn new_id() -> u64 {
        loop {
            let g: u64 = rand::random();
            if g > 1 {
                return g;
            }
        }
    }

    /// Starts a new generation, remembering where the bitmap began tracking.
    pub fn fork(&mut self) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        }
        self.history = [self.current, self.history[0]];
        self.current = Gens::new_id();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub seq: u64,
    pub flags: u32,
    pub lun_size: u64,
    pub region_size: u32,
    pub al_extent_size: u32,
    pub al_capacity: u32,
    pub gens: Gens,
    /// The peer's current generation last seen while connected.
    pub peer_current: u64,
    pub resync_total: u64,
    /// Secondary: the last delta set applied whole, and when the primary cut it
    /// (milliseconds since the Unix epoch): the replica's point in time.
    pub delta_id: u64,
    pub delta_cut_ms: u64,
    /// Primary: the first region the running verify has not compared yet, and the
    /// differences it found so far.
    pub verify_cursor: u64,
    pub verify_diffs: u64,
    /// Secondary in a group: the last group commit this member took part in.
    pub group_seq: u64,
    /// Secondary with `FLAG_ENDED`: the set applied whole, when it was cut, and the group
    /// commit that will make it visible.
    pub ended_id: u64,
    pub ended_cut_ms: u64,
    pub ended_group_seq: u64,
}

impl Header {
    pub fn regions(&self) -> u64 {
        self.lun_size.div_ceil(u64::from(self.region_size))
    }

    pub fn bitmap_len(&self) -> u64 {
        self.regions().div_ceil(8).next_multiple_of(BLOCK)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        b[0..8].copy_from_slice(&MAGIC);
        put32(&mut b, 8, VERSION);
        put32(&mut b, 12, self.flags);
        put64(&mut b, 16, self.seq);
        put64(&mut b, 24, self.lun_size);
        put32(&mut b, 32, self.region_size);
        put32(&mut b, 36, self.al_extent_size);
        put32(&mut b, 40, self.al_capacity);
        put64(&mut b, 48, self.gens.current);
        put64(&mut b, 56, self.gens.bitmap);
        put64(&mut b, 64, self.gens.history[0]);
        put64(&mut b, 72, self.gens.history[1]);
        put64(&mut b, 80, self.peer_current);
        put64(&mut b, 88, self.delta_id);
        put64(&mut b, 96, self.resync_total);
        put64(&mut b, 104, self.delta_cut_ms);
        put64(&mut b, 112, self.verify_cursor);
        put64(&mut b, 120, self.verify_diffs);
        put64(&mut b, 128, self.group_seq);
        put64(&mut b, 136, self.ended_id);
        put64(&mut b, 144, self.ended_cut_ms);
        put64(&mut b, 152, self.ended_group_seq);
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        put32(&mut b, CRC_AT, crc);
        b
    }

    pub fn decode(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < BLOCK as usize || b[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        if get32(b, CRC_AT) != crc32c::crc32c(&b[..CRC_AT]) {
            return Err("header checksum mismatch".into());
        }
        let version = get32(b, 8);
        if version != VERSION {
            return Err(format!(
                "metadata version {version}, this vapp reads {VERSION}"
            ));
        }
        let h = Header {
            flags: get32(b, 12),
            seq: get64(b, 16),
            lun_size: get64(b, 24),
            region_size: get32(b, 32),
            al_extent_size: get32(b, 36),
            al_capacity: get32(b, 40),
            gens: Gens {
                current: get64(b, 48),
                bitmap: get64(b, 56),
                history: [get64(b, 64), get64(b, 72)],
            },
            peer_current: get64(b, 80),
            resync_total: get64(b, 96),
            delta_id: get64(b, 88),
            delta_cut_ms: get64(b, 104),
            verify_cursor: get64(b, 112),
            verify_diffs: get64(b, 120),
            group_seq: get64(b, 128),
            ended_id: get64(b, 136),
            ended_cut_ms: get64(b, 144),
            ended_group_seq: get64(b, 152),
        };
        check_geometry(h.region_size, h.al_extent_size, h.al_capacity)?;
        Ok(h)
    }
}

pub fn check_geometry(
    region_size: u32,
    al_extent_size: u32,
    al_capacity: u32,
) -> std::result::Result<(), String> {
    if !region_size.is_power_of_two() || !(4096..=(16 << 20)).contains(&region_size) {
        return Err(format!(
            "region size {region_size} is not a power of two from 4 KiB to 16 MiB"
        ));
    }
    if !al_extent_size.is_power_of_two() || al_extent_size < region_size {
        return Err(format!(
            "activity-log extent {al_extent_size} is not a power of two of at least the region size"
        ));
    }
    if al_capacity == 0 || al_capacity > AL_MAX_EXTENTS {
        return Err(format!(
            "activity-log capacity {al_capacity} is not from 1 to {AL_MAX_EXTENTS} extents"
        ));
    }
    Ok(())
}

/// The metadata of one side, in memory and on its LUN.
#[derive(Debug)]
pub struct MetaStore {
    lun: Arc<dyn Lun>,
    pub header: Header,
    /// One bit per region, as on disk.
    bits: Vec<u64>,
    dirty_pages: BTreeSet<u64>,
    /// Hot extents, least recently used first.
    al: Vec<u64>,
    al_seq: u64,
}

const WORDS_PER_PAGE: u64 = BLOCK / 8;

impl MetaStore {
    pub fn name(&self) -> &str {
        self.lun.name()
    }

    /// Writes fresh metadata for a LUN of `lun_size` bytes, refusing (changing nothing) a
    /// metadata LUN that is too small or already holds replication metadata.
    pub fn format(meta: Arc<dyn Lun>, mut header: Header) -> Result<MetaStore> {
        let name = meta.name().to_string();
        check_geometry(
            header.region_size,
            header.al_extent_size,
            header.al_capacity,
        )
        .map_err(|reason| ReplError::BadConfig {
            lun: name.clone(),
            reason,
        })?;
        if meta.sector_size() > BLOCK as u32 {
            return Err(ReplError::BadConfig {
                lun: name,
                reason: format!("sector size {} above 4096", meta.sector_size()),
            });
        }
        let needed = BITMAP_OFFSET + header.bitmap_len();
        if meta.size() < needed {
            return Err(ReplError::MetadataTooSmall {
                meta: name,
                needed,
                size: meta.size(),
            });
        }
        if read_best_header(&*meta)?.is_some() {
            return Err(ReplError::AlreadyFormatted { meta: name });
        }
        meta.write_zeroes(0, needed)?;
        meta.flush()?;
        header.seq = 1;
        meta.write_at(&header.encode(), 0)?;
        meta.flush()?;
        MetaStore::open(meta)
    }

    pub fn open(meta: Arc<dyn Lun>) -> Result<MetaStore> {
        let name = meta.name().to_string();
        let Some(header) = read_best_header(&*meta)? else {
            return Err(ReplError::BadMetadata {
                meta: name,
                reason: "no valid header copy".into(),
            });
        };
        let len = header.bitmap_len();
        if meta.size() < BITMAP_OFFSET + len {
            return Err(ReplError::MetadataTooSmall {
                meta: name,
                needed: BITMAP_OFFSET + len,
                size: meta.size(),
            });
        }
        let mut raw = vec![0u8; len as usize];
        meta.read_at(&mut raw, BITMAP_OFFSET)?;
        let bits = raw
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
            .collect();
        // The log alternates between two slots, so a torn write leaves the previous log,
        // which holds every extent the torn one would have (but the one being added,
        // whose writes had not started).
        let mut al_seq = 0;
        let mut al = Vec::new();
        for slot in 0..AL_SLOTS {
            let mut raw = vec![0u8; BLOCK as usize];
            meta.read_at(&mut raw, AL_OFFSET + slot * BLOCK)?;
            if let Some((seq, extents)) = decode_al(&raw)
                && seq > al_seq
            {
                al_seq = seq;
                al = extents;
            }
        }
        Ok(MetaStore {
            lun: meta,
            header,
            bits,
            dirty_pages: BTreeSet::new(),
            al,
            al_seq,
        })
    }

    /// Persists the header into the older slot, so a torn write leaves the newer intact.
    pub fn write_header(&mut self) -> Result<()> {
        self.header.seq += 1;
        let slot = self.header.seq % HEADER_SLOTS;
        self.lun.write_at(&self.header.encode(), slot * BLOCK)?;
        self.lun.flush()?;
        Ok(())
    }

    pub fn region_size(&self) -> u64 {
        u64::from(self.header.region_size)
    }

    pub fn regions(&self) -> u64 {
        self.header.regions()
    }

    /// Regions `offset..offset+len` touches.
    pub fn region_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let r = self.region_size();
        if len == 0 {
            return offset / r..offset / r;
        }
        offset / r..(offset + len).div_ceil(r)
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        self.bits
            .get((region / 64) as usize)
            .is_some_and(|w| w & (1 << (region % 64)) != 0)
    }

    /// Marks regions dirty in memory; [`MetaStore::persist_bitmap`] makes it durable.
    /// Returns true when a bit was newly set.
    pub fn mark(&mut self, regions: std::ops::Range<u64>) -> bool {
        let mut changed = false;
        for r in regions {
            let Some(w) = self.bits.get_mut((r / 64) as usize) else {
                continue;
            };
            if *w & (1 << (r % 64)) == 0 {
                *w |= 1 << (r % 64);
                self.dirty_pages.insert(r / 64 / WORDS_PER_PAGE);
                changed = true;
            }
        }
        changed
    }

    pub fn clear(&mut self, region: u64) {
        if let Some(w) = self.bits.get_mut((region / 64) as usize)
            && *w & (1 << (region % 64)) != 0
        {
            *w &= !(1 << (region % 64));
            self.dirty_pages.insert(region / 64 / WORDS_PER_PAGE);
        }
    }

    /// Every region in sync (a resync ended); [`MetaStore::persist_bitmap`] makes it durable.
    pub fn clear_all(&mut self) {
        for (i, w) in self.bits.iter_mut().enumerate() {
            if *w != 0 {
                *w = 0;
                self.dirty_pages.insert(i as u64 / WORDS_PER_PAGE);
            }
        }
    }

    /// The peer's dirty regions join ours: what it wrote that we never got is copied
    /// over from here too.
    pub fn merge_words(&mut self, words: &[u64]) {
        for (i, (w, o)) in self.bits.iter_mut().zip(words).enumerate() {
            if *w | o != *w {
                *w |= o;
                self.dirty_pages.insert(i as u64 / WORDS_PER_PAGE);
            }
        }
    }

    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    pub fn dirty_count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first dirty region at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        let regions = self.regions();
        let mut r = from;
        while r < regions {
            let w = self.bits.get((r / 64) as usize)? >> (r % 64);
            if w != 0 {
                let found = r + u64::from(w.trailing_zeros());
                return (found < regions).then_some(found);
            }
            r = (r / 64 + 1) * 64;
        }
        None
    }

    /// Writes the bitmap pages changed since the last call, then flushes.
    pub fn persist_bitmap(&mut self) -> Result<()> {
        if self.dirty_pages.is_empty() {
            return Ok(());
        }
        for page in std::mem::take(&mut self.dirty_pages) {
            let first = (page * WORDS_PER_PAGE) as usize;
            let mut buf = vec![0u8; BLOCK as usize];
            for (i, w) in self.bits[first..]
                .iter()
                .take(WORDS_PER_PAGE as usize)
                .enumerate()
            {
                buf[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            self.lun.write_at(&buf, BITMAP_OFFSET + page * BLOCK)?;
        }
        self.lun.flush()?;
        Ok(())
    }

    /// Makes the extents `offset..offset+len` touches hot, persisting the activity log
    /// before returning when it changed: after a crash every region of a hot extent is
    /// treated as possibly different at the two sites.
    /// `before_evict` runs before an extent leaves the log: it must make that extent's
    /// writes durable at both sites (or dirty in the bitmap), since a crash after the
    /// eviction would no longer resync them.
    pub fn activate(
        &mut self,
        offset: u64,
        len: u64,
        before_evict: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let ext = u64::from(self.header.al_extent_size);
        let first = offset / ext;
        let last = (offset + len.max(1) - 1) / ext;
        let mut changed = false;
        for e in first..=last {
            if let Some(pos) = self.al.iter().position(|&x| x == e) {
                let e = self.al.remove(pos);
                self.al.push(e);
                continue;
            }
            // The primary lets no write be in flight across an eviction (see
            // `would_evict`); `before_evict` makes what the evicted extents had durable. Half the log goes
            // at once, so a streaming writer pays that flush once per half-log of
            // extents rather than once per extent.
            if self.al.len() >= self.header.al_capacity as usize {
                before_evict()?;
                let n = (self.al.len() / 2).max(1);
                self.al.drain(..n);
            }
            self.al.push(e);
            changed = true;
        }
        if changed {
            self.write_al()?;
        }
        Ok(())
    }

    /// Whether making `offset..offset+len` hot would drop extents from the log.
    pub fn would_evict(&self, offset: u64, len: u64) -> bool {
        let ext = u64::from(self.header.al_extent_size);
        let first = offset / ext;
        let last = (offset + len.max(1) - 1) / ext;
        let cold = (first..=last).filter(|e| !self.al.contains(e)).count();
        cold > 0 && self.al.len() + cold > self.header.al_capacity as usize
    }

    /// After a crash: every region of every hot extent joins the bitmap (durably), then
    /// the activity log is emptied.
    pub fn recover_activity_log(&mut self) -> Result<u64> {
        let ext = u64::from(self.header.al_extent_size);
        let per = ext / self.region_size();
        let mut marked = 0;
        for e in self.al.clone() {
            let first = e * per;
            let end = (first + per).min(self.regions());
            if first < end {
                self.mark(first..end);
                marked += end - first;
            }
        }
        self.persist_bitmap()?;
        if !self.al.is_empty() {
            self.al.clear();
            self.write_al()?;
        }
        Ok(marked)
    }

    /// On a clean stop nothing is in flight, so the activity log can be emptied.
    pub fn clear_activity_log(&mut self) -> Result<()> {
        if !self.al.is_empty() {
            self.al.clear();
            self.write_al()?;
        }
        Ok(())
    }

    fn write_al(&mut self) -> Result<()> {
        self.al_seq += 1;
        let mut b = vec![0u8; BLOCK as usize];
        b[0..8].copy_from_slice(&AL_MAGIC);
        put64(&mut b, 8, self.al_seq);
        put32(&mut b, 16, self.al.len() as u32);
        for (i, e) in self.al.iter().enumerate() {
            put64(&mut b, AL_FIRST + i * 8, *e);
        }
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        put32(&mut b, CRC_AT, crc);
        self.lun
            .write_at(&b, AL_OFFSET + (self.al_seq % AL_SLOTS) * BLOCK)?;
        self.lun.flush()?;
        Ok(())
    }

    pub fn flags(&self) -> u32 {
        self.header.flags
    }

    pub fn set_flag(&mut self, flag: u32, on: bool) {
        if on {
            self.header.flags |= flag;
        } else {
            self.header.flags &= !flag;
        }
    }
}

/// A slot that fails its checksum (torn, never written) holds no log.
fn decode_al(b: &[u8]) -> Option<(u64, Vec<u64>)> {
    if b[0..8] != AL_MAGIC || get32(b, CRC_AT) != crc32c::crc32c(&b[..CRC_AT]) {
        return None;
    }
    let n = (get32(b, 16).min(AL_MAX_EXTENTS)) as usize;
    let al = (0..n).map(|i| get64(b, AL_FIRST + i * 8)).collect();
    Some((get64(b, 8), al))
}

fn read_best_header(meta: &dyn Lun) -> Result<Option<Header>> {
    let mut best: Option<Header> = None;
    if meta.size() < HEADER_SLOTS * BLOCK {
        return Ok(None);
    }
    for slot in 0..HEADER_SLOTS {
        let mut b = vec![0u8; BLOCK as usize];
        meta.read_at(&mut b, slot * BLOCK)?;
        if let Ok(h) = Header::decode(&b)
            && best.as_ref().is_none_or(|cur| h.seq > cur.seq)
        {
            best = Some(h);
        }
    }
    Ok(best)
}

pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn get32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}
pub fn get64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}
