//! The I/O schedulers of one host, one per resource class (disk, network): mClock (Gulati,
//! Merchant, Varman, OSDI 2010) spread over the separate processes of the host's VMs.
//!
//! Every VM process maps the class's file, `<runtime>/sched/disk.clock` or `net.clock`, and owns
//! one slot in it (claimed under `flock`, freed when the process exits: a slot whose pid is gone
//! is free). A slot holds the VM's settings and mClock's three tags as atomics:
//!
//! - reservation: the earliest time the VM's next I/O is owed to it (`R`); an I/O whose `R` has
//!   come is dispatched at once, whatever the other VMs do, and is not charged to `P`.
//! - limit: the earliest time the next I/O may go (`L` for IOPS or packets/s, `LB` for
//!   bytes/s); before that the VM waits even on an idle device. This is the VM-wide token
//!   bucket over all its disks, or all its NICs.
//! - proportional: a virtual-time tag (`P`, start-time fair queueing: the start tag of the
//!   VM's next I/O); an I/O goes when its tag is the smallest among the VMs waiting for a turn
//!   (disk: that issued I/O in the last [`Class::active_ns`]; net: that hold a refused frame)
//!   and are not held by their own limit, so backlogged VMs are served in proportion to their
//!   shares. A VM cannot bank credit while idle or sending less than its share.
//!
//! The classes differ in what is scarce. A disk is its own arbiter: its service time paces the
//! VMs, a tag costs one I/O, and a reservation is in IOPS. A host's network is not (a tap on a
//! bridge takes frames as fast as a CPU copies them), so the net clock keeps a host-wide wire
//! in its header: a transmit capacity in bytes/s (from [`net_capacity`]) that every frame
//! occupies for `len / capacity`; a tag costs the frame's bytes, and a reservation is in
//! bytes/s. Without a capacity there is nothing to divide and only limits apply.
//!
//! There is no broker process to crash or restart: CLOCK_MONOTONIC is host-wide, and each
//! process decides for its own I/O. The layout is in sched/README.md.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use memmap2::MmapMut;
use serde::Serialize;

use crate::error::io;
use crate::{Result, SchedError};

const MAGIC: u64 = u64::from_le_bytes(*b"VAPPDCLK");
const VERSION: u64 = 1;
pub const SLOTS: usize = 64;
/// u64 words per slot.
const WORDS: usize = 16;
const HEADER_WORDS: usize = 8;
const FILE_BYTES: usize = (HEADER_WORDS + SLOTS * WORDS) * 8;
/// A disk VM that issued no I/O for this long is idle: others stop waiting for it.
const DISK_ACTIVE_NS: u64 = 20_000_000;
/// The same for a VM's transmit, which its backend retries on a millisecond timer that a
/// loaded host runs late: a VM still sending must not look idle and lose its place.
const NET_ACTIVE_NS: u64 = 100_000_000;
/// How far behind its limit a VM may fall and still catch up, as a token bucket's burst.
pub const LIMIT_BURST_NS: u64 = 20_000_000;
/// Virtual time one disk I/O costs a VM of one share.
const TAG_UNIT: u64 = 1 << 40;
/// Virtual time one byte on the network costs a VM of one share: a 64 KiB frame is 2^32, so
/// the 64-bit tag of a one-share VM lasts 2^32 such frames.
const NET_TAG_PER_BYTE: u64 = 1 << 16;
/// How far (in time on the wire) a VM's network tag may run ahead of the others' before it
/// waits: a VM retries on a millisecond timer, so waiting for strict tag order would leave
/// the wire idle between turns. The lead is bounded, so shares still hold over time.
const NET_WINDOW_NS: u64 = 100_000_000;
/// How much idle wire time may still be used later: a backend that retries late loses no
/// capacity for the others.
const WIRE_BURST_NS: u64 = 50_000_000;
/// How long a VM that is not its turn waits before trying again.
const TURN_NS: u64 = 50_000;

// Header words.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
/// Net: the host's transmit capacity in bytes/s (0: none).
const H_CAPACITY: usize = 2;
/// Net: when the wire is next free (ns).
const H_WIRE: usize = 3;

