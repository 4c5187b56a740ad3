//! The replicated write: the only code that touches the local LUN and the peer in one
//! step. It reads top to bottom:
//!
//! 1. a write overlapping one in flight waits for it (so both sites apply overlapping
//!    writes in one order), as does one whose activity-log extent would evict while
//!    writes are in flight; asynchronous mode stops here: the regions are dirty on
//!    disk, the write is local (without the lock), and a delta set ships it later
//!    (`delta.rs`, whose cut waits for the writes in flight); a
//!    consistency group another member of which lost its link stops shipping first;
//! 2. connected: the write's activity-log extent is made hot on disk and the write is
//!    sent to the peer under the lock (the lock's order is the write order); the lock
//!    is then released while the local write and the peer's answer proceed, and the
//!    write is acknowledged only when both sides have it;
//! 3. the peer fails: the link is down, the regions of this write and of every write
//!    in flight are dirty in the on-disk bitmap before any is acknowledged (policy
//!    `continue`) or the write fails (`block`);
//! 4. not connected: `block` refuses without writing; otherwise the regions are dirty
//!    on disk before the local write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use lun::{Lun, LunError, check_request};
use tracing::{info, warn};

use crate::error::{ReplError, Result};
use crate::meta::{FLAG_DISCARD, FLAG_FRACTURED, FLAG_PRIMARY, FLAG_RESYNC, MetaStore};
use crate::peer::{Peer, expect_ok, expect_ok_from};
use crate::wire::Message;
use crate::{LinkPolicy, LinkState, Mode};

/// A LUN whose writes reach the secondary: every writer of the replicated LUN goes
/// through this wrapper.
#[derive(Debug)]
pub struct PrimaryLun {
    pub(crate) name: String,
    pub(crate) local: Arc<dyn Lun>,
    pub(crate) policy: LinkPolicy,
    pub(crate) inner: Mutex<Inner>,
    /// Signalled whenever a write in flight completes.
    pub(crate) settled: Condvar,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub meta: MetaStore,
    pub peer: Box<dyn Peer>,
    pub link: LinkState,
    pub last_error: Option<String>,
    pub bytes_resynced: u64,
    /// Regions the peer had written that resyncs overwrote (failback, discard-local).
    pub peer_discarded: u64,
    /// Regions written at both sides since the peer's last flush: a peer crash may lose
    /// them, so a lost link marks them dirty. Within the hot extents, so bounded.
    pub unflushed: BTreeSet<u64>,
    pub mode: Mode,
    /// Asynchronous mode: the snapshot engine of the local LUN, whose sessions freeze
    /// each delta set at its cut.
    pub snaps: Option<snapshot::Snapshots>,
    /// Asynchronous mode: regions written since the last cut.
    pub interval: BTreeSet<u64>,
    pub pending: Option<crate::delta::Delta>,
    pub next_delta: u64,
    /// When the delta set the replica last applied was cut (ms since the epoch).
    pub replica_point_ms: Option<u64>,
    /// Resync asks for the peer's checksum of a region first and skips it if equal.
    pub compare_before_copy: bool,
    /// The consistency group this LUN replicates with, if any.
    pub group: Option<Arc<crate::group::GroupLink>>,
    /// Writes under way without the lock (sent to the peer, or written locally in
    /// asynchronous mode), by ticket in the order they began: their byte ranges.
    pub inflight: BTreeMap<u64, (u64, u64)>,
    pub next_ticket: u64,
    /// Bumped each time the link is lost, so a write in flight learns it was.
    pub link_epoch: u64,
    /// When the running resync started copying and the regions it had left then: its pace.
    pub resync_clock: Option<(std::time::Instant, u64)>,
    /// In a group's resync: this member has copied everything and waits for the others.
    pub group_drained: bool,
}

