//! File commands inside a datastore: ls, mkdir, rm, mv, stat, cat, put, get, vdisk.
//!
//! Read-only commands (ls, stat, cat, get) open the LUN read-only and write nothing to it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use host::files::{Done, FileOp, FileRequest, PutSource};
use host::files_api::AgentDatastore;
use vmfs::{Access, Datastore, Kind};

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
    /// The local file to copy; `-` reads standard input to its end.
    pub local_file: PathBuf,
    pub path: String,
    /// Allocate and zero every block up front (eager-zeroed thick).
    #[arg(long)]
    pub thick: bool,
}

#[derive(Args)]
pub struct GetArgs {
    pub path: String,
    /// Where to copy to: a file (created or replaced), a directory, a device or a pipe;
    /// `-` writes standard output.
    pub local_file: PathBuf,
}

#[derive(Subcommand)]
pub enum VdiskCommand {
    /// Create a virtual disk (thin unless --thick).
    Create(VdiskCreateArgs),
    /// Snapshots of a virtual disk (the same as `vapp -d DS snapshot ...`).
    #[command(subcommand, hide = true)]
    Snapshot(VdiskSnapshotCommand),
}

#[derive(Subcommand)]
pub enum VdiskSnapshotCommand {
    Create {
        path: String,
        name: String,
        #[arg(long)]
        writable: bool,
    },
    List {
        path: String,
        #[arg(long)]
        json: bool,
    },
    Delete {
        path: String,
        name: String,
    },
    Rollback {
        path: String,
        name: String,
    },
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
            let target = match a.kind {
                Kind::Symlink => format!(" -> {}", ds.readlink(a.ino)?.to_string_lossy()),
                Kind::Rdm => format!(" -> {}", rdm_summary(&ds, a.ino)),
                _ => String::new(),
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
                super::utc_time(a.mtime_ns.into()),
                name,
                target
            )
            .map_err(super::stdout_error)?;
        } else {
            writeln!(out, "{name}").map_err(super::stdout_error)?;
        }
    }
    out.flush().map_err(super::stdout_error)?;
    Ok(ExitCode::SUCCESS)
}

pub fn mkdir(datastore: Option<&str>, args: MkdirArgs) -> anyhow::Result<ExitCode> {
    apply(
        datastore,
        FileOp::Mkdir {
            path: args.path,
            parents: args.parents,
        },
        None,
        &mut |_| {},
    )?;
    Ok(ExitCode::SUCCESS)
}

pub fn rm(datastore: Option<&str>, args: RmArgs) -> anyhow::Result<ExitCode> {
    apply(
        datastore,
        FileOp::Rm {
            path: args.path,
            recursive: args.recursive,
        },
        None,
        &mut |_| {},
    )?;
    Ok(ExitCode::SUCCESS)
}

