//! Disk Paxos leases over the reserved lease areas (Gafni & Lamport; as in sanlock).
//!
//! On a LUN without compare-and-write, a lock record is changed by read-modify-write while
//! holding the Disk Paxos lease of the area its offset hashes to. An area is a leader record
//! (lease version `lver`, owner) followed by one ballot record ("dblock") per host slot, each
//! written only by its slot's host. Taking the lease is one Paxos instance, numbered
//! `lver + 1`: write our dblock with a ballot number higher than any seen, read every
//! dblock, abort if a higher ballot exists, else propose the value of the highest accepted
//! ballot (or ourselves); write it as accepted, read every dblock again, abort on a higher
//! ballot; otherwise the value is chosen and written to the leader. Only sector-atomic
//! reads and writes are needed. Areas are held for one record update, a few I/Os.

use lun::Lun;

use crate::codec::*;
use crate::error::{Error, Result};

/// A lease owner: (slot, generation).
pub(crate) type Owner = (u32, u64);

const L_LVER: usize = 16;
const L_OWNER: usize = 24;
const L_AREA: usize = 28;
const L_GENERATION: usize = 32;
const L_TIME: usize = 40;

const D_LVER: usize = 16;
const D_MBAL: usize = 24;
const D_BAL: usize = 32;
const D_INP_SLOT: usize = 40;
const D_INP_GENERATION: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leader {
    pub lver: u64,
    pub owner: Option<Owner>,
    pub time_ns: i64,
}

impl Leader {
    fn encode(&self, area: u32, location: u64) -> Box<Unit> {
        let mut u = zero_unit();
        put_u64(&mut u[..], L_LVER, self.lver);
        let (slot, generation) = self.owner.unwrap_or((u32::MAX, 0));
        put_u32(&mut u[..], L_OWNER, slot);
        put_u32(&mut u[..], L_AREA, area);
        put_u64(&mut u[..], L_GENERATION, generation);
        put_i64(&mut u[..], L_TIME, self.time_ns);
        seal(&mut u[..], MAGIC_PAXOS_LEADER, location, RECORD);
        u
    }

