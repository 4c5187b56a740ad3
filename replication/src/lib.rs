//! Two-site replication of a LUN: a [`PrimaryLun`] wraps the local LUN so that every
//! writer goes through it, and a [`Secondary`] at the other site applies what it sends
//! into a replica LUN.
//!
//! # Design
//!
//! Synchronous mirroring, as DRBD's protocol C: a write is acknowledged once both sites
//! have it, a flush once both have made it durable (`primary.rs`, the only code touching
//! both sides in one step). Each side keeps a metadata LUN (`FORMAT.md`): two header
//! copies with the generation identifiers, an activity log of hot extents, and a dirty
//! bitmap of one bit per region. While connected only the activity log is written
//! (when a write reaches a cold extent), so a crash of the primary resyncs the hot
//! extents and nothing else; while apart every write's regions are dirty on disk before
//! the write is acknowledged, so a resync copies only what may differ. Generation
//! identifiers (current, bitmap, history) say on reconnect who has the newer data and
//! detect split brain, which is refused, never resolved silently. A resync
//! (`resync.rs`) is a persisted state machine over the bitmap; the secondary takes a
//! `pre-resync` snapshot of the replica before it becomes inconsistent (unless it never
//! held data).
//!
//! The engine talks to the other site through the [`Peer`] trait: [`LocalPeer`] in
//! process, [`TcpPeer`] over TCP with a shared-secret HMAC-SHA256 challenge-response
//! before anything else flows, and [`SecondaryServer`] on the other end. The wire
//! format (`wire.rs`) is framed, versioned and checksummed with crc32c.
//!
//! Roles change offline: [`Secondary::promote`] makes the replica a primary with a new
//! generation, [`PrimaryLun::demote`] the old primary a secondary; on reconnect the old
//! primary receives what changed at the new one plus its own writes the new one never
//! got, which it loses (reported) only when the operator said so (`discard_local`).
//!
//! Asynchronous mode (`delta.rs`): writes are acknowledged locally, their regions
//! dirty on disk, and every period a delta set is cut with a snapshot session of the
//! local LUN (so the set is write-order consistent) and shipped; the secondary takes a
//! gold snapshot first and makes the set visible whole at its end, or rolls back to
//! the gold copy when the link or the process dies mid-apply.
//!
//! Online verify (`verify.rs`) compares the crc32c of every region across the link and
//! marks what differs for resync; a resync may also skip regions whose checksums
//! already match (an initial sync onto a copy); the holes of a thin LUN cross unread,
//! as holes, and a replica that is already a hole there is not written.
//!
//! A [`ConsistencyGroup`] replicates several LUNs as one: a lost link on any member
//! fractures all before another write is acknowledged, and delta sets are cut at one
//! point across all (every member's writers held off at once). At the secondary a
//! [`SecondaryGroup`] makes a group's set visible on every member or none: a member's
//! ended set keeps its gold copy until the primary's `delta-commit`, and a lost link,
//! a restart or a promote returns uncommitted members to their gold copies.
//!
//! Writes are pipelined (`primary.rs`): the primary's lock fixes the order in which
//! writes are sent and is released while each one's local write and the peer's answer
//! proceed, so an NBD client's or a guest's queue of writes is in flight at once; the
//! secondary applies them concurrently. An idle link is kept alive by pings and a
//! silent one is taken for dead after one link timeout ([`link_timeout`]).
//! `examples/repl_throughput.rs` measures both modes against the bare local LUN over
//! TCP on 127.0.0.1.
//!
//! Limits today: the link is not encrypted (TLS is left out, see `FORMAT.md`), and a
//! group's members at the secondary must run in one process (one [`SecondaryGroup`]).

mod delta;
mod error;
mod group;
pub mod handover;
mod meta;
mod peer;
mod primary;
mod resync;
mod secondary;
mod tcp;
mod verify;
pub mod wire;

use std::path::Path;
use std::sync::{Arc, Mutex};

use lun::Lun;
use tracing::info;

pub use delta::Cycle;
pub use error::{ReplError, Result};
pub use group::ConsistencyGroup;
pub use meta::{AL_MAX_EXTENTS, Gens};
pub use peer::{LinkSwitch, LocalPeer, Peer, Reply};
pub use primary::PrimaryLun;
pub use secondary::{
    DrillPoint, GOLD_SNAPSHOT, PRE_RESYNC_SNAPSHOT, Role, Secondary, SecondaryGroup,
    SecondaryStatus, now_ms, take_point,
};
pub use tcp::{DEFAULT_LINK_TIMEOUT, LINK_TIMEOUT_ENV, SecondaryServer, TcpPeer, link_timeout};
pub use verify::VerifyProgress;

use meta::{FLAG_FRACTURED, FLAG_PRIMARY, Header, MetaStore};
use primary::Inner;

