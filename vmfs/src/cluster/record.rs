//! Lock records: one sector next to every inode and every resource cluster.
//!
//! A record says who holds the object and how: free, exclusive, read-only shared or
//! multi-writer, the holders as (slot, generation) pairs (a bitmap of slots plus each
//! holder's generation), whether the holders keep the object open (file handles, held for a
//! long time) or are in the middle of a metadata update (released within a commit period),
//! and a version bumped by every change. A holder whose incarnation is gone (its slot was
//! recovered or released, or now carries another generation) no longer counts: the next
//! writer of the record drops it. That is the whole of lock breaking; it is safe because a
//! slot is only released or recovered after its journal is replayed.

use serde::Serialize;
use uuid::Uuid;

use crate::codec::*;

const OFF_MODE: usize = 16;
const OFF_FLAGS: usize = 17;
const OFF_VERSION: usize = 24;
const OFF_HOLDERS: usize = 32;
const OFF_OWNER_SLOT: usize = 40;
const OFF_OWNER_UUID: usize = 48;
const OFF_TIME: usize = 64;
const OFF_OBJECT: usize = 72;
const OFF_GENERATIONS: usize = 128;
/// Holders a record can name: one bit and one generation per heartbeat slot.
pub const MAX_HOLDERS: u32 = 64;

const FLAG_OPEN: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockMode {
    /// One holder, reading and writing (and the mode of every metadata update).
    Exclusive,
    /// Many holders, nobody writes.
    SharedRead,
    /// Many holders that all write data (clustered applications that coordinate themselves).
    MultiWriter,
}

impl LockMode {
    fn code(self) -> u8 {
        match self {
            LockMode::Exclusive => 1,
            LockMode::SharedRead => 2,
            LockMode::MultiWriter => 3,
        }
    }

    fn from_code(c: u8) -> Option<Option<LockMode>> {
        match c {
            0 => Some(None),
            1 => Some(Some(LockMode::Exclusive)),
            2 => Some(Some(LockMode::SharedRead)),
            3 => Some(Some(LockMode::MultiWriter)),
            _ => None,
        }
    }

    /// True when a second host may hold the object in `self` while one holds it in `other`.
    pub fn shares_with(self, other: LockMode) -> bool {
        self == other && self != LockMode::Exclusive
    }
}

impl std::fmt::Display for LockMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockMode::Exclusive => "exclusive",
            LockMode::SharedRead => "read-only shared",
            LockMode::MultiWriter => "multi-writer",
        })
    }
}

/// A holder as a record names it. Generations are stored in 32 bits: two incarnations of
/// one slot 2^32 takes apart are never both alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Holder {
    pub slot: u32,
    pub generation: u32,
}

impl Holder {
    pub fn new(slot: u32, generation: u64) -> Holder {
        Holder {
            slot,
            generation: generation as u32,
        }
    }

    pub fn is(&self, slot: u32, generation: u64) -> bool {
        self.slot == slot && self.generation == generation as u32
    }
}

/// The decoded record. A never-written record is free with version 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockRecord {
    pub mode: Option<LockMode>,
    /// Held by open files rather than by a metadata update.
    pub open: bool,
    pub version: u64,
    pub holders: Vec<Holder>,
    /// Host UUID of the exclusive owner (informational).
    pub owner_uuid: Uuid,
    /// The writer's wall clock (informational).
    pub time_ns: i64,
    /// What the record guards (see [`super::LockTarget::code`]).
    pub object: u64,
}

impl LockRecord {
    pub fn free(object: u64) -> LockRecord {
        LockRecord {
            mode: None,
            open: false,
            version: 0,
            holders: Vec::new(),
            owner_uuid: Uuid::nil(),
            time_ns: 0,
            object,
        }
    }

    pub fn holds(&self, slot: u32, generation: u64) -> bool {
        self.holders.iter().any(|h| h.is(slot, generation))
    }

    pub fn encode(&self, location: u64) -> Box<Unit> {
        let mut u = zero_unit();
        put_u8(&mut u[..], OFF_MODE, self.mode.map_or(0, LockMode::code));
        put_u8(&mut u[..], OFF_FLAGS, if self.open { FLAG_OPEN } else { 0 });
        put_u64(&mut u[..], OFF_VERSION, self.version);
        let mut bits = 0u64;
        for h in &self.holders {
            bits |= 1 << h.slot;
            put_u32(
                &mut u[..],
                OFF_GENERATIONS + h.slot as usize * 4,
                h.generation,
            );
        }
        put_u64(&mut u[..], OFF_HOLDERS, bits);
        let owner = match (self.mode, self.holders.first()) {
            (Some(LockMode::Exclusive), Some(h)) => h.slot,
            _ => u32::MAX,
        };
        put_u32(&mut u[..], OFF_OWNER_SLOT, owner);
        u[OFF_OWNER_UUID..OFF_OWNER_UUID + 16].copy_from_slice(self.owner_uuid.as_bytes());
        put_i64(&mut u[..], OFF_TIME, self.time_ns);
        put_u64(&mut u[..], OFF_OBJECT, self.object);
        seal(&mut u[..], MAGIC_LOCK, location, RECORD);
        u
    }

