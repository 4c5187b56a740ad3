//! `vapp vm start`: this process runs one VM from its folder on the datastore until the guest
//! powers off or is stopped, Firecracker-style (one VMM process per VM).
//!
//! Before any guest code runs it holds, for the whole run: the host-local claim (see
//! [`super::runtime`]), a datastore mount with a host identity of its own, the exclusive lock
//! on the folder's `vm.toml` (the VM's identity on the datastore, which the cluster layer
//! records on disk with the holder's host name), and every disk through
//! `Datastore::open_lun`. The kernel and initrd are read from the datastore, never from this
//! host's file system. Any failure before the guest starts changes nothing.
//!
//! Every writable disk is served through a `lun::SwitchLun`: a disk with snapshots has the
//! snapshot engine under it from the start, and `vm snapshot` of the running VM
//! ([`Request::Snapshot`]) puts the engine under a disk that has none yet without stopping
//! the guest, then takes one group session of all disks while their writes wait.
//!
//! While the guest runs, `vm stop` (the control socket) and SIGTERM/SIGINT press the ACPI
//! power button; `vm stop --force` or a second signal powers the VM off. A guest reset boots
//! the VM again unless `on_reset = "power-off"` or a stop was asked for.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hv::{Hypervisor, VmExit, VmHandle};
use lun::{Lun, SwitchLun};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::termios::{self, InputFlags, LocalFlags, SetArg, Termios};
use snapshot::Snapshots;
use tracing::{info, warn};
use vmfs::{Access, Datastore, FileHandle, Kind};

use super::runtime::{self, Presence, Record, Registry, Reply, Request};
use super::spec::{self, OnReset, VmSpec};

/// Exit statuses of `vm start` besides 0 (the guest powered off with status 0, or reset with
/// `on_reset = "power-off"`) and 1 (vapp could not start or run the VM).
pub const EXIT_GUEST_STATUS: u8 = 3;
pub const EXIT_STOPPED: u8 = 4;
pub const EXIT_CRASHED: u8 = 5;
/// Ctrl-]: detaches the terminal from the guest's console (telnet's and virsh's escape).
const DETACH: u8 = 0x1d;

pub struct Options {
    /// Attach the terminal to the serial console (keys go to the guest).
    pub console: bool,
    /// Write the serial console to this file (appended) instead of standard output.
    pub console_log: Option<PathBuf>,
    pub kvm: PathBuf,
    /// Every NIC on this network instead of vm.toml's, for this run only.
    pub network: Option<String>,
}

enum Event {
    Exited(VmExit),
    Signal(Signal),
    Control(Request, Sender<Reply>),
    Input(Vec<u8>),
}

/// Everything the VM is made of, read from the datastore and held for the whole run.
struct Loaded {
    spec: VmSpec,
    kernel: Vec<u8>,
    initrd: Option<Vec<u8>>,
    disks: Vec<hv::Disk>,
    /// The writable disks, whose layer below can change while the guest runs.
    writable: Vec<WritableDisk>,
    // Last, so the disks are closed before the VM's identity is given up.
    _identity: FileHandle,
}

/// A writable disk of the running VM.
struct WritableDisk {
    path: String,
    switch: Arc<SwitchLun>,
    /// Its snapshot engine, once it has snapshots.
    engine: Option<Snapshots>,
}

