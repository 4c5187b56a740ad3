//! Directory units: 4 KiB, checksummed, entries packed ext2-style with a record length so a
//! live entry never moves (its position is its readdir cookie) and a removed entry's space is
//! merged into its predecessor.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use crate::codec::*;
use crate::inode::Kind;

const OFF_DIR: usize = 16;
const OFF_INDEX: usize = 24;
pub const FIRST: usize = 32;
const ENTRY_HEADER: usize = 12;
pub const NAME_MAX: usize = 255;

fn entry_len(name_len: usize) -> usize {
    (ENTRY_HEADER + name_len).div_ceil(8) * 8
}

/// One record of a unit; `ino == 0` marks free space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub off: usize,
    pub ino: u64,
    pub rec_len: usize,
    pub kind: u8,
    pub name: Vec<u8>,
}

pub fn new_unit(dir: u64, index: u64, location: u64) -> Box<Unit> {
    let mut u = zero_unit();
    put_u64(&mut u[..], OFF_DIR, dir);
    put_u64(&mut u[..], OFF_INDEX, index);
    put_u16(&mut u[..], FIRST + 8, (UNIT - FIRST) as u16);
    seal(&mut u[..], MAGIC_DIR, location, UNIT);
    u
}

/// Parses every record, checking the chain of record lengths and the names.
pub fn records(u: &Unit, dir: u64, index: u64) -> Result<Vec<Record>, String> {
    if get_u64(u, OFF_DIR) != dir || get_u64(u, OFF_INDEX) != index {
        return Err(format!(
            "belongs to directory inode {} unit {}",
            get_u64(u, OFF_DIR),
            get_u64(u, OFF_INDEX)
        ));
    }
    let mut out = Vec::new();
    let mut off = FIRST;
    while off < UNIT {
        if off + ENTRY_HEADER > UNIT {
            return Err(format!("entry at byte {off} runs past the unit"));
        }
        let ino = get_u64(u, off);
        let rec_len = usize::from(get_u16(u, off + 8));
        let name_len = usize::from(get_u8(u, off + 10));
        let kind = get_u8(u, off + 11);
        if rec_len < entry_len(0) || rec_len % 8 != 0 || off + rec_len > UNIT {
            return Err(format!(
                "entry at byte {off} has bad record length {rec_len}"
            ));
        }
        if ino != 0 {
            if entry_len(name_len) > rec_len || name_len == 0 {
                return Err(format!(
                    "entry at byte {off} has bad name length {name_len}"
                ));
            }
            let name = &u[off + ENTRY_HEADER..off + ENTRY_HEADER + name_len];
            check_name_bytes(name).map_err(|why| format!("entry at byte {off}: {why}"))?;
            if Kind::from_code(kind).is_none() {
                return Err(format!("entry at byte {off} has unknown type {kind}"));
            }
            out.push(Record {
                off,
                ino,
                rec_len,
                kind,
                name: name.to_vec(),
            });
        } else {
            out.push(Record {
                off,
                ino,
                rec_len,
                kind,
                name: Vec::new(),
            });
        }
        off += rec_len;
    }
    Ok(out)
}

fn check_name_bytes(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > NAME_MAX {
        return Err("name longer than 255 bytes");
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err("name contains '/' or NUL");
    }
    if name == b"." || name == b".." {
        return Err("name is '.' or '..'");
    }
    Ok(())
}

/// Validates a user-supplied name.
pub fn check_name(name: &OsStr) -> crate::Result<()> {
    let bytes = name.as_bytes();
    if bytes.len() > NAME_MAX {
        return Err(crate::Error::NameTooLong {
            name: name.to_string_lossy().into_owned(),
            len: bytes.len(),
        });
    }
    check_name_bytes(bytes).map_err(|why| crate::Error::Invalid {
        object: format!("name {:?}", name.to_string_lossy()),
        reason: why.to_string(),
    })
}

/// Largest name length that fits somewhere in the unit, as a byte budget.
pub fn slack(records: &[Record]) -> usize {
    records
        .iter()
        .map(|r| {
            if r.ino == 0 {
                r.rec_len
            } else {
                r.rec_len - entry_len(r.name.len())
            }
        })
        .max()
        .unwrap_or(0)
}

/// Inserts a record; returns its byte offset, or None when the unit has no room.
pub fn insert(
    u: &mut Unit,
    records: &[Record],
    name: &[u8],
    ino: u64,
    kind: Kind,
) -> Option<usize> {
    let need = entry_len(name.len());
    for r in records {
        let (at, rec_len) = if r.ino == 0 && r.rec_len >= need {
            (r.off, r.rec_len)
        } else if r.ino != 0 && r.rec_len - entry_len(r.name.len()) >= need {
            let own = entry_len(r.name.len());
            put_u16(&mut u[..], r.off + 8, own as u16);
            (r.off + own, r.rec_len - own)
        } else {
            continue;
        };
        u[at..at + rec_len].fill(0);
        put_u64(&mut u[..], at, ino);
        put_u16(&mut u[..], at + 8, rec_len as u16);
        put_u8(&mut u[..], at + 10, name.len() as u8);
        put_u8(&mut u[..], at + 11, kind.code());
        u[at + ENTRY_HEADER..at + ENTRY_HEADER + name.len()].copy_from_slice(name);
        return Some(at);
    }
    None
}

