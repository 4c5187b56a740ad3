//! Copies of a datastore (an array snapshot, a clone, a `cp` of an image) carry the
//! original's UUID. As VMFS does with snapshot LUNs, a copy is told apart by the LUN
//! identity recorded at format: found on another LUN, the datastore is a copy. A copy
//! opens read-only as it is; read-write only once resignatured (a UUID, label and LUN
//! identity of its own), or with `keep_signature` while its original is not reachable from
//! this host (failover: the copy takes the original's place and keeps its signature).

use std::sync::Arc;

use lun::{Lun, LunIdentity};
use serde::Serialize;
use uuid::Uuid;

use crate::cluster::heartbeat::{self, SlotState};
use crate::cluster::paxos::write_record;
use crate::cluster::record::LockRecord;
use crate::datastore::{SuperblockSource, read_superblock};
use crate::error::{Error, Result};
use crate::layout::{LABEL_MAX, Superblock};

/// Whether the datastore on a LUN is a copy, and why: shown by `datastore info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyStatus {
    /// `yes`, `no`, or `unknown` (no identity recorded, or one that cannot be compared:
    /// an NBD export, a file on a network or FUSE file system).
    pub copy: &'static str,
    /// The LUN identity recorded at format or resignature (serialised form).
    pub recorded: Option<String>,
    /// The identity of the LUN the datastore was found on.
    pub found: Option<String>,
    /// For a copy: the LUN on this host that holds the original (same identity as
    /// recorded, same UUID), if any.
    pub original: Option<String>,
}

/// Judges whether the datastore whose superblock is `sb` and that was found on `lun` is a
/// copy; `Some(recorded)` when it is.
fn copy_of(lun: &dyn Lun, sb: &Superblock) -> Option<LunIdentity> {
    let recorded = sb.lun_identity.as_ref()?;
    let found = lun.identity()?;
    (recorded.same_lun(&found) == Some(false)).then(|| recorded.clone())
}

/// The LUN on this host that holds the original of a copy: found where `recorded` says,
/// with that identity, and holding a datastore of the same UUID.
fn find_original(lun: &dyn Lun, recorded: &LunIdentity, uuid: Uuid) -> Option<String> {
    let mine = lun.identity();
    let options = lun::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    recorded.candidates().into_iter().find_map(|path| {
        let other = lun::open(&path.to_string_lossy(), &options).ok()?;
        let id = other.identity()?;
        if recorded.same_lun(&id) != Some(true)
            || mine.as_ref().and_then(|m| m.same_lun(&id)) == Some(true)
        {
            return None;
        }
        let (sb, _) = read_superblock(&*other).ok()?;
        (sb.uuid == uuid).then(|| other.name().to_string())
    })
}

/// What `datastore info` shows about the datastore being a copy.
pub(crate) fn status(lun: &dyn Lun, sb: &Superblock) -> CopyStatus {
    let recorded = sb.lun_identity.as_ref();
    let found = lun.identity();
    let verdict = match (recorded, &found) {
        (Some(r), Some(f)) => r.same_lun(f),
        _ => None,
    };
    let original = match (verdict, recorded) {
        (Some(false), Some(r)) => find_original(lun, r, sb.uuid),
        _ => None,
    };
    CopyStatus {
        copy: match verdict {
            Some(false) => "yes",
            Some(true) => "no",
            None => "unknown",
        },
        recorded: recorded.map(LunIdentity::serialise),
        found: found.map(|f| f.serialise()),
        original,
    }
}

/// The LUN as a user names it on the command line (`file:/a` → `/a`).
fn spec(lun: &dyn Lun) -> &str {
    let name = lun.name();
    name.strip_prefix("file:")
        .or_else(|| name.strip_prefix("blockdev:"))
        .unwrap_or(name)
}