pub fn start(datastore: &str, folder: &str, options: Options) -> anyhow::Result<ExitCode> {
    // Before any thread exists, so every thread inherits the mask and only the signal thread
    // takes these signals.
    let stop_signals = block_stop_signals()?;
    let hypervisor = Hypervisor::open_at(&options.kvm).context("this host cannot run VMs")?;
    let lun = crate::cmd::datastore::open_lun(datastore, false)?;
    let uuid = Datastore::open(lun.clone(), &vmfs::OpenOptions::read_only())
        .with_context(|| format!("{datastore}: cannot open datastore"))?
        .superblock()
        .uuid
        .to_string();
    let registry = Registry::for_datastore(&uuid);
    let record = Record {
        vm: folder.to_string(),
        datastore_uuid: uuid,
        lun: datastore.to_string(),
        host: super::host_name(),
        pid: std::process::id(),
        started_ns: super::now_ns(),
    };
    let claim = match registry.claim(&record)? {
        Ok(claim) => claim,
        Err(presence) => bail!("vm {folder} is already running: {}", describe(&presence)),
    };
    let ds = Datastore::open(lun, &super::vm_identity(folder))
        .with_context(|| format!("{datastore}: cannot open datastore"))?;
    let mut loaded = load(&ds, folder)?;
    // After `load`, which may write vm.toml back (new MACs): the override never reaches it.
    if let Some(network) = &options.network {
        for net in &mut loaded.spec.nets {
            net.network.clone_from(network);
        }
    }
    // Admission control: refused here, before the guest exists, naming resource and numbers.
    let power = sched::PowerOn::admit(
        &super::runtime::runtime_root(),
        folder,
        loaded.spec.vcpus,
        loaded.spec.memory_bytes(),
        &loaded.spec.resources,
    )
    .with_context(|| format!("vm {folder}"))?;
    for disk in &mut loaded.disks {
        disk.clock = Some(power.disk_clock());
    }
    let console = ConsoleSink::new(&options)?;
    let first = hypervisor
        .create_vm(vm_config(folder, &loaded, &console, &power)?)
        .with_context(|| format!("vm {folder}"))?;
    let listener = claim.listen()?;

    let (events, inbox) = mpsc::channel();
    spawn_signal_thread(stop_signals, events.clone())?;
    spawn_control_thread(listener, events.clone())?;
    let terminal = if options.console {
        Some(spawn_console_input(events.clone())?)
    } else {
        None
    };
    let mut run = Run {
        ds: &ds,
        folder: folder.to_string(),
        record,
        hypervisor,
        loaded,
        console,
        events,
        inbox,
        stopping: false,
        signals: 0,
        boots: 0,
        pending_input: VecDeque::new(),
        power: &power,
    };
    let outcome = run.run(first);
    if let Some(terminal) = terminal {
        terminal.detach();
    }
    let Run { loaded, .. } = run;
    drop(loaded);
    let closed = ds.close();
    drop(claim);
    let exit = outcome?;
    crate::hostln!("vapp: vm {folder}: {exit}");
    closed.with_context(|| format!("vm {folder}: closing the datastore"))?;
    Ok(ExitCode::from(exit_status(&exit)))
}

fn exit_status(exit: &VmExit) -> u8 {
    match exit {
        VmExit::PowerOff { status: 0 } | VmExit::Reset => 0,
        VmExit::PowerOff { .. } => EXIT_GUEST_STATUS,
        VmExit::Stopped => EXIT_STOPPED,
        VmExit::Crashed { .. } => EXIT_CRASHED,
    }
}

/// Who runs a VM on this host, for messages.
pub fn describe(presence: &Presence) -> String {
    match presence {
        Presence::Stopped => "not running".to_string(),
        Presence::Running(Some(r)) => format!(
            "running on host {} (pid {}, up {})",
            r.host,
            r.pid,
            super::age(r.started_ns)
        ),
        Presence::Running(None) => format!("starting on host {}", super::host_name()),
    }
}

