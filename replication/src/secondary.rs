//! The secondary: applies what the primary sends into the replica LUN and serves nothing
//! else. Before a resync makes the replica inconsistent it takes a snapshot of it
//! (`pre-resync`), so losing the primary mid-resync still leaves a point in time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};

use lun::{Lun, check_request};
use snapshot::Snapshots;
use tracing::{info, warn};

use crate::Geometry;
use crate::error::Result;
use crate::meta::{
    FLAG_APPLYING, FLAG_DISCARD, FLAG_ENDED, FLAG_INCONSISTENT, FLAG_PRIMARY, Gens, Header,
    MetaStore,
};
use crate::wire::{Message, SideInfo};

/// The snapshot a secondary takes before a resync, deleted when the resync ends.
pub const PRE_RESYNC_SNAPSHOT: &str = "pre-resync";
/// The gold copy: the replica's last complete delta set while the next is applied.
pub const GOLD_SNAPSHOT: &str = "gold";

/// Which side a replication metadata says this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

/// The state of a secondary, as the CLI and the agent show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecondaryStatus {
    /// `Primary` once promoted (reopen it with [`crate::PrimaryLun::open`]).
    pub role: Role,
    pub gens: Gens,
    /// A resync is being applied: the replica is not a point in time.
    pub inconsistent: bool,
    /// The last delta set applied whole (asynchronous mode; 0 before any).
    pub delta_id: u64,
    /// When the primary cut that set, ms since the Unix epoch (`None` before any).
    pub point_in_time_ms: Option<u64>,
    /// A primary has said who it is on the current connection.
    pub connected: bool,
    /// Regions this side may hold that the primary does not (its own writes while
    /// promoted, an interrupted resync).
    pub dirty_regions: u64,
}

#[derive(Debug)]
pub struct Secondary {
    name: String,
    inner: Mutex<Inner>,
    /// Replicated writes are applied concurrently under its shared side (the primary
    /// never has two overlapping ones in flight); everything else takes it whole, so it
    /// sees every earlier write applied and none half done.
    gate: RwLock<()>,
    /// The consistency group this replica's delta sets commit with, if any.
    group: Mutex<Weak<GroupShared>>,
    /// When the primary last sent anything, ms since the Unix epoch: how current a
    /// synchronous replica whose link is down is.
    last_heard_ms: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    /// Where data lands: the snapshot engine's source view when snapshots are kept (so
    /// the pre-resync snapshot is preserved), else the replica itself.
    target: Arc<dyn Lun>,
    snaps: Option<Arc<Snapshots>>,
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
            group_seq: 0,
            ended_id: 0,
            ended_cut_ms: 0,
            ended_group_seq: 0,
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

    /// A group's set that ended here but was never committed is undone: the replica
    /// returns to its gold copy, the group's last committed set.
    fn roll_back_ended(&self, g: &mut Inner) -> Result<()> {
        if !back_to_gold(g, FLAG_ENDED)? {
            return Ok(());
        }
        warn!(replica = %self.name, delta = g.meta.header.ended_id, kept = g.meta.header.delta_id, "uncommitted group delta set rolled back to the gold copy");
        Ok(())
    }

    /// Makes a group's set that ended here visible: the header records it (the commit
    /// record), then the gold copy goes.
    fn commit_ended(&self, g: &mut Inner) -> Result<()> {
        if g.meta.flags() & FLAG_ENDED == 0 {
            return Ok(());
        }
        let h = &mut g.meta.header;
        h.delta_id = h.ended_id;
        h.delta_cut_ms = h.ended_cut_ms;
        h.group_seq = h.ended_group_seq;
        g.meta.set_flag(FLAG_ENDED, false);
        g.meta.write_header()?;
        drop_gold(g)?;
        tracing::debug!(replica = %self.name, delta = g.meta.header.delta_id, group_seq = g.meta.header.group_seq, "group delta set committed");
        Ok(())
    }

    fn group(&self) -> Option<Arc<GroupShared>> {
        self.group
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade()
    }