impl PrimaryLun {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The link is gone: start a new generation (the bitmap remembers the one the peer
    /// has) and persist the regions that may differ, the peer's unflushed ones included,
    /// before anything is acknowledged. The activity log is then no longer needed: the
    /// bitmap covers everything in flight.
    pub(crate) fn lose_link(
        &self,
        g: &mut Inner,
        dirty: std::ops::Range<u64>,
        why: &ReplError,
    ) -> Result<()> {
        g.meta.mark(dirty);
        for r in std::mem::take(&mut g.unflushed) {
            g.meta.mark(r..r + 1);
        }
        // Writes in flight may be at one side only: dirty before any is acknowledged.
        let inflight: Vec<_> = g.inflight.values().copied().collect();
        for (start, end) in inflight {
            let regions = g.meta.region_range(start, end - start);
            g.meta.mark(regions);
        }
        g.meta.persist_bitmap()?;
        // A delta set on its way is rolled back at the secondary when the link goes;
        // its regions are still dirty here, so the resync after reconnect carries them.
        crate::delta::forget_pending(g);
        if let Some(link) = &g.group {
            link.break_all();
        }
        if matches!(g.link, LinkState::Connected | LinkState::Resyncing) {
            warn!(lun = %self.name, peer = g.peer.name(), error = %why, policy = ?self.policy, "replication link lost; tracking changed regions");
            g.meta.header.gens.fork();
            g.meta.write_header()?;
            g.meta.clear_activity_log()?;
            g.link = LinkState::Disconnected;
            g.link_epoch += 1;
            g.resync_clock = None;
            if g.mode == Mode::Sync {
                // A synchronous replica held everything acknowledged until now.
                g.replica_point_ms = Some(crate::delta::now_ms());
            }
        }
        g.last_error = Some(why.to_string());
        Ok(())
    }

    /// Flushes the peer; what it had is durable there from now on.
    pub(crate) fn flush_peer(g: &mut Inner) -> Result<()> {
        let r = g.peer.call(&Message::Flush)?;
        expect_ok(&mut *g.peer, r)?;
        g.unflushed.clear();
        Ok(())
    }

    /// Waits, letting others take the lock, until `ready` holds.
    pub(crate) fn wait_until<'a>(
        &self,
        mut g: MutexGuard<'a, Inner>,
        ready: impl Fn(&Inner) -> bool,
    ) -> MutexGuard<'a, Inner> {
        while !ready(&g) {
            g = self.settled.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        g
    }

