//! The superblock and the region layout it describes.
//!
//! Everything is placed at format time from the LUN size and the format options (VMFS5-style
//! fixed resource counts): a host computes every address from the superblock alone, fsck can
//! check every structure without chasing system files, and nothing has to grow under a lock.

use serde::Serialize;
use uuid::Uuid;

use crate::cluster::{LockProtocol, Timing};
use crate::codec::*;
use crate::error::{Error, Result};

/// Version 2 adds FIFOs, device nodes and sockets, and symbolic link targets in a sub-block;
/// version 3 raw device mappings. A host opens every version up to its own; an older
/// datastore keeps its version (hosts running an older vapp may mount it) and refuses only
/// what its version cannot store.
pub const FORMAT_VERSION: u32 = 3;
/// The first version that stores raw device mappings (inode type 4).
pub const RDM_VERSION: u32 = 3;
/// The first version that stores FIFOs, character and block devices and sockets.
pub const SPECIAL_FILES_VERSION: u32 = 2;
/// The first version that stores symbolic link targets longer than an inode's inline data.
pub const LONG_SYMLINKS_VERSION: u32 = 2;
pub const SIGNATURE: &[u8; 8] = b"VAPPVMFS";
/// Heartbeat slots, journals and Disk Paxos ballots are sized for this many hosts.
pub const HOST_SLOTS: u32 = 64;
/// Disk Paxos lease areas reserved for the cluster layer (each: a leader unit + one ballot
/// unit per host slot).
pub const LEASE_AREAS: u32 = 8;
pub const ROOT_INO: u64 = 1;

/// Pointer blocks are 64 KiB: 16 independently checksummed units of 508 addresses each.
pub const PTR_UNITS: u64 = 16;
pub const PTRS_PER_UNIT: u64 = 508;
pub const PTRS_PER_BLOCK: u64 = PTR_UNITS * PTRS_PER_UNIT;
pub const POINTER_BLOCK_SIZE: u64 = PTR_UNITS * UNIT_U64;
/// Direct block addresses held in the inode itself.
pub const DIRECT_ADDRS: u64 = 480;

pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
pub const MIN_JOURNAL: u64 = 1 << 20;
pub const MAX_JOURNAL: u64 = 64 << 20;
/// A datastore must hold at least this many file blocks.
const MIN_DATA_BLOCKS: u64 = 16;

const FB_PER_CLUSTER: u32 = 512;
const FD_PER_CLUSTER: u32 = 128;
const SB_PER_CLUSTER: u32 = 128;
const PB_PER_CLUSTER: u32 = 64;
/// Each file descriptor is a lock-record unit followed by the inode unit.
pub const INODE_SLOT: u64 = 2 * UNIT_U64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    FileBlock,
    Inode,
    SubBlock,
    PointerBlock,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 4] = [
        ResourceKind::Inode,
        ResourceKind::SubBlock,
        ResourceKind::PointerBlock,
        ResourceKind::FileBlock,
    ];
    pub fn code(self) -> u8 {
        match self {
            ResourceKind::FileBlock => 1,
            ResourceKind::Inode => 2,
            ResourceKind::SubBlock => 3,
            ResourceKind::PointerBlock => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::FileBlock => "file blocks",
            ResourceKind::Inode => "file descriptors",
            ResourceKind::SubBlock => "sub-blocks",
            ResourceKind::PointerBlock => "pointer blocks",
        }
    }
}

/// One resource type: an array of clusters (lock unit + bitmap unit each) and the array of
/// resources they govern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ResourceArea {
    pub meta_offset: u64,
    pub area_offset: u64,
    pub count: u64,
    pub per_cluster: u32,
    pub size: u64,
}

