//! File descriptors (inodes) and pointer-block units.
//!
//! An inode is one 4 KiB unit (next to its lock-record unit). Its tail holds either inline
//! data (small files, symlinks), one sub-block index, or the block tree: 480 direct addresses
//! then single-, double- and triple-indirect pointer blocks of 8128 addresses each.

use serde::Serialize;

use crate::codec::*;
use crate::layout::{DIRECT_ADDRS, PTRS_PER_UNIT};

const OFF_INO: usize = 16;
const OFF_GENERATION: usize = 24;
const OFF_VERSION: usize = 32;
const OFF_KIND: usize = 40;
const OFF_ADDR_MODE: usize = 41;
const OFF_FLAGS: usize = 42;
const OFF_MODE: usize = 44;
const OFF_UID: usize = 48;
const OFF_GID: usize = 52;
const OFF_NLINK: usize = 56;
const OFF_SIZE: usize = 64;
const OFF_ALLOCATED: usize = 72;
const OFF_ATIME: usize = 80;
const OFF_MTIME: usize = 88;
const OFF_CTIME: usize = 96;
const OFF_CRTIME: usize = 104;
const OFF_PARENT: usize = 112;
const OFF_RDEV: usize = 120;
pub const TAIL: usize = 128;
/// Bytes of file data an inode holds inline.
pub const INLINE_MAX: usize = UNIT - TAIL;
const OFF_INDIRECT: usize = TAIL + DIRECT_ADDRS as usize * 8;

/// Longest symbolic link target: PATH_MAX - 1, as ext4. Targets longer than
/// [`INLINE_MAX`] live in a sub-block.
pub const SYMLINK_MAX: usize = 4095;

/// High address bits are reserved for per-block flags (e.g. to-be-zeroed) in later versions.
pub const ADDR_MASK: u64 = (1 << 48) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A raw device mapping: its inline data is the mapping payload ([`crate::RdmRecord`]),
    /// its size the mapped LUN's.
    Rdm,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

