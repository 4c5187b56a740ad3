//! Powering on one VM: admission, its cgroup, vCPU placement, memory and its disk and network
//! slots, held
//! for as long as the VM process runs.

use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use crate::resources::Checked;
use crate::{
    Admitted, Cgroup, Class, Clock, HostCapacity, Ledger, LedgerEntry, Resources, Result,
    SchedError, Ticket, Topology,
};

/// Where cgroups are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A VM admitted to this host; dropping it gives its reservations back.
pub struct PowerOn {
    vm: String,
    checked: Checked,
    admitted: Admitted,
    cgroup: Option<Cgroup>,
    disk: Arc<Clock>,
    net: Arc<Clock>,
}

impl PowerOn {
    /// Checks `resources`, refuses the VM if its reservations do not fit in what the host has
    /// left, and otherwise records it and prepares its cgroup and disk slot.
    pub fn admit(
        runtime: &Path,
        vm: &str,
        vcpus: u32,
        memory: u64,
        resources: &Resources,
    ) -> Result<PowerOn> {
        let checked = resources.check(vcpus, memory)?;
        let topology = Topology::read()?;
        let ledger = Ledger::new(runtime);
        let others = ledger.running()?;
        let busy: Vec<usize> = others.iter().flat_map(|e| e.cpus.iter().copied()).collect();
        // Only an SMP VM is pinned: one vCPU gains nothing from a fixed core and would lose
        // the kernel's load balancing.
        let cpus = if vcpus > 1 {
            topology.place(vcpus as usize, &busy)
        } else {
            Vec::new()
        };
        let core_mhz = topology.core_mhz;
        let pool = checked
            .pool
            .as_deref()
            .map(|name| crate::Pool::load(&crate::pools_dir(), name, core_mhz))
            .transpose()?;
        let permille = |a: Option<crate::CpuAmount>| a.map(|a| a.permille(core_mhz));
        let entry = LedgerEntry {
            vm: vm.to_string(),
            pid: std::process::id(),
            vcpus,
            memory_bytes: memory,
            cpu_shares: checked.cpu_shares,
            cpu_reservation_permille: permille(checked.cpu_reservation).unwrap_or(0),
            cpu_limit_permille: permille(checked.cpu_limit),
            memory_reservation_bytes: checked.memory_reservation,
            memory_limit_bytes: checked.memory_limit,
            disk_shares: checked.disk_shares,
            disk_reservation_iops: checked.disk_reservation_iops,
            disk_limit_iops: checked.disk_limit.iops,
            disk_limit_bytes_per_sec: checked.disk_limit.bytes_per_sec,
            net_shares: checked.net_shares,
            net_reservation_bytes_per_sec: checked.net_reservation_bytes_per_sec,
            net_limit_bytes_per_sec: checked.net_limit_bytes_per_sec,
            net_limit_packets_per_sec: checked.net_limit_packets_per_sec,
            pool: pool.clone(),
            cpus,
        };
        let net_capacity = crate::net_capacity()?;
        let capacity = HostCapacity {
            net_bytes_per_sec: net_capacity,
            ..HostCapacity::new(topology.threads(), host_memory()?)
        };
        let admitted = ledger.admit(capacity, entry)?;
        // The pid keeps two hosts' runtime directories (tests, nested setups) apart.
        let group = format!("{vm}-{}", std::process::id());
        let wants = wants_cgroup(&checked)
            || pool
                .as_ref()
                .is_some_and(|p| p.cpu_limit_permille.is_some() || p.memory_limit_bytes.is_some());
        let cgroup = match Cgroup::create(Path::new(CGROUP_ROOT), pool.as_ref(), &group) {
            Ok(cgroup) => cgroup,
            Err(error) if !wants => {
                warn!(vm, %error, "no cgroup for the VM: it runs with the host's defaults");
                None
            }
            Err(error) => return Err(error),
        };
        if cgroup.is_none() && wants {
            return Err(SchedError::Config(format!(
                "this host mounts no cgroup cpu or memory controller under {CGROUP_ROOT} to apply shares or limits with"
            )));
        }
        if let Some(cg) = &cgroup {
            let e = admitted.entry();
            cg.set_cpu_shares(e.cpu_shares)?;
            cg.set_cpu_limit(e.cpu_limit_permille)?;
            cg.set_memory_limit(e.memory_limit_bytes)?;
            cg.add_process()?;
            if !e.cpus.is_empty() {
                cg.set_cpus(&e.cpus)?;
            }
        }
        let disk = Arc::new(Clock::join(
            runtime,
            Class::Disk,
            Ticket {
                shares: checked.disk_shares,
                reservation: checked.disk_reservation_iops,
                limit_ops: checked.disk_limit.iops,
                limit_bytes_per_sec: checked.disk_limit.bytes_per_sec,
            },
            None,
        )?);
        let net = Arc::new(Clock::join(
            runtime,
            Class::Net,
            Ticket {
                shares: checked.net_shares,
                reservation: checked.net_reservation_bytes_per_sec,
                limit_ops: checked.net_limit_packets_per_sec,
                limit_bytes_per_sec: checked.net_limit_bytes_per_sec,
            },
            net_capacity,
        )?);
        info!(vm, cpus = ?admitted.entry().cpus, "admitted");
        Ok(PowerOn {
            vm: vm.to_string(),
            checked,
            admitted,
            cgroup,
            disk,
            net,
        })
    }