    /// Waits until no write is in flight: for what reads the local LUN to copy or
    /// compare it, or changes the link under the writers.
    pub(crate) fn quiesce<'a>(&self, g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        self.wait_until(g, |g| g.inflight.is_empty())
    }

    /// Takes the link for lost if the transport already knows it is (an idle link
    /// whose keepalives went unanswered), so the status says so and what the peer may
    /// not have made durable is dirty on disk.
    pub(crate) fn notice_broken_link(&self, g: &mut Inner) {
        if !matches!(g.link, LinkState::Connected | LinkState::Resyncing) {
            return;
        }
        let Some(reason) = g.peer.broken() else {
            return;
        };
        let why = ReplError::LinkDown {
            peer: g.peer.name().to_string(),
            reason,
        };
        if let Err(e) = self.lose_link(g, 0..0, &why) {
            warn!(lun = %self.name, error = %e, "cannot record the lost link; the next write retries");
        }
    }

    fn replicated_write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let end = offset + len;
        // An overlapping write in flight goes first: both sides apply overlapping writes
        // in the order they were sent, and its local write may not have landed yet. An
        // activity-log eviction waits for every write in flight, whose extent it may drop.
        let mut g = self.wait_until(self.lock(), |g| {
            let overlaps = g.inflight.values().any(|&(s, e)| s < end && offset < e);
            let evicts = !g.inflight.is_empty()
                && matches!(g.link, LinkState::Connected | LinkState::Resyncing)
                && g.meta.would_evict(offset, len);
            !overlaps && !evicts
        });
        if g.link == LinkState::Demoted {
            return Err(LunError::ReadOnly {
                lun: self.name.clone(),
            }
            .into());
        }
        let regions = g.meta.region_range(offset, len);
        if let Mode::Async { .. } = g.mode {
            // Shipped later in a delta set; tracked durably until the replica has it.
            // Regions already dirty cost no metadata write. The local write runs
            // without the lock; a cut waits for it, so its set holds it whole.
            g.meta.mark(regions.clone());
            g.meta.persist_bitmap()?;
            g.interval.extend(regions);
            let ticket = g.next_ticket;
            g.next_ticket += 1;
            g.inflight.insert(ticket, (offset, end));
            drop(g);
            let written = self.local.write_at(buf, offset);
            self.lock().inflight.remove(&ticket);
            self.settled.notify_all();
            return Ok(written?);
        }
        if let Some(link) = g.group.clone()
            && link.is_broken()
            && matches!(g.link, LinkState::Connected | LinkState::Resyncing)
        {
            // Another member lost its link: this one stops shipping before it
            // acknowledges anything more, so the replicas stay one point in time.
            let why = ReplError::WrongState {
                lun: self.name.clone(),
                reason: format!("consistency group {} fractured", link.name()),
            };
            self.lose_link(&mut g, 0..0, &why)?;
        }
        if matches!(g.link, LinkState::Connected | LinkState::Resyncing) {
            let Inner {
                meta,
                peer,
                unflushed,
                ..
            } = &mut *g;
            let local = &self.local;
            let hot = meta.activate(offset, len, &mut || {
                local.flush()?;
                let r = peer.call(&Message::Flush)?;
                expect_ok(&mut **peer, r)?;
                unflushed.clear();
                Ok(())
            });
            let sent = hot.and_then(|()| peer.submit_write(offset, buf));
            let reply = match sent {
                Ok(reply) => reply,
                Err(e) => {
                    // The peer never got it: with `block` nothing is written anywhere.
                    self.lose_link(&mut g, regions, &e)?;
                    return match self.policy {
                        LinkPolicy::Continue => Ok(self.local.write_at(buf, offset)?),
                        LinkPolicy::Block => Err(e),
                    };
                }
            };
            // The order is fixed: the lock goes while the local write and the peer's
            // answer proceed, so the next writer's frame follows this one at once.
            let ticket = g.next_ticket;
            g.next_ticket += 1;
            g.inflight.insert(ticket, (offset, end));
            let epoch = g.link_epoch;
            let peer_name = g.peer.name().to_string();
            drop(g);
            // The local write overlaps the peer's; the write counts only when both land.
            // The peer's answer is awaited even if the local write failed.
            let written = self.local.write_at(buf, offset);
            let acked = reply.wait().and_then(|m| expect_ok_from(&peer_name, m));
            let mut g = self.lock();
            g.inflight.remove(&ticket);
            self.settled.notify_all();
            if g.link_epoch != epoch {
                // The link went down while this write was in flight: losing it made this
                // write's regions dirty on disk, so it may be acknowledged (`continue`)
                // unless it failed at the peer under `block`.
                if let Err(e) = acked
                    && self.policy == LinkPolicy::Block
                {
                    return Err(e);
                }
            } else if let Err(e) = acked {
                self.lose_link(&mut g, regions.clone(), &e)?;
                if self.policy == LinkPolicy::Block {
                    return Err(e);
                }
            } else {
                g.unflushed.extend(regions.clone());
            }
            if written.is_err() {
                // The peer may hold what the local LUN failed to: a resync settles it.
                g.meta.mark(regions);
                if g.link == LinkState::Connected {
                    g = self.quiesce(g);
                    if let Err(e) = self.begin_resync(&mut g) {
                        self.lose_link(&mut g, 0..0, &e)?;
                    }
                    g.meta.write_header()?;
                } else {
                    g.meta.persist_bitmap()?;
                }
            }
            return Ok(written?);
        }
        if self.policy == LinkPolicy::Block && g.meta.flags() & FLAG_FRACTURED == 0 {
            return Err(ReplError::LinkDown {
                peer: g.peer.name().to_string(),
                reason: "policy block: writes fail until the link is back".into(),
            });
        }
        g.meta.mark(regions);
        g.meta.persist_bitmap()?;
        self.local.write_at(buf, offset)?;
        Ok(())
    }

    fn replicated_flush(&self, g: &mut Inner) -> Result<()> {
        self.local.flush()?;
        if g.link == LinkState::Demoted || matches!(g.mode, Mode::Async { .. }) {
            return Ok(());
        }
        if matches!(g.link, LinkState::Connected | LinkState::Resyncing) {
            if let Err(e) = PrimaryLun::flush_peer(g) {
                self.lose_link(g, 0..0, &e)?;
                if self.policy == LinkPolicy::Block {
                    return Err(e);
                }
            }
        } else if self.policy == LinkPolicy::Block && g.meta.flags() & FLAG_FRACTURED == 0 {
            return Err(ReplError::LinkDown {
                peer: g.peer.name().to_string(),
                reason: "policy block: flushes fail until the link is back".into(),
            });
        }
        Ok(())
    }

    /// Makes resyncs (the initial sync above all) compare each region's checksum with
    /// the peer's before copying it, skipping those that already match: one round trip
    /// per region, for a replica seeded from a copy.
    pub fn set_compare_before_copy(&self, on: bool) {
        self.lock().compare_before_copy = on;
    }

    /// Turns this side into a secondary (to be opened with [`crate::Secondary::open`] on
    /// the same LUNs once this is dropped); writes are refused from now on. What this side
    /// wrote that the peer may lack stays in the bitmap: with `discard_local` the new
    /// primary overwrites it at the next resync (failback), without it a peer that also
    /// moved on refuses to resync (split brain) until [`crate::Secondary::discard_local`].
    /// Refused while the link is up: fracture it first.
    pub fn demote(&self, discard_local: bool) -> Result<()> {
        let mut g = self.quiesce(self.lock());
        if matches!(g.link, LinkState::Connected | LinkState::Resyncing) {
            return Err(ReplError::WrongState {
                lun: self.name.clone(),
                reason: "the link is up; fracture it before demoting".into(),
            });
        }
        self.local.flush()?;
        // Writes in flight when the link went away may be here only.
        g.meta.recover_activity_log()?;
        g.meta
            .set_flag(FLAG_PRIMARY | FLAG_RESYNC | FLAG_FRACTURED, false);
        g.meta.set_flag(FLAG_DISCARD, discard_local);
        g.meta.header.resync_total = 0;
        g.meta.write_header()?;
        g.link = LinkState::Demoted;
        info!(lun = %self.name, discard_local, dirty_regions = g.meta.dirty_count(), "demoted to secondary");
        Ok(())
    }

    /// Stops cleanly: everything is flushed on both sides, so the activity log empties
    /// and a restart resyncs only what the bitmap holds.
    pub fn close(&self) -> Result<()> {
        let mut g = self.quiesce(self.lock());
        if g.link == LinkState::Demoted {
            return Ok(());
        }
        self.replicated_flush(&mut g)?;
        g.meta.persist_bitmap()?;
        g.meta.clear_activity_log()?;
        info!(lun = %self.name, dirty_regions = g.meta.dirty_count(), "replication primary closed");
        Ok(())
    }
}