    fn decode(u: &[u8], area: u32, location: u64) -> std::result::Result<Leader, String> {
        match verify(u, MAGIC_PAXOS_LEADER, location, RECORD) {
            Err(UnitFault::Blank) => {
                return Ok(Leader {
                    lver: 0,
                    owner: None,
                    time_ns: 0,
                });
            }
            Err(fault) => return Err(fault.to_string()),
            Ok(()) => {}
        }
        if get_u32(u, L_AREA) != area {
            return Err(format!("leader of area {}", get_u32(u, L_AREA)));
        }
        let slot = get_u32(u, L_OWNER);
        Ok(Leader {
            lver: get_u64(u, L_LVER),
            owner: (slot != u32::MAX).then(|| (slot, get_u64(u, L_GENERATION))),
            time_ns: get_i64(u, L_TIME),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Dblock {
    pub lver: u64,
    pub mbal: u64,
    pub bal: u64,
    pub inp: Option<Owner>,
}

impl Dblock {
    fn encode(&self, location: u64) -> Box<Unit> {
        let mut u = zero_unit();
        put_u64(&mut u[..], D_LVER, self.lver);
        put_u64(&mut u[..], D_MBAL, self.mbal);
        put_u64(&mut u[..], D_BAL, self.bal);
        let (slot, generation) = self.inp.unwrap_or((u32::MAX, 0));
        put_u32(&mut u[..], D_INP_SLOT, slot);
        put_u64(&mut u[..], D_INP_GENERATION, generation);
        seal(&mut u[..], MAGIC_PAXOS_BALLOT, location, RECORD);
        u
    }

    fn decode(u: &[u8], location: u64) -> std::result::Result<Dblock, String> {
        match verify(u, MAGIC_PAXOS_BALLOT, location, RECORD) {
            Err(UnitFault::Blank) => return Ok(Dblock::default()),
            Err(fault) => return Err(fault.to_string()),
            Ok(()) => {}
        }
        let slot = get_u32(u, D_INP_SLOT);
        Ok(Dblock {
            lver: get_u64(u, D_LVER),
            mbal: get_u64(u, D_MBAL),
            bal: get_u64(u, D_BAL),
            inp: (slot != u32::MAX).then(|| (slot, get_u64(u, D_INP_GENERATION))),
        })
    }
}

/// How a ballot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ballot {
    /// This value won instance `lver`.
    Chosen(Owner),
    /// A higher ballot number exists; retry above it.
    Aborted { max_mbal: u64 },
    /// Someone already finished a later instance: re-read the leader.
    Outdated,
}

/// One lease area on a LUN.
pub(crate) struct Area<'a> {
    pub lun: &'a dyn Lun,
    pub index: u32,
    pub offset: u64,
    pub slots: u32,
}

impl Area<'_> {
    fn leader_offset(&self) -> u64 {
        self.offset
    }

    fn dblock_offset(&self, slot: u32) -> u64 {
        self.offset + (1 + u64::from(slot)) * UNIT_U64
    }

    fn corrupt(&self, object: String, offset: u64, reason: String) -> Error {
        Error::Corrupt {
            lun: self.lun.name().to_string(),
            object,
            offset,
            reason,
        }
    }

    pub fn read_leader(&self) -> Result<Leader> {
        let off = self.leader_offset();
        let buf = read_intact(self.lun, off, MAGIC_PAXOS_LEADER)?;
        Leader::decode(&buf, self.index, off).map_err(|why| {
            self.corrupt(
                format!("Disk Paxos leader of lease area {}", self.index),
                off,
                why,
            )
        })
    }

    pub fn write_leader(&self, leader: &Leader) -> Result<()> {
        let off = self.leader_offset();
        write_record(self.lun, &leader.encode(self.index, off), off)
    }

    fn write_dblock(&self, slot: u32, d: &Dblock) -> Result<()> {
        let off = self.dblock_offset(slot);
        write_record(self.lun, &d.encode(off), off)
    }

    /// Reads the record sector of every dblock in one batch (the rest of their units is
    /// never written, so reading whole units would move 64 times the data).
    fn read_dblocks(&self) -> Result<Vec<Dblock>> {
        let ss = (self.lun.sector_size() as usize).max(RECORD);
        let mut bufs = vec![vec![0u8; ss]; self.slots as usize];
        for attempt in 0..=TORN_RETRIES {
            let mut batch: Vec<lun::IoRequest<'_>> = bufs
                .iter_mut()
                .enumerate()
                .map(|(s, buf)| lun::IoRequest::Read {
                    buf,
                    offset: self.dblock_offset(s as u32),
                })
                .collect();
            self.lun.submit(&mut batch)?;
            drop(batch);
            let torn = bufs
                .iter()
                .enumerate()
                .any(|(s, buf)| !intact(buf, MAGIC_PAXOS_BALLOT, self.dblock_offset(s as u32)));
            if !torn {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(
                50 * u64::from(attempt + 1),
            ));
        }
        bufs.iter()
            .enumerate()
            .map(|(s, buf)| {
                let off = self.dblock_offset(s as u32);
                Dblock::decode(buf, off).map_err(|why| {
                    self.corrupt(
                        format!("Disk Paxos ballot of slot {s} in lease area {}", self.index),
                        off,
                        why,
                    )
                })
            })
            .collect()
    }

    /// Runs both phases of instance `lver` with ballot number `mbal` for `me`.
    pub fn ballot(&self, me: Owner, lver: u64, mbal: u64) -> Result<Ballot> {
        let mut mine = Dblock {
            lver,
            mbal,
            bal: 0,
            inp: None,
        };
        self.write_dblock(me.0, &mine)?;
        let mut best: Option<Dblock> = None;
        if let Some(outcome) = self.check(me.0, &mine, &mut best)? {
            return Ok(outcome);
        }
        mine.inp = Some(best.and_then(|b| b.inp).unwrap_or(me));
        mine.bal = mbal;
        self.write_dblock(me.0, &mine)?;
        if let Some(outcome) = self.check(me.0, &mine, &mut None)? {
            return Ok(outcome);
        }
        Ok(Ballot::Chosen(mine.inp.unwrap_or(me)))
    }

    /// True when some host accepted `value` in instance `lver`.
    pub fn accepted(&self, lver: u64, value: Owner) -> Result<bool> {
        Ok(self
            .read_dblocks()?
            .iter()
            .any(|d| d.lver == lver && d.bal > 0 && d.inp == Some(value)))
    }

    /// The highest ballot number used in instance `lver`.
    pub fn max_mbal(&self, lver: u64) -> Result<u64> {
        Ok(self
            .read_dblocks()?
            .iter()
            .filter(|d| d.lver == lver)
            .map(|d| d.mbal)
            .max()
            .unwrap_or(0))
    }

    /// Reads every dblock: aborts on a higher ballot or a later instance; records the
    /// highest accepted ballot of this instance in `best`.
    fn check(&self, me: u32, mine: &Dblock, best: &mut Option<Dblock>) -> Result<Option<Ballot>> {
        let all = self.read_dblocks()?;
        let mut max_mbal = 0;
        let mut abort = false;
        for (q, d) in all.iter().enumerate() {
            if q as u32 == me {
                continue;
            }
            if d.lver > mine.lver {
                return Ok(Some(Ballot::Outdated));
            }
            if d.lver < mine.lver {
                continue;
            }
            max_mbal = max_mbal.max(d.mbal);
            abort |= d.mbal > mine.mbal;
            if d.bal > 0 && d.inp.is_some() && best.is_none_or(|b| d.bal > b.bal) {
                *best = Some(*d);
            }
        }
        Ok(abort.then_some(Ballot::Aborted { max_mbal }))
    }
}

/// The smallest ballot number above `above` that belongs to `slot` (ballot numbers are
/// unique per host: `round × slots + slot + 1`).
pub(crate) fn next_mbal(above: u64, slot: u32, slots: u32) -> u64 {
    let n = u64::from(slots);
    (above / n + 1) * n + u64::from(slot) + 1
}

/// Reads the first sector of a record unit.
pub(crate) fn read_record(lun: &dyn Lun, off: u64) -> Result<Vec<u8>> {
    let ss = (lun.sector_size() as usize).max(RECORD);
    let mut buf = vec![0u8; ss];
    lun.read_at(&mut buf, off)?;
    Ok(buf)
}

/// Reads a record sector of type `magic`, rereading while it does not verify: on a LUN
/// served from a page cache (a file), a read racing another host's write of the sector can
/// return part of each. A record that stays damaged is returned as read, for the caller to
/// report.
pub(crate) fn read_intact(lun: &dyn Lun, off: u64, magic: u32) -> Result<Vec<u8>> {
    let mut attempt = 0;
    loop {
        let buf = read_record(lun, off)?;
        if intact(&buf, magic, off) || attempt >= TORN_RETRIES {
            return Ok(buf);
        }
        attempt += 1;
        std::thread::sleep(std::time::Duration::from_micros(50 * u64::from(attempt)));
    }
}

const TORN_RETRIES: u32 = 8;

fn intact(buf: &[u8], magic: u32, off: u64) -> bool {
    matches!(
        verify(buf, magic, off, RECORD),
        Ok(()) | Err(UnitFault::Blank)
    )
}

/// A damaged record of a lease area: (object, LUN offset, problem).
pub(crate) type Damage = (String, u64, String);

/// Checks the leader and every ballot of lease area `index` (fsck). With `repair` (no host
/// uses the datastore, so no instance is in flight) damaged records are rewritten: a leader
/// as free at the highest lease version any intact record of the area shows, so the next
/// instance still numbers above every earlier one; a ballot as blank.
pub(crate) fn check_area(
    lun: &dyn Lun,
    sb: &crate::layout::Superblock,
    index: u32,
    repair: bool,
) -> Result<Vec<Damage>> {
    let area = Area {
        lun,
        index,
        offset: sb.lease_offset + u64::from(index) * sb.lease_area_len(),
        slots: sb.host_slots,
    };
    let mut buf = vec![0u8; sb.lease_area_len() as usize];
    lun.read_at(&mut buf, area.offset)?;
    // A record that fails to verify with its own magic (or none) may be one a host is
    // writing: read it again as hosts do before calling it damaged.
    let settled = |at: usize, magic: u32| -> Result<Vec<u8>> {
        let rec = &buf[at..at + RECORD];
        if !intact(rec, magic, area.offset + at as u64) && may_be_torn(rec, magic) {
            return read_intact(lun, area.offset + at as u64, magic);
        }
        Ok(rec.to_vec())
    };
    let mut damaged = Vec::new();
    let mut lver = 0;
    let leader_off = area.leader_offset();
    let leader_bad = match Leader::decode(&settled(0, MAGIC_PAXOS_LEADER)?, index, leader_off) {
        Ok(l) => {
            lver = l.lver;
            false
        }
        Err(why) => {
            damaged.push((
                format!("Disk Paxos leader of lease area {index}"),
                leader_off,
                why,
            ));
            true
        }
    };
    let mut bad_slots = Vec::new();
    for slot in 0..sb.host_slots {
        let off = area.dblock_offset(slot);
        let at = (off - area.offset) as usize;
        match Dblock::decode(&settled(at, MAGIC_PAXOS_BALLOT)?, off) {
            Ok(d) => lver = lver.max(d.lver),
            Err(why) => {
                damaged.push((
                    format!("Disk Paxos ballot of slot {slot} in lease area {index}"),
                    off,
                    why,
                ));
                bad_slots.push(slot);
            }
        }
    }
    if repair {
        for slot in bad_slots {
            area.write_dblock(slot, &Dblock::default())?;
        }
        if leader_bad {
            area.write_leader(&Leader {
                lver,
                owner: None,
                time_ns: 0,
            })?;
        }
    }
    Ok(damaged)
}

/// Writes the first sector of a record unit: the rest of the unit is never touched.
pub(crate) fn write_record(lun: &dyn Lun, unit: &Unit, off: u64) -> Result<()> {
    let ss = (lun.sector_size() as usize).max(RECORD);
    lun.write_at(&unit[..ss], off)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn area_lun() -> Arc<dyn Lun> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paxos");
        let lun = lun::open(
            path.to_str().unwrap(),
            &lun::OpenOptions {
                create_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        std::mem::forget(dir);
        lun
    }

    #[test]
    fn a_lone_ballot_chooses_its_own_value_and_a_later_one_adopts_it() {
        let lun = area_lun();
        let area = Area {
            lun: &*lun,
            index: 0,
            offset: 0,
            slots: 8,
        };
        assert_eq!(area.read_leader().unwrap().owner, None);
        let me = (2, 5);
        let mbal = next_mbal(0, 2, 8);
        assert_eq!(area.ballot(me, 1, mbal).unwrap(), Ballot::Chosen(me));
        // A second proposer of the same instance, with a higher ballot, must adopt the
        // value already accepted (Paxos safety), not its own.
        let other = (6, 1);
        let higher = next_mbal(mbal, 6, 8);
        assert_eq!(area.ballot(other, 1, higher).unwrap(), Ballot::Chosen(me));
        // A proposer with a lower ballot aborts.
        assert!(matches!(
            area.ballot((1, 1), 1, next_mbal(0, 1, 8)).unwrap(),
            Ballot::Aborted { .. }
        ));
        // A proposer of an older instance learns it is outdated.
        assert_eq!(area.ballot((3, 1), 0, 100).unwrap(), Ballot::Outdated);
        area.write_leader(&Leader {
            lver: 1,
            owner: Some(me),
            time_ns: 0,
        })
        .unwrap();
        assert_eq!(area.read_leader().unwrap().owner, Some(me));
    }

    #[test]
    fn ballot_numbers_are_unique_per_slot() {
        assert_eq!(next_mbal(0, 0, 64), 65);
        assert_eq!(next_mbal(65, 3, 64), 132);
        assert!(next_mbal(132, 3, 64) > 132);
        assert_ne!(next_mbal(100, 1, 64), next_mbal(100, 2, 64));
    }
}