/// Locks the VM's identity and reads everything it needs from the datastore.
fn load(ds: &Datastore, folder: &str) -> anyhow::Result<Loaded> {
    let config_path = spec::path_in(folder, spec::FILE_NAME);
    let identity = match ds.open_path(&config_path, Access::Exclusive) {
        Ok(handle) => handle,
        Err(e @ vmfs::Error::Busy { .. }) => {
            bail!("vm {folder} is already running: {e}")
        }
        Err(vmfs::Error::NotFound { .. }) => bail!("{folder}: no VM here (no {config_path})"),
        Err(e) => return Err(e).with_context(|| format!("vm {folder}")),
    };
    let text = read_all(&identity, &config_path, spec::MAX_BYTES)?;
    let text = String::from_utf8(text).with_context(|| format!("{config_path}: not UTF-8"))?;
    let mut spec = VmSpec::parse(folder, &text).map_err(anyhow::Error::msg)?;
    super::net::assign_macs(folder, &mut spec, &identity, &config_path)?;
    let limit = spec.memory_bytes();
    let kernel = read_file(ds, &spec::path_in(folder, &spec.kernel), "kernel", limit)?;
    let initrd = spec
        .initrd
        .as_ref()
        .map(|i| read_file(ds, &spec::path_in(folder, i), "initrd", limit))
        .transpose()?;
    let (disks, writable) = open_disks(ds, folder, &spec)?;
    Ok(Loaded {
        spec,
        kernel,
        initrd,
        disks,
        writable,
        _identity: identity,
    })
}

fn read_file(ds: &Datastore, path: &str, what: &str, limit: u64) -> anyhow::Result<Vec<u8>> {
    let handle = ds
        .open_path(path, Access::ReadOnly)
        .with_context(|| format!("{what} {path}"))?;
    read_all(&handle, path, limit).with_context(|| format!("{what} {path}"))
}

