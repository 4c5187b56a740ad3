//! Metadata units in layers, and the journal that makes changes durable.
//!
//! A unit is looked up in the current operation's changes, then in changes of finished
//! operations not yet journaled (the running transaction), then, on read-only opens, in
//! committed journal images not yet written in place, then in the cache of verified on-disk
//! units, and last on the LUN (verified before it is cached). An operation that fails drops
//! its layer, so a failed operation changes nothing. `commit` journals the running
//! transaction, flushes, and only then writes the images in place: other units first, inodes
//! last, so a host that reads an inode without its lock never finds a new inode next to an
//! old directory or pointer unit.
//!
//! Other hosts change units this host does not hold locks on, so cached units are trusted
//! only as far as the caller says: directory and pointer units are remembered with the inode
//! they belong to and dropped when that inode changes; `load_fresh` rereads from the LUN and
//! retries a unit caught in the middle of another host's in-place write.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lun::{IoRequest, Lun};
use uuid::Uuid;

use crate::cluster::lease::Lease;
use crate::codec::*;
use crate::error::{Error, Result};
use crate::journal::{self, Header, MAX_TX_UNITS, Orphan, TX_START};
use crate::layout::Superblock;

/// Drop verified clean units when the cache grows past this many (only between operations).
const CLEAN_CACHE_MAX: usize = 1 << 18;
/// Reads of a unit that fails verification before it is reported corrupt: another host's
/// in-place write of a 4 KiB unit is not atomic on 512-byte sectors.
const TORN_RETRIES: u32 = 6;

pub(crate) struct Journal {
    pub slot: u32,
    area: u64,
    units: u64,
    cursor: u64,
    seq: u64,
    host: Uuid,
}

pub(crate) struct Store {
    pub lun: Arc<dyn Lun>,
    pub sb: Superblock,
    clean: HashMap<u64, Arc<Unit>>,
    overlay: HashMap<u64, Arc<Unit>>,
    tx: BTreeMap<u64, Arc<Unit>>,
    op: HashMap<u64, Arc<Unit>>,
    journal: Option<Journal>,
    fenced: Option<String>,
    /// The host lease: once it runs out nothing is written.
    lease: Option<Arc<Lease>>,
    /// Which inode a cached directory or pointer unit belongs to.
    owner: HashMap<u64, u64>,
    owned: HashMap<u64, Vec<u64>>,
    /// Read-only opens: when the overlay was read, and how often to reread it.
    overlay_at: Option<Instant>,
    overlay_every: Duration,
    /// Commit once the running transaction holds this many units; an operation never touches
    /// more than the rest of a transaction's room.
    commit_at: usize,
}

impl Store {
    pub fn new(lun: Arc<dyn Lun>, sb: Superblock) -> Store {
        Store {
            lun,
            sb,
            clean: HashMap::new(),
            overlay: HashMap::new(),
            tx: BTreeMap::new(),
            op: HashMap::new(),
            journal: None,
            fenced: None,
            lease: None,
            owner: HashMap::new(),
            owned: HashMap::new(),
            overlay_at: None,
            overlay_every: Duration::from_secs(1),
            commit_at: MAX_TX_UNITS / 2,
        }
    }

    pub fn set_lease(&mut self, lease: Arc<Lease>) {
        self.lease = Some(lease);
    }

    pub fn lun_name(&self) -> String {
        self.lun.name().to_string()
    }