fn to_lun_error(name: &str, e: ReplError) -> LunError {
    match e {
        ReplError::Lun(e) => e,
        other => LunError::Disconnected {
            lun: name.to_string(),
            reason: other.to_string(),
        },
    }
}

impl Lun for PrimaryLun {
    fn name(&self) -> &str {
        &self.name
    }

    fn sector_size(&self) -> u32 {
        self.local.sector_size()
    }

    fn size(&self) -> u64 {
        self.local.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.local.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        self.replicated_write(buf, offset)
            .map_err(|e| to_lun_error(&self.name, e))
    }

    fn flush(&self) -> lun::Result<()> {
        let g = self.lock();
        // Every write begun before the flush is acknowledged at both sides first, so the
        // flush covers it here as it does at the peer.
        let before = g.next_ticket;
        let mut g = self.wait_until(g, |g| g.inflight.keys().next().is_none_or(|&t| t >= before));
        self.replicated_flush(&mut g)
            .map_err(|e| to_lun_error(&self.name, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        check_request(self, offset, len)?;
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.write_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn may_hold_data(&self, offset: u64, len: u64) -> lun::Result<bool> {
        self.local.may_hold_data(offset, len)
    }

    fn identity(&self) -> Option<lun::LunIdentity> {
        self.local.identity()
    }

    fn reach(&self) -> lun::Reach {
        self.local.reach()
    }

    fn is_read_only(&self) -> bool {
        self.local.is_read_only() || self.lock().link == LinkState::Demoted
    }
}
