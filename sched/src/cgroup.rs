//! One VM's cgroup: `vapp/<vm>-<pid>` (or `vapp/pool-<pool>/<vm>-<pid>`) under each
//! controller the host mounts. Under cgroup v1
//! (one hierarchy per controller, as these hosts have) only the vCPU threads join `cpu`,
//! `cpuacct` and `cpuset`, so the VMM's own threads are not weighed against the guest; the
//! whole process joins `memory`, which charges per process. v2 moves the whole process.

use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::error::io;
use crate::{Pool, Result};

/// The CFS period vapp uses for quotas: 100 ms, the kernel's default.
pub const PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

#[derive(Debug)]
pub struct Cgroup {
    version: CgroupVersion,
    /// v1: one directory per controller (cpu, cpuset, memory); v2: one directory.
    dirs: Vec<(&'static str, PathBuf)>,
    /// Created by this process, so removed when it ends.
    owned: bool,
}

impl Cgroup {
    /// Which cgroup version `root` (normally /sys/fs/cgroup) holds, if any.
    pub fn detect(root: &Path) -> Option<CgroupVersion> {
        if root.join("cgroup.controllers").exists() {
            Some(CgroupVersion::V2)
        } else if root.join("cpu/cpu.shares").exists() {
            Some(CgroupVersion::V1)
        } else {
            None
        }
    }

    /// Creates (or reuses) `vapp/<vm>` under `root`, or `vapp/pool-<pool>/<vm>` with the
    /// pool's shares and limits on the pool's group.
    pub fn create(root: &Path, pool: Option<&Pool>, vm: &str) -> Result<Option<Cgroup>> {
        let Some(version) = Cgroup::detect(root) else {
            return Ok(None);
        };
        let name = sanitize(vm);
        let parents = parents(pool.map(|p| p.name.as_str()));
        let dirs = match version {
            CgroupVersion::V2 => {
                // Each parent must hand cpu, cpuset and memory down to the groups below it.
                let mut at = root.to_path_buf();
                for parent in &parents {
                    let control = at.join("cgroup.subtree_control");
                    at = at.join(parent);
                    mkdir(&at)?;
                    if let Err(e) = write(&control, "+cpu +cpuset +memory") {
                        warn!(%e, "cannot enable cgroup v2 controllers for vapp");
                    }
                }
                if let Err(e) = write(&at.join("cgroup.subtree_control"), "+cpu +cpuset +memory") {
                    warn!(%e, "cannot enable cgroup v2 controllers for vapp");
                }
                vec![("unified", at.join(&name))]
            }
            CgroupVersion::V1 => ["cpu", "cpuacct", "cpuset", "memory"]
                .into_iter()
                .filter(|c| root.join(c).is_dir())
                .map(|c| {
                    (
                        c,
                        parents
                            .iter()
                            .fold(root.join(c), |d, p| d.join(p))
                            .join(&name),
                    )
                })
                .collect(),
        };
        for (controller, dir) in &dirs {
            let base = match version {
                CgroupVersion::V2 => root.to_path_buf(),
                CgroupVersion::V1 => root.join(controller),
            };
            let mut at = base;
            for parent in &parents {
                let above = at.clone();
                at = at.join(parent);
                mkdir(&at)?;
                if *controller == "cpuset" {
                    // A v1 cpuset with empty cpus or mems refuses tasks: inherit the parent's.
                    inherit(above, &at)?;
                }
            }
            remove_stale(&at);
            mkdir(dir)?;
            if *controller == "cpuset" {
                inherit(at, dir)?;
            }
        }
        if let Some(pool) = pool {
            let group = Cgroup {
                version,
                dirs: dirs
                    .iter()
                    .filter_map(|(c, d)| d.parent().map(|p| (*c, p.to_path_buf())))
                    .collect(),
                owned: false,
            };
            group.set_cpu_shares(pool.cpu_shares)?;
            group.set_cpu_limit(pool.cpu_limit_permille)?;
            group.set_memory_limit(pool.memory_limit_bytes)?;
        }
        debug!(
            vm,
            ?version,
            pool = pool.map(|p| p.name.as_str()),
            "cgroup ready"
        );
        Ok(Some(Cgroup {
            version,
            dirs,
            owned: true,
        }))
    }

