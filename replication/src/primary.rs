//! The replicated write: the only code that touches the local LUN and the peer in one
//! step. It reads top to bottom:
//!
//! 1. one writer at a time (write order is the order of this lock); asynchronous mode
//!    stops here: the regions are dirty on disk, the write is local, and a delta set
//!    ships it later (`delta.rs`); a consistency group another member of which lost its
//!    link stops shipping first;
//! 2. connected: the write's activity-log extent is made hot on disk, the write is sent
//!    to the peer, written locally, and acknowledged only when both sides have it;
//! 3. the peer fails: the link is down, the regions are dirty in the on-disk bitmap
//!    before the write is acknowledged (policy `continue`) or the write fails (`block`);
//! 4. not connected: `block` refuses without writing; otherwise the regions are dirty
//!    on disk before the local write.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lun::{Lun, LunError, check_request};
use tracing::{info, warn};

use crate::error::{ReplError, Result};
use crate::meta::{FLAG_DISCARD, FLAG_FRACTURED, FLAG_PRIMARY, FLAG_RESYNC, MetaStore};
use crate::peer::{Peer, expect_ok};
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
        g.meta.persist_bitmap()?;
        if let Some(link) = &g.group {
            link.break_all();
        }
        if matches!(g.link, LinkState::Connected | LinkState::Resyncing) {
            warn!(lun = %self.name, peer = g.peer.name(), error = %why, policy = ?self.policy, "replication link lost; tracking changed regions");
            g.meta.header.gens.fork();
            g.meta.write_header()?;
            g.meta.clear_activity_log()?;
            g.link = LinkState::Disconnected;
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

    fn replicated_write(&self, g: &mut Inner, buf: &[u8], offset: u64) -> Result<()> {
        if g.link == LinkState::Demoted {
            return Err(LunError::ReadOnly {
                lun: self.name.clone(),
            }
            .into());
        }
        let regions = g.meta.region_range(offset, buf.len() as u64);
        if let Mode::Async { .. } = g.mode {
            // Shipped later in a delta set; tracked durably until the replica has it.
            g.meta.mark(regions.clone());
            g.meta.persist_bitmap()?;
            g.interval.extend(regions);
            self.local.write_at(buf, offset)?;
            return Ok(());
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
            self.lose_link(g, 0..0, &why)?;
        }
        if matches!(g.link, LinkState::Connected | LinkState::Resyncing) {
            let Inner {
                meta,
                peer,
                unflushed,
                ..
            } = g;
            let local = &self.local;
            let hot = meta.activate(offset, buf.len() as u64, &mut || {
                local.flush()?;
                let r = peer.call(&Message::Flush)?;
                expect_ok(&mut **peer, r)?;
                unflushed.clear();
                Ok(())
            });
            let sent = hot.and_then(|()| {
                peer.send(&Message::Write {
                    offset,
                    data: buf.to_vec(),
                })
            });
            if let Err(e) = sent {
                // The peer never got it: with `block` nothing is written anywhere.
                self.lose_link(g, regions, &e)?;
                return match self.policy {
                    LinkPolicy::Continue => Ok(self.local.write_at(buf, offset)?),
                    LinkPolicy::Block => Err(e),
                };
            }
            // The local write overlaps the peer's; the write counts only when both land.
            // The peer's answer is read even if the local write failed, so the link
            // stays in step.
            let written = self.local.write_at(buf, offset);
            let acked = peer.recv().and_then(|r| expect_ok(&mut **peer, r));
            unflushed.extend(regions.clone());
            if let Err(e) = acked {
                self.lose_link(g, regions.clone(), &e)?;
                if self.policy == LinkPolicy::Block {
                    return Err(e);
                }
            }
            if written.is_err() {
                // The peer may hold what the local LUN failed to: a resync settles it.
                g.meta.mark(regions);
                if g.link == LinkState::Connected {
                    if let Err(e) = self.begin_resync(g) {
                        self.lose_link(g, 0..0, &e)?;
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
        let mut g = self.lock();
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
        let mut g = self.lock();
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
        let mut g = self.lock();
        self.replicated_write(&mut g, buf, offset)
            .map_err(|e| to_lun_error(&self.name, e))
    }

    fn flush(&self) -> lun::Result<()> {
        let mut g = self.lock();
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
