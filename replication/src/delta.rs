//! Asynchronous replication: write-order-consistent delta sets.
//!
//! A cut takes a snapshot session of the local LUN (the writes acknowledged before it,
//! and none after) and moves the regions written since the previous cut into the delta
//! set. Shipping reads those regions from the session, so writers go on meanwhile. The
//! secondary applies a set between `delta-begin` (it takes its gold snapshot) and
//! `delta-end` (the set is whole; the gold copy goes; for a consistency group's member
//! the gold copy stays until `delta-commit`). A region leaves the primary's bitmap only
//! when the set holding it is visible at the secondary and the region was not written
//! again since the cut, so a crash of either side loses no change.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lun::Lun;
use snapshot::Snapshots;
use tracing::{debug, info, warn};

use crate::error::{ReplError, Result};
use crate::peer::expect_ok;
use crate::primary::{Inner, PrimaryLun};
use crate::wire::Message;
use crate::{LinkState, Mode};

/// Snapshot sessions of the local LUN that freeze delta sets are named this, then the id.
pub const DELTA_SESSION_PREFIX: &str = "repl-delta-";

/// One cut delta set on its way to the secondary.
#[derive(Debug)]
pub struct Delta {
    id: u64,
    cut_ms: u64,
    session: String,
    regions: Vec<u64>,
    sent: usize,
    begun: bool,
    /// A group member's set ended at the secondary and waits for the group's commit.
    ended: bool,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn rpo(g: &Inner, dirty: u64) -> Option<Duration> {
    let current = matches!(g.link, LinkState::Connected) && dirty == 0 && g.pending.is_none();
    if current {
        return Some(Duration::ZERO);
    }
    g.replica_point_ms
        .map(|t| Duration::from_millis(now_ms().saturating_sub(t)))
}

impl PrimaryLun {
    /// Switches this primary to asynchronous mode. `snaps` must be the snapshot engine
    /// of the LUN this primary was opened on, through its source view (every write
    /// must reach the snapshot engine, or a delta set would not be a point in time).
    pub fn into_async(self, snaps: Snapshots, period: Duration) -> Result<PrimaryLun> {
        if snaps.source().name() != self.local.name() {
            return Err(ReplError::BadConfig {
                lun: self.name.clone(),
                reason: format!(
                    "asynchronous mode needs the primary opened on the snapshot source view {}",
                    snaps.source().name()
                ),
            });
        }
        if period.is_zero() {
            return Err(ReplError::BadConfig {
                lun: self.name.clone(),
                reason: "the delta-set period must be above zero".into(),
            });
        }
        // A set cut before a restart is cut again: its regions are still dirty.
        for stale in snaps
            .list()
            .iter()
            .filter(|x| x.name.starts_with(DELTA_SESSION_PREFIX))
        {
            snaps.delete_session(&stale.name)?;
        }
        {
            let mut g = self.lock();
            g.mode = Mode::Async { period };
            g.snaps = Some(snaps);
            // Regions dirty from before (a restart) go out in the first set.
            let dirty: Vec<u64> = (0..g.meta.regions())
                .filter(|&r| g.meta.is_dirty(r))
                .collect();
            g.interval.extend(dirty);
        }
        Ok(self)
    }

    /// Cuts a delta set of everything written since the previous cut. Nothing is cut
    /// while the link is down, a resync runs, or the previous set is still on its way.
    pub fn cut_delta(&self) -> Result<Option<u64>> {
        let mut g = self.quiesce(self.lock());
        self.cut_locked(&mut g, false)
    }

    /// Whether a cut can be taken now; the group cuts only when all its members can.
    pub(crate) fn can_cut(g: &Inner) -> bool {
        g.link == LinkState::Connected && g.pending.is_none()
    }

