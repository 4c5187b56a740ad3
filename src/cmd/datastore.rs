//! `vapp datastore ...`: format, info, fsck, hosts.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum DatastoreCommand {
    /// Format a LUN as a datastore (creates a sparse file if the path does not exist).
    Format(FormatArgs),
    /// Show a datastore's format, capacity and usage.
    Info(InfoArgs),
    /// Check (and with --repair, fix) a datastore. Exit 0 clean, 1 problems remain, 2 usage.
    Fsck(FsckArgs),
    /// Hosts that have the datastore mounted: ids, heartbeat, and the locks each holds.
    Hosts(HostsArgs),
    /// Change how hosts coordinate on a datastore no host has mounted (as VMFS changes its
    /// locking mode offline): `paxos`, `cas` or `local`, as at format.
    SetLockProtocol(SetLockProtocolArgs),
    /// Give a copy of a datastore (an array snapshot, a clone, a copied image) a signature
    /// of its own, as VMFS resignatures a snapshot LUN: its journals are replayed, its
    /// heartbeats and locks cleared, and it gets a new UUID, a new name and this LUN's
    /// identity, so it mounts read-write beside its original.
    Resignature(ResignatureArgs),
}

#[derive(Args)]
pub struct ResignatureArgs {
    pub lun: String,
    /// The copy's new name (default: snap-XXXXXXXX- and the old name).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SetLockProtocolArgs {
    pub lun: String,
    pub protocol: vmfs::LockProtocol,
}

#[derive(Args)]
pub struct FormatArgs {
    pub lun: String,
    #[arg(long)]
    pub name: String,
    /// Size of the file to create when LUN does not exist (e.g. 8G).
    #[arg(long, default_value = "8G")]
    pub size: String,
    #[arg(long, default_value = "1M")]
    pub block_size: String,
    /// Overwrite an existing datastore on the LUN.
    #[arg(long)]
    pub force: bool,
    /// File descriptors to reserve (default: one per 256 KiB of LUN, at least 1024).
    #[arg(long)]
    pub max_files: Option<u64>,
    /// Per-host journal size (default 1M, 4M on LUNs of 16G and more).
    #[arg(long)]
    pub journal_size: Option<String>,
    /// How hosts coordinate: `cas` (compare-and-write, "ATS-only": the device's own SCSI
    /// COMPARE AND WRITE, or a file on a local file system), `paxos` (plain sector reads and
    /// writes: loop, virtio, md, dm, NBD, NFS/FUSE files) or `local` (compare-and-write
    /// through a lock only this machine sees: states that no other machine will ever reach
    /// the LUN). Default: cas where it is safe across machines, else paxos.
    #[arg(long)]
    pub lock_protocol: Option<vmfs::LockProtocol>,
    /// The cluster's I/O timeout (e.g. 2s, 250ms); heartbeats, self-fencing (6x) and the
    /// dead-host rule (8x) derive from it.
    #[arg(long, default_value = "2s")]
    pub io_timeout: String,
}

#[derive(Args)]
pub struct HostsArgs {
    pub lun: String,
    #[arg(long)]
    pub json: bool,
    /// How long to watch heartbeats (default: a renewal interval and a quarter).
    #[arg(long)]
    pub watch: Option<String>,
}

#[derive(Args)]
pub struct InfoArgs {
    pub lun: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct FsckArgs {
    pub lun: String,
    #[arg(long)]
    pub repair: bool,
    #[arg(long)]
    pub json: bool,
    /// One line per finding instead of one per kind of finding.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(command: DatastoreCommand) -> anyhow::Result<ExitCode> {
    match command {
        DatastoreCommand::Format(args) => format(args),
        DatastoreCommand::Info(args) => info(args),
        DatastoreCommand::Fsck(args) => fsck(args),
        DatastoreCommand::Hosts(args) => hosts(args),
        DatastoreCommand::SetLockProtocol(args) => set_lock_protocol(args),
        DatastoreCommand::Resignature(args) => resignature(args),
    }
}

fn set_lock_protocol(args: SetLockProtocolArgs) -> anyhow::Result<ExitCode> {
    let lun = open_lun(&args.lun, false)?;
    let safety = vmfs::set_lock_protocol(lun, args.protocol)
        .with_context(|| format!("{}: cannot change the lock protocol", args.lun))?;
    println!("{}: locking {}", args.lun, args.protocol.name());
    println!("  {}", describe_safety(&safety));
    Ok(ExitCode::SUCCESS)
}

fn resignature(args: ResignatureArgs) -> anyhow::Result<ExitCode> {
    let lun = open_lun(&args.lun, false)?;
    let report = vmfs::resignature(lun, args.name.as_deref())
        .with_context(|| format!("{}: cannot resignature", args.lun))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: resignatured datastore {:?} ({}) as {:?} ({})",
        args.lun, report.old_label, report.old_uuid, report.label, report.uuid
    );
    println!(
        "  {} transaction(s) replayed from {} journal(s), {} heartbeat slot(s) and {} lock(s) cleared",
        report.transactions_replayed,
        report.journals_replayed,
        report.slots_cleared,
        report.locks_cleared
    );
    Ok(ExitCode::SUCCESS)
}