/// The whole file, refusing one larger than `limit` (a kernel or initrd larger than the VM's
/// memory could not fit in the guest anyway).
fn read_all(handle: &FileHandle, path: &str, limit: u64) -> anyhow::Result<Vec<u8>> {
    let size = handle.size()?;
    if size > limit {
        bail!("{path}: {size} bytes, more than the {limit} this VM can use");
    }
    let mut bytes = vec![0u8; usize::try_from(size)?];
    handle.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

fn open_disks(
    ds: &Datastore,
    folder: &str,
    spec: &VmSpec,
) -> anyhow::Result<(Vec<hv::Disk>, Vec<WritableDisk>)> {
    let mut disks: Vec<hv::Disk> = Vec::new();
    let mut writable = Vec::new();
    let mut inodes = Vec::new();
    for (index, disk) in spec.disks.iter().enumerate() {
        let path = spec::path_in(folder, &disk.path);
        let what = || format!("vm {folder}: disk {index} ({path})");
        if let Some((source, name)) = crate::cmd::vdisk_snapshot::split_session(ds, &path) {
            let lun = crate::cmd::vdisk_snapshot::open_session(ds, source, name, !disk.read_only)
                .with_context(what)?;
            if !disk.read_only && lun.is_read_only() {
                bail!(
                    "{}: a read-only snapshot; take it with --writable, or make the disk read_only",
                    what()
                );
            }
            disks.push(if disk.read_only {
                hv::Disk::read_only(lun)
            } else {
                hv::Disk::new(lun)
            });
            continue;
        }
        let attr = ds.stat_path(&path).with_context(what)?;
        if attr.kind != Kind::File && attr.kind != Kind::Rdm {
            bail!(
                "{}: neither a virtual disk file nor a raw device mapping",
                what()
            );
        }
        if let Some(first) = inodes.iter().position(|&ino| ino == attr.ino) {
            bail!("{}: the same file as disk {first}", what());
        }
        inodes.push(attr.ino);
        let serial = Some(file_serial(ds, attr.ino));
        let access = if disk.read_only {
            Access::ReadOnly
        } else {
            Access::Exclusive
        };
        if attr.kind == Kind::Rdm
            && rdm::show(ds, &path).with_context(what)?.mode == rdm::Mode::Physical
        {
            let mapped = Arc::new(rdm::open(ds, &path, access).with_context(what)?);
            disks.push(physical_disk(mapped, disk.read_only, serial));
            continue;
        }
        if disk.read_only {
            let lun = if attr.kind == Kind::Rdm {
                crate::cmd::vdisk_snapshot::open_disk(ds, &path, access)
            } else {
                ds.open_lun(&path, access).map_err(anyhow::Error::from)
            };
            let mut ro = hv::Disk::read_only(lun.with_context(what)?);
            ro.serial = serial;
            disks.push(ro);
            continue;
        }
        let lun = crate::cmd::vdisk_snapshot::open_disk(ds, &path, access).with_context(what)?;
        let engine =
            crate::cmd::vdisk_snapshot::attach(ds, &path, lun.clone(), false).with_context(what)?;
        let below: Arc<dyn Lun> = match &engine {
            Some(snaps) => snaps.source(),
            None => lun,
        };
        let switch = Arc::new(SwitchLun::new(below));
        let mut rw = hv::Disk::new(switch.clone());
        rw.serial = serial;
        disks.push(rw);
        writable.push(WritableDisk {
            path,
            switch,
            engine,
        });
    }
    Ok((disks, writable))
}

/// A physical-mode mapping as the guest sees it: the device itself, its own serial (a
/// stable one of the mapping when it has none, as a loop device has not), and its discard.
/// No snapshot engine can be put under it.
fn physical_disk(mapped: Arc<rdm::RdmLun>, read_only: bool, serial: Option<String>) -> hv::Disk {
    let serial = mapped
        .serial()
        .map(|s| {
            s.chars()
                .filter(char::is_ascii_graphic)
                .take(hv::SERIAL_BYTES)
                .collect()
        })
        .or(serial);
    let lun: Arc<dyn Lun> = mapped.clone();
    let mut disk = if read_only {
        hv::Disk::read_only(lun)
    } else {
        hv::Disk::new(lun)
    };
    disk.serial = serial;
    if !read_only {
        disk.discard = Some(Arc::new(
            move |offset, len| Ok(mapped.discard(offset, len)?),
        ));
    }
    disk
}

/// The serial a guest reads for the disk file `ino` of `ds` (GET_ID): the same on every host
/// and every start, so a guest's `/dev/disk/by-id` names survive both; another file, or a
/// copy on another datastore, gets another.
fn file_serial(ds: &Datastore, ino: u64) -> String {
    let uuid = ds.superblock().uuid;
    let hash = uuid
        .as_bytes()
        .iter()
        .copied()
        .chain(ino.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    // "vapp-" and 15 hex digits: the 20 bytes GET_ID carries.
    format!("vapp-{:015x}", hash >> 4)
}

fn vm_config(
    folder: &str,
    loaded: &Loaded,
    console: &ConsoleSink,
    power: &sched::PowerOn,
) -> anyhow::Result<hv::VmConfig> {
    let spec = &loaded.spec;
    let mut config = hv::VmConfig::new(spec.name.clone(), loaded.kernel.clone());
    config.vcpus = spec.vcpus;
    config.memory_bytes = spec.memory_bytes();
    config.initrd = loaded.initrd.clone();
    config.cmdline = spec.cmdline.clone();
    config.disks = loaded.disks.clone();
    config.nics = super::net::attach_nics(folder, spec, &power.net_clock())?;
    config.console = hv::Console::Writer(Box::new(console.clone()));
    Ok(config)
}

/// One `vm start`: boots, reboots on a guest reset, and answers signals, `vm stop` and
/// console input until the VM ends.
struct Run<'a> {
    ds: &'a Datastore,
    folder: String,
    record: Record,
    hypervisor: Hypervisor,
    loaded: Loaded,
    console: ConsoleSink,
    events: Sender<Event>,
    inbox: Receiver<Event>,
    /// A stop was asked for: a reset now ends the run instead of rebooting.
    stopping: bool,
    signals: u32,
    boots: u32,
    pending_input: VecDeque<u8>,
    power: &'a sched::PowerOn,
}

impl Run<'_> {
    fn run(&mut self, first: hv::Vm) -> anyhow::Result<VmExit> {
        let mut vm = first;
        loop {
            self.boots += 1;
            // Before the vCPUs run, so the line precedes everything the guest prints.
            let spec = &self.loaded.spec;
            crate::hostln!(
                "vapp: vm {} ({}) {}: {} vCPU(s), {} MiB, {} disk(s); pid {}",
                self.folder,
                spec.name,
                if self.boots == 1 {
                    "started"
                } else {
                    "rebooted"
                },
                spec.vcpus,
                spec.memory_mib,
                spec.disks.len(),
                std::process::id()
            );
            let handle = Arc::new(vm.start().with_context(|| format!("vm {}", self.folder))?);
            if let Err(error) = self.power.attach(&handle.guest_memory_host_ranges(), &|| {
                handle.exit().is_some()
            }) {
                handle.stop();
                return Err(anyhow::Error::new(error).context(format!("vm {}", self.folder)));
            }
            info!(vm = %self.folder, boots = self.boots, "running");
            spawn_waiter(handle.clone(), self.events.clone())?;
            let exit = self.supervise(&handle);
            // The waiter has dropped its reference: join the vCPU threads.
            if let Ok(handle) = Arc::try_unwrap(handle) {
                handle.wait();
            }
            let reboot = exit == VmExit::Reset
                && self.loaded.spec.on_reset == OnReset::Reboot
                && !self.stopping;
            if !reboot {
                return Ok(exit);
            }
            info!(vm = %self.folder, "the guest reset: booting it again");
            vm = self
                .hypervisor
                .create_vm(vm_config(
                    &self.folder,
                    &self.loaded,
                    &self.console,
                    self.power,
                )?)
                .with_context(|| format!("vm {}: rebooting", self.folder))?;
        }
    }

    fn supervise(&mut self, handle: &VmHandle) -> VmExit {
        loop {
            let event = if self.pending_input.is_empty() {
                self.inbox
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                // The UART's FIFO was full: offer the rest again soon.
                self.inbox.recv_timeout(Duration::from_millis(10))
            };
            match event {
                Ok(Event::Exited(exit)) => return exit,
                Ok(Event::Signal(signal)) => self.on_signal(handle, signal),
                Ok(Event::Control(request, reply)) => {
                    let _ = reply.send(self.on_request(handle, request));
                }
                Ok(Event::Input(bytes)) => self.pending_input.extend(bytes),
                Err(RecvTimeoutError::Timeout) => {}
                // Unreachable: this struct keeps a sender.
                Err(RecvTimeoutError::Disconnected) => {
                    handle.stop();
                    return handle
                        .wait_timeout(Duration::from_secs(5))
                        .unwrap_or(VmExit::Stopped);
                }
            }
            if !self.pending_input.is_empty() {
                let bytes: Vec<u8> = self.pending_input.iter().copied().collect();
                let taken = handle.console_input(&bytes);
                self.pending_input.drain(..taken);
            }
        }
    }

    fn on_signal(&mut self, handle: &VmHandle, signal: Signal) {
        if signal == Signal::SIGHUP {
            info!(vm = %self.folder, "SIGHUP ignored: the VM keeps running");
            return;
        }
        self.signals += 1;
        self.stopping = true;
        if self.signals == 1 {
            // Said before pressing: the guest answers the button on the same terminal, and a
            // message printed after it would split the guest's shutdown line.
            crate::hostln!(
                "vapp: vm {}: {signal}: pressing the power button; send it again to power the VM off now",
                self.folder
            );
            if handle.power_button() {
                return;
            }
        }
        crate::hostln!("vapp: vm {}: {signal}: powering off", self.folder);
        handle.stop();
    }

    fn on_request(&mut self, handle: &VmHandle, request: Request) -> Reply {
        let reply = |ok: bool, message: String| Reply { ok, message };
        match request {
            Request::Status => reply(
                true,
                format!(
                    "running on host {} (pid {}), boot {}",
                    self.record.host, self.record.pid, self.boots
                ),
            ),
            Request::Shutdown => {
                self.stopping = true;
                if handle.power_button() {
                    reply(true, "pressed the ACPI power button".to_string())
                } else {
                    reply(true, "the VM is already ending".to_string())
                }
            }
            Request::Kill => {
                self.stopping = true;
                handle.stop();
                reply(true, "powering off".to_string())
            }
            Request::Snapshot { name } => match self.snapshot(&name) {
                Ok(message) => reply(true, message),
                Err(e) => reply(false, format!("{e:#}")),
            },
        }
    }

    /// Takes snapshot `name` of every writable disk at one point: a disk without snapshots
    /// first gets its pool and the engine under its virtio-blk device, then one group
    /// session is taken while the writes of all disks wait. Returns what the guest felt.
    fn snapshot(&mut self, name: &str) -> anyhow::Result<String> {
        let folder = &self.folder;
        // A physical mapping is not among the writable disks an engine can go under: a
        // snapshot of the others alone would not be the VM's point in time.
        for disk in self.loaded.spec.disks.iter().filter(|d| !d.read_only) {
            let path = spec::path_in(folder, &disk.path);
            if let Ok(mapping) = rdm::show(self.ds, &path)
                && mapping.mode == rdm::Mode::Physical
            {
                bail!(
                    "vm {folder}: disk {path} is a physical-mode raw device mapping, which vapp \
                     does not snapshot; use the array's snapshots, or make the disk read_only"
                );
            }
        }
        let mut switch_pause = Duration::ZERO;
        for disk in &mut self.loaded.writable {
            if disk.engine.is_some() {
                continue;
            }
            // The engine wraps the layer the guest writes now; it copies nothing until
            // the first session, so the guest may keep writing around it meanwhile.
            let snaps =
                crate::cmd::vdisk_snapshot::attach(self.ds, &disk.path, disk.switch.below(), true)?
                    .with_context(|| format!("{}: no snapshot engine", disk.path))?;
            let view: Arc<dyn Lun> = snaps.source();
            let started = Instant::now();
            disk.switch
                .switch(|_| Ok::<_, std::convert::Infallible>(view))
                .with_context(|| format!("{}: putting the snapshot engine under it", disk.path))?;
            switch_pause = switch_pause.max(started.elapsed());
            disk.engine = Some(snaps);
            info!(vm = %folder, disk = %disk.path, "snapshot engine now under the running disk");
        }
        let members: Vec<&Snapshots> = self
            .loaded
            .writable
            .iter()
            .filter_map(|d| d.engine.as_ref())
            .collect();
        if members.is_empty() {
            bail!("vm {folder}: no writable disk to snapshot");
        }
        let started = Instant::now();
        snapshot::create_group_session(&members, name, false)
            .with_context(|| format!("vm {folder}: snapshot {name}"))?;
        let pause = started.elapsed();
        info!(vm = %folder, snapshot = name, disks = members.len(),
            pause_us = pause.as_micros() as u64, switch_pause_us = switch_pause.as_micros() as u64,
            "snapshot taken while running");
        Ok(format!(
            "snapshot {name} of {} disk(s) taken while running; guest disk writes paused {:.1} ms",
            members.len(),
            pause.max(switch_pause).as_secs_f64() * 1000.0
        ))
    }
}

