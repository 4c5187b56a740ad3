//! `vapp datastore ...`: format, info, fsck.

use std::path::Path;
use std::process::ExitCode;

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
}

pub fn run(command: DatastoreCommand) -> anyhow::Result<ExitCode> {
    match command {
        DatastoreCommand::Format(args) => format(args),
        DatastoreCommand::Info(args) => info(args),
        DatastoreCommand::Fsck(args) => fsck(args),
    }
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
    let exists = Path::new(&args.lun).exists();
    let create_size = if exists {
        None
    } else {
        Some(parse_size(&args.size)?)
    };
    let lun = lun::open(
        &args.lun,
        &lun::OpenOptions {
            create_size,
            ..Default::default()
        },
    )
    .with_context(|| format!("{}: cannot open LUN", args.lun))?;
    let options = vmfs::FormatOptions {
        label: args.name.clone(),
        block_size,
        max_files: args.max_files,
        journal_size,
        force: args.force,
        uuid: None,
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
    Ok(ExitCode::SUCCESS)
}

fn open_read_only(spec: &str) -> anyhow::Result<vmfs::Datastore> {
    let lun = lun::open(
        spec,
        &lun::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .with_context(|| format!("{spec}: cannot open LUN"))?;
    vmfs::Datastore::open(lun, &vmfs::OpenOptions::read_only())
        .with_context(|| format!("{spec}: cannot open datastore"))
}

fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let ds = open_read_only(&args.lun)?;
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
    println!("superblock  {}", info.superblock);
    if let Some(w) = &info.superblock_warning {
        println!("WARNING     {w}");
    }
    let live: Vec<_> = info.hosts.iter().filter(|h| h.state == "live").collect();
    println!("hosts       {} live", live.len());
    for h in live {
        println!(
            "  slot {:>2}  {} ({}) pid {}",
            h.slot, h.host_name, h.host_uuid, h.pid
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn fsck(args: FsckArgs) -> anyhow::Result<ExitCode> {
    let lun = lun::open(
        &args.lun,
        &lun::OpenOptions {
            read_only: !args.repair,
            ..Default::default()
        },
    )
    .with_context(|| format!("{}: cannot open LUN", args.lun))?;
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
    } else {
        for f in &report.findings {
            let tag = match (f.severity, f.repaired) {
                (vmfs::Severity::Info, _) => "info",
                (_, true) => "FIXED",
                (_, false) => "ERROR",
            };
            let at = f
                .offset
                .map(|o| format!(" at LUN offset {o}"))
                .unwrap_or_default();
            let fix = match (&f.repair, f.repaired) {
                (Some(r), false) if !args.repair => format!(" (--repair would {r})"),
                (Some(r), true) => format!(" ({r})"),
                _ => String::new(),
            };
            println!("{tag:<5} {}{at}: {}{fix}", f.object, f.problem);
        }
        println!(
            "{}: {} files, {} directories, {} symlinks; {} problem(s), {} repaired, {} remaining: {}",
            report.label,
            report.stats.files,
            report.stats.directories,
            report.stats.symlinks,
            report.problems,
            report.repaired,
            report.remaining,
            if report.clean { "clean" } else { "NOT CLEAN" }
        );
    }
    Ok(if report.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
}
