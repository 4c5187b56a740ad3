//! File commands inside a datastore: ls, mkdir, rm, mv, stat, cat, put, get, vdisk.
//!
//! Read-only commands (ls, stat, cat, get) open the LUN read-only and write nothing to it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use vmfs::{Access, Creds, Datastore, Kind};

use super::datastore::parse_size;

#[derive(Args)]
pub struct LsArgs {
    /// Long listing: type, mode, size, allocated, modification time.
    #[arg(short = 'l')]
    pub long: bool,
    #[arg(default_value = "/")]
    pub path: String,
}

#[derive(Args)]
pub struct MkdirArgs {
    /// Create missing parents; no error if the directory exists.
    #[arg(short = 'p')]
    pub parents: bool,
    pub path: String,
}

#[derive(Args)]
pub struct RmArgs {
    /// Remove directories and their contents.
    #[arg(short = 'r')]
    pub recursive: bool,
    pub path: String,
}

#[derive(Args)]
pub struct MvArgs {
    pub src: String,
    pub dst: String,
}

#[derive(Args)]
pub struct StatArgs {
    pub path: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CatArgs {
    pub path: String,
}

#[derive(Args)]
pub struct PutArgs {
    pub local_file: PathBuf,
    pub path: String,
    /// Allocate and zero every block up front (eager-zeroed thick).
    #[arg(long)]
    pub thick: bool,
}

#[derive(Args)]
pub struct GetArgs {
    pub path: String,
    pub local_file: PathBuf,
}

#[derive(Subcommand)]
pub enum VdiskCommand {
    /// Create a virtual disk (thin unless --thick).
    Create(VdiskCreateArgs),
}

#[derive(Args)]
pub struct VdiskCreateArgs {
    pub path: String,
    #[arg(long)]
    pub size: String,
    #[arg(long)]
    pub thick: bool,
}

const IO_CHUNK: usize = 8 << 20;

/// Read-only commands open the datastore without a host id and take no locks. Mutating
/// commands mount it as a short-lived host of the cluster: they take a free heartbeat slot
/// (one compare-and-write on a CAS datastore), lock what they change like any host, and
/// release everything and the slot when they finish.
fn open(datastore: Option<&str>, read_only: bool) -> anyhow::Result<Datastore> {
    let options = if read_only {
        vmfs::OpenOptions::read_only()
    } else {
        vmfs::OpenOptions::read_write()
    };
    super::datastore::open_datastore(super::require_datastore(datastore)?, &options)
}

/// Unmounts cleanly so the failure of the last commit is reported, not just logged.
fn close(ds: Datastore) -> anyhow::Result<ExitCode> {
    ds.close().context("closing the datastore")?;
    Ok(ExitCode::SUCCESS)
}

pub fn ls(datastore: Option<&str>, args: LsArgs) -> anyhow::Result<ExitCode> {
    let ds = open(datastore, true)?;
    let attr = ds.stat_path(&args.path)?;
    let entries = if attr.kind == Kind::Dir {
        let mut e = ds.list(&args.path)?;
        e.sort_by(|a, b| a.0.cmp(&b.0));
        e
    } else {
        let name = Path::new(&args.path)
            .file_name()
            .map(OsStr::to_os_string)
            .unwrap_or_else(|| args.path.clone().into());
        vec![(name, attr)]
    };
    let mut out = std::io::stdout().lock();
    for (name, a) in entries {
        let name = name.to_string_lossy();
        if args.long {
            let target = if a.kind == Kind::Symlink {
                format!(" -> {}", ds.readlink(a.ino)?.to_string_lossy())
            } else {
                String::new()
            };
            // ls(1) shows a device node's numbers where a file's size goes.
            let size = match device_numbers(&a) {
                Some((major, minor)) => format!("{major}, {minor}"),
                None => a.size.to_string(),
            };
            writeln!(
                out,
                "{} {:>3} {:>5} {:>5} {:>14} {:>14} {} {}{}",
                mode_string(&a),
                a.nlink,
                a.uid,
                a.gid,
                size,
                a.allocated,
                format_time(a.mtime_ns),
                name,
                target
            )?;
        } else {
            writeln!(out, "{name}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn mkdir(datastore: Option<&str>, args: MkdirArgs) -> anyhow::Result<ExitCode> {
    let ds = open(datastore, false)?;
    if args.parents {
        ds.mkdir_all(&args.path, 0o755, Creds::current())?;
    } else {
        ds.mkdir_path(&args.path, 0o755, Creds::current())?;
    }
    close(ds)
}

pub fn rm(datastore: Option<&str>, args: RmArgs) -> anyhow::Result<ExitCode> {
    let ds = open(datastore, false)?;
    ds.remove_path(&args.path, args.recursive)?;
    close(ds)
}

pub fn mv(datastore: Option<&str>, args: MvArgs) -> anyhow::Result<ExitCode> {
    let ds = open(datastore, false)?;
    // Like mv(1): into an existing directory keeps the name.
    let dst = match ds.stat_path(&args.dst) {
        Ok(a) if a.kind == Kind::Dir => {
            format!(
                "{}/{}",
                args.dst.trim_end_matches('/'),
                last_component(&args.src)
            )
        }
        _ => args.dst.clone(),
    };
    ds.rename_path(&args.src, &dst)?;
    close(ds)
}

pub fn stat(datastore: Option<&str>, args: StatArgs) -> anyhow::Result<ExitCode> {
    let ds = open(datastore, true)?;
    let a = ds.stat_path(&args.path)?;
    let target = if a.kind == Kind::Symlink {
        Some(ds.readlink(a.ino)?.to_string_lossy().into_owned())
    } else {
        None
    };
    if args.json {
        let v = serde_json::json!({
            "path": args.path,
            "ino": a.ino,
            "generation": a.generation,
            "version": a.version,
            "type": a.kind,
            "mode": format!("{:04o}", a.perm),
            "nlink": a.nlink,
            "uid": a.uid,
            "gid": a.gid,
            "size": a.size,
            "allocated": a.allocated,
            "atime_ns": a.atime_ns,
            "mtime_ns": a.mtime_ns,
            "ctime_ns": a.ctime_ns,
            "crtime_ns": a.crtime_ns,
            "thick": a.thick,
            "vdisk": a.vdisk,
            "block_size": a.block_size,
            "symlink_target": target,
            "device": device_numbers(&a).map(|(major, minor)| serde_json::json!({"major": major, "minor": minor})),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("  path: {}", args.path);
    println!(
        "  type: {:?}{}{}",
        a.kind,
        if a.vdisk { " (virtual disk)" } else { "" },
        if a.thick { ", thick" } else { "" }
    );
    if let Some(t) = target {
        println!("target: {t}");
    }
    if let Some((major, minor)) = device_numbers(&a) {
        println!("device: {major}, {minor}");
    }
    println!(
        " inode: {} (generation {}, version {})",
        a.ino, a.generation, a.version
    );
    println!(
        "  mode: {} ({:04o})  links: {}  uid: {}  gid: {}",
        mode_string(&a),
        a.perm,
        a.nlink,
        a.uid,
        a.gid
    );
    println!(
        "  size: {}  allocated: {}  block size: {}",
        a.size, a.allocated, a.block_size
    );
    println!("access: {}", format_time(a.atime_ns));
    println!("modify: {}", format_time(a.mtime_ns));
    println!("change: {}", format_time(a.ctime_ns));
    println!(" birth: {}", format_time(a.crtime_ns));
    Ok(ExitCode::SUCCESS)
}

pub fn cat(datastore: Option<&str>, args: CatArgs) -> anyhow::Result<ExitCode> {
    let ds = open(datastore, true)?;
    let handle = ds.open_path(&args.path, Access::ReadOnly)?;
    let mut buf = vec![0u8; IO_CHUNK];
    let mut off = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let n = handle
            .read_at(&mut buf, off)
            .with_context(|| args.path.clone())?;
        if n == 0 {
            break;
        }
        if let Err(e) = out.write_all(&buf[..n]) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break;
            }
            return Err(e).context("writing to stdout");
        }
        off += n as u64;
    }
    out.flush().ok();
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

/// A path inside the datastore: into `dst` when it is a directory (or ends in '/').
fn target_path(ds: &Datastore, dst: &str, local: &Path) -> anyhow::Result<String> {
    let into_dir = dst.ends_with('/') || ds.stat_path(dst).is_ok_and(|a| a.kind == Kind::Dir);
    if !into_dir {
        return Ok(dst.to_string());
    }
    let name = local
        .file_name()
        .with_context(|| format!("{}: has no file name", local.display()))?;
    Ok(format!(
        "{}/{}",
        dst.trim_end_matches('/'),
        name.to_string_lossy()
    ))
}

pub fn put(datastore: Option<&str>, args: PutArgs) -> anyhow::Result<ExitCode> {
    let mut file = File::open(&args.local_file)
        .with_context(|| format!("{}: cannot open", args.local_file.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let ds = open(datastore, false)?;
    let path = target_path(&ds, &args.path, &args.local_file)?;
    let bar = progress_bar(len);
    let options = vmfs::PutOptions {
        new: vmfs::NewFile {
            mode: 0o644,
            creds: Creds::current(),
            thick: args.thick,
            vdisk: false,
        },
        overwrite: true,
    };
    let mut progress = |done: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    ds.put(&mut file, &path, &options, &mut progress)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    close(ds)
}

pub fn get(datastore: Option<&str>, args: GetArgs) -> anyhow::Result<ExitCode> {
    let ds = open(datastore, true)?;
    let handle = ds.open_path(&args.path, Access::ReadOnly)?;
    let size = handle.size()?;
    let local = if args.local_file.is_dir() {
        args.local_file.join(last_component(&args.path))
    } else {
        args.local_file.clone()
    };
    let mut out =
        File::create(&local).with_context(|| format!("{}: cannot create", local.display()))?;
    let bar = progress_bar(size);
    let mut buf = vec![0u8; IO_CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = handle
            .read_at(&mut buf, off)
            .with_context(|| args.path.clone())?;
        if n == 0 {
            break;
        }
        // Holes stay holes in the copy.
        if buf[..n].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(&buf[..n])
                .with_context(|| format!("{}: write failed", local.display()))?;
        }
        off += n as u64;
        if let Some(b) = &bar {
            b.set_position(off);
        }
    }
    out.set_len(size)
        .with_context(|| format!("{}: cannot set size", local.display()))?;
    out.sync_all()
        .with_context(|| format!("{}: sync failed", local.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(ExitCode::SUCCESS)
}

pub fn vdisk(datastore: Option<&str>, command: VdiskCommand) -> anyhow::Result<ExitCode> {
    match command {
        VdiskCommand::Create(args) => {
            let size = parse_size(&args.size)?;
            let ds = open(datastore, false)?;
            let attr = ds.create_vdisk(&args.path, size, args.thick, Creds::current())?;
            println!(
                "created {} virtual disk {} of {} bytes ({} allocated)",
                if args.thick { "thick" } else { "thin" },
                args.path,
                attr.size,
                attr.allocated
            );
            close(ds)
        }
    }
}

/// The last component of a datastore path, as mv(1) and cp(1) name a copy in a directory.
fn last_component(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
}

/// (major, minor) of a character or block device node.
fn device_numbers(a: &vmfs::Attr) -> Option<(u32, u32)> {
    matches!(a.kind, Kind::CharDevice | Kind::BlockDevice)
        .then(|| (libc::major(a.rdev), libc::minor(a.rdev)))
}

fn mode_string(a: &vmfs::Attr) -> String {
    let t = match a.kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::File if a.vdisk => 'v',
        Kind::File => '-',
        Kind::Fifo => 'p',
        Kind::CharDevice => 'c',
        Kind::BlockDevice => 'b',
        Kind::Socket => 's',
    };
    let mut s = String::with_capacity(10);
    s.push(t);
    // As ls(1): set-user-id, set-group-id and sticky show in the execute column, lower case
    // when execute is set too.
    for (shift, special, mark) in [
        (6, libc::S_ISUID, 's'),
        (3, libc::S_ISGID, 's'),
        (0, libc::S_ISVTX, 't'),
    ] {
        let bits = (a.perm >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (a.perm & special != 0, bits & 1 != 0) {
            (true, true) => mark,
            (true, false) => mark.to_ascii_uppercase(),
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// UTC "YYYY-MM-DD HH:MM:SS" from nanoseconds since the epoch.
fn format_time(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::format_time;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(
            format_time(1_700_000_000_000_000_000),
            "2023-11-14 22:13:20"
        );
        assert_eq!(format_time(951_782_400_000_000_000), "2000-02-29 00:00:00");
    }
}
