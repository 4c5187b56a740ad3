//! `vapp vm ...`: VMs that live on the datastore. A VM is a folder holding `vm.toml`, its
//! kernel, initrd and disks (see [`spec`]); any host that mounts the datastore can run it.
//!
//! - `create` checks everything first and then writes the folder; a failure removes whatever
//!   it wrote, so a failed create changes nothing.
//! - `start` runs the VM in this process ([`run`]).
//! - `stop` and `list` find a VM running here through this host's registry ([`runtime`]), and
//!   one running on another host through the lock on its `vm.toml`, which names the holder.

mod net;
mod run;

pub(crate) use host::vm::{runtime, spec};

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use vmfs::cluster::LockTarget;
use vmfs::{Creds, Datastore, Kind, NewFile, PutOptions};

use self::runtime::{Presence, Registry, Request};
use self::spec::{DiskSpec, OnReset, VmSpec};
use super::datastore::parse_size;

const MIB: u64 = 1 << 20;
/// How deep `vm list` looks for VM folders below its directory.
const MAX_DEPTH: usize = 8;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create a VM folder: vm.toml, the kernel and initrd copied in, new thin disks.
    Create(CreateArgs),
    /// Run a VM in this process until the guest powers off or is stopped. The serial console
    /// is this process's standard output unless --console-log or --console say otherwise.
    Start(StartArgs),
    /// Ask a running VM to shut down (the ACPI power button), or power it off with --force.
    Stop(StopArgs),
    /// The VMs on the datastore: size, disks, and whether they run.
    List(ListArgs),
    /// Snapshot all of a VM's writable disks at one point in time, running or not.
    Snapshot(SnapshotArgs),
    /// Return all of a stopped VM's writable disks to one of its snapshots.
    Revert(SnapshotArgs),
    /// Write hv's test guest kernel (a PVH ELF) to a file, for demos and tests.
    #[command(hide = true)]
    TestGuest(TestGuestArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM folder on the datastore, e.g. /vms/web1; it must not exist.
    path: String,
    /// Kernel on this host (bzImage or x86-64 ELF), copied into the folder.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk on this host, copied into the folder.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = spec::DEFAULT_CMDLINE)]
    cmdline: String,
    #[arg(long)]
    vcpus: u32,
    /// Guest memory, a whole number of MiB, e.g. 256M or 2G.
    #[arg(long)]
    memory: String,
    /// A new thin disk of SIZE in the folder (diskN.vdisk), the datastore path of an
    /// existing virtual disk, or PATH@NAME, a writable snapshot of one. Repeat for more
    /// disks; the first is /dev/vda.
    #[arg(long = "disk", value_name = "SIZE|PATH")]
    disks: Vec<String>,
    /// A NIC on network NAME (`vapp host network create`), with a MAC generated now and kept
    /// in vm.toml. Repeat for more NICs; the first is eth0.
    #[arg(long = "net", value_name = "NETWORK")]
    nets: Vec<String>,
    /// What a guest reset does.
    #[arg(long, value_enum, default_value_t = OnReset::Reboot)]
    on_reset: OnReset,
    /// Display name (default: the folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Protect the VM: the host agents restart it, with this priority, when its host dies
    /// or it crashes (`[ha]` in vm.toml).
    #[arg(long, value_name = "PRIORITY", value_parser = parse_priority)]
    ha: Option<host::Priority>,
}

fn parse_priority(text: &str) -> Result<host::Priority, String> {
    match text {
        "high" => Ok(host::Priority::High),
        "medium" => Ok(host::Priority::Medium),
        "low" => Ok(host::Priority::Low),
        _ => Err(format!("{text:?}: high, medium or low")),
    }
}

#[derive(Args)]
pub struct StartArgs {
    /// The VM folder on the datastore.
    path: String,
    /// Attach this terminal to the serial console: keys go to the guest, Ctrl-] detaches.
    #[arg(long)]
    console: bool,
    /// Append the serial console to FILE instead of printing it (also printed with --console).
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// The KVM device.
    #[arg(long, env = "VAPP_KVM_DEVICE", default_value = "/dev/kvm")]
    kvm: PathBuf,
    /// Run the VM in this process even when this host's agent runs (`vapp host run`);
    /// without it, the agent runs the VM and this command returns once the VM runs.
    #[arg(long)]
    foreground: bool,
    /// Put every NIC on network NAME instead of the ones vm.toml names, for this run only
    /// (vm.toml is not changed; DR drills and recoveries use it). Runs in this process.
    #[arg(long, value_name = "NAME")]
    network: Option<String>,
}

