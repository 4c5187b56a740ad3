//! `vapp snapshot`: sessions of plain LUNs, rollback, consistency groups and pool checks.
//!
//! A command on a LUN claims it (see [`crate::lunspec`]) and works on its engine directly.
//! When another process holds the claim and serves a control socket (`vapp export`, a
//! running rollback), the command is sent there as one JSON line and its answer printed;
//! so a snapshot of an exported LUN is taken by the export, which puts the engine under
//! its clients on the first one without disconnecting them.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use lun::{Lun, SwitchLun};
use serde::{Deserialize, Serialize};
use snapshot::{PoolOptions, SessionState, Snapshots};

use crate::lunspec::{self, Claim, ClaimRecord, Spec};
use crate::outln;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a point-in-time session of a LUN (its first one makes the pool).
    Create(CreateArgs),
    /// List a LUN's sessions, its pool space and a running rollback.
    List(ListArgs),
    /// Delete a session; the pool space only it used is free at once.
    Delete(NameArgs),
    /// Return the LUN to a session's point in time (runs in the background).
    Rollback(NameArgs),
    /// Consistency groups: one point in time across several LUNs.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Check a snapshot pool (exit 0 clean, 1 problems).
    Fsck(FsckArgs),
    /// Runs a rollback started by `snapshot rollback` to its end (started by it).
    #[command(hide = true)]
    Resume(LunArg),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The LUN: a file, a block device or an nbd:// URL.
    pub lun: String,
    /// Session name: letters, digits, '-', '_' and '.'.
    pub name: String,
    /// The pool LUN, at the first session (required then for a device or nbd:// LUN;
    /// a file's default pool is FILE.snap beside it). Later sessions use the same pool.
    #[arg(long)]
    pub pool: Option<String>,
    /// Size of a pool file created now [default: 20% of the LUN, at least 4M].
    #[arg(long)]
    pub pool_size: Option<String>,
    /// Copy-on-first-write unit of a new pool, a power of two from 4K to 1M [default: 64K].
    #[arg(long)]
    pub chunk: Option<String>,
    /// The session takes writes (kept in the pool).
    #[arg(long)]
    pub writable: bool,
}

#[derive(Args)]
pub struct ListArgs {
    pub lun: String,
    /// One JSON object (field names in README).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct NameArgs {
    pub lun: String,
    pub name: String,
}

#[derive(Args)]
pub struct LunArg {
    pub lun: String,
}

#[derive(Args)]
pub struct FsckArgs {
    /// The pool LUN.
    pub pool: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Define a group of LUNs on this host.
    Create(GroupCreateArgs),
    /// Take a session of every member at one point in time.
    Snapshot(GroupSnapshotArgs),
}

#[derive(Args)]
pub struct GroupCreateArgs {
    pub group: String,
    #[arg(required = true)]
    pub luns: Vec<String>,
}

#[derive(Args)]
pub struct GroupSnapshotArgs {
    pub group: String,
    pub name: String,
}

/// A command on one LUN, as it travels to the process that holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    Create {
        name: String,
        writable: bool,
        pool: Option<String>,
        pool_size: Option<u64>,
        chunk: Option<u32>,
    },
    Delete {
        name: String,
    },
    Rollback {
        name: String,
    },
    List,
    /// Serve session `name` over NBD on a private socket, so another process can open
    /// `LUN@NAME` while this one holds the LUN.
    OpenSession {
        name: String,
    },
    /// Compare-and-write on served session `name`, for a datastore on it whose other
    /// users reach it over NBD (which has none): the read, compare and write are one step
    /// in this process.
    SessionCompareAndWrite {
        name: String,
        offset: u64,
        expected: Vec<u8>,
        new: Vec<u8>,
    },
    /// An operation on the clone at `dest` (an absolute path or a URL) of this LUN.
    Clone {
        dest: String,
        op: super::clone::CloneOp,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// What to print, or the error.
    pub message: String,
    pub ok: bool,
    pub listing: Option<Listing>,
    /// For [`Request::OpenSession`]: the session's NBD socket and whether it takes writes.
    #[serde(default)]
    pub session: Option<SessionSocket>,
    /// For a clone's status: `clone status --json`.
    #[serde(default)]
    pub clone: Option<serde_json::Value>,
    /// For [`Request::SessionCompareAndWrite`]: `None` when written, else what is there.
    #[serde(default)]
    pub miscompare: Option<Vec<u8>>,
}