impl ResourceArea {
    pub fn clusters(&self) -> u64 {
        self.count.div_ceil(u64::from(self.per_cluster))
    }
    pub fn lock_offset(&self, cluster: u64) -> u64 {
        self.meta_offset + cluster * 2 * UNIT_U64
    }
    pub fn bitmap_offset(&self, cluster: u64) -> u64 {
        self.lock_offset(cluster) + UNIT_U64
    }
    pub fn resource_offset(&self, index: u64) -> u64 {
        self.area_offset + index * self.size
    }
    /// Resources governed by `cluster` (the last cluster may be short).
    pub fn in_cluster(&self, cluster: u64) -> u64 {
        let per = u64::from(self.per_cluster);
        per.min(self.count.saturating_sub(cluster * per))
    }
    fn meta_len(&self) -> u64 {
        self.clusters() * 2 * UNIT_U64
    }
    fn end(&self) -> u64 {
        self.area_offset + self.count * self.size
    }
}

/// The decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub uuid: Uuid,
    pub label: String,
    pub created_ns: i64,
    /// Bytes of the LUN the datastore uses; the backup superblock is its last unit.
    pub fs_size: u64,
    pub block_size: u32,
    pub sub_block_size: u32,
    pub host_slots: u32,
    pub lease_areas: u32,
    pub heartbeat_offset: u64,
    pub lease_offset: u64,
    pub journal_offset: u64,
    pub journal_size: u64,
    pub inodes: ResourceArea,
    pub sub_blocks: ResourceArea,
    pub pointer_blocks: ResourceArea,
    pub file_blocks: ResourceArea,
    /// How hosts change shared records (fixed at format time).
    pub lock_protocol: LockProtocol,
    /// The cluster timing every host of this datastore uses.
    pub io_timeout_ms: u32,
    /// The LUN the datastore was formatted (or last resignatured) on; `None` for one
    /// formatted before vapp recorded it. A copy is found on another LUN.
    pub lun_identity: Option<lun::LunIdentity>,
}

/// Where the recorded LUN identity lives in the superblock, and its room.
const OFF_LUN_IDENTITY: usize = 352;
const LUN_IDENTITY_LEN: usize = lun::IDENTITY_MAX;

pub const LABEL_MAX: usize = 63;

impl Superblock {
    pub fn area(&self, kind: ResourceKind) -> &ResourceArea {
        match kind {
            ResourceKind::FileBlock => &self.file_blocks,
            ResourceKind::Inode => &self.inodes,
            ResourceKind::SubBlock => &self.sub_blocks,
            ResourceKind::PointerBlock => &self.pointer_blocks,
        }
    }
    pub fn timing(&self) -> Timing {
        Timing::from_millis(self.io_timeout_ms)
    }
    pub fn backup_offset(&self) -> u64 {
        self.fs_size - UNIT_U64
    }
    pub fn heartbeat_slot_offset(&self, slot: u32) -> u64 {
        self.heartbeat_offset + u64::from(slot) * UNIT_U64
    }
    pub fn journal_area(&self, slot: u32) -> u64 {
        self.journal_offset + u64::from(slot) * self.journal_size
    }
    /// The unit of host slot `slot`'s journal that holds its orphan list.
    pub(crate) fn orphan_offset(&self, slot: u32) -> u64 {
        self.journal_area(slot) + crate::journal::ORPHAN_UNIT * UNIT_U64
    }
    pub fn lease_area_len(&self) -> u64 {
        (1 + u64::from(self.host_slots)) * UNIT_U64
    }
    pub fn inode_lock_offset(&self, ino: u64) -> u64 {
        self.inodes.resource_offset(ino - 1)
    }
    pub fn inode_offset(&self, ino: u64) -> u64 {
        self.inode_lock_offset(ino) + UNIT_U64
    }
    /// Largest file size the address tree reaches (capped well below i64::MAX for FUSE).
    pub fn max_file_size(&self) -> u64 {
        let p = u128::from(PTRS_PER_BLOCK);
        let blocks = u128::from(DIRECT_ADDRS) + p + p * p + p * p * p;
        let bytes = blocks * u128::from(self.block_size);
        let cap = u128::from(align_down(1 << 62, u64::from(self.block_size)));
        bytes.min(cap) as u64
    }

