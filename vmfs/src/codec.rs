//! Little-endian field access and the checksummed 4 KiB metadata unit.
//!
//! Every metadata unit starts with the same 16-byte header: magic (u32), crc32c (u32) and
//! the unit's own LUN offset (u64). The location field catches misdirected writes and units
//! copied to the wrong place; the crc covers the sealed length with the crc field read as 0.

pub const UNIT: usize = 4096;
pub const UNIT_U64: u64 = UNIT as u64;
/// Records that another host may write concurrently live in the first 512 bytes of their unit
/// (one sector on every LUN), so a single sector-atomic write updates them.
pub const RECORD: usize = 512;

pub type Unit = [u8; UNIT];

pub fn zero_unit() -> Box<Unit> {
    Box::new([0u8; UNIT])
}

pub fn get_u8(b: &[u8], off: usize) -> u8 {
    b[off]
}
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
pub fn get_i64(b: &[u8], off: usize) -> i64 {
    get_u64(b, off) as i64
}
pub fn put_u8(b: &mut [u8], off: usize, v: u8) {
    b[off] = v;
}
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn put_i64(b: &mut [u8], off: usize, v: i64) {
    put_u64(b, off, v as u64);
}

/// Fixed-size, NUL-padded byte string (labels, host names).
pub fn put_str(b: &mut [u8], off: usize, len: usize, s: &str) {
    let field = &mut b[off..off + len];
    field.fill(0);
    let bytes = s.as_bytes();
    let n = bytes.len().min(len);
    field[..n].copy_from_slice(&bytes[..n]);
}
pub fn get_str(b: &[u8], off: usize, len: usize) -> String {
    let field = &b[off..off + len];
    let end = field.iter().position(|&c| c == 0).unwrap_or(len);
    String::from_utf8_lossy(&field[..end]).into_owned()
}

pub const OFF_MAGIC: usize = 0;
pub const OFF_CRC: usize = 4;
pub const OFF_LOCATION: usize = 8;

/// crc32c of `b[..len]` with the crc field taken as zero.
pub fn checksum(b: &[u8], len: usize) -> u32 {
    let c = crc32c::crc32c(&b[..OFF_CRC]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[OFF_CRC + 4..len])
}

/// Writes magic, location and the crc over `len` bytes.
pub fn seal(b: &mut [u8], magic: u32, location: u64, len: usize) {
    put_u32(b, OFF_MAGIC, magic);
    put_u64(b, OFF_LOCATION, location);
    let c = checksum(b, len);
    put_u32(b, OFF_CRC, c);
}

/// Why a unit failed verification; the caller names the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitFault {
    /// All zeroes: never written.
    Blank,
    BadMagic {
        found: u32,
    },
    BadChecksum,
    Misplaced {
        recorded: u64,
    },
}

impl std::fmt::Display for UnitFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnitFault::Blank => write!(f, "never written (all zeroes)"),
            UnitFault::BadMagic { found } => write!(f, "wrong magic {found:#010x}"),
            UnitFault::BadChecksum => write!(f, "checksum mismatch"),
            UnitFault::Misplaced { recorded } => {
                write!(
                    f,
                    "unit records LUN offset {recorded}, it was written to the wrong place"
                )
            }
        }
    }
}

/// Could a unit (or record) that fails verification be one read in the middle of another
/// host's write? Units are rewritten in place only with their own magic, over an image with
/// that magic or a never-written one, so only if its magic is `magic` or still zero: any
/// other magic is damage, and rereading it only slows the reader down.
pub fn may_be_torn(b: &[u8], magic: u32) -> bool {
    matches!(get_u32(b, OFF_MAGIC), m if m == magic || m == 0)
}