impl Reply {
    pub fn done(message: String) -> Reply {
        Reply {
            message,
            ok: true,
            listing: None,
            session: None,
            clone: None,
            miscompare: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSocket {
    pub socket: std::path::PathBuf,
    pub writable: bool,
}

/// `snapshot list --json`: these field names are stable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listing {
    pub lun: String,
    pub pool: Option<String>,
    pub chunk_size: u32,
    pub pool_used_chunks: u64,
    pub pool_total_chunks: u64,
    pub sessions: Vec<SessionEntry>,
    pub rollback: Option<RollbackEntry>,
    /// The process serving the LUN, when one does.
    pub served_by: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionEntry {
    pub name: String,
    pub created_unix: u64,
    /// `valid`, or `invalid` (the pool filled up before one of its chunks was kept).
    pub state: String,
    pub writable: bool,
    pub chunks: u64,
    pub group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackEntry {
    pub session: String,
    pub done_chunks: u64,
    pub total_chunks: u64,
}

pub fn run(datastore: Option<&str>, command: SnapshotCommand) -> anyhow::Result<ExitCode> {
    if let Some(ds) = datastore {
        return on_virtual_disk(ds, command);
    }
    match command {
        SnapshotCommand::Create(args) => {
            let pool_size = args
                .pool_size
                .as_deref()
                .map(super::datastore::parse_size)
                .transpose()?;
            let chunk = args
                .chunk
                .as_deref()
                .map(|c| {
                    let n = super::datastore::parse_size(c)?;
                    u32::try_from(n).with_context(|| format!("chunk size {c}: too large"))
                })
                .transpose()?;
            let request = Request::Create {
                name: args.name,
                writable: args.writable,
                pool: args.pool,
                pool_size,
                chunk,
            };
            on_lun(&args.lun, request, false)
        }
        SnapshotCommand::List(args) => on_lun(&args.lun, Request::List, args.json),
        SnapshotCommand::Delete(args) => {
            on_lun(&args.lun, Request::Delete { name: args.name }, false)
        }
        SnapshotCommand::Rollback(args) => {
            on_lun(&args.lun, Request::Rollback { name: args.name }, false)
        }
        SnapshotCommand::Group(GroupCommand::Create(args)) => group_create(args),
        SnapshotCommand::Group(GroupCommand::Snapshot(args)) => group_snapshot(args),
        SnapshotCommand::Fsck(args) => fsck(args),
        SnapshotCommand::Resume(args) => resume(&args.lun),
    }
}

/// `vapp -d DS snapshot ...`: the LUN is a virtual disk and its pool lives beside it in the
/// datastore, so pool options and groups of whole LUNs do not apply.
fn on_virtual_disk(ds: &str, command: SnapshotCommand) -> anyhow::Result<ExitCode> {
    use super::files::VdiskSnapshotCommand as Vdisk;
    let command = match command {
        SnapshotCommand::Create(args) => {
            if args.pool.is_some() || args.pool_size.is_some() || args.chunk.is_some() {
                bail!(
                    "{}: a virtual disk's pool is made inside its datastore; \
                     --pool, --pool-size and --chunk are for whole LUNs",
                    args.lun
                );
            }
            Vdisk::Create {
                path: args.lun,
                name: args.name,
                writable: args.writable,
            }
        }
        SnapshotCommand::List(args) => Vdisk::List {
            path: args.lun,
            json: args.json,
        },
        SnapshotCommand::Delete(args) => Vdisk::Delete {
            path: args.lun,
            name: args.name,
        },
        SnapshotCommand::Rollback(args) => Vdisk::Rollback {
            path: args.lun,
            name: args.name,
        },
        SnapshotCommand::Group(_) | SnapshotCommand::Fsck(_) | SnapshotCommand::Resume(_) => bail!(
            "with -d, snapshot takes create, list, delete and rollback of a virtual disk; \
             for a VM's disks at one point use vapp -d DS vm snapshot"
        ),
    };
    super::files::vdisk_snapshot(Some(ds), command)
}

/// Runs `request` on `typed`: here when the LUN is free, else by the process serving it.
fn on_lun(typed: &str, request: Request, json: bool) -> anyhow::Result<ExitCode> {
    let spec = Spec::parse(typed);
    if let Some(session) = &spec.session {
        bail!(
            "{typed}: snapshot commands take the source LUN ({}), not its session {session:?}",
            spec.typed
        );
    }
    let reply = send(&spec, &request)?;
    match (&reply.listing, json) {
        (Some(listing), true) => outln!("{}", serde_json::to_string_pretty(listing)?)?,
        (Some(listing), false) => print_listing(listing)?,
        (None, _) => outln!("{}", reply.message)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `request` on the source `spec`: here when the LUN is free, else by the process that
/// holds it. A refusal is an error.
pub fn send(spec: &Spec, request: &Request) -> anyhow::Result<Reply> {
    let reply = match on_held_lun(spec, request)? {
        Ok((claim, reply)) => {
            // The engine is closed (the service dropped) before the runner opens it.
            drop(claim);
            if matches!(request, Request::Rollback { .. }) && reply.ok {
                spawn_resume(spec)?;
            }
            reply
        }
        Err(reply) => reply,
    };
    if !reply.ok {
        bail!("{}", reply.message);
    }
    Ok(reply)
}

/// Runs `request` on `spec`, waiting a little for another snapshot command that holds the
/// LUN for an instant: only a holder that serves no control socket is an error.
fn on_held_lun(spec: &Spec, request: &Request) -> anyhow::Result<Result<(Claim, Reply), Reply>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Claim::take(spec)? {
            Ok(claim) => {
                let source = lunspec::open_raw(&spec.source, false)?;
                let service = Service::open(spec.clone(), source, None)?;
                return Ok(Ok((claim, service.handle(request))));
            }
            Err(holder) => match &holder.socket {
                Some(socket) => match ask(spec, &holder, socket, request) {
                    Ok(reply) => return Ok(Err(reply)),
                    // A holder that ends (a rollback's runner, done) closes its socket with
                    // requests still queued, unread: ask again, whoever holds the LUN now.
                    Err(e) if holder_went_away(&e) && std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => return Err(e),
                },
                // A replication daemon that serves no snapshot commands will not start to.
                None if holder.writers.is_some()
                    || holder.refuse.is_some()
                    || std::time::Instant::now() > deadline =>
                {
                    bail!("{}", holder.refusal(&spec.typed))
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            },
        }
    }
}

/// Opens session `name` of `spec` through `holder`, the process that holds the LUN.
pub fn session_through(
    spec: &Spec,
    holder: &ClaimRecord,
    name: &str,
    write: bool,
) -> anyhow::Result<Arc<dyn Lun>> {
    let typed = format!("{}@{name}", spec.typed);
    let Some(socket) = &holder.socket else {
        bail!("{typed}: {}", holder.refusal(&spec.typed));
    };
    let reply = ask(
        spec,
        holder,
        socket,
        &Request::OpenSession {
            name: name.to_string(),
        },
    )?;
    let served = match reply.session {
        Some(served) if reply.ok => served,
        _ => bail!("{}", reply.message),
    };
    if write && !served.writable {
        bail!(
            "{typed}: a read-only snapshot session; open it read-only, or take a session with \
             --writable to write to it"
        );
    }
    let lun = lun::NbdLun::connect(
        lun::NbdTarget::Unix(served.socket),
        "",
        lun::NbdOptions {
            read_only: !write,
            ..Default::default()
        },
    )
    .with_context(|| {
        format!(
            "{typed}: cannot reach the session served by pid {}",
            holder.pid
        )
    })?;
    // Reached like the LUN itself: the holder's writes land on this machine's LUN.
    let reach = lunspec::open_raw(&spec.source, true)?.reach();
    Ok(Arc::new(HeldSession {
        inner: lun,
        typed,
        session: name.to_string(),
        spec: spec.clone(),
        holder: holder.clone(),
        control: socket.clone(),
        reach,
    }))
}

/// A session served by the process holding its LUN, with compare-and-write done by that
/// process (NBD has none), so a datastore on it keeps its compare-and-write locks.
#[derive(Debug)]
struct HeldSession {
    inner: lun::NbdLun,
    typed: String,
    session: String,
    spec: Spec,
    holder: ClaimRecord,
    control: std::path::PathBuf,
    reach: lun::Reach,
}

impl Lun for HeldSession {
    fn name(&self) -> &str {
        &self.typed
    }
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn submit(&self, batch: &mut [lun::IoRequest<'_>]) -> lun::Result<()> {
        self.inner.submit(batch)
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn reach(&self) -> lun::Reach {
        self.reach
    }
    /// Every user of the session reaches it through its holder, whose lock makes the
    /// read, compare and write one step for this machine's processes.
    fn supports_compare_and_write(&self) -> bool {
        !self.inner.is_read_only()
    }
    fn compare_and_write_scope(&self) -> lun::CasScope {
        lun::CasScope::ThisMachine
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> lun::Result<lun::CompareAndWrite> {
        let request = Request::SessionCompareAndWrite {
            name: self.session.clone(),
            offset,
            expected: expected.to_vec(),
            new: new.to_vec(),
        };
        let failed = |reason: String| lun::LunError::Disconnected {
            lun: self.typed.clone(),
            reason,
        };
        let reply = ask(&self.spec, &self.holder, &self.control, &request)
            .map_err(|e| failed(format!("{e:#}")))?;
        if !reply.ok {
            return Err(failed(reply.message));
        }
        Ok(match reply.miscompare {
            None => lun::CompareAndWrite::Written,
            Some(current) => lun::CompareAndWrite::Miscompare(current),
        })
    }
}

fn ask(
    spec: &Spec,
    holder: &ClaimRecord,
    socket: &std::path::Path,
    request: &Request,
) -> anyhow::Result<Reply> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("{}: {}", spec.typed, holder.refusal(&spec.typed)))?;
    // A clone's copy takes as long as the data takes: no limit.
    let long = matches!(request, Request::Clone { .. });
    stream.set_read_timeout((!long).then_some(CONTROL_TIMEOUT))?;
    stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream)
        .write_all(&line)
        .with_context(|| format!("asking vapp {} (pid {})", holder.command, holder.pid))?;
    let mut answer = String::new();
    let read = BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| {
            format!(
                "no answer from vapp {} (pid {})",
                holder.command, holder.pid
            )
        })?;
    if read == 0 {
        return Err(HolderClosed {
            command: holder.command.clone(),
            pid: holder.pid,
        }
        .into());
    }
    serde_json::from_str(answer.trim()).with_context(|| {
        format!(
            "bad answer from vapp {} (pid {}): {answer:?}",
            holder.command, holder.pid
        )
    })
}

/// True when `e` says the holder's socket closed before answering: refused, reset, or an
/// empty answer.
fn holder_went_away(e: &anyhow::Error) -> bool {
    if e.downcast_ref::<HolderClosed>().is_some() {
        return true;
    }
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        })
    })
}

