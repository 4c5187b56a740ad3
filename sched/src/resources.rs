//! `[resources]` in vm.toml: shares, reservation and limit for each resource, with the units
//! the operator writes ("1000MHz", "50%", "512MiB", "200 IOPS", "10MiB/s", "5000 pps").

use serde::{Deserialize, Serialize};

use crate::{Result, SchedError};

/// ESX's share levels: low, normal and high are 500, 1000 and 2000 (per vCPU for CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Shares {
    Level(Level),
    Number(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Low,
    Normal,
    High,
}

impl Default for Shares {
    fn default() -> Self {
        Shares::Level(Level::Normal)
    }
}

impl Shares {
    /// The number of shares; a level counts per vCPU where `per` is the vCPU count.
    pub fn value(self, per: u32) -> u64 {
        match self {
            Shares::Level(Level::Low) => 500 * u64::from(per.max(1)),
            Shares::Level(Level::Normal) => 1000 * u64::from(per.max(1)),
            Shares::Level(Level::High) => 2000 * u64::from(per.max(1)),
            Shares::Number(n) => u64::from(n),
        }
    }
}

/// A number with or without a unit: TOML integers are taken as the resource's base unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Amount {
    Number(u64),
    Text(String),
}

/// One resource's settings; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<Shares>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<Amount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Amount>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Setting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Setting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Setting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Setting>,
    /// The resource pool of this host the VM runs in (see [`crate::Pool`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// CPU: MHz of the host's cores, or a percentage of one core (200% is two cores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CpuAmount {
    Mhz(u64),
    Percent(u64),
}

impl CpuAmount {
    /// Per mille of one core, given the host's MHz per core.
    pub fn permille(self, core_mhz: u64) -> u64 {
        match self {
            CpuAmount::Percent(p) => p * 10,
            CpuAmount::Mhz(m) => (m * 1000).div_ceil(core_mhz.max(1)),
        }
    }
}

/// Disk or network rates: I/Os per second or bytes per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rate {
    pub iops: Option<u64>,
    pub bytes_per_sec: Option<u64>,
}

/// What `[resources]` means once checked, in base units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Checked {
    pub cpu_shares: u64,
    pub cpu_reservation: Option<CpuAmount>,
    pub cpu_limit: Option<CpuAmount>,
    pub memory_shares: u64,
    pub memory_reservation: u64,
    pub memory_limit: Option<u64>,
    pub disk_shares: u64,
    pub disk_reservation_iops: u64,
    pub disk_limit: Rate,
    pub net_shares: u64,
    /// Bytes per second of transmit the VM is guaranteed (0: none).
    pub net_reservation_bytes_per_sec: u64,
    /// Bytes per second the VM may send over all its NICs together.
    pub net_limit_bytes_per_sec: Option<u64>,
    pub net_limit_packets_per_sec: Option<u64>,
    pub pool: Option<String>,
}