impl Kind {
    pub fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Rdm => 4,
            Kind::Fifo => 5,
            Kind::CharDevice => 6,
            Kind::BlockDevice => 7,
            Kind::Socket => 8,
        }
    }
    pub fn from_code(c: u8) -> Option<Kind> {
        match c {
            1 => Some(Kind::File),
            2 => Some(Kind::Dir),
            3 => Some(Kind::Symlink),
            4 => Some(Kind::Rdm),
            5 => Some(Kind::Fifo),
            6 => Some(Kind::CharDevice),
            7 => Some(Kind::BlockDevice),
            8 => Some(Kind::Socket),
            _ => None,
        }
    }
    /// The kind of a `S_IFMT` file type; `None` for types vmfs does not store.
    pub fn from_type_bits(mode: u32) -> Option<Kind> {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Some(Kind::File),
            libc::S_IFDIR => Some(Kind::Dir),
            libc::S_IFLNK => Some(Kind::Symlink),
            libc::S_IFIFO => Some(Kind::Fifo),
            libc::S_IFCHR => Some(Kind::CharDevice),
            libc::S_IFBLK => Some(Kind::BlockDevice),
            libc::S_IFSOCK => Some(Kind::Socket),
            _ => None,
        }
    }
    /// FIFOs, device nodes and sockets: an inode with no data, only a type (and, for
    /// devices, a device number).
    pub fn is_special(self) -> bool {
        matches!(
            self,
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice | Kind::Socket
        )
    }
    /// The S_IFMT bits.
    pub fn type_bits(self) -> u32 {
        match self {
            // To POSIX a mapping is a regular file the size of its LUN, as on VMFS.
            Kind::File | Kind::Rdm => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
            Kind::Socket => libc::S_IFSOCK,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrMode {
    Inline,
    SubBlock,
    Tree,
}

impl AddrMode {
    fn code(self) -> u8 {
        match self {
            AddrMode::Inline => 0,
            AddrMode::SubBlock => 1,
            AddrMode::Tree => 2,
        }
    }
    fn from_code(c: u8) -> Option<AddrMode> {
        match c {
            0 => Some(AddrMode::Inline),
            1 => Some(AddrMode::SubBlock),
            2 => Some(AddrMode::Tree),
            _ => None,
        }
    }
}

pub const FLAG_THICK: u16 = 1;
pub const FLAG_VDISK: u16 = 2;
/// A virtual disk with snapshot sessions: only the snapshot engine writes it.
pub const FLAG_SNAP_SOURCE: u16 = 4;
/// The snapshot pool of the virtual disk it is named after.
pub const FLAG_SNAP_POOL: u16 = 8;
/// Kind code of a free descriptor unit (the generation survives reuse).
pub const KIND_FREE: u8 = 0;

/// Read access to inode fields, for owned inodes and for cached units alike.
pub trait InodeView {
    fn raw(&self) -> &Unit;

    fn ino(&self) -> u64 {
        get_u64(self.raw(), OFF_INO)
    }
    fn generation(&self) -> u64 {
        get_u64(self.raw(), OFF_GENERATION)
    }
    fn version(&self) -> u64 {
        get_u64(self.raw(), OFF_VERSION)
    }
    fn kind_code(&self) -> u8 {
        get_u8(self.raw(), OFF_KIND)
    }
    fn kind(&self) -> Option<Kind> {
        Kind::from_code(self.kind_code())
    }
    fn addr_mode(&self) -> Option<AddrMode> {
        AddrMode::from_code(get_u8(self.raw(), OFF_ADDR_MODE))
    }
    fn flags(&self) -> u16 {
        get_u16(self.raw(), OFF_FLAGS)
    }
    fn mode(&self) -> u32 {
        get_u32(self.raw(), OFF_MODE)
    }
    fn uid(&self) -> u32 {
        get_u32(self.raw(), OFF_UID)
    }
    fn gid(&self) -> u32 {
        get_u32(self.raw(), OFF_GID)
    }
    fn nlink(&self) -> u32 {
        get_u32(self.raw(), OFF_NLINK)
    }
    fn size(&self) -> u64 {
        get_u64(self.raw(), OFF_SIZE)
    }
    fn allocated(&self) -> u64 {
        get_u64(self.raw(), OFF_ALLOCATED)
    }
    fn atime(&self) -> i64 {
        get_i64(self.raw(), OFF_ATIME)
    }
    fn mtime(&self) -> i64 {
        get_i64(self.raw(), OFF_MTIME)
    }
    fn ctime(&self) -> i64 {
        get_i64(self.raw(), OFF_CTIME)
    }
    fn crtime(&self) -> i64 {
        get_i64(self.raw(), OFF_CRTIME)
    }
    fn parent(&self) -> u64 {
        get_u64(self.raw(), OFF_PARENT)
    }
    /// Device number of a character or block device node (Linux `dev_t` encoding).
    fn rdev(&self) -> u64 {
        get_u64(self.raw(), OFF_RDEV)
    }
    fn inline(&self) -> &[u8] {
        &self.raw()[TAIL..]
    }
    fn sub_block(&self) -> u64 {
        get_u64(self.raw(), TAIL)
    }
    fn direct(&self, i: u64) -> u64 {
        get_u64(self.raw(), TAIL + i as usize * 8)
    }
    /// Root of the indirect tree of depth `level` (1..=3).
    fn indirect(&self, level: u32) -> u64 {
        get_u64(self.raw(), OFF_INDIRECT + (level as usize - 1) * 8)
    }
    fn is_thick(&self) -> bool {
        self.flags() & FLAG_THICK != 0
    }
}

/// An inode being modified: a private copy of its unit.
#[derive(Clone)]
pub struct Inode {
    raw: Box<Unit>,
}

impl InodeView for Inode {
    fn raw(&self) -> &Unit {
        &self.raw
    }
}

impl InodeView for std::sync::Arc<Unit> {
    fn raw(&self) -> &Unit {
        self
    }
}

impl InodeView for Unit {
    fn raw(&self) -> &Unit {
        self
    }
}

impl Inode {
    pub fn from_unit(u: &impl InodeView) -> Inode {
        Inode {
            raw: Box::new(*u.raw()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ino: u64,
        generation: u64,
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        parent: u64,
        now: i64,
    ) -> Inode {
        let mut i = Inode { raw: zero_unit() };
        put_u64(&mut i.raw[..], OFF_INO, ino);
        put_u64(&mut i.raw[..], OFF_GENERATION, generation);
        put_u8(&mut i.raw[..], OFF_KIND, kind.code());
        i.set_mode(mode);
        i.set_owner(uid, gid);
        i.set_nlink(if kind == Kind::Dir { 2 } else { 1 });
        i.set_parent(parent);
        i.set_times(Some(now), Some(now), now);
        put_i64(&mut i.raw[..], OFF_CRTIME, now);
        i
    }

    /// The unit a freed descriptor leaves behind: only the generation survives, so the next
    /// owner of the number can tell FUSE handles apart.
    pub fn freed(ino: u64, generation: u64) -> Inode {
        let mut i = Inode { raw: zero_unit() };
        put_u64(&mut i.raw[..], OFF_INO, ino);
        put_u64(&mut i.raw[..], OFF_GENERATION, generation);
        i
    }

    pub fn set_mode(&mut self, mode: u32) {
        put_u32(&mut self.raw[..], OFF_MODE, mode & 0o7777);
    }
    pub fn set_owner(&mut self, uid: u32, gid: u32) {
        put_u32(&mut self.raw[..], OFF_UID, uid);
        put_u32(&mut self.raw[..], OFF_GID, gid);
    }
    pub fn set_nlink(&mut self, n: u32) {
        put_u32(&mut self.raw[..], OFF_NLINK, n);
    }
    pub fn set_size(&mut self, size: u64) {
        put_u64(&mut self.raw[..], OFF_SIZE, size);
    }
    pub fn set_allocated(&mut self, bytes: u64) {
        put_u64(&mut self.raw[..], OFF_ALLOCATED, bytes);
    }
    pub fn add_allocated(&mut self, delta: i64) {
        let v = (self.allocated() as i64 + delta).max(0) as u64;
        self.set_allocated(v);
    }
    pub fn set_flags(&mut self, flags: u16) {
        put_u16(&mut self.raw[..], OFF_FLAGS, flags);
    }
    pub fn set_parent(&mut self, parent: u64) {
        put_u64(&mut self.raw[..], OFF_PARENT, parent);
    }
    pub fn set_rdev(&mut self, rdev: u64) {
        put_u64(&mut self.raw[..], OFF_RDEV, rdev);
    }
    pub fn set_times(&mut self, atime: Option<i64>, mtime: Option<i64>, ctime: i64) {
        if let Some(a) = atime {
            put_i64(&mut self.raw[..], OFF_ATIME, a);
        }
        if let Some(m) = mtime {
            put_i64(&mut self.raw[..], OFF_MTIME, m);
        }
        put_i64(&mut self.raw[..], OFF_CTIME, ctime);
    }
    /// Switches the tail's interpretation and clears it.
    pub fn set_addr_mode(&mut self, mode: AddrMode) {
        put_u8(&mut self.raw[..], OFF_ADDR_MODE, mode.code());
        self.raw[TAIL..].fill(0);
    }
    /// The whole unit, for payloads laid out over it (a mapping's).
    pub fn raw_mut(&mut self) -> &mut [u8] {
        &mut self.raw[..]
    }
    pub fn inline_mut(&mut self) -> &mut [u8] {
        &mut self.raw[TAIL..]
    }
    pub fn set_sub_block(&mut self, index_plus_one: u64) {
        put_u64(&mut self.raw[..], TAIL, index_plus_one);
    }
    pub fn set_direct(&mut self, i: u64, addr: u64) {
        put_u64(&mut self.raw[..], TAIL + i as usize * 8, addr);
    }
    pub fn set_indirect(&mut self, level: u32, addr: u64) {
        put_u64(
            &mut self.raw[..],
            OFF_INDIRECT + (level as usize - 1) * 8,
            addr,
        );
    }
    /// Bumps the change counter and seals: every persisted change goes through here.
    pub fn seal(mut self, location: u64) -> Box<Unit> {
        let v = self.version().wrapping_add(1);
        put_u64(&mut self.raw[..], OFF_VERSION, v);
        seal(&mut self.raw[..], MAGIC_INODE, location, UNIT);
        self.raw
    }
}

/// Structural checks beyond the crc.
pub fn check(u: &Unit, ino: u64) -> Result<(), String> {
    if u.ino() != ino {
        return Err(format!("records inode number {}", u.ino()));
    }
    if u.kind_code() == KIND_FREE {
        return Ok(());
    }
    let Some(kind) = u.kind() else {
        return Err(format!("unknown file type {}", u.kind_code()));
    };
    let Some(mode) = u.addr_mode() else {
        return Err("unknown address mode".into());
    };
    if kind == Kind::Dir && mode == AddrMode::Inline {
        return Err("directory with inline data".into());
    }
    if kind.is_special() && (mode != AddrMode::Inline || u.size() != 0) {
        return Err(format!("{kind:?} with {} bytes of data", u.size()));
    }
    if kind == Kind::Symlink
        && (mode == AddrMode::Tree || u.size() == 0 || u.size() > SYMLINK_MAX as u64)
    {
        return Err(format!("symbolic link target of {} bytes", u.size()));
    }
    if kind == Kind::Rdm {
        // The size is the mapped LUN's; the payload is checked by fsck and by whoever
        // opens the mapping, so a damaged one can still be listed and removed.
        if mode != AddrMode::Inline || u.allocated() != 0 {
            return Err("raw device mapping with data storage".into());
        }
        return Ok(());
    }
    if mode == AddrMode::Inline && u.size() > INLINE_MAX as u64 {
        return Err(format!("inline file of {} bytes", u.size()));
    }
    Ok(())
}

// Pointer-block units: 16-byte common header, 16 bytes of identity, 508 addresses.
const PTR_OFF_BLOCK: usize = 16;
const PTR_OFF_INDEX: usize = 24;
const PTR_ADDRS: usize = 32;

pub fn pointer_unit_new(pb: u64, index: u64, location: u64) -> Box<Unit> {
    let mut u = zero_unit();
    put_u64(&mut u[..], PTR_OFF_BLOCK, pb);
    put_u64(&mut u[..], PTR_OFF_INDEX, index);
    seal(&mut u[..], MAGIC_POINTER, location, UNIT);
    u
}

pub fn pointer_get(u: &Unit, slot: u64) -> u64 {
    get_u64(u, PTR_ADDRS + slot as usize * 8)
}

pub fn pointer_set(u: &mut Unit, slot: u64, addr: u64, location: u64) {
    put_u64(&mut u[..], PTR_ADDRS + slot as usize * 8, addr);
    seal(&mut u[..], MAGIC_POINTER, location, UNIT);
}

pub fn pointer_check(u: &Unit, pb: u64, index: u64) -> Result<(), String> {
    if get_u64(u, PTR_OFF_BLOCK) != pb || get_u64(u, PTR_OFF_INDEX) != index {
        return Err(format!(
            "belongs to pointer block {} unit {}",
            get_u64(u, PTR_OFF_BLOCK),
            get_u64(u, PTR_OFF_INDEX)
        ));
    }
    Ok(())
}

/// First non-zero slot at or after `from` in this unit.
pub fn pointer_next(u: &Unit, from: u64) -> Option<u64> {
    (from..PTRS_PER_UNIT).find(|&s| pointer_get(u, s) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_round_trip_and_version_bump() {
        let mut i = Inode::new(7, 3, Kind::File, 0o100644, 1000, 100, 1, 123);
        i.set_size(5000);
        i.set_addr_mode(AddrMode::Tree);
        i.set_direct(0, 42);
        i.set_direct(479, 43);
        i.set_indirect(2, 44);
        let u: std::sync::Arc<Unit> = i.seal(8192).into();
        assert_eq!(verify(&u[..], MAGIC_INODE, 8192, UNIT), Ok(()));
        check(&u, 7).unwrap();
        assert!(check(&u, 8).is_err());
        assert_eq!(u.mode(), 0o644);
        assert_eq!((u.uid(), u.gid(), u.nlink()), (1000, 100, 1));
        assert_eq!(u.size(), 5000);
        assert_eq!(u.kind(), Some(Kind::File));
        assert_eq!(u.addr_mode(), Some(AddrMode::Tree));
        assert_eq!((u.direct(0), u.direct(479), u.indirect(2)), (42, 43, 44));
        assert_eq!(u.indirect(1), 0);
        assert_eq!((u.mtime(), u.generation(), u.version()), (123, 3, 1));
        let again = Inode::from_unit(&u).seal(8192);
        assert_eq!(std::sync::Arc::<Unit>::from(again).version(), 2);
    }

    #[test]
    fn pointer_units() {
        let mut u = pointer_unit_new(5, 2, 65536);
        assert_eq!(pointer_next(&u, 0), None);
        pointer_set(&mut u, 100, 9, 65536);
        pointer_set(&mut u, 507, 10, 65536);
        assert_eq!(verify(&u[..], MAGIC_POINTER, 65536, UNIT), Ok(()));
        pointer_check(&u, 5, 2).unwrap();
        assert!(pointer_check(&u, 5, 3).is_err());
        assert_eq!(pointer_next(&u, 0), Some(100));
        assert_eq!(pointer_next(&u, 101), Some(507));
        assert_eq!(pointer_get(&u, 507), 10);
    }
}
