//! What `vapp datastore hosts` shows, read without joining: every host that holds a slot,
//! whether its heartbeat moves while we watch, and the locks each holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lun::{IoRequest, Lun};
use serde::Serialize;

use super::heartbeat::{Heartbeat, SlotState};
use super::record::LockRecord;
use super::{LockMode, LockProtocol, LockTarget};
use crate::codec::*;
use crate::error::{Error, Result};
use crate::layout::{ResourceKind, Superblock};

#[derive(Debug, Clone, Serialize)]
pub struct LockReport {
    pub object: String,
    pub target: LockTarget,
    pub mode: LockMode,
    /// Held by open files; false while a metadata update holds it.
    pub open: bool,
    pub version: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub slot: u32,
    /// `live`, `recovering` (its journal is being replayed by another host) or `free`.
    pub state: String,
    pub host_name: String,
    pub host_uuid: String,
    pub generation: u64,
    pub pid: u32,
    /// The heartbeat counter moved while we watched.
    pub renewing: bool,
    /// How long ago we saw the counter move, on this machine's clock.
    pub heartbeat_age_ms: Option<u64>,
    /// Now minus the heartbeat's own timestamp: only meaningful when clocks agree.
    pub wall_clock_age_ms: i64,
    pub counter: u64,
    /// For `recovering`: the slot of the host replaying this one's journal.
    pub recovered_by: Option<u32>,
    pub locks: Vec<LockReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Survey {
    pub lun: String,
    pub label: String,
    pub uuid: String,
    pub lock_protocol: LockProtocol,
    pub io_timeout_ms: u64,
    pub dead_after_ms: u64,
    /// How long heartbeats were watched.
    pub watched_ms: u64,
    pub hosts: Vec<HostReport>,
    /// Locks still naming incarnations that are gone (broken lazily by the next taker).
    pub stale_locks: Vec<LockReport>,
}

pub(crate) fn read_region(lun: &dyn Lun, sb: &Superblock) -> Result<Vec<Option<Heartbeat>>> {
    let mut region = vec![0u8; sb.host_slots as usize * UNIT];
    lun.read_at(&mut region, sb.heartbeat_offset)?;
    Ok((0..sb.host_slots)
        .map(|slot| {
            let at = slot as usize * UNIT;
            Heartbeat::decode(
                &region[at..at + RECORD],
                sb.heartbeat_slot_offset(slot),
                slot,
            )
            .ok()
            .flatten()
        })
        .collect())
}

/// Hosts whose heartbeat moves: the region is read twice, a renewal interval and a bit
/// apart (at once when no slot is live).
pub(crate) fn renewing_hosts(lun: &dyn Lun, sb: &Superblock) -> Result<Vec<Heartbeat>> {
    let first = read_region(lun, sb)?;
    if !first.iter().flatten().any(|hb| hb.state != SlotState::Free) {
        return Ok(Vec::new());
    }
    std::thread::sleep(sb.timing().renew_interval() * 5 / 4);
    let second = read_region(lun, sb)?;
    Ok(first
        .into_iter()
        .zip(second)
        .filter_map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) if b.state != SlotState::Free && a.counter != b.counter => Some(b),
            _ => None,
        })
        .collect())
}