/// The holder closed the control connection without a word: it was ending.
#[derive(Debug)]
struct HolderClosed {
    command: String,
    pid: u32,
}

impl std::fmt::Display for HolderClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vapp {} (pid {}) closed without answering",
            self.command, self.pid
        )
    }
}

impl std::error::Error for HolderClosed {}

/// Long enough for a session on a busy LUN: the source is flushed first.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// The engine of one LUN in the process that holds its claim.
pub struct Service {
    spec: Spec,
    /// The source as it is; the engine wraps it once a pool exists.
    source: Arc<dyn Lun>,
    engine: Mutex<Option<Arc<Snapshots>>>,
    /// The layer an export serves, switched onto the engine at the first session.
    switch: Option<Arc<SwitchLun>>,
    /// Who uses the LUN in this process, and what to stop before a rollback.
    user: Option<InUse>,
    /// Sessions served to other processes, by name; each runs until the session is
    /// deleted or this process ends.
    session_servers: Mutex<std::collections::HashMap<String, ServedSession>>,
    /// An export's share of a LUN it writes directly until its first snapshot.
    users: Option<lunspec::Users>,
}

/// A session served over NBD to other processes.
struct ServedSession {
    socket: SessionSocket,
    lun: Arc<dyn Lun>,
    shutdown: lun::nbd::ShutdownHandle,
    serving: Option<std::thread::JoinHandle<()>>,
}