    pub fn encode(&self, location: u64) -> Box<Unit> {
        let mut u = zero_unit();
        let b = &mut u[..];
        b[16..24].copy_from_slice(SIGNATURE);
        put_u32(b, 24, self.version);
        put_u32(b, 28, 0);
        b[32..48].copy_from_slice(self.uuid.as_bytes());
        put_str(b, 48, 64, &self.label);
        put_i64(b, 112, self.created_ns);
        put_u64(b, 120, self.fs_size);
        put_u32(b, 128, self.block_size);
        put_u32(b, 132, self.sub_block_size);
        put_u32(b, 136, self.host_slots);
        put_u32(b, 140, self.lease_areas);
        put_u64(b, 144, self.heartbeat_offset);
        put_u64(b, 152, self.lease_offset);
        put_u64(b, 160, self.journal_offset);
        put_u64(b, 168, self.journal_size);
        for (i, kind) in ResourceKind::ALL.iter().enumerate() {
            let a = self.area(*kind);
            let o = 176 + i * 40;
            put_u64(b, o, a.meta_offset);
            put_u64(b, o + 8, a.area_offset);
            put_u64(b, o + 16, a.count);
            put_u32(b, o + 24, a.per_cluster);
            put_u64(b, o + 32, a.size);
        }
        put_u64(b, 336, ROOT_INO);
        put_u32(b, 344, self.lock_protocol.code());
        put_u32(b, 348, self.io_timeout_ms);
        if let Some(identity) = &self.lun_identity {
            put_str(b, OFF_LUN_IDENTITY, LUN_IDENTITY_LEN, &identity.serialise());
        }
        seal(b, MAGIC_SUPER, location, RECORD);
        u
    }

    /// Decodes a superblock unit; `Err` says why it is unusable.
    pub fn decode(b: &[u8], location: u64) -> std::result::Result<Superblock, SuperFault> {
        if get_u32(b, OFF_MAGIC) != MAGIC_SUPER || &b[16..24] != SIGNATURE {
            return Err(SuperFault::NotASuperblock);
        }
        verify(b, MAGIC_SUPER, location, RECORD).map_err(SuperFault::Damaged)?;
        let version = get_u32(b, 24);
        if version > FORMAT_VERSION {
            return Err(SuperFault::Newer(version));
        }
        let area = |i: usize| {
            let o = 176 + i * 40;
            ResourceArea {
                meta_offset: get_u64(b, o),
                area_offset: get_u64(b, o + 8),
                count: get_u64(b, o + 16),
                per_cluster: get_u32(b, o + 24),
                size: get_u64(b, o + 32),
            }
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[32..48]);
        let sb = Superblock {
            version,
            uuid: Uuid::from_bytes(uuid),
            label: get_str(b, 48, 64),
            created_ns: get_i64(b, 112),
            fs_size: get_u64(b, 120),
            block_size: get_u32(b, 128),
            sub_block_size: get_u32(b, 132),
            host_slots: get_u32(b, 136),
            lease_areas: get_u32(b, 140),
            heartbeat_offset: get_u64(b, 144),
            lease_offset: get_u64(b, 152),
            journal_offset: get_u64(b, 160),
            journal_size: get_u64(b, 168),
            inodes: area(0),
            sub_blocks: area(1),
            pointer_blocks: area(2),
            file_blocks: area(3),
            lock_protocol: LockProtocol::from_code(get_u32(b, 344)).ok_or_else(|| {
                SuperFault::Insane(format!("unknown lock protocol {}", get_u32(b, 344)))
            })?,
            io_timeout_ms: get_u32(b, 348),
            lun_identity: lun::LunIdentity::parse(&get_str(b, OFF_LUN_IDENTITY, LUN_IDENTITY_LEN)),
        };
        sb.sane().map_err(SuperFault::Insane)?;
        Ok(sb)
    }