// Word offsets in a slot.
const PID: usize = 0;
const SHARES: usize = 1;
const RESERVATION: usize = 2;
const LIMIT_OPS: usize = 3;
const LIMIT_BPS: usize = 4;
const R_NEXT: usize = 5;
const L_NEXT: usize = 6;
const LB_NEXT: usize = 7;
const P_NEXT: usize = 8;
const ACTIVE: usize = 9;
const IOS: usize = 10;
const BYTES: usize = 11;
const RESERVED_IOS: usize = 12;
const WAIT_NS: usize = 13;
const P_START: usize = 14;
/// Net: when the VM last had a frame refused that it still holds (0: none since its last sent).
const PENDING: usize = 15;

/// What a clock schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// virtio-blk requests: shares count I/Os, a reservation is in IOPS.
    Disk,
    /// virtio-net transmitted frames: shares count bytes, a reservation is in bytes/s, and
    /// the wire's capacity is the host's.
    Net,
}

impl Class {
    /// How long after its last request a VM still counts as active.
    pub fn active_ns(self) -> u64 {
        match self {
            Class::Disk => DISK_ACTIVE_NS,
            Class::Net => NET_ACTIVE_NS,
        }
    }

    fn file(self) -> &'static str {
        match self {
            Class::Disk => "disk.clock",
            Class::Net => "net.clock",
        }
    }
}

/// One VM's share of one of the host's schedulers.
pub struct Clock {
    path: PathBuf,
    map: MmapMut,
    slot: usize,
    class: Class,
}

/// Settings of one VM for one class.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Ticket {
    pub shares: u64,
    /// IOPS for disk, bytes/s for net.
    pub reservation: u64,
    /// IOPS for disk, packets/s for net.
    pub limit_ops: Option<u64>,
    pub limit_bytes_per_sec: Option<u64>,
}

/// A slot as `host resources` shows it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SlotUse {
    pub pid: u32,
    pub ios: u64,
    pub bytes: u64,
    pub reserved_ios: u64,
    pub wait_ns: u64,
}

impl Clock {
    /// Joins the `class` scheduler of the host whose runtime directory is `runtime`. For the
    /// network, `capacity` is the host's transmit capacity in bytes/s, written to the shared
    /// header (the latest VM to join speaks for the host).
    pub fn join(
        runtime: &Path,
        class: Class,
        ticket: Ticket,
        capacity: Option<u64>,
    ) -> Result<Clock> {
        let dir = runtime.join("sched");
        std::fs::create_dir_all(&dir).map_err(io(&dir, "creating the scheduler directory"))?;
        let path = dir.join(class.file());
        let map = map(&path)?;
        let file = std::fs::File::open(&path).map_err(io(&path, "opening"))?;
        // SAFETY: flock on a descriptor we own; released when `file` closes below.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            return Err(io(&path, "locking")(std::io::Error::last_os_error()));
        }
        let mut clock = Clock {
            path: path.clone(),
            map,
            slot: usize::MAX,
            class,
        };
        if clock.header(H_MAGIC).load(Ordering::Acquire) != MAGIC {
            clock.header(H_VERSION).store(VERSION, Ordering::Release);
            clock.header(H_MAGIC).store(MAGIC, Ordering::Release);
        }
        if class == Class::Net {
            clock
                .header(H_CAPACITY)
                .store(capacity.unwrap_or(0), Ordering::Release);
        }
        let free = (0..SLOTS).find(|&s| {
            let pid = clock.word(s, PID).load(Ordering::Acquire);
            // A process may run several VMs (an embedding, a bench): each gets its own slot.
            pid == 0 || !Path::new(&format!("/proc/{pid}")).exists()
        });
        let Some(slot) = free else {
            return Err(SchedError::NoSlot { path, slots: SLOTS });
        };
        clock.slot = slot;
        for w in 0..WORDS {
            clock.word(slot, w).store(0, Ordering::Relaxed);
        }
        clock
            .mine(SHARES)
            .store(ticket.shares.max(1), Ordering::Relaxed);
        clock
            .mine(RESERVATION)
            .store(ticket.reservation, Ordering::Relaxed);
        clock
            .mine(LIMIT_OPS)
            .store(ticket.limit_ops.unwrap_or(0), Ordering::Relaxed);
        clock
            .mine(LIMIT_BPS)
            .store(ticket.limit_bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
        clock
            .mine(PID)
            .store(std::process::id() as u64, Ordering::Release);
        drop(file);
        Ok(clock)
    }

