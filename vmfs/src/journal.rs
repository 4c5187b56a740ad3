//! Per-host physical redo journal.
//!
//! A journal area (one per host slot) is: unit 0 the header (checkpointed sequence number),
//! unit 1 the host's orphan list, then transactions written back to back from unit 2. A
//! transaction is a descriptor unit (sequence number, target LUN offsets, crc over the
//! descriptor and every image) followed by full new images of the 4 KiB metadata units it
//! changes, written with one LUN write. It is committed once a flush returns; only then are
//! the images written in place. Replay applies, in sequence order, every transaction after the
//! checkpoint whose crc holds, and stops at the first gap: images are whole units, so replay is
//! idempotent and anyone (the owner at remount, or another host) may do it.

use uuid::Uuid;

use crate::codec::*;

pub const ORPHAN_UNIT: u64 = 1;
pub const TX_START: u64 = 2;
/// Images per transaction, bounded by the descriptor's address table.
pub const MAX_TX_UNITS: usize = 500;

const H_SLOT: usize = 16;
const H_SIZE: usize = 24;
const H_CHECKPOINT: usize = 32;
const H_HOST: usize = 40;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub slot: u32,
    pub size: u64,
    pub checkpoint_seq: u64,
    /// The host that last checkpointed this journal.
    pub host: Uuid,
}

impl Header {
    pub fn encode(&self, location: u64) -> Box<Unit> {
        let mut u = zero_unit();
        put_u32(&mut u[..], H_SLOT, self.slot);
        put_u64(&mut u[..], H_SIZE, self.size);
        put_u64(&mut u[..], H_CHECKPOINT, self.checkpoint_seq);
        u[H_HOST..H_HOST + 16].copy_from_slice(self.host.as_bytes());
        seal(&mut u[..], MAGIC_JOURNAL, location, RECORD);
        u
    }

    pub fn decode(u: &[u8], location: u64, slot: u32, size: u64) -> Result<Header, String> {
        verify(u, MAGIC_JOURNAL, location, RECORD).map_err(|f| f.to_string())?;
        let mut host = [0u8; 16];
        host.copy_from_slice(&u[H_HOST..H_HOST + 16]);
        let h = Header {
            slot: get_u32(u, H_SLOT),
            size: get_u64(u, H_SIZE),
            checkpoint_seq: get_u64(u, H_CHECKPOINT),
            host: Uuid::from_bytes(host),
        };
        if h.slot != slot || h.size != size {
            return Err(format!(
                "header describes slot {} of {} bytes",
                h.slot, h.size
            ));
        }
        Ok(h)
    }
}

const T_SEQ: usize = 16;
const T_COUNT: usize = 24;
const T_OFFSETS: usize = 32;

/// The bytes of one transaction: descriptor + images, ready for a single write.
pub fn encode_tx(seq: u64, location: u64, images: &[(u64, &Unit)]) -> Vec<u8> {
    debug_assert!(images.len() <= MAX_TX_UNITS);
    let mut buf = vec![0u8; (1 + images.len()) * UNIT];
    let (desc, rest) = buf.split_at_mut(UNIT);
    put_u32(desc, OFF_MAGIC, MAGIC_TXN);
    put_u64(desc, OFF_LOCATION, location);
    put_u64(desc, T_SEQ, seq);
    put_u32(desc, T_COUNT, images.len() as u32);
    for (i, (off, image)) in images.iter().enumerate() {
        put_u64(desc, T_OFFSETS + i * 8, *off);
        rest[i * UNIT..(i + 1) * UNIT].copy_from_slice(&image[..]);
    }
    let crc = tx_crc(desc, rest);
    put_u32(desc, OFF_CRC, crc);
    buf
}

fn tx_crc(desc: &[u8], images: &[u8]) -> u32 {
    crc32c::crc32c_append(checksum(desc, UNIT), images)
}

/// A committed transaction read back from a journal.
#[derive(Debug)]
pub struct Tx {
    pub seq: u64,
    pub images: Vec<(u64, Box<Unit>)>,
}

