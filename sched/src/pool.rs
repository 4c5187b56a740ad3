//! Resource pools, as ESX has them: a group with its own CPU and memory shares, reservation and
//! limit, whose VMs (`[resources] pool = "NAME"` in vm.toml) share what the pool gets. A pool is
//! this host's: `$VAPP_STATE_DIR/resource-pools/NAME.toml` (default /var/lib/vapp), with
//! `[cpu]` and `[memory]` tables as vm.toml's `[resources.cpu]` and `[resources.memory]`.
//! Its cgroup `vapp/pool-NAME` holds its VMs' groups, so the kernel applies the pool's shares
//! and limits to them together.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::resources::{bytes, cpu_amount};
use crate::{CpuAmount, Result, SchedError, Setting, Shares};

pub const STATE_DIR_ENV: &str = "VAPP_STATE_DIR";

/// A pool file as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    #[serde(default)]
    cpu: Option<Setting>,
    #[serde(default)]
    memory: Option<Setting>,
}

/// A pool's settings in base units, as the ledger records them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Pool {
    pub name: String,
    pub cpu_shares: u64,
    /// Per mille of one core; 0: none, its VMs' reservations count against the host.
    pub cpu_reservation_permille: u64,
    pub cpu_limit_permille: Option<u64>,
    /// 0: none, its VMs' reservations count against the host.
    pub memory_reservation_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
}

/// Where this host's pools are.
pub fn pools_dir() -> PathBuf {
    std::env::var_os(STATE_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/lib/vapp"), PathBuf::from)
        .join("resource-pools")
}

/// Checks a pool name: 1 to 32 lowercase letters, digits, `-` or `_`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(SchedError::Config(format!(
            "pool {name:?}: a pool name is 1 to 32 lowercase letters, digits, '-' or '_'"
        )))
    }
}

impl Pool {
    /// Reads pool `name` from `dir`, with `core_mhz` to turn MHz into a share of a core.
    pub fn load(dir: &Path, name: &str, core_mhz: u64) -> Result<Pool> {
        check_name(name)?;
        let path = dir.join(format!("{name}.toml"));
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SchedError::Config(format!(
                    "pool {name:?}: this host has no such pool ({} is missing)",
                    path.display()
                )));
            }
            Err(e) => return Err(crate::error::io(&path, "reading the pool")(e)),
        };
        let file: PoolFile = toml::from_str(&text).map_err(|e| SchedError::Parse {
            path: path.clone(),
            reason: e.message().to_string(),
        })?;
        let none = Setting::default();
        let cpu = file.cpu.as_ref().unwrap_or(&none);
        let mem = file.memory.as_ref().unwrap_or(&none);
        let bad = |reason: String| SchedError::Parse {
            path: path.clone(),
            reason,
        };
        for (what, s) in [("cpu", cpu), ("memory", mem)] {
            if let Some(Shares::Number(0)) = s.shares {
                return Err(bad(format!("{what}.shares is 0: use 1 or more")));
            }
        }
        let permille = |field: &str, a| -> Result<u64> {
            Ok(match cpu_amount(field, a)? {
                CpuAmount::Percent(p) => p * 10,
                m => m.permille(core_mhz),
            })
        };
        let cpu_reservation = cpu
            .reservation
            .as_ref()
            .map(|a| permille("cpu.reservation", a))
            .transpose()
            .map_err(|e| bad(e.to_string()))?
            .unwrap_or(0);
        let cpu_limit = cpu
            .limit
            .as_ref()
            .map(|a| permille("cpu.limit", a))
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        let memory_reservation = mem
            .reservation
            .as_ref()
            .map(|a| bytes("memory.reservation", a))
            .transpose()
            .map_err(|e| bad(e.to_string()))?
            .unwrap_or(0);
        let memory_limit = mem
            .limit
            .as_ref()
            .map(|a| bytes("memory.limit", a))
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        if cpu_limit == Some(0) {
            return Err(bad("cpu.limit is 0: a pool's VMs need some CPU".into()));
        }
        if cpu_limit.is_some_and(|l| l < cpu_reservation) {
            return Err(bad("cpu.reservation is above cpu.limit".into()));
        }
        if memory_limit.is_some_and(|l| l < memory_reservation) {
            return Err(bad("memory.reservation is above memory.limit".into()));
        }
        Ok(Pool {
            name: name.to_string(),
            cpu_shares: cpu.shares.unwrap_or_default().value(1),
            cpu_reservation_permille: cpu_reservation,
            cpu_limit_permille: cpu_limit,
            memory_reservation_bytes: memory_reservation,
            memory_limit_bytes: memory_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_file_becomes_base_units_and_bad_ones_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("web.toml"),
            "[cpu]\nshares = \"high\"\nreservation = \"50%\"\nlimit = \"1000MHz\"\n\
             [memory]\nreservation = \"128MiB\"\nlimit = \"1GiB\"\n",
        )
        .unwrap();
        let pool = Pool::load(dir.path(), "web", 2000).unwrap();
        assert_eq!(pool.cpu_shares, 2000);
        assert_eq!(pool.cpu_reservation_permille, 500);
        assert_eq!(pool.cpu_limit_permille, Some(500));
        assert_eq!(pool.memory_reservation_bytes, 128 << 20);
        assert_eq!(pool.memory_limit_bytes, Some(1 << 30));
        let err = Pool::load(dir.path(), "db", 2000).unwrap_err().to_string();
        assert!(
            err.contains("pool \"db\": this host has no such pool"),
            "{err}"
        );
        let err = Pool::load(dir.path(), "Web!", 2000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a pool name is"), "{err}");
        std::fs::write(dir.path().join("bad.toml"), "[disk]\nshares = 1\n").unwrap();
        let err = Pool::load(dir.path(), "bad", 2000).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("disk"), "{err}");
    }
}
