//! `vapp host ...`: what this host offers for running VMs.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum HostCommand {
    /// KVM API version, backend (hardware VMX/SVM or PVM), vCPU limits, host CPUs and memory.
    Info(InfoArgs),
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
    }
}

fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let hv = hv::Hypervisor::open().context("cannot inspect KVM")?;
    let info = hv.host_info();
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
