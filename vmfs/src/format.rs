//! Writing a new datastore.

use std::sync::Arc;
use std::time::Duration;

use lun::Lun;
use serde::Serialize;
use uuid::Uuid;

use crate::cluster::{LockProtocol, LockSafety, Timing, lock_safety};
use crate::codec::*;
use crate::datastore::read_superblock;
use crate::dir;
use crate::error::{Error, Result};
use crate::inode::{AddrMode, Inode, Kind};
use crate::journal::{self, Header, TX_START};
use crate::layout::{self, Geometry, ROOT_INO, ResourceKind, Superblock};
use crate::state::now_ns;

#[derive(Debug, Clone)]
pub struct FormatOptions {
    pub label: String,
    /// File block size: a power of two from 64 KiB to 64 MiB.
    pub block_size: u32,
    /// File descriptors to reserve; default scales with the LUN (one per 256 KiB).
    pub max_files: Option<u64>,
    /// Per-host journal size; default 1 MiB, 4 MiB on LUNs of 16 GiB and more.
    pub journal_size: Option<u64>,
    /// Overwrite an existing datastore.
    pub force: bool,
    pub uuid: Option<Uuid>,
    /// How hosts change shared records; default: compare-and-write where it excludes every
    /// machine that can reach the LUN (the device's own ATS, or a file on a local file
    /// system), Disk Paxos otherwise.
    pub lock_protocol: Option<LockProtocol>,
    /// The cluster's io_timeout, from which every interval derives (default 2 s).
    pub io_timeout: Option<Duration>,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            label: "datastore".into(),
            block_size: 1 << 20,
            max_files: None,
            journal_size: None,
            force: false,
            uuid: None,
            lock_protocol: None,
            io_timeout: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FormatReport {
    pub lun: String,
    pub uuid: String,
    pub label: String,
    pub lun_size: u64,
    pub block_size: u32,
    pub sub_block_size: u32,
    pub data_blocks: u64,
    pub capacity_bytes: u64,
    pub max_files: u64,
    pub sub_blocks: u64,
    pub pointer_blocks: u64,
    pub journal_size: u64,
    pub host_slots: u32,
    pub lock_protocol: LockProtocol,
    /// What the locks rest on through this LUN and whether they hold across machines.
    pub lock_safety: LockSafety,
    pub io_timeout_ms: u32,
}

/// Formats `lun` as an empty datastore with a root directory.
///
/// The old superblocks are destroyed first and the new ones written last, after a flush:
/// a crash in between leaves a LUN that is plainly not a datastore, never a half-made one.
pub fn format(lun: Arc<dyn Lun>, options: &FormatOptions) -> Result<FormatReport> {
    let name = lun.name().to_string();
    if lun.is_read_only() {
        return Err(Error::ReadOnly { lun: name });
    }
    let sector = lun.sector_size();
    if sector == 0 || sector as usize > UNIT || UNIT % sector as usize != 0 {
        return Err(Error::Invalid {
            object: name,
            reason: format!("sector size {sector} is not supported (512..=4096)"),
        });
    }
    if !options.force {
        if let Ok((old, _)) = read_superblock(&*lun) {
            return Err(Error::AlreadyFormatted {
                lun: name,
                label: old.label,
            });
        }
    }
    let lock_protocol = options
        .lock_protocol
        .unwrap_or_else(|| crate::cluster::default_protocol(&*lun));
    let safety = usable_protocol(lock_protocol, &*lun)?;
    let io_timeout = options.io_timeout.unwrap_or(Timing::DEFAULT_IO_TIMEOUT);
    let geometry = Geometry {
        block_size: options.block_size,
        max_files: options.max_files,
        journal_size: options.journal_size,
        lock_protocol,
        io_timeout_ms: Timing::new(io_timeout).io_timeout_ms(),
    };
    let uuid = options.uuid.unwrap_or_else(Uuid::new_v4);
    let mut sb = layout::plan(&name, lun.size(), &geometry, uuid, &options.label, now_ns())?;
    sb.lun_identity = lun.identity();

    let zero = zero_unit();
    lun.write_at(&zero[..], 0)?;
    let old_backup = align_down(lun.size(), UNIT_U64) - UNIT_U64;
    lun.write_at(&zero[..], old_backup)?;
    lun.write_at(&zero[..], sb.backup_offset())?;
    lun.flush()?;

    // Everything but the file blocks' data must read as "free" whatever the LUN held before
    // (a reused device, a file of other data, an older datastore): lock records, descriptors
    // and journals count on zero for that. A hole punched in a file or BLKZEROOUT on a device
    // makes this cheap; data blocks are left alone, since a block is written before it is
    // ever read.
    lun.write_zeroes(UNIT_U64, metadata_end(&sb) - UNIT_U64)?;
    zero_records(&*lun, sb.heartbeat_offset, sb.host_slots)?;
    for a in 0..sb.lease_areas {
        zero_records(
            &*lun,
            sb.lease_offset + u64::from(a) * sb.lease_area_len(),
            1 + sb.host_slots,
        )?;
    }
    for slot in 0..sb.host_slots {
        write_journal_head(&*lun, &sb, slot)?;
    }
    for kind in ResourceKind::ALL {
        write_clusters(&*lun, &sb, kind)?;
    }
    write_root(&*lun, &sb)?;
    lun.flush()?;
    lun.write_at(&sb.encode(0)[..], 0)?;
    lun.write_at(&sb.encode(sb.backup_offset())[..], sb.backup_offset())?;
    lun.flush()?;
    tracing::info!(lun = %name, %uuid, label = %sb.label, blocks = sb.file_blocks.count, protocol = lock_protocol.name(), primitive = %safety.primitive, safe_across_machines = safety.safe_across_machines, timing = %sb.timing(), "datastore formatted");
    Ok(FormatReport {
        lun: name,
        uuid: uuid.to_string(),
        label: sb.label.clone(),
        lun_size: lun.size(),
        block_size: sb.block_size,
        sub_block_size: sb.sub_block_size,
        data_blocks: sb.file_blocks.count,
        capacity_bytes: sb.file_blocks.count * u64::from(sb.block_size),
        max_files: sb.inodes.count,
        sub_blocks: sb.sub_blocks.count,
        pointer_blocks: sb.pointer_blocks.count,
        journal_size: sb.journal_size,
        host_slots: sb.host_slots,
        lock_protocol,
        lock_safety: safety,
        io_timeout_ms: sb.io_timeout_ms,
    })
}

/// Refuses a protocol the user asked for that the LUN cannot use safely through this path.
fn usable_protocol(protocol: LockProtocol, lun: &dyn Lun) -> Result<LockSafety> {
    let safety = lock_safety(protocol, lun);
    if safety.refused.is_none() {
        return Ok(safety);
    }
    let reason = match lun.compare_and_write_scope() {
        lun::CasScope::None => "compare-and-write locking was asked for but this LUN cannot do \
                               compare-and-write (use --lock-protocol paxos)"
            .to_string(),
        _ => format!(
            "compare-and-write locking was asked for but this LUN is {}, whose \
             compare-and-write is an OFD lock other machines do not see (use --lock-protocol \
             paxos, or --lock-protocol local if no other machine can ever reach this LUN)",
            safety.reach
        ),
    };
    Err(Error::Invalid {
        object: lun.name().to_string(),
        reason,
    })
}

/// Changes the lock protocol recorded in the superblocks of an unmounted datastore, as
/// VMFS changes its locking mode offline: lock records have one layout under every
/// protocol, so only the superblocks change. Refused while any heartbeat slot is held (a
/// mounted host, or a crashed one whose journal awaits replay), and for a protocol the LUN
/// cannot use safely through this path. Returns the new protocol's safety.
pub fn set_lock_protocol(lun: Arc<dyn Lun>, protocol: LockProtocol) -> Result<LockSafety> {
    let name = lun.name().to_string();
    if lun.is_read_only() {
        return Err(Error::ReadOnly { lun: name });
    }
    let (mut sb, _) = read_superblock(&*lun)?;
    let safety = usable_protocol(protocol, &*lun)?;
    if sb.lock_protocol == protocol {
        return Ok(safety);
    }
    let region = crate::cluster::survey::read_region(&*lun, &sb)?;
    if let Some((slot, hb)) = region
        .iter()
        .enumerate()
        .filter_map(|(slot, hb)| hb.as_ref().map(|hb| (slot, hb)))
        .find(|(_, hb)| hb.state != crate::cluster::heartbeat::SlotState::Free)
    {
        return Err(Error::Invalid {
            object: name,
            reason: format!(
                "heartbeat slot {slot} is {} by host {} (pid {}): the lock protocol changes \
                 only while no host has the datastore mounted (unmount it everywhere; a \
                 crashed host's slot is freed by the next read-write mount through a path \
                 its current protocol allows)",
                hb.state.name(),
                hb.hostname,
                hb.pid
            ),
        });
    }
    let from = sb.lock_protocol;
    sb.lock_protocol = protocol;
    lun.write_at(&sb.encode(0)[..], 0)?;
    lun.write_at(&sb.encode(sb.backup_offset())[..], sb.backup_offset())?;
    lun.flush()?;
    tracing::info!(lun = %name, from = from.name(), to = protocol.name(), primitive = %safety.primitive, "lock protocol changed");
    Ok(safety)
}

/// Blanks the record sector of `count` consecutive record units (heartbeat slots, Disk
/// Paxos leaders and ballots). Only the first sector of each unit is written: the rest of
/// a record unit is never touched by vmfs.
fn zero_records(lun: &dyn Lun, offset: u64, count: u32) -> Result<()> {
    let ss = (lun.sector_size() as usize).max(crate::codec::RECORD);
    let zero = vec![0u8; ss];
    let mut batch: Vec<lun::IoRequest<'_>> = (0..u64::from(count))
        .map(|i| lun::IoRequest::Write {
            buf: &zero,
            offset: offset + i * UNIT_U64,
        })
        .collect();
    lun.submit(&mut batch)?;
    Ok(())
}

/// Header, empty orphan list, and a blank first transaction slot so nothing of an older
/// datastore on this LUN can ever be replayed.
fn write_journal_head(lun: &dyn Lun, sb: &Superblock, slot: u32) -> Result<()> {
    let area = sb.journal_area(slot);
    let mut buf = vec![0u8; (TX_START as usize + 1) * UNIT];
    let header = Header {
        slot,
        size: sb.journal_size,
        checkpoint_seq: 0,
        host: Uuid::nil(),
    };
    buf[..UNIT].copy_from_slice(&header.encode(area)[..]);
    let orphan_off = area + journal::ORPHAN_UNIT * UNIT_U64;
    buf[UNIT..2 * UNIT].copy_from_slice(&journal::encode_orphans(&[], orphan_off)[..]);
    lun.write_at(&buf, area)?;
    Ok(())
}

/// Every cluster of a resource type: a blank lock record and an empty bitmap. Written in
/// large batches; the root's resources are marked by `write_root`.
fn write_clusters(lun: &dyn Lun, sb: &Superblock, kind: ResourceKind) -> Result<()> {
    const BATCH: u64 = 128;
    let area = *sb.area(kind);
    let clusters = area.clusters();
    let mut c = 0;
    while c < clusters {
        let n = BATCH.min(clusters - c);
        let mut buf = vec![0u8; (n * 2) as usize * UNIT];
        for i in 0..n {
            let cluster = c + i;
            let mut bm = crate::bitmap::new(
                kind,
                cluster,
                area.in_cluster(cluster),
                area.bitmap_offset(cluster),
            );
            let reserved = match kind {
                ResourceKind::Inode | ResourceKind::SubBlock => cluster == 0,
                _ => false,
            };
            if reserved {
                crate::bitmap::set(&mut bm, 0, true, area.bitmap_offset(cluster));
            }
            let at = (2 * i + 1) as usize * UNIT;
            buf[at..at + UNIT].copy_from_slice(&bm[..]);
        }
        lun.write_at(&buf, area.lock_offset(c))?;
        c += n;
    }
    Ok(())
}

/// The end of every region but the file blocks' data: superblock, heartbeats, lease areas,
/// journals, every resource cluster's lock and bitmap, and the descriptors, sub-blocks and
/// pointer blocks themselves.
fn metadata_end(sb: &Superblock) -> u64 {
    ResourceKind::ALL
        .into_iter()
        .map(|kind| {
            let area = sb.area(kind);
            let meta_end = area.lock_offset(area.clusters());
            match kind {
                ResourceKind::FileBlock => meta_end,
                _ => meta_end.max(area.resource_offset(area.count)),
            }
        })
        .max()
        .unwrap_or(UNIT_U64)
        .max(UNIT_U64)
}

/// The root directory: inode 1 (descriptor 0) in sub-block 0.
fn write_root(lun: &dyn Lun, sb: &Superblock) -> Result<()> {
    let now = now_ns();
    let mut root = Inode::new(ROOT_INO, 1, Kind::Dir, 0o755, 0, 0, ROOT_INO, now);
    root.set_addr_mode(AddrMode::SubBlock);
    root.set_sub_block(1);
    root.set_size(UNIT_U64);
    root.set_allocated(u64::from(sb.sub_block_size));
    let off = sb.inode_offset(ROOT_INO);
    lun.write_at(&root.seal(off)[..], off)?;
    zero_records(lun, sb.inode_lock_offset(ROOT_INO), 1)?;
    let unit_off = sb.sub_blocks.resource_offset(0);
    lun.write_at(&dir::new_unit(ROOT_INO, 0, unit_off)[..], unit_off)?;
    Ok(())
}