/// Reads the committed transactions after `checkpoint_seq` out of a journal area image
/// (`area` starts at the header). Returns them and the unit index after the last one.
pub fn scan(area: &[u8], area_offset: u64, checkpoint_seq: u64, fs_size: u64) -> (Vec<Tx>, u64) {
    let units = (area.len() / UNIT) as u64;
    let mut cursor = TX_START;
    let mut expect = checkpoint_seq + 1;
    let mut out = Vec::new();
    while cursor < units {
        let at = cursor as usize * UNIT;
        let desc = &area[at..at + UNIT];
        if get_u32(desc, OFF_MAGIC) != MAGIC_TXN
            || get_u64(desc, OFF_LOCATION) != area_offset + cursor * UNIT_U64
            || get_u64(desc, T_SEQ) != expect
        {
            break;
        }
        let n = get_u32(desc, T_COUNT) as usize;
        if n > MAX_TX_UNITS || cursor + 1 + n as u64 > units {
            break;
        }
        let images = &area[at + UNIT..at + UNIT + n * UNIT];
        if tx_crc(desc, images) != get_u32(desc, OFF_CRC) {
            break;
        }
        let mut tx = Tx {
            seq: expect,
            images: Vec::with_capacity(n),
        };
        let mut sane = true;
        for i in 0..n {
            let off = get_u64(desc, T_OFFSETS + i * 8);
            if off % UNIT_U64 != 0 || off + UNIT_U64 > fs_size {
                sane = false;
                break;
            }
            let mut image = zero_unit();
            image.copy_from_slice(&images[i * UNIT..(i + 1) * UNIT]);
            tx.images.push((off, image));
        }
        if !sane {
            break;
        }
        out.push(tx);
        cursor += 1 + n as u64;
        expect += 1;
    }
    (out, cursor)
}

/// Work a host must finish after a crash: free an unlinked inode, finish a truncate, or
/// remove a file that was still being copied in under a temporary name.
/// `generation` (low 32 bits; 0 = not recorded) keeps a recovering host from acting on a
/// descriptor that was freed and reused since the entry was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orphan {
    /// Unlinked (nlink 0) but possibly still open: free data and descriptor.
    Unlinked { ino: u64, generation: u32 },
    /// Shrinking to `size`: free everything mapped past it.
    Truncating {
        ino: u64,
        size: u64,
        generation: u32,
    },
    /// Being written under a temporary name in directory `parent` and renamed over its final
    /// name in the transaction that drops this entry (`Datastore::put`): if the writer dies
    /// first, the temporary name is removed and the file freed.
    Staged {
        ino: u64,
        parent: u64,
        generation: u32,
    },
}

impl Orphan {
    pub fn ino(&self) -> u64 {
        match *self {
            Orphan::Unlinked { ino, .. }
            | Orphan::Truncating { ino, .. }
            | Orphan::Staged { ino, .. } => ino,
        }
    }

    pub fn generation(&self) -> u32 {
        match *self {
            Orphan::Unlinked { generation, .. }
            | Orphan::Truncating { generation, .. }
            | Orphan::Staged { generation, .. } => generation,
        }
    }

    /// True when the entry is about the descriptor generation `generation`.
    pub fn concerns(&self, generation: u64) -> bool {
        self.generation() == 0 || self.generation() == generation as u32
    }
}

const O_COUNT: usize = 16;
const O_ENTRIES: usize = 32;
const O_ENTRY: usize = 24;
pub const MAX_ORPHANS: usize = (UNIT - O_ENTRIES) / O_ENTRY;

pub fn encode_orphans(list: &[Orphan], location: u64) -> Box<Unit> {
    let mut u = zero_unit();
    put_u32(&mut u[..], O_COUNT, list.len() as u32);
    for (i, o) in list.iter().enumerate() {
        let at = O_ENTRIES + i * O_ENTRY;
        put_u64(&mut u[..], at, o.ino());
        put_u32(&mut u[..], at + 12, o.generation());
        match *o {
            Orphan::Unlinked { .. } => put_u32(&mut u[..], at + 8, 0),
            Orphan::Truncating { size, .. } => {
                put_u32(&mut u[..], at + 8, 1);
                put_u64(&mut u[..], at + 16, size);
            }
            Orphan::Staged { parent, .. } => {
                put_u32(&mut u[..], at + 8, 2);
                put_u64(&mut u[..], at + 16, parent);
            }
        }
    }
    seal(&mut u[..], MAGIC_ORPHANS, location, UNIT);
    u
}