#[derive(Args)]
pub struct StopArgs {
    /// The VM folder on the datastore.
    path: String,
    /// Power the VM off now instead of asking the guest (kills an unresponsive VM process).
    #[arg(long)]
    force: bool,
    /// Seconds to wait for the guest to power off after the power button.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Args)]
pub struct ListArgs {
    /// Where to look for VM folders (folders holding a vm.toml).
    #[arg(default_value = "/vms")]
    dir: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SnapshotArgs {
    /// The VM folder on the datastore.
    path: String,
    /// The snapshot's name: letters, digits, '-', '_' and '.', at most 32.
    name: String,
}

#[derive(Args)]
pub struct TestGuestArgs {
    output: PathBuf,
}

pub fn run(datastore: Option<&str>, command: VmCommand) -> anyhow::Result<ExitCode> {
    match command {
        VmCommand::Create(args) => create(super::require_datastore(datastore)?, args),
        VmCommand::Start(args) => {
            let datastore = super::require_datastore(datastore)?;
            let folder = folder_path(&args.path)?;
            let socket = super::host::agent_socket();
            if !args.foreground
                && !args.console
                && args.console_log.is_none()
                && args.network.is_none()
                && socket.exists()
            {
                return start_through_agent(&socket, datastore, &folder);
            }
            run::start(
                datastore,
                &folder,
                run::Options {
                    console: args.console,
                    console_log: args.console_log,
                    kvm: args.kvm,
                    network: args.network,
                },
            )
        }
        VmCommand::Stop(args) => stop(super::require_datastore(datastore)?, args),
        VmCommand::List(args) => list(super::require_datastore(datastore)?, args),
        VmCommand::Snapshot(args) => snapshot(super::require_datastore(datastore)?, args),
        VmCommand::Revert(args) => revert(super::require_datastore(datastore)?, args),
        VmCommand::TestGuest(args) => {
            let image = hv::test_guest::image().map_err(anyhow::Error::msg)?;
            std::fs::write(&args.output, image)
                .with_context(|| format!("writing {}", args.output.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Asks the local agent to run the VM; it answers once the VM's runner holds its lock.
fn start_through_agent(
    socket: &std::path::Path,
    datastore: &str,
    folder: &str,
) -> anyhow::Result<ExitCode> {
    // The agent may reach the LUN by another path (an nbd:// export of this file): its UUID
    // names it either way, unless it is a copy the agent must not run VMs of.
    let found = host::files_api::AgentDatastore::find(socket, datastore);
    let datastore = found.as_ref().map_or(datastore, |d| d.uuid());
    let (status, body) = host::client::request(
        socket,
        "POST",
        &host::client::vm_path(folder, "start", datastore),
        Duration::from_secs(600),
    )?;
    if status != 200 {
        let message = body["error"].as_str().unwrap_or("no reason given");
        bail!("{message}");
    }
    crate::outln!(
        "vm {folder}: running on host {} (pid {}), datastore {} ({}), through the host agent",
        body["host"].as_str().unwrap_or("?"),
        body["pid"],
        body["datastore"].as_str().unwrap_or("?"),
        body["datastore_uuid"].as_str().unwrap_or("?"),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The VM folder as an absolute datastore path without a trailing slash.
pub(crate) fn folder_path(path: &str) -> anyhow::Result<String> {
    let trimmed = path.trim_end_matches('/');
    if !path.starts_with('/') || trimmed.is_empty() {
        bail!("{path:?}: a VM folder is an absolute datastore path below /, e.g. /vms/web1");
    }
    Ok(trimmed.to_string())
}

fn open_datastore(spec: &str, read_only: bool) -> anyhow::Result<Datastore> {
    let options = if read_only {
        vmfs::OpenOptions::read_only()
    } else {
        vmfs::OpenOptions::read_write()
    };
    super::datastore::open_datastore(spec, &options)
}

/// This host's name as the datastore records it (`VAPP_HOST_NAME` or the host name).
fn host_name() -> String {
    vmfs::OpenOptions::default().host_name
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// How long ago `ns` (wall clock) was, e.g. "3m12s".
fn age(ns: i64) -> String {
    let secs = (now_ns().saturating_sub(ns) / 1_000_000_000).max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The datastore identity of the process running the VM at `folder`: this host's name, and a
/// host UUID of its own derived from this host's and the folder, so that VMs running side by
/// side hold separate heartbeat slots and journals, while a `vm start` that crashed is
/// recognised by the next start of the same VM here, which replays its journal at once.
fn vm_identity(folder: &str) -> vmfs::OpenOptions {
    let mut options = vmfs::OpenOptions::read_write();
    let mut bytes = *options.host_uuid.as_bytes();
    for (i, byte) in folder.bytes().enumerate() {
        let at = i % 16;
        bytes[at] = bytes[at].rotate_left(3) ^ byte;
    }
    options.host_uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
    options
}

// ---- create ------------------------------------------------------------------------------

/// A `--disk` argument.
enum NewDisk {
    Create { size: u64 },
    Existing { path: String },
}

fn create(datastore: &str, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let folder = folder_path(&args.path)?;
    let folder_name = folder.rsplit('/').next().unwrap_or(&folder).to_string();
    let name = args.name.unwrap_or(folder_name);

    // Everything is checked before the datastore is touched.
    let memory = parse_size(&args.memory)?;
    if memory % MIB != 0 {
        bail!(
            "--memory {}: guest memory is a whole number of MiB",
            args.memory
        );
    }
    let kernel =
        std::fs::read(&args.kernel).with_context(|| format!("kernel {}", args.kernel.display()))?;
    let format = hv::check_kernel(&name, &kernel)
        .with_context(|| format!("kernel {}", args.kernel.display()))?;
    let initrd = match &args.initrd {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("initrd {}", path.display()))?;
            if bytes.is_empty() {
                bail!("initrd {}: empty file", path.display());
            }
            Some(bytes)
        }
        None => None,
    };
    let new_disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let spec = VmSpec {
        version: spec::VERSION,
        name,
        vcpus: args.vcpus,
        memory_mib: memory / MIB,
        kernel: spec::KERNEL_FILE.to_string(),
        initrd: initrd.as_ref().map(|_| spec::INITRD_FILE.to_string()),
        cmdline: args.cmdline,
        on_reset: args.on_reset,
        nets: spec::new_nets(&args.nets),
        ha: args.ha.map(|priority| host::Ha {
            restart: true,
            priority,
            ..Default::default()
        }),
        resources: sched::Resources::default(),
        disks: new_disks
            .iter()
            .enumerate()
            .map(|(i, d)| DiskSpec {
                path: match d {
                    NewDisk::Create { .. } => format!("disk{i}.vdisk"),
                    NewDisk::Existing { path } => path.clone(),
                },
                read_only: false,
            })
            .collect(),
    };
    spec.check()
        .map_err(|reason| anyhow::anyhow!("vm {folder}: {reason}"))?;
    check_fits_this_host(&folder, &spec)?;
    let config = spec.render().map_err(anyhow::Error::msg)?;

    let ds = open_datastore(datastore, false)?;
    match ds.stat_path(&folder) {
        Ok(_) => bail!("vm {folder}: {folder} already exists"),
        Err(vmfs::Error::NotFound { .. }) => {}
        Err(e) => return Err(e).with_context(|| format!("vm {folder}")),
    }
    let mut inodes = Vec::new();
    for (i, d) in new_disks.iter().enumerate() {
        if let NewDisk::Existing { path } = d {
            let ino = check_existing_disk(&ds, path).with_context(|| format!("disk {i}"))?;
            if inodes.contains(&ino) {
                bail!("disk {i} ({path}) is given twice");
            }
            inodes.push(ino);
        }
    }
    let first_new = first_missing(&ds, &folder)?;

    let written = (|| -> anyhow::Result<()> {
        ds.mkdir_all(&folder, 0o755, Creds::current())?;
        put(&ds, &spec::path_in(&folder, spec::KERNEL_FILE), &kernel)?;
        if let Some(initrd) = &initrd {
            put(&ds, &spec::path_in(&folder, spec::INITRD_FILE), initrd)?;
        }
        for (disk, new) in spec.disks.iter().zip(&new_disks) {
            if let NewDisk::Create { size } = new {
                ds.create_vdisk(
                    &spec::path_in(&folder, &disk.path),
                    *size,
                    false,
                    Creds::current(),
                )?;
            }
        }
        // Last: a folder without it is not a VM.
        put(
            &ds,
            &spec::path_in(&folder, spec::FILE_NAME),
            config.as_bytes(),
        )?;
        ds.sync()?;
        Ok(())
    })();
    if let Err(error) = written {
        if let Err(cleanup) = ds.remove_path(&first_new, true) {
            tracing::error!(vm = %folder, error = %cleanup, "removing a half-created VM folder failed");
        }
        return Err(error.context(format!("vm {folder}: create failed, nothing kept")));
    }
    ds.close().context("closing the datastore")?;
    crate::outln!(
        "created vm {folder} ({}): {} vCPU(s), {} MiB, {format} kernel ({} bytes){}, {} disk(s)",
        spec.name,
        spec.vcpus,
        spec.memory_mib,
        kernel.len(),
        initrd
            .as_ref()
            .map(|i| format!(", initrd ({} bytes)", i.len()))
            .unwrap_or_default(),
        spec.disks.len()
    )?;
    for (i, net) in spec.nets.iter().enumerate() {
        crate::outln!(
            "  net {i}: network {}, MAC {}",
            net.network,
            net.mac.as_deref().unwrap_or("-")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_disk(arg: &str) -> anyhow::Result<NewDisk> {
    if arg.starts_with('/') {
        return Ok(NewDisk::Existing {
            path: arg.to_string(),
        });
    }
    let size = parse_size(arg).with_context(|| {
        format!("--disk {arg}: neither a size (e.g. 20G) nor a datastore path (starting with /)")
    })?;
    if size == 0 || size % 512 != 0 {
        bail!("--disk {arg}: a disk's size is a non-zero multiple of 512 bytes");
    }
    Ok(NewDisk::Create { size })
}

/// A VM this host could never run is refused at once; whether memory is free now and KVM is
/// here is checked when it starts (possibly on another host).
fn check_fits_this_host(folder: &str, spec: &VmSpec) -> anyhow::Result<()> {
    if let Some(total) = hv::total_memory().filter(|&t| spec.memory_bytes() > t) {
        bail!(
            "vm {folder}: {} MiB of memory, more than this host has ({} MiB)",
            spec.memory_mib,
            total / MIB
        );
    }
    if let Ok(hv) = hv::Hypervisor::open() {
        let max = hv.host_info().hv_max_vcpus;
        if spec.vcpus > max {
            bail!(
                "vm {folder}: {} vCPUs, this host allows at most {max}",
                spec.vcpus
            );
        }
    }
    Ok(())
}

fn check_existing_disk(ds: &Datastore, path: &str) -> anyhow::Result<u64> {
    if let Some((disk, name)) = super::vdisk_snapshot::split_session(ds, path) {
        let session = super::vdisk_snapshot::open_session(ds, disk, name, false)?;
        if session.is_read_only() {
            bail!("{path}: a read-only snapshot; a VM writes its disks: take it with --writable");
        }
        return Ok(ds.stat_path(disk)?.ino);
    }
    let attr = ds.stat_path(path)?;
    if attr.kind == Kind::Rdm {
        // The mapping must be this datastore's and its LUN reachable, as at every start.
        rdm::verify(ds, path)?;
        return Ok(attr.ino);
    }
    if attr.kind != Kind::File || attr.size == 0 || attr.size % 512 != 0 {
        bail!(
            "{path}: not a virtual disk (a regular file whose size is a non-zero multiple of 512) nor a raw device mapping"
        );
    }
    Ok(attr.ino)
}

/// The first component of `path` that does not exist: what a failed create removes.
fn first_missing(ds: &Datastore, path: &str) -> anyhow::Result<String> {
    let mut at = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        at.push('/');
        at.push_str(part);
        match ds.stat_path(&at) {
            Ok(attr) if attr.kind == Kind::Dir => {}
            Ok(_) => bail!("{at}: not a directory"),
            Err(vmfs::Error::NotFound { .. }) => return Ok(at),
            Err(e) => return Err(e.into()),
        }
    }
    bail!("{path} already exists")
}

fn put(ds: &Datastore, path: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let options = PutOptions {
        new: NewFile {
            mode: 0o644,
            creds: Creds::current(),
            ..NewFile::default()
        },
        overwrite: false,
        expected_size: Some(bytes.len() as u64),
    };
    ds.put(&mut &bytes[..], path, &options, &mut |_| {})
        .with_context(|| format!("writing {path}"))?;
    Ok(())
}

// ---- stop --------------------------------------------------------------------------------

fn stop(datastore: &str, args: StopArgs) -> anyhow::Result<ExitCode> {
    let folder = folder_path(&args.path)?;
    let ds = open_datastore(datastore, true)?;
    match ds.stat_path(&spec::path_in(&folder, spec::FILE_NAME)) {
        Ok(_) => {}
        Err(vmfs::Error::NotFound { .. }) => bail!("{folder}: no VM here (no vm.toml)"),
        Err(e) => return Err(e).with_context(|| format!("vm {folder}")),
    }
    let registry = Registry::for_datastore(&ds.superblock().uuid.to_string());
    let record = match registry.presence(&folder)? {
        Presence::Running(record) => record,
        Presence::Stopped => {
            let here = host_name();
            match lock_holders(&ds)?.remove(&folder_config_ino(&ds, &folder)?) {
                Some(holder) => bail!(
                    "vm {folder} is not running on this host ({here}): it runs on host {} \
                     (pid {}); stop it there",
                    holder.host,
                    holder.pid
                ),
                None => bail!("vm {folder} is not running on this host ({here})"),
            }
        }
    };
    drop(ds);
    let socket = registry.socket_path(&folder);
    if args.force {
        let asked = runtime::ask(&socket, Request::Kill);
        if let Err(error) = &asked {
            tracing::warn!(vm = %folder, %error, "the VM process does not answer");
        }
        if asked.is_err() || !wait_stopped(&registry, &folder, Duration::from_secs(10))? {
            kill_process(&folder, record.as_ref())?;
            if !wait_stopped(&registry, &folder, Duration::from_secs(10))? {
                bail!("vm {folder}: still running after SIGKILL");
            }
        }
        crate::outln!("vm {folder}: powered off")?;
        return Ok(ExitCode::SUCCESS);
    }
    let asked = runtime::ask(&socket, Request::Shutdown);
    // A VM that ended meanwhile no longer answers: that is a stop too.
    let ended = || wait_stopped(&registry, &folder, Duration::from_secs(1));
    match asked {
        Ok(reply) if !reply.ok && !ended()? => bail!("vm {folder}: {}", reply.message),
        Err(error) if !ended()? => {
            return Err(
                anyhow::Error::new(error).context(format!("vm {folder}: asking it to shut down"))
            );
        }
        _ => {}
    }
    if wait_stopped(&registry, &folder, Duration::from_secs(args.timeout))? {
        crate::outln!("vm {folder}: shut down")?;
        return Ok(ExitCode::SUCCESS);
    }
    bail!(
        "vm {folder}: the guest did not power off within {} s of the ACPI power button and is \
         still running; `vapp vm stop --force {folder}` powers it off",
        args.timeout
    )
}

/// The VM's writable disks (read-only ones never change, so a snapshot leaves them out).
fn writable_disks(ds: &Datastore, folder: &str) -> anyhow::Result<Vec<String>> {
    let spec = read_spec(ds, folder)?;
    // A disk that is itself a snapshot (PATH@NAME) is left out too.
    let disks: Vec<String> = spec
        .disks
        .iter()
        .filter(|d| !d.read_only)
        .map(|d| spec::path_in(folder, &d.path))
        .filter(|path| super::vdisk_snapshot::split_session(ds, path).is_none())
        .collect();
    if disks.is_empty() {
        bail!("vm {folder}: no writable disk to snapshot");
    }
    Ok(disks)
}

/// Runs `body` on the datastore mounted as a short-lived host, closing it however `body`
/// ends.
fn with_datastore<T>(
    datastore: &str,
    body: impl FnOnce(&Datastore) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let ds = open_datastore(datastore, false)?;
    let out = body(&ds);
    let closed = ds.close().context("closing the datastore");
    let out = out?;
    closed?;
    Ok(out)
}

fn snapshot(datastore: &str, args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    use super::vdisk_snapshot as snap;
    let folder = folder_path(&args.path)?;
    let name = args.name;
    let message = with_datastore(datastore, |ds| {
        let disks = writable_disks(ds, &folder)?;
        let registry = Registry::for_datastore(&ds.superblock().uuid.to_string());
        if let Presence::Running(_) = registry.presence(&folder)? {
            let reply = runtime::ask(
                &registry.socket_path(&folder),
                Request::Snapshot { name: name.clone() },
            )
            .with_context(|| format!("vm {folder}: asking it to take snapshot {name}"))?;
            if !reply.ok {
                bail!("{}", reply.message);
            }
            return Ok(reply.message);
        }
        // Stopped here; a VM running on another host holds its disks, and opening them
        // is refused naming that host.
        let mut engines = Vec::new();
        for path in &disks {
            let source = snap::open_disk(ds, path, vmfs::Access::Exclusive)
                .with_context(|| format!("vm {folder}: disk {path}"))?;
            let snaps = snap::attach(ds, path, source, true)?
                .with_context(|| format!("{path}: no snapshot engine"))?;
            engines.push((path.clone(), snaps));
        }
        let members: Vec<&snapshot::Snapshots> = engines.iter().map(|(_, s)| s).collect();
        let taken = snapshot::create_group_session(&members, &name, false);
        drop(members);
        if let Err(e) = taken {
            for (path, snaps) in engines {
                snap::release_if_empty(ds, &path, snaps)?;
            }
            return Err(anyhow::Error::new(e).context(format!("vm {folder}: snapshot {name}")));
        }
        Ok(format!(
            "snapshot {name} of {} disk(s) taken",
            engines.len()
        ))
    })?;
    crate::outln!("vm {folder}: {message}")?;
    Ok(ExitCode::SUCCESS)
}

fn revert(datastore: &str, args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    use super::vdisk_snapshot as snap;
    let folder = folder_path(&args.path)?;
    let name = args.name;
    let count = with_datastore(datastore, |ds| {
        let disks = writable_disks(ds, &folder)?;
        let registry = Registry::for_datastore(&ds.superblock().uuid.to_string());
        if let presence @ Presence::Running(_) = registry.presence(&folder)? {
            bail!(
                "vm {folder} is {}: stop it first (`vapp vm stop {folder}`), then revert it",
                run::describe(&presence)
            );
        }
        // Every disk is checked before any is changed.
        let mut engines = Vec::new();
        for path in &disks {
            let snaps = snap::open_engine(ds, path)
                .with_context(|| format!("vm {folder}: cannot revert to snapshot {name}"))?;
            if !snaps.list().iter().any(|s| s.name == name) {
                bail!("vm {folder}: disk {path} has no snapshot {name}");
            }
            engines.push((path.clone(), snaps));
        }
        for (path, snaps) in &engines {
            snap::rollback_engine(path, snaps, &name)?;
        }
        Ok(engines.len())
    })?;
    crate::outln!("vm {folder}: {count} disk(s) reverted to snapshot {name}")?;
    Ok(ExitCode::SUCCESS)
}

/// Waits until the VM process has let go of its claim; false on timeout.
fn wait_stopped(registry: &Registry, folder: &str, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(registry.presence(folder)?, Presence::Stopped) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_process(folder: &str, record: Option<&runtime::Record>) -> anyhow::Result<()> {
    let Some(record) = record else {
        bail!("vm {folder}: the VM process has not said who it is yet; try again");
    };
    let pid = i32::try_from(record.pid).context("pid out of range")?;
    eprintln!(
        "vapp: vm {folder}: the VM process (pid {pid}) does not stop; killing it (the datastore \
         recovers its journal)"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .with_context(|| format!("vm {folder}: killing pid {pid}"))
}

/// A host holding a VM's identity (its vm.toml, exclusively and open).
pub(crate) struct LockHolder {
    pub(crate) host: String,
    pub(crate) pid: u32,
}

/// Who holds each inode exclusively open, from the lock records on the datastore (read once,
/// without joining the cluster). A host that died holds its locks until the cluster rules
/// break them; a holder that is a process of this host that is gone is left out, since that
/// VM is certainly not running.
pub(crate) fn lock_holders(
    ds: &Datastore,
) -> anyhow::Result<std::collections::HashMap<u64, LockHolder>> {
    let survey = vmfs::cluster::survey::survey(ds.lun().clone(), Duration::ZERO)
        .context("reading the datastore's lock records")?;
    let here = host_name();
    let mut holders = std::collections::HashMap::new();
    for host in survey.hosts {
        if host.host_name == here && !process_exists(host.pid) {
            continue;
        }
        for lock in &host.locks {
            if let (LockTarget::Inode(ino), vmfs::LockMode::Exclusive, true) =
                (lock.target, lock.mode, lock.open)
            {
                holders.insert(
                    ino,
                    LockHolder {
                        host: host.host_name.clone(),
                        pid: host.pid,
                    },
                );
            }
        }
    }
    Ok(holders)
}

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 only checks: EPERM means it exists but is not ours.
    pid > 0
        && !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

pub(crate) fn folder_config_ino(ds: &Datastore, folder: &str) -> anyhow::Result<u64> {
    Ok(ds.resolve(&spec::path_in(folder, spec::FILE_NAME))?)
}

// ---- list --------------------------------------------------------------------------------

#[derive(Serialize)]
struct Listed {
    path: String,
    name: Option<String>,
    vcpus: Option<u32>,
    memory_bytes: Option<u64>,
    disks: Vec<ListedDisk>,
    /// `stopped`, `running`, `failed` (the local agent gave up restarting it) or `invalid`.
    state: &'static str,
    host: Option<String>,
    pid: Option<u32>,
    /// Why the VM is `invalid`.
    error: Option<String>,
    /// For `failed`: its failed starts in a row.
    #[serde(skip_serializing_if = "Option::is_none")]
    failures: Option<u32>,
}

#[derive(Serialize)]
struct ListedDisk {
    path: String,
    size: Option<u64>,
    read_only: bool,
}

fn list(datastore: &str, args: ListArgs) -> anyhow::Result<ExitCode> {
    // The whole datastore is "" here, so that children are "/name".
    let dir = match args.dir.trim_end_matches('/') {
        "" if args.dir.starts_with('/') => String::new(),
        _ => folder_path(&args.dir)?,
    };
    let ds = open_datastore(datastore, true)?;
    let registry = Registry::for_datastore(&ds.superblock().uuid.to_string());
    let mut folders = Vec::new();
    match ds.stat_path(if dir.is_empty() { "/" } else { &dir }) {
        Ok(_) => find_vms(&ds, &dir, 0, &mut folders)?,
        Err(vmfs::Error::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    folders.sort();
    let mut holders = if folders.is_empty() {
        Default::default()
    } else {
        lock_holders(&ds)?
    };
    let mut listed = folders
        .iter()
        .map(|folder| describe_vm(&ds, &registry, &mut holders, folder))
        .collect::<anyhow::Result<Vec<_>>>()?;
    mark_failed(&ds, &mut listed);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &listed)
            .map_err(std::io::Error::from)
            .map_err(crate::cmd::stdout_error)?;
        writeln!(out).map_err(crate::cmd::stdout_error)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<24} {:<16} {:>5} {:>10} {:>5}  STATE",
        "VM", "NAME", "VCPUS", "MEMORY", "DISKS"
    )
    .map_err(crate::cmd::stdout_error)?;
    for vm in &listed {
        let state = match (vm.state, &vm.host, &vm.error) {
            ("running", Some(host), _) => format!(
                "running on {host}{}",
                vm.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ),
            ("invalid", _, Some(error)) => format!("invalid: {error}"),
            ("failed", _, _) => format!(
                "failed after {} tries (vapp host events)",
                vm.failures.unwrap_or(0)
            ),
            (state, _, _) => state.to_string(),
        };
        writeln!(
            out,
            "{:<24} {:<16} {:>5} {:>10} {:>5}  {state}",
            vm.path,
            vm.name.as_deref().unwrap_or("-"),
            vm.vcpus.map_or("-".to_string(), |v| v.to_string()),
            vm.memory_bytes
                .map_or("-".to_string(), |m| format!("{} MiB", m / MIB)),
            vm.disks.len(),
        )
        .map_err(crate::cmd::stdout_error)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A VM that does not run and that this host's agent gave up restarting is `failed`. No
/// agent answering (none runs here) leaves the list as the datastore shows it.
fn mark_failed(ds: &Datastore, listed: &mut [Listed]) {
    let socket = crate::cmd::host::agent_socket();
    let Ok((200, body)) =
        host::client::request(&socket, "GET", "/vms", std::time::Duration::from_secs(5))
    else {
        return;
    };
    let Ok(reports) = serde_json::from_value::<Vec<host::VmReport>>(body) else {
        return;
    };
    let uuid = ds.superblock().uuid.to_string();
    for report in reports
        .iter()
        .filter(|r| r.state == "failed" && r.datastore == uuid)
    {
        if let Some(vm) = listed
            .iter_mut()
            .find(|vm| vm.path == report.path && vm.state == "stopped")
        {
            vm.state = "failed";
            vm.failures = Some(report.failures);
        }
    }
}

/// Folders at or below `dir` holding a vm.toml (not looking inside a VM folder).
fn find_vms(
    ds: &Datastore,
    dir: &str,
    depth: usize,
    found: &mut Vec<String>,
) -> anyhow::Result<()> {
    let entries = ds.list(if dir.is_empty() { "/" } else { dir })?;
    if entries
        .iter()
        .any(|(n, a)| n == OsStr::new(spec::FILE_NAME) && a.kind == Kind::File)
    {
        found.push(dir.to_string());
        return Ok(());
    }
    if depth >= MAX_DEPTH {
        return Ok(());
    }
    for (name, attr) in entries {
        if attr.kind == Kind::Dir {
            let child = format!("{dir}/{}", name.to_string_lossy());
            find_vms(ds, &child, depth + 1, found)?;
        }
    }
    Ok(())
}

fn describe_vm(
    ds: &Datastore,
    registry: &Registry,
    holders: &mut std::collections::HashMap<u64, LockHolder>,
    folder: &str,
) -> anyhow::Result<Listed> {
    let held = match folder_config_ino(ds, folder) {
        Ok(ino) => holders.remove(&ino),
        Err(_) => None,
    };
    let (state, host, pid) = match registry.presence(folder)? {
        Presence::Stopped => match held {
            Some(holder) => ("running", Some(holder.host), Some(holder.pid)),
            None => ("stopped", None, None),
        },
        Presence::Running(record) => (
            "running",
            Some(record.as_ref().map_or_else(host_name, |r| r.host.clone())),
            record.map(|r| r.pid),
        ),
    };
    let mut listed = Listed {
        path: folder.to_string(),
        name: None,
        vcpus: None,
        memory_bytes: None,
        disks: Vec::new(),
        state,
        host,
        pid,
        error: None,
        failures: None,
    };
    let spec = read_spec(ds, folder);
    match spec {
        Ok(spec) => {
            listed.disks = spec
                .disks
                .iter()
                .map(|d| {
                    let path = spec::path_in(folder, &d.path);
                    ListedDisk {
                        size: ds.stat_path(&path).ok().map(|a| a.size),
                        path,
                        read_only: d.read_only,
                    }
                })
                .collect();
            listed.vcpus = Some(spec.vcpus);
            listed.memory_bytes = Some(spec.memory_bytes());
            listed.name = Some(spec.name);
        }
        Err(error) => {
            if listed.state == "stopped" {
                listed.state = "invalid";
            }
            listed.error = Some(format!("{error:#}"));
        }
    }
    Ok(listed)
}

/// Reads vm.toml without taking its lock: a running VM holds it exclusively, and a listing
/// from a read-only mount only looks.
fn read_spec(ds: &Datastore, folder: &str) -> anyhow::Result<VmSpec> {
    let path = spec::path_in(folder, spec::FILE_NAME);
    let attr = ds.stat_path(&path)?;
    if attr.size > spec::MAX_BYTES {
        bail!(
            "{path}: {} bytes, too large for a VM configuration",
            attr.size
        );
    }
    let mut bytes = vec![0u8; usize::try_from(attr.size)?];
    let read = ds.read(attr.ino, 0, &mut bytes)?;
    bytes.truncate(read);
    let text = String::from_utf8(bytes).with_context(|| format!("{path}: not UTF-8"))?;
    VmSpec::parse(folder, &text).map_err(anyhow::Error::msg)
}