/// Watches the heartbeat region for `watch` (a renewal interval and a bit tells live hosts
/// from silent ones), then reads every lock record in use.
pub fn survey(lun: Arc<dyn Lun>, watch: Duration) -> Result<Survey> {
    let (sb, _) = crate::datastore::read_superblock(&*lun)?;
    let timing = sb.timing();
    let start = Instant::now();
    let first = read_region(&*lun, &sb)?;
    let mut moved_at: Vec<Option<Instant>> = vec![None; first.len()];
    let mut last = first.clone();
    let step = (timing.monitor_interval()).max(Duration::from_millis(5));
    while start.elapsed() < watch {
        std::thread::sleep(step.min(watch.saturating_sub(start.elapsed())));
        let now = read_region(&*lun, &sb)?;
        let t = Instant::now();
        for (i, hb) in now.iter().enumerate() {
            if let (Some(a), Some(b)) = (&last[i], hb) {
                if a.counter != b.counter && a.generation == b.generation {
                    moved_at[i] = Some(t);
                }
            }
        }
        last = now;
    }
    let locks = read_locks(&*lun, &sb)?;
    let wall = crate::state::now_ns();
    let mut hosts = Vec::new();
    let mut by_slot: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for (slot, hb) in last.iter().enumerate() {
        let Some(hb) = hb else { continue };
        if hb.state == SlotState::Free {
            continue;
        }
        by_slot.insert((slot as u32, hb.generation as u32), hosts.len());
        hosts.push(HostReport {
            slot: slot as u32,
            state: hb.state.name().to_string(),
            host_name: hb.hostname.clone(),
            host_uuid: hb.host.to_string(),
            generation: hb.generation,
            pid: hb.pid,
            renewing: moved_at[slot].is_some(),
            heartbeat_age_ms: moved_at[slot].map(|t| t.elapsed().as_millis() as u64),
            wall_clock_age_ms: (wall - hb.time_ns) / 1_000_000,
            counter: hb.counter,
            recovered_by: hb.recoverer.map(|r| r.slot),
            locks: Vec::new(),
        });
    }
    let mut stale_locks = Vec::new();
    for (target, rec) in locks {
        let Some(mode) = rec.mode else { continue };
        let report = LockReport {
            object: target.describe(),
            target,
            mode,
            open: rec.open,
            version: rec.version,
        };
        let mut claimed = false;
        for h in &rec.holders {
            if let Some(&i) = by_slot.get(&(h.slot, h.generation)) {
                hosts[i].locks.push(report.clone());
                claimed = true;
            }
        }
        if !claimed {
            stale_locks.push(report);
        }
    }
    Ok(Survey {
        lun: lun.name().to_string(),
        label: sb.label.clone(),
        uuid: sb.uuid.to_string(),
        lock_protocol: sb.lock_protocol,
        io_timeout_ms: timing.io_timeout.as_millis() as u64,
        dead_after_ms: timing.dead_after().as_millis() as u64,
        watched_ms: start.elapsed().as_millis() as u64,
        hosts,
        stale_locks,
    })
}

/// Every held lock record: all resource clusters, and the descriptors the bitmaps say are
/// in use. Records that do not decode are skipped (fsck reports them).
pub(crate) fn read_locks(lun: &dyn Lun, sb: &Superblock) -> Result<Vec<(LockTarget, LockRecord)>> {
    let mut out = Vec::new();
    let mut inodes_in_use = Vec::new();
    for kind in ResourceKind::ALL {
        let area = *sb.area(kind);
        let clusters = area.clusters();
        let mut meta = vec![0u8; (clusters * 2) as usize * UNIT];
        lun.read_at(&mut meta, area.meta_offset)?;
        for c in 0..clusters {
            let at = (2 * c) as usize * UNIT;
            let target = LockTarget::Cluster(kind, c);
            let off = area.lock_offset(c);
            if let Ok(rec) = LockRecord::decode(&meta[at..at + RECORD], off, target.code()) {
                if rec.mode.is_some() {
                    out.push((target, rec));
                }
            }
            if kind == ResourceKind::Inode {
                let bm = &meta[at + UNIT..at + 2 * UNIT];
                let intact = verify(bm, MAGIC_BITMAP, area.bitmap_offset(c), UNIT).is_ok();
                let mut unit = [0u8; UNIT];
                unit.copy_from_slice(bm);
                for i in 0..area.in_cluster(c) {
                    if !intact || crate::bitmap::get(&unit, i) {
                        inodes_in_use.push(c * u64::from(area.per_cluster) + i + 1);
                    }
                }
            }
        }
    }
    let ss = (lun.sector_size() as usize).max(RECORD);
    for chunk in inodes_in_use.chunks(256) {
        let mut bufs = vec![vec![0u8; ss]; chunk.len()];
        let mut batch: Vec<IoRequest<'_>> = bufs
            .iter_mut()
            .zip(chunk)
            .map(|(buf, &ino)| IoRequest::Read {
                buf,
                offset: sb.inode_lock_offset(ino),
            })
            .collect();
        lun.submit(&mut batch).map_err(Error::from)?;
        drop(batch);
        for (buf, &ino) in bufs.iter().zip(chunk) {
            let target = LockTarget::Inode(ino);
            if let Ok(rec) = LockRecord::decode(buf, sb.inode_lock_offset(ino), target.code()) {
                if rec.mode.is_some() {
                    out.push((target, rec));
                }
            }
        }
    }
    Ok(out)
}
