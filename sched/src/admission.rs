//! Admission control: a VM powers on only if its reservations fit in what the host has left
//! after a host reserve and the reservations of the VMs already running. The running VMs are
//! files `<runtime>/sched/vms/<vm>.json` written under an exclusive lock on
//! `<runtime>/sched/ledger.lock`; an entry whose process is gone no longer counts.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::io;
use crate::{Pool, Result, SchedError};

/// What the host can guarantee: its CPUs and memory, less what it keeps for itself.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HostCapacity {
    /// Per mille of one core: 2000 is two cores.
    pub cpu_permille: u64,
    pub memory_bytes: u64,
    /// Kept for the host: ESX keeps some for its own services, we keep a core's tenth and
    /// the larger of 256 MiB and 5 % of memory.
    pub cpu_reserve_permille: u64,
    pub memory_reserve_bytes: u64,
    /// Transmit bytes/s the host's VMs share (`VAPP_NET_CAPACITY`); None: not set, so no
    /// network reservation can be guaranteed.
    pub net_bytes_per_sec: Option<u64>,
}

impl HostCapacity {
    pub fn new(cpus: usize, memory_bytes: u64) -> HostCapacity {
        HostCapacity {
            cpu_permille: cpus as u64 * 1000,
            memory_bytes,
            cpu_reserve_permille: 100,
            memory_reserve_bytes: (256 << 20).max(memory_bytes / 20),
            net_bytes_per_sec: None,
        }
    }
}

/// One running VM's reservations and settings, as `host resources` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
// Entries written before a field existed read it as its default.
#[serde(default)]
pub struct LedgerEntry {
    pub vm: String,
    pub pid: u32,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub cpu_shares: u64,
    pub cpu_reservation_permille: u64,
    pub cpu_limit_permille: Option<u64>,
    pub memory_reservation_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    pub disk_shares: u64,
    pub disk_reservation_iops: u64,
    pub disk_limit_iops: Option<u64>,
    pub disk_limit_bytes_per_sec: Option<u64>,
    pub net_shares: u64,
    pub net_reservation_bytes_per_sec: u64,
    pub net_limit_bytes_per_sec: Option<u64>,
    pub net_limit_packets_per_sec: Option<u64>,
    /// The resource pool it runs in, as the pool was when the VM powered on.
    pub pool: Option<Pool>,
    /// The logical CPUs its vCPUs are pinned to.
    pub cpus: Vec<usize>,
}

pub struct Ledger {
    dir: PathBuf,
}

/// A VM's place in the ledger; dropping it (the VM ended) frees its reservations.
#[derive(Debug)]
pub struct Admitted {
    path: PathBuf,
    entry: LedgerEntry,
}

impl Admitted {
    pub fn entry(&self) -> &LedgerEntry {
        &self.entry
    }

    /// Records what was decided after admission (the CPUs chosen).
    pub fn update(&mut self, entry: LedgerEntry) -> Result<()> {
        self.entry = entry;
        write_entry(&self.path, &self.entry)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Ledger {
    /// The ledger under the runtime directory `runtime`.
    pub fn new(runtime: &Path) -> Ledger {
        Ledger {
            dir: runtime.join("sched"),
        }
    }

    fn vms(&self) -> PathBuf {
        self.dir.join("vms")
    }

    /// The running VMs' entries (stale ones, whose process died, are removed).
    pub fn running(&self) -> Result<Vec<LedgerEntry>> {
        let dir = self.vms();
        let mut out = Vec::new();
        let list = match std::fs::read_dir(&dir) {
            Ok(list) => list,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&dir, "listing running VMs")(e)),
        };
        for item in list.flatten() {
            let path = item.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(entry) = serde_json::from_str::<LedgerEntry>(&text) else {
                tracing::warn!(path = %path.display(), "ignoring an unreadable ledger entry");
                continue;
            };
            if alive(entry.pid) {
                out.push(entry);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        out.sort_by(|a, b| a.vm.cmp(&b.vm));
        Ok(out)
    }

    /// Admits `entry` if its reservations fit, recording it; refuses naming the resource.
    pub fn admit(&self, capacity: HostCapacity, entry: LedgerEntry) -> Result<Admitted> {
        std::fs::create_dir_all(self.vms()).map_err(io(self.vms(), "creating the ledger"))?;
        let lock_path = self.dir.join("ledger.lock");
        let lock = File::create(&lock_path).map_err(io(&lock_path, "opening the ledger lock"))?;
        // SAFETY: flock on a descriptor we own; it is released when `lock` closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(io(&lock_path, "locking the ledger")(
                std::io::Error::last_os_error(),
            ));
        }
        let others: Vec<LedgerEntry> = self
            .running()?
            .into_iter()
            .filter(|e| e.vm != entry.vm)
            .collect();
        let pct = |p: u64| format!("{}% of a core", p / 10);
        let mib = |b: u64| format!("{} MiB", b >> 20);
        fit(
            &entry,
            &others,
            Kind {
                resource: "CPU",
                vm: |e| e.cpu_reservation_permille,
                pool: |p| p.cpu_reservation_permille,
                total: capacity.cpu_permille,
                reserve: capacity.cpu_reserve_permille,
                show: &pct,
            },
        )?;
        fit(
            &entry,
            &others,
            Kind {
                resource: "memory",
                vm: |e| e.memory_reservation_bytes,
                pool: |p| p.memory_reservation_bytes,
                total: capacity.memory_bytes,
                reserve: capacity.memory_reserve_bytes,
                show: &mib,
            },
        )?;
        let net_reserved: u64 = others.iter().map(|e| e.net_reservation_bytes_per_sec).sum();
        if entry.net_reservation_bytes_per_sec > 0 {
            let wanted = rate(entry.net_reservation_bytes_per_sec);
            let Some(net) = capacity.net_bytes_per_sec else {
                return Err(SchedError::Admission {
                    vm: entry.vm,
                    resource: "network",
                    detail: format!(
                        "of {wanted} cannot be guaranteed: the host's transmit capacity is not set ({})",
                        crate::NET_CAPACITY_ENV
                    ),
                });
            };
            let net_left = net.saturating_sub(net_reserved);
            if entry.net_reservation_bytes_per_sec > net_left {
                return Err(SchedError::Admission {
                    vm: entry.vm,
                    resource: "network",
                    detail: refusal(
                        wanted,
                        rate(net),
                        rate(0),
                        rate(net_reserved),
                        rate(net_left),
                    ),
                });
            }
        }
        let path = self
            .vms()
            .join(format!("{}.json", entry.vm.replace('/', "_")));
        write_entry(&path, &entry)?;
        Ok(Admitted { path, entry })
    }
}