    /// A delta set cut short (link lost, crash) is undone: the replica returns to its
    /// gold copy, the last set applied whole.
    fn roll_back_partial_delta(&self, g: &mut Inner) -> Result<()> {
        if !back_to_gold(g, FLAG_APPLYING)? {
            return Ok(());
        }
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
            gate: RwLock::new(()),
            group: Mutex::new(Weak::new()),
            last_heard_ms: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                target,
                snaps: snaps.map(Arc::new),
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

    /// Everything [`SecondaryStatus`] says, read at one instant.
    pub fn status(&self) -> SecondaryStatus {
        let g = self.lock();
        let h = &g.meta.header;
        SecondaryStatus {
            role: if h.flags & FLAG_PRIMARY != 0 {
                Role::Primary
            } else {
                Role::Secondary
            },
            gens: h.gens,
            inconsistent: h.flags & FLAG_INCONSISTENT != 0,
            delta_id: h.delta_id,
            point_in_time_ms: (h.delta_cut_ms != 0).then_some(h.delta_cut_ms),
            connected: g.session,
            dirty_regions: g.meta.dirty_count(),
        }
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

    /// The snapshot engine over the replica, when snapshots are kept: the sessions a
    /// drill opens are served from it.
    pub fn engine(&self) -> Option<Arc<Snapshots>> {
        self.lock().snaps.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// A replicated write, applied alongside others: the lock is held only to check
    /// the session and find the target.
    fn apply_write(&self, offset: u64, data: &[u8]) -> Result<Message> {
        let _writing = self.shared();
        let target = {
            let g = self.lock();
            if !g.session {
                return Err(crate::ReplError::WrongState {
                    lun: self.name.clone(),
                    reason: "no primary has connected on this link".into(),
                });
            }
            g.target.clone()
        };
        check_request(&*target, offset, data.len() as u64)?;
        target.write_at(data, offset)?;
        Ok(Message::Ok)
    }

    /// Makes this side the primary, to be opened with [`crate::PrimaryLun::open`] on the
    /// same LUNs once this `Secondary` is dropped. Refused while a primary is connected
    /// unless `force`. A replica cut off mid-resync first returns to its `pre-resync`
    /// snapshot (the regions that changes are kept dirty, so a failback copies them);
    /// without one it is refused unless `force`. Starts a new generation, so the old
    /// primary is told apart when it comes back.
    pub fn promote(&self, force: bool) -> Result<()> {
        // A group member first brings the whole group to its last committed set, so
        // the promoted replicas are one point in time.
        if let Some(group) = self.group() {
            group.resolve()?;
        }
        let _alone = self.exclusive();
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
        self.roll_back_ended(&mut g)?;
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
        let _alone = self.exclusive();
        let mut g = self.lock();
        g.meta.set_flag(FLAG_DISCARD, true);
        g.meta.write_header()?;
        warn!(replica = %self.name, dirty_regions = g.meta.dirty_count(), "local changes will be discarded at the next resync");
        Ok(())
    }

    /// The connection carrying the primary went away; a delta set it was sending is
    /// rolled back.
    ///
    /// A group's set that ended on other members can no longer be committed: they
    /// roll back too.
    pub fn disconnected(&self) {
        {
            let _alone = self.exclusive();
            let mut g = self.lock();
            g.session = false;
            if let Err(e) = self.roll_back_partial_delta(&mut g) {
                tracing::error!(replica = %self.name, error = %e, "cannot roll back a partial delta set; it will be retried at the next open");
            }
        }
        match self.group() {
            Some(group) => {
                if let Err(e) = group.abort() {
                    tracing::error!(group = %group.name, error = %e, "cannot roll back an uncommitted group delta set; it will be retried at the next open");
                }
            }
            None => {
                let _alone = self.exclusive();
                let mut g = self.lock();
                if let Err(e) = self.roll_back_ended(&mut g) {
                    tracing::error!(replica = %self.name, error = %e, "cannot roll back an uncommitted delta set; it will be retried at the next open");
                }
            }
        }
    }

    /// A set that ended here and was never committed is dead once a new set or a
    /// resync starts: the group (or this replica alone) returns to its gold copy.
    fn abort_ended(&self) -> Result<()> {
        if self.lock().meta.flags() & FLAG_ENDED == 0 {
            return Ok(());
        }
        match self.group() {
            Some(group) => group.abort(),
            None => {
                let _alone = self.exclusive();
                let mut g = self.lock();
                self.roll_back_ended(&mut g)
            }
        }
    }

    /// The group's set `id` is to be made visible on every member.
    fn commit(&self, id: u64) -> Result<Message> {
        if !self.lock().session {
            return Err(crate::ReplError::WrongState {
                lun: self.name.clone(),
                reason: "no primary has connected on this link".into(),
            });
        }
        match self.group() {
            Some(group) => group.commit(self, id)?,
            None => {
                let _alone = self.exclusive();
                let mut g = self.lock();
                commit_alone(self, &mut g, id)?;
            }
        }
        Ok(Message::Ok)
    }

    /// Answers one message from the primary. Anything refused changes nothing.
    pub fn handle(&self, msg: Message) -> Message {
        self.last_heard_ms.store(now_ms(), Ordering::Relaxed);
        let answer = match msg {
            Message::Write { offset, data } => self.apply_write(offset, &data),
            // A DR site asking for a planned handover finds this side demoted already: it
            // learns what this side holds and decides whether it may promote.
            Message::Handover(_) => {
                let st = self.status();
                Ok(Message::HandoverReply(crate::handover::HandoverReply {
                    outcome: crate::handover::HandoverOutcome::AlreadySecondary,
                    members: vec![crate::handover::HandoverMember {
                        generation: st.gens.current,
                        bitmap_generation: st.gens.bitmap,
                        dirty_regions: st.dirty_regions,
                    }],
                    steps: Vec::new(),
                    message: format!("{}: already a secondary", self.name),
                }))
            }
            Message::DeltaCommit { id } => self.commit(id),
            msg @ (Message::DeltaBegin { .. } | Message::ResyncBegin { .. }) => {
                self.abort_ended().and_then(|()| {
                    let _alone = self.exclusive();
                    let mut g = self.lock();
                    self.apply(&mut g, msg)
                })
            }
            msg => {
                let _alone = self.exclusive();
                let mut g = self.lock();
                self.apply(&mut g, msg)
            }
        };
        match answer {
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
            Message::Ping => Ok(Message::Pong),
            _ if !g.session => Err(refuse("no primary has connected on this link".into())),
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
                if g.meta.flags() & (FLAG_INCONSISTENT | FLAG_APPLYING | FLAG_ENDED) != 0 {
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
            Message::DeltaEnd { id, gens, group } => {
                if g.meta.flags() & FLAG_APPLYING == 0 {
                    return Err(refuse("delta end outside a delta set".into()));
                }
                g.target.flush()?;
                g.meta.header.gens = Gens { bitmap: 0, ..gens };
                if group {
                    // Whole here, but visible only with the group's commit: the gold
                    // copy stays. One header write moves APPLYING to ENDED.
                    let h = &mut g.meta.header;
                    h.ended_id = id;
                    h.ended_cut_ms = g.pending_cut_ms;
                    h.ended_group_seq = h.group_seq + 1;
                    g.meta.set_flag(FLAG_APPLYING, false);
                    g.meta.set_flag(FLAG_ENDED, true);
                    g.meta.write_header()?;
                    tracing::debug!(replica = %self.name, delta = id, "group delta set ended; waiting for the group's commit");
                    return Ok(Message::Ok);
                }
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
                // Already a hole: nothing to write (a new thin replica's initial sync).
                if g.target.may_hold_data(offset, len)? {
                    g.meta.mark(regions);
                    g.target.write_zeroes(offset, len)?;
                }
                Ok(Message::Ok)
            }
            Message::ChecksumRequest { first, count } => {
                if g.meta.flags() & (FLAG_APPLYING | FLAG_ENDED) != 0 {
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

/// While `flag` says a set is applied but not committed, the replica returns to its gold
/// copy and the flag is cleared; false when there was nothing to undo.
fn back_to_gold(g: &mut Inner, flag: u32) -> Result<bool> {
    if g.meta.flags() & flag == 0 {
        return Ok(false);
    }
    if let Some(s) = &g.snaps
        && has_session(s, GOLD_SNAPSHOT)
    {
        s.rollback(GOLD_SNAPSHOT)?;
        s.wait_rollback()?;
    }
    g.meta.set_flag(flag, false);
    g.meta.write_header()?;
    Ok(true)
}

fn drop_gold(g: &Inner) -> Result<()> {
    if let Some(s) = &g.snaps
        && has_session(s, GOLD_SNAPSHOT)
    {
        s.delete_session(GOLD_SNAPSHOT)?;
    }
    Ok(())
}

/// A `delta-commit` for a replica outside any group: its own ended set, or one already
/// committed (a repeated commit).
fn commit_alone(m: &Secondary, g: &mut Inner, id: u64) -> Result<()> {
    let h = &g.meta.header;
    if g.meta.flags() & FLAG_ENDED != 0 && h.ended_id == id {
        return m.commit_ended(g);
    }
    if g.meta.flags() & FLAG_ENDED == 0 && h.delta_id == id {
        return Ok(());
    }
    Err(crate::ReplError::WrongState {
        lun: m.name.clone(),
        reason: format!("delta set {id} cannot be committed: it has not ended here"),
    })
}

/// The members of a [`SecondaryGroup`], shared with each member so that a lost link
/// or a commit on one reaches all.
#[derive(Debug)]
pub(crate) struct GroupShared {
    name: String,
    members: Vec<Arc<Secondary>>,
    /// Held across every group-wide step; taken before any member's own locks.
    busy: Mutex<()>,
}

type Locked<'a> = (RwLockWriteGuard<'a, ()>, MutexGuard<'a, Inner>);

impl GroupShared {
    /// Every member held whole, in the group's fixed order; none of them takes the
    /// group's lock while holding its own, so this cannot deadlock.
    fn lock_all(&self) -> (MutexGuard<'_, ()>, Vec<Locked<'_>>) {
        let busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let all = self
            .members
            .iter()
            .map(|m| (m.exclusive(), m.lock()))
            .collect();
        (busy, all)
    }

    /// Crash recovery: a set ended on a member is committed if another member already
    /// recorded that group commit (a crash came mid-commit), else rolled back; then
    /// every member counts commits from the same number.
    fn resolve(&self) -> Result<()> {
        let (_busy, mut all) = self.lock_all();
        let committed = all
            .iter()
            .map(|(_, g)| g.meta.header.group_seq)
            .max()
            .unwrap_or(0);
        for (m, (_, g)) in self.members.iter().zip(all.iter_mut()) {
            m.roll_back_partial_delta(g)?;
            if g.meta.flags() & FLAG_ENDED != 0 {
                // Only the commit in progress can be finished: an older count is a set
                // left from before this member joined (commits need every member).
                if g.meta.header.ended_group_seq == committed {
                    m.commit_ended(g)?;
                    info!(group = %self.name, replica = %m.name, delta = g.meta.header.delta_id, "group delta set committed on recovery");
                } else {
                    m.roll_back_ended(g)?;
                }
            }
            if g.meta.header.group_seq != committed {
                g.meta.header.group_seq = committed;
                g.meta.write_header()?;
            }
        }
        Ok(())
    }

    /// A member's link is gone: a set ended on others will never be committed.
    fn abort(&self) -> Result<()> {
        let (_busy, mut all) = self.lock_all();
        for (m, (_, g)) in self.members.iter().zip(all.iter_mut()) {
            m.roll_back_ended(g)?;
        }
        Ok(())
    }

    /// Commits set `id` on every member, once it has ended on each: each member's
    /// header records the commit, in the group's order, before any gold copy goes, so
    /// recovery after a crash at any point finds the commit on one member and finishes
    /// it on the rest. A repeated commit (through another member's link) is answered.
    fn commit(&self, asker: &Secondary, id: u64) -> Result<()> {
        let (_busy, mut all) = self.lock_all();
        let ended = |g: &Inner| g.meta.flags() & FLAG_ENDED != 0 && g.meta.header.ended_id == id;
        if let Some(m) = self
            .members
            .iter()
            .zip(all.iter())
            .find_map(|(m, (_, g))| (!ended(g)).then_some(m))
        {
            let asker_done = self
                .members
                .iter()
                .zip(all.iter())
                .find(|(x, _)| std::ptr::eq(&***x, asker))
                .is_some_and(|(_, (_, g))| {
                    g.meta.flags() & FLAG_ENDED == 0 && g.meta.header.delta_id == id
                });
            if asker_done && all.iter().all(|(_, g)| !ended(g)) {
                return Ok(());
            }
            return Err(crate::ReplError::WrongState {
                lun: asker.name.clone(),
                reason: format!(
                    "group {} set {id} cannot be committed: it has not ended on {}",
                    self.name, m.name
                ),
            });
        }
        for (m, (_, g)) in self.members.iter().zip(all.iter_mut()) {
            let h = &mut g.meta.header;
            h.delta_id = h.ended_id;
            h.delta_cut_ms = h.ended_cut_ms;
            h.group_seq = h.ended_group_seq;
            g.meta.set_flag(FLAG_ENDED, false);
            g.meta.write_header()?;
            tracing::debug!(group = %self.name, replica = %m.name, delta = id, "group delta set committed");
        }
        for (_, g) in &all {
            drop_gold(g)?;
        }
        Ok(())
    }
}

/// A consistency group at the secondary: the members' delta sets become visible
/// together. A member's set that ends waits, with its gold copy, for `delta-commit`;
/// the commit makes it visible on every member at once. A lost link, a new set, a
/// promote or a restart returns members whose set was never committed to their gold
/// copies, so the replicas are always one point in time of the primary's group.
#[derive(Debug)]
pub struct SecondaryGroup {
    shared: Arc<GroupShared>,
}

impl SecondaryGroup {
    /// Groups `members` (each opened on its own) and brings them to one point in time:
    /// what a crash left half committed is finished or undone. Members keep the group
    /// while this lives.
    pub fn new(name: &str, members: Vec<Arc<Secondary>>) -> Result<SecondaryGroup> {
        let bad = |reason: String| crate::ReplError::BadConfig {
            lun: name.to_string(),
            reason,
        };
        if members.is_empty() {
            return Err(bad("a consistency group needs at least one member".into()));
        }
        for (i, m) in members.iter().enumerate() {
            if members[..i].iter().any(|o| Arc::ptr_eq(o, m)) {
                return Err(bad(format!("{} is listed twice", m.name)));
            }
            if m.group().is_some() {
                return Err(bad(format!("{} is already in a group", m.name)));
            }
        }
        let shared = Arc::new(GroupShared {
            name: name.to_string(),
            members,
            busy: Mutex::new(()),
        });
        shared.resolve()?;
        for m in &shared.members {
            *m.group.lock().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(&shared);
        }
        Ok(SecondaryGroup { shared })
    }

    pub fn members(&self) -> &[Arc<Secondary>] {
        &self.shared.members
    }
}

/// Where [`take_point`] took its sessions: one point of the replicas' write sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrillPoint {
    /// When the primary cut the last delta set applied whole (asynchronous mode), ms
    /// since the Unix epoch; 0 before any.
    pub delta_cut_ms: u64,
    /// The last delta set applied whole.
    pub delta_id: u64,
    /// A primary was connected: in synchronous mode the point holds every write it
    /// acknowledged.
    pub connected: bool,
    /// When the primary last sent anything, ms since the Unix epoch (0: never, since
    /// this process started).
    pub last_heard_ms: u64,
}

/// Now, in ms since the Unix epoch (the unit of every point in time here).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Takes a writable snapshot session `name` of every replica in `members` at one point
/// of the primary's write sequence, while replication goes on: every member is held
/// whole between two applied writes, and never while a delta set is half applied or
/// waits for its group commit (it waits up to `wait` for that boundary). Refused, with
/// nothing taken, on a replica that is mid-resync, promoted, or keeps no snapshots.
pub fn take_point(
    members: &[Arc<Secondary>],
    name: &str,
    wait: std::time::Duration,
) -> Result<DrillPoint> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        // Held in the members' order, as a group's commit holds them.
        let all: Vec<Locked<'_>> = members.iter().map(|m| (m.exclusive(), m.lock())).collect();
        for (m, (_, g)) in members.iter().zip(&all) {
            let refuse = |reason: &str| crate::ReplError::WrongState {
                lun: m.name.clone(),
                reason: reason.to_string(),
            };
            let flags = g.meta.flags();
            if flags & FLAG_PRIMARY != 0 {
                return Err(refuse("promoted: no longer a replica"));
            }
            if flags & FLAG_INCONSISTENT != 0 {
                return Err(refuse(
                    "resync in progress (inconsistent): no consistent point to take",
                ));
            }
            let Some(s) = &g.snaps else {
                return Err(refuse("keeps no snapshot pool, so no session can be taken"));
            };
            if has_session(s, name) {
                return Err(refuse(&format!("already has a session {name:?}")));
            }
        }
        let mid_set = all
            .iter()
            .any(|(_, g)| g.meta.flags() & (FLAG_APPLYING | FLAG_ENDED) != 0);
        if mid_set {
            if std::time::Instant::now() >= deadline {
                return Err(crate::ReplError::WrongState {
                    lun: members[0].name.clone(),
                    reason: format!("no delta-set boundary within {wait:?}"),
                });
            }
            drop(all);
            std::thread::sleep(std::time::Duration::from_millis(2));
            continue;
        }
        let mut taken: Vec<&Arc<Snapshots>> = Vec::new();
        for (m, (_, g)) in members.iter().zip(&all) {
            let Some(s) = &g.snaps else { continue };
            let took = g
                .target
                .flush()
                .map_err(crate::ReplError::from)
                .and_then(|()| Ok(s.create_session(name, true).map(drop)?));
            if let Err(e) = took {
                // All or none: a point on some members only is no point.
                for t in taken {
                    let _ = t.delete_session(name);
                }
                warn!(replica = %m.name, error = %e, "drill snapshot refused");
                return Err(e);
            }
            taken.push(s);
        }
        let h = &all[0].1.meta.header;
        return Ok(DrillPoint {
            delta_cut_ms: h.delta_cut_ms,
            delta_id: h.delta_id,
            connected: all.iter().all(|(_, g)| g.session),
            last_heard_ms: members
                .iter()
                .map(|m| m.last_heard_ms.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0),
        });
    }
}
