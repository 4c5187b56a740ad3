//! Bringing a link up and resynchronising. The state machine is persisted in the
//! primary's metadata: the bitmap holds the regions still to copy (a bit is cleared only
//! after the secondary has flushed its region), `FLAG_RESYNC` and `resync_total` say a
//! resync is under way and how big it was, and the secondary's `FLAG_INCONSISTENT` with
//! its `pre-resync` snapshot say its point in time is elsewhere. A crash of either side
//! resumes from the bitmap.

use tracing::{info, warn};

use crate::error::{ReplError, Result};
use crate::meta::{FLAG_DISCARD, FLAG_FRACTURED, FLAG_INCONSISTENT, FLAG_PRIMARY, FLAG_RESYNC};
use crate::peer::expect_ok;
use crate::primary::{Inner, PrimaryLun};
use crate::wire::{Message, SideInfo};
use crate::{LinkState, ResyncProgress};

/// Regions copied between two persists of the bitmap.
pub(crate) const STEP_REGIONS: u64 = 64;
/// Dirty regions one hole message may cover: 256 MiB of 64 KiB regions.
const HOLE_RUN: u64 = 4096;

impl PrimaryLun {
    /// Brings the link up: authenticates (the transport's job), compares generations and,
    /// when this side has newer data, starts a resync. Refuses, changing nothing, a
    /// fractured link, a peer that is a primary, a replica too small, and split brain.
    pub fn connect(&self) -> Result<LinkState> {
        let mut g = self.lock();
        if g.meta.flags() & FLAG_FRACTURED != 0 {
            return Err(ReplError::WrongState {
                lun: self.name.clone(),
                reason: "the link is fractured; resume it first".into(),
            });
        }
        if let Some(link) = &g.group
            && link.is_broken()
        {
            return Err(ReplError::WrongState {
                lun: self.name.clone(),
                reason: format!(
                    "consistency group {} is fractured; resume the group",
                    link.name()
                ),
            });
        }
        match g.link {
            LinkState::Connected | LinkState::Resyncing => return Ok(g.link),
            LinkState::Demoted => {
                return Err(ReplError::WrongState {
                    lun: self.name.clone(),
                    reason: "this side was demoted; open it as a secondary".into(),
                });
            }
            LinkState::Disconnected | LinkState::Fractured => {}
        }
        g.peer.reconnect()?;
        let me = SideInfo {
            lun_size: self.local.size(),
            region_size: g.meta.header.region_size,
            flags: g.meta.flags(),
            gens: g.meta.header.gens,
            dirty_regions: g.meta.dirty_count(),
        };
        let reply = g.peer.call(&Message::Connect(me))?;
        let peer = match reply {
            Message::State(s) => s,
            Message::Error { reason } => {
                return Err(ReplError::Refused {
                    peer: g.peer.name().to_string(),
                    reason,
                });
            }
            other => {
                return Err(ReplError::Protocol {
                    peer: g.peer.name().to_string(),
                    reason: format!("expected state, got {}", other.kind()),
                });
            }
        };
        if let Err(e) = self.decide(&mut g, &peer) {
            // Refused (split brain, a newer peer): the peer must not go on taking this
            // side for its connected primary.
            g.peer.close();
            return Err(e);
        }
        g.meta.header.peer_current = peer.gens.current;
        g.meta.write_header()?;
        Ok(g.link)
    }