fn block_stop_signals() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).context("blocking signals")?;
    Ok(set)
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .with_context(|| format!("starting the {name} thread"))?;
    Ok(())
}

fn spawn_signal_thread(signals: SigSet, events: Sender<Event>) -> anyhow::Result<()> {
    spawn("signals", move || {
        while let Ok(signal) = signals.wait() {
            if events.send(Event::Signal(signal)).is_err() {
                return;
            }
        }
    })
}

fn spawn_waiter(handle: Arc<VmHandle>, events: Sender<Event>) -> anyhow::Result<()> {
    spawn("vm-waiter", move || {
        let exit = loop {
            if let Some(exit) = handle.wait_timeout(Duration::from_secs(3600)) {
                break exit;
            }
        };
        drop(handle);
        let _ = events.send(Event::Exited(exit));
    })
}

/// Serves `vm stop` and `vm list`: each connection is one request and its reply.
fn spawn_control_thread(listener: UnixListener, events: Sender<Event>) -> anyhow::Result<()> {
    spawn("control", move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let request = match runtime::read_request(&stream) {
                Ok(request) => request,
                Err(error) => {
                    warn!(%error, "bad control request");
                    continue;
                }
            };
            let (reply_to, reply) = mpsc::channel();
            if events.send(Event::Control(request, reply_to)).is_err() {
                return;
            }
            let answer = reply
                .recv_timeout(runtime::ANSWER_TIMEOUT)
                .unwrap_or(Reply {
                    ok: false,
                    message: "the VM process did not answer".to_string(),
                });
            if let Err(error) = runtime::write_reply(&stream, &answer) {
                warn!(%error, "control reply lost");
            }
        }
    })
}

