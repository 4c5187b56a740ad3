//! The recovery plan: a TOML file kept at the DR site.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: cannot read the plan: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a recovery plan: {reason}")]
    Parse { path: String, reason: String },
    #[error("plan {plan}: {reason}")]
    Invalid { plan: String, reason: String },
}

/// A recovery plan. Unknown fields are refused, so a typo is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The plan's name: drill records and session names are derived from it.
    pub name: String,
    /// The most data the plan may lose, in seconds: a drill whose point is older fails its
    /// RPO.
    pub rpo_target_s: Option<u64>,
    /// The longest the recovery may take, in seconds, from the drill's start to its last
    /// VM verified.
    pub rto_target_s: Option<u64>,
    /// The prefix of the isolated network each drill creates for its VMs' NICs
    /// (`PREFIX-XXXX`, see [`Plan::drill_network_prefix`]); default `drill`.
    pub test_network: Option<String>,
    /// The network of this host recovered VMs' NICs go on in a failover, instead of the ones
    /// their vm.toml names.
    pub recovery_network: Option<String>,
    /// The replicas at this (DR) site: each replicated LUN or consistency group.
    #[serde(rename = "replica")]
    pub replicas: Vec<ReplicaRef>,
    /// Per protected datastore, the LUN at this site holding its replica.
    #[serde(rename = "datastore")]
    pub datastores: Vec<DatastoreEntry>,
    #[serde(rename = "vm", default)]
    pub vms: Vec<VmEntry>,
}

/// A replica at this site: one LUN, or every member of a consistency group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRef {
    /// A replicated LUN (a member of a group stands for its group).
    pub lun: Option<String>,
    /// A consistency group of this host.
    pub group: Option<String>,
    /// The protected site's replication address, as `vapp replica create --peer` names it:
    /// when given, the replica must be replicating from there.
    pub peer: Option<String>,
}

