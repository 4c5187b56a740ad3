//! `vm.toml`: what a VM is. It lives in the VM's folder on the datastore next to the kernel,
//! the initrd and the disks, so any host that mounts the datastore can run the VM. Paths in it
//! are datastore paths, relative to the VM folder unless they start with `/`: a folder moved
//! with `vapp mv` keeps working. Every field is documented in hv/README.md ("vm.toml").

use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "vm.toml";
/// The format version this vapp writes; a newer one is refused rather than half understood.
pub const VERSION: u32 = 1;
/// The largest vm.toml read: a configuration is a few hundred bytes.
pub const MAX_BYTES: u64 = 1 << 20;
/// Where `vm create` puts the kernel and initrd it copies into the folder.
pub const KERNEL_FILE: &str = "kernel";
pub const INITRD_FILE: &str = "initrd";
/// Linux's console on our COM1, reboot through the keyboard controller (which hv turns into a
/// reset), and a reboot one second after a panic, as Firecracker boots its guests.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub version: u32,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub on_reset: OnReset,
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// NICs, after the disks: eth0 is the first.
    #[serde(default, rename = "net", skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetSpec>,
    /// High availability: restarted by the host agents when its host dies or it crashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<crate::Ha>,
    /// Shares, reservations and limits (`[resources]`, see "Resource management" in README.md).
    #[serde(default, skip_serializing_if = "is_default")]
    pub resources: sched::Resources,
}

fn is_default(r: &sched::Resources) -> bool {
    *r == sched::Resources::default()
}

/// What a guest-initiated reset does (libvirt's `on_reboot`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnReset {
    /// Boot the VM again, as a PC does (and ESX).
    #[default]
    Reboot,
    /// End `vm start` as if the guest had powered off (as Firecracker does).
    PowerOff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: String,
    /// Opened read-only shared: the guest sees a read-only device and other VMs may share it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// A virtio-net NIC on one of the networks of the host that runs the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// The network's name (`vapp host network create`), the same on every host.
    pub network: String,
    /// Written once (at `vm create`, or at the first start of a NIC added by hand) and kept,
    /// so the guest keeps its address whatever host runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Token-bucket limits, Firecracker's: what the guest sends (tx) and receives (rx), in
    /// bytes of Ethernet frames and in frames per second; the bucket holds 100 ms worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_packets_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_packets_per_sec: Option<u64>,
}

/// NICs on `networks`, each with a fresh MAC no other NIC of the VM has.
pub fn new_nets(networks: &[String]) -> Vec<NetSpec> {
    let mut nets: Vec<NetSpec> = Vec::new();
    for network in networks {
        let mut mac = hv::net::MacAddr::random().to_string();
        while nets.iter().any(|n| n.mac.as_deref() == Some(mac.as_str())) {
            mac = hv::net::MacAddr::random().to_string();
        }
        nets.push(NetSpec {
            network: network.clone(),
            mac: Some(mac),
            ..NetSpec::default()
        });
    }
    nets
}

impl NetSpec {
    /// The MAC, parsed (`check` has refused a bad one).
    pub fn mac(&self) -> Option<hv::net::MacAddr> {
        self.mac.as_deref().and_then(|m| m.parse().ok())
    }

    fn limits(bytes: Option<u64>, packets: Option<u64>) -> hv::NicLimits {
        hv::NicLimits {
            bytes: bytes.map(hv::net::RateLimit::per_second),
            packets: packets.map(hv::net::RateLimit::per_second),
        }
    }

    pub fn tx_limits(&self) -> hv::NicLimits {
        Self::limits(self.tx_bytes_per_sec, self.tx_packets_per_sec)
    }

    pub fn rx_limits(&self) -> hv::NicLimits {
        Self::limits(self.rx_bytes_per_sec, self.rx_packets_per_sec)
    }
}

/// Only the version, read before anything else so a newer file gets a clear refusal.
#[derive(Deserialize)]
struct Versioned {
    version: Option<u32>,
}

impl VmSpec {
    /// Parses and checks `text`, the contents of `<folder>/vm.toml`; errors name the file.
    pub fn parse(folder: &str, text: &str) -> Result<VmSpec, String> {
        let file = path_in(folder, FILE_NAME);
        let versioned: Versioned =
            toml::from_str(text).map_err(|e| format!("{file}: {}", e.message()))?;
        match versioned.version {
            None => return Err(format!("{file}: no `version` field")),
            Some(v) if v > VERSION => {
                return Err(format!(
                    "{file}: format version {v} is newer than this vapp understands ({VERSION})"
                ));
            }
            Some(_) => {}
        }
        let spec: VmSpec = toml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
        spec.check().map_err(|reason| format!("{file}: {reason}"))?;
        Ok(spec)
    }

    /// The file's contents, with a header saying where its fields are documented.
    pub fn render(&self) -> Result<String, String> {
        let body = toml::to_string(self).map_err(|e| format!("cannot encode vm.toml: {e}"))?;
        Ok(format!(
            "# vapp VM configuration: see \"vm.toml\" in hv/README.md for every field.\n{body}"
        ))
    }