/// Refuses a read-write open of a copy: always while the original is reachable from this
/// host, and otherwise unless the caller keeps the signature (failover).
pub(crate) fn check_read_write(lun: &dyn Lun, sb: &Superblock, keep_signature: bool) -> Result<()> {
    let Some(recorded) = copy_of(lun, sb) else {
        return Ok(());
    };
    let found = lun
        .identity()
        .map_or_else(|| "an unknown LUN".to_string(), |f| f.to_string());
    let head = format!(
        "datastore {:?} ({}) is a copy: it was formatted on {recorded} and is found on {found}",
        sb.label, sb.uuid
    );
    let fix = format!("run `vapp datastore resignature {}`", spec(lun));
    if let Some(original) = find_original(lun, &recorded, sb.uuid) {
        return Err(Error::NotPermitted {
            object: lun.name().to_string(),
            reason: format!(
                "{head}; the original is reachable from this host at {original}, so a \
                 read-write open of the copy is refused: {fix} to give the copy a signature of \
                 its own, or open it with --keep-signature once the original is gone"
            ),
        });
    }
    if !keep_signature {
        return Err(Error::NotPermitted {
            object: lun.name().to_string(),
            reason: format!(
                "{head}, and the original is not reachable from this host: open it with \
                 --keep-signature to use it in the original's place (failover), or {fix} to \
                 give it a signature of its own"
            ),
        });
    }
    tracing::warn!(lun = %lun.name(), uuid = %sb.uuid, recorded = %recorded, "opening a copy read-write with the original's signature (--keep-signature); its original is not reachable");
    Ok(())
}

/// What [`resignature`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ResignatureReport {
    pub lun: String,
    pub old_uuid: String,
    pub uuid: String,
    pub old_label: String,
    pub label: String,
    /// Journals that held transactions, and how many were replayed.
    pub journals_replayed: usize,
    pub transactions_replayed: usize,
    /// Heartbeat slots marked free, lock records cleared.
    pub slots_cleared: usize,
    pub locks_cleared: usize,
    /// The LUN identity now recorded (serialised form).
    pub lun_identity: Option<String>,
}

/// Gives the copy of a datastore on `lun` a signature of its own, as VMFS resignatures a
/// snapshot LUN: replays every host's journal, frees every heartbeat slot and lock record,
/// then writes a new UUID, `label` (default `snap-XXXXXXXX-OLD`) and this LUN's identity.
///
/// Refused, changing nothing, while a live host holds a slot (a live process of this
/// machine, or a heartbeat that moves: a slot of another machine costs a dead-host timeout
/// of watching), on a datastore that is not a copy, and for a label longer than 63 bytes.
/// Crash safety: everything before the superblocks is valid under the old signature too
/// (journals replayed, slots free as after a recovery), and the primary superblock, which
/// every open reads, is written last in one sector write after the backup: an interrupted
/// resignature leaves the old signature or the new one (fsck then reports the backup as
/// different and `--repair` rewrites it from the primary).
pub fn resignature(lun: Arc<dyn Lun>, label: Option<&str>) -> Result<ResignatureReport> {
    resignature_copy(lun, label, false)
}

/// [`resignature`] of a point-in-time copy that no host can have mounted: a snapshot
/// session taken a moment ago and reachable only by the caller (a DR drill's copy of a
/// replica). Its slots are the protected site's hosts at that point, frozen: none is
/// watched (a copy's heartbeats never move, so watching would only cost the dead-host
/// timeout), and a process of this machine named in one holds the original, not the copy.
pub fn resignature_frozen(lun: Arc<dyn Lun>, label: Option<&str>) -> Result<ResignatureReport> {
    resignature_copy(lun, label, true)
}