impl Resources {
    /// Checks every field for a VM of `vcpus` vCPUs and `memory` bytes of RAM.
    pub fn check(&self, vcpus: u32, memory: u64) -> Result<Checked> {
        let none = Setting::default();
        let cpu = self.cpu.as_ref().unwrap_or(&none);
        let mem = self.memory.as_ref().unwrap_or(&none);
        let disk = self.disk.as_ref().unwrap_or(&none);
        let net = self.net.as_ref().unwrap_or(&none);
        if let Some(pool) = &self.pool {
            crate::pool::check_name(pool)?;
        }
        for (name, s) in [("cpu", cpu), ("memory", mem), ("disk", disk), ("net", net)] {
            if let Some(Shares::Number(0)) = s.shares {
                return Err(SchedError::Config(format!(
                    "{name}.shares is 0: use 1 or more"
                )));
            }
        }
        let cpu_reservation = cpu
            .reservation
            .as_ref()
            .map(|a| cpu_amount("cpu.reservation", a))
            .transpose()?;
        let cpu_limit = cpu
            .limit
            .as_ref()
            .map(|a| cpu_amount("cpu.limit", a))
            .transpose()?;
        if let Some(CpuAmount::Percent(p)) = cpu_limit {
            if p == 0 {
                return Err(SchedError::Config(
                    "cpu.limit is 0%: a VM needs some CPU".into(),
                ));
            }
            if p > 100 * u64::from(vcpus) {
                return Err(SchedError::Config(format!(
                    "cpu.limit {p}% is more than the VM's {vcpus} vCPU(s) can use ({}%)",
                    100 * u64::from(vcpus)
                )));
            }
        }
        if let (Some(CpuAmount::Percent(r)), Some(CpuAmount::Percent(l))) =
            (cpu_reservation, cpu_limit)
        {
            if r > l {
                return Err(SchedError::Config(format!(
                    "cpu.reservation {r}% is above cpu.limit {l}%"
                )));
            }
        }
        let memory_reservation = mem
            .reservation
            .as_ref()
            .map(|a| bytes("memory.reservation", a))
            .transpose()?
            .unwrap_or(0);
        let memory_limit = mem
            .limit
            .as_ref()
            .map(|a| bytes("memory.limit", a))
            .transpose()?;
        if memory_reservation > memory {
            return Err(SchedError::Config(format!(
                "memory.reservation {memory_reservation} bytes is more than the VM's memory ({memory} bytes)"
            )));
        }
        if let Some(limit) = memory_limit {
            if limit < memory_reservation {
                return Err(SchedError::Config(format!(
                    "memory.limit {limit} bytes is below memory.reservation {memory_reservation} bytes"
                )));
            }
        }
        let disk_reservation = disk
            .reservation
            .as_ref()
            .map(|a| rate("disk.reservation", a))
            .transpose()?
            .unwrap_or_default();
        if disk_reservation.bytes_per_sec.is_some() {
            return Err(SchedError::Config(
                "disk.reservation is in IOPS (\"200 IOPS\"): bytes per second cannot be guaranteed across request sizes".into(),
            ));
        }
        let disk_limit = disk
            .limit
            .as_ref()
            .map(|a| rate("disk.limit", a))
            .transpose()?
            .unwrap_or_default();
        if let (Some(r), Some(l)) = (disk_reservation.iops, disk_limit.iops) {
            if r > l {
                return Err(SchedError::Config(format!(
                    "disk.reservation {r} IOPS is above disk.limit {l} IOPS"
                )));
            }
        }
        let net_reservation = net
            .reservation
            .as_ref()
            .map(|a| net_rate("net.reservation", a))
            .transpose()?
            .unwrap_or_default();
        if net_reservation.iops.is_some() {
            return Err(SchedError::Config(
                "net.reservation is in bytes per second (\"10MiB/s\"): packets per second cannot be guaranteed across frame sizes".into(),
            ));
        }
        let net_limit = net
            .limit
            .as_ref()
            .map(|a| net_rate("net.limit", a))
            .transpose()?
            .unwrap_or_default();
        if net_limit.iops == Some(0) || net_limit.bytes_per_sec == Some(0) {
            return Err(SchedError::Config(
                "net.limit is 0: a VM with a NIC needs to send something".into(),
            ));
        }
        if let (Some(r), Some(l)) = (net_reservation.bytes_per_sec, net_limit.bytes_per_sec) {
            if r > l {
                return Err(SchedError::Config(format!(
                    "net.reservation {r} bytes/s is above net.limit {l} bytes/s"
                )));
            }
        }
        Ok(Checked {
            cpu_shares: cpu.shares.unwrap_or_default().value(vcpus),
            cpu_reservation,
            cpu_limit,
            memory_shares: mem.shares.unwrap_or_default().value(1),
            memory_reservation,
            memory_limit,
            disk_shares: disk.shares.unwrap_or_default().value(1),
            disk_reservation_iops: disk_reservation.iops.unwrap_or(0),
            disk_limit,
            net_shares: net.shares.unwrap_or_default().value(1),
            net_reservation_bytes_per_sec: net_reservation.bytes_per_sec.unwrap_or(0),
            net_limit_bytes_per_sec: net_limit.bytes_per_sec,
            net_limit_packets_per_sec: net_limit.iops,
            pool: self.pool.clone(),
        })
    }
}