    /// The rules every VM obeys whatever host runs it; what depends on the host (vCPU limit,
    /// free memory, KVM) is checked when the VM starts.
    pub fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("`name` is empty".to_string());
        }
        if self.vcpus == 0 {
            return Err("`vcpus` is 0: a VM needs at least one vCPU".to_string());
        }
        let min_mib = hv::MIN_MEMORY / MIB;
        if self.memory_mib < min_mib {
            return Err(format!(
                "`memory_mib` is {}: a VM needs at least {min_mib} MiB",
                self.memory_mib
            ));
        }
        if self.memory_mib.checked_mul(MIB).is_none() {
            return Err(format!("`memory_mib` {} is too large", self.memory_mib));
        }
        if self.kernel.trim().is_empty() {
            return Err("`kernel` is empty".to_string());
        }
        if self.initrd.as_ref().is_some_and(|i| i.trim().is_empty()) {
            return Err("`initrd` is empty (leave it out for none)".to_string());
        }
        if self.disks.len() > hv::MAX_DISKS {
            return Err(format!(
                "{} disks: a VM has at most {}",
                self.disks.len(),
                hv::MAX_DISKS
            ));
        }
        if let Some(i) = self.disks.iter().position(|d| d.path.trim().is_empty()) {
            return Err(format!("disk {i} has an empty `path`"));
        }
        if self.disks.len() + self.nets.len() > hv::MAX_VIRTIO_DEVICES {
            return Err(format!(
                "{} disks and {} NICs: a VM has at most {} in all",
                self.disks.len(),
                self.nets.len(),
                hv::MAX_VIRTIO_DEVICES
            ));
        }
        let mut macs = Vec::new();
        for (i, net) in self.nets.iter().enumerate() {
            if net.network.trim().is_empty() {
                return Err(format!("net {i} has an empty `network`"));
            }
            if let Some(text) = &net.mac {
                let mac: hv::net::MacAddr = text.parse().map_err(|e| format!("net {i}: {e}"))?;
                if macs.contains(&mac) {
                    return Err(format!("net {i}: MAC {mac} is also another NIC's"));
                }
                macs.push(mac);
            }
            for (field, value) in [
                ("tx_bytes_per_sec", net.tx_bytes_per_sec),
                ("tx_packets_per_sec", net.tx_packets_per_sec),
                ("rx_bytes_per_sec", net.rx_bytes_per_sec),
                ("rx_packets_per_sec", net.rx_packets_per_sec),
            ] {
                if value == Some(0) {
                    return Err(format!(
                        "net {i}: `{field}` is 0 (leave it out for no limit)"
                    ));
                }
            }
        }
        self.resources
            .check(self.vcpus, self.memory_bytes())
            .map_err(|e| e.to_string())?;
        self.ha.as_ref().map_or(Ok(()), crate::Ha::check)
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib.saturating_mul(MIB)
    }
}

/// The datastore path `path` means in `folder`: absolute paths stay, others are relative.
pub fn path_in(folder: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", folder.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmSpec {
        VmSpec {
            version: VERSION,
            name: "web1".into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: KERNEL_FILE.into(),
            initrd: Some(INITRD_FILE.into()),
            cmdline: DEFAULT_CMDLINE.into(),
            on_reset: OnReset::PowerOff,
            ha: None,
            resources: sched::Resources::default(),
            disks: vec![
                DiskSpec {
                    path: "disk0.vdisk".into(),
                    read_only: false,
                },
                DiskSpec {
                    path: "/vms/shared/iso.vdisk".into(),
                    read_only: true,
                },
            ],
            nets: vec![NetSpec {
                network: "prod".into(),
                mac: Some("52:54:00:12:34:56".into()),
                tx_bytes_per_sec: Some(10_000_000),
                ..NetSpec::default()
            }],
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let text = sample().render().unwrap();
        assert!(text.contains("[[disk]]"), "{text}");
        assert!(text.contains("[[net]]\nnetwork = \"prod\""), "{text}");
        assert!(text.contains("on_reset = \"power-off\""), "{text}");
        assert_eq!(VmSpec::parse("/vms/web1", &text).unwrap(), sample());
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let text = "version = 1\nname = \"a\"\nvcpus = 1\nmemory_mib = 64\nkernel = \"kernel\"\n";
        let spec = VmSpec::parse("/vms/a", text).unwrap();
        assert_eq!(spec.on_reset, OnReset::Reboot);
        assert!(spec.disks.is_empty() && spec.initrd.is_none() && spec.cmdline.is_empty());
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_the_field() {
        let base = sample().render().unwrap();
        let cases = [
            (base.replace("vcpus = 2", "vcpus = 0"), "at least one vCPU"),
            (
                base.replace("memory_mib = 256", "memory_mib = 1"),
                "at least 16 MiB",
            ),
            (base.replace("version = 1", "version = 7"), "newer"),
            (base.replace("version = 1\n", ""), "no `version`"),
            (base.replace("vcpus = 2", "vcpus = 2\ncpus = 2"), "cpus"),
            (base.replace("vcpus = 2", "vcpus = \"two\""), "vcpus"),
            (
                base.replace("52:54:00:12:34:56", "01:00:5e:00:00:01"),
                "net 0: MAC address \"01:00:5e:00:00:01\" is invalid",
            ),
            (
                base.replace("tx_bytes_per_sec = 10000000", "tx_bytes_per_sec = 0"),
                "`tx_bytes_per_sec` is 0",
            ),
            (
                format!("{base}[resources.cpu]\nlimit = \"250%\"\n"),
                "[resources] cpu.limit 250% is more than the VM's 2 vCPU(s)",
            ),
            (
                format!("{base}[resources.memory]\nreservation = \"1GiB\"\n"),
                "memory.reservation",
            ),
            (
                format!("{base}[resources.disk]\nshares = \"max\"\n"),
                "shares",
            ),
        ];
        for (text, needle) in cases {
            let err = VmSpec::parse("/vms/web1", &text).unwrap_err();
            assert!(err.starts_with("/vms/web1/vm.toml: "), "{err}");
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
    }

    #[test]
    fn paths_are_relative_to_the_folder_unless_absolute() {
        assert_eq!(path_in("/vms/a/", "disk0.vdisk"), "/vms/a/disk0.vdisk");
        assert_eq!(path_in("/vms/a", "/vms/b/x.vdisk"), "/vms/b/x.vdisk");
    }
}