fn resignature_copy(
    lun: Arc<dyn Lun>,
    label: Option<&str>,
    frozen: bool,
) -> Result<ResignatureReport> {
    let name = lun.name().to_string();
    if lun.is_read_only() {
        return Err(Error::ReadOnly { lun: name });
    }
    let (mut sb, source) = read_superblock(&*lun)?;
    if let SuperblockSource::Backup(why) = source {
        return Err(Error::Invalid {
            object: name,
            reason: format!("{why}: run `vapp datastore fsck --repair` before resignaturing"),
        });
    }
    if let Some(label) = label {
        if label.is_empty() || label.len() > LABEL_MAX || label.contains('\0') {
            return Err(Error::Invalid {
                object: name,
                reason: format!(
                    "datastore name {label:?} must be 1 to {LABEL_MAX} bytes without NUL"
                ),
            });
        }
    }
    if let (Some(recorded), Some(found)) = (&sb.lun_identity, lun.identity()) {
        if recorded.same_lun(&found) == Some(true) {
            return Err(Error::Invalid {
                object: name,
                reason: format!(
                    "datastore {:?} ({}) is not a copy: it is on the LUN it was formatted on \
                     ({recorded}); resignature gives a copy a signature of its own",
                    sb.label, sb.uuid
                ),
            });
        }
    }
    if !frozen {
        refuse_live_hosts(&*lun, &sb)?;
    }

    let new_uuid = Uuid::new_v4();
    let region = crate::cluster::survey::read_region(&*lun, &sb)?;
    let mut journals_replayed = 0;
    let mut transactions_replayed = 0;
    let mut slots_cleared = 0;
    for (slot, hb) in region.iter().enumerate() {
        let Some(hb) = hb.as_ref().filter(|hb| hb.state != SlotState::Free) else {
            continue;
        };
        let slot = slot as u32;
        let (replayed, _) = crate::store::replay(&*lun, &sb, slot, new_uuid)?;
        if replayed > 0 {
            journals_replayed += 1;
            transactions_replayed += replayed;
        }
        // The generation is kept: lock records and Disk Paxos leaders that name the old
        // incarnations stay stale for whoever takes the slot next.
        let mut freed = hb.clone();
        freed.state = SlotState::Free;
        freed.recoverer = None;
        freed.pid = 0;
        freed.counter = hb.counter.wrapping_add(1);
        let off = sb.heartbeat_slot_offset(slot);
        write_record(&*lun, &freed.encode(off), off)?;
        slots_cleared += 1;
    }
    let locks = crate::cluster::survey::read_locks(&*lun, &sb)?;
    for (target, held) in &locks {
        let mut free = LockRecord::free(target.code());
        free.version = held.version.wrapping_add(1);
        let off = target.offset(&sb);
        write_record(&*lun, &free.encode(off), off)?;
    }
    lun.flush()?;

    let old_uuid = sb.uuid;
    let old_label = sb.label.clone();
    sb.uuid = new_uuid;
    sb.label = match label {
        Some(label) => label.to_string(),
        None => default_label(&old_label, new_uuid),
    };
    sb.lun_identity = lun.identity();
    lun.write_at(&sb.encode(sb.backup_offset())[..], sb.backup_offset())?;
    lun.flush()?;
    lun.write_at(&sb.encode(0)[..], 0)?;
    lun.flush()?;
    tracing::info!(lun = %name, %old_uuid, uuid = %new_uuid, old_label = %old_label, label = %sb.label, journals_replayed, transactions_replayed, slots_cleared, locks_cleared = locks.len(), "datastore resignatured");
    Ok(ResignatureReport {
        lun: name,
        old_uuid: old_uuid.to_string(),
        uuid: new_uuid.to_string(),
        old_label,
        label: sb.label.clone(),
        journals_replayed,
        transactions_replayed,
        slots_cleared,
        locks_cleared: locks.len(),
        lun_identity: sb.lun_identity.as_ref().map(LunIdentity::serialise),
    })
}

/// `snap-` and the new UUID's first 8 hex digits before the old label, as VMFS names a
/// resignatured snapshot, cut to the label's room.
fn default_label(old: &str, uuid: Uuid) -> String {
    let mut label = format!("snap-{}-{old}", &uuid.simple().to_string()[..8]);
    while label.len() > LABEL_MAX {
        label.pop();
    }
    label
}

/// A host whose heartbeat moves, or a live process of this machine that holds a slot, is
/// live: resignaturing under it would pull the datastore from under its feet. As for
/// dead-host recovery, a slot of another machine is judged only after its heartbeat stood
/// still for the dead-host timeout, by which time its host has fenced itself; a slot of a
/// process of this machine that is gone needs no wait.
fn refuse_live_hosts(lun: &dyn Lun, sb: &Superblock) -> Result<()> {
    let busy = |slot: u32, hb: &heartbeat::Heartbeat| Error::Busy {
        object: format!("datastore {:?} on {}", sb.label, lun.name()),
        holder: format!(
            "live host {} (slot {slot}, pid {}); unmount it everywhere before resignaturing",
            hb.hostname, hb.pid
        ),
        mode: "mounted".into(),
    };
    let first = crate::cluster::survey::read_region(lun, sb)?;
    let mut watched = Vec::new();
    for (slot, hb) in first.iter().enumerate() {
        let Some(hb) = hb.as_ref().filter(|hb| hb.state != SlotState::Free) else {
            continue;
        };
        if heartbeat::same_machine(hb) {
            if heartbeat::pid_alive(hb.pid) && !zombie(hb.pid) {
                return Err(busy(slot as u32, hb));
            }
            continue;
        }
        watched.push(slot);
    }
    if watched.is_empty() {
        return Ok(());
    }
    let timing = sb.timing();
    let started = std::time::Instant::now();
    tracing::info!(lun = %lun.name(), slots = ?watched, wait = ?timing.dead_after(), "watching heartbeats of other machines' slots before resignaturing");
    while started.elapsed() < timing.dead_after() {
        std::thread::sleep(timing.monitor_interval());
        let now = crate::cluster::survey::read_region(lun, sb)?;
        for &slot in &watched {
            if let (Some(a), Some(b)) = (&first[slot], &now[slot]) {
                if a.counter != b.counter || a.generation != b.generation {
                    return Err(busy(slot as u32, b));
                }
            }
        }
    }
    Ok(())
}