impl ReplicaRef {
    pub fn describe(&self) -> String {
        match (&self.lun, &self.group) {
            (Some(l), _) => l.clone(),
            (None, Some(g)) => format!("group {g}"),
            (None, None) => "(nothing)".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreEntry {
    /// The protected datastore's name (the one VMs refer to in this plan).
    pub name: String,
    /// The replicated LUN at this site that holds it.
    pub lun: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// The VM's folder on its datastore, e.g. `/vms/web1`.
    pub path: String,
    /// The protected datastore (a `[[datastore]]` name) it lives on.
    pub datastore: String,
    /// Priority group, 1 first: a group starts once every VM of the one before is verified
    /// (or failed).
    #[serde(default = "one")]
    pub priority: u32,
    /// Order within its priority group (lower first; equal ones start together).
    #[serde(default)]
    pub order: u32,
    /// How the VM is judged up.
    pub verify: Verify,
    /// The longest its verification may take, in seconds, from its start.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn one() -> u32 {
    1
}

fn default_timeout() -> u64 {
    120
}

/// How a started VM is verified; exactly one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// A regular expression a line of its console must match.
    pub console: Option<String>,
    /// The test guest's ready line (`mode=wait`: "waiting to be stopped").
    #[serde(default)]
    pub ready: bool,
    /// The VM powers off by itself with this status (the test guest's checks: 0).
    pub exit_status: Option<u32>,
    /// A TCP port answering on the VM's address: refused, see [`Plan::check`].
    pub tcp_port: Option<u16>,
    /// The VM's address answers ICMP echo on its network (the drill's in a drill), asked
    /// from a port of its own on that network, never through the host's routes.
    pub ping: Option<Ipv4Addr>,
    /// The address the ping probe speaks from (and answers ARP for): one nothing else on
    /// the network has. Default: the last of the target's /24 that is not the target.
    pub ping_from: Option<Ipv4Addr>,
}

/// A network name is at most 12 bytes (its bridge is `vb-NAME`): a prefix, '-' and four
/// characters telling the drills apart.
pub const MAX_TEST_NETWORK_PREFIX: usize = 7;

/// The console line the test guest prints in `mode=wait` once its checks passed.
pub const READY_LINE: &str = "vapp-testguest: waiting to be stopped";

impl Verify {
    /// The console pattern to wait for, if verification is by console.
    pub fn console_pattern(&self) -> Option<String> {
        match (&self.console, self.ready) {
            (Some(re), _) => Some(re.clone()),
            (None, true) => Some(regex::escape(READY_LINE)),
            (None, false) => None,
        }
    }

    pub fn describe(&self) -> String {
        if let Some(re) = &self.console {
            format!("console line /{re}/")
        } else if self.ready {
            "test guest ready line".into()
        } else if let Some(s) = self.exit_status {
            format!("powers off with status {s}")
        } else if let Some(p) = self.tcp_port {
            format!("TCP port {p}")
        } else if let Some(ip) = self.ping {
            format!("answers ping at {ip}")
        } else {
            "nothing".into()
        }
    }
}

impl Plan {
    /// Reads and checks a plan file: everything that can be told from the plan alone.
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: shown.clone(),
            source,
        })?;
        let plan: Plan = toml::from_str(&text).map_err(|e| PlanError::Parse {
            path: shown,
            reason: e.message().to_string(),
        })?;
        plan.check()?;
        Ok(plan)
    }

    fn invalid(&self, reason: impl Into<String>) -> PlanError {
        PlanError::Invalid {
            plan: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// The checks that need only the plan.
    pub fn check(&self) -> Result<(), PlanError> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(PlanError::Invalid {
                plan: format!("{:?}", self.name),
                reason: "a plan's name is letters, digits, '-' and '_'".into(),
            });
        }
        if self.replicas.is_empty() {
            return Err(self.invalid("no [[replica]]: nothing is protected"));
        }
        for r in &self.replicas {
            if r.lun.is_some() == r.group.is_some() {
                return Err(self.invalid(format!(
                    "replica {}: name exactly one of lun and group",
                    r.describe()
                )));
            }
        }
        let mut names = BTreeSet::new();
        for d in &self.datastores {
            if !names.insert(d.name.as_str()) {
                return Err(self.invalid(format!("datastore {} is listed twice", d.name)));
            }
        }
        let mut vms = BTreeSet::new();
        for vm in &self.vms {
            let who = format!("vm {} on {}", vm.path, vm.datastore);
            if !vm.path.starts_with('/') {
                return Err(self.invalid(format!("{who}: a VM's path starts with /")));
            }
            if !vms.insert((vm.datastore.as_str(), vm.path.as_str())) {
                return Err(self.invalid(format!("{who}: listed twice")));
            }
            if !names.contains(vm.datastore.as_str()) {
                return Err(self.invalid(format!(
                    "{who}: no [[datastore]] named {} in the plan",
                    vm.datastore
                )));
            }
            if vm.priority == 0 {
                return Err(self.invalid(format!("{who}: priority groups start at 1")));
            }
            let v = &vm.verify;
            let kinds = [
                v.console.is_some(),
                v.ready,
                v.exit_status.is_some(),
                v.tcp_port.is_some(),
                v.ping.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(self.invalid(format!(
                    "{who}: verify needs exactly one of console, ready, exit_status, tcp_port, ping"
                )));
            }
            if let Some(re) = &v.console
                && let Err(e) = regex::Regex::new(re)
            {
                let first = e.to_string();
                let first = first.lines().last().unwrap_or_default().trim().to_string();
                return Err(self.invalid(format!(
                    "{who}: verify.console is not a regular expression: {first}"
                )));
            }
            match (v.ping, v.ping_from) {
                (None, Some(_)) => {
                    return Err(self.invalid(format!(
                        "{who}: verify.ping_from is the address of a ping check: give verify.ping"
                    )));
                }
                (Some(to), Some(from)) if to == from => {
                    return Err(self.invalid(format!(
                        "{who}: verify.ping_from {from} is the address pinged"
                    )));
                }
                _ => {}
            }
            if v.tcp_port.is_some() {
                return Err(self.invalid(format!(
                    "{who}: verify.tcp_port is not supported yet (the drill's probe speaks ARP \
                     and ICMP only); verify with verify.ping or a console line instead"
                )));
            }
        }
        if let Some(prefix) = &self.test_network {
            let ok = !prefix.is_empty()
                && prefix.len() <= MAX_TEST_NETWORK_PREFIX
                && prefix.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !ok {
                return Err(self.invalid(format!(
                    "test_network {prefix:?}: the prefix of each drill's network \
                     (PREFIX-XXXX) is 1 to {MAX_TEST_NETWORK_PREFIX} lowercase letters, digits, \
                     '-' or '_', starting with a letter or digit"
                )));
            }
        }
        Ok(())
    }

    /// The prefix of each drill's isolated network: `test_network`, or `drill`.
    pub fn drill_network_prefix(&self) -> &str {
        self.test_network.as_deref().unwrap_or("drill")
    }

    /// The VMs in start order: by priority group, then order, then path.
    pub fn start_order(&self) -> Vec<Vec<&VmEntry>> {
        let mut vms: Vec<&VmEntry> = self.vms.iter().collect();
        vms.sort_by(|a, b| (a.priority, a.order, &a.path).cmp(&(b.priority, b.order, &b.path)));
        let mut groups: Vec<Vec<&VmEntry>> = Vec::new();
        for vm in vms {
            match groups.last_mut() {
                Some(g) if g[0].priority == vm.priority => g.push(vm),
                _ => groups.push(vec![vm]),
            }
        }
        groups
    }

    pub fn datastore(&self, name: &str) -> Option<&DatastoreEntry> {
        self.datastores.iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Result<Plan, PlanError> {
        let dir = tempfile::tempdir().map_err(|source| PlanError::Read {
            path: "tmp".into(),
            source,
        })?;
        let p = dir.path().join("plan.toml");
        std::fs::write(&p, text).map_err(|source| PlanError::Read {
            path: "tmp".into(),
            source,
        })?;
        Plan::load(&p)
    }

    const BASE: &str = r#"
name = "payroll"
rpo_target_s = 30
[[replica]]
lun = "/b.lun"
[[datastore]]
name = "ds-a"
lun = "/b.lun"
"#;

    #[test]
    fn groups_are_started_by_priority_then_order() {
        let text = format!(
            "{BASE}{}",
            r#"
[[vm]]
path = "/vms/app"
datastore = "ds-a"
priority = 2
verify.ready = true
[[vm]]
path = "/vms/db2"
datastore = "ds-a"
order = 2
verify.exit_status = 0
[[vm]]
path = "/vms/db1"
datastore = "ds-a"
order = 1
verify.console = "ready"
"#
        );
        let p = plan(&text).expect("a good plan");
        let order: Vec<Vec<&str>> = p
            .start_order()
            .iter()
            .map(|g| g.iter().map(|v| v.path.as_str()).collect())
            .collect();
        assert_eq!(order, vec![vec!["/vms/db1", "/vms/db2"], vec!["/vms/app"]]);
    }

    #[test]
    fn bad_plans_are_refused_with_one_line_naming_the_object() {
        let cases = [
            (
                "[[vm]]\npath = \"/vms/x\"\ndatastore = \"nope\"\nverify.ready = true\n",
                "vm /vms/x on nope: no [[datastore]] named nope",
            ),
            (
                "[[vm]]\npath = \"/vms/x\"\ndatastore = \"ds-a\"\nverify.tcp_port = 22\n",
                "verify.tcp_port is not supported yet",
            ),
            (
                "[[vm]]\npath = \"/vms/x\"\ndatastore = \"ds-a\"\nverify.ping = \"10.0.0.300\"\n",
                "invalid IPv4 address",
            ),
            (
                "[[vm]]\npath = \"/vms/x\"\ndatastore = \"ds-a\"\nverify.ping = \"10.0.0.1\"\nverify.ping_from = \"10.0.0.1\"\n",
                "verify.ping_from 10.0.0.1 is the address pinged",
            ),
            (
                "[[vm]]\npath = \"/vms/x\"\ndatastore = \"ds-a\"\nverify.ready = true\nverify.ping_from = \"10.0.0.9\"\n",
                "give verify.ping",
            ),
            (
                "[[vm]]\npath = \"/vms/x\"\ndatastore = \"ds-a\"\nverify.console = \"(\"\n",
                "not a regular expression",
            ),
            (
                "[[vm]]\npath = \"/vms/x\"\ndatastore = \"ds-a\"\nverify = {}\n",
                "exactly one of",
            ),
            (
                "[[vm]]\npath = \"/vms/x\"\ndatastore = \"ds-a\"\npriority = 0\nverify.ready = true\n",
                "priority groups start at 1",
            ),
            ("colour = 1\n", "unknown field"),
        ];
        for (extra, needle) in cases {
            let err = plan(&format!("{BASE}{extra}"))
                .expect_err(extra)
                .to_string();
            assert!(err.contains(needle), "{extra}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        // The drill's network name must fit a bridge name: the prefix leaves room for it.
        let err = plan(&format!("test_network = \"drill-net\"\n{BASE}"))
            .expect_err("a long prefix")
            .to_string();
        assert!(
            err.contains("test_network \"drill-net\": the prefix of each drill's network"),
            "{err}"
        );
        let p = plan(&format!("test_network = \"pay\"\n{BASE}")).expect("a short prefix");
        assert_eq!(p.drill_network_prefix(), "pay");
    }
}
