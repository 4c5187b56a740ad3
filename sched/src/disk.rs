//! The disk I/O scheduler of one host: mClock (Gulati, Merchant, Varman, OSDI 2010) spread
//! over the separate processes of the host's VMs.
//!
//! Every VM process maps the same file, `<runtime>/sched/disk.clock`, and owns one slot in it
//! (claimed under `flock`, freed when the process exits: a slot whose pid is gone is free).
//! A slot holds the VM's settings and mClock's three tags as atomics:
//!
//! - reservation: the earliest time the VM's next I/O is owed to it (`R`); an I/O whose `R` has
//!   come is dispatched at once, whatever the other VMs do, and is not charged to `P`.
//! - limit: the earliest time the next I/O may go (`L`, for IOPS and for bytes/s); before that
//!   the VM waits even on an idle disk.
//! - proportional: a virtual-time start tag (`P`, start-time fair queueing); an I/O goes when
//!   its tag is the smallest among the VMs that issued I/O in the last [`ACTIVE_NS`], so
//!   backlogged VMs are served in proportion to their shares. A VM that was idle restarts at
//!   the smallest tag of the active ones and cannot bank credit while idle.
//!
//! There is no broker process to crash or restart: the disk itself is the arbiter's clock
//! (CLOCK_MONOTONIC is host-wide), and each process decides for its own I/O. The layout is
//! in sched/README.md.

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
/// A VM that issued no I/O for this long is idle: others stop waiting for it.
pub const ACTIVE_NS: u64 = 20_000_000;
/// How far behind its limit a VM may fall and still catch up, as a token bucket's burst.
pub const LIMIT_BURST_NS: u64 = 20_000_000;
/// Virtual time one I/O costs a VM of one share.
const TAG_UNIT: u64 = 1 << 40;

// Word offsets in a slot.
const PID: usize = 0;
const SHARES: usize = 1;
const RESERVATION: usize = 2;
const LIMIT_IOPS: usize = 3;
const LIMIT_BPS: usize = 4;
const R_NEXT: usize = 5;
const L_NEXT: usize = 6;
const LB_NEXT: usize = 7;
const P_LAST: usize = 8;
const ACTIVE: usize = 9;
const IOS: usize = 10;
const BYTES: usize = 11;
const RESERVED_IOS: usize = 12;
const WAIT_NS: usize = 13;

/// One VM's share of the host's disk scheduler.
pub struct DiskClock {
    path: PathBuf,
    map: MmapMut,
    slot: usize,
}

/// Settings of one VM.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DiskTicket {
    pub shares: u64,
    pub reservation_iops: u64,
    pub limit_iops: Option<u64>,
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

impl DiskClock {
    /// Joins the scheduler of the host whose runtime directory is `runtime`.
    pub fn join(runtime: &Path, ticket: DiskTicket) -> Result<DiskClock> {
        let dir = runtime.join("sched");
        std::fs::create_dir_all(&dir).map_err(io(&dir, "creating the scheduler directory"))?;
        let path = dir.join("disk.clock");
        let map = map(&path)?;
        let file = std::fs::File::open(&path).map_err(io(&path, "opening"))?;
        // SAFETY: flock on a descriptor we own; released when `file` closes below.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            return Err(io(&path, "locking")(std::io::Error::last_os_error()));
        }
        let mut clock = DiskClock {
            path: path.clone(),
            map,
            slot: usize::MAX,
        };
        if clock.header(0).load(Ordering::Acquire) != MAGIC {
            clock.header(1).store(VERSION, Ordering::Release);
            clock.header(0).store(MAGIC, Ordering::Release);
        }
        let me = std::process::id() as u64;
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
            .store(ticket.reservation_iops, Ordering::Relaxed);
        clock
            .mine(LIMIT_IOPS)
            .store(ticket.limit_iops.unwrap_or(0), Ordering::Relaxed);
        clock
            .mine(LIMIT_BPS)
            .store(ticket.limit_bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
        clock.mine(PID).store(me, Ordering::Release);
        drop(file);
        Ok(clock)
    }