    /// Every live slot's counters of `class`, keyed by pid: what `host resources` reads.
    pub fn usage(runtime: &Path, class: Class) -> Result<Vec<SlotUse>> {
        let path = runtime.join("sched").join(class.file());
        if !path.exists() {
            return Ok(Vec::new());
        }
        let clock = Clock {
            map: map(&path)?,
            path,
            slot: usize::MAX,
            class,
        };
        Ok((0..SLOTS)
            .filter_map(|s| {
                let pid = clock.word(s, PID).load(Ordering::Acquire);
                (pid != 0 && Path::new(&format!("/proc/{pid}")).exists()).then(|| SlotUse {
                    pid: pid as u32,
                    ios: clock.word(s, IOS).load(Ordering::Relaxed),
                    bytes: clock.word(s, BYTES).load(Ordering::Relaxed),
                    reserved_ios: clock.word(s, RESERVED_IOS).load(Ordering::Relaxed),
                    wait_ns: clock.word(s, WAIT_NS).load(Ordering::Relaxed),
                })
            })
            .collect())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the map is FILE_BYTES long, page aligned, and only ever accessed through
        // atomics, by this and other processes.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), FILE_BYTES / 8) }
    }

    fn header(&self, w: usize) -> &AtomicU64 {
        &self.words()[w]
    }

    fn word(&self, slot: usize, w: usize) -> &AtomicU64 {
        &self.words()[HEADER_WORDS + slot * WORDS + w]
    }

    fn mine(&self, w: usize) -> &AtomicU64 {
        self.word(self.slot, w)
    }

    /// Blocks until this VM may issue an I/O of `bytes` bytes, then charges it.
    pub fn admit(&self, bytes: u64) {
        let start = now();
        let mut t = start;
        while let Err(wait) = self.try_admit_at(bytes, t) {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
            t = now();
        }
        self.mine(WAIT_NS).fetch_add(t - start, Ordering::Relaxed);
    }

    /// Charges an I/O (a frame) of `bytes` bytes if it may go now, or says how long to wait
    /// before asking again: for callers that must not block, as a NIC's transmit.
    pub fn try_admit(&self, bytes: u64) -> std::result::Result<(), Duration> {
        self.try_admit_at(bytes, now())
    }

