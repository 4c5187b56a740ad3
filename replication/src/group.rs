//! Consistency groups: several primaries replicated with one write order.
//!
//! Synchronous members share a link flag: the first member to lose its link sets it
//! before acknowledging the write that found the loss, and every member checks it
//! before shipping a write, so no member's replica gets a write that depends on one
//! another member's replica will never have. Asynchronous members are cut together:
//! the group holds every member's write lock (in a fixed order) while it takes each
//! member's delta session, so all sets end at the same point of the write stream, and
//! the secondary makes a set visible only once it has ended on every member
//! (`delta-commit`, see [`crate::SecondaryGroup`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tracing::{info, warn};

use crate::error::{ReplError, Result};
use crate::primary::PrimaryLun;
use crate::{LinkState, Mode};

/// The state members share: whether the group's replication is broken, and how many
/// members still have regions to copy in the group's running resync.
#[derive(Debug)]
pub struct GroupLink {
    name: String,
    broken: AtomicBool,
    undrained: AtomicUsize,
}

impl GroupLink {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
    /// A member has copied everything in the group's resync; true once every member has,
    /// when the members may end their resyncs and the replicas become consistent again.
    pub(crate) fn drained(&self, newly: bool) -> bool {
        if newly {
            let _ = self
                .undrained
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
        self.undrained.load(Ordering::SeqCst) == 0
    }
    pub fn break_all(&self) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            warn!(group = %self.name, "consistency group fractured: every member tracks its writes");
        }
    }
}

#[derive(Debug)]
pub struct ConsistencyGroup {
    link: Arc<GroupLink>,
    members: Vec<Arc<PrimaryLun>>,
}

impl ConsistencyGroup {
    /// Groups `members`, all in the same mode and none in another group.
    pub fn new(name: &str, members: Vec<Arc<PrimaryLun>>) -> Result<ConsistencyGroup> {
        let bad = |reason: String| ReplError::BadConfig {
            lun: format!("group {name}"),
            reason,
        };
        if members.is_empty() {
            return Err(bad("a consistency group needs members".into()));
        }
        let modes: Vec<Mode> = members.iter().map(|m| m.lock().mode).collect();
        if modes
            .iter()
            .any(|m| std::mem::discriminant(m) != std::mem::discriminant(&modes[0]))
        {
            return Err(bad("members mix synchronous and asynchronous modes".into()));
        }
        for (i, m) in members.iter().enumerate() {
            if members[..i].iter().any(|o| Arc::ptr_eq(o, m)) {
                return Err(bad(format!("{} is listed twice", m.name)));
            }
            if m.lock().group.is_some() {
                return Err(bad(format!("{} is already in a group", m.name)));
            }
        }
        let link = Arc::new(GroupLink {
            name: name.to_string(),
            broken: AtomicBool::new(false),
            undrained: AtomicUsize::new(0),
        });
        for m in &members {
            let mut g = m.lock();
            if g.link != LinkState::Connected && g.link != LinkState::Resyncing {
                // A member already apart: the group starts fractured.
                link.broken.store(true, Ordering::SeqCst);
            }
            g.group = Some(link.clone());
        }
        Ok(ConsistencyGroup { link, members })
    }

    pub fn members(&self) -> &[Arc<PrimaryLun>] {
        &self.members
    }

    pub fn is_fractured(&self) -> bool {
        self.link.is_broken()
    }

    /// Brings every member's link up (after a fracture or a link loss); resyncs follow.
    /// Every member resyncs, even one with nothing to copy, and none ends its resync
    /// before all have copied everything: until then each replica is flagged
    /// inconsistent and keeps its pre-resync snapshot, all taken before anything new was
    /// shipped, so the group's replicas hold one point in time whenever the link fails
    /// again, however partly the group was reconnected.
    pub fn connect(&self) -> Result<()> {
        self.rejoin(PrimaryLun::connect)?;
        info!(group = %self.link.name, members = self.members.len(), "consistency group connected");
        Ok(())
    }