/// One resource as admission weighs it.
struct Kind<'a> {
    resource: &'static str,
    vm: fn(&LedgerEntry) -> u64,
    pool: fn(&Pool) -> u64,
    total: u64,
    reserve: u64,
    show: &'a dyn Fn(u64) -> String,
}

/// Whether `entry`'s reservation of one resource fits. A pool that sets a reservation holds it
/// against the host once, while any of its VMs runs, and its VMs' reservations come out of it;
/// the VMs of a pool without one reserve from the host as any VM does.
fn fit(entry: &LedgerEntry, others: &[LedgerEntry], kind: Kind<'_>) -> Result<()> {
    let reserving = |e: &LedgerEntry| e.pool.as_ref().filter(|p| (kind.pool)(p) > 0).cloned();
    let mut pools: Vec<String> = Vec::new();
    let mut held = 0;
    for e in others {
        match reserving(e) {
            Some(p) if pools.contains(&p.name) => {}
            Some(p) => {
                held += (kind.pool)(&p);
                pools.push(p.name);
            }
            None => held += (kind.vm)(e),
        }
    }
    let left = kind.total.saturating_sub(kind.reserve).saturating_sub(held);
    let show = kind.show;
    let refuse = |detail| SchedError::Admission {
        vm: entry.vm.clone(),
        resource: kind.resource,
        detail,
    };
    let wanted = (kind.vm)(entry);
    let Some(pool) = reserving(entry) else {
        if wanted > left {
            return Err(refuse(refusal(
                show(wanted),
                show(kind.total),
                show(kind.reserve),
                show(held),
                show(left),
            )));
        }
        return Ok(());
    };
    let pool_reservation = (kind.pool)(&pool);
    if !pools.contains(&pool.name) && pool_reservation > left {
        return Err(refuse(refusal(
            format!("{} (pool {}'s)", show(pool_reservation), pool.name),
            show(kind.total),
            show(kind.reserve),
            show(held),
            show(left),
        )));
    }
    let in_pool: u64 = others
        .iter()
        .filter(|e| e.pool.as_ref().is_some_and(|p| p.name == pool.name))
        .map(kind.vm)
        .sum();
    let pool_left = pool_reservation.saturating_sub(in_pool);
    if wanted > pool_left {
        return Err(refuse(format!(
            "of {} does not fit in pool {}: the pool reserves {} and its running VMs have {} of it, leaving {}",
            show(wanted),
            pool.name,
            show(pool_reservation),
            show(in_pool),
            show(pool_left)
        )));
    }
    Ok(())
}

fn refusal(
    wanted: String,
    total: String,
    reserve: String,
    reserved: String,
    left: String,
) -> String {
    format!(
        "of {wanted} does not fit: the host has {total}, keeps {reserve} for itself and has {reserved} reserved by running VMs, leaving {left}"
    )
}