impl ServedSession {
    /// Ends its clients' connections and removes its socket: nothing of a deleted
    /// session stays reachable.
    fn stop(mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.serving.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket.socket);
    }
}

/// A LUN in use by the process that holds it: a rollback would change it under its user.
#[derive(Debug, Clone)]
pub struct InUse {
    /// e.g. `vapp export`.
    pub who: String,
    /// e.g. `stop the export (disconnect its clients first)`.
    pub advice: String,
}

impl Service {
    /// Opens the engine if `spec` has a pool.
    pub fn open(
        spec: Spec,
        source: Arc<dyn Lun>,
        switch: Option<Arc<SwitchLun>>,
    ) -> anyhow::Result<Service> {
        let engine = match lunspec::existing_pool(&spec)? {
            Some(pool) => Some(lunspec::open_engine(&spec, source.clone(), &pool)?),
            None => None,
        };
        Ok(Service {
            spec,
            source,
            engine: Mutex::new(engine),
            switch,
            user: None,
            session_servers: Mutex::default(),
            users: None,
        })
    }

    /// The service of a process that opened the LUN through `snaps` and uses it.
    pub fn in_use(spec: Spec, source: Arc<dyn Lun>, snaps: Arc<Snapshots>, user: InUse) -> Service {
        Service {
            spec,
            source,
            engine: Mutex::new(Some(snaps)),
            switch: None,
            user: Some(user),
            session_servers: Mutex::default(),
            users: None,
        }
    }

    /// This service in a process whose writers go through `switch`, onto which the first
    /// session puts the engine (a replication daemon's primary, as an export).
    pub fn in_use_through(self, switch: Arc<SwitchLun>, user: InUse) -> Service {
        Service {
            switch: Some(switch),
            user: Some(user),
            ..self
        }
    }