    /// Splits every member still connected, arms the common end of the resyncs, and
    /// brings each member back with `join`; the first failure breaks the group again.
    fn rejoin(&self, join: impl Fn(&PrimaryLun) -> Result<LinkState>) -> Result<()> {
        self.abandon_sets();
        for m in &self.members {
            m.drop_link_for_group();
        }
        self.link
            .undrained
            .store(self.members.len(), Ordering::SeqCst);
        self.link.broken.store(false, Ordering::SeqCst);
        for m in &self.members {
            if let Err(e) = join(m) {
                self.link.break_all();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Runs the members' resyncs together to their common end.
    pub fn resync(&self) -> Result<()> {
        loop {
            let mut running = false;
            for m in &self.members {
                if m.link_state() == LinkState::Resyncing {
                    running = true;
                    m.resync_step(crate::resync::STEP_REGIONS)?;
                }
            }
            if !running {
                return Ok(());
            }
        }
    }

    /// Fractures every member.
    pub fn fracture(&self) -> Result<()> {
        self.link.break_all();
        for m in &self.members {
            m.fracture()?;
        }
        Ok(())
    }

    /// Ends a fracture of every member and brings the links up.
    pub fn resume(&self) -> Result<()> {
        self.rejoin(PrimaryLun::resume)
    }

    /// Cuts a delta set on every member at one point: all writers are held off while
    /// the sessions are taken. Nothing is cut unless every member can be; when any
    /// member has changes every member cuts, under one set id, so that the secondary
    /// knows the group's set is whole once each member's has ended.
    pub fn cut_delta(&self) -> Result<Vec<Option<u64>>> {
        let mut order: Vec<&Arc<PrimaryLun>> = self.members.iter().collect();
        order.sort_by_key(|m| Arc::as_ptr(m) as usize);
        // Each member's writes in flight land before its session is taken; a member
        // already held keeps its writers off while the next one drains.
        let mut guards: Vec<_> = order.iter().map(|m| m.quiesce(m.lock())).collect();
        if self.link.is_broken() || !guards.iter().all(|g| PrimaryLun::can_cut(g)) {
            return Ok(vec![None; self.members.len()]);
        }
        let changed = guards.iter().any(|g| !g.interval.is_empty());
        if changed {
            let id = guards.iter().map(|g| g.next_delta).max().unwrap_or(1);
            for g in guards.iter_mut() {
                g.next_delta = id;
            }
        }
        let mut ids = Vec::with_capacity(order.len());
        for (m, g) in order.iter().zip(guards.iter_mut()) {
            ids.push((Arc::as_ptr(m) as usize, m.cut_locked(g, changed)?));
        }
        drop(guards);
        Ok(self
            .members
            .iter()
            .map(|m| {
                ids.iter()
                    .find(|(p, _)| *p == Arc::as_ptr(m) as usize)
                    .and_then(|(_, id)| *id)
            })
            .collect())
    }

    /// Cuts one set across the group, ships every member's, then commits the set at
    /// the secondary, where it becomes visible on every member at once. A member's
    /// regions leave its bitmap only once the commit is acknowledged; a set that fails
    /// on any member is abandoned on all (the secondary rolls back what ended there).
    pub fn replicate_now(&self) -> Result<()> {
        if self.link.is_broken() {
            self.abandon_sets();
            return Ok(());
        }
        self.cut_delta()?;
        let shipped = (|| {
            for m in &self.members {
                while !m.ship_step(64)? {}
            }
            for m in &self.members {
                m.commit_delta()?;
            }
            Ok(())
        })();
        if shipped.is_err() {
            self.link.break_all();
            self.abandon_sets();
        }
        shipped
    }

    /// A set that failed on one member was rolled back at the secondary on every
    /// member; no member may go on to commit its part.
    fn abandon_sets(&self) {
        for m in &self.members {
            m.abandon_delta();
        }
    }
}