/// Bytes per second in the unit the operator most likely wrote.
fn rate(b: u64) -> String {
    if b > 0 && b % (1 << 20) == 0 {
        format!("{} MiB/s", b >> 20)
    } else if b > 0 && b % 1_000_000 == 0 {
        format!("{} MB/s", b / 1_000_000)
    } else {
        format!("{b} bytes/s")
    }
}

fn write_entry(path: &Path, entry: &LedgerEntry) -> Result<()> {
    let text = serde_json::to_string_pretty(entry).map_err(|e| SchedError::Parse {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp, "writing a ledger entry"))?;
    std::fs::rename(&tmp, path).map_err(io(path, "writing a ledger entry"))
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vm: &str, cpu: u64, mem: u64) -> LedgerEntry {
        LedgerEntry {
            vm: vm.into(),
            pid: std::process::id(),
            cpu_reservation_permille: cpu,
            memory_reservation_bytes: mem,
            ..Default::default()
        }
    }

    #[test]
    fn reservations_are_refused_once_the_host_is_full_and_freed_when_a_vm_ends() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path());
        let host = HostCapacity::new(2, 4 << 30);
        let a = ledger.admit(host, entry("a", 1500, 2 << 30)).unwrap();
        let err = ledger
            .admit(host, entry("b", 500, 0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot power on b: its CPU reservation of 50% of a core"),
            "{err}"
        );
        assert!(err.contains("leaving 40% of a core"), "{err}");
        let err = ledger
            .admit(host, entry("c", 0, 2 << 30))
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory reservation of 2048 MiB"), "{err}");
        assert!(
            err.contains("keeps 256 MiB") && err.contains("leaving 1792 MiB"),
            "{err}"
        );
        assert_eq!(ledger.running().unwrap().len(), 1);
        drop(a);
        ledger.admit(host, entry("b", 500, 2 << 30)).unwrap();
    }

    #[test]
    fn a_dead_process_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path());
        let host = HostCapacity::new(1, 1 << 30);
        let a = ledger
            .admit(
                host,
                LedgerEntry {
                    pid: u32::MAX - 1,
                    ..entry("a", 900, 0)
                },
            )
            .unwrap();
        std::mem::forget(a);
        ledger.admit(host, entry("b", 900, 0)).unwrap();
    }

    #[test]
    fn net_reservations_fit_in_the_host_capacity_or_are_refused_with_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path());
        let net = |vm: &str, bps| LedgerEntry {
            net_reservation_bytes_per_sec: bps,
            ..entry(vm, 0, 0)
        };
        let unset = HostCapacity::new(2, 4 << 30);
        let err = ledger
            .admit(unset, net("a", 1 << 20))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its network reservation of 1 MiB/s cannot be guaranteed")
                && err.contains("VAPP_NET_CAPACITY"),
            "{err}"
        );
        let host = HostCapacity {
            net_bytes_per_sec: Some(10 << 20),
            ..unset
        };
        let _a = ledger.admit(host, net("a", 6 << 20)).unwrap();
        let err = ledger
            .admit(host, net("b", 6 << 20))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot power on b: its network reservation of 6 MiB/s does not fit: the host has 10 MiB/s")
                && err.contains("6 MiB/s reserved by running VMs, leaving 4 MiB/s"),
            "{err}"
        );
        ledger.admit(host, net("c", 4 << 20)).unwrap();
    }

    #[test]
    fn a_pool_holds_its_reservation_once_and_its_vms_reserve_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path());
        let host = HostCapacity::new(2, 4 << 30);
        let web = Pool {
            name: "web".into(),
            cpu_reservation_permille: 1000,
            ..Default::default()
        };
        let in_web = |vm: &str, cpu| LedgerEntry {
            pool: Some(web.clone()),
            ..entry(vm, cpu, 0)
        };
        let _a = ledger.admit(host, in_web("a", 600)).unwrap();
        let _b = ledger.admit(host, in_web("b", 400)).unwrap();
        let err = ledger
            .admit(host, in_web("c", 100))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its CPU reservation of 10% of a core does not fit in pool web: the pool reserves 100% of a core and its running VMs have 100% of a core of it, leaving 0% of a core"),
            "{err}"
        );
        // The host has 190 % less the pool's 100 %: 90 % is left outside the pool.
        let err = ledger
            .admit(host, entry("d", 1000, 0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("100% of a core reserved by running VMs, leaving 90% of a core"),
            "{err}"
        );
        let _d = ledger.admit(host, entry("d", 900, 0)).unwrap();
        let db = Pool {
            name: "db".into(),
            cpu_reservation_permille: 500,
            ..Default::default()
        };
        let err = ledger
            .admit(
                host,
                LedgerEntry {
                    pool: Some(db),
                    ..entry("e", 0, 0)
                },
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its CPU reservation of 50% of a core (pool db's) does not fit"),
            "{err}"
        );
    }
}