/// Parses a duration: a number with `ms` or `s` (seconds when no unit is given).
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim().to_ascii_lowercase();
    let (digits, millis) = if let Some(d) = t.strip_suffix("ms") {
        (d, true)
    } else {
        (t.strip_suffix('s').unwrap_or(&t), false)
    };
    let n: f64 = digits
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .with_context(|| format!("invalid duration {text:?}: use e.g. 2s or 250ms"))?;
    Ok(Duration::from_secs_f64(if millis { n / 1000.0 } else { n }))
}

/// Opens a datastore's LUN through [`crate::lunspec::open`]: `LUN@SESSION` and a LUN with
/// snapshots go through the snapshot engine.
pub fn open_lun(spec: &str, read_only: bool) -> anyhow::Result<Arc<dyn lun::Lun>> {
    crate::lunspec::open(spec, !read_only)
}

/// Opens a LUN as it is, without the snapshot engine. An `nbd://` LUN is reconnected with
/// the datastore's io_timeout as its request timeout: a request the transport kept longer
/// could land after the other hosts have declared this one dead.
pub fn open_raw_lun(spec: &str, read_only: bool) -> anyhow::Result<Arc<dyn lun::Lun>> {
    let options = lun::OpenOptions {
        read_only,
        ..Default::default()
    };
    let first = lun::open(spec, &options).with_context(|| format!("{spec}: cannot open LUN"))?;
    let target = match lun::LunSpec::parse(spec)? {
        lun::LunSpec::Path(_) => return Ok(first),
        lun::LunSpec::NbdTcp { host, port, export } => (lun::NbdTarget::Tcp { host, port }, export),
        lun::LunSpec::NbdUnix { socket, export } => (lun::NbdTarget::Unix(socket), export),
    };
    let Ok((sb, _)) = vmfs::read_superblock(&*first) else {
        return Ok(first);
    };
    drop(first);
    let nbd = lun::NbdLun::connect(
        target.0,
        &target.1,
        lun::NbdOptions {
            read_only,
            io_timeout: sb.timing().io_timeout,
            // A host cut off retries its connection until the link is back: each try should
            // give up about as soon as a request would, not after the default 10 s.
            connect_timeout: sb.timing().io_timeout.clamp(
                std::time::Duration::from_secs(1),
                lun::NbdOptions::default().connect_timeout,
            ),
            ..Default::default()
        },
    )
    .with_context(|| format!("{spec}: cannot open LUN"))?;
    Ok(Arc::new(nbd))
}

/// Opens the datastore on `spec` as `options` say, its LUN through [`open_lun`] (read-only
/// when the datastore is opened read-only). Every command that opens a datastore comes here.
pub fn open_datastore(spec: &str, options: &vmfs::OpenOptions) -> anyhow::Result<vmfs::Datastore> {
    let lun = open_lun(spec, options.read_only)?;
    vmfs::Datastore::open(lun, options).with_context(|| format!("{spec}: cannot open datastore"))
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024, any case, an
/// optional trailing "B" or "iB").
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let n: u64 = digits.trim().parse().with_context(|| {
        format!("invalid size {text:?}: use bytes or a number with K, M, G or T")
    })?;
    n.checked_mul(1u64 << shift)
        .with_context(|| format!("size {text:?} is too large"))
}