    /// Structural checks a crc cannot give: a well-formed superblock written by a buggy tool
    /// must still not send us outside the LUN.
    fn sane(&self) -> std::result::Result<(), String> {
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return Err(format!("block size {} out of range", self.block_size));
        }
        let io = std::time::Duration::from_millis(u64::from(self.io_timeout_ms));
        if !(Timing::MIN_IO_TIMEOUT..=Timing::MAX_IO_TIMEOUT).contains(&io) {
            return Err(format!("io timeout {} ms out of range", self.io_timeout_ms));
        }
        if self.host_slots == 0 || self.host_slots > crate::cluster::record::MAX_HOLDERS {
            return Err(format!("{} host slots", self.host_slots));
        }
        if self.journal_size < MIN_JOURNAL || self.journal_size % UNIT_U64 != 0 {
            return Err(format!("journal size {}", self.journal_size));
        }
        let regions = [
            self.journal_offset + u64::from(self.host_slots) * self.journal_size,
            self.inodes.end(),
            self.sub_blocks.end(),
            self.pointer_blocks.end(),
            self.file_blocks.end(),
        ];
        if regions.iter().any(|&end| end > self.fs_size - UNIT_U64) {
            return Err("a region runs past the end of the datastore".into());
        }
        for kind in ResourceKind::ALL {
            let a = self.area(kind);
            if a.per_cluster == 0 || a.per_cluster as usize > crate::bitmap::BITS_PER_UNIT {
                return Err(format!("{} per cluster: {}", kind.name(), a.per_cluster));
            }
        }
        if self.inodes.count == 0 || self.file_blocks.size != u64::from(self.block_size) {
            return Err("inconsistent resource areas".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuperFault {
    NotASuperblock,
    Damaged(UnitFault),
    Newer(u32),
    Insane(String),
}

impl std::fmt::Display for SuperFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SuperFault::NotASuperblock => write!(f, "no superblock signature"),
            SuperFault::Damaged(fault) => write!(f, "{fault}"),
            SuperFault::Newer(v) => write!(f, "format version {v} is newer than {FORMAT_VERSION}"),
            SuperFault::Insane(why) => write!(f, "inconsistent geometry: {why}"),
        }
    }
}

/// What the user asked for at format time; `None` means "pick for the size".
#[derive(Clone, Debug)]
pub struct Geometry {
    pub block_size: u32,
    pub max_files: Option<u64>,
    pub journal_size: Option<u64>,
    pub lock_protocol: LockProtocol,
    pub io_timeout_ms: u32,
}

/// Places every region for a LUN of `lun_size` bytes.
pub fn plan(
    lun: &str,
    lun_size: u64,
    geometry: &Geometry,
    uuid: Uuid,
    label: &str,
    created_ns: i64,
) -> Result<Superblock> {
    let bs = geometry.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::Invalid {
            object: format!("block size {bs}"),
            reason: "must be a power of two from 64 KiB to 64 MiB".into(),
        });
    }
    if label.len() > LABEL_MAX || label.is_empty() {
        return Err(Error::Invalid {
            object: format!("label {label:?}"),
            reason: format!("must be 1..={LABEL_MAX} bytes"),
        });
    }
    let fs_size = align_down(lun_size, UNIT_U64);
    let journal_size = match geometry.journal_size {
        Some(j) => {
            if !(MIN_JOURNAL..=MAX_JOURNAL).contains(&j) || j % UNIT_U64 != 0 {
                return Err(Error::Invalid {
                    object: format!("journal size {j}"),
                    reason: "must be a multiple of 4 KiB from 1 MiB to 64 MiB".into(),
                });
            }
            j
        }
        None if fs_size >= 16 << 30 => 4 << 20,
        None => 1 << 20,
    };
    let max_files = geometry
        .max_files
        .unwrap_or_else(|| (fs_size / (256 << 10)).clamp(1024, 1 << 22));
    let sub_blocks = (max_files / 8).max(256);
    let pointer_blocks = (fs_size / u64::from(bs) / 2048 + 128).max(128);
    let mut sb = layout(
        fs_size,
        bs,
        journal_size,
        max_files,
        sub_blocks,
        pointer_blocks,
        uuid,
        label,
        created_ns,
    );
    sb.lock_protocol = geometry.lock_protocol;
    sb.io_timeout_ms = geometry.io_timeout_ms;
    let io = std::time::Duration::from_millis(u64::from(geometry.io_timeout_ms));
    if !(Timing::MIN_IO_TIMEOUT..=Timing::MAX_IO_TIMEOUT).contains(&io) {
        return Err(Error::Invalid {
            object: format!("io timeout {io:?}"),
            reason: format!(
                "must be from {:?} to {:?}",
                Timing::MIN_IO_TIMEOUT,
                Timing::MAX_IO_TIMEOUT
            ),
        });
    }
    let data_blocks = sb.file_blocks.count;
    if fs_size < sb.file_blocks.area_offset || data_blocks < MIN_DATA_BLOCKS {
        // The smallest LUN that fits the same metadata plus the minimum number of blocks.
        let min = align_up(
            sb.file_blocks.area_offset + (MIN_DATA_BLOCKS + 1) * u64::from(bs) + 2 * UNIT_U64,
            1 << 20,
        );
        return Err(Error::TooSmall {
            lun: lun.to_string(),
            size: lun_size,
            min: min.max(lun_size + 1),
            reason: format!(
                "metadata for {max_files} files, {} host journals of {journal_size} bytes and \
                 the minimum of {MIN_DATA_BLOCKS} blocks of {bs} bytes do not fit",
                HOST_SLOTS
            ),
        });
    }
    Ok(sb)
}