    pub fn engine(&self) -> Option<Arc<Snapshots>> {
        self.engine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn handle(&self, request: &Request) -> Reply {
        match self.execute(request) {
            Ok(reply) => reply,
            Err(e) => Reply {
                message: format!("{e:#}"),
                ok: false,
                listing: None,
                session: None,
                clone: None,
                miscompare: None,
            },
        }
    }

    fn execute(&self, request: &Request) -> anyhow::Result<Reply> {
        let lun = &self.spec.typed;
        let done = Reply::done;
        match request {
            Request::Create {
                name,
                writable,
                pool,
                pool_size,
                chunk,
            } => {
                let snaps = self.ensure_engine(pool.as_deref(), *pool_size, *chunk)?;
                let info = snaps
                    .create_session(name, *writable)
                    .with_context(|| format!("{lun}: cannot take session {name:?}"))?;
                tracing::info!(lun = %lun, session = %info.name, writable = info.writable, "snapshot session taken");
                Ok(done(format!("{lun}@{}: session taken", info.name)))
            }
            Request::Delete { name } => {
                let snaps = self.need_engine()?;
                let served = self
                    .session_servers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(name);
                if let Some(served) = served {
                    served.stop();
                }
                snaps
                    .delete_session(name)
                    .with_context(|| format!("{lun}: cannot delete session {name:?}"))?;
                Ok(done(format!("{lun}@{name}: deleted")))
            }
            Request::Rollback { name } => {
                if let Some(user) = &self.user {
                    bail!(
                        "{lun}: refusing to roll back a LUN in use by {} (pid {}): its data \
                         would change under its users; {}, then roll back",
                        user.who,
                        std::process::id(),
                        user.advice
                    );
                }
                let snaps = self.need_engine()?;
                snaps
                    .start_rollback(name)
                    .with_context(|| format!("{lun}: cannot roll back to {name:?}"))?;
                Ok(done(format!(
                    "{lun}: rolling back to {name} in the background; vapp snapshot list {lun} shows its progress"
                )))
            }
            Request::List => Ok(Reply {
                listing: Some(self.listing()?),
                ..done(String::new())
            }),
            Request::OpenSession { name } => Ok(Reply {
                session: Some(self.serve_session(name)?),
                ..done(String::new())
            }),
            Request::SessionCompareAndWrite {
                name,
                offset,
                expected,
                new,
            } => self.session_compare_and_write(name, *offset, expected, new),
            Request::Clone { dest, op } => {
                let snaps = match op {
                    super::clone::CloneOp::Create { .. } => self.ensure_pool()?,
                    _ => self.need_engine()?,
                };
                super::clone::apply(&self.spec, &snaps, dest, *op)
            }
        }
    }

    /// Serves session `name` on a Unix socket beside the LUN's control socket.
    fn serve_session(&self, name: &str) -> anyhow::Result<SessionSocket> {
        let mut servers = self
            .session_servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(served) = servers.get(name) {
            return Ok(served.socket.clone());
        }
        let snaps = self.need_engine()?;
        let typed = format!("{}@{name}", self.spec.typed);
        let lun: Arc<dyn Lun> = lunspec::open_session(&snaps, &typed, name)?;
        let writable = !lun.is_read_only();
        let served_lun = lun.clone();
        let socket = lunspec::session_socket(&self.spec, name);
        let config = lun::nbd::ExportConfig {
            read_only: !writable,
            ..Default::default()
        };
        let server = lun::NbdServer::bind(lun, config, &lun::nbd::ListenAddr::Unix(socket.clone()))
            .with_context(|| format!("{typed}: cannot serve the session"))?;
        let shutdown = server.shutdown_handle();
        let serving = std::thread::spawn(move || {
            if let Err(e) = server.serve() {
                tracing::warn!(session = %typed, error = %e, "serving a session stopped");
            }
        });
        let served = SessionSocket { socket, writable };
        servers.insert(
            name.to_string(),
            ServedSession {
                socket: served.clone(),
                lun: served_lun,
                shutdown,
                serving: Some(serving),
            },
        );
        Ok(served)
    }

    fn session_compare_and_write(
        &self,
        name: &str,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> anyhow::Result<Reply> {
        let typed = format!("{}@{name}", self.spec.typed);
        if expected.len() != new.len() {
            bail!(
                "{typed}: compare-and-write of {} bytes against {} expected",
                new.len(),
                expected.len()
            );
        }
        // Held across the read and the write: every compare-and-write of the session's
        // users comes here.
        let servers = self
            .session_servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let lun = servers
            .get(name)
            .map(|s| s.lun.clone())
            .with_context(|| format!("{typed}: not served by this process"))?;
        let mut current = vec![0u8; expected.len()];
        lun.read_at(&mut current, offset)?;
        if current != expected {
            return Ok(Reply {
                miscompare: Some(current),
                ..Reply::done(String::new())
            });
        }
        lun.write_at(new, offset)?;
        Ok(Reply::done(String::new()))
    }

    fn need_engine(&self) -> anyhow::Result<Arc<Snapshots>> {
        self.engine().with_context(|| {
            format!(
                "{}: has no snapshot pool (no session was ever taken)",
                self.spec.typed
            )
        })
    }

    /// The engine, made on the LUN's default pool if it has none.
    pub fn ensure_pool(&self) -> anyhow::Result<Arc<Snapshots>> {
        self.ensure_engine(None, None, None)
    }

    /// The engine, made on a new pool at the first session.
    fn ensure_engine(
        &self,
        pool: Option<&str>,
        pool_size: Option<u64>,
        chunk: Option<u32>,
    ) -> anyhow::Result<Arc<Snapshots>> {
        let lun = &self.spec.typed;
        let mut slot = self.engine.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(snaps) = slot.as_ref() {
            let have = lunspec::existing_pool(&self.spec)?.unwrap_or_default();
            if let Some(named) = pool
                && Spec::parse(named).source != Spec::parse(&have).source
            {
                bail!(
                    "{lun}: its snapshot pool is {have}; naming another pool ({named}) is refused"
                );
            }
            if let Some(chunk) = chunk
                && chunk != snaps.usage().chunk_size
            {
                bail!(
                    "{lun}: its pool {have} has {}-byte chunks; the chunk size is chosen at the first session only",
                    snaps.usage().chunk_size
                );
            }
            return Ok(snaps.clone());
        }
        let location = match pool {
            Some(p) => p.to_string(),
            None => lunspec::pool_location(&self.spec)?.with_context(|| {
                format!("{lun}: not a file, so its first session needs --pool POOL (a file, a block device or an nbd:// URL)")
            })?,
        };
        let _alone = lunspec::Users::alone(&self.spec, self.users.as_ref())?;
        let created = match lun::LunSpec::parse(&location) {
            Ok(lun::LunSpec::Path(path)) if !path.exists() => Some(path),
            _ => None,
        };
        let make = || -> anyhow::Result<Snapshots> {
            let size = pool_size.unwrap_or_else(|| default_pool_size(self.source.size()));
            let pool_lun = lun::open(
                &location,
                &lun::OpenOptions {
                    create_size: created.is_some().then_some(size),
                    ..Default::default()
                },
            )
            .with_context(|| format!("{location}: cannot open the pool"))?;
            let options = PoolOptions {
                chunk_size: chunk.unwrap_or(snapshot::DEFAULT_CHUNK_SIZE),
            };
            let snaps = Snapshots::create(self.source.clone(), pool_lun, options)
                .with_context(|| format!("{lun}: cannot make {location} its snapshot pool"))?;
            lunspec::record_pool(&self.spec, &location)?;
            Ok(snaps)
        };
        let snaps = match make() {
            Ok(snaps) => Arc::new(snaps),
            Err(e) => {
                if let Some(path) = &created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };
        if let Some(switch) = &self.switch {
            let view: Arc<dyn Lun> = snaps.source();
            switch
                .switch(|_| Ok::<_, std::convert::Infallible>(view))
                .map_err(|e| {
                    anyhow::anyhow!("{lun}: cannot put the snapshot engine under the export: {e}")
                })?;
            tracing::info!(lun = %lun, pool = %location, "snapshot engine now under the export");
        }
        *slot = Some(snaps.clone());
        Ok(snaps)
    }

    fn listing(&self) -> anyhow::Result<Listing> {
        let pool = lunspec::existing_pool(&self.spec)?;
        let mut listing = Listing {
            lun: self.spec.typed.clone(),
            pool,
            chunk_size: 0,
            pool_used_chunks: 0,
            pool_total_chunks: 0,
            sessions: Vec::new(),
            rollback: None,
            served_by: self.user.as_ref().map(|_| std::process::id()),
        };
        let Some(snaps) = self.engine() else {
            return Ok(listing);
        };
        let usage = snaps.usage();
        listing.chunk_size = usage.chunk_size;
        listing.pool_used_chunks = usage.used;
        listing.pool_total_chunks = usage.total;
        listing.sessions = session_entries(snaps.list());
        listing.rollback = snaps.rollback_progress().map(|p| RollbackEntry {
            session: p.session,
            done_chunks: p.done,
            total_chunks: p.total,
        });
        Ok(listing)
    }

    /// Answers control connections until the process ends.
    pub fn serve(self: Arc<Self>, listener: UnixListener) {
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let reply = match read_request(&stream) {
                    Ok(request) => self.handle(&request),
                    Err(e) => Reply {
                        message: format!("{e:#}"),
                        ok: false,
                        listing: None,
                        session: None,
                        clone: None,
                        miscompare: None,
                    },
                };
                let mut line = serde_json::to_vec(&reply).unwrap_or_default();
                line.push(b'\n');
                let _ = (&stream).write_all(&line);
            }
        });
    }
}