pub fn mv(datastore: Option<&str>, args: MvArgs) -> anyhow::Result<ExitCode> {
    apply(
        datastore,
        FileOp::Mv {
            src: args.src,
            dst: args.dst,
        },
        None,
        &mut |_| {},
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs a mutating file command through the local host agent when it has joined the
/// datastore (no heartbeat slot of our own to take), else as a short-lived host.
fn apply(
    datastore: Option<&str>,
    op: FileOp,
    input: Option<&mut dyn Read>,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<Done> {
    let spec = super::require_datastore(datastore)?;
    let request = FileRequest::current(op);
    // A snapshot session is a LUN of its own, whatever UUID it carries.
    if crate::lunspec::Spec::parse(spec).session.is_none()
        && let Some(agent) = AgentDatastore::find(&super::host::agent_socket(), spec)
    {
        tracing::debug!(socket = %agent.socket().display(), "through the host agent");
        let mut input = input;
        // Nothing of the input is read unless the agent was reached.
        let lent: Option<&mut dyn Read> = match input.as_mut() {
            Some(r) => Some(&mut **r),
            None => None,
        };
        return match agent.apply(&request, lent, progress)? {
            Some(outcome) => outcome.map_err(anyhow::Error::msg),
            None => by_itself(datastore, &request, input, progress),
        };
    }
    by_itself(datastore, &request, input, progress)
}

/// Runs a file command as a short-lived host of the datastore.
fn by_itself(
    datastore: Option<&str>,
    request: &FileRequest,
    input: Option<&mut dyn Read>,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<Done> {
    let ds = open(datastore, false)?;
    let done = host::files::apply(&ds, request, input, progress)?;
    close(ds)?;
    Ok(done)
}

pub fn stat(datastore: Option<&str>, args: StatArgs) -> anyhow::Result<ExitCode> {
    let ds = open(datastore, true)?;
    let a = ds.stat_path(&args.path)?;
    let target = if a.kind == Kind::Symlink {
        Some(ds.readlink(a.ino)?.to_string_lossy().into_owned())
    } else {
        None
    };
    let mapping = (a.kind == Kind::Rdm).then(|| ds.rdm_record(a.ino));
    if args.json {
        let rdm = match &mapping {
            Some(Ok(r)) => serde_json::json!({
                "mode": r.mode,
                "identity": r.identity,
                "identity_text": lun::LunIdentity::parse(&r.identity).map(|i| i.to_string()),
                "mapped_at": r.spec,
                "size": r.size,
                "sector_size": r.sector_size,
                "serial": Some(&r.serial).filter(|s| !s.is_empty()),
            }),
            Some(Err(e)) => serde_json::json!({ "error": e.to_string() }),
            None => serde_json::Value::Null,
        };
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
            "rdm": rdm,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    crate::outln!("  path: {}", args.path)?;
    crate::outln!(
        "  type: {}{}{}",
        match a.kind {
            Kind::Rdm => "raw device mapping".to_string(),
            kind => format!("{kind:?}"),
        },
        if a.vdisk { " (virtual disk)" } else { "" },
        if a.thick { ", thick" } else { "" }
    )?;
    if let Some(t) = target {
        crate::outln!("target: {t}")?;
    }
    if let Some((major, minor)) = device_numbers(&a) {
        crate::outln!("device: {major}, {minor}")?;
    }
    match mapping {
        Some(Ok(r)) => {
            let identity = lun::LunIdentity::parse(&r.identity)
                .map_or_else(|| r.identity.clone(), |i| i.to_string());
            crate::outln!(
                "   rdm: {} mapping of {identity}, {} bytes, {}-byte sectors, mapped at {}",
                r.mode,
                r.size,
                r.sector_size,
                r.spec
            )?;
        }
        Some(Err(e)) => crate::outln!("   rdm: damaged: {e}")?,
        None => {}
    }
    crate::outln!(
        " inode: {} (generation {}, version {})",
        a.ino,
        a.generation,
        a.version
    )?;
    crate::outln!(
        "  mode: {} ({:04o})  links: {}  uid: {}  gid: {}",
        mode_string(&a),
        a.perm,
        a.nlink,
        a.uid,
        a.gid
    )?;
    crate::outln!(
        "  size: {}  allocated: {}  block size: {}",
        a.size,
        a.allocated,
        a.block_size
    )?;
    crate::outln!("access: {}", super::utc_time(a.atime_ns.into()))?;
    crate::outln!("modify: {}", super::utc_time(a.mtime_ns.into()))?;
    crate::outln!("change: {}", super::utc_time(a.ctime_ns.into()))?;
    crate::outln!(" birth: {}", super::utc_time(a.crtime_ns.into()))?;
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
        out.write_all(&buf[..n]).map_err(super::stdout_error)?;
        off += n as u64;
    }
    out.flush().map_err(super::stdout_error)?;
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(total: Option<u64>) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let Some(total) = total else {
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{spinner} {bytes} {bytes_per_sec}")
        {
            bar.set_style(style);
        }
        return Some(bar);
    };
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

/// `-` stands for standard input or output, as with tar, curl and qemu-img.
fn is_stdio(path: &Path) -> bool {
    path.as_os_str() == "-"
}

pub fn put(datastore: Option<&str>, args: PutArgs) -> anyhow::Result<ExitCode> {
    let (mut input, len, from): (Box<dyn Read>, Option<u64>, PutSource) =
        if is_stdio(&args.local_file) {
            (Box::new(std::io::stdin().lock()), None, PutSource::Stdin)
        } else {
            let file = File::open(&args.local_file)
                .with_context(|| format!("{}: cannot open", args.local_file.display()))?;
            // A pipe or a device has no length up front: it is read to its end.
            let len = file
                .metadata()
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            let from = PutSource::File {
                shown: args.local_file.display().to_string(),
                name: args
                    .local_file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned()),
            };
            (Box::new(file), len, from)
        };
    let bar = progress_bar(len);
    let mut progress = |done: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    apply(
        datastore,
        FileOp::Put {
            path: args.path,
            from,
            thick: args.thick,
            size: len,
        },
        Some(&mut input),
        &mut progress,
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(ExitCode::SUCCESS)
}

/// Where `get` writes: a regular file keeps the copy's holes and is sized and synced at
/// the end; anything else (standard output, a pipe, /dev/null, a device) takes a stream.
struct Sink {
    file: File,
    regular: bool,
    stdout: bool,
    name: String,
}

impl Sink {
    fn open(local: &Path) -> anyhow::Result<Sink> {
        if is_stdio(local) {
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("standard output")?;
            return Ok(Sink {
                file: File::from(fd),
                regular: false,
                stdout: true,
                name: "standard output".into(),
            });
        }
        let name = local.display().to_string();
        let existing = std::fs::metadata(local).ok();
        let file = match &existing {
            // Opened as it is: truncating or creating makes no sense for a device or a pipe.
            Some(m) if !m.is_file() && !m.is_dir() => {
                std::fs::OpenOptions::new().write(true).open(local)
            }
            _ => File::create(local),
        }
        .with_context(|| format!("{name}: cannot create"))?;
        Ok(Sink {
            file,
            regular: existing.is_none_or(|m| m.is_file()),
            stdout: false,
            name,
        })
    }

    fn write_all(&mut self, buf: &[u8]) -> anyhow::Result<()> {
        if self.regular && buf.iter().all(|&b| b == 0) {
            // Holes stay holes in the copy.
            self.file.seek(SeekFrom::Current(buf.len() as i64))?;
            return Ok(());
        }
        match self.file.write_all(buf) {
            Err(e) if self.stdout => Err(super::stdout_error(e)),
            r => r.with_context(|| format!("{}: write failed", self.name)),
        }
    }

    fn finish(self, size: u64) -> anyhow::Result<()> {
        if !self.regular {
            return Ok(());
        }
        self.file
            .set_len(size)
            .with_context(|| format!("{}: cannot set size", self.name))?;
        self.file
            .sync_all()
            .with_context(|| format!("{}: sync failed", self.name))
    }
}

pub fn get(datastore: Option<&str>, args: GetArgs) -> anyhow::Result<ExitCode> {
    let ds = open(datastore, true)?;
    if super::vdisk_snapshot::split_session(&ds, &args.path).is_some() {
        drop(ds);
        return get_session(datastore, &args);
    }
    let handle = ds.open_path(&args.path, Access::ReadOnly)?;
    let size = handle.size()?;
    let local = if !is_stdio(&args.local_file) && args.local_file.is_dir() {
        args.local_file
            .join(host::files::last_component(&args.path))
    } else {
        args.local_file.clone()
    };
    let mut out = Sink::open(&local)?;
    let bar = progress_bar(Some(size));
    let mut buf = vec![0u8; IO_CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = handle
            .read_at(&mut buf, off)
            .with_context(|| args.path.clone())?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        off += n as u64;
        if let Some(b) = &bar {
            b.set_position(off);
        }
    }
    out.finish(size)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(ExitCode::SUCCESS)
}

/// `get PATH@NAME`: a virtual disk's snapshot, copied without locks, so also while a VM
/// writes the disk.
fn get_session(datastore: Option<&str>, args: &GetArgs) -> anyhow::Result<ExitCode> {
    let spec = super::require_datastore(datastore)?;
    let Some((disk, name)) = args.path.rsplit_once('@') else {
        bail!("{}: not a snapshot path", args.path);
    };
    let local = if !is_stdio(&args.local_file) && args.local_file.is_dir() {
        args.local_file.join(host::files::last_component(disk))
    } else {
        args.local_file.clone()
    };
    let mut out = Sink::open(&local)?;
    let size =
        super::vdisk_snapshot::read_session_unlocked(spec, disk, name, &mut |b| out.write_all(b))?;
    out.finish(size)?;
    Ok(ExitCode::SUCCESS)
}

pub fn vdisk(datastore: Option<&str>, command: VdiskCommand) -> anyhow::Result<ExitCode> {
    match command {
        VdiskCommand::Create(args) => {
            let size = parse_size(&args.size)?;
            let done = apply(
                datastore,
                FileOp::VdiskCreate {
                    path: args.path.clone(),
                    size,
                    thick: args.thick,
                },
                None,
                &mut |_| {},
            )?;
            let Done::VdiskCreate { size, allocated } = done else {
                bail!(
                    "{}: the virtual disk was created, but its size was not reported",
                    args.path
                );
            };
            crate::outln!(
                "created {} virtual disk {} of {} bytes ({} allocated)",
                if args.thick { "thick" } else { "thin" },
                args.path,
                size,
                allocated
            )?;
            Ok(ExitCode::SUCCESS)
        }
        VdiskCommand::Snapshot(command) => vdisk_snapshot(datastore, command),
    }
}

pub fn vdisk_snapshot(
    datastore: Option<&str>,
    command: VdiskSnapshotCommand,
) -> anyhow::Result<ExitCode> {
    use super::vdisk_snapshot as snap;
    let ds = super::require_datastore(datastore)?;
    match command {
        VdiskSnapshotCommand::Create {
            path,
            name,
            writable,
        } => {
            let info = snap::create(ds, &path, &name, writable)?;
            crate::outln!(
                "snapshot {path}@{} taken (generation {})",
                info.name,
                info.generation
            )?;
        }
        VdiskSnapshotCommand::List { path, json } => {
            let (sessions, usage) = snap::list(ds, &path)?;
            // The same shape as a whole LUN's `snapshot list`; the pool is the hidden file
            // beside the disk.
            let (dir, file) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            let listing = super::snapshot::Listing {
                lun: path.clone(),
                pool: (usage.total > 0).then(|| format!("{dir}/.{file}.snap")),
                chunk_size: usage.chunk_size,
                pool_used_chunks: usage.used,
                pool_total_chunks: usage.total,
                sessions: super::snapshot::session_entries(sessions),
                rollback: None,
                served_by: None,
            };
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&listing)?)?;
            } else {
                super::snapshot::print_listing(&listing)?;
            }
        }
        VdiskSnapshotCommand::Delete { path, name } => {
            snap::delete(ds, &path, &name)?;
            crate::outln!("snapshot {path}@{name} deleted")?;
        }
        VdiskSnapshotCommand::Rollback { path, name } => {
            snap::rollback(ds, &path, &name)?;
            crate::outln!("{path} rolled back to snapshot {name}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `ls -l` shows after a mapping's name: its mode and LUN.
fn rdm_summary(ds: &Datastore, ino: u64) -> String {
    match ds.rdm_record(ino) {
        Ok(r) => {
            let identity = lun::LunIdentity::parse(&r.identity)
                .map_or_else(|| r.identity.clone(), |i| i.to_string());
            format!("{identity} ({}, {}-byte sectors)", r.mode, r.sector_size)
        }
        Err(e) => format!("damaged mapping ({e})"),
    }
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
        // As VMFS lists an RDM pointer: not a plain file, and not a virtual disk either.
        Kind::Rdm => 'r',
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

#[cfg(test)]
mod tests {
    use super::super::utc_time;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(1_700_000_000_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc_time(951_782_400_000_000_000), "2000-02-29 00:00:00");
        assert_eq!(utc_time(-1_000_000_000), "1969-12-31 23:59:59");
        assert_eq!(
            utc_time(i128::MAX),
            format!("@{}", i128::MAX / 1_000_000_000)
        );
    }
}