    /// Decodes the record at `location` guarding `object`; `u` needs only its first sector.
    pub fn decode(u: &[u8], location: u64, object: u64) -> Result<LockRecord, String> {
        match verify(u, MAGIC_LOCK, location, RECORD) {
            Err(UnitFault::Blank) => return Ok(LockRecord::free(object)),
            Err(fault) => return Err(fault.to_string()),
            Ok(()) => {}
        }
        let mode = LockMode::from_code(get_u8(u, OFF_MODE))
            .ok_or_else(|| format!("unknown lock mode {}", get_u8(u, OFF_MODE)))?;
        let bits = get_u64(u, OFF_HOLDERS);
        let holders: Vec<Holder> = (0..MAX_HOLDERS)
            .filter(|s| bits & (1 << s) != 0)
            .map(|slot| Holder {
                slot,
                generation: get_u32(u, OFF_GENERATIONS + slot as usize * 4),
            })
            .collect();
        let recorded = get_u64(u, OFF_OBJECT);
        if recorded != object {
            return Err(format!(
                "record guards object {recorded:#x}, expected {object:#x}"
            ));
        }
        match (mode, holders.len()) {
            (None, 0) => {}
            (None, n) => return Err(format!("free but names {n} holder(s)")),
            (Some(_), 0) => return Err("held but names no holder".into()),
            (Some(LockMode::Exclusive), n) if n > 1 => {
                return Err(format!("exclusive but names {n} holders"));
            }
            _ => {}
        }
        let mut owner = [0u8; 16];
        owner.copy_from_slice(&u[OFF_OWNER_UUID..OFF_OWNER_UUID + 16]);
        Ok(LockRecord {
            mode,
            open: get_u8(u, OFF_FLAGS) & FLAG_OPEN != 0,
            version: get_u64(u, OFF_VERSION),
            holders,
            owner_uuid: Uuid::from_bytes(owner),
            time_ns: get_i64(u, OFF_TIME),
            object,
        })
    }
}

/// What a host knows about another holder's incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Gone: its slot was released or recovered, or belongs to another generation now.
    Stale,
    /// Renewing its heartbeat.
    Alive,
    /// Not renewed for the dead-host timeout: recover its slot, then the lock is stale.
    Dead,
    /// Not watched long enough to tell yet.
    Unknown,
    /// Its slot is being recovered by the host in this slot.
    Recovering { by: u32 },
}

/// The holder standing in the way of a lock change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    pub holder: Holder,
    pub verdict: Verdict,
    /// The mode the object is held in.
    pub mode: LockMode,
    /// The holder keeps the object open (waiting is pointless while it is alive).
    pub open: bool,
}

/// What a host wants its own entry in a record to become: held in a mode (`open`: by file
/// handles), or released (`None`).
pub type Want = Option<(LockMode, bool)>;