fn format(args: FormatArgs) -> anyhow::Result<ExitCode> {
    let block_size = parse_size(&args.block_size)?;
    let block_size = u32::try_from(block_size)
        .ok()
        .filter(|b| {
            b.is_power_of_two() && (vmfs::MIN_BLOCK_SIZE..=vmfs::MAX_BLOCK_SIZE).contains(b)
        })
        .with_context(|| {
            format!(
                "block size {}: must be a power of two from 64K to 64M",
                args.block_size
            )
        })?;
    let journal_size = args.journal_size.as_deref().map(parse_size).transpose()?;
    let exists =
        Path::new(&args.lun).exists() || crate::lunspec::Spec::parse(&args.lun).session.is_some();
    let create_size = if exists {
        None
    } else {
        Some(parse_size(&args.size)?)
    };
    // An existing LUN may have snapshots (or be LUN@SESSION): formatting writes through the engine.
    let lun = match create_size {
        None => open_lun(&args.lun, false)?,
        Some(_) => lun::open(
            &args.lun,
            &lun::OpenOptions {
                create_size,
                ..Default::default()
            },
        )
        .with_context(|| format!("{}: cannot open LUN", args.lun))?,
    };
    let io_timeout = parse_duration(&args.io_timeout)?;
    let options = vmfs::FormatOptions {
        label: args.name.clone(),
        block_size,
        max_files: args.max_files,
        journal_size,
        force: args.force,
        uuid: None,
        lock_protocol: args.lock_protocol,
        io_timeout: Some(io_timeout),
    };
    let report = match vmfs::format(lun, &options) {
        Ok(r) => r,
        Err(e) => {
            // Do not leave behind a file this command created for nothing.
            if !exists {
                let _ = std::fs::remove_file(&args.lun);
            }
            return Err(e).with_context(|| format!("{}: format failed", args.lun));
        }
    };
    println!(
        "formatted {} as datastore {:?} ({})",
        args.lun, report.label, report.uuid
    );
    println!(
        "  capacity {} in {} blocks of {}, {} files max, journal {} per host, {} host slots",
        human(report.capacity_bytes),
        report.data_blocks,
        human(u64::from(report.block_size)),
        report.max_files,
        human(report.journal_size),
        report.host_slots
    );
    println!(
        "  locking {}, {}",
        report.lock_protocol.name(),
        vmfs::Timing::from_millis(report.io_timeout_ms)
    );
    println!("  {}", describe_safety(&report.lock_safety));
    Ok(ExitCode::SUCCESS)
}

/// One line: the primitive, how the LUN is reached, and whether locks hold across machines.
fn describe_safety(safety: &vmfs::LockSafety) -> String {
    let through = format!("{} through {}", safety.primitive, safety.reach);
    if let Some(why) = &safety.refused {
        return format!("{through}: {why}");
    }
    if safety.safe_across_machines {
        return format!("{through}: safe across machines");
    }
    let why = match safety.protocol {
        vmfs::LockProtocol::HostLocal => {
            "formatted with --lock-protocol local, stating no other machine reaches the LUN"
        }
        _ => "no other machine can reach a file on a local file system",
    };
    format!("{through}: holds among this machine's processes only, enough here: {why}")
}

fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let ds = open_datastore(&args.lun, &vmfs::OpenOptions::read_only())?;
    let info = ds
        .info()
        .with_context(|| format!("{}: cannot read datastore", args.lun))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("datastore   {} ({})", info.label, info.uuid);
    println!(
        "lun         {} ({} bytes, {}-byte sectors)",
        info.lun, info.lun_size, info.sector_size
    );
    println!(
        "format      version {}, block size {}, sub-block {}",
        info.format_version,
        human(u64::from(info.block_size)),
        human(u64::from(info.sub_block_size))
    );
    println!(
        "capacity    {} total, {} free ({:.1}% used)",
        human(info.capacity_bytes),
        human(info.free_bytes),
        if info.capacity_bytes == 0 {
            0.0
        } else {
            100.0 * (info.capacity_bytes - info.free_bytes) as f64 / info.capacity_bytes as f64
        }
    );
    for r in &info.resources {
        println!(
            "  {:<16} {:>10} total {:>10} free in {:>6} clusters",
            format!("{:?}", r.kind).to_lowercase(),
            r.total,
            r.free,
            r.clusters
        );
    }
    println!(
        "journal     {} per host, {} host slots",
        human(info.journal_size),
        info.host_slots
    );
    println!(
        "locking     {}, io timeout {} ms, dead-host timeout {} ms",
        info.lock_protocol.name(),
        info.io_timeout_ms,
        info.dead_host_timeout_ms
    );
    println!("            {}", describe_safety(&info.lock_safety));
    println!("superblock  {}", info.superblock);
    let identity = &info.lun_identity;
    let readable = |serialised: Option<&str>, none: &str| {
        serialised
            .and_then(lun::LunIdentity::parse)
            .map_or_else(|| none.to_string(), |id| id.to_string())
    };
    let recorded = readable(identity.recorded.as_deref(), "none recorded");
    let found = readable(identity.found.as_deref(), "no stable identity");
    match info.copy {
        "yes" => {
            println!("copy        yes: formatted on {recorded}, found on {found}");
            match &identity.original {
                Some(original) => println!("            original reachable at {original}"),
                None => println!("            original not reachable from this host"),
            }
        }
        "no" => println!("copy        no (on the LUN it was formatted on: {found})"),
        _ => println!("copy        unknown (recorded: {recorded}; found: {found})"),
    }
    if let Some(w) = &info.superblock_warning {
        println!("WARNING     {w}");
    }
    let live: Vec<_> = info.hosts.iter().filter(|h| h.state != "free").collect();
    println!("hosts       {} holding a slot", live.len());
    for h in live {
        println!(
            "  slot {:>2}  {} ({}) pid {}",
            h.slot, h.host_name, h.host_uuid, h.pid
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn fsck(args: FsckArgs) -> anyhow::Result<ExitCode> {
    let lun = open_lun(&args.lun, !args.repair)?;
    let report = vmfs::fsck(
        lun,
        &vmfs::FsckOptions {
            repair: args.repair,
            open: None,
        },
    )
    .with_context(|| format!("{}: fsck failed", args.lun))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if args.verbose {
        for f in &report.findings {
            let at = f
                .offset
                .map(|o| format!(" at LUN offset {o}"))
                .unwrap_or_default();
            let fix = fix_text(f.severity, f.repair.as_deref(), f.repaired, args.repair);
            println!(
                "{:<7} {}{at}: {}{fix}",
                tag(f.severity, f.repaired),
                f.object,
                f.problem
            );
        }
    } else {
        for g in &report.groups {
            let fix = fix_text(g.severity, g.repair.as_deref(), g.repaired, args.repair);
            let tag = tag(g.severity, g.repaired);
            if g.count == 1 {
                println!("{tag:<7} {}: {}{fix}", g.examples[0], g.problem);
            } else {
                let more = if g.count > g.examples.len() {
                    ", …"
                } else {
                    ""
                };
                println!(
                    "{tag:<7} {} × {}: {}{fix} [{}{more}]",
                    g.count,
                    g.kind,
                    g.problem,
                    g.examples.join(", ")
                );
            }
        }
    }
    if !args.json {
        let verdict = match (report.clean, report.pending) {
            (false, _) => "NOT CLEAN".to_string(),
            (true, 0) => "clean".to_string(),
            (true, n) => format!("clean, recovery pending ({n} item(s) a host will finish)"),
        };
        println!(
            "{}: {} files, {} directories, {} symlinks, {} special files; {} problem(s), {} repaired, {} remaining: {verdict}",
            report.label,
            report.stats.files,
            report.stats.directories,
            report.stats.symlinks,
            report.stats.special,
            report.problems,
            report.repaired,
            report.remaining,
        );
    }
    Ok(if report.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn tag(severity: vmfs::Severity, repaired: bool) -> &'static str {
    match (severity, repaired) {
        (vmfs::Severity::Info, _) => "info",
        (vmfs::Severity::Pending, false) => "pending",
        (vmfs::Severity::Pending, true) => "done",
        (_, true) => "FIXED",
        (_, false) => "ERROR",
    }
}

fn fix_text(
    severity: vmfs::Severity,
    repair: Option<&str>,
    repaired: bool,
    repairing: bool,
) -> String {
    match (severity, repair, repaired) {
        (vmfs::Severity::Pending, Some(r), false) => format!(" ({r})"),
        (vmfs::Severity::Pending, Some(_), true) => " (recovered by this repair)".to_string(),
        (_, Some(r), false) if !repairing => format!(" (--repair would {r})"),
        (_, Some(r), true) => format!(" ({r})"),
        _ => String::new(),
    }
}

fn hosts(args: HostsArgs) -> anyhow::Result<ExitCode> {
    let lun = open_lun(&args.lun, true)?;
    let watch = match &args.watch {
        Some(w) => parse_duration(w)?,
        None => {
            let (sb, _) = vmfs::read_superblock(&*lun)
                .with_context(|| format!("{}: cannot open datastore", args.lun))?;
            sb.timing().renew_interval() * 5 / 4
        }
    };
    let survey = vmfs::cluster::survey::survey(lun, watch)
        .with_context(|| format!("{}: cannot read the heartbeat region", args.lun))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&survey)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "datastore {} ({}), {} locking, io timeout {} ms, dead after {} ms; watched {} ms",
        survey.label,
        survey.uuid,
        survey.lock_protocol.name(),
        survey.io_timeout_ms,
        survey.dead_after_ms,
        survey.watched_ms
    );
    if survey.hosts.is_empty() {
        println!("no host has it mounted");
    }
    for h in &survey.hosts {
        let beat = match (h.renewing, h.heartbeat_age_ms) {
            (true, Some(age)) => format!("heartbeat {age} ms ago"),
            _ => format!("NOT RENEWING for {} ms or more", survey.watched_ms),
        };
        let state = match h.recovered_by {
            Some(by) => format!("recovering (by slot {by})"),
            None => h.state.clone(),
        };
        println!(
            "slot {:>2}  {} ({})  pid {}  generation {}  {}  {}",
            h.slot, h.host_name, h.host_uuid, h.pid, h.generation, state, beat
        );
        for l in &h.locks {
            println!(
                "          {} {}{}",
                l.mode,
                l.object,
                if l.open {
                    " (open)"
                } else {
                    " (metadata update)"
                }
            );
        }
    }
    for l in &survey.stale_locks {
        println!(
            "stale     {} {} (holder gone; freed by the next taker)",
            l.mode, l.object
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations_parse() {
        use super::parse_duration;
        use std::time::Duration;
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