fn split(text: &str) -> (&str, String) {
    let t = text.trim();
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    (&t[..end], t[end..].trim().to_ascii_lowercase())
}

fn number(field: &str, digits: &str, text: &str) -> Result<u64> {
    digits.parse::<u64>().map_err(|_| {
        SchedError::Config(format!(
            "{field} {text:?} does not start with a whole number"
        ))
    })
}

pub(crate) fn cpu_amount(field: &str, amount: &Amount) -> Result<CpuAmount> {
    let text = match amount {
        Amount::Number(n) => return Ok(CpuAmount::Mhz(*n)),
        Amount::Text(t) => t,
    };
    let (digits, unit) = split(text);
    let n = number(field, digits, text)?;
    match unit.as_str() {
        "mhz" | "" => Ok(CpuAmount::Mhz(n)),
        "ghz" => Ok(CpuAmount::Mhz(n * 1000)),
        "%" => Ok(CpuAmount::Percent(n)),
        _ => Err(SchedError::Config(format!(
            "{field} {text:?}: the unit is MHz, GHz or % (of one core)"
        ))),
    }
}

pub(crate) fn bytes(field: &str, amount: &Amount) -> Result<u64> {
    let text = match amount {
        Amount::Number(n) => return Ok(*n),
        Amount::Text(t) => t,
    };
    let (digits, unit) = split(text);
    let n = number(field, digits, text)?;
    let scale: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(SchedError::Config(format!(
                "{field} {text:?}: the unit is bytes, KiB, MiB, GiB or TiB (or kB, MB, GB)"
            )));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| SchedError::Config(format!("{field} {text:?} is too large")))
}

fn rate(field: &str, amount: &Amount) -> Result<Rate> {
    let text = match amount {
        Amount::Number(n) => {
            return Ok(Rate {
                iops: Some(*n),
                bytes_per_sec: None,
            });
        }
        Amount::Text(t) => t,
    };
    let (_, unit) = split(text);
    if unit == "iops" {
        let (digits, _) = split(text);
        return Ok(Rate {
            iops: Some(number(field, digits, text)?),
            bytes_per_sec: None,
        });
    }
    match unit.strip_suffix("/s") {
        Some(_) => {
            let trimmed = text.trim().trim_end_matches("/s").trim_end_matches("/S");
            let b = bytes(field, &Amount::Text(trimmed.to_string()))?;
            Ok(Rate {
                iops: None,
                bytes_per_sec: Some(b),
            })
        }
        None => Err(SchedError::Config(format!(
            "{field} {text:?}: the unit is IOPS (\"200 IOPS\") or bytes per second (\"10MiB/s\")"
        ))),
    }
}

/// A network rate: a plain number or "…/s" is bytes per second, "… pps" or "… packets/s" is
/// packets per second (returned in `iops`).
fn net_rate(field: &str, amount: &Amount) -> Result<Rate> {
    let text = match amount {
        Amount::Number(n) => {
            return Ok(Rate {
                iops: None,
                bytes_per_sec: Some(*n),
            });
        }
        Amount::Text(t) => t,
    };
    let (digits, unit) = split(text);
    if unit == "pps" || unit == "packets/s" {
        return Ok(Rate {
            iops: Some(number(field, digits, text)?),
            bytes_per_sec: None,
        });
    }
    Ok(Rate {
        iops: None,
        bytes_per_sec: Some(bytes_per_sec(field, text)?),
    })
}