/// A never-written orphan unit is an empty list.
pub fn decode_orphans(u: &Unit, location: u64) -> Result<Vec<Orphan>, UnitFault> {
    match verify(&u[..], MAGIC_ORPHANS, location, UNIT) {
        Err(UnitFault::Blank) => return Ok(Vec::new()),
        Err(fault) => return Err(fault),
        Ok(()) => {}
    }
    let n = (get_u32(u, O_COUNT) as usize).min(MAX_ORPHANS);
    Ok((0..n)
        .map(|i| {
            let at = O_ENTRIES + i * O_ENTRY;
            let ino = get_u64(u, at);
            let generation = get_u32(u, at + 12);
            match get_u32(u, at + 8) {
                1 => Orphan::Truncating {
                    ino,
                    size: get_u64(u, at + 16),
                    generation,
                },
                2 => Orphan::Staged {
                    ino,
                    parent: get_u64(u, at + 16),
                    generation,
                },
                _ => Orphan::Unlinked { ino, generation },
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Images = Vec<(u64, Box<Unit>)>;

    fn area_with(txs: &[(u64, Images)], units: usize, base: u64) -> Vec<u8> {
        let mut area = vec![0u8; units * UNIT];
        let mut cursor = TX_START as usize;
        for (seq, images) in txs {
            let refs: Vec<(u64, &Unit)> = images.iter().map(|(o, u)| (*o, &**u)).collect();
            let bytes = encode_tx(*seq, base + (cursor * UNIT) as u64, &refs);
            area[cursor * UNIT..cursor * UNIT + bytes.len()].copy_from_slice(&bytes);
            cursor += 1 + images.len();
        }
        area
    }

    fn image(fill: u8) -> Box<Unit> {
        Box::new([fill; UNIT])
    }

    #[test]
    fn scan_returns_committed_transactions_in_order() {
        let base = 1 << 20;
        let area = area_with(
            &[
                (5, vec![(8192, image(1))]),
                (6, vec![(8192, image(2)), (16384, image(3))]),
            ],
            64,
            base,
        );
        let (txs, end) = scan(&area, base, 4, 1 << 30);
        assert_eq!(txs.len(), 2);
        assert_eq!(txs[1].images[1].0, 16384);
        assert_eq!(txs[1].images[1].1[0], 3);
        assert_eq!(end, TX_START + 2 + 3);
        // Already checkpointed: nothing to replay.
        assert!(scan(&area, base, 6, 1 << 30).0.is_empty());
        // A gap in the sequence stops replay.
        assert!(scan(&area, base, 2, 1 << 30).0.is_empty());
    }

    #[test]
    fn torn_transaction_is_not_replayed() {
        let base = 0;
        let mut area = area_with(
            &[(1, vec![(8192, image(1))]), (2, vec![(8192, image(2))])],
            16,
            base,
        );
        // Tear the second transaction's image.
        let second_image = (TX_START as usize + 3) * UNIT;
        area[second_image + 100] ^= 1;
        let (txs, _) = scan(&area, base, 0, 1 << 30);
        assert_eq!(txs.len(), 1);
        // A target outside the datastore is refused.
        let area = area_with(&[(1, vec![(1 << 40, image(1))])], 16, base);
        assert!(scan(&area, base, 0, 1 << 30).0.is_empty());
    }

    #[test]
    fn header_and_orphans_round_trip() {
        let h = Header {
            slot: 3,
            size: 1 << 20,
            checkpoint_seq: 77,
            host: Uuid::new_v4(),
        };
        let u = h.encode(4096);
        assert_eq!(Header::decode(&u[..], 4096, 3, 1 << 20).unwrap(), h);
        assert!(Header::decode(&u[..], 4096, 4, 1 << 20).is_err());
        let list = vec![
            Orphan::Unlinked {
                ino: 9,
                generation: 3,
            },
            Orphan::Truncating {
                ino: 10,
                size: 4096,
                generation: 1,
            },
            Orphan::Staged {
                ino: 11,
                parent: 2,
                generation: 5,
            },
        ];
        let u = encode_orphans(&list, 8192);
        assert_eq!(decode_orphans(&u, 8192).unwrap(), list);
        assert!(decode_orphans(&zero_unit(), 8192).unwrap().is_empty());
    }
}