    /// Who has the newer data, from the generation identifiers both sides keep.
    fn decide(&self, g: &mut Inner, peer: &SideInfo) -> Result<()> {
        let me = g.meta.header.gens;
        let p = peer.gens;
        if peer.flags & FLAG_PRIMARY != 0 {
            return Err(ReplError::SplitBrain {
                lun: self.name.clone(),
                reason: "the peer is a primary too".into(),
            });
        }
        // Whether the peer's dirty regions (its own writes we never got, or regions an
        // interrupted resync changed) must be copied over from here too.
        let mut take_peer = peer.dirty_regions > 0;
        // Our own replica cut off mid-resync (not promoted since): its dirty regions are
        // the ones that resync wrote there, kept for a rollback to its pre-resync
        // snapshot. Ours still hold every region not yet durable there (a region leaves
        // our bitmap only after the peer's flush), so the resync resumes where it was
        // instead of copying again what it already had.
        let ours_interrupted = peer.flags & FLAG_INCONSISTENT != 0
            && (p.current == me.current || (me.bitmap != 0 && p.current == me.bitmap));
        if ours_interrupted {
            take_peer = false;
        }
        let resync = if p.current == 0 {
            // A new replica: everything is to copy.
            let all = g.meta.region_range(0, self.local.size());
            g.meta.mark(all);
            take_peer = false;
            true
        } else if p.current == me.current {
            // In sync but for what the activity logs say may have been in flight.
            g.meta.dirty_count() > 0 || take_peer || peer.flags & FLAG_INCONSISTENT != 0
        } else if me.bitmap != 0 && p.current == me.bitmap {
            // We moved on while apart, the peer did not: our bitmap is the difference.
            true
        } else if me.bitmap != 0 && p.bitmap == me.bitmap {
            // Both moved on from the same generation. Fine if the peer wrote nothing;
            // otherwise it is split brain unless the peer was told to lose its writes.
            if take_peer && peer.flags & FLAG_DISCARD == 0 {
                return Err(ReplError::SplitBrain {
                    lun: self.name.clone(),
                    reason: format!(
                        "both sides were written since generation {:016x} ({} regions here, {} at the peer); resync refused: choose the side that loses its writes (discard-local there)",
                        me.bitmap,
                        g.meta.dirty_count(),
                        peer.dirty_regions
                    ),
                });
            }
            true
        } else if p.bitmap != 0 && p.bitmap == me.current {
            return Err(ReplError::WrongState {
                lun: self.name.clone(),
                reason: "the peer has newer data (it was promoted since); demote this side".into(),
            });
        } else {
            return Err(ReplError::SplitBrain {
                lun: self.name.clone(),
                reason: format!(
                    "no common generation (this side {:016x}, peer {:016x}); refusing to resync",
                    me.current, p.current
                ),
            });
        };
        // A group member always resyncs on connect: see ConsistencyGroup::connect.
        let resync = resync || g.group.is_some();
        if resync && take_peer {
            let reply = g.peer.call(&Message::BitmapRequest)?;
            let Message::Bitmap { words } = reply else {
                return Err(ReplError::Protocol {
                    peer: g.peer.name().to_string(),
                    reason: format!("expected bitmap, got {}", reply.kind()),
                });
            };
            g.meta.merge_words(&words);
            if peer.flags & FLAG_INCONSISTENT == 0 {
                g.peer_discarded += peer.dirty_regions;
                warn!(lun = %self.name, regions = peer.dirty_regions, "regions written at the peer that this side never got are discarded there");
            }
        }
        if resync {
            self.begin_resync(g)?;
        } else {
            g.link = LinkState::Connected;
            info!(lun = %self.name, "replication link up, in sync");
        }
        Ok(())
    }

    /// Starts copying the bitmap's regions to the connected peer, which protects its
    /// point in time first (`pre-resync`). The header is the caller's to write.
    pub(crate) fn begin_resync(&self, g: &mut Inner) -> Result<()> {
        if g.meta.flags() & FLAG_RESYNC == 0 {
            g.meta.set_flag(FLAG_RESYNC, true);
            g.meta.header.resync_total = g.meta.dirty_count();
        }
        g.meta.persist_bitmap()?;
        g.group_drained = false;
        let regions = g.meta.dirty_count();
        let r = g.peer.call(&Message::ResyncBegin { regions })?;
        expect_ok(&mut *g.peer, r)?;
        info!(lun = %self.name, regions, "resync started");
        g.link = LinkState::Resyncing;
        Ok(())
    }

