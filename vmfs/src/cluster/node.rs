//! A host joined to a datastore's cluster: its heartbeat slot (host id), the renewal and
//! monitoring thread, its self-fencing lease, and atomic updates of lock records.
//!
//! Two interchangeable protocols change shared records; a datastore uses exactly one, fixed
//! at format time ("ATS-only" or "Disk Paxos", see [`LockProtocol`]), so hosts never mix
//! them:
//!
//! | record | compare-and-write | plain sector reads and writes |
//! | --- | --- | --- |
//! | take a free slot | CAS from the free record | write, wait 2·io_timeout, read back (delta lease) |
//! | renew / release own slot | CAS from our last record (a miscompare fences us) | read, check it is still ours, write |
//! | claim a dead slot for recovery | CAS | read-modify-write under the slot's Disk Paxos area lease |
//! | lock record change | CAS, retried on miscompare | read-modify-write under the record's Disk Paxos area lease |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lun::{CompareAndWrite, Lun};
use serde::Serialize;
use uuid::Uuid;

use super::heartbeat::{self, Heartbeat, Incarnation, SlotState};
use super::lease::{GuardLun, Lease};
use super::monitor::{Monitor, Watch};
use super::paxos::{self, Area, Ballot, Leader, Owner};
use super::record::{Conflict, Holder, LockMode, LockRecord, Verdict, Want, transition};
use super::{LockProtocol, LockTarget, Timing};
use crate::codec::*;
use crate::error::{Error, Result};
use crate::layout::Superblock;

/// Who a host is: a name for people and a UUID that stays the same across its restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uuid: Uuid,
}

/// The host id this node holds: one incarnation of a heartbeat slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostId {
    pub slot: u32,
    pub generation: u64,
    pub nonce: u64,
    pub uuid: Uuid,
    pub name: String,
}

impl HostId {
    pub fn holder(&self) -> Holder {
        Holder::new(self.slot, self.generation)
    }

    fn incarnation(&self) -> Incarnation {
        Incarnation {
            slot: self.slot,
            generation: self.generation,
            nonce: self.nonce,
        }
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (slot {}, generation {})",
            self.name, self.slot, self.generation
        )
    }
}

/// Incarnations joined by this process, so a crashed earlier incarnation of this process (a
/// datastore dropped after a simulated power cut) is told apart from a live one.
static JOINED: Mutex<Vec<(Uuid, u32, u64)>> = Mutex::new(Vec::new());

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn random_u64() -> u64 {
    let (a, b) = Uuid::new_v4().as_u64_pair();
    a ^ b.rotate_left(17)
}