/// Computes the record after `me` gets `want`, dropping stale holders. `Ok(None)` when
/// nothing changes; `Err` names the holder in the way (the most decisive one: a live holder
/// over one not yet known, over one being recovered, over a dead one).
pub fn transition(
    cur: &LockRecord,
    me: Holder,
    owner_uuid: Uuid,
    want: Want,
    verdict: &mut dyn FnMut(Holder) -> Verdict,
) -> Result<Option<LockRecord>, Conflict> {
    let mut others = Vec::new();
    let mut dropped = false;
    for h in &cur.holders {
        if h.slot == me.slot {
            // Ours, or an earlier incarnation of our slot (which was released or recovered
            // before we could take the slot).
            dropped |= h.generation != me.generation;
            continue;
        }
        match verdict(*h) {
            Verdict::Stale => dropped = true,
            v => others.push((*h, v)),
        }
    }
    let mine = cur.holders.contains(&me);
    let mut next = cur.clone();
    match want {
        None => {
            if !mine && !dropped {
                return Ok(None);
            }
            next.holders = others.iter().map(|(h, _)| *h).collect();
            if next.holders.is_empty() {
                next.mode = None;
                next.open = false;
            }
        }
        Some((mode, open)) => {
            let held_as = cur.mode.unwrap_or(mode);
            if !others.is_empty() && !mode.shares_with(held_as) {
                let rank = |v: Verdict| match v {
                    Verdict::Alive => 0,
                    Verdict::Unknown => 1,
                    Verdict::Recovering { .. } => 2,
                    Verdict::Dead => 3,
                    Verdict::Stale => 4,
                };
                let (holder, verdict) = others
                    .iter()
                    .copied()
                    .min_by_key(|(_, v)| rank(*v))
                    .unwrap_or((me, Verdict::Unknown));
                return Err(Conflict {
                    holder,
                    verdict,
                    mode: held_as,
                    open: cur.open || held_as != LockMode::Exclusive,
                });
            }
            let open = open || mode != LockMode::Exclusive;
            if mine && !dropped && cur.mode == Some(mode) && cur.open == open {
                return Ok(None);
            }
            next.holders = others.iter().map(|(h, _)| *h).collect();
            next.holders.push(me);
            next.holders.sort_by_key(|h| h.slot);
            next.mode = Some(mode);
            next.open = open;
            if mode == LockMode::Exclusive {
                next.owner_uuid = owner_uuid;
            }
        }
    }
    next.version = cur.version.wrapping_add(1);
    next.time_ns = crate::state::now_ns();
    Ok(Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Holder = Holder {
        slot: 3,
        generation: 7,
    };
    const OTHER: Holder = Holder {
        slot: 5,
        generation: 2,
    };

    fn apply(cur: &LockRecord, want: Want, v: Verdict) -> Result<LockRecord, Conflict> {
        transition(cur, ME, Uuid::nil(), want, &mut |_| v).map(|n| n.unwrap_or(cur.clone()))
    }

    #[test]
    fn record_round_trips_and_checks_its_object() {
        let r = apply(
            &LockRecord::free(42),
            Some((LockMode::SharedRead, true)),
            Verdict::Alive,
        )
        .unwrap();
        let u = r.encode(8192);
        assert_eq!(LockRecord::decode(&u[..RECORD], 8192, 42).unwrap(), r);
        assert!(LockRecord::decode(&u[..], 8192, 43).is_err());
        assert!(LockRecord::decode(&u[..], 4096, 42).is_err());
        assert_eq!(
            LockRecord::decode(&zero_unit()[..], 0, 9).unwrap(),
            LockRecord::free(9)
        );
    }

    #[test]
    fn exclusive_excludes_and_shared_modes_share() {
        let mut held = LockRecord::free(1);
        held.mode = Some(LockMode::Exclusive);
        held.holders = vec![OTHER];
        let c = apply(&held, Some((LockMode::SharedRead, true)), Verdict::Alive).unwrap_err();
        assert_eq!(c.holder, OTHER);
        assert_eq!(c.mode, LockMode::Exclusive);
        assert!(!c.open);

        held.mode = Some(LockMode::MultiWriter);
        held.open = true;
        let both = apply(&held, Some((LockMode::MultiWriter, true)), Verdict::Alive).unwrap();
        assert_eq!(both.holders, vec![ME, OTHER]);
        assert_eq!(both.version, held.version + 1);
        let c = apply(&held, Some((LockMode::SharedRead, true)), Verdict::Alive).unwrap_err();
        assert!(c.open);
        // Releasing leaves the other holder.
        let left = apply(&both, None, Verdict::Alive).unwrap();
        assert_eq!(left.holders, vec![OTHER]);
        assert_eq!(left.mode, Some(LockMode::MultiWriter));
    }

    #[test]
    fn stale_holders_are_dropped_and_dead_ones_reported() {
        let mut held = LockRecord::free(1);
        held.mode = Some(LockMode::Exclusive);
        held.holders = vec![OTHER];
        let taken = apply(&held, Some((LockMode::Exclusive, false)), Verdict::Stale).unwrap();
        assert_eq!(taken.holders, vec![ME]);
        let c = apply(&held, Some((LockMode::Exclusive, false)), Verdict::Dead).unwrap_err();
        assert_eq!(c.verdict, Verdict::Dead);
        // An earlier incarnation of our own slot is gone by construction.
        held.holders = vec![Holder {
            slot: ME.slot,
            generation: 6,
        }];
        let mine = apply(&held, Some((LockMode::Exclusive, false)), Verdict::Alive).unwrap();
        assert_eq!(mine.holders, vec![ME]);
    }

    #[test]
    fn unchanged_requests_write_nothing() {
        let r = apply(
            &LockRecord::free(1),
            Some((LockMode::Exclusive, false)),
            Verdict::Alive,
        )
        .unwrap();
        let again = transition(
            &r,
            ME,
            Uuid::nil(),
            Some((LockMode::Exclusive, false)),
            &mut |_| Verdict::Alive,
        )
        .unwrap();
        assert!(again.is_none());
        let free = LockRecord::free(1);
        assert!(
            transition(&free, ME, Uuid::nil(), None, &mut |_| Verdict::Alive)
                .unwrap()
                .is_none()
        );
    }
}