#[allow(clippy::too_many_arguments)]
fn layout(
    fs_size: u64,
    bs: u32,
    journal_size: u64,
    max_files: u64,
    sub_blocks: u64,
    pointer_blocks: u64,
    uuid: Uuid,
    label: &str,
    created_ns: i64,
) -> Superblock {
    const ALIGN: u64 = 64 << 10;
    let bs64 = u64::from(bs);
    let sub_block_size = (bs / 16).clamp(8 << 10, 64 << 10);
    let heartbeat_offset = ALIGN;
    let lease_offset = align_up(heartbeat_offset + u64::from(HOST_SLOTS) * UNIT_U64, ALIGN);
    let lease_len = u64::from(LEASE_AREAS) * (1 + u64::from(HOST_SLOTS)) * UNIT_U64;
    let journal_offset = align_up(lease_offset + lease_len, 1 << 20);
    let mut cursor = journal_offset + u64::from(HOST_SLOTS) * journal_size;

    let mut area = |count: u64, per_cluster: u32, size: u64, align: u64| {
        let per = u64::from(per_cluster);
        let count = count.div_ceil(per) * per;
        let meta_offset = align_up(cursor, ALIGN);
        let meta_len = count.div_ceil(per) * 2 * UNIT_U64;
        let area_offset = align_up(meta_offset + meta_len, align);
        cursor = area_offset + count * size;
        ResourceArea {
            meta_offset,
            area_offset,
            count,
            per_cluster,
            size,
        }
    };
    let inodes = area(max_files, FD_PER_CLUSTER, INODE_SLOT, ALIGN);
    let sub = area(sub_blocks, SB_PER_CLUSTER, u64::from(sub_block_size), ALIGN);
    let pointers = area(pointer_blocks, PB_PER_CLUSTER, POINTER_BLOCK_SIZE, ALIGN);

    // File blocks take the rest: their cluster metadata first, then block-aligned data up to
    // the backup superblock.
    let fb_meta = align_up(cursor, ALIGN);
    let end = fs_size.saturating_sub(UNIT_U64);
    let estimate = end.saturating_sub(fb_meta) / bs64;
    let per = u64::from(FB_PER_CLUSTER);
    let meta_len = estimate.div_ceil(per) * 2 * UNIT_U64;
    let data_offset = align_up(fb_meta + meta_len, bs64);
    let count = end.saturating_sub(data_offset) / bs64;
    let file_blocks = ResourceArea {
        meta_offset: fb_meta,
        area_offset: data_offset,
        count,
        per_cluster: FB_PER_CLUSTER,
        size: bs64,
    };
    debug_assert!(file_blocks.meta_len() <= meta_len);

    Superblock {
        version: FORMAT_VERSION,
        uuid,
        label: label.to_string(),
        created_ns,
        fs_size,
        block_size: bs,
        sub_block_size,
        host_slots: HOST_SLOTS,
        lease_areas: LEASE_AREAS,
        heartbeat_offset,
        lease_offset,
        journal_offset,
        journal_size,
        inodes,
        sub_blocks: sub,
        pointer_blocks: pointers,
        file_blocks,
        lock_protocol: LockProtocol::CompareAndWrite,
        io_timeout_ms: Timing::default().io_timeout_ms(),
        lun_identity: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(bs: u32) -> Geometry {
        Geometry {
            block_size: bs,
            max_files: None,
            journal_size: None,
            lock_protocol: LockProtocol::DiskPaxos,
            io_timeout_ms: 2000,
        }
    }

    #[test]
    fn superblock_round_trips() {
        let sb = plan("t", 8 << 30, &geometry(1 << 20), Uuid::new_v4(), "ds1", 42).unwrap();
        let u = sb.encode(0);
        assert_eq!(Superblock::decode(&u[..], 0).unwrap(), sb);
        // The backup is the same record sealed at its own location.
        let backup = sb.encode(sb.backup_offset());
        assert_eq!(
            Superblock::decode(&backup[..], sb.backup_offset()).unwrap(),
            sb
        );
        assert!(Superblock::decode(&backup[..], 0).is_err());
    }

    #[test]
    fn regions_do_not_overlap_and_are_aligned() {
        for (size, bs) in [
            (8u64 << 30, 1u32 << 20),
            (200 << 20, 64 << 10),
            (64 << 40, 8 << 20),
        ] {
            let sb = plan("t", size, &geometry(bs), Uuid::new_v4(), "x", 0).unwrap();
            let mut spans = vec![
                (0, UNIT_U64),
                (sb.heartbeat_offset, u64::from(sb.host_slots) * UNIT_U64),
                (
                    sb.lease_offset,
                    u64::from(sb.lease_areas) * sb.lease_area_len(),
                ),
                (
                    sb.journal_offset,
                    u64::from(sb.host_slots) * sb.journal_size,
                ),
                (sb.backup_offset(), UNIT_U64),
            ];
            for kind in ResourceKind::ALL {
                let a = sb.area(kind);
                spans.push((a.meta_offset, a.meta_len()));
                spans.push((a.area_offset, a.count * a.size));
            }
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?} overlap for size {size}");
            }
            assert_eq!(sb.file_blocks.area_offset % u64::from(bs), 0);
            assert!(sb.file_blocks.count >= MIN_DATA_BLOCKS);
        }
    }

    #[test]
    fn too_small_names_the_minimum_and_the_minimum_works() {
        let err = plan("lun0", 8 << 20, &geometry(1 << 20), Uuid::new_v4(), "x", 0).unwrap_err();
        let Error::TooSmall { min, .. } = err else {
            panic!("{err}")
        };
        assert!(min > 8 << 20);
        plan("lun0", min, &geometry(1 << 20), Uuid::new_v4(), "x", 0).unwrap();
    }

    #[test]
    fn double_indirect_reaches_tens_of_tib() {
        let sb = plan("t", 64 << 30, &geometry(1 << 20), Uuid::new_v4(), "x", 0).unwrap();
        assert!(sb.max_file_size() > 20 << 40);
    }

    #[test]
    fn bad_block_size_and_label_are_refused() {
        assert!(plan("t", 1 << 30, &geometry(3 << 20), Uuid::new_v4(), "x", 0).is_err());
        assert!(plan("t", 1 << 30, &geometry(32 << 10), Uuid::new_v4(), "x", 0).is_err());
        assert!(plan("t", 1 << 30, &geometry(1 << 20), Uuid::new_v4(), "", 0).is_err());
        let long = "l".repeat(64);
        assert!(plan("t", 1 << 30, &geometry(1 << 20), Uuid::new_v4(), &long, 0).is_err());
    }
}