fn read_request(stream: &UnixStream) -> anyhow::Result<Request> {
    stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
    stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(line.trim()).with_context(|| format!("bad control request {line:?}"))
}

/// A fifth of the LUN, in whole MiB, at least 4 MiB: room for the chunks a typical
/// interval between sessions rewrites; `--pool-size` when a LUN rewrites more.
pub fn default_pool_size(source: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    source.div_ceil(5).div_ceil(MIB).max(4) * MIB
}

/// Sessions as `snapshot list` shows them, for whole LUNs and virtual disks alike.
pub fn session_entries(sessions: Vec<snapshot::SessionInfo>) -> Vec<SessionEntry> {
    sessions
        .into_iter()
        .map(|s| SessionEntry {
            name: s.name,
            created_unix: s.created_unix,
            state: match s.state {
                SessionState::Valid => "valid",
                SessionState::Invalid => "invalid",
            }
            .to_string(),
            writable: s.writable,
            chunks: s.chunks_in_pool,
            group: s.group.map(|g| format!("{g:016x}")),
        })
        .collect()
}

pub fn print_listing(l: &Listing) -> anyhow::Result<()> {
    let Some(pool) = &l.pool else {
        return outln!("{}: no snapshot pool, no sessions", l.lun);
    };
    let chunk = u64::from(l.chunk_size);
    outln!(
        "{}: pool {pool}, {} of {} chunks used ({} MiB of {} MiB), {} left",
        l.lun,
        l.pool_used_chunks,
        l.pool_total_chunks,
        (l.pool_used_chunks * chunk) >> 20,
        (l.pool_total_chunks * chunk) >> 20,
        l.pool_total_chunks - l.pool_used_chunks,
    )?;
    if let Some(pid) = l.served_by {
        outln!("served by pid {pid}, which holds the LUN")?;
    }
    if let Some(r) = &l.rollback {
        outln!(
            "rolling back to {}: {} of {} chunks",
            r.session,
            r.done_chunks,
            r.total_chunks
        )?;
    }
    outln!(
        "{:<24} {:<20} {:<8} {:<9} {:>8}",
        "NAME",
        "CREATED (UTC)",
        "STATE",
        "WRITABLE",
        "CHUNKS"
    )?;
    for s in &l.sessions {
        outln!(
            "{:<24} {:<20} {:<8} {:<9} {:>8}",
            s.name,
            super::utc_time(i128::from(s.created_unix) * 1_000_000_000),
            s.state,
            if s.writable { "yes" } else { "no" },
            s.chunks
        )?;
    }
    Ok(())
}

