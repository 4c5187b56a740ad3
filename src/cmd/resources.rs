//! `vapp host resources`: the running VMs of this host as the scheduler sees them: what each
//! is configured with, what it is entitled to under contention, and what it uses now.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

#[derive(Args)]
pub struct ResourcesArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Print again every interval until interrupted.
    #[arg(long)]
    watch: bool,
    /// How long use is measured over, in seconds.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
}

#[derive(Serialize)]
struct VmUse {
    #[serde(flatten)]
    config: sched::LedgerEntry,
    /// Per mille of one core the VM gets when every VM is busy.
    cpu_entitlement_permille: u64,
    /// Fraction of the host's disk I/O the VM gets when every VM is busy.
    disk_entitlement: f64,
    cpu_used_permille: Option<u64>,
    memory_used_bytes: Option<u64>,
    ksm_merged_pages: Option<u64>,
    disk_iops: Option<f64>,
    disk_bytes_per_sec: Option<f64>,
    disk_reserved_iops: Option<f64>,
    /// Bytes/s of transmit the VM gets when every VM sends; None without a host capacity.
    net_entitlement_bytes_per_sec: Option<u64>,
    /// Bytes/s the VM sent over all its NICs.
    net_bytes_per_sec: Option<f64>,
    net_packets_per_sec: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    cpus: usize,
    memory_bytes: u64,
    ksm_pages_shared: Option<u64>,
    ksm_pages_sharing: Option<u64>,
    /// The transmit capacity the host's VMs share (VAPP_NET_CAPACITY); None: not set, so
    /// network shares and reservations have no effect (limits still do).
    net_capacity_bytes_per_sec: Option<u64>,
    vms: Vec<VmUse>,
    /// The resource pools of the running VMs: the tree under the host.
    pools: Vec<PoolUse>,
}

#[derive(Serialize)]
struct PoolUse {
    #[serde(flatten)]
    pool: sched::Pool,
    /// Its running VMs' folders.
    vms: Vec<String>,
    cpu_used_permille: Option<u64>,
    memory_used_bytes: Option<u64>,
}