    fn try_admit_at(&self, bytes: u64, t: u64) -> std::result::Result<(), Duration> {
        let wait = |until: u64| Err(Duration::from_nanos(until.saturating_sub(t).max(1)));
        // Limit: never before L, even on an idle device. A VM held here is not active, so the
        // others do not wait for its turn.
        let l = self
            .mine(L_NEXT)
            .load(Ordering::Relaxed)
            .max(self.mine(LB_NEXT).load(Ordering::Relaxed));
        if l > t {
            return wait(l);
        }
        let last = self.mine(ACTIVE).swap(t, Ordering::AcqRel);
        let was_idle = last == 0 || t.saturating_sub(last) > self.class.active_ns();
        let shares = self.mine(SHARES).load(Ordering::Relaxed).max(1);
        let reservation = self.mine(RESERVATION).load(Ordering::Relaxed);
        let (capacity, unit) = match self.class {
            Class::Disk => (0, 1),
            Class::Net => (self.header(H_CAPACITY).load(Ordering::Acquire), bytes),
        };
        let wire_cost = bytes
            .saturating_mul(1_000_000_000)
            .checked_div(capacity)
            .unwrap_or(0);
        loop {
            // Reservation: owed now, whatever the others do (it still occupies the wire).
            let r = self.mine(R_NEXT).load(Ordering::Relaxed);
            if reservation > 0 && r <= t && (self.class == Class::Disk || capacity > 0) {
                charge(
                    self.mine(R_NEXT),
                    t,
                    unit.saturating_mul(1_000_000_000) / reservation,
                    LIMIT_BURST_NS,
                );
                if capacity > 0 {
                    charge(self.header(H_WIRE), t, wire_cost, WIRE_BURST_NS);
                }
                self.mine(RESERVED_IOS).fetch_add(1, Ordering::Relaxed);
                break;
            }
            // A network without a capacity has nothing to divide: the frame goes.
            if self.class == Class::Net && capacity == 0 {
                break;
            }
            let wire = self.header(H_WIRE).load(Ordering::Acquire);
            if capacity > 0 && wire > t {
                self.mine(PENDING).store(t, Ordering::Release);
                return wait(wire);
            }
            // Proportional: the smallest start tag among the active VMs goes.
            let step = match self.class {
                Class::Disk => TAG_UNIT / shares,
                Class::Net => bytes.saturating_mul(NET_TAG_PER_BYTE) / shares,
            };
            let turn = self.tags(t);
            let window = match self.class {
                Class::Disk => 0,
                Class::Net => {
                    (u128::from(capacity) * u128::from(NET_WINDOW_NS) / 1_000_000_000
                        * u128::from(NET_TAG_PER_BYTE)
                        / u128::from((turn.active_shares + shares).max(1)))
                        as u64
                }
            };
            // No banked credit. A disk VM coming back from idle starts level with the active
            // ones; one that stayed active keeps its place, behind or ahead. A network VM
            // lags the others by at most the window, whether it was idle or just sent less.
            let floor = match self.class {
                Class::Disk => turn.virtual_time.filter(|_| was_idle),
                Class::Net => turn.virtual_time.map(|v| v.saturating_sub(window)),
            };
            if let Some(floor) = floor {
                self.mine(P_NEXT).fetch_max(floor, Ordering::AcqRel);
            }
            let mine = self.mine(P_NEXT).load(Ordering::Acquire);
            let first = turn.others_min.is_none_or(|(tag, slot)| {
                if window == 0 {
                    (mine, self.slot) < (tag, slot)
                } else {
                    mine <= tag.saturating_add(window)
                }
            });
            if !first {
                self.mine(PENDING).store(t, Ordering::Release);
                return wait(t + TURN_NS);
            }
            if capacity > 0 {
                // The wire, like a limit, banks at most a burst while idle: a backend that
                // retries on a millisecond timer loses no capacity while it sleeps.
                let next = wire.max(t.saturating_sub(wire_cost.max(WIRE_BURST_NS))) + wire_cost;
                if self
                    .header(H_WIRE)
                    .compare_exchange(wire, next, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    // Another VM took the wire meanwhile: look again.
                    continue;
                }
            }
            self.mine(P_START).fetch_max(mine, Ordering::AcqRel);
            self.mine(P_NEXT).fetch_add(step, Ordering::AcqRel);
            break;
        }
        let limit_ops = self.mine(LIMIT_OPS).load(Ordering::Relaxed);
        if let Some(period) = 1_000_000_000u64.checked_div(limit_ops) {
            charge(self.mine(L_NEXT), t, period, LIMIT_BURST_NS);
        }
        let limit_bps = self.mine(LIMIT_BPS).load(Ordering::Relaxed);
        if let Some(cost) = bytes.saturating_mul(1_000_000_000).checked_div(limit_bps) {
            charge(self.mine(LB_NEXT), t, cost, LIMIT_BURST_NS);
        }
        self.mine(PENDING).store(0, Ordering::Release);
        self.mine(IOS).fetch_add(1, Ordering::Relaxed);
        self.mine(BYTES).fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The smallest next tag of another VM waiting for its turn, the smallest start tag of the
    /// active others (virtual time), and their shares.
    fn tags(&self, t: u64) -> Turn {
        let mut others_min: Option<(u64, usize)> = None;
        let mut virtual_time: Option<u64> = None;
        let mut active_shares = 0;
        for s in (0..SLOTS).filter(|&s| s != self.slot) {
            if self.word(s, PID).load(Ordering::Acquire) == 0 {
                continue;
            }
            let active = self.word(s, ACTIVE).load(Ordering::Acquire);
            if active == 0 || t.saturating_sub(active) > self.class.active_ns() {
                continue;
            }
            // A VM its limit holds back cannot use its turn: do not wait for it.
            let held = self
                .word(s, L_NEXT)
                .load(Ordering::Relaxed)
                .max(self.word(s, LB_NEXT).load(Ordering::Relaxed));
            if held > t {
                continue;
            }
            // A network VM waits only for another that holds a refused frame: one that sends
            // less than its share has nothing queued, and the wire must not idle for it.
            let pending = self.word(s, PENDING).load(Ordering::Acquire);
            let queued = match self.class {
                Class::Disk => true,
                Class::Net => pending != 0 && t.saturating_sub(pending) <= self.class.active_ns(),
            };
            if queued {
                let next = (self.word(s, P_NEXT).load(Ordering::Acquire), s);
                others_min = Some(others_min.map_or(next, |m| m.min(next)));
            }
            let start = self.word(s, P_START).load(Ordering::Acquire);
            virtual_time = Some(virtual_time.map_or(start, |v| v.min(start)));
            active_shares += self.word(s, SHARES).load(Ordering::Relaxed);
        }
        Turn {
            others_min,
            virtual_time,
            active_shares,
        }
    }
}

struct Turn {
    others_min: Option<(u64, usize)>,
    virtual_time: Option<u64>,
    active_shares: u64,
}

/// Advances a "next allowed" time by `cost`, letting it lag `now` by at most a burst: a VM
/// descheduled for a moment may catch up (so the average over a second is the rate), but an
/// idle one banks no more than the burst.
fn charge(next: &AtomicU64, t: u64, cost: u64, burst: u64) {
    let _ = next.fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
        Some(l.max(t.saturating_sub(cost.max(burst))) + cost)
    });
}

