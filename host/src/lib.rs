//! vapp's host agent (`vapp host run`): one long-running process per host that
//!
//! - keeps a host slot on its datastore (a long-lived vmfs host, as `vapp mount` is);
//! - runs the VMs placed on it, each as its own `vapp vm start --foreground` child process
//!   (Firecracker's one process per VM), restarting a protected VM that crashes, with
//!   back-off, until it has failed [`Config::max_restarts`] times in a row;
//! - publishes what it has free (memory and vCPUs offered, minus what its VMs take) in its
//!   own record on the datastore, `/.vapp/hosts/<name>` ([`HostRecord`]);
//! - watches the heartbeats of the datastore's other hosts, and restarts the protected VMs
//!   (`[ha] restart = true` in vm.toml) of a host that is dead by the cluster rules, by
//!   priority and `[ha] after` order. Which VMs a dead host ran needs no record of its own: a
//!   VM's runner holds the exclusive lock on its `vm.toml`, so a protected VM whose lock names
//!   a dead holder (or a holder already recovered, whose lock is stale) ran there and did not
//!   stop cleanly. Every survivor ranks the live agents' records the same way ([`place`]):
//!   the one chosen starts the VM at once, the others only if it still does not run after a
//!   grace period (the chosen host may die too, or fail to start it). When two start it
//!   anyway, the lock lets one run and the other's child fails at once with "already
//!   running", and that agent moves on;
//! - powers off the VMs it runs on a datastore its host loses, and rejoins that datastore
//!   when it answers again ([`isolation`]);
//! - serves an HTTP + JSON API on a Unix socket of mode 0600 ([`api`]).

pub mod api;
pub mod client;
pub mod files;
pub mod files_api;
pub mod isolation;
pub mod network;
pub mod ping;
pub mod vm;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lun::Lun;
use serde::{Deserialize, Serialize};
use vmfs::cluster::LockTarget;
use vmfs::{Datastore, Kind};

/// The socket the agent serves its API on, in its runtime directory.
pub const SOCKET_NAME: &str = "agent.sock";
const VM_FILE: &str = "vm.toml";
const MAX_VM_FILE: u64 = 1 << 20;
const MAX_DEPTH: usize = 8;
/// What the child prints when another host already runs the VM (see `vm start`).
const ALREADY_RUNNING: &str = "is already running";
/// Where each agent publishes its [`HostRecord`], one file per host name.
pub const RECORD_DIR: &str = "/.vapp/hosts";
/// A record is written whole at offset 0 of its file; a reader that catches it half
/// written (it spans sectors) fails to decode it and reads again.
const RECORD_BYTES: usize = 4096;
const RECORD_VERSION: u32 = 1;
/// How long a VM waits for the VMs it restarts after, unless its `[ha] after_timeout` says.
const DEFAULT_AFTER_TIMEOUT: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Vmfs { what: String, source: vmfs::Error },
    #[error("{0}")]
    Api(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn vmfs_err(what: impl Into<String>) -> impl FnOnce(vmfs::Error) -> Error {
    let what = what.into();
    move |source| Error::Vmfs { what, source }
}

/// `host.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's name on the datastore (what `vapp datastore hosts` and `vm list` show).
    pub name: String,
    /// The datastores this host joins (LUN paths or nbd:// URLs): a host slot, VMs and
    /// heartbeats followed on each.
    pub datastores: Vec<String>,
    /// Where the API socket, the VMs' console logs and their runners' messages live.
    pub runtime_dir: PathBuf,
    /// Datastore folders searched for VM folders (folders holding a vm.toml).
    #[serde(default = "default_vm_dirs")]
    pub vm_dirs: Vec<String>,
    /// A protected VM whose runner fails this many times in a row is marked failed.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Memory this host offers to VMs, in MiB (default: all of it, from /proc/meminfo).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// vCPUs this host offers to VMs (default: its CPUs).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// What happens to this host's VMs on a datastore it loses.
    #[serde(default)]
    pub isolation_response: isolation::IsolationResponse,
}

fn default_vm_dirs() -> Vec<String> {
    vec!["/vms".to_string()]
}

fn default_max_restarts() -> u32 {
    3
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(io(path.display().to_string()))?;
        Config::parse(&path.display().to_string(), &text)
    }

    pub fn parse(origin: &str, text: &str) -> Result<Config> {
        let config: Config =
            toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        if config.name.is_empty() {
            return Err(Error::Config(format!("{origin}: `name` is empty")));
        }
        if config.datastores.is_empty() {
            return Err(Error::Config(format!(
                "{origin}: `datastores` is empty: name at least one"
            )));
        }
        if config.max_restarts == 0 {
            return Err(Error::Config(format!(
                "{origin}: `max_restarts` must be at least 1"
            )));
        }
        Ok(config)
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join(SOCKET_NAME)
    }

    /// What this host offers to VMs: host.toml's figures, or the machine's.
    pub fn offered(&self) -> Need {
        Need {
            memory_mib: self.memory_mib.unwrap_or_else(machine_memory_mib),
            cpus: self.cpus.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            }),
        }
    }
}

fn machine_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// What a VM takes from the host that runs it (vm.toml's `memory_mib` and `vcpus`), or
/// what a host has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need {
    pub memory_mib: u64,
    pub cpus: u32,
}

/// An agent's record on the datastore, `/.vapp/hosts/<name>`: JSON padded with spaces to
/// 4096 bytes, written only by the agent that holds the file open (its exclusive lock), read
/// by every agent without a lock. It counts only while `slot` and `generation`
/// name a host whose heartbeat is live: a dead agent's record stays behind and is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub version: u32,
    pub host: String,
    /// The agent's heartbeat slot and incarnation on this datastore.
    pub slot: u32,
    pub generation: u64,
    /// What the host offers to VMs.
    pub memory_mib: u64,
    pub cpus: u32,
    /// What is left once the VMs it runs or is starting take theirs.
    pub free_memory_mib: u64,
    pub free_cpus: u32,
    pub vms: u32,
    /// VM folders it is starting: counted in its free figures already, and not to be placed
    /// again while their runners wait for the VMs' locks.
    #[serde(default)]
    pub starting: Vec<String>,
}

impl HostRecord {
    fn free(&self) -> Need {
        Need {
            memory_mib: self.free_memory_mib,
            cpus: self.free_cpus,
        }
    }
}