    /// The cut itself, with this member's writers held off by the caller's lock and
    /// none in flight (see [`PrimaryLun::quiesce`]). `even_empty` cuts a set with no
    /// region: a group's set must reach every member, or the secondary could not tell
    /// when it is whole.
    pub(crate) fn cut_locked(&self, g: &mut Inner, even_empty: bool) -> Result<Option<u64>> {
        if !PrimaryLun::can_cut(g) {
            return Ok(None);
        }
        if g.interval.is_empty() && !even_empty {
            if g.meta.dirty_count() == 0 {
                g.replica_point_ms = Some(now_ms());
            }
            return Ok(None);
        }
        let Some(snaps) = &g.snaps else {
            return Err(ReplError::WrongState {
                lun: self.name.clone(),
                reason: "delta sets need asynchronous mode".into(),
            });
        };
        let id = g.next_delta;
        let session = format!("{DELTA_SESSION_PREFIX}{id}");
        // The session flushes the local LUN and freezes this point: every write
        // acknowledged before, none after.
        snaps.create_session(&session, false)?;
        let cut_ms = now_ms();
        let regions: Vec<u64> = std::mem::take(&mut g.interval).into_iter().collect();
        debug!(lun = %self.name, delta = id, regions = regions.len(), "delta set cut");
        g.next_delta += 1;
        g.pending = Some(Delta {
            id,
            cut_ms,
            session,
            regions,
            sent: 0,
            begun: false,
            ended: false,
        });
        Ok(Some(id))
    }

    /// Ships up to `max_regions` of the pending delta set; true once none is pending,
    /// or, for a consistency group's member, once the set has ended at the secondary
    /// and waits for the group's commit ([`PrimaryLun::commit_delta`]).
    /// Writers wait only for one step.
    pub fn ship_step(&self, max_regions: usize) -> Result<bool> {
        let mut g = self.lock();
        let Some(mut d) = g.pending.take() else {
            return Ok(true);
        };
        if d.ended {
            g.pending = Some(d);
            return Ok(true);
        }
        let grouped = g.group.is_some();
        match self.ship(&mut g, &mut d, max_regions, grouped) {
            Ok(true) if grouped => {
                d.ended = true;
                g.pending = Some(d);
                Ok(true)
            }
            Ok(true) => {
                self.delta_applied(&mut g, d)?;
                Ok(true)
            }
            Ok(false) => {
                g.pending = Some(d);
                Ok(false)
            }
            Err(e) => {
                // The set's regions are still dirty: the next connect resyncs them.
                drop_session(&g, &d.session);
                g.interval.clear();
                self.lose_link(&mut g, 0..0, &e)?;
                Err(e)
            }
        }
    }

    /// The set is visible at the secondary: its regions not written since the cut
    /// leave the bitmap.
    fn delta_applied(&self, g: &mut Inner, d: Delta) -> Result<()> {
        for r in &d.regions {
            if !g.interval.contains(r) {
                g.meta.clear(*r);
            }
        }
        g.meta.persist_bitmap()?;
        g.replica_point_ms = Some(d.cut_ms);
        drop_session(g, &d.session);
        debug!(lun = %self.name, delta = d.id, "delta set applied at the secondary");
        Ok(())
    }

    /// Tells the secondary that the group's set, ended on every member, is to be made
    /// visible; once it answers, this member's regions of the set leave the bitmap.
    /// Nothing is done unless this member's set has ended.
    pub(crate) fn commit_delta(&self) -> Result<()> {
        let mut g = self.lock();
        let Some(d) = g.pending.take_if(|d| d.ended) else {
            return Ok(());
        };
        let answer = g
            .peer
            .call(&Message::DeltaCommit { id: d.id })
            .and_then(|r| expect_ok(&mut *g.peer, r));
        match answer {
            Ok(()) => self.delta_applied(&mut g, d),
            Err(e) => {
                // Committed there or not, the regions are still dirty here: the next
                // connect resyncs them.
                drop_session(&g, &d.session);
                g.interval.clear();
                self.lose_link(&mut g, 0..0, &e)?;
                Err(e)
            }
        }
    }

    /// The group's set failed on another member: this member's set, ended or not, is
    /// never committed. Its regions are still dirty and go out again in the next set.
    pub(crate) fn abandon_delta(&self) {
        let mut g = self.lock();
        if let Some(d) = g.pending.take() {
            drop_session(&g, &d.session);
            g.interval.extend(d.regions);
        }
    }