/// The serial console's output: standard output, a log file, or both.
#[derive(Clone)]
struct ConsoleSink {
    stdout: bool,
    log: Option<Arc<Mutex<std::fs::File>>>,
}

impl ConsoleSink {
    fn new(options: &Options) -> anyhow::Result<ConsoleSink> {
        let log = match &options.console_log {
            Some(path) => Some(Arc::new(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("console log {}", path.display()))?,
            ))),
            None => None,
        };
        Ok(ConsoleSink {
            stdout: options.console || options.console_log.is_none(),
            log,
        })
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A closed terminal or a full disk must not stop the guest: its output is lost.
        if self.stdout {
            let _ = crate::console::guest_output(buf);
        }
        if let Some(log) = &self.log {
            let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = log.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The terminal given to the guest by `--console`: keys go to the guest, Ctrl-] gives it back.
struct Terminal {
    saved: Arc<Mutex<Option<Termios>>>,
    done: Arc<AtomicBool>,
}

impl Terminal {
    /// Restores the terminal and stops reading it.
    fn detach(&self) {
        self.done.store(true, Ordering::SeqCst);
        restore(&self.saved);
    }
}

fn restore(saved: &Mutex<Option<Termios>>) {
    if let Some(termios) = saved.lock().unwrap_or_else(PoisonError::into_inner).take() {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &termios);
    }
}

