//! The networks of `vapp dr`, as Site Recovery Manager's network mappings: each drill puts
//! its VMs' NICs on an isolated network of its own (`PREFIX-XXXX`, created for the drill,
//! never bridged to anything, deleted by `dr cleanup`), a failover on the plan's recovery
//! network; `verify.ping` is asked from a port of this process on that network (see
//! `host::ping`), never through the host's routes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, bail};
use dr::Plan;
use host::network::NetworkError;
use host::ping::{self, Prober};

/// How long one ping attempt waits for an answer before the drill looks at its other VMs.
const PING_ATTEMPT: Duration = Duration::from_millis(250);
const BASE36: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// The networks each plan VM's NICs name in its vm.toml, by (datastore, path).
pub type Nics = BTreeMap<(String, String), Vec<String>>;

/// The networks of VM `vm`'s NICs, from its vm.toml on the replica; `verify.ping` of a VM
/// without a NIC is refused.
pub fn vm_networks(
    p: &str,
    entry: &dr::VmEntry,
    ds: &vmfs::Datastore,
    config: &str,
    attr: vmfs::Attr,
) -> anyhow::Result<Vec<String>> {
    let vm = &entry.path;
    let mut bytes = vec![0u8; usize::try_from(attr.size.min(1 << 20)).unwrap_or(0)];
    let n = ds
        .read(attr.ino, 0, &mut bytes)
        .with_context(|| format!("plan {p}: vm {vm}: reading {config}"))?;
    bytes.truncate(n);
    let text = String::from_utf8_lossy(&bytes);
    let spec = host::vm::spec::VmSpec::parse(vm, &text)
        .map_err(|e| anyhow::anyhow!("plan {p}: vm {vm}: {config}: {e}"))?;
    if let Some(ip) = entry.verify.ping
        && spec.nets.is_empty()
    {
        bail!("plan {p}: vm {vm}: verify.ping = \"{ip}\" but its {config} has no NIC ([[net]])");
    }
    Ok(spec.nets.into_iter().map(|n| n.network).collect())
}