    fn ship(&self, g: &mut Inner, d: &mut Delta, max_regions: usize, group: bool) -> Result<bool> {
        if !d.begun {
            let r = g.peer.call(&Message::DeltaBegin {
                id: d.id,
                cut_ms: d.cut_ms,
            })?;
            expect_ok(&mut *g.peer, r)?;
            d.begun = true;
        }
        let view = match &g.snaps {
            Some(s) => s.session(&d.session)?,
            None => {
                return Err(ReplError::WrongState {
                    lun: self.name.clone(),
                    reason: "delta sets need asynchronous mode".into(),
                });
            }
        };
        let rs = g.meta.region_size();
        let size = self.local.size();
        let end = (d.sent + max_regions.max(1)).min(d.regions.len());
        // Pipelined, as a resync step: writers wait for the step, not for a round trip
        // per region.
        let mut answers = Vec::with_capacity(end - d.sent);
        for &r in &d.regions[d.sent..end] {
            let offset = r * rs;
            let mut data = vec![0u8; rs.min(size - offset) as usize];
            view.read_at(&mut data, offset)?;
            answers.push(g.peer.submit(&Message::DeltaData { offset, data })?);
        }
        for answer in answers {
            let reply = answer.wait()?;
            expect_ok(&mut *g.peer, reply)?;
        }
        d.sent = end;
        if d.sent < d.regions.len() {
            return Ok(false);
        }
        let reply = g.peer.call(&Message::DeltaEnd {
            id: d.id,
            gens: g.meta.header.gens,
            group,
        })?;
        expect_ok(&mut *g.peer, reply)?;
        Ok(true)
    }

    /// Cuts a delta set and ships it whole.
    pub fn replicate_now(&self) -> Result<Option<u64>> {
        let id = self.cut_delta()?;
        while !self.ship_step(64)? {}
        Ok(id)
    }

    /// Runs the asynchronous cycle in a thread: every period (or at once when asked),
    /// bring the link up if it is down, finish a resync, or cut and ship a delta set.
    pub fn start_cycle(self: &Arc<Self>) -> Result<Cycle> {
        let Mode::Async { period } = self.lock().mode else {
            return Err(ReplError::WrongState {
                lun: self.name.clone(),
                reason: "the delta-set cycle needs asynchronous mode".into(),
            });
        };
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (lun, stopping) = (self.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("repl-async".into())
            .spawn(move || {
                let (lock, cv) = &*stopping;
                loop {
                    let guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
                    let (guard, _) = cv
                        .wait_timeout_while(guard, period, |stop| !*stop)
                        .unwrap_or_else(PoisonError::into_inner);
                    if *guard {
                        break;
                    }
                    drop(guard);
                    if let Err(e) = lun.cycle_once() {
                        warn!(lun = %lun.name, error = %e, "asynchronous cycle failed; retrying next period");
                    }
                }
            })
            .map_err(|e| ReplError::WrongState {
                lun: self.name.clone(),
                reason: format!("cannot start the delta-set thread: {e}"),
            })?;
        info!(lun = %self.name, period_ms = period.as_millis() as u64, "asynchronous replication cycle started");
        Ok(Cycle {
            stop,
            thread: Some(thread),
        })
    }

    fn cycle_once(&self) -> Result<()> {
        match self.link_state() {
            LinkState::Disconnected => {
                self.connect()?;
                Ok(())
            }
            LinkState::Resyncing => self.resync().map(|_| ()),
            LinkState::Connected => self.replicate_now().map(|_| ()),
            LinkState::Fractured | LinkState::Demoted => Ok(()),
        }
    }
}

pub(crate) fn forget_pending(g: &mut Inner) {
    if let Some(d) = g.pending.take() {
        drop_session(g, &d.session);
    }
}

fn drop_session(g: &Inner, name: &str) {
    if let Some(s) = &g.snaps
        && let Err(e) = s.delete_session(name)
    {
        warn!(error = %e, session = name, "cannot delete a delta-set session");
    }
}

/// The running asynchronous cycle; dropping it stops the thread.
#[derive(Debug)]
pub struct Cycle {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Cycle {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
