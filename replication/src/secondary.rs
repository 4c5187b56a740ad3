//! The secondary: applies what the primary sends into the replica LUN and serves nothing
//! else. Before a resync makes the replica inconsistent it takes a snapshot of it
//! (`pre-resync`), so losing the primary mid-resync still leaves a point in time.

use std::sync::{Arc, Mutex, PoisonError};

use lun::{Lun, check_request};
use snapshot::Snapshots;
use tracing::{info, warn};

use crate::Geometry;
use crate::error::Result;
use crate::meta::{
    FLAG_APPLYING, FLAG_DISCARD, FLAG_INCONSISTENT, FLAG_PRIMARY, Gens, Header, MetaStore,
};
use crate::wire::{Message, SideInfo};

/// The snapshot a secondary takes before a resync, deleted when the resync ends.
pub const PRE_RESYNC_SNAPSHOT: &str = "pre-resync";
/// The gold copy: the replica's last complete delta set while the next is applied.
pub const GOLD_SNAPSHOT: &str = "gold";

#[derive(Debug)]
pub struct Secondary {
    name: String,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Where data lands: the snapshot engine's source view when snapshots are kept (so
    /// the pre-resync snapshot is preserved), else the replica itself.
    target: Arc<dyn Lun>,
    snaps: Option<Snapshots>,
    meta: MetaStore,
    /// A primary said who it is on this connection; data is refused before that.
    session: bool,
    /// When the primary cut the delta set being applied.
    pending_cut_ms: u64,
}

impl Secondary {
    /// Makes `meta` the metadata of a new, empty replica `replica`: the first connect
    /// copies every allocated region.
    pub fn create(
        replica: Arc<dyn Lun>,
        meta: Arc<dyn Lun>,
        snaps: Option<Snapshots>,
        geometry: Geometry,
    ) -> Result<Secondary> {
        let header = Header {
            seq: 0,
            flags: 0,
            lun_size: replica.size(),
            region_size: geometry.region_size,
            al_extent_size: geometry.al_extent_size,
            al_capacity: geometry.al_capacity,
            gens: Gens::default(),
            peer_current: 0,
            resync_total: 0,
            delta_id: 0,
            delta_cut_ms: 0,
            verify_cursor: 0,
            verify_diffs: 0,
        };
        let meta = MetaStore::format(meta, header)?;
        Ok(Secondary::with(replica, meta, snaps))
    }

    pub fn open(
        replica: Arc<dyn Lun>,
        meta: Arc<dyn Lun>,
        snaps: Option<Snapshots>,
    ) -> Result<Secondary> {
        let meta = MetaStore::open(meta)?;
        if meta.flags() & FLAG_PRIMARY != 0 {
            return Err(crate::ReplError::WrongState {
                lun: replica.name().to_string(),
                reason: format!("metadata {} is a primary's; demote it first", meta.name()),
            });
        }
        let sec = Secondary::with(replica, meta, snaps);
        {
            let mut g = sec.lock();
            sec.roll_back_partial_delta(&mut g)?;
        }
        Ok(sec)
    }

    /// A delta set cut short (link lost, crash) is undone: the replica returns to its
    /// gold copy, the last set applied whole.
    fn roll_back_partial_delta(&self, g: &mut Inner) -> Result<()> {
        if g.meta.flags() & FLAG_APPLYING == 0 {
            return Ok(());
        }
        if let Some(s) = &g.snaps
            && has_session(s, GOLD_SNAPSHOT)
        {
            s.rollback(GOLD_SNAPSHOT)?;
            s.wait_rollback()?;
        }
        g.meta.set_flag(FLAG_APPLYING, false);
        g.meta.write_header()?;
        warn!(replica = %self.name, delta = g.meta.header.delta_id, "partial delta set rolled back to the gold copy");
        Ok(())
    }

    /// The last delta set applied whole and when the primary cut it (ms since the
    /// epoch): the replica's point in time in asynchronous mode.
    pub fn point_in_time(&self) -> (u64, u64) {
        let g = self.lock();
        (g.meta.header.delta_id, g.meta.header.delta_cut_ms)
    }