/// A killed process that nobody reaped yet (no init reaps in some containers) still
/// answers kill(pid, 0), but holds nothing.
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            == Some('Z')
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A copy (a `cp` of a freshly formatted datastore file) whose slot 5 was held by a
    /// host of another machine.
    fn copy_with_foreign_slot(dir: &std::path::Path) -> (Arc<dyn Lun>, Superblock, u64) {
        let orig = dir.join("orig.vmfs");
        let lun = lun::open(
            orig.to_str().unwrap(),
            &lun::OpenOptions {
                create_size: Some(128 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        crate::format(
            lun,
            &crate::FormatOptions {
                block_size: 64 << 10,
                max_files: Some(1024),
                io_timeout: Some(Duration::from_millis(100)),
                ..Default::default()
            },
        )
        .unwrap();
        let copy = dir.join("copy.vmfs");
        std::fs::copy(&orig, &copy).unwrap();
        let lun = lun::open(copy.to_str().unwrap(), &lun::OpenOptions::default()).unwrap();
        let (sb, _) = read_superblock(&*lun).unwrap();
        let off = sb.heartbeat_slot_offset(5);
        let hb = heartbeat::Heartbeat {
            slot: 5,
            state: SlotState::Live,
            host: Uuid::new_v4(),
            hostname: "esx-far".into(),
            generation: 3,
            counter: 1,
            time_ns: 0,
            pid: 1,
            nonce: 7,
            io_timeout_ms: 100,
            boot_id: [0xab; 16],
            pid_ns: 0,
            recoverer: None,
        };
        write_record(&*lun, &hb.encode(off), off).unwrap();
        (lun, sb, off)
    }

    #[test]
    fn another_machines_silent_slot_is_freed_after_the_dead_host_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (lun, sb, _) = copy_with_foreign_slot(dir.path());
        let started = Instant::now();
        let report = resignature(lun.clone(), None).unwrap();
        assert!(started.elapsed() >= sb.timing().dead_after());
        assert_eq!(report.slots_cleared, 1);
        let region = crate::cluster::survey::read_region(&*lun, &sb).unwrap();
        let slot = region[5].as_ref().unwrap();
        assert_eq!((slot.state, slot.generation), (SlotState::Free, 3));
    }

    #[test]
    fn another_machines_renewing_slot_refuses_resignature_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (lun, sb, off) = copy_with_foreign_slot(dir.path());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renewer = {
            let (lun, stop) = (lun.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut u = vec![0u8; crate::codec::UNIT];
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    lun.read_at(&mut u, off).unwrap();
                    let mut hb = heartbeat::Heartbeat::decode(&u, off, 5).unwrap().unwrap();
                    hb.counter += 1;
                    write_record(&*lun, &hb.encode(off), off).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let err = resignature(lun.clone(), Some("x")).unwrap_err();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        renewer.join().unwrap();
        let text = err.to_string();
        assert!(text.contains("live host esx-far (slot 5"), "{text}");
        let (after, _) = read_superblock(&*lun).unwrap();
        assert_eq!(after, sb);
    }

    #[test]
    fn default_labels_name_the_snapshot_and_fit() {
        let uuid = Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
        assert_eq!(default_label("ds1", uuid), "snap-12345678-ds1");
        let long = "x".repeat(LABEL_MAX);
        assert_eq!(default_label(&long, uuid).len(), LABEL_MAX);
    }
}