/// Starts `vapp snapshot resume LUN` in the background: it holds the LUN while the copy back
/// runs and answers `snapshot list` with its progress.
fn spawn_resume(spec: &Spec) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the vapp executable")?;
    std::process::Command::new(exe)
        .args(["snapshot", "resume", &spec.source])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("{}: cannot start the background rollback", spec.typed))?;
    Ok(())
}

fn resume(typed: &str) -> anyhow::Result<ExitCode> {
    let spec = Spec::parse(typed);
    let mut claim = match Claim::take(&spec)? {
        Ok(claim) => claim,
        // Someone else opened it meanwhile: opening the engine resumed the rollback there.
        Err(_) => return Ok(ExitCode::SUCCESS),
    };
    let source = lunspec::open_raw(&spec.source, false)?;
    let service = Arc::new(Service::open(spec.clone(), source, None)?);
    let listener = claim.listen()?;
    let snaps = service.engine();
    service.serve(listener);
    if let Some(snaps) = snaps {
        snaps
            .wait_rollback()
            .with_context(|| format!("{}: rollback failed", spec.typed))?;
    }
    drop(claim);
    Ok(ExitCode::SUCCESS)
}

/// `vapp export LUN`: serves the LUN through a [`SwitchLun`], over the engine when it has a
/// pool, and takes snapshot commands on its control socket while it serves.
pub fn export(
    typed: &str,
    read_only: bool,
    serve: impl FnOnce(Arc<dyn Lun>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let spec = Spec::parse(typed);
    // A clone is written through its source's engine, which logs the writes for the next sync.
    let clone = spec.session.is_none() && super::clone::lookup(&spec)?.is_some();
    if spec.session.is_some() || read_only || clone {
        return serve(lunspec::open(typed, !read_only)?);
    }
    let mut claim = match Claim::take(&spec)? {
        Ok(claim) => {
            super::replica::refuse_write_without_daemon(&spec)?;
            claim
        }
        // Another process serves a LUN without snapshots: this one serves it too, as any
        // direct writer, and the first snapshot waits until it is alone.
        Err(_) if lunspec::existing_pool(&spec)?.is_none() => {
            return serve(lunspec::open(typed, true)?);
        }
        // A replicated LUN is served through its replication daemon (or refused by it).
        Err(holder) if holder.writers.is_some() || holder.refuse.is_some() => {
            return serve(lunspec::open(typed, true)?);
        }
        Err(holder) => bail!("cannot export {typed}: {}", holder.refusal(&spec.typed)),
    };
    let users = match lunspec::existing_pool(&spec)? {
        None => Some(lunspec::Users::shared(&spec)?),
        Some(_) => None,
    };
    let source = lunspec::open_raw(&spec.source, false)?;
    let service = Service::open(spec.clone(), source.clone(), None)?;
    let below: Arc<dyn Lun> = match service.engine() {
        Some(snaps) => snaps.source(),
        None => source,
    };
    let switch = Arc::new(SwitchLun::new(below));
    let service = Arc::new(Service {
        switch: Some(switch.clone()),
        user: Some(InUse {
            who: "vapp export".into(),
            advice: "stop the export (disconnect its clients first)".into(),
        }),
        users,
        ..service
    });
    let listener = claim.listen()?;
    service.serve(listener);
    let served = serve(switch);
    drop(claim);
    served
}

#[derive(Debug, Serialize, Deserialize)]
struct Group {
    members: Vec<String>,
}

fn group_path(group: &str) -> anyhow::Result<std::path::PathBuf> {
    let ok = !group.is_empty()
        && group.len() <= 64
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        bail!("bad group name {group:?}: use letters, digits, '-', '_' or '.'");
    }
    Ok(lunspec::state_dir()
        .join("groups")
        .join(format!("{group}.toml")))
}