    /// Copies up to `max_regions` dirty regions, then persists the bitmap. Writers wait
    /// only for the regions of one step.
    pub fn resync_step(&self, max_regions: u64) -> Result<ResyncProgress> {
        // A write in flight may not have landed locally: the copy would be stale.
        let mut g = self.quiesce(self.lock());
        if g.link != LinkState::Resyncing {
            return Ok(progress(&g));
        }
        if g.resync_clock.is_none() {
            g.resync_clock = Some((std::time::Instant::now(), g.meta.dirty_count()));
        }
        let rs = g.meta.region_size();
        let mut sent = Vec::new();
        let mut cursor = 0;
        let result = (|| -> Result<()> {
            // The step's regions are pipelined: each is sent without waiting for the
            // answer to the one before, and the answers are checked at the end.
            let mut answers = Vec::new();
            let size = self.local.size();
            let mut steps = 0u64;
            while steps < max_regions.max(1) {
                let Some(r) = g.meta.next_dirty(cursor) else {
                    break;
                };
                steps += 1;
                cursor = r + 1;
                let offset = r * rs;
                let len = rs.min(size - offset);
                // A thin LUN's holes cross as holes, unread, a run of dirty ones at once.
                let hole = self.hole_run(&g.meta, r)?;
                if hole > 0 {
                    let len = (hole * rs).min(size - offset);
                    answers.push(g.peer.submit(&Message::ResyncZero { offset, len })?);
                    sent.extend((r..r + hole).map(|h| (h, 0)));
                    cursor = r + hole;
                    continue;
                }
                let msg = {
                    let mut data = vec![0u8; len as usize];
                    self.local.read_at(&mut data, offset)?;
                    if g.compare_before_copy {
                        let reply = g
                            .peer
                            .call(&Message::ChecksumRequest { first: r, count: 1 })?;
                        if let Message::Checksums { crcs } = &reply
                            && crcs.first() == Some(&crc32c::crc32c(&data))
                        {
                            sent.push((r, 0));
                            continue;
                        }
                    }
                    if data.iter().all(|&b| b == 0) {
                        Message::ResyncZero { offset, len }
                    } else {
                        Message::ResyncData { offset, data }
                    }
                };
                let bytes = match &msg {
                    Message::ResyncData { data, .. } => data.len() as u64,
                    _ => 0,
                };
                answers.push(g.peer.submit(&msg)?);
                sent.push((r, bytes));
            }
            for answer in answers {
                let reply = answer.wait()?;
                expect_ok(&mut *g.peer, reply)?;
            }
            // A region is in sync only once durable there.
            PrimaryLun::flush_peer(&mut g)
        })();
        if let Err(e) = result {
            warn!(lun = %self.name, error = %e, "resync interrupted");
            self.lose_link(&mut g, 0..0, &e)?;
            return Err(e);
        }
        for (r, len) in &sent {
            g.meta.clear(*r);
            g.bytes_resynced += len;
        }
        g.meta.persist_bitmap()?;
        if g.meta.next_dirty(0).is_none()
            && let Some(link) = g.group.clone()
        {
            // A group's members end their resyncs together (ConsistencyGroup::connect).
            if link.is_broken() {
                let why = ReplError::WrongState {
                    lun: self.name.clone(),
                    reason: format!("consistency group {} fractured", link.name()),
                };
                self.lose_link(&mut g, 0..0, &why)?;
                return Err(why);
            }
            let newly = !std::mem::replace(&mut g.group_drained, true);
            if !link.drained(newly) {
                return Ok(progress(&g));
            }
        }
        if g.meta.next_dirty(0).is_none() {
            let mut gens = g.meta.header.gens;
            gens.bitmap = 0;
            let reply = g.peer.call(&Message::ResyncEnd { gens });
            if let Err(e) = reply.and_then(|m| expect_ok(&mut *g.peer, m)) {
                self.lose_link(&mut g, 0..0, &e)?;
                return Err(e);
            }
            g.meta.header.gens = gens;
            g.meta.set_flag(FLAG_RESYNC, false);
            g.meta.header.resync_total = 0;
            g.meta.write_header()?;
            g.link = LinkState::Connected;
            g.resync_clock = None;
            // Everything written so far is there now, at one point in time.
            g.interval.clear();
            g.replica_point_ms = Some(crate::delta::now_ms());
            info!(lun = %self.name, bytes = g.bytes_resynced, "resync complete; link in sync");
        }
        Ok(progress(&g))
    }

