//! vapp's host agent (`vapp host run`): one long-running process per host that
//!
//! - keeps a host slot on its datastore (a long-lived vmfs host, as `vapp mount` is);
//! - runs the VMs placed on it, each as its own `vapp vm start --foreground` child process
//!   (Firecracker's one process per VM), restarting a protected VM that crashes, with
//!   back-off, until it has failed [`Config::max_restarts`] times in a row;
//! - watches the heartbeats of the datastore's other hosts, and restarts the protected VMs
//!   (`[ha] restart = true` in vm.toml) of a host that is dead by the cluster rules, by
//!   priority. Which VMs a dead host ran needs no record of its own: a VM's runner holds the
//!   exclusive lock on its `vm.toml`, so a protected VM whose lock names a dead holder (or a
//!   holder already recovered, whose lock is stale) ran there and did not stop cleanly. Two
//!   survivors racing for one VM both start it; the lock lets one run and the other's child
//!   fails at once with "already running", and that agent moves on;
//! - powers off the VMs it runs when its host loses the datastore ([`isolation`]);
//! - serves an HTTP + JSON API on a Unix socket of mode 0600 ([`api`]).

pub mod api;
pub mod client;
pub mod isolation;

use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// The datastores this host joins; this version runs VMs from exactly one.
    pub datastores: Vec<String>,
    /// Where the API socket, the VMs' console logs and their runners' messages live.
    pub runtime_dir: PathBuf,
    /// Datastore folders searched for VM folders (folders holding a vm.toml).
    #[serde(default = "default_vm_dirs")]
    pub vm_dirs: Vec<String>,
    /// A protected VM whose runner fails this many times in a row is marked failed.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// What happens to this host's VMs when it loses the datastore.
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
        if config.datastores.len() != 1 {
            return Err(Error::Config(format!(
                "{origin}: `datastores` lists {} datastores; this version of the agent joins exactly one",
                config.datastores.len()
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
}

/// `[ha]` in vm.toml.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ha {
    /// Restart the VM on a surviving host when its host dies, and here when it crashes.
    #[serde(default)]
    pub restart: bool,
    #[serde(default)]
    pub priority: Priority,
    /// Overrides the host's `isolation_response` for this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<isolation::IsolationResponse>,
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

/// Only the `[ha]` table of a vm.toml; the rest is `vm start`'s business.
#[derive(Deserialize)]
struct HaOnly {
    ha: Option<Ha>,
}

/// One thing the agent did or saw, for `vapp host events` and the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Wall clock, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// `host-dead`, `vm-started`, `vm-restarted`, `vm-exited`, `vm-crashed`, `vm-failed`,
    /// `vm-stopped`, `restart-lost` (another host took the VM first), `agent-started`,
    /// `agent-stopped`, `isolated` (this host lost the datastore), `vm-powered-off` and
    /// `vm-kept` (the isolation response), `rejoined`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
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
}

struct Vm {
    child: Option<Child>,
    state: VmState,
    protected: bool,
    failures: u32,
    next_try: Option<Instant>,
    /// A stop was asked for: the child's exit is not a crash.
    stopping: bool,
    /// `[ha] isolation`, read at start: an isolated host cannot read it.
    isolation: Option<isolation::IsolationResponse>,
}

/// A host seen in the heartbeat region, by slot and incarnation.
struct Seen {
    counter: u64,
    moved: Instant,
    declared_dead: bool,
}

pub struct Agent {
    config: Config,
    exe: PathBuf,
    lun: Arc<dyn Lun>,
    /// Replaced when the host rejoins after isolation.
    ds: Mutex<Arc<Datastore>>,
    isolation: Mutex<isolation::Isolation>,
    vms: Mutex<BTreeMap<String, Vm>>,
    seen: Mutex<HashMap<(u32, u64), Seen>>,
    events: Mutex<Vec<Event>>,
    stop: Arc<AtomicBool>,
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
    /// Joins the datastore on `lun` as host `config.name`. `exe` is the vapp binary that runs
    /// each VM (`vm start --foreground`).
    pub fn new(
        config: Config,
        exe: PathBuf,
        lun: Arc<dyn Lun>,
        stop: Arc<AtomicBool>,
    ) -> Result<Agent> {
        let mut options = vmfs::OpenOptions::read_write();
        options.host_name = config.name.clone();
        let ds = Datastore::open(lun.clone(), &options)
            .map_err(vmfs_err(format!("datastore {}", config.datastores[0])))?;
        Ok(Agent {
            config,
            exe,
            lun,
            ds: Mutex::new(Arc::new(ds)),
            isolation: Mutex::new(isolation::Isolation::default()),
            vms: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(HashMap::new()),
            events: Mutex::new(Vec::new()),
            stop,
        })
    }

    fn ds(&self) -> Arc<Datastore> {
        lock(&self.ds).clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn event(&self, kind: &str, vm: Option<&str>, host: Option<&str>, detail: String) {
        drop_event_raw(&self.events, kind, vm, host, detail);
    }

    pub fn events(&self) -> Vec<Event> {
        lock(&self.events).clone()
    }

    /// Runs until the stop flag is set, then stops the VMs it runs and leaves the datastore.
    pub fn run(self: &Arc<Self>) -> Result<()> {
        std::fs::create_dir_all(self.config.runtime_dir.join("vms")).map_err(io(self
            .config
            .runtime_dir
            .display()
            .to_string()))?;
        let server = api::serve(self.clone())?;
        self.event(
            "agent-started",
            None,
            Some(&self.config.name),
            format!("serving {}", self.config.socket().display()),
        );
        let tick = (self.ds().timing().io_timeout / 2).max(Duration::from_millis(50));
        while !self.stop.load(Ordering::SeqCst) {
            self.reap();
            if self.check_isolation() {
                std::thread::sleep(tick);
                continue;
            }
            let read = self.watch_cluster();
            if let Err(e) = &read {
                tracing::warn!(error = %e, "reading the datastore's heartbeats and locks failed");
            }
            self.heartbeats_read(read.is_ok());
            std::thread::sleep(tick);
        }
        self.event(
            "agent-stopped",
            None,
            Some(&self.config.name),
            "stopping the VMs this host runs".to_string(),
        );
        let running: Vec<String> = lock(&self.vms)
            .iter()
            .filter(|(_, vm)| vm.child.is_some())
            .map(|(path, _)| path.clone())
            .collect();
        for path in running {
            if let Err(e) = self.stop_vm(&path, Duration::from_secs(10)) {
                tracing::warn!(vm = %path, error = %e, "stopping a VM failed");
            }
        }
        server.shutdown();
        let _ = std::fs::remove_file(self.config.socket());
        Ok(())
    }

    /// Leaves the datastore cleanly (after [`Agent::run`]).
    pub fn close(self) -> Result<()> {
        let Ok(ds) = Arc::try_unwrap(self.ds.into_inner().unwrap_or_else(PoisonError::into_inner))
        else {
            return Err(Error::Api(format!(
                "closing {}: the datastore is still in use",
                self.config.datastores[0]
            )));
        };
        ds.close()
            .map_err(vmfs_err(format!("closing {}", self.config.datastores[0])))
    }

    fn log_path(&self, folder: &str, ext: &str) -> PathBuf {
        let name: String = folder
            .trim_start_matches('/')
            .chars()
            .map(|c| if c == '/' { '_' } else { c })
            .collect();
        self.config
            .runtime_dir
            .join("vms")
            .join(format!("{name}.{ext}"))
    }

    /// Starts the VM at `folder` here and waits until its runner holds its lock.
    pub fn start_vm(&self, folder: &str) -> Result<u32> {
        {
            let vms = lock(&self.vms);
            if let Some(Vm {
                child: Some(child), ..
            }) = vms.get(folder)
            {
                return Err(Error::Api(format!(
                    "vm {folder} is already running on host {} (pid {})",
                    self.config.name,
                    child.id()
                )));
            }
        }
        let ha = self.read_ha(folder)?;
        let stderr_path = self.log_path(folder, "log");
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
            .arg(&self.config.datastores[0])
            .args(["vm", "start", "--foreground", folder, "--console-log"])
            .arg(self.log_path(folder, "console"))
            .env("VAPP_HOST_NAME", &self.config.name)
            .env("VAPP_RUNTIME_DIR", &self.config.runtime_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io(format!("running {}", self.exe.display())))?;
        let pid = child.id();
        match self.wait_running(folder, &mut child) {
            Ok(()) => {
                lock(&self.vms).insert(
                    folder.to_string(),
                    Vm {
                        child: Some(child),
                        state: VmState::Running,
                        protected: ha.restart,
                        failures: 0,
                        next_try: None,
                        stopping: false,
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

    /// Waits until `child` holds the VM's lock (it then runs the guest), or exits.
    fn wait_running(&self, folder: &str, child: &mut Child) -> Result<(), String> {
        let config = format!("{folder}/{VM_FILE}");
        let deadline =
            Instant::now() + self.ds().timing().lock_wait() * 2 + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Err(status.to_string()),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            if let Ok(ino) = self.ds().resolve(&config) {
                let held = vmfs::cluster::survey::survey(self.lun.clone(), Duration::ZERO)
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
                if held {
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
    pub fn stop_vm(&self, folder: &str, grace: Duration) -> Result<()> {
        let pid = {
            let mut vms = lock(&self.vms);
            let Some(vm) = vms.get_mut(folder) else {
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
                .get(folder)
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
            .map(|(path, vm)| VmReport {
                path: path.clone(),
                state: serde_json::to_value(vm.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                host: self.config.name.clone(),
                pid: vm.child.as_ref().map(Child::id),
                failures: vm.failures,
            })
            .collect()
    }

    /// Collects exited runners; a protected VM that crashed is restarted after a back-off
    /// (1 s, 2 s, 4 s, ...) until it has failed `max_restarts` times in a row.
    fn reap(&self) {
        let mut retry = Vec::new();
        {
            let mut vms = lock(&self.vms);
            for (path, vm) in vms.iter_mut() {
                if let Some(child) = &mut vm.child {
                    let Ok(Some(status)) = child.try_wait() else {
                        continue;
                    };
                    vm.child = None;
                    // 0: powered off; 3: powered off with a status; 4: stopped (vm start).
                    let clean = vm.stopping || matches!(status.code(), Some(0 | 3 | 4));
                    if clean {
                        vm.state = VmState::Stopped;
                        drop_event(&self.events, "vm-stopped", path, &self.config.name, status);
                    } else if vm.protected {
                        vm.failures += 1;
                        if vm.failures >= self.config.max_restarts {
                            vm.state = VmState::Failed;
                            drop_event(&self.events, "vm-failed", path, &self.config.name, status);
                        } else {
                            vm.state = VmState::Restarting;
                            vm.next_try = Some(
                                Instant::now() + Duration::from_secs(1 << (vm.failures - 1).min(6)),
                            );
                            drop_event(&self.events, "vm-crashed", path, &self.config.name, status);
                        }
                    } else {
                        vm.state = VmState::Stopped;
                        drop_event(&self.events, "vm-exited", path, &self.config.name, status);
                    }
                }
                if vm.state == VmState::Restarting
                    && vm.next_try.is_some_and(|t| Instant::now() >= t)
                {
                    vm.next_try = None;
                    retry.push(path.clone());
                }
            }
        }
        for path in retry {
            self.restart(&path, "restarted after a crash");
        }
    }

    /// Starts `folder` again, keeping its failure count; a failure to start counts too.
    fn restart(&self, folder: &str, why: &str) -> bool {
        let failures = lock(&self.vms).get(folder).map_or(0, |vm| vm.failures);
        match self.start_vm(folder) {
            Ok(pid) => {
                if let Some(vm) = lock(&self.vms).get_mut(folder) {
                    vm.failures = failures;
                }
                self.event(
                    "vm-restarted",
                    Some(folder),
                    Some(&self.config.name),
                    format!("{why} (pid {pid})"),
                );
                true
            }
            Err(e) if e.to_string().contains(ALREADY_RUNNING) => {
                lock(&self.vms).remove(folder);
                self.event(
                    "restart-lost",
                    Some(folder),
                    Some(&self.config.name),
                    format!("another host runs it: {e}"),
                );
                false
            }
            Err(e) => {
                let mut vms = lock(&self.vms);
                let vm = vms.entry(folder.to_string()).or_insert(Vm {
                    child: None,
                    state: VmState::Restarting,
                    protected: true,
                    failures,
                    next_try: None,
                    stopping: false,
                    isolation: None,
                });
                vm.failures = failures + 1;
                if vm.failures >= self.config.max_restarts {
                    vm.state = VmState::Failed;
                    drop(vms);
                    self.event(
                        "vm-failed",
                        Some(folder),
                        Some(&self.config.name),
                        e.to_string(),
                    );
                } else {
                    vm.state = VmState::Restarting;
                    vm.next_try =
                        Some(Instant::now() + Duration::from_secs(1 << (vm.failures - 1).min(6)));
                    drop(vms);
                    self.event(
                        "vm-crashed",
                        Some(folder),
                        Some(&self.config.name),
                        e.to_string(),
                    );
                }
                false
            }
        }
    }

    /// Follows the other hosts' heartbeats and restarts the protected VMs of dead ones.
    fn watch_cluster(&self) -> Result<()> {
        let survey = vmfs::cluster::survey::survey(self.lun.clone(), Duration::ZERO)
            .map_err(vmfs_err("reading heartbeats"))?;
        let ds = self.ds();
        let dead_after = ds.timing().dead_after();
        let now = Instant::now();
        let me = ds.host_slot();
        // Inodes locked open exclusively by a dead host, or by one already recovered.
        let mut orphaned: HashSet<u64> = HashSet::new();
        let mut alive_holds: HashSet<u64> = HashSet::new();
        {
            let mut seen = lock(&self.seen);
            for host in &survey.hosts {
                if Some(host.slot) == me {
                    continue;
                }
                let entry = seen.entry((host.slot, host.generation)).or_insert(Seen {
                    counter: host.counter,
                    moved: now,
                    declared_dead: false,
                });
                if entry.counter != host.counter {
                    entry.counter = host.counter;
                    entry.moved = now;
                }
                let dead = host.state == "recovering" || now - entry.moved >= dead_after;
                if dead && !entry.declared_dead {
                    entry.declared_dead = true;
                    drop_event_raw(
                        &self.events,
                        "host-dead",
                        None,
                        Some(&host.host_name),
                        format!(
                            "slot {} (pid {}): no heartbeat for {} ms",
                            host.slot,
                            host.pid,
                            (now - entry.moved).as_millis()
                        ),
                    );
                }
                for l in &host.locks {
                    if let (LockTarget::Inode(ino), vmfs::LockMode::Exclusive, true) =
                        (l.target, l.mode, l.open)
                    {
                        if dead {
                            orphaned.insert(ino);
                        } else {
                            alive_holds.insert(ino);
                        }
                    }
                }
            }
        }
        for l in &survey.stale_locks {
            if let (LockTarget::Inode(ino), vmfs::LockMode::Exclusive, true) =
                (l.target, l.mode, l.open)
            {
                orphaned.insert(ino);
            }
        }
        if orphaned.is_empty() {
            return Ok(());
        }
        let mut candidates = Vec::new();
        for folder in self.find_vms()? {
            let Ok(ino) = ds.resolve(&format!("{folder}/{VM_FILE}")) else {
                continue;
            };
            if !orphaned.contains(&ino) || alive_holds.contains(&ino) {
                continue;
            }
            let skip = lock(&self.vms)
                .get(&folder)
                .is_some_and(|vm| vm.child.is_some() || vm.state == VmState::Failed);
            if skip {
                continue;
            }
            match self.read_ha(&folder) {
                Ok(ha) if ha.restart => candidates.push((ha.priority, folder)),
                Ok(_) => {}
                Err(e) => tracing::warn!(vm = %folder, error = %e, "cannot read vm.toml"),
            }
        }
        candidates.sort();
        for (priority, folder) in candidates {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            tracing::info!(vm = %folder, ?priority, "restarting a dead host's protected VM");
            self.restart(&folder, "its host died");
        }
        Ok(())
    }

    fn find_vms(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for dir in &self.config.vm_dirs {
            let dir = dir.trim_end_matches('/');
            match self.find_in(dir, 0, &mut found) {
                Ok(()) | Err(vmfs::Error::NotFound { .. }) => {}
                Err(e) => return Err(vmfs_err(format!("listing {dir}"))(e)),
            }
        }
        Ok(found)
    }

    fn find_in(&self, dir: &str, depth: usize, found: &mut Vec<String>) -> vmfs::Result<()> {
        let entries = self.ds().list(if dir.is_empty() { "/" } else { dir })?;
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
                    &format!("{dir}/{}", name.to_string_lossy()),
                    depth + 1,
                    found,
                )?;
            }
        }
        Ok(())
    }

    /// The `[ha]` table of `folder`'s vm.toml, read without its lock (a running VM holds it).
    pub fn read_ha(&self, folder: &str) -> Result<Ha> {
        let path = format!("{folder}/{VM_FILE}");
        let attr = self
            .ds()
            .stat_path(&path)
            .map_err(|e| Error::Api(format!("{folder}: no VM here ({path}: {e})")))?;
        if attr.size > MAX_VM_FILE {
            return Err(Error::Api(format!(
                "{path}: too large for a VM configuration"
            )));
        }
        let mut bytes = vec![0u8; usize::try_from(attr.size).unwrap_or(0)];
        let n = self
            .ds()
            .read(attr.ino, 0, &mut bytes)
            .map_err(vmfs_err(&path))?;
        bytes.truncate(n);
        let text =
            String::from_utf8(bytes).map_err(|_| Error::Api(format!("{path}: not UTF-8")))?;
        let parsed: HaOnly =
            toml::from_str(&text).map_err(|e| Error::Api(format!("{path}: {}", e.message())))?;
        Ok(parsed.ha.unwrap_or_default())
    }
}

fn drop_event(
    events: &Mutex<Vec<Event>>,
    kind: &str,
    vm: &str,
    host: &str,
    status: std::process::ExitStatus,
) {
    drop_event_raw(
        events,
        kind,
        Some(vm),
        Some(host),
        format!("runner {status}"),
    );
}

/// Records an event (also while the caller holds another lock of the agent's) and logs it.
fn drop_event_raw(
    events: &Mutex<Vec<Event>>,
    kind: &str,
    vm: Option<&str>,
    host: Option<&str>,
    detail: String,
) {
    // What an operator must look into is a warning: the default log level shows it.
    if matches!(
        kind,
        "host-dead" | "vm-crashed" | "vm-failed" | "restart-lost"
    ) {
        tracing::warn!(kind, vm, host, %detail, "host agent event");
    } else {
        tracing::info!(kind, vm, host, %detail, "host agent event");
    }
    lock(events).push(Event {
        time_ns: now_ns(),
        kind: kind.to_string(),
        vm: vm.map(str::to_string),
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