    /// Every live slot's counters, keyed by pid: what `host resources` reads.
    pub fn usage(runtime: &Path) -> Result<Vec<SlotUse>> {
        let path = runtime.join("sched/disk.clock");
        if !path.exists() {
            return Ok(Vec::new());
        }
        let clock = DiskClock {
            map: map(&path)?,
            path,
            slot: usize::MAX,
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
        let shares = self.mine(SHARES).load(Ordering::Relaxed).max(1);
        let reservation = self.mine(RESERVATION).load(Ordering::Relaxed);
        let limit_iops = self.mine(LIMIT_IOPS).load(Ordering::Relaxed);
        let limit_bps = self.mine(LIMIT_BPS).load(Ordering::Relaxed);
        let mut t = start;
        loop {
            self.mine(ACTIVE).store(t, Ordering::Release);
            // Limit: never before L, even on an idle disk.
            let l = self
                .mine(L_NEXT)
                .load(Ordering::Relaxed)
                .max(self.mine(LB_NEXT).load(Ordering::Relaxed));
            if l > t {
                std::thread::sleep(Duration::from_nanos((l - t).min(50_000_000)));
                t = now();
                continue;
            }
            // Reservation: owed now, whatever the others do.
            let r = self.mine(R_NEXT).load(Ordering::Relaxed);
            if reservation > 0 && r <= t {
                self.mine(R_NEXT).store(
                    r.max(t.saturating_sub(1_000_000_000 / reservation))
                        + 1_000_000_000 / reservation,
                    Ordering::Relaxed,
                );
                self.mine(RESERVED_IOS).fetch_add(1, Ordering::Relaxed);
                break;
            }
            // Proportional: the smallest start tag among the active VMs goes.
            let (my_tag, others_min) = self.tags(t, shares);
            if others_min.is_none_or(|(tag, slot)| (my_tag, self.slot) < (tag, slot)) {
                self.mine(P_LAST).store(my_tag, Ordering::Release);
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
            t = now();
        }
        if let Some(period) = 1_000_000_000u64.checked_div(limit_iops) {
            // A VM descheduled for a moment may catch up (so the average over a second is the
            // limit), but an idle one banks no more than LIMIT_BURST_NS of I/O.
            let l = self
                .mine(L_NEXT)
                .load(Ordering::Relaxed)
                .max(t.saturating_sub(period.max(LIMIT_BURST_NS)));
            self.mine(L_NEXT).store(l + period, Ordering::Relaxed);
        }
        if let Some(cost) = bytes.saturating_mul(1_000_000_000).checked_div(limit_bps) {
            let l = self
                .mine(LB_NEXT)
                .load(Ordering::Relaxed)
                .max(t.saturating_sub(cost.max(LIMIT_BURST_NS)));
            self.mine(LB_NEXT).store(l + cost, Ordering::Relaxed);
        }
        self.mine(IOS).fetch_add(1, Ordering::Relaxed);
        self.mine(BYTES).fetch_add(bytes, Ordering::Relaxed);
        self.mine(WAIT_NS).fetch_add(t - start, Ordering::Relaxed);
    }

    /// This VM's next start tag and the smallest next tag of another active VM.
    fn tags(&self, t: u64, shares: u64) -> (u64, Option<(u64, usize)>) {
        let mut last_min: Option<u64> = None;
        let mut next_min: Option<(u64, usize)> = None;
        for s in (0..SLOTS).filter(|&s| s != self.slot) {
            if self.word(s, PID).load(Ordering::Acquire) == 0 {
                continue;
            }
            let active = self.word(s, ACTIVE).load(Ordering::Acquire);
            if active == 0 || t.saturating_sub(active) > ACTIVE_NS {
                continue;
            }
            let last = self.word(s, P_LAST).load(Ordering::Acquire);
            let step = TAG_UNIT / self.word(s, SHARES).load(Ordering::Relaxed).max(1);
            last_min = Some(last_min.map_or(last, |m| m.min(last)));
            let next = (last + step, s);
            next_min = Some(next_min.map_or(next, |m| m.min(next)));
        }
        let mine = self.mine(P_LAST).load(Ordering::Acquire) + TAG_UNIT / shares;
        // A VM coming back from idle starts level with the active ones: no banked credit.
        let mine = last_min.map_or(mine, |m| mine.max(m));
        if self.mine(P_LAST).load(Ordering::Relaxed) < mine.saturating_sub(TAG_UNIT / shares) {
            self.mine(P_LAST)
                .store(mine - TAG_UNIT / shares, Ordering::Release);
        }
        (mine, next_min)
    }
}

impl Drop for DiskClock {
    fn drop(&mut self) {
        if self.slot < SLOTS {
            self.mine(PID).store(0, Ordering::Release);
        }
    }
}

fn map(path: &Path) -> Result<MmapMut> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io(path, "opening the disk scheduler clock"))?;
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
    fn run(runtime: &Path, tickets: &[DiskTicket], service: Duration, secs: f64) -> Vec<u64> {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = tickets
            .iter()
            .map(|&ticket| {
                let clock = DiskClock::join(runtime, ticket).unwrap();
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
            &[DiskTicket {
                shares: 1000,
                limit_iops: Some(200),
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
        let t = |shares| DiskTicket {
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
        let big = DiskTicket {
            shares: 10_000,
            ..Default::default()
        };
        let small = DiskTicket {
            shares: 100,
            reservation_iops: 300,
            ..Default::default()
        };
        let n = run(dir.path(), &[big, small], Duration::from_micros(500), 1.0);
        assert!(
            n[1] >= 270,
            "{n:?}: the 300 IOPS reservation got {} I/Os in 1 s",
            n[1]
        );
    }
}