    /// How many dirty regions from `first` on are holes of a thin LUN, up to
    /// [`HOLE_RUN`]: halving the span until the backend calls it a hole (0: `first` may
    /// hold data).
    fn hole_run(&self, meta: &crate::meta::MetaStore, first: u64) -> Result<u64> {
        let rs = meta.region_size();
        let size = self.local.size();
        let mut end = first + 1;
        while end < meta.regions() && end - first < HOLE_RUN && meta.is_dirty(end) {
            end += 1;
        }
        let mut span = end - first;
        loop {
            let offset = first * rs;
            let len = (span * rs).min(size - offset);
            if !self.local.may_hold_data(offset, len)? {
                return Ok(span);
            }
            if span == 1 {
                return Ok(0);
            }
            span /= 2;
        }
    }

    /// Runs the resync to its end.
    /// Runs the resync to its end; a group member's stops when it has copied everything
    /// and waits for the others ([`crate::ConsistencyGroup::resync`] runs them together).
    pub fn resync(&self) -> Result<ResyncProgress> {
        loop {
            let p = self.resync_step(STEP_REGIONS)?;
            if self.link_state() != LinkState::Resyncing || p.regions_left == 0 {
                return Ok(p);
            }
        }
    }

    /// Before a group reconnects: a member still connected (a broken group is noticed
    /// at a member's next write) is split now, so none ships a write before all resync.
    pub(crate) fn drop_link_for_group(&self) {
        let mut g = self.quiesce(self.lock());
        if matches!(g.link, LinkState::Connected | LinkState::Resyncing) {
            let why = ReplError::WrongState {
                lun: self.name.clone(),
                reason: "its consistency group reconnects".into(),
            };
            if let Err(e) = self.lose_link(&mut g, 0..0, &why) {
                warn!(lun = %self.name, error = %e, "cannot record the group's reconnect");
            }
            g.peer.close();
        }
    }

    /// Splits the mirror on command: writes go on locally and are tracked, across
    /// restarts too, until [`PrimaryLun::resume`].
    pub fn fracture(&self) -> Result<()> {
        let mut g = self.quiesce(self.lock());
        if matches!(g.link, LinkState::Connected | LinkState::Resyncing) {
            if let Err(e) = PrimaryLun::flush_peer(&mut g) {
                // lose_link below marks what the peer may not have made durable.
                warn!(lun = %self.name, error = %e, "peer flush failed while fracturing");
            }
            let why = ReplError::WrongState {
                lun: self.name.clone(),
                reason: "fractured on command".into(),
            };
            self.lose_link(&mut g, 0..0, &why)?;
            g.peer.close();
        }
        g.meta.set_flag(FLAG_FRACTURED, true);
        g.meta.write_header()?;
        g.link = LinkState::Fractured;
        info!(lun = %self.name, "replication fractured on command");
        Ok(())
    }

    /// Ends a fracture and brings the link up (starting a resync of what changed).
    pub fn resume(&self) -> Result<LinkState> {
        {
            let mut g = self.lock();
            if g.meta.flags() & FLAG_FRACTURED != 0 {
                g.meta.set_flag(FLAG_FRACTURED, false);
                g.meta.write_header()?;
                g.link = LinkState::Disconnected;
            }
        }
        self.connect()
    }
}

pub(crate) fn progress(g: &Inner) -> ResyncProgress {
    let total = g.meta.header.resync_total;
    let left = g.meta.dirty_count();
    ResyncProgress {
        regions_total: total,
        regions_left: left,
        bytes_left: left * g.meta.region_size(),
    }
}