/// Bytes per second: "10MiB/s", "1GB/s" or a bare number.
pub(crate) fn bytes_per_sec(field: &str, text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let Some(bare) = trimmed
        .strip_suffix("/s")
        .or_else(|| trimmed.strip_suffix("/S"))
        .or_else(|| trimmed.parse::<u64>().is_ok().then_some(trimmed))
    else {
        return Err(SchedError::Config(format!(
            "{field} {text:?}: the unit is bytes per second (\"10MiB/s\", \"1GB/s\") or packets per second (\"5000 pps\")"
        )));
    };
    bytes(field, &Amount::Text(bare.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Resources {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn units_and_levels_become_base_units() {
        let r = parse(
            "[cpu]\nshares = \"high\"\nreservation = \"1200MHz\"\nlimit = \"150%\"\n\
             [memory]\nreservation = \"128MiB\"\nlimit = 268435456\n\
             [disk]\nshares = 3000\nreservation = \"200 IOPS\"\nlimit = \"10MiB/s\"\n\
             [net]\nshares = \"low\"\nreservation = \"2MB/s\"\nlimit = \"4MiB/s\"\n",
        );
        let c = r.check(2, 256 << 20).unwrap();
        assert_eq!(c.cpu_shares, 4000);
        assert_eq!(c.cpu_reservation, Some(CpuAmount::Mhz(1200)));
        assert_eq!(c.cpu_limit, Some(CpuAmount::Percent(150)));
        assert_eq!(c.memory_reservation, 128 << 20);
        assert_eq!(c.memory_limit, Some(256 << 20));
        assert_eq!(c.disk_shares, 3000);
        assert_eq!(c.disk_reservation_iops, 200);
        assert_eq!(c.disk_limit.bytes_per_sec, Some(10 << 20));
        assert_eq!(c.net_shares, 500);
        assert_eq!(c.net_reservation_bytes_per_sec, 2_000_000);
        assert_eq!(c.net_limit_bytes_per_sec, Some(4 << 20));
        let pps = parse("[net]\nlimit = \"5000 pps\"\n")
            .check(1, 1 << 30)
            .unwrap();
        assert_eq!(pps.net_limit_packets_per_sec, Some(5000));
        assert_eq!(pps.net_limit_bytes_per_sec, None);
        assert_eq!(
            Resources::default().check(4, 1 << 30).unwrap().cpu_shares,
            4000
        );
    }

    #[test]
    fn bad_settings_name_the_field() {
        let cases = [
            ("[cpu]\nlimit = \"300%\"\n", "cpu.limit 300%"),
            ("[cpu]\nreservation = \"1 core\"\n", "cpu.reservation"),
            ("[memory]\nreservation = \"1GiB\"\n", "memory.reservation"),
            (
                "[memory]\nreservation = \"64MiB\"\nlimit = \"32MiB\"\n",
                "memory.limit",
            ),
            ("[disk]\nlimit = \"fast\"\n", "disk.limit"),
            ("[disk]\nreservation = \"5MB/s\"\n", "disk.reservation"),
            ("[disk]\nshares = 0\n", "disk.shares is 0"),
            ("[net]\nlimit = \"fast\"\n", "net.limit \"fast\""),
            ("[net]\nlimit = 0\n", "net.limit is 0"),
            ("[net]\nshares = 0\n", "net.shares is 0"),
            (
                "[net]\nreservation = \"100 pps\"\n",
                "net.reservation is in bytes",
            ),
            (
                "[net]\nreservation = \"2MiB/s\"\nlimit = \"1MiB/s\"\n",
                "net.reservation 2097152 bytes/s is above net.limit 1048576 bytes/s",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(text).check(2, 256 << 20).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
        assert!(toml::from_str::<Resources>("[cpu]\nshares = \"huge\"\n").is_err());
        assert!(toml::from_str::<Resources>("[cpu]\nweight = 3\n").is_err());
    }
}