pub fn verify(b: &[u8], magic: u32, location: u64, len: usize) -> Result<(), UnitFault> {
    let found = get_u32(b, OFF_MAGIC);
    if found != magic {
        if b[..len].iter().all(|&c| c == 0) {
            return Err(UnitFault::Blank);
        }
        return Err(UnitFault::BadMagic { found });
    }
    if checksum(b, len) != get_u32(b, OFF_CRC) {
        return Err(UnitFault::BadChecksum);
    }
    let recorded = get_u64(b, OFF_LOCATION);
    if recorded != location {
        return Err(UnitFault::Misplaced { recorded });
    }
    Ok(())
}

pub const fn magic(tag: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*tag)
}

pub const MAGIC_SUPER: u32 = magic(b"VMSB");
pub const MAGIC_HEARTBEAT: u32 = magic(b"VMHB");
pub const MAGIC_LOCK: u32 = magic(b"VMLK");
pub const MAGIC_JOURNAL: u32 = magic(b"VMJH");
pub const MAGIC_TXN: u32 = magic(b"VMTX");
pub const MAGIC_ORPHANS: u32 = magic(b"VMOR");
pub const MAGIC_BITMAP: u32 = magic(b"VMBM");
pub const MAGIC_INODE: u32 = magic(b"VMIN");
pub const MAGIC_DIR: u32 = magic(b"VMDR");
pub const MAGIC_POINTER: u32 = magic(b"VMPB");
pub const MAGIC_PAXOS_LEADER: u32 = magic(b"VMPL");
pub const MAGIC_PAXOS_BALLOT: u32 = magic(b"VMPD");

pub fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}
pub fn align_down(v: u64, a: u64) -> u64 {
    v / a * a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_little_endian() {
        let mut b = [0u8; 32];
        put_u16(&mut b, 0, 0x0102);
        put_u32(&mut b, 2, 0x0304_0506);
        put_u64(&mut b, 6, 0x0708_090a_0b0c_0d0e);
        put_i64(&mut b, 14, -2);
        assert_eq!(&b[..6], &[0x02, 0x01, 0x06, 0x05, 0x04, 0x03]);
        assert_eq!(b[6], 0x0e);
        assert_eq!(b[13], 0x07);
        assert_eq!(get_u16(&b, 0), 0x0102);
        assert_eq!(get_u32(&b, 2), 0x0304_0506);
        assert_eq!(get_u64(&b, 6), 0x0708_090a_0b0c_0d0e);
        assert_eq!(get_i64(&b, 14), -2);
    }

    #[test]
    fn strings_are_padded_and_truncated() {
        let mut b = [0xffu8; 8];
        put_str(&mut b, 0, 8, "abc");
        assert_eq!(&b, b"abc\0\0\0\0\0");
        assert_eq!(get_str(&b, 0, 8), "abc");
        put_str(&mut b, 0, 4, "abcdef");
        assert_eq!(get_str(&b, 0, 4), "abcd");
    }

    #[test]
    fn seal_and_verify_detect_every_fault() {
        let mut u = zero_unit();
        assert_eq!(
            verify(&u[..], MAGIC_INODE, 8192, UNIT),
            Err(UnitFault::Blank)
        );
        u[100] = 7;
        seal(&mut u[..], MAGIC_INODE, 8192, UNIT);
        assert_eq!(verify(&u[..], MAGIC_INODE, 8192, UNIT), Ok(()));
        assert_eq!(
            verify(&u[..], MAGIC_INODE, 4096, UNIT),
            Err(UnitFault::Misplaced { recorded: 8192 })
        );
        assert!(matches!(
            verify(&u[..], MAGIC_DIR, 8192, UNIT),
            Err(UnitFault::BadMagic { .. })
        ));
        u[4000] ^= 0x10;
        assert_eq!(
            verify(&u[..], MAGIC_INODE, 8192, UNIT),
            Err(UnitFault::BadChecksum)
        );
        // A record sealed over 512 bytes ignores the rest of the unit.
        let mut r = zero_unit();
        seal(&mut r[..], MAGIC_HEARTBEAT, 0, RECORD);
        r[1000] = 1;
        assert_eq!(verify(&r[..], MAGIC_HEARTBEAT, 0, RECORD), Ok(()));
    }
}