/// Which live agent starts each VM, in the order given: the one with the most free memory
/// (then vCPUs, then the smallest name) among those the VM fits on, or the one with the most
/// free memory when it fits nowhere; what the VM takes is then counted against it, so VMs
/// spread once the first host fills up. Every survivor computes the same answer from the
/// same records.
pub fn place(hosts: &[HostRecord], vms: &[Need]) -> Vec<Option<String>> {
    let mut free: Vec<(String, Need)> = hosts.iter().map(|h| (h.host.clone(), h.free())).collect();
    let rank = |(name, free): &(String, Need)| {
        (free.memory_mib, free.cpus, std::cmp::Reverse(name.clone()))
    };
    vms.iter()
        .map(|need| {
            let fits = free
                .iter()
                .enumerate()
                .filter(|(_, (_, f))| f.memory_mib >= need.memory_mib && f.cpus >= need.cpus)
                .max_by_key(|(_, h)| rank(h))
                .map(|(i, _)| i);
            let best = fits.or_else(|| {
                free.iter()
                    .enumerate()
                    .max_by_key(|(_, h)| rank(h))
                    .map(|(i, _)| i)
            })?;
            let (name, f) = &mut free[best];
            f.memory_mib = f.memory_mib.saturating_sub(need.memory_mib);
            f.cpus = f.cpus.saturating_sub(need.cpus);
            Some(name.clone())
        })
        .collect()
}

/// `[ha]` in vm.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ha {
    /// Restart the VM on a surviving host when its host dies, and here when it crashes.
    #[serde(default)]
    pub restart: bool,
    #[serde(default)]
    pub priority: Priority,
    /// VM folders that must run somewhere before this one is restarted after a host failure
    /// (a database before its web tier).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Seconds to wait for `after` before restarting anyway (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_timeout: Option<u64>,
    /// Overrides the host's `isolation_response` for this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<isolation::IsolationResponse>,
}

impl Ha {
    /// What every `[ha]` table obeys: `after` names other VM folders by absolute path.
    pub fn check(&self) -> std::result::Result<(), String> {
        if let Some(bad) = self
            .after
            .iter()
            .find(|f| !f.starts_with('/') || f.trim_end_matches('/').is_empty())
        {
            return Err(format!(
                "[ha] after: {bad:?} is not a VM folder (an absolute datastore path, e.g. /vms/db)"
            ));
        }
        Ok(())
    }
}

/// Restart order after a host failure: high before medium before low.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Medium,
    Low,
}

/// Only what the agent needs of a vm.toml; the rest is `vm start`'s business.
#[derive(Deserialize)]
struct HaOnly {
    ha: Option<Ha>,
    #[serde(default)]
    vcpus: u32,
    #[serde(default)]
    memory_mib: u64,
}

/// One thing the agent did or saw, for `vapp host events` and the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// This agent's count of events, from 1: `GET /events?since=SEQ` asks for what came after.
    #[serde(default)]
    pub seq: u64,
    /// Wall clock, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// `host-dead`, `vm-started`, `vm-start-failed`, `vm-restarted`, `vm-exited`,
    /// `vm-crashed`, `vm-failed`, `vm-stopped`, `vm-waiting` (for the VMs of its `[ha] after`),
    /// `order-timeout` (restarted without them), `restart-lost` (another host took the VM
    /// first), `lock-lost`, `agent-started`, `agent-stopped`, `isolated` (this host lost the
    /// datastore), `vm-powered-off` and `vm-kept` (the isolation response), `rejoined`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The datastore of the VM or host, as host.toml names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub detail: String,
}

/// What the agent knows of a VM it runs or ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    /// Crashed; restarted here after a back-off.
    Restarting,
    /// Crashed too often; not restarted again by this agent.
    Failed,
    Stopped,
}

/// A row of `GET /vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmReport {
    pub path: String,
    pub state: String,
    pub host: String,
    pub pid: Option<u32>,
    /// Failed starts in a row.
    pub failures: u32,
    /// The UUID of the datastore the VM is on.
    #[serde(default)]
    pub datastore: String,
    /// That datastore as the agent's host.toml names it.
    #[serde(default)]
    pub datastore_path: String,
}

struct Vm {
    child: Option<Child>,
    state: VmState,
    protected: bool,
    failures: u32,
    next_try: Option<Instant>,
    /// A stop was asked for: the child's exit is not a crash.
    stopping: bool,
    need: Need,
    /// A `lock-lost` event was recorded for this runner.
    lock_lost: bool,
    /// `[ha] isolation`, read at start: an isolated host cannot read it.
    isolation: Option<isolation::IsolationResponse>,
}

/// A host seen in the heartbeat region, by slot and incarnation.
struct Seen {
    counter: u64,
    moved: Instant,
    declared_dead: bool,
}

/// A VM by the index of its datastore in [`Config::datastores`] and its folder there.
type VmKey = (usize, String);

/// One datastore the agent is a host of, and what it follows there.
struct Store {
    /// As host.toml names it.
    given: String,
    uuid: String,
    lun: Arc<dyn Lun>,
    /// Replaced when the host rejoins the datastore after losing it.
    ds: Mutex<Arc<Datastore>>,
    isolation: Mutex<isolation::Isolation>,
    seen: Mutex<HashMap<(u32, u64), Seen>>,
    /// This agent's record file, held open (locked) for its lifetime, and what it last wrote.
    record: Mutex<Option<(vmfs::FileHandle, Option<HostRecord>)>>,
    /// When a dead host's VM was first seen waiting: for its `after` VMs, or for the host
    /// chosen to start it.
    waiting: Mutex<HashMap<String, Instant>>,
    deferred: Mutex<HashMap<String, Instant>>,
    /// When each orphaned VM config lock was first seen, to place a dead host's VMs together.
    orphans: Mutex<HashMap<u64, Instant>>,
    /// The host that last held each VM config's lock, by inode, to name a host found already
    /// recovered.
    holders: Mutex<HashMap<u64, String>>,
    /// Hosts declared dead lately, by name, so each death is one `host-dead` event.
    declared_dead: Mutex<HashMap<String, Instant>>,
}

impl Store {
    fn ds(&self) -> Arc<Datastore> {
        lock(&self.ds).clone()
    }