pub fn run(args: ResourcesArgs) -> anyhow::Result<ExitCode> {
    if !(0.05..=3600.0).contains(&args.interval) {
        anyhow::bail!(
            "--interval {}: give between 0.05 and 3600 seconds",
            args.interval
        );
    }
    let runtime = super::vm::runtime::runtime_root();
    loop {
        let report = measure(&runtime, Duration::from_secs_f64(args.interval))?;
        if args.json {
            crate::outln!("{}", serde_json::to_string_pretty(&report)?)?;
        } else {
            print(&report)?;
        }
        if !args.watch {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn measure(runtime: &Path, interval: Duration) -> anyhow::Result<Report> {
    let topology = sched::Topology::read().context("cannot read the CPU topology")?;
    let memory = sched::host_memory()?;
    let net_capacity = sched::net_capacity()?;
    let entries = sched::Ledger::new(runtime).running()?;
    let cgroups: Vec<_> = entries
        .iter()
        .map(|e| {
            sched::Cgroup::open(
                Path::new(sched::CGROUP_ROOT),
                e.pool.as_ref().map(|p| p.name.as_str()),
                Some(&format!("{}-{}", e.vm, e.pid)),
            )
        })
        .collect();
    let mut pools: Vec<PoolUse> = Vec::new();
    for e in &entries {
        let Some(pool) = &e.pool else { continue };
        match pools.iter_mut().find(|p| p.pool.name == pool.name) {
            Some(p) => p.vms.push(e.vm.clone()),
            None => pools.push(PoolUse {
                pool: pool.clone(),
                vms: vec![e.vm.clone()],
                cpu_used_permille: None,
                memory_used_bytes: None,
            }),
        }
    }
    let pool_groups: Vec<_> = pools
        .iter()
        .map(|p| sched::Cgroup::open(Path::new(sched::CGROUP_ROOT), Some(&p.pool.name), None))
        .collect();
    let cpu = |cg: &Option<sched::Cgroup>| cg.as_ref().and_then(|c| c.cpu_usage_ns());
    let before_cpu: Vec<_> = cgroups.iter().map(cpu).collect();
    let before_pools: Vec<_> = pool_groups.iter().map(cpu).collect();
    let before_disk = sched::Clock::usage(runtime, sched::Class::Disk)?;
    let before_net = sched::Clock::usage(runtime, sched::Class::Net)?;
    let start = Instant::now();
    std::thread::sleep(interval);
    let after_cpu: Vec<_> = cgroups.iter().map(cpu).collect();
    let after_pools: Vec<_> = pool_groups.iter().map(cpu).collect();
    let after_disk = sched::Clock::usage(runtime, sched::Class::Disk)?;
    let after_net = sched::Clock::usage(runtime, sched::Class::Net)?;
    let secs = start.elapsed().as_secs_f64();

    let host_permille = topology.threads() as u64 * 1000;
    let cpu_shares: u64 = entries.iter().map(|e| e.cpu_shares).sum::<u64>().max(1);
    let disk_shares: u64 = entries.iter().map(|e| e.disk_shares).sum::<u64>().max(1);
    let net_shares: u64 = entries.iter().map(|e| e.net_shares).sum::<u64>().max(1);
    for (i, p) in pools.iter_mut().enumerate() {
        p.cpu_used_permille = before_pools[i]
            .zip(after_pools[i])
            .map(|(a, b)| ((b.saturating_sub(a)) as f64 / secs / 1e6) as u64);
        p.memory_used_bytes = pool_groups[i].as_ref().and_then(|c| c.memory_usage());
    }
    let (_, shared, sharing) = sched::ksm_pages(0);
    let mut vms = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        let proportional = host_permille * e.cpu_shares / cpu_shares;
        let ceiling = e
            .cpu_limit_permille
            .unwrap_or(u64::MAX)
            .min(u64::from(e.vcpus) * 1000);
        let slot = |list: &[sched::SlotUse]| list.iter().find(|s| s.pid == e.pid).copied();
        let (d0, d1) = (slot(&before_disk), slot(&after_disk));
        let rate = |f: fn(&sched::SlotUse) -> u64| {
            d0.zip(d1)
                .map(|(a, b)| f(&b).saturating_sub(f(&a)) as f64 / secs)
        };
        let (n0, n1) = (slot(&before_net), slot(&after_net));
        let net_rate = |f: fn(&sched::SlotUse) -> u64| {
            n0.zip(n1)
                .map(|(a, b)| f(&b).saturating_sub(f(&a)) as f64 / secs)
        };
        let net_entitlement = net_capacity
            .map(|c| (u128::from(c) * u128::from(e.net_shares) / u128::from(net_shares)) as u64);
        vms.push(VmUse {
            cpu_entitlement_permille: proportional.max(e.cpu_reservation_permille).min(ceiling),
            disk_entitlement: e.disk_shares as f64 / disk_shares as f64,
            cpu_used_permille: before_cpu[i]
                .zip(after_cpu[i])
                .map(|(a, b)| ((b.saturating_sub(a)) as f64 / secs / 1e6) as u64),
            memory_used_bytes: cgroups[i].as_ref().and_then(|c| c.memory_usage()),
            ksm_merged_pages: sched::ksm_pages(e.pid).0,
            disk_iops: rate(|s| s.ios),
            disk_bytes_per_sec: rate(|s| s.bytes),
            disk_reserved_iops: rate(|s| s.reserved_ios),
            net_entitlement_bytes_per_sec: net_entitlement.map(|n| {
                n.max(e.net_reservation_bytes_per_sec)
                    .min(e.net_limit_bytes_per_sec.unwrap_or(u64::MAX))
            }),
            net_bytes_per_sec: net_rate(|s| s.bytes),
            net_packets_per_sec: net_rate(|s| s.ios),
            config: e,
        });
    }
    Ok(Report {
        cpus: topology.threads(),
        memory_bytes: memory,
        ksm_pages_shared: shared,
        ksm_pages_sharing: sharing,
        net_capacity_bytes_per_sec: net_capacity,
        vms,
        pools,
    })
}

fn print(report: &Report) -> anyhow::Result<()> {
    let ksm = match (report.ksm_pages_shared, report.ksm_pages_sharing) {
        (Some(shared), Some(sharing)) => format!("; KSM: {shared} pages shared by {sharing}"),
        _ => String::new(),
    };
    crate::outln!(
        "host: {} CPUs, {} MiB{ksm}",
        report.cpus,
        report.memory_bytes >> 20
    )?;
    if report.vms.is_empty() {
        crate::outln!("no VMs running")?;
        return Ok(());
    }
    crate::outln!(
        "{:<20} {:>12} {:>9} {:>9} {:>9} {:>6} {:>11} {:>11} {:>8} {:>9} {:>8} {:>8}",
        "VM",
        "CPU shares",
        "res %",
        "limit %",
        "entitled",
        "used %",
        "mem res MiB",
        "mem lim MiB",
        "used MiB",
        "disk shr",
        "IOPS",
        "KSM pgs"
    )?;
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for v in &report.vms {
        let c = &v.config;
        crate::outln!(
            "{:<20} {:>12} {:>9} {:>9} {:>8}% {:>6} {:>11} {:>11} {:>8} {:>8.0}% {:>8} {:>8}",
            c.vm,
            c.cpu_shares,
            c.cpu_reservation_permille / 10,
            opt(c.cpu_limit_permille.map(|p| p / 10)),
            v.cpu_entitlement_permille / 10,
            opt(v.cpu_used_permille.map(|p| p / 10)),
            c.memory_reservation_bytes >> 20,
            opt(c.memory_limit_bytes.map(|b| b >> 20)),
            opt(v.memory_used_bytes.map(|b| b >> 20)),
            v.disk_entitlement * 100.0,
            v.disk_iops.map_or("-".to_string(), |r| format!("{r:.0}")),
            opt(v.ksm_merged_pages),
        )?;
    }
    print_net(report)?;
    print_pools(report)
}

/// The pools and their VMs, as a tree under the host.
fn print_pools(report: &Report) -> anyhow::Result<()> {
    if report.pools.is_empty() {
        return Ok(());
    }
    crate::outln!("pools:")?;
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for p in &report.pools {
        let pool = &p.pool;
        crate::outln!(
            "  pool {}: CPU shares {}, res {}%, limit {}%, used {}%; memory res {} MiB, limit {} MiB, used {} MiB",
            pool.name,
            pool.cpu_shares,
            pool.cpu_reservation_permille / 10,
            opt(pool.cpu_limit_permille.map(|l| l / 10)),
            opt(p.cpu_used_permille.map(|u| u / 10)),
            pool.memory_reservation_bytes >> 20,
            opt(pool.memory_limit_bytes.map(|b| b >> 20)),
            opt(p.memory_used_bytes.map(|b| b >> 20)),
        )?;
        for vm in &p.vms {
            crate::outln!("    {vm}")?;
        }
    }
    Ok(())
}

/// The network: settings, entitlement and what each VM sent, in MiB/s.
fn print_net(report: &Report) -> anyhow::Result<()> {
    match report.net_capacity_bytes_per_sec {
        Some(c) => crate::outln!(
            "network: {:.1} MiB/s of transmit shared by the VMs ({})",
            mib(c as f64),
            sched::NET_CAPACITY_ENV
        )?,
        None => crate::outln!(
            "network: no transmit capacity set ({}): net shares and reservations have no effect, limits do",
            sched::NET_CAPACITY_ENV
        )?,
    }
    crate::outln!(
        "{:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "VM",
        "net shares",
        "res MiB/s",
        "lim MiB/s",
        "lim pkt/s",
        "entitled",
        "sent MiB/s"
    )?;
    let rate = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}", mib(v)));
    for v in &report.vms {
        let c = &v.config;
        crate::outln!(
            "{:<20} {:>10} {:>10.1} {:>10} {:>10} {:>10} {:>10}",
            c.vm,
            c.net_shares,
            mib(c.net_reservation_bytes_per_sec as f64),
            rate(c.net_limit_bytes_per_sec.map(|b| b as f64)),
            c.net_limit_packets_per_sec
                .map_or("-".to_string(), |p| p.to_string()),
            rate(v.net_entitlement_bytes_per_sec.map(|b| b as f64)),
            rate(v.net_bytes_per_sec),
        )?;
    }
    Ok(())
}

fn mib(bytes: f64) -> f64 {
    bytes / f64::from(1 << 20)
}