/// Region (bitmap bit) size by default: 64 KiB, as the snapshot chunk, so a 1 TiB LUN
/// needs a 2 MiB bitmap and a 4 KiB random write resyncs at most 64 KiB.
pub const DEFAULT_REGION_SIZE: u32 = 64 * 1024;
/// Activity-log extent by default: 4 MiB, as DRBD's.
pub const DEFAULT_AL_EXTENT_SIZE: u32 = 4 << 20;
/// Hot extents by default: 16 × 4 MiB, so a primary crash resyncs at most 64 MiB.
pub const DEFAULT_AL_CAPACITY: u32 = 16;

/// How the dirty tracking of a link is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub region_size: u32,
    pub al_extent_size: u32,
    pub al_capacity: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            region_size: DEFAULT_REGION_SIZE,
            al_extent_size: DEFAULT_AL_EXTENT_SIZE,
            al_capacity: DEFAULT_AL_CAPACITY,
        }
    }
}

/// Bytes of metadata a LUN of `lun_size` bytes needs with `geometry`.
pub fn metadata_size(lun_size: u64, geometry: Geometry) -> u64 {
    let regions = lun_size.div_ceil(u64::from(geometry.region_size));
    meta::BITMAP_OFFSET + regions.div_ceil(8).next_multiple_of(meta::BLOCK)
}

/// Default period between two asynchronous delta sets.
pub const DEFAULT_DELTA_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// How writes reach the secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each write and flush is acknowledged once both sites have it.
    Sync,
    /// Writes are acknowledged locally and shipped in write-order-consistent delta sets
    /// cut every `period`; the replica moves from one whole set to the next.
    Async { period: std::time::Duration },
}

/// What a synchronous primary does when the link is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkPolicy {
    /// Keep writing locally and track what changed (MirrorView/S's default).
    #[default]
    Continue,
    /// Fail writes and flushes until the link is back: no acknowledged write exists at
    /// one site only. A fracture on command still lets writes through, tracked.
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Writes reach both sites.
    Connected,
    /// Connected, and dirty regions are being copied; new writes reach both sites.
    Resyncing,
    /// Not connected (never yet, or the link was lost): writes are tracked.
    Disconnected,
    /// Split on command; stays split across restarts until resumed.
    Fractured,
    /// Demoted: no longer takes writes; reopen the LUN as a secondary.
    Demoted,
}

/// How far a resync has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncProgress {
    pub regions_total: u64,
    pub regions_left: u64,
    pub bytes_left: u64,
}

impl ResyncProgress {
    /// From 0.0 to 1.0.
    pub fn fraction(&self) -> f64 {
        if self.regions_total == 0 {
            return 1.0;
        }
        1.0 - self.regions_left.min(self.regions_total) as f64 / self.regions_total as f64
    }
}

/// The state of a primary, as the CLI and the agent show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub link: LinkState,
    pub policy: LinkPolicy,
    pub gens: Gens,
    pub peer_current: u64,
    pub dirty_regions: u64,
    /// Bytes the secondary is missing (dirty regions × region size).
    pub bytes_waiting: u64,
    pub resync: ResyncProgress,
    pub bytes_resynced: u64,
    /// Regions the peer had written that resyncs overwrote (failback, discard-local).
    pub peer_regions_discarded: u64,
    pub mode: Mode,
    /// Age of the replica's point in time: zero when it holds everything acknowledged
    /// here, `None` before it ever held a complete point.
    pub rpo: Option<std::time::Duration>,
    pub last_error: Option<String>,
}

