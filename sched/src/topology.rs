//! The host's CPUs as sysfs describes them: which logical CPUs are hyperthreads of one core,
//! which cores share a package.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::io;
use crate::{Result, SchedError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cpu {
    pub cpu: usize,
    pub core: usize,
    pub package: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    pub cpus: Vec<Cpu>,
    /// The highest frequency of a core, from cpufreq or /proc/cpuinfo; 0 if neither says.
    pub core_mhz: u64,
}

impl Topology {
    pub fn read() -> Result<Topology> {
        let mut t = Topology::from_sysfs(Path::new("/sys/devices/system/cpu"))?;
        t.core_mhz = host_mhz();
        Ok(t)
    }

    /// Reads `root` (/sys/devices/system/cpu): the online CPUs and each one's topology.
    pub fn from_sysfs(root: &Path) -> Result<Topology> {
        let online = root.join("online");
        let list =
            std::fs::read_to_string(&online).map_err(io(&online, "reading the online CPUs"))?;
        let mut cpus = Vec::new();
        for cpu in parse_list(&list).map_err(|reason| SchedError::Parse {
            path: online.clone(),
            reason,
        })? {
            let dir = root.join(format!("cpu{cpu}/topology"));
            let core = read_number(&dir.join("core_id"))?;
            let package = read_number(&dir.join("physical_package_id"))?;
            cpus.push(Cpu { cpu, core, package });
        }
        Ok(Topology { cpus, core_mhz: 0 })
    }

    pub fn packages(&self) -> usize {
        self.cpus
            .iter()
            .map(|c| c.package)
            .collect::<BTreeSet<_>>()
            .len()
    }

    pub fn cores(&self) -> usize {
        self.cpus
            .iter()
            .map(|c| (c.package, c.core))
            .collect::<BTreeSet<_>>()
            .len()
    }

    pub fn threads(&self) -> usize {
        self.cpus.len()
    }

    /// Logical CPUs for `vcpus` vCPUs, one per physical core while a core is free of `busy`
    /// CPUs (and of the ones already chosen), so two vCPUs of one VM never share a core's
    /// execution units while another core idles. Past that, the least loaded CPUs.
    pub fn place(&self, vcpus: usize, busy: &[usize]) -> Vec<usize> {
        let mut load: Vec<(usize, usize)> = self
            .cpus
            .iter()
            .map(|c| (c.cpu, busy.iter().filter(|&&b| b == c.cpu).count()))
            .collect();
        let mut chosen = Vec::new();
        let core_of = |cpu: usize| {
            self.cpus
                .iter()
                .find(|c| c.cpu == cpu)
                .map(|c| (c.package, c.core))
        };
        while chosen.len() < vcpus && !self.cpus.is_empty() {
            // Core load: everything on any thread of the core, chosen included.
            let core_load = |cpu: usize, load: &[(usize, usize)]| -> usize {
                let core = core_of(cpu);
                load.iter()
                    .filter(|(c, _)| core_of(*c) == core)
                    .map(|(_, l)| *l)
                    .sum()
            };
            let best = load
                .iter()
                .map(|&(cpu, l)| (core_load(cpu, &load), l, cpu))
                .min()
                .map(|(_, _, cpu)| cpu);
            let Some(cpu) = best else { break };
            chosen.push(cpu);
            if let Some(entry) = load.iter_mut().find(|(c, _)| *c == cpu) {
                entry.1 += 1;
            }
        }
        chosen
    }
}

fn read_number(path: &PathBuf) -> Result<usize> {
    let text = std::fs::read_to_string(path).map_err(io(path, "reading the CPU topology"))?;
    text.trim().parse().map_err(|_| SchedError::Parse {
        path: path.clone(),
        reason: format!("{:?} is not a number", text.trim()),
    })
}

/// "0-3,8,10-11" as sysfs writes CPU lists.
pub(crate) fn parse_list(text: &str) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("{part:?} is not a CPU or a CPU range");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

fn host_mhz() -> u64 {
    if let Ok(khz) =
        std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    {
        if let Ok(khz) = khz.trim().parse::<u64>() {
            return khz / 1000;
        }
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| mhz as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two packages of two cores of two hyperthreads, numbered as Intel does (siblings far apart).
    fn fake() -> (tempfile::TempDir, Topology) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("online"), "0-7\n").unwrap();
        for cpu in 0..8 {
            let t = dir.path().join(format!("cpu{cpu}/topology"));
            std::fs::create_dir_all(&t).unwrap();
            std::fs::write(t.join("core_id"), format!("{}\n", cpu % 2)).unwrap();
            std::fs::write(
                t.join("physical_package_id"),
                format!("{}\n", (cpu / 2) % 2),
            )
            .unwrap();
        }
        let topo = Topology::from_sysfs(dir.path()).unwrap();
        (dir, topo)
    }

    #[test]
    fn counts_packages_cores_and_threads() {
        let (_d, t) = fake();
        assert_eq!((t.packages(), t.cores(), t.threads()), (2, 4, 8));
        assert_eq!(parse_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_list("0-x").is_err());
    }

    #[test]
    fn vcpus_land_on_distinct_cores_before_sharing_one() {
        let (_d, t) = fake();
        let core = |cpu: usize| {
            t.cpus
                .iter()
                .find(|c| c.cpu == cpu)
                .map(|c| (c.package, c.core))
                .unwrap()
        };
        let four = t.place(4, &[]);
        let cores: BTreeSet<_> = four.iter().map(|&c| core(c)).collect();
        assert_eq!(cores.len(), 4, "{four:?}");
        // With cores (0,0) and (0,1) busy, a 2-vCPU VM goes to package 1's two cores.
        let two = t.place(2, &[0, 1]);
        let cores: BTreeSet<_> = two.iter().map(|&c| core(c)).collect();
        assert_eq!(cores.len(), 2, "{two:?}");
        assert!(two.iter().all(|&c| core(c).0 == 1), "{two:?}");
    }
}