    /// `datastore` is a UUID, or the path host.toml gives (the same file by another path
    /// counts too).
    fn is(&self, datastore: &str) -> bool {
        if datastore == self.given || datastore.eq_ignore_ascii_case(&self.uuid) {
            return true;
        }
        match (
            std::fs::canonicalize(datastore),
            std::fs::canonicalize(&self.given),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

/// How many events an agent keeps for its API: an agent runs for months, and its log (stderr,
/// the journal) has every event anyway.
pub const EVENTS_KEPT: usize = 4096;

/// The newest [`EVENTS_KEPT`] events, numbered in order from 1.
struct EventLog {
    kept: VecDeque<Event>,
    next_seq: u64,
}

impl EventLog {
    fn new() -> EventLog {
        EventLog {
            kept: VecDeque::new(),
            next_seq: 1,
        }
    }

    fn since(&self, since: u64) -> Vec<Event> {
        let since = if since >= self.next_seq { 0 } else { since };
        self.kept
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect()
    }
}

pub struct Agent {
    config: Config,
    exe: PathBuf,
    stores: Vec<Store>,
    vms: Mutex<BTreeMap<VmKey, Vm>>,
    events: Mutex<EventLog>,
    stop: Arc<AtomicBool>,
    /// VMs being started here: their share is counted before their runner holds the lock.
    starting: Mutex<HashMap<VmKey, Need>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

impl Agent {
    /// Joins each datastore of `config.datastores`, opened as `luns` (in that order), as host
    /// `config.name`. `exe` is the vapp binary that runs each VM (`vm start --foreground`).
    pub fn new(
        config: Config,
        exe: PathBuf,
        luns: Vec<Arc<dyn Lun>>,
        stop: Arc<AtomicBool>,
    ) -> Result<Agent> {
        let mut options = vmfs::OpenOptions::read_write();
        options.host_name = config.name.clone();
        let mut stores: Vec<Store> = Vec::new();
        for (given, lun) in config.datastores.iter().zip(luns) {
            let ds = Datastore::open(lun.clone(), &options)
                .map_err(vmfs_err(format!("datastore {given}")))?;
            let uuid = ds.superblock().uuid.to_string();
            if let Some(other) = stores.iter().find(|s| s.uuid == uuid) {
                return Err(Error::Config(format!(
                    "datastore {given} is datastore {} again (UUID {uuid})",
                    other.given
                )));
            }
            let record = open_record(&ds, &config.name)?;
            stores.push(Store {
                given: given.clone(),
                uuid,
                lun,
                ds: Mutex::new(Arc::new(ds)),
                isolation: Mutex::new(isolation::Isolation::default()),
                seen: Mutex::new(HashMap::new()),
                record: Mutex::new(Some((record, None))),
                waiting: Mutex::new(HashMap::new()),
                deferred: Mutex::new(HashMap::new()),
                orphans: Mutex::new(HashMap::new()),
                holders: Mutex::new(HashMap::new()),
                declared_dead: Mutex::new(HashMap::new()),
            });
        }
        let agent = Agent {
            config,
            exe,
            stores,
            vms: Mutex::new(BTreeMap::new()),
            events: Mutex::new(EventLog::new()),
            stop,
            starting: Mutex::new(HashMap::new()),
        };
        agent.publish()?;
        Ok(agent)
    }

    /// The datastore a request names (UUID or path), or the only one the VM folder is on.
    pub fn store_for(&self, folder: &str, datastore: Option<&str>) -> Result<usize> {
        if let Some(datastore) = datastore {
            return self
                .stores
                .iter()
                .position(|s| s.is(datastore))
                .ok_or_else(|| {
                    Error::Api(format!(
                        "datastore {datastore}: host {} is not a host of it (it has {})",
                        self.config.name,
                        self.config.datastores.join(", ")
                    ))
                });
        }
        if self.stores.len() == 1 {
            return Ok(0);
        }
        let config = format!("{folder}/{VM_FILE}");
        let on: Vec<usize> = (0..self.stores.len())
            .filter(|&i| self.stores[i].ds().stat_path(&config).is_ok())
            .collect();
        match on.as_slice() {
            [i] => Ok(*i),
            [] => Err(Error::Api(format!(
                "{folder}: no VM here (no {config} on {})",
                self.config.datastores.join(", ")
            ))),
            _ => Err(Error::Api(format!(
                "{folder}: a VM of that folder is on several datastores ({}): name one",
                on.iter()
                    .map(|&i| self.stores[i].given.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The datastore `store` as host.toml names it, and its UUID.
    pub fn datastore(&self, store: usize) -> (&str, &str) {
        let s = &self.stores[store];
        (&s.given, &s.uuid)
    }

    /// This agent's record on datastore `store` as it stands: what it offers, minus what its
    /// VMs on every datastore take.
    fn current_record(&self, store: usize) -> HostRecord {
        let offered = self.config.offered();
        let mut used = Need::default();
        let mut count = 0u32;
        let mut add = |need: &Need| {
            used.memory_mib = used.memory_mib.saturating_add(need.memory_mib);
            used.cpus = used.cpus.saturating_add(need.cpus);
            count += 1;
        };
        for vm in lock(&self.vms).values().filter(|vm| vm.child.is_some()) {
            add(&vm.need);
        }
        let mut starting = Vec::new();
        for ((on, folder), need) in lock(&self.starting).iter() {
            add(need);
            if *on == store {
                starting.push(folder.clone());
            }
        }
        starting.sort();
        let host = self.stores[store].ds().host();
        HostRecord {
            version: RECORD_VERSION,
            host: self.config.name.clone(),
            slot: host.as_ref().map_or(0, |h| h.slot),
            generation: host.as_ref().map_or(0, |h| h.generation),
            memory_mib: offered.memory_mib,
            cpus: offered.cpus,
            free_memory_mib: offered.memory_mib.saturating_sub(used.memory_mib),
            free_cpus: offered.cpus.saturating_sub(used.cpus),
            vms: count,
            starting,
        }
    }

    /// Writes this agent's record on each datastore when what it says changed.
    fn publish(&self) -> Result<()> {
        for store in 0..self.stores.len() {
            self.publish_on(store)?;
        }
        Ok(())
    }

    fn publish_on(&self, store: usize) -> Result<()> {
        let record = self.current_record(store);
        let mut guard = lock(&self.stores[store].record);
        let Some((file, last)) = guard.as_mut() else {
            return Ok(());
        };
        if last.as_ref() == Some(&record) {
            return Ok(());
        }
        let path = record_path(&self.config.name);
        let mut written = record.clone();
        let mut bytes = loop {
            let bytes = serde_json::to_vec(&written)
                .map_err(|e| Error::Api(format!("{path}: cannot encode: {e}")))?;
            if bytes.len() < RECORD_BYTES {
                break bytes;
            }
            // Too many VMs starting at once to list: the free figures still count them.
            if written.starting.pop().is_none() {
                return Err(Error::Config(format!(
                    "{path}: host name {:?} makes the record longer than {RECORD_BYTES} bytes",
                    self.config.name
                )));
            }
        };
        bytes.resize(RECORD_BYTES - 1, b' ');
        bytes.push(b'\n');
        file.write_at(&bytes, 0).map_err(vmfs_err(&path))?;
        file.sync().map_err(vmfs_err(&path))?;
        tracing::debug!(
            free_memory_mib = record.free_memory_mib,
            free_cpus = record.free_cpus,
            "host record published"
        );
        *last = Some(record);
        Ok(())
    }

    /// Publishes on every datastore it can: one that is lost must not hold back the others.
    fn publish_or_warn(&self) {
        for store in 0..self.stores.len() {
            if self.is_isolated(store) {
                continue;
            }
            if let Err(e) = self.publish_on(store) {
                tracing::warn!(datastore = %self.stores[store].given, error = %e, "publishing this host's free capacity failed");
            }
        }
    }

    /// Another agent's record, if it has one that decodes.
    fn read_record(&self, store: usize, name: &str) -> Option<HostRecord> {
        let ds = self.stores[store].ds();
        let path = record_path(name);
        let ino = ds.resolve(&path).ok()?;
        for _ in 0..3 {
            let mut bytes = vec![0u8; RECORD_BYTES];
            let n = ds.read(ino, 0, &mut bytes).ok()?;
            bytes.truncate(n);
            if let Ok(record) = serde_json::from_slice::<HostRecord>(bytes.trim_ascii_end()) {
                return (record.version == RECORD_VERSION && record.host == name).then_some(record);
            }
        }
        None
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn event(&self, kind: &str, vm: Option<&str>, host: Option<&str>, detail: String) {
        drop_event_raw(&self.events, kind, vm, None, host, detail);
    }

    /// Records an event of the VM at `folder` of datastore `store`, run or seen by this host.
    pub(crate) fn vm_event(&self, store: usize, kind: &str, folder: &str, detail: String) {
        drop_event_raw(
            &self.events,
            kind,
            Some(folder),
            Some(&self.stores[store].given),
            Some(&self.config.name),
            detail,
        );
    }

    /// The events kept after `since` (0: all kept), oldest first. A `since` this agent never
    /// reached was a previous agent's on the same socket: everything kept is new to its reader.
    pub fn events_since(&self, since: u64) -> Vec<Event> {
        lock(&self.events).since(since)
    }

    /// Runs until the stop flag is set, then stops the VMs it runs and leaves the datastore.
    pub fn run(self: &Arc<Self>) -> Result<()> {
        std::fs::create_dir_all(self.config.runtime_dir.join("vms")).map_err(io(self
            .config
            .runtime_dir
            .display()
            .to_string()))?;
        let server = api::serve(self.clone())?;
        notify_systemd(sd_notify::NotifyState::Ready);
        self.event(
            "agent-started",
            None,
            Some(&self.config.name),
            format!("serving {}", self.config.socket().display()),
        );
        let tick = self
            .stores
            .iter()
            .map(|s| s.ds().timing().io_timeout / 2)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(50));
        while !self.stop.load(Ordering::SeqCst) {
            self.reap();
            for store in 0..self.stores.len() {
                // An isolated host must not act on what it reads of the other hosts there.
                if self.check_isolation(store) {
                    continue;
                }
                let read = self.watch_cluster(store);
                if let Err(e) = &read {
                    tracing::warn!(datastore = %self.stores[store].given, error = %e, "reading the datastore's heartbeats and locks failed");
                }
                self.heartbeats_read(store, read.is_ok());
            }
            std::thread::sleep(tick);
        }
        self.event(
            "agent-stopped",
            None,
            Some(&self.config.name),
            "stopping the VMs this host runs".to_string(),
        );
        notify_systemd(sd_notify::NotifyState::Stopping);
        let running: Vec<VmKey> = lock(&self.vms)
            .iter()
            .filter(|(_, vm)| vm.child.is_some())
            .map(|(key, _)| key.clone())
            .collect();
        for (store, path) in running {
            if let Err(e) = self.stop_vm(store, &path, Duration::from_secs(10)) {
                tracing::warn!(vm = %path, error = %e, "stopping a VM failed");
            }
        }
        server.shutdown();
        let _ = std::fs::remove_file(self.config.socket());
        Ok(())
    }

    /// Leaves the datastore cleanly (after [`Agent::run`]).
    pub fn close(self) -> Result<()> {
        let mut first = Ok(());
        for store in self.stores {
            // The record's handle holds a lock of this host: released before the host leaves.
            drop(lock(&store.record).take());
            let ds = store
                .ds
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner);
            let closed = match Arc::try_unwrap(ds) {
                Ok(ds) => ds
                    .close()
                    .map_err(vmfs_err(format!("closing {}", store.given))),
                Err(_) => Err(Error::Api(format!(
                    "closing {}: the datastore is still in use",
                    store.given
                ))),
            };
            if first.is_ok() {
                first = closed;
            }
        }
        first
    }

    /// Where a VM's console and runner messages go: by folder, and for a datastore after the
    /// first also by its place in host.toml.
    fn log_path(&self, store: usize, folder: &str, ext: &str) -> PathBuf {
        let prefix = if store == 0 {
            String::new()
        } else {
            format!("ds{}-", store + 1)
        };
        let name: String = prefix
            .chars()
            .chain(
                folder
                    .trim_start_matches('/')
                    .chars()
                    .map(|c| if c == '/' { '_' } else { c }),
            )
            .collect();
        self.config
            .runtime_dir
            .join("vms")
            .join(format!("{name}.{ext}"))
    }

    /// Starts the VM at `folder` of datastore `store` here and waits until its runner holds
    /// its lock.
    pub fn start_vm(&self, store: usize, folder: &str) -> Result<u32> {
        let key: VmKey = (store, folder.to_string());
        {
            let vms = lock(&self.vms);
            if let Some(Vm {
                child: Some(child), ..
            }) = vms.get(&key)
            {
                return Err(Error::Api(format!(
                    "vm {folder} is already running on host {} (pid {})",
                    self.config.name,
                    child.id()
                )));
            }
        }
        let (ha, need) = self.read_vm(store, folder)?;
        lock(&self.starting).insert(key.clone(), need);
        self.publish_or_warn();
        let started = self.spawn_runner(&key, &ha, need);
        lock(&self.starting).remove(&key);
        self.publish_or_warn();
        started
    }

    fn spawn_runner(&self, key: &VmKey, ha: &Ha, need: Need) -> Result<u32> {
        let (store, folder) = (key.0, key.1.as_str());
        let stderr_path = self.log_path(store, folder, "log");
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .map_err(io(stderr_path.display().to_string()))?;
        let offset = stderr
            .metadata()
            .map_err(io(stderr_path.display().to_string()))?
            .len();
        let mut child = Command::new(&self.exe)
            .arg("-d")
            .arg(&self.stores[store].given)
            .args(["vm", "start", "--foreground", folder, "--console-log"])
            .arg(self.log_path(store, folder, "console"))
            .env("VAPP_HOST_NAME", &self.config.name)
            .env("VAPP_RUNTIME_DIR", &self.config.runtime_dir)
            // Readiness is the agent's to report, not its VMs'.
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io(format!("running {}", self.exe.display())))?;
        let pid = child.id();
        match self.wait_running(store, folder, &mut child) {
            Ok(()) => {
                lock(&self.vms).insert(
                    key.clone(),
                    Vm {
                        child: Some(child),
                        state: VmState::Running,
                        protected: ha.restart,
                        failures: 0,
                        next_try: None,
                        stopping: false,
                        need,
                        lock_lost: false,
                        isolation: ha.isolation,
                    },
                );
                Ok(pid)
            }
            Err(status) => {
                // The runner's error is its last line; the log lines before it are in the file.
                let message = tail(&stderr_path, offset);
                let reason = message
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no message");
                Err(Error::Api(format!(
                    "vm {folder} did not start ({status}): {}",
                    reason.trim().trim_start_matches("vapp: ")
                )))
            }
        }
    }

    /// Waits until `child` holds the VM's lock and answers on its control socket, which it
    /// opens once admission control let the VM power on and the guest exists; or exits.
    fn wait_running(&self, store: usize, folder: &str, child: &mut Child) -> Result<(), String> {
        let control =
            vm::runtime::Registry::under(&self.config.runtime_dir, &self.stores[store].uuid)
                .socket_path(folder);
        let ds = self.stores[store].ds();
        let lun = &self.stores[store].lun;
        let config = format!("{folder}/{VM_FILE}");
        let deadline = Instant::now() + ds.timing().lock_wait() * 2 + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Err(status.to_string()),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            if let Ok(ino) = ds.resolve(&config) {
                let held = vmfs::cluster::survey::survey(lun.clone(), Duration::ZERO)
                    .map(|s| {
                        s.hosts.iter().any(|h| {
                            h.pid == child.id()
                                && h.host_name == self.config.name
                                && h.locks.iter().any(|l| {
                                    l.open
                                        && l.mode == vmfs::LockMode::Exclusive
                                        && l.target == LockTarget::Inode(ino)
                                })
                        })
                    })
                    .unwrap_or(false);
                if held && vm::runtime::ask(&control, vm::runtime::Request::Status).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("it did not take the VM's lock in time".to_string());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks the VM's runner to stop (SIGTERM presses the power button), then kills it once
    /// `grace` has passed.
    pub fn stop_vm(&self, store: usize, folder: &str, grace: Duration) -> Result<()> {
        let key: VmKey = (store, folder.to_string());
        let pid = {
            let mut vms = lock(&self.vms);
            let Some(vm) = vms.get_mut(&key) else {
                return Err(Error::Api(format!(
                    "vm {folder} is not running on host {}",
                    self.config.name
                )));
            };
            let Some(child) = &vm.child else {
                return Err(Error::Api(format!(
                    "vm {folder} is not running on host {}",
                    self.config.name
                )));
            };
            vm.stopping = true;
            child.id()
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        // A guest that ignores the power button is powered off by the runner's second
        // signal, which still closes the datastore cleanly; SIGKILL is for a hung runner.
        let started = Instant::now();
        let mut powered_off = false;
        loop {
            self.reap();
            let gone = lock(&self.vms)
                .get(&key)
                .is_none_or(|vm| vm.child.is_none());
            if gone {
                return Ok(());
            }
            if !powered_off && started.elapsed() > grace {
                powered_off = true;
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
            if started.elapsed() > grace + Duration::from_secs(10) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn report(&self) -> Vec<VmReport> {
        lock(&self.vms)
            .iter()
            .map(|((store, path), vm)| VmReport {
                path: path.clone(),
                state: serde_json::to_value(vm.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                host: self.config.name.clone(),
                pid: vm.child.as_ref().map(Child::id),
                failures: vm.failures,
                datastore: self.stores[*store].uuid.clone(),
                datastore_path: self.stores[*store].given.clone(),
            })
            .collect()
    }

    /// Collects exited runners; a protected VM that crashed is restarted after a back-off
    /// (1 s, 2 s, 4 s, ...) until it has failed `max_restarts` times in a row.
    fn reap(&self) {
        let mut retry = Vec::new();
        let mut exited = false;
        {
            let mut vms = lock(&self.vms);
            for (key, vm) in vms.iter_mut() {
                let path = key.1.as_str();
                let given = self.stores[key.0].given.as_str();
                if let Some(child) = &mut vm.child {
                    let Ok(Some(status)) = child.try_wait() else {
                        continue;
                    };
                    vm.child = None;
                    exited = true;
                    // 0: powered off; 3: powered off with a status; 4: stopped (vm start).
                    let clean = vm.stopping || matches!(status.code(), Some(0 | 3 | 4));
                    if clean {
                        vm.state = VmState::Stopped;
                        drop_event(
                            &self.events,
                            "vm-stopped",
                            path,
                            given,
                            &self.config.name,
                            status,
                        );
                    } else if vm.protected {
                        vm.failures += 1;
                        if vm.failures >= self.config.max_restarts {
                            vm.state = VmState::Failed;
                            drop_event(
                                &self.events,
                                "vm-failed",
                                path,
                                given,
                                &self.config.name,
                                status,
                            );
                        } else {
                            vm.state = VmState::Restarting;
                            vm.next_try = Some(
                                Instant::now() + Duration::from_secs(1 << (vm.failures - 1).min(6)),
                            );
                            drop_event(
                                &self.events,
                                "vm-crashed",
                                path,
                                given,
                                &self.config.name,
                                status,
                            );
                        }
                    } else {
                        vm.state = VmState::Stopped;
                        drop_event(
                            &self.events,
                            "vm-exited",
                            path,
                            given,
                            &self.config.name,
                            status,
                        );
                    }
                }
                if vm.state == VmState::Restarting
                    && vm.next_try.is_some_and(|t| Instant::now() >= t)
                {
                    vm.next_try = None;
                    retry.push(key.clone());
                }
            }
        }
        if exited {
            self.publish_or_warn();
        }
        for key in retry {
            self.restart(&key, "restarted after a crash");
        }
    }

    /// Starts `folder` again, keeping its failure count; a failure to start counts too.
    fn restart(&self, key: &VmKey, why: &str) -> bool {
        let folder = key.1.as_str();
        let failures = lock(&self.vms).get(key).map_or(0, |vm| vm.failures);
        match self.start_vm(key.0, folder) {
            Ok(pid) => {
                if let Some(vm) = lock(&self.vms).get_mut(key) {
                    vm.failures = failures;
                }
                self.vm_event(key.0, "vm-restarted", folder, format!("{why} (pid {pid})"));
                true
            }
            Err(e) if e.to_string().contains(ALREADY_RUNNING) => {
                lock(&self.vms).remove(key);
                self.vm_event(
                    key.0,
                    "restart-lost",
                    folder,
                    format!("another host runs it: {e}"),
                );
                false
            }
            Err(e) => {
                let mut vms = lock(&self.vms);
                let vm = vms.entry(key.clone()).or_insert(Vm {
                    child: None,
                    state: VmState::Restarting,
                    protected: true,
                    failures,
                    next_try: None,
                    stopping: false,
                    need: Need::default(),
                    lock_lost: false,
                    isolation: None,
                });
                vm.failures = failures + 1;
                if vm.failures >= self.config.max_restarts {
                    vm.state = VmState::Failed;
                    drop(vms);
                    self.vm_event(key.0, "vm-failed", folder, e.to_string());
                } else {
                    vm.state = VmState::Restarting;
                    vm.next_try =
                        Some(Instant::now() + Duration::from_secs(1 << (vm.failures - 1).min(6)));
                    drop(vms);
                    self.vm_event(key.0, "vm-crashed", folder, e.to_string());
                }
                false
            }
        }
    }

    /// Follows the other hosts' heartbeats and restarts the protected VMs of dead ones, each
    /// on the live agent [`place`] chooses.
    fn watch_cluster(&self, store: usize) -> Result<()> {
        let st = &self.stores[store];
        let survey = vmfs::cluster::survey::survey(st.lun.clone(), Duration::ZERO)
            .map_err(vmfs_err("reading heartbeats"))?;
        let dead_after = st.ds().timing().dead_after();
        let now = Instant::now();
        let me = st.ds().host();
        // Inodes locked open exclusively by a dead host, or by one already recovered.
        let mut orphaned: HashSet<u64> = HashSet::new();
        // Inodes locked open exclusively by a live host: its name and pid.
        let mut held: HashMap<u64, (String, u32)> = HashMap::new();
        // Live hosts by name, slot and incarnation: the agents among them have a record.
        let mut live: Vec<(String, u32, u64)> = Vec::new();
        // Names of dead hosts, and the locks of hosts not dead yet that missed two renewals.
        let mut dead_names: HashSet<String> = HashSet::new();
        let mut silent: Vec<(String, u64)> = Vec::new();
        // Slots newly found dead, by host name: a host (its agent and its VMs' runners) is
        // declared dead once, however many slots it held.
        let mut newly_dead: BTreeMap<String, Vec<String>> = BTreeMap::new();
        {
            let mut seen = lock(&st.seen);
            for host in &survey.hosts {
                let mine = me
                    .as_ref()
                    .is_some_and(|m| m.slot == host.slot && m.generation == host.generation);
                let entry = seen.entry((host.slot, host.generation)).or_insert(Seen {
                    counter: host.counter,
                    moved: now,
                    declared_dead: false,
                });
                if entry.counter != host.counter {
                    entry.counter = host.counter;
                    entry.moved = now;
                }
                let dead = !mine && (host.state == "recovering" || now - entry.moved >= dead_after);
                if dead && !entry.declared_dead {
                    entry.declared_dead = true;
                    newly_dead
                        .entry(host.host_name.clone())
                        .or_default()
                        .push(format!(
                            "slot {} (pid {}): no heartbeat for {} ms",
                            host.slot,
                            host.pid,
                            (now - entry.moved).as_millis()
                        ));
                }
                if dead {
                    dead_names.insert(host.host_name.clone());
                } else {
                    live.push((host.host_name.clone(), host.slot, host.generation));
                }
                let quiet =
                    !mine && !dead && now - entry.moved >= st.ds().timing().renew_interval() * 2;
                for l in &host.locks {
                    if let (LockTarget::Inode(ino), vmfs::LockMode::Exclusive, true, true) =
                        (l.target, l.mode, l.open, quiet)
                    {
                        silent.push((host.host_name.clone(), ino));
                    }
                }
                for l in &host.locks {
                    if let (LockTarget::Inode(ino), vmfs::LockMode::Exclusive, true) =
                        (l.target, l.mode, l.open)
                    {
                        if dead {
                            orphaned.insert(ino);
                        } else {
                            held.insert(ino, (host.host_name.clone(), host.pid));
                        }
                    }
                }
            }
        }
        // Its agent and runners die and are recovered one slot at a time, some seen dead by
        // their heartbeat, some found recovered, some still renewing for a moment: one death
        // is what happens to one name within a few dead-host times.
        let mut declared = lock(&st.declared_dead);
        declared.retain(|_, at| now - *at < dead_after * 3);
        let mut first_death = |name: &str| match declared.entry(name.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(now);
                true
            }
        };
        for (name, slots) in newly_dead {
            if first_death(&name) {
                drop_event_raw(
                    &self.events,
                    "host-dead",
                    None,
                    Some(&st.given),
                    Some(&name),
                    slots.join("; "),
                );
            }
        }
        {
            let mut holders = lock(&st.holders);
            let mut recovered: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for l in &survey.stale_locks {
                if let (LockTarget::Inode(ino), vmfs::LockMode::Exclusive, true) =
                    (l.target, l.mode, l.open)
                {
                    orphaned.insert(ino);
                    // Its host died and was recovered between two looks (a same-machine host
                    // is recovered at once by the next to join): dead all the same.
                    if let Some(host) = holders.remove(&ino) {
                        dead_names.insert(host.clone());
                        recovered.entry(host).or_default().push(l.object.clone());
                    }
                }
            }
            for (host, objects) in recovered {
                if !first_death(&host) {
                    continue;
                }
                drop_event_raw(
                    &self.events,
                    "host-dead",
                    None,
                    Some(&st.given),
                    Some(&host),
                    format!(
                        "found already recovered: its locks on {} are stale",
                        objects.join(", ")
                    ),
                );
            }
            for (ino, (host, _)) in &held {
                holders.insert(*ino, host.clone());
            }
        }
        drop(declared);
        let folders = self.find_vms(store)?;
        let inos: HashMap<&str, u64> = folders
            .iter()
            .filter_map(|f| {
                st.ds()
                    .resolve(&format!("{f}/{VM_FILE}"))
                    .ok()
                    .map(|ino| (f.as_str(), ino))
            })
            .collect();
        self.check_locks(store, &inos, &held, &orphaned);
        let configs: HashSet<u64> = inos.values().copied().collect();
        let coming = silent
            .iter()
            .any(|(name, ino)| dead_names.contains(name) && configs.contains(ino));
        if !self.settled(store, &configs, &orphaned, coming, now) {
            return Ok(());
        }
        let mut candidates = Vec::new();
        for folder in &folders {
            let Some(&ino) = inos.get(folder.as_str()) else {
                continue;
            };
            if !orphaned.contains(&ino) || held.contains_key(&ino) {
                continue;
            }
            // A VM this agent runs, retries after a crash, or gave up on is its own business.
            if lock(&self.vms)
                .get(&(store, folder.clone()))
                .is_some_and(|vm| {
                    vm.child.is_some() || matches!(vm.state, VmState::Failed | VmState::Restarting)
                })
            {
                continue;
            }
            match self.read_vm(store, folder) {
                Ok((ha, need)) if ha.restart => candidates.push((ha, need, folder.clone())),
                Ok(_) => {}
                Err(e) => tracing::warn!(vm = %folder, error = %e, "cannot read vm.toml"),
            }
        }
        candidates.sort_by(|a, b| (a.0.priority, &a.2).cmp(&(b.0.priority, &b.2)));
        let ready = self.in_order(store, candidates, &inos, &held, now);
        if ready.is_empty() {
            lock(&st.deferred).clear();
            return Ok(());
        }
        live.sort();
        live.dedup();
        let mut agents: Vec<HostRecord> = live
            .iter()
            .filter(|(name, ..)| *name != self.config.name)
            .filter_map(|(name, slot, generation)| {
                self.read_record(store, name)
                    .filter(|r| r.slot == *slot && r.generation == *generation)
            })
            .collect();
        agents.push(self.current_record(store));
        agents.sort_by(|a, b| a.host.cmp(&b.host));
        agents.dedup_by(|a, b| a.host == b.host);
        // A VM an agent is starting is placed already: its runner waits for the lock.
        let ready: Vec<(Need, String)> = ready
            .into_iter()
            .filter(|(_, f)| !agents.iter().any(|a| a.starting.contains(f)))
            .collect();
        let names: HashSet<&str> = ready.iter().map(|(_, f)| f.as_str()).collect();
        lock(&st.deferred).retain(|f, _| names.contains(f.as_str()));
        let needs: Vec<Need> = ready.iter().map(|(need, _)| *need).collect();
        let grace = self.grace(store);
        for ((_, folder), host) in ready.iter().zip(place(&agents, &needs)) {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let host = host.unwrap_or_else(|| self.config.name.clone());
            if host == self.config.name {
                tracing::info!(vm = %folder, "restarting a dead host's protected VM here");
                self.restart(
                    &(store, folder.clone()),
                    "its host died; placed here, on the live host with the most free capacity",
                );
                continue;
            }
            let since = *lock(&st.deferred).entry(folder.clone()).or_insert(now);
            if now - since >= grace {
                self.restart(
                    &(store, folder.clone()),
                    &format!(
                        "its host died; {host}, where it was placed, did not start it within {} s",
                        grace.as_secs()
                    ),
                );
            }
        }
        Ok(())
    }

    /// A dead host's VMs are seen orphaned one by one: each runner is a host of its own and
    /// stops heartbeating a little apart from the others. While a host of a dead host's name
    /// that holds a VM's lock has missed two renewals (`coming`: it is about to be declared
    /// dead too), placing waits for it, so priorities and capacity are weighed over all of
    /// them; at most 6 heartbeat periods after the first was seen.
    fn settled(
        &self,
        store: usize,
        configs: &HashSet<u64>,
        orphaned: &HashSet<u64>,
        coming: bool,
        now: Instant,
    ) -> bool {
        let st = &self.stores[store];
        let mut orphans = lock(&st.orphans);
        orphans.retain(|ino, _| orphaned.contains(ino));
        for ino in orphaned.iter().filter(|ino| configs.contains(ino)) {
            orphans.entry(*ino).or_insert(now);
        }
        let longest = st.ds().timing().renew_interval() * 6;
        !coming
            || orphans
                .values()
                .min()
                .is_none_or(|&oldest| now - oldest >= longest)
    }

    /// How long an agent leaves a dead host's VM to the agent chosen for it before starting it
    /// itself: longer than a start takes, so only a chosen host that failed is overtaken.
    fn grace(&self, store: usize) -> Duration {
        self.stores[store].ds().timing().dead_after() * 2 + Duration::from_secs(10)
    }

    /// The candidates whose `[ha] after` VMs run somewhere, or waited for them too long (with
    /// an event each way), keeping the order given.
    fn in_order(
        &self,
        store: usize,
        candidates: Vec<(Ha, Need, String)>,
        inos: &HashMap<&str, u64>,
        held: &HashMap<u64, (String, u32)>,
        now: Instant,
    ) -> Vec<(Need, String)> {
        let mut waiting = lock(&self.stores[store].waiting);
        let names: HashSet<&str> = candidates.iter().map(|(.., f)| f.as_str()).collect();
        waiting.retain(|f, _| names.contains(f.as_str()));
        let mut ready = Vec::new();
        for (ha, need, folder) in candidates {
            let missing: Vec<&str> = ha
                .after
                .iter()
                .map(|d| d.trim_end_matches('/'))
                .filter(|d| !inos.get(d).is_some_and(|ino| held.contains_key(ino)))
                .collect();
            if missing.is_empty() {
                ready.push((need, folder));
                continue;
            }
            let timeout = Duration::from_secs(ha.after_timeout.unwrap_or(DEFAULT_AFTER_TIMEOUT));
            match waiting.get(&folder) {
                None => {
                    waiting.insert(folder.clone(), now);
                    self.vm_event(
                        store,
                        "vm-waiting",
                        &folder,
                        format!(
                            "its host died; restarts once {} run (at most {} s)",
                            missing.join(", "),
                            timeout.as_secs()
                        ),
                    );
                }
                Some(&since) if now - since >= timeout => {
                    self.vm_event(
                        store,
                        "order-timeout",
                        &folder,
                        format!(
                            "restarting without {}, not running after {} s",
                            missing.join(", "),
                            timeout.as_secs()
                        ),
                    );
                    // Once: from now on it is ready like any other.
                    waiting.insert(folder.clone(), now - timeout - Duration::from_secs(1));
                    ready.push((need, folder));
                }
                Some(_) => {}
            }
        }
        ready
    }

    /// Records `lock-lost` for a VM this agent runs whose config lock its runner no longer
    /// holds (its slot declared dead, or another host has it), and kills that runner.
    fn check_locks(
        &self,
        store: usize,
        inos: &HashMap<&str, u64>,
        held: &HashMap<u64, (String, u32)>,
        orphaned: &HashSet<u64>,
    ) {
        let mut vms = lock(&self.vms);
        for ((on, folder), vm) in vms.iter_mut() {
            if *on != store {
                continue;
            }
            let (Some(child), Some(ino)) = (&mut vm.child, inos.get(folder.as_str())) else {
                continue;
            };
            if vm.lock_lost {
                continue;
            }
            let holder = match held.get(ino) {
                Some((host, pid)) if *host == self.config.name && *pid == child.id() => continue,
                Some((host, pid)) => format!("host {host} (pid {pid}) holds it"),
                None if orphaned.contains(ino) => {
                    "its runner's host slot stopped heartbeating".to_string()
                }
                // Between two records of one survey: look again next time.
                None => continue,
            };
            vm.lock_lost = true;
            drop_event_raw(
                &self.events,
                "lock-lost",
                Some(folder),
                Some(&self.stores[store].given),
                Some(&self.config.name),
                format!("runner pid {}: {holder}; killing it", child.id()),
            );
            // Another host may run the VM now or soon: a runner without the lock must not
            // touch the guest's disks again. Its exit is then a crash like any other.
            let _ = child.kill();
        }
    }

    fn find_vms(&self, store: usize) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for dir in &self.config.vm_dirs {
            let dir = dir.trim_end_matches('/');
            match self.find_in(&self.stores[store].ds(), dir, 0, &mut found) {
                Ok(()) | Err(vmfs::Error::NotFound { .. }) => {}
                Err(e) => return Err(vmfs_err(format!("listing {dir}"))(e)),
            }
        }
        Ok(found)
    }

    fn find_in(
        &self,
        ds: &Datastore,
        dir: &str,
        depth: usize,
        found: &mut Vec<String>,
    ) -> vmfs::Result<()> {
        let entries = ds.list(if dir.is_empty() { "/" } else { dir })?;
        if entries
            .iter()
            .any(|(n, a)| n == OsStr::new(VM_FILE) && a.kind == Kind::File)
        {
            found.push(dir.to_string());
            return Ok(());
        }
        if depth >= MAX_DEPTH {
            return Ok(());
        }
        for (name, attr) in entries {
            if attr.kind == Kind::Dir {
                self.find_in(
                    ds,
                    &format!("{dir}/{}", name.to_string_lossy()),
                    depth + 1,
                    found,
                )?;
            }
        }
        Ok(())
    }

    /// The `[ha]` table of `folder`'s vm.toml and what the VM takes, read without its lock
    /// (a running VM holds it).
    pub fn read_vm(&self, store: usize, folder: &str) -> Result<(Ha, Need)> {
        let ds = self.stores[store].ds();
        let path = format!("{folder}/{VM_FILE}");
        let attr = ds
            .stat_path(&path)
            .map_err(|e| Error::Api(format!("{folder}: no VM here ({path}: {e})")))?;
        if attr.size > MAX_VM_FILE {
            return Err(Error::Api(format!(
                "{path}: too large for a VM configuration"
            )));
        }
        let mut bytes = vec![0u8; usize::try_from(attr.size).unwrap_or(0)];
        let n = ds.read(attr.ino, 0, &mut bytes).map_err(vmfs_err(&path))?;
        bytes.truncate(n);
        let text =
            String::from_utf8(bytes).map_err(|_| Error::Api(format!("{path}: not UTF-8")))?;
        let parsed: HaOnly =
            toml::from_str(&text).map_err(|e| Error::Api(format!("{path}: {}", e.message())))?;
        let ha = parsed.ha.unwrap_or_default();
        ha.check().map_err(|e| Error::Api(format!("{path}: {e}")))?;
        Ok((
            ha,
            Need {
                memory_mib: parsed.memory_mib,
                cpus: parsed.vcpus,
            },
        ))
    }
}

/// Tells systemd (`$NOTIFY_SOCKET`, when set) how the agent stands.
fn notify_systemd(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "notifying systemd failed");
    }
}

fn record_path(name: &str) -> String {
    format!("{RECORD_DIR}/{name}")
}

/// Opens (creating it the first time) this host's record, exclusively: a second live agent
/// of the same name is refused here rather than overwriting the first one's record.
fn open_record(ds: &Datastore, name: &str) -> Result<vmfs::FileHandle> {
    let path = record_path(name);
    if name.contains('/') || name.starts_with('.') {
        return Err(Error::Config(format!(
            "host name {name:?}: must not contain '/' or start with '.'"
        )));
    }
    ds.mkdir_all(RECORD_DIR, 0o755, vmfs::Creds::default())
        .map_err(vmfs_err(RECORD_DIR))?;
    match ds.create_path(&path, &vmfs::NewFile::default()) {
        Ok(_) | Err(vmfs::Error::Exists { .. }) => {}
        Err(e) => return Err(vmfs_err(&path)(e)),
    }
    ds.open_path(&path, vmfs::Access::Exclusive)
        .map_err(|e| match e {
            vmfs::Error::Busy { .. } => Error::Config(format!(
                "another agent named {name:?} runs on this datastore ({e}); host names must be unique"
            )),
            e => vmfs_err(&path)(e),
        })
}

fn drop_event(
    events: &Mutex<EventLog>,
    kind: &str,
    vm: &str,
    datastore: &str,
    host: &str,
    status: std::process::ExitStatus,
) {
    drop_event_raw(
        events,
        kind,
        Some(vm),
        Some(datastore),
        Some(host),
        format!("runner {status}"),
    );
}

/// Records an event (also while the caller holds another lock of the agent's) and logs it.
fn drop_event_raw(
    events: &Mutex<EventLog>,
    kind: &str,
    vm: Option<&str>,
    datastore: Option<&str>,
    host: Option<&str>,
    detail: String,
) {
    // What an operator must look into is a warning: the default log level shows it.
    if matches!(
        kind,
        "host-dead" | "vm-crashed" | "vm-failed" | "restart-lost"
    ) {
        tracing::warn!(kind, vm, datastore, host, %detail, "host agent event");
    } else {
        tracing::info!(kind, vm, datastore, host, %detail, "host agent event");
    }
    let mut log = lock(events);
    let seq = log.next_seq;
    log.next_seq += 1;
    if log.kept.len() == EVENTS_KEPT {
        log.kept.pop_front();
    }
    log.kept.push_back(Event {
        seq,
        time_ns: now_ns(),
        kind: kind.to_string(),
        vm: vm.map(str::to_string),
        datastore: datastore.map(str::to_string),
        host: host.map(str::to_string),
        detail,
    });
}

/// What a runner wrote to its message file since `offset` (at most the last 4 KiB).
fn tail(path: &Path, offset: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let from = offset.max(len.saturating_sub(4096));
    let mut text = String::new();
    if file.seek(SeekFrom::Start(from)).is_ok() {
        let _ = file.read_to_string(&mut text);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, memory_mib: u64, cpus: u32) -> HostRecord {
        HostRecord {
            version: RECORD_VERSION,
            host: name.to_string(),
            slot: 0,
            generation: 0,
            memory_mib,
            cpus,
            free_memory_mib: memory_mib,
            free_cpus: cpus,
            vms: 0,
            starting: Vec::new(),
        }
    }

    fn need(memory_mib: u64, cpus: u32) -> Need {
        Need { memory_mib, cpus }
    }

    #[test]
    fn ha_after_names_vm_folders_by_absolute_path() {
        let parse = |text: &str| toml::from_str::<HaOnly>(text).unwrap().ha.unwrap();
        assert!(
            parse("[ha]\nrestart = true\nafter = [\"/vms/db\"]\n")
                .check()
                .is_ok()
        );
        let e = parse("[ha]\nafter = [\"db\"]\n").check().unwrap_err();
        assert!(e.contains("\"db\" is not a VM folder"), "{e}");
        assert!(parse("[ha]\nafter = [\"/\"]\n").check().is_err());
    }

    #[test]
    fn place_fills_the_host_with_most_free_then_spreads() {
        let hosts = [host("b", 192, 8), host("c", 96, 8)];
        let placed = place(&hosts, &[need(64, 1), need(64, 1), need(64, 1)]);
        let names: Vec<_> = placed.iter().map(|h| h.as_deref()).collect();
        assert_eq!(names, [Some("b"), Some("b"), Some("c")]);
    }

    #[test]
    fn place_skips_a_host_the_vm_does_not_fit_on_and_breaks_ties_by_name() {
        let hosts = [host("b", 4096, 1), host("c", 512, 4), host("a", 512, 4)];
        let placed = place(&hosts, &[need(256, 2), need(8192, 1)]);
        // 2 vCPUs do not fit on b; a and c tie, a's name is first. 8 GiB fits nowhere: b has
        // the most memory.
        assert_eq!(placed, [Some("a".to_string()), Some("b".to_string())]);
        assert!(place(&[], &[need(1, 1)]) == [None]);
    }

    #[test]
    fn the_event_log_keeps_the_newest_and_answers_since_a_number() {
        let log = Mutex::new(EventLog::new());
        let total = EVENTS_KEPT as u64 + 10;
        for i in 0..total {
            drop_event_raw(&log, "vm-started", None, None, None, format!("event {i}"));
        }
        let log = lock(&log);
        let all = log.since(0);
        assert_eq!(all.len(), EVENTS_KEPT);
        assert_eq!(all.first().map(|e| e.seq), Some(11));
        assert_eq!(all.last().map(|e| e.seq), Some(total));
        let tail = log.since(total - 2);
        assert_eq!(
            tail.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [total - 1, total]
        );
        assert!(log.since(total).is_empty());
        // A reader following a previous agent's numbers gets everything kept.
        assert_eq!(log.since(total + 5).len(), EVENTS_KEPT);
    }
}