/// Raw input, so Ctrl-C and the like reach the guest; output processing stays on, so the
/// guest's bare line feeds still start new lines.
fn enter_raw_mode() -> anyhow::Result<Option<Termios>> {
    let stdin = io::stdin();
    if !stdin.is_terminal() {
        return Ok(None);
    }
    let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal settings")?;
    let mut raw = saved.clone();
    raw.local_flags &=
        !(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG | LocalFlags::IEXTEN);
    raw.input_flags &= !(InputFlags::IXON
        | InputFlags::ICRNL
        | InputFlags::INLCR
        | InputFlags::BRKINT
        | InputFlags::ISTRIP);
    termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
        .context("putting the terminal in raw mode")?;
    Ok(Some(saved))
}

fn spawn_console_input(events: Sender<Event>) -> anyhow::Result<Terminal> {
    let saved = Arc::new(Mutex::new(enter_raw_mode()?));
    if saved
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_some()
    {
        crate::hostln!("vapp: console attached; Ctrl-] detaches (the VM keeps running)\r");
    }
    let terminal = Terminal {
        saved: saved.clone(),
        done: Arc::new(AtomicBool::new(false)),
    };
    let done = terminal.done.clone();
    spawn("console-input", move || {
        let stdin = io::stdin();
        let mut buf = [0u8; 256];
        while !done.load(Ordering::SeqCst) {
            let mut fds = [nix::poll::PollFd::new(
                stdin.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, 200u16) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(_) => return,
            }
            let n = match nix::unistd::read(stdin.as_fd(), &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let bytes = &buf[..n];
            let (keys, detach) = match bytes.iter().position(|&b| b == DETACH) {
                Some(at) => (&bytes[..at], true),
                None => (bytes, false),
            };
            if !keys.is_empty() && events.send(Event::Input(keys.to_vec())).is_err() {
                return;
            }
            if detach {
                restore(&saved);
                crate::hostln!(
                    "\nvapp: console detached; the VM keeps running (`vapp vm stop` ends it)"
                );
                return;
            }
        }
    })?;
    Ok(terminal)
}