fn group_create(args: GroupCreateArgs) -> anyhow::Result<ExitCode> {
    let path = group_path(&args.group)?;
    if path.exists() {
        bail!("group {}: already defined ({})", args.group, path.display());
    }
    let mut members: Vec<String> = Vec::new();
    for typed in &args.luns {
        let spec = Spec::parse(typed);
        if spec.session.is_some() {
            bail!("group {}: {typed} is a session, not a LUN", args.group);
        }
        lunspec::open_raw(&spec.source, true)
            .with_context(|| format!("group {}: member {typed}", args.group))?;
        if members.contains(&spec.source) {
            bail!("group {}: {typed} is listed twice", args.group);
        }
        members.push(spec.source);
    }
    lunspec::write_toml(&path, &Group { members })?;
    outln!("group {}: {} members", args.group, args.luns.len())?;
    Ok(ExitCode::SUCCESS)
}

fn group_snapshot(args: GroupSnapshotArgs) -> anyhow::Result<ExitCode> {
    let path = group_path(&args.group)?;
    let group: Group = lunspec::read_toml(&path)?
        .with_context(|| format!("no group {} on this host", args.group))?;
    let mut claims = Vec::new();
    let mut engines = Vec::new();
    for member in &group.members {
        let spec = Spec::parse(member);
        let claim = match Claim::take(&spec)? {
            Ok(claim) => claim,
            Err(holder) => bail!(
                "group {}: member {}; a group snapshot of a LUN another process serves is not supported yet",
                args.group,
                holder.refusal(member)
            ),
        };
        let source = lunspec::open_raw(&spec.source, false)?;
        let service = Service::open(spec, source, None)?;
        engines.push(service.ensure_pool()?);
        claims.push(claim);
    }
    let members: Vec<&Snapshots> = engines.iter().map(AsRef::as_ref).collect();
    snapshot::create_group_session(&members, &args.name, false)
        .with_context(|| format!("group {}: cannot take session {:?}", args.group, args.name))?;
    for member in &group.members {
        outln!("{member}@{}: session taken", args.name)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn fsck(args: FsckArgs) -> anyhow::Result<ExitCode> {
    let pool = lunspec::open_raw(&args.pool, true)?;
    let report = snapshot::fsck(pool.as_ref())
        .with_context(|| format!("{}: cannot check the pool", args.pool))?;
    if args.json {
        let value = serde_json::json!({
            "pool": args.pool,
            "source": report.source,
            "sessions": report.sessions,
            "invalid_sessions": report.invalid_sessions,
            "used_slots": report.used_slots,
            "total_slots": report.total_slots,
            "rollback_in_progress": report.rollback_in_progress,
            "problems": report.problems,
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        outln!(
            "{}: pool of {}: {} sessions ({} invalid), {} of {} slots used{}",
            args.pool,
            report.source,
            report.sessions,
            report.invalid_sessions,
            report.used_slots,
            report.total_slots,
            if report.rollback_in_progress {
                ", rollback in progress"
            } else {
                ""
            }
        )?;
        for p in &report.problems {
            outln!("problem: {p}")?;
        }
        outln!(
            "{}",
            if report.is_clean() {
                "clean"
            } else {
                "PROBLEMS FOUND"
            }
        )?;
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A progress bar on a terminal, nothing otherwise.
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} chunks {eta}")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pool_is_a_fifth_at_least_4m() {
        assert_eq!(default_pool_size(1 << 20), 4 << 20);
        assert_eq!(default_pool_size(64 << 20), 13 << 20);
    }
}