/// A host joined to one datastore. Renews its heartbeat from a background thread until
/// [`Node::leave`]; if renewals stop completing it fences itself.
pub struct Node {
    raw: Arc<dyn Lun>,
    guarded: Arc<dyn Lun>,
    sb: Superblock,
    timing: Timing,
    protocol: LockProtocol,
    me: HostId,
    boot_id: [u8; 16],
    lease: Arc<Lease>,
    /// Our slot's record sector as last written.
    record: Mutex<Vec<u8>>,
    monitor: Mutex<Monitor>,
    /// One per Disk Paxos area: threads of this host take turns (the area's ballot block is
    /// ours alone). True when an acquisition gave up after running ballots: one of them may
    /// have chosen us after all (see `sweep_areas`).
    areas: Vec<Mutex<bool>>,
    stop: Mutex<bool>,
    wake: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
    left: AtomicBool,
    /// The last read of the heartbeat region failed: a cut-off host retries every few tens of
    /// milliseconds, and says so once, not on each try.
    heartbeats_unreadable: AtomicBool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("lun", &self.raw.name())
            .field("host", &self.me)
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl Node {
    /// Joins the datastore on `lun` with the given identity: takes a free heartbeat slot
    /// and starts renewing it.
    pub fn join(lun: Arc<dyn Lun>, who: &Identity) -> Result<Arc<Node>> {
        let (sb, _) = crate::datastore::read_superblock(&*lun)?;
        Node::join_with(lun, &sb, who)
    }

    pub(crate) fn join_with(
        lun: Arc<dyn Lun>,
        sb: &Superblock,
        who: &Identity,
    ) -> Result<Arc<Node>> {
        let protocol = sb.lock_protocol;
        if let Some(reason) = super::lock_safety(protocol, &*lun).refused {
            return Err(Error::Invalid {
                object: lun.name().to_string(),
                reason,
            });
        }
        let timing = sb.timing();
        let nonce = random_u64();
        let boot_id = heartbeat::boot_id();
        let slots = sb.host_slots;
        let ss = lun.sector_size() as usize;
        let mut attempt = 0u32;
        let (hb, issued) = loop {
            let mut region = vec![0u8; slots as usize * UNIT];
            lun.read_at(&mut region, sb.heartbeat_offset)?;
            let mut free = Vec::new();
            let mut preferred = None;
            for slot in 0..slots {
                let at = slot as usize * UNIT;
                match Heartbeat::decode(
                    &region[at..at + RECORD],
                    sb.heartbeat_slot_offset(slot),
                    slot,
                ) {
                    Ok(None) => free.push((slot, 0)),
                    Ok(Some(hb)) if hb.state == SlotState::Free => {
                        if hb.host == who.uuid && preferred.is_none() {
                            preferred = Some((slot, hb.generation));
                        }
                        free.push((slot, hb.generation));
                    }
                    Ok(Some(_)) => {}
                    Err(why) => {
                        tracing::debug!(lun = %lun.name(), slot, error = %why, "heartbeat slot unreadable, skipped")
                    }
                }
            }
            if free.is_empty() {
                return Err(Error::NoHostSlot {
                    lun: lun.name().to_string(),
                    slots,
                });
            }
            // Racing joiners pick different slots most of the time.
            let (slot, generation) = match preferred {
                Some(p) if attempt == 0 => p,
                _ => free[(random_u64() % free.len() as u64) as usize],
            };
            let hb = Heartbeat {
                slot,
                state: SlotState::Live,
                host: who.uuid,
                hostname: who.name.clone(),
                generation: generation + 1,
                counter: 1,
                time_ns: crate::state::now_ns(),
                pid: std::process::id(),
                nonce,
                io_timeout_ms: timing.io_timeout_ms(),
                boot_id,
                pid_ns: heartbeat::pid_ns(),
                recoverer: None,
            };
            let at = slot as usize * UNIT;
            let expected = region[at..at + ss].to_vec();
            let issued = Instant::now();
            if replace_slot(&*lun, sb, protocol, timing, slot, &expected, &hb)? {
                break (hb, issued);
            }
            attempt += 1;
            if attempt > 4 * slots {
                return Err(Error::NoHostSlot {
                    lun: lun.name().to_string(),
                    slots,
                });
            }
        };
        let me = HostId {
            slot: hb.slot,
            generation: hb.generation,
            nonce,
            uuid: who.uuid,
            name: who.name.clone(),
        };
        let lease = Arc::new(Lease::new(
            lun.name(),
            &me.to_string(),
            timing.fence_after(),
            issued,
        ));
        let guarded: Arc<dyn Lun> = Arc::new(GuardLun::new(lun.clone(), lease.clone()));
        let off = sb.heartbeat_slot_offset(me.slot);
        let node = Arc::new(Node {
            raw: lun,
            guarded,
            sb: sb.clone(),
            timing,
            protocol,
            me,
            boot_id,
            lease,
            record: Mutex::new(hb.encode(off)[..ss].to_vec()),
            monitor: Mutex::new(Monitor::new(slots)),
            areas: (0..sb.lease_areas).map(|_| Mutex::new(false)).collect(),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            thread: Mutex::new(None),
            left: AtomicBool::new(false),
            heartbeats_unreadable: AtomicBool::new(false),
        });
        guard(&JOINED).push((sb.uuid, node.me.slot, nonce));
        node.refresh_monitor();
        let weak = Arc::downgrade(&node);
        let thread = std::thread::Builder::new()
            .name(format!("vmfs-heartbeat-{}", node.me.slot))
            .spawn(move || heartbeat_loop(weak))
            .map_err(|e| Error::Invalid {
                object: node.raw.name().to_string(),
                reason: format!("cannot start the heartbeat thread: {e}"),
            })?;
        *guard(&node.thread) = Some(thread);
        tracing::info!(lun = %node.raw.name(), host = %node.me, protocol = ?protocol, timing = %timing, "joined the datastore cluster");
        Ok(node)
    }

    pub fn host(&self) -> &HostId {
        &self.me
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn protocol(&self) -> LockProtocol {
        self.protocol
    }

    /// The LUN as this host may use it: every write refused once the host is fenced.
    pub fn lun(&self) -> Arc<dyn Lun> {
        self.guarded.clone()
    }

    /// Why the host fenced itself, if it did.
    pub fn fenced(&self) -> Option<String> {
        // Checking also notices a lease that has just run out.
        self.lease.check().err()
    }

    pub(crate) fn lease(&self) -> Arc<Lease> {
        self.lease.clone()
    }

    /// Takes `target` in `mode` once, without waiting: `Busy` names the holder on conflict.
    pub fn try_lock(&self, target: LockTarget, mode: LockMode) -> Result<()> {
        match self.change(target, Some((mode, true)))? {
            Ok(_) => Ok(()),
            Err(c) => Err(self.busy(target.describe(), &c)),
        }
    }

    /// Gives up this host's hold on `target`.
    pub fn unlock(&self, target: LockTarget) -> Result<()> {
        match self.change(target, None)? {
            Ok(_) => Ok(()),
            Err(c) => Err(self.busy(target.describe(), &c)),
        }
    }

    /// Reads a lock record as it is on the LUN.
    pub fn read_lock(&self, target: LockTarget) -> Result<LockRecord> {
        let off = target.offset(&self.sb);
        let buf = paxos::read_intact(&*self.raw, off, MAGIC_LOCK)?;
        LockRecord::decode(&buf, off, target.code()).map_err(|why| self.corrupt(target, off, why))
    }

    fn corrupt(&self, target: LockTarget, offset: u64, reason: String) -> Error {
        Error::Corrupt {
            lun: self.raw.name().to_string(),
            object: format!("lock record of {}", target.describe()),
            offset,
            reason,
        }
    }

    /// The lock error for `object`, naming the holder host.
    pub(crate) fn busy(&self, object: String, c: &Conflict) -> Error {
        let mut holder = self.describe_holder(c.holder);
        match c.verdict {
            Verdict::Dead => holder.push_str(", not renewing its heartbeat (being recovered)"),
            Verdict::Recovering { by } => {
                holder.push_str(&format!(", being recovered by the host in slot {by}"));
            }
            _ => {}
        }
        Error::Busy {
            object,
            holder,
            mode: c.mode.to_string(),
        }
    }

    /// "host NAME (slot S, pid P)" from the last heartbeat seen in the holder's slot.
    pub(crate) fn describe_holder(&self, h: Holder) -> String {
        let m = guard(&self.monitor);
        match m.seen(h.slot) {
            Some(s) if s.hb.generation as u32 == h.generation => format!(
                "host {} (slot {}, pid {}, uuid {})",
                s.hb.hostname, h.slot, s.hb.pid, s.hb.host
            ),
            _ => format!("host in slot {} (generation {})", h.slot, h.generation),
        }
    }

    /// Makes this host's entry in `target`'s record what `want` says, atomically. The inner
    /// `Err` is the holder in the way.
    pub(crate) fn change(
        &self,
        target: LockTarget,
        want: Want,
    ) -> Result<std::result::Result<LockRecord, Conflict>> {
        let me = self.me.holder();
        let uuid = self.me.uuid;
        self.update_record(target, &mut |cur| {
            transition(cur, me, uuid, want, &mut |h| self.verdict(h))
        })
    }

    /// Read-modify-write of a lock record with the datastore's protocol.
    fn update_record(
        &self,
        target: LockTarget,
        f: &mut dyn FnMut(&LockRecord) -> std::result::Result<Option<LockRecord>, Conflict>,
    ) -> Result<std::result::Result<LockRecord, Conflict>> {
        let off = target.offset(&self.sb);
        let object = target.code();
        let ss = self.guarded.sector_size() as usize;
        match self.protocol {
            LockProtocol::CompareAndWrite | LockProtocol::HostLocal => {
                let mut cur = paxos::read_intact(&*self.guarded, off, MAGIC_LOCK)?;
                for _ in 0..1000 {
                    let rec = LockRecord::decode(&cur, off, object)
                        .map_err(|why| self.corrupt(target, off, why))?;
                    let next = match f(&rec) {
                        Err(c) => return Ok(Err(c)),
                        Ok(None) => return Ok(Ok(rec)),
                        Ok(Some(next)) => next,
                    };
                    let bytes = next.encode(off);
                    match self
                        .guarded
                        .compare_and_write(&cur[..ss], &bytes[..ss], off)?
                    {
                        CompareAndWrite::Written => return Ok(Ok(next)),
                        CompareAndWrite::Miscompare(now) => cur = now,
                    }
                }
                Err(Error::Busy {
                    object: target.describe(),
                    holder: "other hosts changing its lock record continuously".into(),
                    mode: "contended".into(),
                })
            }
            LockProtocol::DiskPaxos => self.with_area(off, &target.describe(), &mut || {
                let cur = paxos::read_intact(&*self.guarded, off, MAGIC_LOCK)?;
                let rec = LockRecord::decode(&cur, off, object)
                    .map_err(|why| self.corrupt(target, off, why))?;
                match f(&rec) {
                    Err(c) => Ok(Err(c)),
                    Ok(None) => Ok(Ok(rec)),
                    Ok(Some(next)) => {
                        paxos::write_record(&*self.guarded, &next.encode(off), off)?;
                        Ok(Ok(next))
                    }
                }
            }),
        }
    }

    fn area_of(&self, off: u64) -> u32 {
        let unit = off / UNIT_U64;
        (unit.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32 % self.sb.lease_areas.max(1)
    }

    /// Disk Paxos lease area `index`, on the guarded LUN.
    fn area(&self, index: u32) -> Area<'_> {
        Area {
            lun: &*self.guarded,
            index,
            offset: self.sb.lease_offset + u64::from(index) * self.sb.lease_area_len(),
            slots: self.sb.host_slots,
        }
    }

    /// Runs `body` while holding the Disk Paxos lease of the area `off` hashes to.
    fn with_area<T>(&self, off: u64, what: &str, body: &mut dyn FnMut() -> Result<T>) -> Result<T> {
        let index = self.area_of(off);
        let mut turn = guard(&self.areas[index as usize]);
        let area = self.area(index);
        let lver = self.paxos_acquire(&area, what, &mut turn)?;
        let result = body();
        let release = area.write_leader(&Leader {
            lver,
            owner: None,
            time_ns: crate::state::now_ns(),
        });
        if let Err(e) = &release {
            tracing::warn!(lun = %self.raw.name(), area = index, error = %e, "releasing a Disk Paxos lease failed");
        }
        let value = result?;
        release?;
        Ok(value)
    }

    /// Takes an area's lease: Disk Paxos instance `leader.lver + 1`. Only the winner writes
    /// the leader (owner, then free at release), so the leader never goes back to an older
    /// instance; the one exception is committing the win of a host that is gone or dead,
    /// which cannot release anything any more.
    fn paxos_acquire(&self, area: &Area<'_>, what: &str, abandoned: &mut bool) -> Result<u64> {
        let me = (self.me.slot, self.me.generation);
        let deadline = Instant::now() + self.timing.lock_wait();
        let mut floor = 0;
        let mut backoff = Duration::from_micros(200);
        let mut blocker = None;
        let mut balloted = false;
        loop {
            if Instant::now() > deadline {
                *abandoned |= balloted;
                let holder = blocker.map_or_else(
                    || "other hosts racing for it".to_string(),
                    |(slot, generation)| self.describe_holder(Holder::new(slot, generation)),
                );
                return Err(Error::Busy {
                    object: format!("Disk Paxos lease area {} (for {what})", area.index),
                    holder,
                    mode: "exclusive".into(),
                });
            }
            let leader = area.read_leader()?;
            let gone = |o: Owner| {
                matches!(
                    self.verdict(Holder::new(o.0, o.1)),
                    Verdict::Stale | Verdict::Dead
                )
            };
            if let Some(owner) = leader.owner.filter(|o| *o != me) {
                if !gone(owner) {
                    // Areas are held for a few I/Os: look again soon.
                    blocker = Some(owner);
                    std::thread::sleep(jitter(Duration::from_millis(1)));
                    continue;
                }
            }
            let lver = leader.lver + 1;
            let mbal = paxos::next_mbal(floor, me.0, self.sb.host_slots);
            balloted = true;
            match area.ballot(me, lver, mbal)? {
                Ballot::Chosen(value) if value == me => {
                    area.write_leader(&Leader {
                        lver,
                        owner: Some(me),
                        time_ns: crate::state::now_ns(),
                    })?;
                    return Ok(lver);
                }
                Ballot::Chosen(value) => {
                    blocker = Some(value);
                    if gone(value) {
                        area.write_leader(&Leader {
                            lver,
                            owner: Some(value),
                            time_ns: crate::state::now_ns(),
                        })?;
                        continue;
                    }
                }
                Ballot::Aborted { max_mbal } => floor = floor.max(max_mbal),
                Ballot::Outdated => {}
            }
            // Colliding ballots back off, randomly, longer each time.
            std::thread::sleep(jitter(backoff));
            backoff = (backoff * 2).min(self.timing.io_timeout / 8);
        }
    }

    /// A ballot can choose this host's value after this host gave up on it (its own phase 2
    /// was outrun, another host adopted its value, and its deadline passed): other hosts
    /// then wait for it. Finish such a win and release it at once.
    fn sweep_areas(&self) {
        if self.protocol != LockProtocol::DiskPaxos || self.lease.check().is_err() {
            return;
        }
        let me = (self.me.slot, self.me.generation);
        for index in 0..self.sb.lease_areas {
            let Ok(mut abandoned) = self.areas[index as usize].try_lock() else {
                continue;
            };
            if !*abandoned {
                continue;
            }
            *abandoned = false;
            let area = self.area(index);
            let Ok(leader) = area.read_leader() else {
                continue;
            };
            if leader.owner.is_some() || !area.accepted(leader.lver + 1, me).unwrap_or(false) {
                continue;
            }
            let lver = leader.lver + 1;
            let mbal = paxos::next_mbal(area.max_mbal(lver).unwrap_or(0), me.0, self.sb.host_slots);
            if let Ok(Ballot::Chosen(v)) = area.ballot(me, lver, mbal) {
                if v == me {
                    let _ = area.write_leader(&Leader {
                        lver,
                        owner: Some(me),
                        time_ns: crate::state::now_ns(),
                    });
                    let _ = area.write_leader(&Leader {
                        lver,
                        owner: None,
                        time_ns: crate::state::now_ns(),
                    });
                }
            }
        }
    }

    /// What this host knows about holder `h`, confirming a "gone" with a fresh read of its
    /// slot (a record may name an incarnation newer than our last look).
    pub(crate) fn verdict(&self, h: Holder) -> Verdict {
        self.verdict_at(h, 0)
    }

    fn verdict_at(&self, h: Holder, depth: u32) -> Verdict {
        let dead_after = self.timing.dead_after();
        let mut w = guard(&self.monitor).watch(h.slot, h.generation, dead_after, Instant::now());
        if w == Watch::Gone || w == Watch::Unknown {
            self.refresh_slot(h.slot);
            w = guard(&self.monitor).watch(h.slot, h.generation, dead_after, Instant::now());
        }
        match w {
            Watch::Gone => Verdict::Stale,
            Watch::Alive => Verdict::Alive,
            Watch::Dead => Verdict::Dead,
            Watch::Unknown if self.crashed_here(h.slot, false) => Verdict::Dead,
            Watch::Unknown => Verdict::Unknown,
            Watch::Recovering { slot, generation } => {
                if slot == self.me.slot && generation == self.me.generation {
                    return Verdict::Recovering { by: slot };
                }
                if depth > 4 {
                    return Verdict::Recovering { by: slot };
                }
                match self.verdict_at(Holder::new(slot, generation), depth + 1) {
                    // The recoverer is gone or dead: the recovery must be done again.
                    Verdict::Stale | Verdict::Dead => Verdict::Dead,
                    _ => Verdict::Recovering { by: slot },
                }
            }
        }
    }

    /// A live record left by a process of this machine that is gone: a host that crashed.
    /// It can be recovered at once, without the dead-host wait. `anyone`: whatever its host
    /// identity (a host joining), else only one of this host's own identity (a running
    /// host keeps to the dead-host timeout for the others). A pid means the same process only in
    /// the pid namespace that wrote it; a record without one (older writers) is trusted only
    /// when it is this host's own identity, as it was then.
    fn crashed_here(&self, slot: u32, anyone: bool) -> bool {
        let m = guard(&self.monitor);
        let Some(seen) = m.seen(slot) else {
            return false;
        };
        let hb = &seen.hb;
        let ours = hb.host == self.me.uuid && hb.hostname == self.me.name;
        if hb.state != SlotState::Live
            || hb.boot_id != self.boot_id
            || self.boot_id == [0; 16]
            || slot == self.me.slot
        {
            return false;
        }
        let provable = heartbeat::same_machine(hb) || (ours && hb.pid_ns == 0);
        if !provable || !(anyone || ours) {
            return false;
        }
        if hb.pid == std::process::id() {
            // Hosts of one process (tests, a mount and its exports) are told apart by the
            // incarnations this process joined; only our own identity's are taken over.
            ours && !guard(&JOINED)
                .iter()
                .any(|(ds, s, nonce)| *ds == self.sb.uuid && *s == slot && *nonce == hb.nonce)
        } else {
            !heartbeat::pid_alive(hb.pid)
        }
    }

    /// Slots another host must recover: dead per the monitor, crashed hosts of this machine
    /// (of any identity when `joining`, see `crashed_here`), and recoveries whose recoverer
    /// died or left.
    pub(crate) fn dead_slots(&self, joining: bool) -> Vec<u32> {
        let now = Instant::now();
        let (mut dead, mine, recovering) = {
            let m = guard(&self.monitor);
            let dead = m.dead_slots(self.me.slot, self.timing.dead_after(), now);
            let seen = |state: SlotState| {
                (0..self.sb.host_slots)
                    .filter(|s| m.seen(*s).is_some_and(|x| x.hb.state == state))
                    .collect::<Vec<u32>>()
            };
            let mine: Vec<u32> = seen(SlotState::Live)
                .into_iter()
                .filter(|s| m.seen(*s).is_some_and(|x| x.hb.boot_id == self.boot_id))
                .collect();
            let recovering: Vec<(u32, u64)> = seen(SlotState::Recovering)
                .into_iter()
                .filter_map(|s| m.seen(s).map(|x| (s, x.hb.generation)))
                .collect();
            (dead, mine, recovering)
        };
        for s in mine {
            if !dead.contains(&s) && self.crashed_here(s, joining) {
                dead.push(s);
            }
        }
        for (s, generation) in recovering {
            if self.verdict(Holder::new(s, generation)) == Verdict::Dead && !dead.contains(&s) {
                dead.push(s);
            }
        }
        dead
    }

    fn refresh_slot(&self, slot: u32) {
        let off = self.sb.heartbeat_slot_offset(slot);
        if let Ok(buf) = paxos::read_intact(&*self.raw, off, MAGIC_HEARTBEAT) {
            let hb = Heartbeat::decode(&buf, off, slot);
            guard(&self.monitor).observe(slot, hb, Instant::now());
        }
    }

    fn refresh_monitor(&self) {
        let slots = self.sb.host_slots;
        let mut region = vec![0u8; slots as usize * UNIT];
        if let Err(e) = self.raw.read_at(&mut region, self.sb.heartbeat_offset) {
            if self.heartbeats_unreadable.swap(true, Ordering::SeqCst) {
                tracing::debug!(lun = %self.raw.name(), error = %e, "reading the heartbeat region failed");
            } else {
                tracing::warn!(lun = %self.raw.name(), error = %e, "reading the heartbeat region failed; retrying quietly");
            }
            return;
        }
        if self.heartbeats_unreadable.swap(false, Ordering::SeqCst) {
            tracing::warn!(lun = %self.raw.name(), "the heartbeat region reads again");
        }
        let now = Instant::now();
        let mut m = guard(&self.monitor);
        for slot in 0..slots {
            let at = slot as usize * UNIT;
            let hb = Heartbeat::decode(
                &region[at..at + RECORD],
                self.sb.heartbeat_slot_offset(slot),
                slot,
            );
            m.observe(slot, hb, now);
        }
    }

    /// One renewal: bump the counter, write it (CAS from our last record, or check-then-write).
    fn renew(&self) {
        if self.lease.check().is_err() || self.left.load(Ordering::SeqCst) {
            return;
        }
        let off = self.sb.heartbeat_slot_offset(self.me.slot);
        let mut rec = guard(&self.record);
        let Ok(Some(mut hb)) = Heartbeat::decode(&rec, off, self.me.slot) else {
            self.lease
                .fence("our own heartbeat record no longer decodes".into());
            return;
        };
        hb.counter += 1;
        hb.time_ns = crate::state::now_ns();
        let new = hb.encode(off);
        let ss = rec.len();
        let issued = Instant::now();
        let outcome = match self.protocol {
            LockProtocol::CompareAndWrite | LockProtocol::HostLocal => self
                .raw
                .compare_and_write(&rec, &new[..ss], off)
                .map(|r| match r {
                    CompareAndWrite::Written => Ok(()),
                    CompareAndWrite::Miscompare(now) => Err(now),
                }),
            LockProtocol::DiskPaxos => paxos::read_record(&*self.raw, off)
                .map_err(|e| match e {
                    Error::Lun(l) => l,
                    other => lun::LunError::Io {
                        lun: self.raw.name().to_string(),
                        offset: off,
                        len: ss as u64,
                        source: std::io::Error::other(other.to_string()),
                    },
                })
                .and_then(|cur| {
                    if cur[..ss] != rec[..] {
                        return Ok(Err(cur));
                    }
                    self.raw.write_at(&new[..ss], off).map(Ok)
                }),
        };
        match outcome {
            Ok(Ok(())) => {
                *rec = new[..ss].to_vec();
                self.lease.renewed(issued);
            }
            Ok(Err(now)) => {
                let who = Heartbeat::decode(&now, off, self.me.slot)
                    .ok()
                    .flatten()
                    .map(|h| format!("{} by {} ({})", h.state.name(), h.hostname, h.host))
                    .unwrap_or_else(|| "overwritten".into());
                self.lease.fence(format!(
                    "heartbeat slot {} was taken over ({who}): this host was declared dead",
                    self.me.slot
                ));
            }
            Err(e) => {
                tracing::warn!(lun = %self.raw.name(), host = %self.me, error = %e, remaining = ?self.lease.remaining(), "heartbeat renewal failed");
            }
        }
    }

    /// Claims dead slot `d` for recovery. Returns the dead incarnation's record, or `None`
    /// when the slot does not need (or no longer needs) this host to recover it.
    pub(crate) fn claim_recovery(&self, d: u32, joining: bool) -> Result<Option<Heartbeat>> {
        if d == self.me.slot {
            return Ok(None);
        }
        self.refresh_slot(d);
        let off = self.sb.heartbeat_slot_offset(d);
        let me = self.me.incarnation();
        let mut claimed = None;
        self.change_slot(d, &mut |cur| {
            claimed = None;
            let hb = cur?;
            let eligible = match hb.state {
                SlotState::Free => false,
                SlotState::Live => {
                    matches!(self.verdict(Holder::new(d, hb.generation)), Verdict::Dead)
                        || (joining && self.crashed_here(d, true))
                }
                SlotState::Recovering => match hb.recoverer {
                    Some(r) if r == me => true,
                    Some(r) => matches!(
                        self.verdict(Holder::new(r.slot, r.generation)),
                        Verdict::Stale | Verdict::Dead
                    ),
                    None => true,
                },
            };
            if !eligible {
                return None;
            }
            let mut next = hb.clone();
            next.state = SlotState::Recovering;
            next.recoverer = Some(me);
            next.counter = hb.counter.wrapping_add(1);
            claimed = Some(Heartbeat {
                state: SlotState::Live,
                recoverer: None,
                ..hb.clone()
            });
            Some(next)
        })?;
        if claimed.is_some() {
            tracing::info!(lun = %self.raw.name(), host = %self.me, slot = d, offset = off, "claimed a dead host's slot for recovery");
        }
        Ok(claimed)
    }

    /// Marks recovered slot `d` free: every lock naming its dead incarnation is stale now.
    pub(crate) fn finish_recovery(&self, d: u32) -> Result<()> {
        let me = self.me.incarnation();
        let mut ours = false;
        self.change_slot(d, &mut |cur| {
            let hb = cur?;
            if hb.state != SlotState::Recovering || hb.recoverer != Some(me) {
                return None;
            }
            ours = true;
            let mut next = hb.clone();
            next.state = SlotState::Free;
            next.recoverer = None;
            next.pid = 0;
            next.counter = hb.counter.wrapping_add(1);
            Some(next)
        })?;
        if !ours {
            return Err(Error::Busy {
                object: format!("heartbeat slot {d}"),
                holder: "another host that took over its recovery".into(),
                mode: "recovering".into(),
            });
        }
        self.refresh_slot(d);
        Ok(())
    }

    /// Read-modify-write of another slot's record (recovery), with the datastore's protocol.
    fn change_slot(
        &self,
        slot: u32,
        f: &mut dyn FnMut(Option<&Heartbeat>) -> Option<Heartbeat>,
    ) -> Result<()> {
        let off = self.sb.heartbeat_slot_offset(slot);
        let ss = self.guarded.sector_size() as usize;
        let decode = |buf: &[u8]| {
            Heartbeat::decode(buf, off, slot).map_err(|why| Error::Corrupt {
                lun: self.raw.name().to_string(),
                object: format!("heartbeat slot {slot}"),
                offset: off,
                reason: why,
            })
        };
        match self.protocol {
            LockProtocol::CompareAndWrite | LockProtocol::HostLocal => {
                let mut cur = paxos::read_intact(&*self.guarded, off, MAGIC_HEARTBEAT)?;
                for _ in 0..100 {
                    let hb = decode(&cur)?;
                    let Some(next) = f(hb.as_ref()) else {
                        return Ok(());
                    };
                    let bytes = next.encode(off);
                    match self
                        .guarded
                        .compare_and_write(&cur[..ss], &bytes[..ss], off)?
                    {
                        CompareAndWrite::Written => return Ok(()),
                        CompareAndWrite::Miscompare(now) => cur = now,
                    }
                }
                Ok(())
            }
            LockProtocol::DiskPaxos => {
                self.with_area(off, &format!("heartbeat slot {slot}"), &mut || {
                    let cur = paxos::read_intact(&*self.guarded, off, MAGIC_HEARTBEAT)?;
                    let hb = decode(&cur)?;
                    if let Some(next) = f(hb.as_ref()) {
                        paxos::write_record(&*self.guarded, &next.encode(off), off)?;
                    }
                    Ok(())
                })
            }
        }
    }

    /// Stops renewing and frees the slot. After this the host id is gone: call only once
    /// everything this host wrote is on the LUN and its locks are released.
    pub fn leave(&self) -> Result<()> {
        if self.left.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.stop_thread();
        guard(&JOINED).retain(|(_, s, n)| !(*s == self.me.slot && *n == self.me.nonce));
        if let Some(reason) = self.lease.fenced() {
            tracing::warn!(lun = %self.raw.name(), host = %self.me, %reason, "fenced host leaves its slot for the others to recover");
            return Ok(());
        }
        let off = self.sb.heartbeat_slot_offset(self.me.slot);
        let rec = guard(&self.record).clone();
        let ss = rec.len();
        let Ok(Some(mut hb)) = Heartbeat::decode(&rec, off, self.me.slot) else {
            return Ok(());
        };
        hb.state = SlotState::Free;
        hb.pid = 0;
        hb.counter += 1;
        hb.time_ns = crate::state::now_ns();
        let new = hb.encode(off);
        match self.protocol {
            LockProtocol::CompareAndWrite | LockProtocol::HostLocal => {
                if let CompareAndWrite::Miscompare(_) =
                    self.guarded.compare_and_write(&rec, &new[..ss], off)?
                {
                    tracing::warn!(lun = %self.raw.name(), host = %self.me, "slot was taken over before we left");
                    return Ok(());
                }
            }
            LockProtocol::DiskPaxos => {
                let cur = paxos::read_record(&*self.guarded, off)?;
                if cur[..ss] != rec[..] {
                    tracing::warn!(lun = %self.raw.name(), host = %self.me, "slot was taken over before we left");
                    return Ok(());
                }
                self.guarded.write_at(&new[..ss], off)?;
            }
        }
        self.guarded.flush()?;
        tracing::info!(lun = %self.raw.name(), host = %self.me, "left the datastore cluster");
        Ok(())
    }

    /// Stops renewing without freeing the slot: to the others this host crashed, and they
    /// recover its journal and locks after the dead-host timeout.
    pub(crate) fn abandon(&self) {
        self.left.store(true, Ordering::SeqCst);
        self.stop_thread();
        tracing::warn!(lun = %self.raw.name(), host = %self.me, "stopped renewing; the slot is left for recovery");
    }

    fn stop_thread(&self) {
        *guard(&self.stop) = true;
        self.wake.notify_all();
        let handle = guard(&self.thread).take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Without leave() the slot stays live on the LUN: a crash, as far as others can
        // tell. Stop renewing so they can recover it.
        self.left.store(true, Ordering::SeqCst);
        *guard(&self.stop) = true;
        self.wake.notify_all();
        guard(&JOINED).retain(|(_, s, n)| !(*s == self.me.slot && *n == self.me.nonce));
    }
}

fn jitter(d: Duration) -> Duration {
    let spread = d.as_nanos() as u64 / 2 + 1;
    d / 2 + Duration::from_nanos(random_u64() % spread)
}

/// Renews every renew interval and reads the heartbeat region every monitor interval.
fn heartbeat_loop(node: Weak<Node>) {
    let (renew_every, watch_every) = match node.upgrade() {
        Some(n) => (n.timing.renew_interval(), n.timing.monitor_interval()),
        None => return,
    };
    let mut next_renew = Instant::now() + renew_every;
    let mut next_watch = Instant::now() + watch_every;
    loop {
        let Some(n) = node.upgrade() else { return };
        {
            let wake_at = next_renew.min(next_watch);
            let mut stop = guard(&n.stop);
            while !*stop {
                let now = Instant::now();
                if now >= wake_at {
                    break;
                }
                stop = n
                    .wake
                    .wait_timeout(stop, wake_at - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if *stop {
                return;
            }
        }
        let now = Instant::now();
        if now >= next_renew {
            let before = n.lease.remaining();
            n.renew();
            let renewed = n.lease.remaining() > before;
            next_renew = if renewed {
                now + renew_every
            } else {
                now + renew_every / 4
            };
        }
        if now >= next_watch {
            n.refresh_monitor();
            n.sweep_areas();
            next_watch = now + watch_every;
        }
        // Notice the end of the lease promptly even when nothing writes.
        let _ = n.lease.check();
    }
}

/// Replaces a slot record observed as `expected` with `new`: compare-and-write, or the
/// delta-lease write, wait, read back.
fn replace_slot(
    lun: &dyn Lun,
    sb: &Superblock,
    protocol: LockProtocol,
    timing: Timing,
    slot: u32,
    expected: &[u8],
    new: &Heartbeat,
) -> Result<bool> {
    let off = sb.heartbeat_slot_offset(slot);
    let ss = lun.sector_size() as usize;
    let bytes = new.encode(off);
    match protocol {
        LockProtocol::CompareAndWrite | LockProtocol::HostLocal => Ok(matches!(
            lun.compare_and_write(&expected[..ss], &bytes[..ss], off)?,
            CompareAndWrite::Written
        )),
        LockProtocol::DiskPaxos => {
            let cur = paxos::read_intact(lun, off, MAGIC_HEARTBEAT)?;
            if cur[..ss] != expected[..ss] {
                return Ok(false);
            }
            lun.write_at(&bytes[..ss], off)?;
            // Anyone who read the slot as free before our write landed writes within two
            // I/O timeouts; if the record is still ours after that, the slot is ours.
            std::thread::sleep(timing.delta_wait());
            let back = paxos::read_intact(lun, off, MAGIC_HEARTBEAT)?;
            Ok(back[..ss] == bytes[..ss])
        }
    }
}