impl PrimaryLun {
    /// Makes `meta` the replication metadata of `local`: every region is dirty, so the
    /// first connect copies the whole LUN. Refuses metadata that exists or is too small.
    pub fn create(
        local: Arc<dyn Lun>,
        meta: Arc<dyn Lun>,
        peer: Box<dyn Peer>,
        geometry: Geometry,
        policy: LinkPolicy,
    ) -> Result<PrimaryLun> {
        let header = Header {
            seq: 0,
            flags: FLAG_PRIMARY,
            lun_size: local.size(),
            region_size: geometry.region_size,
            al_extent_size: geometry.al_extent_size,
            al_capacity: geometry.al_capacity,
            gens: Gens {
                current: Gens::new_id(),
                ..Gens::default()
            },
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
        let mut m = MetaStore::format(meta, header)?;
        let all = m.region_range(0, local.size());
        m.mark(all);
        m.persist_bitmap()?;
        PrimaryLun::with(local, m, peer, policy)
    }

    /// Opens an existing primary. What the activity log held (a crash) joins the
    /// bitmap; the link starts down (or fractured) until [`PrimaryLun::connect`].
    pub fn open(
        local: Arc<dyn Lun>,
        meta: Arc<dyn Lun>,
        peer: Box<dyn Peer>,
        policy: LinkPolicy,
    ) -> Result<PrimaryLun> {
        let m = MetaStore::open(meta)?;
        PrimaryLun::with(local, m, peer, policy)
    }

    fn with(
        local: Arc<dyn Lun>,
        mut meta: MetaStore,
        peer: Box<dyn Peer>,
        policy: LinkPolicy,
    ) -> Result<PrimaryLun> {
        let name = local.name().to_string();
        if meta.header.lun_size != local.size() {
            return Err(ReplError::BadConfig {
                lun: name,
                reason: format!(
                    "metadata {} describes a LUN of {} bytes, this one has {}",
                    meta.name(),
                    meta.header.lun_size,
                    local.size()
                ),
            });
        }
        if meta.flags() & FLAG_PRIMARY == 0 {
            return Err(ReplError::WrongState {
                lun: name,
                reason: format!("metadata {} is a secondary's", meta.name()),
            });
        }
        let recovered = meta.recover_activity_log()?;
        let link = if meta.flags() & FLAG_FRACTURED != 0 {
            LinkState::Fractured
        } else {
            LinkState::Disconnected
        };
        info!(lun = %name, recovered_regions = recovered, dirty_regions = meta.dirty_count(), "replication primary opened");
        Ok(PrimaryLun {
            name,
            local,
            policy,
            inner: Mutex::new(Inner {
                meta,
                peer,
                link,
                last_error: None,
                bytes_resynced: 0,
                peer_discarded: 0,
                unflushed: Default::default(),
                mode: Mode::Sync,
                snaps: None,
                interval: Default::default(),
                pending: None,
                next_delta: 1,
                replica_point_ms: None,
                compare_before_copy: false,
                group: None,
                inflight: Default::default(),
                next_ticket: 0,
                link_epoch: 0,
                resync_clock: None,
                group_drained: false,
            }),
            settled: Default::default(),
        })
    }

    /// The link's state, noticing a link the transport found dead while idle.
    pub fn link_state(&self) -> LinkState {
        let mut g = self.lock();
        self.notice_broken_link(&mut g);
        g.link
    }

    /// How long the running resync still needs at the pace it has kept since it started
    /// copying, counted in regions (a thin LUN's holes cost little, but they count).
    /// `None` when no resync runs or it has finished no region yet.
    pub fn resync_eta(&self) -> Option<std::time::Duration> {
        let g = self.lock();
        if g.link != LinkState::Resyncing {
            return None;
        }
        let (since, left_then) = g.resync_clock?;
        let left = g.meta.dirty_count();
        let done = left_then.saturating_sub(left);
        (done > 0).then(|| since.elapsed().mul_f64(left as f64 / done as f64))
    }

    pub fn status(&self) -> Status {
        let mut g = self.lock();
        self.notice_broken_link(&mut g);
        let dirty = g.meta.dirty_count();
        Status {
            link: g.link,
            policy: self.policy,
            gens: g.meta.header.gens,
            peer_current: g.meta.header.peer_current,
            dirty_regions: dirty,
            bytes_waiting: dirty * g.meta.region_size(),
            resync: resync::progress(&g),
            bytes_resynced: g.bytes_resynced,
            peer_regions_discarded: g.peer_discarded,
            mode: g.mode,
            rpo: delta::rpo(&g, dirty),
            last_error: g.last_error.clone(),
        }
    }
}

/// What a link's metadata says while no process has it open (the status of a stopped
/// daemon). Read only; the regions of a crashed primary's activity log are not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineStatus {
    pub primary: bool,
    pub gens: Gens,
    pub fractured: bool,
    pub inconsistent: bool,
    pub bytes_waiting: u64,
    pub delta_id: u64,
    pub delta_cut_ms: u64,
}

pub fn offline_status(meta: Arc<dyn Lun>) -> Result<OfflineStatus> {
    let m = MetaStore::open(meta)?;
    Ok(OfflineStatus {
        primary: m.flags() & FLAG_PRIMARY != 0,
        gens: m.header.gens,
        fractured: m.flags() & FLAG_FRACTURED != 0,
        inconsistent: m.flags() & meta::FLAG_INCONSISTENT != 0,
        bytes_waiting: m.dirty_count() * m.region_size(),
        delta_id: m.header.delta_id,
        delta_cut_ms: m.header.delta_cut_ms,
    })
}

/// Reads a shared secret from a file: its bytes less a trailing newline. Refuses an
/// empty secret, naming the file.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    let bad = |reason: String| ReplError::BadConfig {
        lun: path.display().to_string(),
        reason,
    };
    let mut s = std::fs::read(path).map_err(|e| bad(format!("cannot read secret: {e}")))?;
    while s.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        s.pop();
    }
    if s.is_empty() {
        return Err(bad("the secret file is empty".into()));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_secret_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "\n").expect("write");
        let e = read_secret(&path).expect_err("empty secret");
        assert!(e.to_string().contains("secret"), "{e}");
        std::fs::write(&path, "s3cret\n").expect("write");
        assert_eq!(read_secret(&path).expect("secret"), b"s3cret");
    }
}