    /// Another process's VM cgroup (or, with `vm` None, a pool's), to read its use; None if
    /// it has none.
    pub fn open(root: &Path, pool: Option<&str>, vm: Option<&str>) -> Option<Cgroup> {
        let version = Cgroup::detect(root)?;
        let mut parts = parents(pool);
        if let Some(vm) = vm {
            parts.push(sanitize(vm));
        }
        let path = |base: PathBuf| parts.iter().fold(base, |d, p| d.join(p));
        let dirs: Vec<_> = match version {
            CgroupVersion::V2 => vec![("unified", path(root.to_path_buf()))],
            CgroupVersion::V1 => ["cpu", "cpuacct", "cpuset", "memory"]
                .into_iter()
                .map(|c| (c, path(root.join(c))))
                .collect(),
        };
        let dirs: Vec<_> = dirs.into_iter().filter(|(_, d)| d.is_dir()).collect();
        (!dirs.is_empty()).then_some(Cgroup {
            version,
            dirs,
            owned: false,
        })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| *c == controller || *c == "unified")
            .map(|(_, d)| d.as_path())
    }

    /// Relative weight: v1 cpu.shares as ESX counts shares; v2 maps it onto cpu.weight
    /// (1..10000, 100 is the default for 1024 v1 shares).
    pub fn set_cpu_shares(&self, shares: u64) -> Result<()> {
        let Some(dir) = self.dir("cpu") else {
            return Ok(());
        };
        match self.version {
            CgroupVersion::V1 => write(
                &dir.join("cpu.shares"),
                &shares.clamp(2, 262_144).to_string(),
            ),
            CgroupVersion::V2 => {
                let weight = (shares * 100 / 1024).clamp(1, 10_000);
                write(&dir.join("cpu.weight"), &weight.to_string())
            }
        }
    }

    /// A ceiling in per mille of one core (1500 is one and a half cores); None lifts it.
    pub fn set_cpu_limit(&self, permille: Option<u64>) -> Result<()> {
        let Some(dir) = self.dir("cpu") else {
            return Ok(());
        };
        let quota = permille.map(|p| (p * PERIOD_US / 1000).max(1000));
        match self.version {
            CgroupVersion::V1 => {
                write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                let q = quota.map(|q| q.to_string()).unwrap_or_else(|| "-1".into());
                write(&dir.join("cpu.cfs_quota_us"), &q)
            }
            CgroupVersion::V2 => {
                let q = quota.map(|q| q.to_string()).unwrap_or_else(|| "max".into());
                write(&dir.join("cpu.max"), &format!("{q} {PERIOD_US}"))
            }
        }
    }

    pub fn set_cpus(&self, cpus: &[usize]) -> Result<()> {
        let Some(dir) = self.dir("cpuset") else {
            return Ok(());
        };
        let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
        write(&dir.join("cpuset.cpus"), &list.join(","))
    }

    pub fn set_memory_limit(&self, bytes: Option<u64>) -> Result<()> {
        let Some(dir) = self.dir("memory") else {
            return Ok(());
        };
        match self.version {
            CgroupVersion::V1 => {
                let v = bytes.map(|b| b.to_string()).unwrap_or_else(|| "-1".into());
                write(&dir.join("memory.limit_in_bytes"), &v)
            }
            CgroupVersion::V2 => {
                let v = bytes.map(|b| b.to_string()).unwrap_or_else(|| "max".into());
                write(&dir.join("memory.max"), &v)
            }
        }
    }