    pub fn corrupt(
        &self,
        object: impl Into<String>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Error {
        let e = Error::Corrupt {
            lun: self.lun_name(),
            object: object.into(),
            offset,
            reason: reason.into(),
        };
        tracing::error!(lun = %self.lun.name(), error = %e, "metadata verification failed");
        e
    }

    pub fn writable(&self) -> bool {
        self.journal.is_some()
    }

    pub fn check_writable(&self) -> Result<()> {
        if let Some(lease) = &self.lease {
            if let Err(reason) = lease.check() {
                return Err(Error::HostFenced {
                    lun: self.lun_name(),
                    reason,
                });
            }
        }
        if let Some(reason) = &self.fenced {
            return Err(Error::Fenced {
                lun: self.lun_name(),
                reason: reason.clone(),
            });
        }
        if self.journal.is_none() {
            return Err(Error::ReadOnly {
                lun: self.lun_name(),
            });
        }
        Ok(())
    }

    pub fn attach_journal(&mut self, slot: u32, checkpoint_seq: u64, host: Uuid) {
        let area = self.sb.journal_area(slot);
        let units = self.sb.journal_size / UNIT_U64;
        // A transaction of `commit_at` units plus one operation of up to as many must fit.
        let room = (units - TX_START - 1) as usize;
        self.commit_at = (room.min(MAX_TX_UNITS) / 2).max(8);
        self.journal = Some(Journal {
            slot,
            area,
            units,
            cursor: TX_START,
            seq: checkpoint_seq,
            host,
        });
    }

    pub fn journal_slot(&self) -> Option<u32> {
        self.journal.as_ref().map(|j| j.slot)
    }

    pub fn set_overlay(&mut self, images: HashMap<u64, Arc<Unit>>, every: Duration) {
        self.overlay = images;
        self.overlay_at = Some(Instant::now());
        self.overlay_every = every;
    }

    /// Read-only opens: rereads the other hosts' pending journal transactions when the
    /// overlay is older than its period.
    pub fn refresh_overlay(&mut self) -> Result<()> {
        let Some(at) = self.overlay_at else {
            return Ok(());
        };
        if at.elapsed() < self.overlay_every {
            return Ok(());
        }
        self.overlay = overlay(&*self.lun, &self.sb)?;
        self.overlay_at = Some(Instant::now());
        Ok(())
    }

    /// True when finished operations are not yet committed, or committed but not yet
    /// checkpointed.
    pub fn has_uncommitted(&self) -> bool {
        !self.tx.is_empty() || self.journal.as_ref().is_some_and(|j| j.cursor > TX_START)
    }

    /// True when the current operation or the running transaction changed the unit.
    pub fn is_pending(&self, off: u64) -> bool {
        self.op.contains_key(&off) || self.tx.contains_key(&off)
    }

    /// The cached verified image of a unit, if any (not the pending layers).
    pub fn clean_copy(&self, off: u64) -> Option<Arc<Unit>> {
        self.clean.get(&off).cloned()
    }

    /// Reads and verifies a unit from the LUN (or the read-only overlay), retrying a unit
    /// that another host may be rewriting, and caches it.
    pub fn load_fresh(
        &mut self,
        off: u64,
        magic: u32,
        object: &dyn Fn() -> String,
    ) -> Result<Arc<Unit>> {
        if let Some(u) = self.op.get(&off).or_else(|| self.tx.get(&off)) {
            return Ok(u.clone());
        }
        if let Some(u) = self.overlay.get(&off) {
            return Ok(u.clone());
        }
        let mut attempt = 0;
        loop {
            let mut u = zero_unit();
            self.lun.read_at(&mut u[..], off)?;
            match verify(&u[..], magic, off, UNIT) {
                Ok(()) => {
                    let u: Arc<Unit> = Arc::from(u);
                    self.clean.insert(off, u.clone());
                    return Ok(u);
                }
                Err(fault) if attempt >= TORN_RETRIES || !may_be_torn(&u[..], magic) => {
                    return Err(self.corrupt(object(), off, fault.to_string()));
                }
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(u64::from(attempt)));
                }
            }
        }
    }

    /// A directory or pointer unit of inode `owner`: cached only while it is known to be
    /// that inode's (the caller drops an inode's units when the inode changes).
    pub fn load_owned(
        &mut self,
        off: u64,
        magic: u32,
        owner: u64,
        object: &dyn Fn() -> String,
    ) -> Result<Arc<Unit>> {
        if let Some(u) = self.op.get(&off).or_else(|| self.tx.get(&off)) {
            return Ok(u.clone());
        }
        if self.owner.get(&off) == Some(&owner) {
            if let Some(u) = self.clean.get(&off) {
                return Ok(u.clone());
            }
        }
        let u = self.load_fresh(off, magic, object)?;
        self.own(off, owner);
        Ok(u)
    }

    fn own(&mut self, off: u64, owner: u64) {
        if let Some(prev) = self.owner.insert(off, owner) {
            if prev == owner {
                return;
            }
        }
        self.owned.entry(owner).or_default().push(off);
    }

    /// Forgets the cached directory and pointer units of inode `ino`.
    pub fn forget_owned(&mut self, ino: u64) {
        for off in self.owned.remove(&ino).unwrap_or_default() {
            if self.owner.get(&off) == Some(&ino) {
                self.owner.remove(&off);
                self.clean.remove(&off);
            }
        }
    }

    /// Forgets one cached unit.
    pub fn forget(&mut self, off: u64) {
        self.clean.remove(&off);
    }

    fn cached(&self, off: u64) -> Option<&Arc<Unit>> {
        self.op
            .get(&off)
            .or_else(|| self.tx.get(&off))
            .or_else(|| self.overlay.get(&off))
            .or_else(|| self.clean.get(&off))
    }

    /// Reads a unit without verifying it (fsck inspects damaged units).
    pub fn read_raw(&self, off: u64) -> Result<Arc<Unit>> {
        if let Some(u) = self.cached(off) {
            return Ok(u.clone());
        }
        let mut u = zero_unit();
        self.lun.read_at(&mut u[..], off)?;
        Ok(Arc::from(u))
    }

    /// Reads `n` consecutive units from `off` in one I/O without verifying them, each
    /// replaced by its newer image when one is pending or cached (fsck).
    pub fn read_raw_range(&self, off: u64, n: usize) -> Result<Vec<Arc<Unit>>> {
        let mut buf = vec![0u8; n * UNIT];
        self.lun.read_at(&mut buf, off)?;
        Ok(buf
            .chunks_exact(UNIT)
            .enumerate()
            .map(|(i, chunk)| {
                let at = off + i as u64 * UNIT_U64;
                self.cached(at).cloned().unwrap_or_else(|| {
                    let mut u = zero_unit();
                    u.copy_from_slice(chunk);
                    Arc::from(u)
                })
            })
            .collect())
    }

    /// A verified unit of type `magic` at `off`; `object` names it in errors.
    pub fn load(&mut self, off: u64, magic: u32, object: &dyn Fn() -> String) -> Result<Arc<Unit>> {
        if let Some(u) = self.cached(off) {
            return Ok(u.clone());
        }
        let mut u = zero_unit();
        self.lun.read_at(&mut u[..], off)?;
        if let Err(fault) = verify(&u[..], magic, off, UNIT) {
            return Err(self.corrupt(object(), off, fault.to_string()));
        }
        let u: Arc<Unit> = Arc::from(u);
        self.clean.insert(off, u.clone());
        Ok(u)
    }

    /// Records a new image of the unit at `off` in the current operation.
    pub fn put(&mut self, off: u64, unit: Box<Unit>) {
        debug_assert!(self.journal.is_some());
        self.op.insert(off, Arc::from(unit));
    }

    /// Records a new image of a directory or pointer unit of inode `owner`.
    pub fn put_owned(&mut self, off: u64, unit: Box<Unit>, owner: u64) {
        self.put(off, unit);
        self.own(off, owner);
    }

    pub fn op_len(&self) -> usize {
        self.op.len()
    }

    /// Ends the current operation: keep its changes in the running transaction, or drop them.
    pub fn end_op(&mut self, keep: bool) {
        if keep {
            self.tx.extend(self.op.drain());
        } else {
            self.op.clear();
        }
    }

    pub fn should_commit(&self) -> bool {
        self.tx.len() >= self.commit_at
    }

    /// Journals the running transaction, flushes, writes its images in place.
    pub fn commit(&mut self) -> Result<()> {
        self.check_writable()?;
        debug_assert!(self.op.is_empty());
        if self.tx.is_empty() {
            return Ok(());
        }
        let images: Vec<(u64, Arc<Unit>)> = self.tx.iter().map(|(o, u)| (*o, u.clone())).collect();
        let max = self.max_tx();
        if images.len() > max {
            // Operations are bounded so this cannot happen; if it did, a crash between the
            // pieces could expose a partial operation, so say so loudly.
            tracing::error!(
                units = images.len(),
                max,
                "transaction larger than the journal allows, split"
            );
        }
        for chunk in images.chunks(max) {
            self.journal_write(chunk)?;
        }
        self.write_in_place(&images)?;
        for (off, u) in std::mem::take(&mut self.tx) {
            self.clean.insert(off, u);
        }
        if self.clean.len() > CLEAN_CACHE_MAX {
            self.drop_clean_cache();
        }
        Ok(())
    }

    /// Commit, then checkpoint: the running transaction is in place and the journal empty,
    /// so nothing of it can ever be replayed over a later holder's changes. Locks may be
    /// released after this.
    pub fn commit_point(&mut self) -> Result<()> {
        self.commit()?;
        let dirty = self.journal.as_ref().is_some_and(|j| j.cursor > TX_START);
        if dirty {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn max_tx(&self) -> usize {
        self.journal
            .as_ref()
            .map(|j| ((j.units - TX_START - 1) as usize).min(MAX_TX_UNITS))
            .unwrap_or(MAX_TX_UNITS)
    }

    fn journal_write(&mut self, images: &[(u64, Arc<Unit>)]) -> Result<()> {
        let need = 1 + images.len() as u64;
        let full = self
            .journal
            .as_ref()
            .is_some_and(|j| j.cursor + need > j.units);
        if full {
            self.checkpoint()?;
        }
        let Some(j) = self.journal.as_mut() else {
            return Err(Error::ReadOnly {
                lun: self.lun.name().to_string(),
            });
        };
        let seq = j.seq + 1;
        let location = j.area + j.cursor * UNIT_U64;
        let refs: Vec<(u64, &Unit)> = images.iter().map(|(o, u)| (*o, &**u)).collect();
        let bytes = journal::encode_tx(seq, location, &refs);
        self.lun.write_at(&bytes, location)?;
        self.lun.flush()?;
        j.seq = seq;
        j.cursor += need;
        tracing::trace!(seq, units = images.len(), "journal transaction committed");
        Ok(())
    }

    fn write_in_place(&mut self, images: &[(u64, Arc<Unit>)]) -> Result<()> {
        let (inodes, rest): (Vec<_>, Vec<_>) = images
            .iter()
            .cloned()
            .partition(|(_, u)| get_u32(&u[..], OFF_MAGIC) == MAGIC_INODE);
        let written =
            write_units(&*self.lun, &rest).and_then(|()| write_units(&*self.lun, &inodes));
        if let Err(e) = written {
            // The transaction is durable in the journal but its images may be half in place:
            // stop taking updates; replay at the next open finishes the job.
            let reason = e.to_string();
            tracing::error!(lun = %self.lun.name(), error = %reason, "in-place metadata write failed, fencing");
            self.fenced = Some(reason);
            self.clean.clear();
            return Err(e);
        }
        Ok(())
    }

    /// Makes in-place images durable and empties the journal.
    pub fn checkpoint(&mut self) -> Result<()> {
        let Some(j) = self.journal.as_mut() else {
            return Ok(());
        };
        self.lun.flush()?;
        let header = Header {
            slot: j.slot,
            size: self.sb.journal_size,
            checkpoint_seq: j.seq,
            host: j.host,
        };
        let location = j.area;
        self.lun.write_at(&header.encode(location)[..], location)?;
        j.cursor = TX_START;
        Ok(())
    }

    /// Forgets every cached image (after repairs that wrote behind the cache's back).
    pub fn drop_clean_cache(&mut self) {
        self.clean.clear();
        self.owner.clear();
        self.owned.clear();
    }
}

/// Writes whole units at their offsets, merging neighbours into larger requests.
pub(crate) fn write_units(lun: &dyn Lun, images: &[(u64, Arc<Unit>)]) -> Result<()> {
    if images.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<&(u64, Arc<Unit>)> = images.iter().collect();
    sorted.sort_by_key(|(o, _)| *o);
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    for (off, u) in sorted {
        match runs.last_mut() {
            Some((start, buf)) if *start + buf.len() as u64 == *off => {
                buf.extend_from_slice(&u[..])
            }
            _ => runs.push((*off, u.to_vec())),
        }
    }
    let mut batch: Vec<IoRequest<'_>> = runs
        .iter()
        .map(|(off, buf)| IoRequest::Write { buf, offset: *off })
        .collect();
    lun.submit(&mut batch)?;
    Ok(())
}

/// Result of reading one host's journal.
pub(crate) struct JournalState {
    pub header: Header,
    pub pending: Vec<journal::Tx>,
}

/// Reads a journal's header and its committed, not yet checkpointed transactions. Cheap for
/// a clean journal: only the header and the first descriptor are read.
pub(crate) fn read_journal(lun: &dyn Lun, sb: &Superblock, slot: u32) -> Result<JournalState> {
    let area = sb.journal_area(slot);
    let mut head = vec![0u8; (TX_START as usize + 1) * UNIT];
    lun.read_at(&mut head, area)?;
    let header = Header::decode(&head[..UNIT], area, slot, sb.journal_size).map_err(|reason| {
        Error::Corrupt {
            lun: lun.name().to_string(),
            object: format!("journal header of host slot {slot}"),
            offset: area,
            reason,
        }
    })?;
    let first = &head[TX_START as usize * UNIT..];
    let pending_start =
        get_u32(first, OFF_MAGIC) == MAGIC_TXN && get_u64(first, 16) == header.checkpoint_seq + 1;
    if !pending_start {
        return Ok(JournalState {
            header,
            pending: Vec::new(),
        });
    }
    let mut all = vec![0u8; sb.journal_size as usize];
    lun.read_at(&mut all, area)?;
    let (pending, _) = journal::scan(&all, area, header.checkpoint_seq, sb.fs_size);
    Ok(JournalState { header, pending })
}

/// A host slot's orphan list as it is on the LUN.
pub(crate) fn read_orphans(lun: &dyn Lun, sb: &Superblock, slot: u32) -> Result<Vec<Orphan>> {
    let off = sb.orphan_offset(slot);
    let mut raw = zero_unit();
    lun.read_at(&mut raw[..], off)?;
    journal::decode_orphans(&raw, off).map_err(|f| Error::Corrupt {
        lun: lun.name().to_string(),
        object: format!("orphan list of host slot {slot}"),
        offset: off,
        reason: f.to_string(),
    })
}

/// Applies a journal's pending transactions in place and checkpoints it. Returns how many
/// transactions were replayed and the journal's last sequence number.
pub(crate) fn replay(lun: &dyn Lun, sb: &Superblock, slot: u32, by: Uuid) -> Result<(usize, u64)> {
    replay_read(lun, sb, slot, &read_journal(lun, sb, slot)?, by)
}

/// [`replay`] of a journal the caller has just read with [`read_journal`].
pub(crate) fn replay_read(
    lun: &dyn Lun,
    sb: &Superblock,
    slot: u32,
    state: &JournalState,
    by: Uuid,
) -> Result<(usize, u64)> {
    let mut seq = state.header.checkpoint_seq;
    if state.pending.is_empty() {
        return Ok((0, seq));
    }
    for tx in &state.pending {
        let images: Vec<(u64, Arc<Unit>)> =
            tx.images.iter().map(|(o, u)| (*o, Arc::new(**u))).collect();
        write_units(lun, &images)?;
        seq = tx.seq;
    }
    lun.flush()?;
    let area = sb.journal_area(slot);
    let header = Header {
        slot,
        size: sb.journal_size,
        checkpoint_seq: seq,
        host: by,
    };
    lun.write_at(&header.encode(area)[..], area)?;
    lun.flush()?;
    tracing::info!(lun = %lun.name(), slot, transactions = state.pending.len(), seq, "journal replayed");
    Ok((state.pending.len(), seq))
}

/// The images a read-only open must see instead of what is in place: every pending
/// transaction of every journal, in sequence order per journal.
pub(crate) fn overlay(lun: &dyn Lun, sb: &Superblock) -> Result<HashMap<u64, Arc<Unit>>> {
    let mut out = HashMap::new();
    for slot in 0..sb.host_slots {
        let state = match read_journal(lun, sb, slot) {
            Ok(state) => state,
            Err(e @ Error::Corrupt { .. }) => {
                tracing::warn!(slot, error = %e, "journal unreadable, not overlaid (run fsck)");
                continue;
            }
            Err(e) => return Err(e),
        };
        for tx in state.pending {
            for (off, u) in tx.images {
                out.insert(off, Arc::from(u));
            }
        }
    }
    Ok(out)
}