/// Refuses a plan whose recovery network this host does not have; for a failover
/// (`nics`) without one, also a VM whose vm.toml names a network this host does not have.
pub fn check_recovery_network(plan: &Plan, nics: Option<&Nics>) -> anyhow::Result<()> {
    let known: Vec<String> = host::network::list()?
        .into_iter()
        .map(|n| n.network.name)
        .collect();
    let has = |name: &str| known.iter().any(|k| k == name);
    match (&plan.recovery_network, nics) {
        (Some(name), _) if !has(name) => bail!(
            "plan {}: recovery_network {name:?} does not exist on this host (vapp host network \
             list; create it with vapp host network create {name} --uplink IFACE)",
            plan.name
        ),
        (None, Some(nics)) => {
            for ((_, vm), networks) in nics {
                if let Some(missing) = networks.iter().find(|n| !has(n)) {
                    bail!(
                        "plan {}: vm {vm}: its NIC's network {missing:?} does not exist on this \
                         host; create it (vapp host network create {missing} --uplink IFACE) or \
                         give the plan a recovery_network",
                        plan.name
                    );
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Creates the drill's isolated network, `PREFIX-XXXX` from the drill's start time (the
/// next free one if taken), calling `record` with its name before creating it so that an
/// interrupted drill's network is cleaned up too, and with `None` if that name was taken.
pub fn create_drill_network(
    plan: &Plan,
    started_unix_ms: u64,
    record: &mut dyn FnMut(Option<&str>) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let prefix = plan.drill_network_prefix();
    for attempt in 0..64u64 {
        let mut n = (started_unix_ms + attempt) % 36u64.pow(4);
        let mut suffix = [0u8; 4];
        for c in suffix.iter_mut().rev() {
            *c = BASE36[(n % 36) as usize];
            n /= 36;
        }
        let name = format!("{prefix}-{}", String::from_utf8_lossy(&suffix));
        // Another drill's name is passed over before it is recorded: cleanup deletes what is
        // recorded, and must never find another drill's network there.
        let taken = host::network::list()?
            .iter()
            .any(|n| n.network.name == name)
            || hv::net::interface_exists(&format!("vb-{name}"));
        if taken {
            continue;
        }
        record(Some(&name))?;
        match host::network::create(&name, None, true) {
            Ok(_) => {
                tracing::info!(network = %name, plan = %plan.name, "drill network created");
                return Ok(name);
            }
            // Another drill's (or an interface of that name): the next name.
            Err(NetworkError::Exists { .. }) => record(None)?,
            Err(NetworkError::Invalid { .. })
                if hv::net::interface_exists(&format!("vb-{name}")) =>
            {
                record(None)?
            }
            Err(e) => {
                record(None)?;
                return Err(e).with_context(|| {
                    format!(
                        "plan {}: cannot create the drill's network {name}",
                        plan.name
                    )
                });
            }
        }
    }
    bail!(
        "plan {}: no free network name {prefix}-XXXX for the drill",
        plan.name
    )
}

/// Deletes a drill's network; then says what of it remains (its bridge, its record, taps
/// of the drill's VM processes), if anything.
pub fn delete_drill_network(name: &str, pids: &[u32]) -> Vec<String> {
    let mut problems = Vec::new();
    match host::network::delete(name) {
        Ok(()) | Err(NetworkError::Unknown { .. }) => {}
        Err(e) => problems.push(format!("network {name}: {e}")),
    }
    let bridge = format!("vb-{name}");
    if hv::net::interface_exists(&bridge) {
        problems.push(format!("bridge {bridge} remains"));
    }
    if host::network::list().is_ok_and(|l| l.iter().any(|n| n.network.name == name)) {
        problems.push(format!("network {name} is still recorded"));
    }
    problems.extend(
        leftover_taps(pids)
            .into_iter()
            .map(|t| format!("tap {t} remains")),
    );
    problems
}

/// The taps VM processes `pids` made (`vapp<pid>n<i>`, see `vm start`) that still exist.
pub fn leftover_taps(pids: &[u32]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let prefixes: Vec<String> = pids.iter().map(|p| format!("vapp{p:x}n")).collect();
    let mut taps: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            prefixes.iter().any(|p| {
                name.strip_prefix(p.as_str())
                    .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .collect();
    taps.sort();
    taps
}

/// Where a run's VMs' NICs go and the ports its ping checks are asked from.
pub struct Networking {
    /// Every NIC on this network instead of vm.toml's (the drill's, or the recovery one).
    pub network: Option<String>,
    pub nics: Nics,
    probes: BTreeMap<String, Prober>,
}

impl Networking {
    pub fn new(network: Option<String>, nics: Nics) -> Networking {
        Networking {
            network,
            nics,
            probes: BTreeMap::new(),
        }
    }

    /// The network `vm`'s first NIC is on for this run.
    fn network_of(&self, vm: &dr::VmEntry) -> Option<String> {
        let nics = self.nics.get(&(vm.datastore.clone(), vm.path.clone()))?;
        let first = nics.first()?;
        Some(self.network.clone().unwrap_or_else(|| first.clone()))
    }

    /// One attempt at `vm`'s `verify.ping`: `Some(detail)` once the address answered on
    /// the VM's network; an error when no port can be made there.
    pub fn ping(&mut self, vm: &dr::VmEntry, target: Ipv4Addr) -> anyhow::Result<Option<String>> {
        let network = self
            .network_of(vm)
            .with_context(|| format!("vm {}: no NIC to ping", vm.path))?;
        if !self.probes.contains_key(&network) {
            let tap = format!("vdr{:x}p{}", std::process::id(), self.probes.len());
            let prober = Prober::attach(&network, &tap, "vapp dr ping probe")
                .with_context(|| format!("cannot attach a ping probe to network {network}"))?;
            self.probes.insert(network.clone(), prober);
        }
        let prober = self
            .probes
            .get_mut(&network)
            .context("the probe was just attached")?;
        let source = vm
            .verify
            .ping_from
            .unwrap_or_else(|| ping::default_source(target));
        let reply = prober
            .ping(target, source, PING_ATTEMPT)
            .with_context(|| format!("ping {target} on network {network}"))?;
        Ok(reply.map(|r| {
            format!(
                "ping {target}: answered by {} on network {network} in {:.1} ms (asked from {source})",
                r.mac,
                r.rtt.as_secs_f64() * 1000.0
            )
        }))
    }
}

/// `--network NAME` for `vm start` when the run moves NICs, else nothing.
pub fn start_args(networking: &Networking) -> Vec<String> {
    networking
        .network
        .iter()
        .flat_map(|n| ["--network".to_string(), n.clone()])
        .collect()
}

/// Whether any plan VM has a NIC.
pub fn any_nic(nics: &Nics) -> bool {
    nics.values().any(|n| !n.is_empty())
}