    /// The disk scheduler slot every virtio-blk device of the VM goes through.
    pub fn disk_clock(&self) -> Arc<Clock> {
        self.disk.clone()
    }

    /// The network scheduler slot the transmit of every virtio-net device of the VM goes
    /// through: its VM-wide limit and its share of the host's capacity.
    pub fn net_clock(&self) -> Arc<Clock> {
        self.net.clone()
    }

    pub fn entry(&self) -> &LedgerEntry {
        self.admitted.entry()
    }

    /// Once the VM's vCPU threads run: moves them into the cgroup, pins them, backs the
    /// memory reservation and marks guest memory mergeable for KSM.
    /// `ended` says whether the guest has already stopped (its vCPU threads may be gone).
    pub fn attach(&self, guest_memory: &[(usize, usize)], ended: &dyn Fn() -> bool) -> Result<()> {
        match self.place(guest_memory, ended) {
            // A guest that powered off or reset at once took its vCPU threads with it.
            Err(_) if ended() => Ok(()),
            other => other,
        }
    }

    fn place(&self, guest_memory: &[(usize, usize)], ended: &dyn Fn() -> bool) -> Result<()> {
        let expected = self.admitted.entry().vcpus as usize;
        // A new thread names itself once it runs: give the vCPU threads a moment to.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut tids = vcpu_threads()?;
        while tids.len() < expected && std::time::Instant::now() < deadline {
            if ended() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            tids = vcpu_threads()?;
        }
        if tids.len() < expected && !ended() {
            return Err(SchedError::Config(format!(
                "found {} of the VM's {expected} vCPU threads to place",
                tids.len()
            )));
        }
        let cpus = &self.admitted.entry().cpus;
        for (i, tid) in tids.iter().enumerate() {
            if let Some(cg) = &self.cgroup {
                cg.add_thread(*tid)?;
            }
            if let Some(&cpu) = cpus.get(i) {
                pin(*tid, cpu).map_err(|source| SchedError::Io {
                    path: format!("/proc/self/task/{tid}").into(),
                    what: format!("pinning vCPU {i} to CPU {cpu}"),
                    source,
                })?;
            }
        }
        let mut left = self.checked.memory_reservation as usize;
        for &(addr, len) in guest_memory {
            // SAFETY: the range is guest memory the VM mapped and keeps mapped while it runs;
            // these advise the kernel and fault pages in, they change no contents.
            unsafe {
                if libc::madvise(addr as *mut libc::c_void, len, libc::MADV_MERGEABLE) != 0 {
                    warn!(vm = %self.vm, error = %std::io::Error::last_os_error(), "KSM cannot merge this VM's memory");
                }
                let n = left.min(len);
                if n > 0 {
                    if libc::mlock(addr as *const libc::c_void, n) != 0 {
                        // Locking needs CAP_IPC_LOCK or RLIMIT_MEMLOCK: fault it in instead.
                        warn!(vm = %self.vm, error = %std::io::Error::last_os_error(), "memory reservation faulted in but not locked");
                        if libc::madvise(addr as *mut libc::c_void, n, MADV_POPULATE_WRITE) != 0 {
                            return Err(SchedError::Io {
                                path: "guest memory".into(),
                                what: format!(
                                    "backing the {} byte memory reservation",
                                    self.checked.memory_reservation
                                ),
                                source: std::io::Error::last_os_error(),
                            });
                        }
                    }
                    left -= n;
                }
            }
        }
        Ok(())
    }
}

/// Linux 5.14's MADV_POPULATE_WRITE: fault pages in writable without touching their contents.
const MADV_POPULATE_WRITE: libc::c_int = 23;

fn wants_cgroup(c: &Checked) -> bool {
    c.cpu_limit.is_some() || c.memory_limit.is_some()
}

/// The threads of this process named `vcpuN`, in vCPU order.
pub fn vcpu_threads() -> Result<Vec<i32>> {
    let dir = Path::new("/proc/self/task");
    let list = std::fs::read_dir(dir).map_err(crate::error::io(dir, "listing threads"))?;
    let mut found = Vec::new();
    for task in list.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let Some(n) = comm
            .trim()
            .strip_prefix("vcpu")
            .and_then(|n| n.parse::<u32>().ok())
        {
            found.push((n, tid));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, tid)| tid).collect())
}

fn pin(tid: i32, cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// MemTotal from /proc/meminfo.
pub fn host_memory() -> Result<u64> {
    let path = Path::new("/proc/meminfo");
    let text = std::fs::read_to_string(path).map_err(crate::error::io(path, "reading"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| SchedError::Parse {
            path: path.into(),
            reason: "no MemTotal line".into(),
        })
}

/// KSM: pages this process has merged (Linux 6.1+), and host-wide pages shared and sharing.
pub fn ksm_pages(pid: u32) -> (Option<u64>, Option<u64>, Option<u64>) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let merged = std::fs::read_to_string(format!("/proc/{pid}/ksm_merging_pages"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    (
        merged,
        read("/sys/kernel/mm/ksm/pages_shared"),
        read("/sys/kernel/mm/ksm/pages_sharing"),
    )
}