impl Drop for Clock {
    fn drop(&mut self) {
        if self.slot < SLOTS {
            self.mine(PID).store(0, Ordering::Release);
        }
    }
}

/// The host's network transmit capacity in bytes/s, from `VAPP_NET_CAPACITY` ("1GB/s",
/// "100MiB/s" or a number of bytes/s); None when unset.
pub fn net_capacity() -> Result<Option<u64>> {
    let Some(text) = std::env::var_os(NET_CAPACITY_ENV).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let text = text.to_string_lossy().to_string();
    let bytes = crate::resources::bytes_per_sec(NET_CAPACITY_ENV, &text)?;
    if bytes == 0 {
        return Err(SchedError::Config(format!(
            "{NET_CAPACITY_ENV} {text:?}: a capacity must be above 0"
        )));
    }
    Ok(Some(bytes))
}

pub const NET_CAPACITY_ENV: &str = "VAPP_NET_CAPACITY";

fn map(path: &Path) -> Result<MmapMut> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io(path, "opening the scheduler clock"))?;
    let len = file.metadata().map_err(io(path, "inspecting"))?.len();
    if len < FILE_BYTES as u64 {
        file.set_len(FILE_BYTES as u64)
            .map_err(io(path, "sizing"))?;
    }
    // SAFETY: the file is shared on purpose; every access goes through atomics.
    unsafe { MmapMut::map_mut(&file) }.map_err(io(path, "mapping"))
}

