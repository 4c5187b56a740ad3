//! A mounted host's cluster duties beyond its own operations: waiting for another host's
//! lock, recovering dead hosts, and the background committer.
//!
//! Recovery of a dead host's slot, in this order (VMFS: "replay the journal, then break the
//! locks"):
//! 1. claim the slot (state `recovering`, naming us) with the datastore's protocol, so no
//!    two hosts recover it at once;
//! 2. replay its journal in place and checkpoint it;
//! 3. move its orphan list (interrupted deletes and truncates) into ours, through our
//!    journal, and make that durable;
//! 4. mark the slot free: every lock naming the dead incarnation is now stale, and the next
//!    host that wants one of them takes it (lazy lock breaking);
//! 5. finish the adopted orphans like our own.
//!
//! A crash at any step leaves the slot `recovering` under a recoverer that is itself dead,
//! and the next host redoes the recovery: replay is idempotent, and orphan entries carry
//! descriptor generations so a finished one is recognised.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::Verdict;
use crate::cluster::node::random_u64;
use crate::cluster::record::transition;
use crate::datastore::{Datastore, Inner};
use crate::error::{Error, Result};
use crate::journal;
use crate::locks::Wait;
use crate::store;

impl Datastore {
    /// Waits until the lock `w` asks for could be granted (recovering dead holders on the
    /// way), or fails with `err` once the lock wait has passed since `started`, or at once
    /// when a live host has the object open.
    pub(crate) fn wait_for(&self, w: &Wait, started: Instant, err: Error) -> Result<()> {
        let Some(node) = self.node().cloned() else {
            return Err(err);
        };
        let timing = node.timing();
        let deadline = started + timing.lock_wait();
        let poll = (timing.commit_interval() / 4).max(Duration::from_millis(1));
        let me = node.host().holder();
        loop {
            if Instant::now() > deadline {
                return Err(err);
            }
            let rec = node.read_lock(w.target)?;
            let outcome = transition(&rec, me, node.host().uuid, Some(w.want), &mut |h| {
                node.verdict(h)
            });
            match outcome {
                Ok(_) => return Ok(()),
                Err(c) => match c.verdict {
                    // Dead, or being recovered by this host after an attempt that failed:
                    // (re)do the recovery here, so its error reaches the caller.
                    Verdict::Dead => {
                        self.recover_slot(c.holder.slot, false)?;
                        continue;
                    }
                    Verdict::Recovering { by } if by == me.slot => {
                        self.recover_slot(c.holder.slot, false)?;
                        continue;
                    }
                    Verdict::Alive if c.open => return Err(node.busy(w.object.clone(), &c)),
                    _ => {}
                },
            }
            let spread = poll.as_micros() as u64 + 1;
            std::thread::sleep(poll / 2 + Duration::from_micros(random_u64() % spread));
        }
    }

    /// Recovers dead slot `d` (see the module docs). Does nothing when another host is
    /// recovering it or it no longer needs recovery. `joining`: this host is joining, and a
    /// crashed host of this machine of any identity counts as dead.
    pub(crate) fn recover_slot(&self, d: u32, joining: bool) -> Result<()> {
        let Some(node) = self.node().cloned() else {
            return Ok(());
        };
        let adopted = {
            let _one = self
                .inner
                .recovering
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let Some(dead) = node.claim_recovery(d, joining)? else {
                return Ok(());
            };
            let sb = self.superblock().clone();
            let started = Instant::now();
            tracing::warn!(
                lun = %self.lun().name(), host = %node.host(), dead_host = %dead.hostname,
                dead_uuid = %dead.host, slot = d, generation = dead.generation, pid = dead.pid,
                "recovering a dead host: replaying its journal before its locks are broken"
            );
            let (replayed, _) = store::replay(&**self.lun(), &sb, d, node.host().uuid)?;
            let orphan_off = sb.orphan_offset(d);
            let adopted = self.write_op(|s| {
                let theirs = store::read_orphans(&*s.st.lun, &sb, d)?;
                if theirs.is_empty() {
                    return Ok(0);
                }
                let mut merged = s.orphans.clone();
                for o in &theirs {
                    if !merged.iter().any(|m| m.ino() == o.ino()) {
                        merged.push(*o);
                    }
                }
                s.set_orphans(merged)?;
                s.st.put(orphan_off, journal::encode_orphans(&[], orphan_off));
                Ok(theirs.len())
            })?;
            self.lock().sync_point()?;
            node.finish_recovery(d)?;
            tracing::warn!(
                lun = %self.lun().name(), host = %node.host(), dead_host = %dead.hostname, slot = d,
                replayed, adopted, elapsed = ?started.elapsed(),
                "dead host recovered: journal replayed, its locks are free"
            );
            adopted
        };
        if adopted > 0 {
            self.finish_orphans()?;
        }
        Ok(())
    }

    /// Starts the background committer of a read-write open.
    pub(crate) fn start_committer(&self) -> Result<()> {
        let Some(node) = self.node() else {
            return Ok(());
        };
        let weak = Arc::downgrade(&self.inner);
        let handle = std::thread::Builder::new()
            .name(format!("vmfs-commit-{}", node.host().slot))
            .spawn(move || committer_loop(weak))
            .map_err(|e| Error::Invalid {
                object: self.lun().name().to_string(),
                reason: format!("cannot start the committer thread: {e}"),
            })?;
        self.inner.set_committer(handle);
        Ok(())
    }
}

/// Every commit interval: commit and release transient locks; every renew interval: recover
/// hosts found dead.
fn committer_loop(weak: std::sync::Weak<Inner>) {
    let (every, recover_every) = match weak.upgrade() {
        Some(inner) => {
            let t = inner.sb.timing();
            (t.commit_interval(), t.renew_interval())
        }
        None => return,
    };
    let mut next_recovery = Instant::now() + recover_every;
    loop {
        {
            let Some(inner) = weak.upgrade() else { return };
            let deadline = Instant::now() + every;
            let mut stop = inner.stop.lock().unwrap_or_else(|e| e.into_inner());
            while !*stop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                stop = inner
                    .wake
                    .wait_timeout(stop, deadline - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if *stop {
                return;
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        let ds = Datastore::background(inner);
        let Some(node) = ds.node().cloned() else {
            return;
        };
        if node.fenced().is_some() {
            continue;
        }
        {
            let mut s = ds.lock();
            if s.has_work() {
                if let Err(e) = s.sync_point() {
                    tracing::warn!(lun = %ds.lun().name(), host = %node.host(), error = %e, "background commit failed");
                }
            }
        }
        if Instant::now() >= next_recovery {
            next_recovery = Instant::now() + recover_every;
            for slot in node.dead_slots(false) {
                if let Err(e) = ds.recover_slot(slot, false) {
                    tracing::warn!(lun = %ds.lun().name(), host = %node.host(), slot, error = %e, "recovering a dead host failed; retried later");
                }
            }
        }
    }
}
