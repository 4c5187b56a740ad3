//! `vapp host ...`: what this host offers for running VMs, and its agent (the `host` crate):
//! `host run` runs it in the foreground, `host events` asks it what it did.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

#[derive(Subcommand)]
pub enum HostCommand {
    /// KVM API version, backend (hardware VMX/SVM or PVM), vCPU limits, host CPUs and memory.
    Info(InfoArgs),
    /// Run this host's agent in the foreground until SIGTERM: it joins the datastore, runs
    /// VMs started through it, restarts a dead host's protected VMs, and serves its API on
    /// <runtime_dir>/agent.sock.
    Run(RunArgs),
    /// What the local agent did and why: hosts declared dead, VMs restarted, failures.
    Events(EventsArgs),
    /// This host's networks (Linux bridges it owns) that VMs name in vm.toml.
    #[command(subcommand)]
    Network(super::network::NetworkCommand),
    /// Per running VM: its shares, reservations and limits, its entitlement and what it uses.
    Resources(super::resources::ResourcesArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// The agent's configuration (TOML: name, datastores, runtime_dir).
    #[arg(long, default_value = "/etc/vapp/host.toml")]
    config: PathBuf,
}

#[derive(Args)]
pub struct EventsArgs {
    /// Print JSON instead of text (with --follow: one event per line).
    #[arg(long)]
    json: bool,
    /// Keep printing new events as they happen, until interrupted.
    #[arg(long)]
    follow: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(command: HostCommand) -> anyhow::Result<ExitCode> {
    match command {
        HostCommand::Info(args) => info(args),
        HostCommand::Run(args) => run_agent(args),
        HostCommand::Events(args) => events(args),
        HostCommand::Network(command) => super::network::run(command),
        HostCommand::Resources(args) => super::resources::run(args),
    }
}

/// The local agent's socket: in the runtime directory (`VAPP_RUNTIME_DIR`), which is the
/// agent's `runtime_dir`.
pub fn agent_socket() -> PathBuf {
    super::vm::runtime::runtime_root().join(host::SOCKET_NAME)
}

fn run_agent(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Before any thread exists, so only the signal thread below takes these.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        signals.add(signal);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).context("blocking signals")?;
    let config = host::Config::load(&args.config)?;
    let luns = config
        .datastores
        .iter()
        .map(|d| super::datastore::open_lun(d, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let exe = std::env::current_exe().context("finding the vapp binary")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                tracing::info!(%signal, "stopping the host agent");
            }
            flag.store(true, Ordering::SeqCst);
        })
        .context("starting the signal thread")?;
    let agent = Arc::new(host::Agent::new(config, exe, luns, stop)?);
    agent.run()?;
    match Arc::try_unwrap(agent) {
        Ok(agent) => agent.close()?,
        Err(_) => bail!("the host agent's API still had requests in flight at exit"),
    }
    Ok(ExitCode::SUCCESS)
}

fn fetch_events(socket: &std::path::Path, since: u64) -> anyhow::Result<Vec<host::Event>> {
    let (status, body) = host::client::request(
        socket,
        "GET",
        &format!("/events?since={since}"),
        Duration::from_secs(10),
    )?;
    if status != 200 {
        bail!("host agent at {}: {status} {body}", socket.display());
    }
    serde_json::from_value(body).context("the agent's events are not as expected")
}

fn events(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let socket = agent_socket();
    let mut events = fetch_events(&socket, 0)?;
    if !args.follow {
        if args.json {
            crate::outln!("{}", serde_json::to_string_pretty(&events)?)?;
        } else {
            print_events(&events)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut since = 0;
    loop {
        if args.json {
            for e in &events {
                crate::outln!("{}", serde_json::to_string(e)?)?;
            }
        } else {
            print_events(&events)?;
        }
        // An agent that took over the socket since answers with all it kept: see events_since.
        since = events.last().map_or(since, |e| e.seq);
        std::thread::sleep(Duration::from_millis(200));
        events = fetch_events(&socket, since)?;
    }
}

fn print_events(events: &[host::Event]) -> anyhow::Result<()> {
    for e in events {
        let secs = e.time_ns / 1_000_000_000;
        let millis = e.time_ns % 1_000_000_000 / 1_000_000;
        crate::outln!(
            "{secs}.{millis:03} {:<14} {:<10} {:<20} {}",
            e.kind,
            e.host.as_deref().unwrap_or("-"),
            e.vm.as_deref().unwrap_or("-"),
            e.detail
        )?;
    }
    Ok(())
}

fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let hv = hv::Hypervisor::open().context("cannot inspect KVM")?;
    let info = hv.host_info();
    let topology = sched::Topology::read().context("cannot read the CPU topology")?;
    if args.json {
        let value = serde_json::json!({
            "kvm": {
                "path": info.kvm_path,
                "api_version": info.kvm_api_version,
                "backend": info.backend.to_string(),
                "backend_module": info.backend_module,
                "guest_kernel_emulated": info.backend.emulates_guest_kernel(),
                "guest_limits": info.backend.guest_limits(),
            },
            "vcpus": {
                "recommended": info.recommended_vcpus,
                "kvm_max": info.max_vcpus,
                "max_per_vm": info.hv_max_vcpus,
            },
            "host": {
                "cpus": info.host_cpus,
                "memory_bytes": info.host_memory_bytes,
                "memory_available_bytes": info.host_memory_available_bytes,
            },
            "topology": {
                "packages": topology.packages(),
                "cores": topology.cores(),
                "threads": topology.threads(),
                "core_mhz": topology.core_mhz,
                "cpus": topology.cpus,
            },
        });
        crate::outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        let module = info
            .backend_module
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        crate::outln!(
            "KVM:          {}, API version {}",
            info.kvm_path,
            info.kvm_api_version
        )?;
        crate::outln!("Backend:      {}{module}", info.backend)?;
        crate::outln!("              {}", info.backend.guest_limits())?;
        crate::outln!(
            "vCPUs per VM: up to {} (KVM allows {}, recommends {})",
            info.hv_max_vcpus,
            info.max_vcpus,
            info.recommended_vcpus
        )?;
        crate::outln!("Host CPUs:    {}", info.host_cpus)?;
        crate::outln!(
            "Topology:     {} package(s), {} core(s), {} thread(s){}",
            topology.packages(),
            topology.cores(),
            topology.threads(),
            if topology.core_mhz > 0 {
                format!(", {} MHz", topology.core_mhz)
            } else {
                String::new()
            }
        )?;
        crate::outln!(
            "Host memory:  {} total, {} available",
            gib(info.host_memory_bytes),
            gib(info.host_memory_available_bytes)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}