fn now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    /// Each "VM" is a thread with its own slot (as a process would have) doing 4 KiB I/Os
    /// that take `service` each, until `stop`.
    fn run(runtime: &Path, tickets: &[Ticket], service: Duration, secs: f64) -> Vec<u64> {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = tickets
            .iter()
            .map(|&ticket| {
                let clock = Clock::join(runtime, Class::Disk, ticket, None).unwrap();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        clock.admit(4096);
                        let until = Instant::now() + service;
                        while Instant::now() < until {}
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn a_limit_holds_on_an_idle_disk() {
        let dir = tempfile::tempdir().unwrap();
        let n = run(
            dir.path(),
            &[Ticket {
                shares: 1000,
                limit_ops: Some(200),
                ..Default::default()
            }],
            Duration::ZERO,
            1.0,
        );
        assert!(
            (180..=221).contains(&n[0]),
            "{n:?} I/Os in 1 s under a 200 IOPS limit"
        );
    }

    #[test]
    fn two_to_one_shares_give_two_to_one_io() {
        let dir = tempfile::tempdir().unwrap();
        let t = |shares| Ticket {
            shares,
            ..Default::default()
        };
        let n = run(
            dir.path(),
            &[t(2000), t(1000)],
            Duration::from_micros(100),
            1.0,
        );
        let ratio = n[0] as f64 / n[1] as f64;
        assert!((1.8..=2.2).contains(&ratio), "{n:?}: ratio {ratio:.2}");
    }

    #[test]
    fn a_reservation_is_met_while_another_vm_saturates() {
        let dir = tempfile::tempdir().unwrap();
        let big = Ticket {
            shares: 10_000,
            ..Default::default()
        };
        let small = Ticket {
            shares: 100,
            reservation: 300,
            ..Default::default()
        };
        let n = run(dir.path(), &[big, small], Duration::from_micros(500), 1.0);
        assert!(
            n[1] >= 270,
            "{n:?}: the 300 IOPS reservation got {} I/Os in 1 s",
            n[1]
        );
    }

    #[test]
    fn a_vm_held_by_its_limit_does_not_hold_back_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let limited = Ticket {
            shares: 1000,
            limit_ops: Some(100),
            ..Default::default()
        };
        let free = Ticket {
            shares: 1000,
            ..Default::default()
        };
        let n = run(
            dir.path(),
            &[limited, free],
            Duration::from_micros(100),
            1.0,
        );
        assert!(
            n[0] <= 121,
            "{n:?}: the 100 IOPS limit let {} through",
            n[0]
        );
        assert!(
            n[1] >= 2000,
            "{n:?}: the unlimited VM was held to its limited neighbour's pace"
        );
    }

    /// Each "VM" is a thread sending `frame`-byte frames as a NIC's transmit does: a refused
    /// frame is retried on a millisecond timer. Returns the bytes each sent.
    fn send(
        runtime: &Path,
        tickets: &[Ticket],
        capacity: Option<u64>,
        frame: u64,
        secs: f64,
    ) -> Vec<u64> {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = tickets
            .iter()
            .map(|&ticket| {
                let clock = Clock::join(runtime, Class::Net, ticket, capacity).unwrap();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut sent = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        match clock.try_admit(frame) {
                            Ok(()) => sent += frame,
                            Err(wait) => std::thread::sleep(wait.max(Duration::from_millis(1))),
                        }
                    }
                    sent
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn net_shares_divide_the_host_capacity_two_to_one() {
        let dir = tempfile::tempdir().unwrap();
        let t = |shares| Ticket {
            shares,
            ..Default::default()
        };
        let capacity = 20_000_000;
        let sent = send(dir.path(), &[t(2000), t(1000)], Some(capacity), 1514, 1.5);
        let ratio = sent[0] as f64 / sent[1] as f64;
        assert!((1.8..=2.2).contains(&ratio), "{sent:?}: ratio {ratio:.2}");
        let rate = (sent[0] + sent[1]) as f64 / 1.5;
        assert!(
            (0.9..=1.05).contains(&(rate / capacity as f64)),
            "{sent:?}: {rate:.0} bytes/s on a {capacity} bytes/s wire"
        );
    }

    #[test]
    fn a_net_reservation_is_met_while_another_vm_saturates() {
        let dir = tempfile::tempdir().unwrap();
        let big = Ticket {
            shares: 10_000,
            ..Default::default()
        };
        let small = Ticket {
            shares: 100,
            reservation: 6_000_000,
            ..Default::default()
        };
        let sent = send(dir.path(), &[big, small], Some(20_000_000), 1514, 1.0);
        assert!(
            sent[1] >= 5_400_000,
            "{sent:?}: the 6 MB/s reservation got {} bytes in 1 s",
            sent[1]
        );
    }

    #[test]
    fn without_a_capacity_only_the_net_limit_applies() {
        let dir = tempfile::tempdir().unwrap();
        let limited = Ticket {
            shares: 1000,
            limit_bytes_per_sec: Some(3_000_000),
            ..Default::default()
        };
        let free = Ticket {
            shares: 1,
            ..Default::default()
        };
        let sent = send(dir.path(), &[limited, free], None, 1514, 1.0);
        assert!(
            (2_700_000..=3_300_000).contains(&sent[0]),
            "{sent:?}: a 3 MB/s limit"
        );
        assert!(
            sent[1] > 3 * sent[0],
            "{sent:?}: shares divided no capacity"
        );
    }

    #[test]
    fn a_vm_sending_less_than_its_share_leaves_the_rest_of_the_wire_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let capacity = 20_000_000;
        let ticket = Ticket {
            shares: 1000,
            ..Default::default()
        };
        let slow = Clock::join(dir.path(), Class::Net, ticket, Some(capacity)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let pacer = {
            let stop = stop.clone();
            // About 1.5 MB/s: far below its half of the wire.
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    while let Err(wait) = slow.try_admit(1514) {
                        std::thread::sleep(wait.max(Duration::from_millis(1)));
                    }
                    sent += 1514;
                    std::thread::sleep(Duration::from_millis(1));
                }
                sent
            })
        };
        let greedy = send(dir.path(), &[ticket], Some(capacity), 1514, 1.5);
        stop.store(true, Ordering::Relaxed);
        let slow = pacer.join().unwrap();
        let rate = (greedy[0] + slow) as f64 / 1.5;
        assert!(
            rate >= 0.9 * capacity as f64,
            "{greedy:?} and {slow}: {rate:.0} of {capacity} bytes/s used"
        );
    }
}