    fn with(replica: Arc<dyn Lun>, meta: MetaStore, snaps: Option<Snapshots>) -> Secondary {
        let target: Arc<dyn Lun> = match &snaps {
            Some(s) => s.source(),
            None => replica.clone(),
        };
        Secondary {
            name: replica.name().to_string(),
            inner: Mutex::new(Inner {
                target,
                snaps,
                meta,
                session: false,
                pending_cut_ms: 0,
            }),
        }
    }

    /// True while an authenticated primary is connected.
    pub fn is_connected(&self) -> bool {
        self.lock().session
    }

    pub fn gens(&self) -> Gens {
        self.lock().meta.header.gens
    }

    /// True while a resync is being applied: the replica is not a point in time, and
    /// the `pre-resync` snapshot holds the last one.
    pub fn is_inconsistent(&self) -> bool {
        self.lock().meta.flags() & FLAG_INCONSISTENT != 0
    }

    /// The replica's last complete point in time while a resync runs, if snapshots are
    /// kept: what a promote of an inconsistent replica rolls back to.
    pub fn pre_resync_snapshot(&self) -> Result<Option<Arc<dyn Lun>>> {
        let g = self.lock();
        let Some(s) = &g.snaps else {
            return Ok(None);
        };
        if !s.list().iter().any(|x| x.name == PRE_RESYNC_SNAPSHOT) {
            return Ok(None);
        }
        Ok(Some(s.session(PRE_RESYNC_SNAPSHOT)?))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes this side the primary, to be opened with [`crate::PrimaryLun::open`] on the
    /// same LUNs once this `Secondary` is dropped. Refused while a primary is connected
    /// unless `force`. A replica cut off mid-resync first returns to its `pre-resync`
    /// snapshot (the regions that changes are kept dirty, so a failback copies them);
    /// without one it is refused unless `force`. Starts a new generation, so the old
    /// primary is told apart when it comes back.
    pub fn promote(&self, force: bool) -> Result<()> {
        let mut g = self.lock();
        let lun = self.name.clone();
        if g.meta.flags() & FLAG_PRIMARY != 0 {
            return Ok(());
        }
        if g.session && !force {
            return Err(crate::ReplError::WrongState {
                lun,
                reason:
                    "a primary is connected and replicating; promote with force to take over anyway"
                        .into(),
            });
        }
        g.session = false;
        self.roll_back_partial_delta(&mut g)?;
        if g.meta.flags() & FLAG_INCONSISTENT != 0 {
            let has_snapshot = g
                .snaps
                .as_ref()
                .is_some_and(|s| s.list().iter().any(|x| x.name == PRE_RESYNC_SNAPSHOT));
            match &g.snaps {
                Some(s) if has_snapshot => {
                    s.rollback(PRE_RESYNC_SNAPSHOT)?;
                    s.wait_rollback()?;
                    s.delete_session(PRE_RESYNC_SNAPSHOT)?;
                    info!(replica = %lun, "inconsistent replica rolled back to its pre-resync snapshot");
                }
                _ if force => {
                    warn!(replica = %lun, "promoting an inconsistent replica without a snapshot to return to");
                }
                _ => {
                    return Err(crate::ReplError::WrongState {
                        lun,
                        reason: "the replica is mid-resync (inconsistent) and has no pre-resync snapshot; promote with force to use it as it is".into(),
                    });
                }
            }
        }
        g.target.flush()?;
        g.meta.persist_bitmap()?;
        g.meta.header.gens.fork();
        g.meta.set_flag(FLAG_INCONSISTENT | FLAG_DISCARD, false);
        g.meta.set_flag(FLAG_PRIMARY, true);
        g.meta.write_header()?;
        info!(replica = %lun, gen = g.meta.header.gens.current, "promoted to primary");
        Ok(())
    }

    /// Resolves a split brain in favour of the other side: what this side wrote that
    /// the primary never got is overwritten by the next resync.
    pub fn discard_local(&self) -> Result<()> {
        let mut g = self.lock();
        g.meta.set_flag(FLAG_DISCARD, true);
        g.meta.write_header()?;
        warn!(replica = %self.name, dirty_regions = g.meta.dirty_count(), "local changes will be discarded at the next resync");
        Ok(())
    }

    /// The connection carrying the primary went away; a delta set it was sending is
    /// rolled back.
    pub fn disconnected(&self) {
        let mut g = self.lock();
        g.session = false;
        if let Err(e) = self.roll_back_partial_delta(&mut g) {
            tracing::error!(replica = %self.name, error = %e, "cannot roll back a partial delta set; it will be retried at the next open");
        }
    }

    /// Answers one message from the primary. Anything refused changes nothing.
    pub fn handle(&self, msg: Message) -> Message {
        let mut g = self.lock();
        match self.apply(&mut g, msg) {
            Ok(reply) => reply,
            Err(e) => {
                warn!(replica = %self.name, error = %e, "replication request refused");
                Message::Error {
                    reason: e.to_string(),
                }
            }
        }
    }

    fn apply(&self, g: &mut Inner, msg: Message) -> Result<Message> {
        let refuse = |reason: String| crate::ReplError::WrongState {
            lun: self.name.clone(),
            reason,
        };
        match msg {
            Message::Connect(p) => {
                let h = &g.meta.header;
                if h.flags & FLAG_PRIMARY != 0 {
                    return Err(refuse(
                        "this side is a primary; demote it before it can receive".into(),
                    ));
                }
                if p.lun_size > g.target.size() {
                    return Err(refuse(format!(
                        "replica too small: {} bytes, the primary's LUN has {}",
                        g.target.size(),
                        p.lun_size
                    )));
                }
                if p.region_size != h.region_size {
                    return Err(refuse(format!(
                        "region size {} differs from the primary's {}",
                        h.region_size, p.region_size
                    )));
                }
                g.session = true;
                info!(replica = %self.name, primary_gen = p.gens.current, gen = h.gens.current, "primary connected");
                Ok(Message::State(SideInfo {
                    lun_size: g.target.size(),
                    region_size: h.region_size,
                    flags: h.flags,
                    gens: h.gens,
                    dirty_regions: g.meta.dirty_count(),
                }))
            }
            _ if !g.session => Err(refuse("no primary has connected on this link".into())),
            Message::Write { offset, data } => {
                check_request(&*g.target, offset, data.len() as u64)?;
                g.target.write_at(&data, offset)?;
                Ok(Message::Ok)
            }
            Message::ResyncData { offset, data } => {
                check_request(&*g.target, offset, data.len() as u64)?;
                // Remembered (durably at the next flush, before the primary forgets
                // it), so a promote that rolls the replica back knows what changed.
                let regions = g.meta.region_range(offset, data.len() as u64);
                g.meta.mark(regions);
                g.target.write_at(&data, offset)?;
                Ok(Message::Ok)
            }
            Message::Flush => {
                g.target.flush()?;
                g.meta.persist_bitmap()?;
                Ok(Message::Ok)
            }
            Message::DeltaBegin { id, cut_ms } => {
                let Some(s) = &g.snaps else {
                    return Err(refuse(
                        "asynchronous replication needs a snapshot pool on the replica for its gold copy".into(),
                    ));
                };
                if g.meta.flags() & (FLAG_INCONSISTENT | FLAG_APPLYING) != 0 {
                    return Err(refuse(format!(
                        "delta set {id} refused: the replica is mid-resync or mid-delta"
                    )));
                }
                if has_session(s, GOLD_SNAPSHOT) {
                    s.delete_session(GOLD_SNAPSHOT)?;
                }
                s.create_session(GOLD_SNAPSHOT, false)?;
                g.meta.set_flag(FLAG_APPLYING, true);
                g.meta.write_header()?;
                g.pending_cut_ms = cut_ms;
                tracing::debug!(replica = %self.name, delta = id, cut_ms, "delta set begins");
                Ok(Message::Ok)
            }
            Message::DeltaData { offset, data } => {
                if g.meta.flags() & FLAG_APPLYING == 0 {
                    return Err(refuse("delta data outside a delta set".into()));
                }
                check_request(&*g.target, offset, data.len() as u64)?;
                g.target.write_at(&data, offset)?;
                Ok(Message::Ok)
            }
            Message::DeltaEnd { id, gens } => {
                if g.meta.flags() & FLAG_APPLYING == 0 {
                    return Err(refuse("delta end outside a delta set".into()));
                }
                g.target.flush()?;
                g.meta.header.gens = Gens { bitmap: 0, ..gens };
                g.meta.header.delta_id = id;
                g.meta.header.delta_cut_ms = g.pending_cut_ms;
                g.meta.set_flag(FLAG_APPLYING, false);
                g.meta.write_header()?;
                // The set is whole: from here the replica itself is the point in time.
                if let Some(s) = &g.snaps
                    && has_session(s, GOLD_SNAPSHOT)
                {
                    s.delete_session(GOLD_SNAPSHOT)?;
                }
                tracing::debug!(replica = %self.name, delta = id, "delta set applied");
                Ok(Message::Ok)
            }
            Message::ResyncZero { offset, len } => {
                check_request(&*g.target, offset, len)?;
                let regions = g.meta.region_range(offset, len);
                g.meta.mark(regions);
                g.target.write_zeroes(offset, len)?;
                Ok(Message::Ok)
            }
            Message::ChecksumRequest { first, count } => {
                if g.meta.flags() & FLAG_APPLYING != 0 {
                    return Err(refuse(
                        "checksums refused: a delta set is being applied".into(),
                    ));
                }
                let rs = g.meta.region_size();
                let size = g.target.size();
                let mut crcs = Vec::with_capacity(count as usize);
                for r in first..first.saturating_add(u64::from(count)) {
                    let offset = r.saturating_mul(rs);
                    if offset >= size {
                        return Err(refuse(format!(
                            "checksum of region {r} past the end of the replica"
                        )));
                    }
                    crcs.push(crate::verify::region_crc(
                        &*g.target,
                        offset,
                        rs.min(size - offset),
                    )?);
                }
                Ok(Message::Checksums { crcs })
            }
            Message::BitmapRequest => Ok(Message::Bitmap {
                words: g.meta.words().to_vec(),
            }),
            Message::ResyncBegin { regions } => {
                if g.meta.flags() & FLAG_INCONSISTENT == 0 {
                    // A replica that never held a point in time (generation 0, the initial
                    // sync) has nothing to protect: a snapshot would only copy every chunk.
                    if let Some(s) = &g.snaps
                        && g.meta.header.gens.current != 0
                    {
                        if s.list().iter().any(|x| x.name == PRE_RESYNC_SNAPSHOT) {
                            s.delete_session(PRE_RESYNC_SNAPSHOT)?;
                        }
                        s.create_session(PRE_RESYNC_SNAPSHOT, false)?;
                    }
                    g.meta.set_flag(FLAG_INCONSISTENT, true);
                    g.meta.write_header()?;
                }
                info!(replica = %self.name, regions, "resync begins; replica inconsistent until it ends");
                Ok(Message::Ok)
            }
            Message::ResyncEnd { gens } => {
                g.target.flush()?;
                g.meta.clear_all();
                g.meta.persist_bitmap()?;
                g.meta.header.gens = Gens { bitmap: 0, ..gens };
                g.meta.set_flag(FLAG_INCONSISTENT | FLAG_DISCARD, false);
                g.meta.write_header()?;
                if let Some(s) = &g.snaps
                    && s.list().iter().any(|x| x.name == PRE_RESYNC_SNAPSHOT)
                {
                    s.delete_session(PRE_RESYNC_SNAPSHOT)?;
                }
                info!(replica = %self.name, gen = gens.current, "resync complete; replica consistent");
                Ok(Message::Ok)
            }
            other => Err(refuse(format!(
                "unexpected {} message from the primary",
                other.kind()
            ))),
        }
    }
}

fn has_session(s: &Snapshots, name: &str) -> bool {
    s.list().iter().any(|x| x.name == name)
}