/// Removes the record at `off`, merging its space into the previous record.
pub fn remove(u: &mut Unit, records: &[Record], off: usize) {
    let Some(pos) = records.iter().position(|r| r.off == off) else {
        return;
    };
    let r = &records[pos];
    if pos == 0 {
        let rec_len = r.rec_len;
        u[off..off + rec_len].fill(0);
        put_u16(&mut u[..], off + 8, rec_len as u16);
    } else {
        let prev = &records[pos - 1];
        put_u16(&mut u[..], prev.off + 8, (prev.rec_len + r.rec_len) as u16);
        u[off..off + r.rec_len].fill(0);
    }
}

/// Changes the inode (and type) a record points to, for rename over an existing name.
pub fn retarget(u: &mut Unit, off: usize, ino: u64, kind: Kind) {
    put_u64(&mut u[..], off, ino);
    put_u8(&mut u[..], off + 11, kind.code());
}

/// Seals a changed unit, or one moved to a new place in the directory's storage (same
/// index, new location).
pub fn reseal(u: &mut Unit, location: u64) {
    seal(&mut u[..], MAGIC_DIR, location, UNIT);
}

/// Where a name lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub ino: u64,
    pub kind: Kind,
    pub unit: u64,
    pub off: usize,
}

/// In-memory index of one directory: name lookups and free space per unit without
/// rescanning, so large directories stay O(1) per operation.
#[derive(Debug, Default, Clone)]
pub struct DirIndex {
    pub names: HashMap<OsString, Slot>,
    /// Largest free byte run per unit.
    pub slack: Vec<usize>,
}

impl DirIndex {
    pub fn unit_with_room(&self, name_len: usize) -> Option<u64> {
        let need = entry_len(name_len);
        self.slack.iter().position(|&s| s >= need).map(|p| p as u64)
    }

    pub fn load_unit(&mut self, index: u64, records: &[Record]) {
        for r in records.iter().filter(|r| r.ino != 0) {
            if let Some(kind) = Kind::from_code(r.kind) {
                self.names.insert(
                    OsStr::from_bytes(&r.name).to_os_string(),
                    Slot {
                        ino: r.ino,
                        kind,
                        unit: index,
                        off: r.off,
                    },
                );
            }
        }
        let i = index as usize;
        if self.slack.len() <= i {
            self.slack.resize(i + 1, 0);
        }
        self.slack[i] = slack(records);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_keep_positions_stable() {
        let mut u = new_unit(5, 0, 4096);
        let mut offs = Vec::new();
        for i in 0..100 {
            let name = format!("file-{i:03}");
            let recs = records(&u, 5, 0).unwrap();
            let off = insert(&mut u, &recs, name.as_bytes(), 100 + i, Kind::File).unwrap();
            offs.push(off);
        }
        reseal(&mut u, 4096);
        assert_eq!(verify(&u[..], MAGIC_DIR, 4096, UNIT), Ok(()));
        let recs = records(&u, 5, 0).unwrap();
        assert_eq!(recs.iter().filter(|r| r.ino != 0).count(), 100);
        // Remove every other entry; the rest keep their offsets.
        for i in (0..100).step_by(2) {
            let recs = records(&u, 5, 0).unwrap();
            remove(&mut u, &recs, offs[i]);
        }
        let recs = records(&u, 5, 0).unwrap();
        let live: Vec<_> = recs.iter().filter(|r| r.ino != 0).collect();
        assert_eq!(live.len(), 50);
        for r in live {
            let i = (r.ino - 100) as usize;
            assert_eq!(r.off, offs[i]);
            assert_eq!(r.name, format!("file-{i:03}").into_bytes());
        }
        // Freed space is reused.
        let off = insert(&mut u, &recs, b"new", 999, Kind::Dir).unwrap();
        assert!(off < offs[99]);
    }

    #[test]
    fn unit_fills_up() {
        let mut u = new_unit(1, 0, 0);
        let name = [b'x'; 255];
        let mut n = 0;
        loop {
            let recs = records(&u, 1, 0).unwrap();
            if insert(&mut u, &recs, &name, 10 + n, Kind::File).is_none() {
                break;
            }
            n += 1;
        }
        assert_eq!(n, (UNIT as u64 - FIRST as u64) / entry_len(255) as u64);
        assert!(slack(&records(&u, 1, 0).unwrap()) < entry_len(255));
    }

    #[test]
    fn corrupt_record_lengths_are_detected() {
        let mut u = new_unit(1, 0, 0);
        put_u16(&mut u[..], FIRST + 8, 12);
        assert!(records(&u, 1, 0).is_err());
        assert!(records(&new_unit(1, 0, 0), 2, 0).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name(OsStr::new("ok.vmdk")).is_ok());
        assert!(check_name(OsStr::new("")).is_err());
        assert!(check_name(OsStr::new(".")).is_err());
        assert!(check_name(OsStr::new("..")).is_err());
        assert!(check_name(OsStr::new("a/b")).is_err());
        assert!(check_name(OsStr::from_bytes(b"a\0b")).is_err());
        assert!(matches!(
            check_name(OsStr::new(&"n".repeat(256))),
            Err(crate::Error::NameTooLong { .. })
        ));
        assert!(check_name(OsStr::new(&"n".repeat(255))).is_ok());
    }
}