    /// Memory the group is charged for now, in bytes.
    pub fn memory_usage(&self) -> Option<u64> {
        let dir = self.dir("memory")?;
        let file = match self.version {
            CgroupVersion::V1 => "memory.usage_in_bytes",
            CgroupVersion::V2 => "memory.current",
        };
        std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// CPU time used by the group, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V1 => {
                let dir = self.dir("cpuacct")?;
                std::fs::read_to_string(dir.join("cpuacct.usage"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            }
            CgroupVersion::V2 => {
                let text = std::fs::read_to_string(self.dir("cpu")?.join("cpu.stat")).ok()?;
                let us: u64 = text
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))?
                    .trim()
                    .parse()
                    .ok()?;
                Some(us * 1000)
            }
        }
    }

    /// Moves this whole process into the memory group (v1) or the group (v2). Memory is
    /// charged per process, not per thread, and only from the move on: call it before guest
    /// memory is faulted in.
    pub fn add_process(&self) -> Result<()> {
        let pid = std::process::id().to_string();
        match self.version {
            CgroupVersion::V1 => match self.dir("memory") {
                Some(dir) => write(&dir.join("cgroup.procs"), &pid),
                None => Ok(()),
            },
            CgroupVersion::V2 => match self.dir("unified") {
                Some(dir) => write(&dir.join("cgroup.procs"), &pid),
                None => Ok(()),
            },
        }
    }

    /// Moves thread `tid` into the v1 cpu, cpuacct and cpuset groups, so only the vCPUs are
    /// weighed, limited and placed; under v2 the process is already in (see `add_process`).
    pub fn add_thread(&self, tid: i32) -> Result<()> {
        if self.version == CgroupVersion::V2 {
            return Ok(());
        }
        for (controller, dir) in self.dirs.iter().filter(|(c, _)| *c != "memory") {
            write(&dir.join("tasks"), &tid.to_string())?;
            debug!(controller, tid, "thread moved into the VM's cgroup");
        }
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The vCPU threads have exited by now; the process leaves its memory group for the
        // root so the groups are empty and can go.
        if self.owned {
            for (controller, dir) in &self.dirs {
                if matches!(*controller, "memory" | "unified") {
                    let vapp = dir
                        .ancestors()
                        .find(|a| a.file_name().is_some_and(|n| n == "vapp"));
                    if let Some(root) = vapp.and_then(Path::parent) {
                        let _ = std::fs::write(
                            root.join("cgroup.procs"),
                            std::process::id().to_string(),
                        );
                    }
                }
            }
        }
        for (_, dir) in self.dirs.iter().filter(|_| self.owned) {
            let _ = std::fs::remove_dir(dir);
            // The last VM of a pool takes the pool's group with it; while others run, the
            // group is not empty and stays.
            if let Some(pool) = dir.parent().filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("pool-"))
            }) {
                let _ = std::fs::remove_dir(pool);
            }
        }
    }
}

/// The groups above a VM's: `vapp`, then `pool-<name>` for a VM in a pool.
fn parents(pool: Option<&str>) -> Vec<String> {
    let mut parents = vec!["vapp".to_string()];
    parents.extend(pool.map(|p| format!("pool-{}", sanitize(p))));
    parents
}

fn sanitize(vm: &str) -> String {
    vm.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Groups `<vm>-<pid>` of VM processes that died without removing theirs (killed with -9).
fn remove_stale(parent: &Path) {
    let Ok(list) = std::fs::read_dir(parent) else {
        return;
    };
    for item in list.flatten() {
        let name = item.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(item.path());
        }
    }
}

fn mkdir(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(dir, "creating a cgroup")(e)),
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(io(path, format!("writing {value:?}")))
}

fn inherit(from: PathBuf, to: &Path) -> Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let current = std::fs::read_to_string(to.join(file)).unwrap_or_default();
        if current.trim().is_empty() {
            let value =
                std::fs::read_to_string(from.join(file)).map_err(io(from.join(file), "reading"))?;
            write(&to.join(file), value.trim())?;
        }
    }
    Ok(())
}
