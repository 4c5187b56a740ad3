//! `vapp replica`: two-site replication of a LUN, run by one daemon per replicated LUN.
//!
//! `create` records the link in this host's registry (`$VAPP_STATE_DIR/replicas/<key>.toml`),
//! formats the replication metadata and starts the daemon (`vapp replica run LUN`, detached,
//! logging to `replicas/<key>.log` beside the entry). Every other command talks to the
//! daemon on its control socket (`$VAPP_RUNTIME_DIR/replicas/<key>.sock`, one JSON line
//! each way) or, for a daemon that is not running, works on the registry alone. The daemon
//! itself is [`crate::replica_daemon`].

use std::fs;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use lun::Lun;
use replication::{Geometry, PrimaryLun, Secondary, TcpPeer};
use serde::{Deserialize, Serialize};

use crate::lunspec::{self, Claim, Spec};
use crate::outln;

#[derive(Subcommand)]
pub enum ReplicaCommand {
    /// Replicate a LUN to another site and start its daemon.
    Create(CreateArgs),
    /// Show the replicas of this host (or one).
    Status(StatusArgs),
    /// Split the link on command; writes are tracked until resume.
    Fracture(LunArg),
    /// Start a daemon that is not running, or lift a fracture and resync.
    Resume(LunArg),
    /// Compare every region with the other site; mark what differs for resync.
    Verify(LunArg),
    /// Stop the daemon and remove the replication; the LUN is an ordinary LUN again.
    Delete(LunArg),
    /// Make a secondary the primary.
    Promote(PromoteArgs),
    /// Make a primary a secondary.
    Demote(DemoteArgs),
    /// End a split brain: this side loses what it wrote that the other never got.
    Resolve(ResolveArgs),
    /// The daemon, in the foreground (what create and resume start detached).
    #[command(hide = true)]
    Run(LunArg),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    Sync,
    Async,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyName {
    Continue,
    Block,
}

impl PolicyName {
    pub fn engine(self) -> replication::LinkPolicy {
        match self {
            PolicyName::Continue => replication::LinkPolicy::Continue,
            PolicyName::Block => replication::LinkPolicy::Block,
        }
    }
}

#[derive(Args)]
pub struct CreateArgs {
    /// The LUN: a file, a block device or an nbd:// URL.
    pub lun: String,
    #[arg(long, value_enum)]
    pub role: Role,
    /// Where this side connects when it is (or becomes) the primary, HOST:PORT.
    #[arg(long)]
    pub peer: String,
    /// Where this side accepts a primary when it is (or becomes) the secondary, ADDR:PORT.
    #[arg(long)]
    pub listen: String,
    /// The shared secret (both sites the same), readable by its owner only.
    #[arg(long)]
    pub secret_file: PathBuf,
    #[arg(long, value_enum, default_value = "sync")]
    pub mode: ModeName,
    /// Asynchronous mode: how often a delta set is cut.
    #[arg(long, default_value = "5s")]
    pub period: String,
    /// What a synchronous primary does when the link is lost.
    #[arg(long, value_enum, default_value = "continue")]
    pub on_link_loss: PolicyName,
    /// Replicate with the other members of this consistency group.
    #[arg(long)]
    pub group: Option<String>,
    /// The replication metadata (default for a file LUN: LUN.repl beside it).
    #[arg(long)]
    pub meta: Option<String>,
    /// Caps what this side sends, in bytes per second (K, M, G suffixes): writes,
    /// resyncs and delta sets share it.
    #[arg(long)]
    pub bandwidth_limit: Option<String>,
    /// Resyncs (the initial sync above all) skip regions whose checksum already matches
    /// the peer's: for a replica seeded from a copy. One round trip per region.
    #[arg(long)]
    pub skip_matching: bool,
}

#[derive(Args)]
pub struct LunArg {
    pub lun: String,
}

#[derive(Args)]
pub struct StatusArgs {
    pub lun: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Redraw every second.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Args)]
pub struct PromoteArgs {
    pub lun: String,
    /// Take over even while a primary is connected, or from a replica mid-resync.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct DemoteArgs {
    pub lun: String,
    /// What this side wrote that the new primary lacks is overwritten at the next resync.
    #[arg(long)]
    pub discard_local: bool,
}

#[derive(Args)]
pub struct ResolveArgs {
    pub lun: String,
    /// Required: this side's own writes are what is lost.
    #[arg(long, required = true)]
    pub discard_local: bool,
}

/// One replicated LUN in this host's registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The canonical source (a path or a URL).
    pub lun: String,
    pub role: Role,
    pub peer: String,
    pub listen: String,
    pub secret_file: PathBuf,
    pub mode: ModeName,
    pub period_ms: u64,
    pub policy: PolicyName,
    pub group: Option<String>,
    pub meta: String,
    /// The snapshot pool create made for the engine, which delete removes unless it holds
    /// sessions of the user's.
    #[serde(default)]
    pub made_pool: Option<String>,
    /// Bytes per second this side sends at most, if limited.
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
    /// Resyncs skip regions whose checksum matches the peer's.
    #[serde(default)]
    pub skip_matching: bool,
}

/// A request to a daemon, one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Fracture,
    Resume,
    Verify,
    Promote {
        force: bool,
    },
    Demote {
        discard_local: bool,
    },
    Resolve,
    Stop,
    /// A datastore's lock operation from a writer that reaches the LUN over NBD, which has
    /// no compare-and-write.
    CompareAndWrite {
        offset: u64,
        expected: Vec<u8>,
        new: Vec<u8>,
    },
    /// A secondary: take writable session `name` of every member at one point of the
    /// primary's write sequence (a DR drill's copy), replication going on.
    DrillPoint {
        name: String,
    },
    /// A secondary: ask the primary's daemon, over the link's address and secret, to stop
    /// these VMs, ship its last writes and demote itself (a planned failover); answered once
    /// the primary answered and this side checked it holds every write the primary did.
    Handover {
        /// (datastore UUID, VM folder) of each VM the plan protects on this replica.
        vms: Vec<(String, String)>,
        stop_timeout_s: u64,
        force: bool,
    },
}

/// What the other site did for a [`Request::Handover`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoverJson {
    /// `demoted`, `already-secondary`, `refused`, `aborted`.
    pub outcome: String,
    pub peer: String,
    pub message: String,
    pub steps: Vec<HandoverStepJson>,
    /// How long the request took, as this side measured it.
    pub took_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoverStepJson {
    pub step: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub detail: String,
}

/// Where a [`Request::DrillPoint`] was taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointJson {
    pub mode: ModeName,
    /// When the point's data was current at the primary, ms since the Unix epoch.
    pub point_ms: u64,
    /// When the sessions were taken, ms since the Unix epoch.
    pub taken_ms: u64,
    /// A primary was connected (synchronous: every acknowledged write is in the point).
    pub connected: bool,
    pub delta_id: u64,
    /// The LUNs the sessions were taken on (a group: every member).
    pub luns: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
    #[serde(default)]
    pub status: Option<StatusJson>,
    /// For [`Request::CompareAndWrite`]: `None` when written, else what the LUN holds.
    #[serde(default)]
    pub miscompare: Option<Vec<u8>>,
    /// For [`Request::DrillPoint`].
    #[serde(default)]
    pub point: Option<PointJson>,
    /// For [`Request::Handover`].
    #[serde(default)]
    pub handover: Option<HandoverJson>,
}

impl Reply {
    pub fn done(message: String) -> Reply {
        Reply {
            ok: true,
            message,
            status: None,
            miscompare: None,
            point: None,
            handover: None,
        }
    }

    pub fn failed(message: String) -> Reply {
        Reply {
            ok: false,
            ..Reply::done(message)
        }
    }
}

/// `replica status --json`: these field names are stable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusJson {
    pub lun: String,
    pub role: Role,
    pub running: bool,
    pub pid: Option<u32>,
    pub mode: ModeName,
    pub period_ms: u64,
    pub peer: String,
    pub listen: String,
    pub policy: PolicyName,
    /// Bytes per second this side sends at most, if limited.
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
    pub group: Option<String>,
    pub link: String,
    pub out_of_sync_bytes: u64,
    pub rpo_ms: Option<u64>,
    pub resync: ResyncJson,
    pub bytes_resynced: u64,
    pub peer_regions_discarded: u64,
    pub last_error: Option<String>,
    pub generation: GenerationJson,
    #[serde(flatten, default)]
    pub secondary: Option<SecondaryJson>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResyncJson {
    pub regions_total: u64,
    pub regions_left: u64,
    pub fraction: f64,
    pub eta_s: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerationJson {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecondaryJson {
    pub inconsistent: bool,
    pub point_in_time_ms: Option<u64>,
    pub delta_id: u64,
}

impl StatusJson {
    /// What the registry says of a replica whose daemon is not running.
    pub fn offline(cfg: &Config) -> StatusJson {
        StatusJson {
            lun: cfg.lun.clone(),
            role: cfg.role,
            running: false,
            pid: None,
            mode: cfg.mode,
            period_ms: cfg.period_ms,
            peer: cfg.peer.clone(),
            listen: cfg.listen.clone(),
            policy: cfg.policy,
            bandwidth_limit: cfg.bandwidth_limit,
            group: cfg.group.clone(),
            link: match cfg.role {
                Role::Primary => "disconnected",
                Role::Secondary => "waiting",
            }
            .into(),
            out_of_sync_bytes: 0,
            rpo_ms: None,
            resync: ResyncJson {
                fraction: 1.0,
                ..ResyncJson::default()
            },
            bytes_resynced: 0,
            peer_regions_discarded: 0,
            last_error: Some("the daemon is not running; vapp replica resume starts it".into()),
            generation: GenerationJson::default(),
            secondary: None,
        }
    }
}

fn replicas_dir() -> PathBuf {
    lunspec::state_dir().join("replicas")
}

pub fn config_path(spec: &Spec) -> PathBuf {
    replicas_dir().join(format!("{}.toml", spec.key()))
}

pub fn log_path(spec: &Spec) -> PathBuf {
    replicas_dir().join(format!("{}.log", spec.key()))
}

pub fn control_path(spec: &Spec) -> PathBuf {
    crate::cmd::vm::runtime::runtime_root()
        .join("replicas")
        .join(format!("{}.sock", spec.key()))
}

pub fn load(spec: &Spec) -> anyhow::Result<Option<Config>> {
    lunspec::read_toml(&config_path(spec))
}

pub fn save(spec: &Spec, cfg: &Config) -> anyhow::Result<()> {
    lunspec::write_toml(&config_path(spec), cfg)
}

/// The replica of `typed` in this host's registry, or an error saying it has none.
fn configured(typed: &str) -> anyhow::Result<(Spec, Config)> {
    let spec = Spec::parse(typed);
    match load(&spec)? {
        Some(cfg) => Ok((spec, cfg)),
        None => bail!("{typed}: not replicated on this host (vapp replica create makes a replica)"),
    }
}

/// Refuses to write a replicated LUN around its daemon: with the daemon gone, a write
/// would reach neither the other site nor the dirty bitmap.
pub fn refuse_write_without_daemon(spec: &Spec) -> anyhow::Result<()> {
    if let Some(cfg) = load(spec)? {
        let what = match cfg.role {
            Role::Primary => "a replication primary",
            Role::Secondary => "a replication secondary",
        };
        bail!(
            "{}: {what} whose daemon is not running, so it cannot be written now; \
             vapp replica resume {} starts it",
            spec.typed,
            spec.typed
        );
    }
    Ok(())
}

/// Reads the shared secret, refusing a file others could read (as ssh does with keys).
pub fn read_secret_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let meta = fs::metadata(path)
        .with_context(|| format!("secret file {}: cannot read it", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        bail!(
            "secret file {}: owned by uid {}, not by you (uid {me}); it must be yours alone",
            path.display(),
            meta.uid()
        );
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!(
            "secret file {}: mode {mode:04o} lets others read it; chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    Ok(replication::read_secret(path)?)
}

/// Resolves `HOST:PORT` to the first address it names.
pub fn resolve(addr: &str, what: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("{what} {addr:?}: not an address (HOST:PORT, e.g. 10.0.0.2:7788)"))
}

/// A replicated LUN as its other writers see it: its primary daemon's NBD export, with the
/// reach and identity of the LUN itself (the daemon's writes land there, so a datastore on
/// it is the original, not a copy) and compare-and-write done by the daemon.
#[derive(Debug)]
pub struct Routed {
    inner: lun::NbdLun,
    spec: Spec,
    reach: lun::Reach,
    identity: Option<lun::LunIdentity>,
}

impl Routed {
    pub fn new(spec: &Spec, inner: lun::NbdLun) -> anyhow::Result<Routed> {
        // Read-only: the daemon is the only writer.
        let probe = lunspec::open_raw(&spec.source, true)?;
        Ok(Routed {
            inner,
            spec: spec.clone(),
            reach: probe.reach(),
            identity: probe.identity(),
        })
    }
}

impl Lun for Routed {
    /// The LUN as the user named it, not the daemon's private socket: errors and
    /// advice (`datastore resignature LUN`) name what the user can act on.
    fn name(&self) -> &str {
        &self.spec.typed
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
    fn identity(&self) -> Option<lun::LunIdentity> {
        self.identity.clone()
    }
    /// Every writer of the LUN goes through the daemon, whose lock makes the read, compare
    /// and write one step: it excludes this machine's processes, as the snapshot engine's.
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
        let request = Request::CompareAndWrite {
            offset,
            expected: expected.to_vec(),
            new: new.to_vec(),
        };
        let failed = |reason: String| lun::LunError::Disconnected {
            lun: self.name().to_string(),
            reason,
        };
        let reply = ask(&self.spec, &request).map_err(|e| failed(format!("{e:#}")))?;
        if !reply.ok {
            return Err(failed(reply.message));
        }
        Ok(match reply.miscompare {
            None => lun::CompareAndWrite::Written,
            Some(current) => lun::CompareAndWrite::Miscompare(current),
        })
    }
}

/// Sends `request` to the daemon of `spec`; an error when none answers.
/// What a handover may take beyond its VMs' stop timeout: a forced stop, the wait for their
/// locks, the final sync and the demote.
pub const HANDOVER_SLACK_S: u64 = 120;

pub fn ask(spec: &Spec, request: &Request) -> anyhow::Result<Reply> {
    let path = control_path(spec);
    let stream = UnixStream::connect(&path)
        .with_context(|| format!("{}: its replication daemon is not running", spec.typed))?;
    // A verify reads the whole LUN at both sites.
    let limit = match request {
        Request::Verify => None,
        // The other site shuts its VMs down first.
        Request::Handover { stop_timeout_s, .. } => Some(Duration::from_secs(
            stop_timeout_s
                .saturating_mul(2)
                .saturating_add(HANDOVER_SLACK_S),
        )),
        _ => Some(Duration::from_secs(60)),
    };
    stream.set_read_timeout(limit)?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream)
        .write_all(&line)
        .with_context(|| format!("{}: asking its replication daemon", spec.typed))?;
    let mut answer = String::new();
    let n = BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("{}: no answer from its replication daemon", spec.typed))?;
    if n == 0 {
        bail!(
            "{}: its replication daemon closed without answering",
            spec.typed
        );
    }
    serde_json::from_str(answer.trim())
        .with_context(|| format!("{}: bad answer from its daemon: {answer:?}", spec.typed))
}

fn ask_ok(spec: &Spec, request: &Request) -> anyhow::Result<Reply> {
    let reply = ask(spec, request)?;
    if !reply.ok {
        bail!("{}", reply.message);
    }
    Ok(reply)
}

pub fn run(command: ReplicaCommand) -> anyhow::Result<ExitCode> {
    match command {
        ReplicaCommand::Create(args) => create(args),
        ReplicaCommand::Status(args) => status(args),
        ReplicaCommand::Fracture(a) => simple(&a.lun, Request::Fracture),
        ReplicaCommand::Resume(a) => resume(&a.lun),
        ReplicaCommand::Verify(a) => simple(&a.lun, Request::Verify),
        ReplicaCommand::Delete(a) => delete(&a.lun),
        ReplicaCommand::Promote(a) => change_role(&a.lun, Request::Promote { force: a.force }),
        ReplicaCommand::Demote(a) => change_role(
            &a.lun,
            Request::Demote {
                discard_local: a.discard_local,
            },
        ),
        // clap requires --discard-local: the flag is the operator saying what is lost.
        ReplicaCommand::Resolve(a) => simple(&a.lun, Request::Resolve),
        ReplicaCommand::Run(a) => crate::replica_daemon::run(&a.lun),
    }
}

/// Files a failed create made, removed unless it succeeds.
struct Undo {
    files: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.armed {
            for f in &self.files {
                let _ = fs::remove_file(f);
            }
        }
    }
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let typed = args.lun.as_str();
    let spec = Spec::parse(typed);
    if let Some(s) = &spec.session {
        bail!("{typed}: replicate the source LUN, not its snapshot session {s:?}");
    }
    let mut running_group = None;
    if let Some(group) = &args.group {
        for (member, cfg) in group_members(group)? {
            if cfg.role != args.role || cfg.mode != args.mode {
                bail!(
                    "{typed}: group {group} holds {} as a {:?} in {:?} mode; every member \
                     of a group has one role and one mode",
                    member.typed,
                    cfg.role,
                    cfg.mode
                );
            }
            if running_group.is_none() && ask(&member, &Request::Status).is_ok() {
                running_group = Some(member);
            }
        }
    }
    if let Some(cfg) = load(&spec)? {
        bail!(
            "{typed}: already replicated ({} of {}); vapp replica delete {typed} first",
            match cfg.role {
                Role::Primary => "primary",
                Role::Secondary => "secondary",
            },
            cfg.peer
        );
    }
    let secret_file = fs::canonicalize(&args.secret_file)
        .with_context(|| format!("secret file {}: cannot read it", args.secret_file.display()))?;
    let secret = read_secret_file(&secret_file)?;
    let peer = resolve(&args.peer, "--peer")?;
    resolve(&args.listen, "--listen")?;
    let period = super::datastore::parse_duration(&args.period)?;
    if period.is_zero() {
        bail!("--period {}: must be above zero", args.period);
    }
    let bandwidth_limit = match &args.bandwidth_limit {
        Some(text) => match super::datastore::parse_size(text)? {
            0 => bail!("--bandwidth-limit {text}: must be above zero"),
            n => Some(n),
        },
        None => None,
    };

    // This process is the LUN's only user while the link is set up.
    let claim = match Claim::take(&spec)? {
        Ok(claim) => claim,
        Err(holder) => bail!(
            "{typed}: in use by `vapp {}` (pid {}); stop it before replicating the LUN",
            holder.command,
            holder.pid
        ),
    };
    let writers = lunspec::Users::alone(&spec, None).map_err(|_| {
        anyhow::anyhow!(
            "{typed}: another vapp process writes it (a mount, an export or a command on it); \
             stop it before replicating the LUN"
        )
    })?;
    drop(writers);
    let raw = lunspec::open_raw(&spec.source, false)?;
    let needed = replication::metadata_size(raw.size(), Geometry::default());
    let meta_location = match &args.meta {
        Some(m) => m.clone(),
        None if spec.is_file() => format!("{}.repl", spec.source),
        None => bail!(
            "{typed}: not a file, so its replication metadata needs --meta PATH \
             (a file or a device of {needed} bytes or more)"
        ),
    };
    let new_meta = match lun::LunSpec::parse(&meta_location) {
        Ok(lun::LunSpec::Path(path)) if !path.exists() => Some(path),
        _ => None,
    };
    if new_meta.is_none() {
        let existing = lunspec::open_raw(&meta_location, true)?;
        if existing.size() < needed {
            bail!(
                "--meta {meta_location}: {} bytes is too small; a LUN of {} bytes needs {needed}",
                existing.size(),
                raw.size()
            );
        }
    }

    let mut undo = Undo {
        files: Vec::new(),
        armed: true,
    };
    // Snapshots the engine needs: the secondary's pre-resync and gold copies, and the
    // delta sets of an asynchronous primary.
    let needs_pool = args.mode == ModeName::Async || args.role == Role::Secondary;
    let mut made_pool = None;
    if needs_pool && lunspec::existing_pool(&spec)?.is_none() {
        if spec.is_file() {
            let location = snapshot::pool_beside(Path::new(&spec.source));
            undo.files.push(location.clone());
            made_pool = Some(location.display().to_string());
            // Room for every chunk of the LUN plus the pool's own tables (a sparse file):
            // a resync or a delta set may rewrite all of it while its snapshot is kept,
            // and a full pool would give that snapshot up, the very copy that protects
            // the replica meanwhile.
            let pool = lun::open(
                &location.display().to_string(),
                &lun::OpenOptions {
                    create_size: Some(raw.size() + raw.size() / 32 + (4 << 20)),
                    ..Default::default()
                },
            )
            .with_context(|| format!("{}: cannot make the pool", location.display()))?;
            snapshot::Snapshots::create(raw.clone(), pool, snapshot::PoolOptions::default())
                .with_context(|| format!("{typed}: cannot make its snapshot pool"))?;
        } else if args.mode == ModeName::Async {
            bail!(
                "{typed}: asynchronous mode needs a snapshot pool (its delta sets are snapshot \
                 sessions); vapp snapshot create {typed} NAME --pool POOL makes one"
            );
        }
    }
    let meta = lun::open(
        &meta_location,
        &lun::OpenOptions {
            create_size: new_meta.as_ref().map(|_| needed),
            ..Default::default()
        },
    )
    .with_context(|| format!("--meta {meta_location}: cannot open it"))?;
    if let Some(path) = new_meta {
        undo.files.push(path);
    }
    let meta: Arc<dyn Lun> = Arc::new(meta);
    match args.role {
        Role::Primary => {
            PrimaryLun::create(
                raw.clone(),
                meta,
                Box::new(TcpPeer::new(peer, secret)),
                Geometry::default(),
                args.on_link_loss.engine(),
            )
            .with_context(|| format!("{typed}: cannot format {meta_location}"))?;
        }
        Role::Secondary => {
            Secondary::create(raw.clone(), meta, None, Geometry::default())
                .with_context(|| format!("{typed}: cannot format {meta_location}"))?;
        }
    }
    drop(raw);
    let cfg = Config {
        lun: spec.source.clone(),
        role: args.role,
        peer: args.peer.clone(),
        listen: args.listen.clone(),
        secret_file,
        mode: args.mode,
        period_ms: period.as_millis() as u64,
        policy: args.on_link_loss,
        group: args.group.clone(),
        meta: meta_location,
        made_pool,
        bandwidth_limit,
        skip_matching: args.skip_matching,
    };
    save(&spec, &cfg)?;
    undo.files.push(config_path(&spec));
    undo.files.push(log_path(&spec));
    drop(claim);
    // A group runs in one daemon: the running one restarts with the new member.
    if let Some(member) = &running_group {
        stop_daemon(member)?;
    }
    let pid = match start_daemon(&spec) {
        Ok(pid) => pid,
        Err(e) => {
            // The group goes on as it was.
            drop(undo);
            if let Some(member) = &running_group
                && let Err(again) = start_daemon(member)
            {
                tracing::warn!(
                    error = format!("{again:#}"),
                    "cannot restart the group's daemon"
                );
            }
            return Err(e);
        }
    };
    undo.armed = false;
    let what = match cfg.role {
        Role::Primary => format!("primary, replicating to {}", cfg.peer),
        Role::Secondary => format!("secondary, taking its primary on {}", cfg.listen),
    };
    outln!("{typed}: replication {what}; daemon pid {pid}")?;
    Ok(ExitCode::SUCCESS)
}

/// Starts the daemon of `spec` detached (its own session, so it outlives this command and
/// its terminal) and waits until it answers, or returns its error.
pub fn start_daemon(spec: &Spec) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let log_path = log_path(spec);
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find the vapp executable")?;
    let mut command = std::process::Command::new(exe);
    command
        .args(["replica", "run", &spec.source])
        .env_remove("VAPP_DATASTORE")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if std::env::var_os("VAPP_LOG").is_none() {
        command.env("VAPP_LOG", "info");
    }
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("{}: cannot start the replication daemon", spec.typed))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            let why = last_error(&log_path, start)
                .unwrap_or_else(|| format!("it exited ({status}); see {}", log_path.display()));
            bail!("{why}");
        }
        if ask(spec, &Request::Status).is_ok_and(|r| r.ok) {
            return Ok(child.id());
        }
        if Instant::now() > deadline {
            bail!(
                "{}: the replication daemon (pid {}) did not answer within 30 s; see {}",
                spec.typed,
                child.id(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's fatal error: the last `vapp:` line it logged after `start`.
fn last_error(log: &Path, start: u64) -> Option<String> {
    let text = fs::read(log).ok()?;
    let tail = String::from_utf8_lossy(text.get(start as usize..)?).into_owned();
    tail.lines()
        .rev()
        .find_map(|l| l.strip_prefix("vapp: "))
        .map(str::to_string)
}

fn simple(typed: &str, request: Request) -> anyhow::Result<ExitCode> {
    let (spec, _) = configured(typed)?;
    let reply = ask_ok(&spec, &request)?;
    outln!("{}", reply.message)?;
    Ok(ExitCode::SUCCESS)
}

fn resume(typed: &str) -> anyhow::Result<ExitCode> {
    let (spec, _) = configured(typed)?;
    match ask(&spec, &Request::Resume) {
        Ok(reply) if reply.ok => outln!("{}", reply.message)?,
        Ok(reply) => bail!("{}", reply.message),
        Err(_) => {
            let pid = start_daemon(&spec)?;
            outln!("{typed}: replication daemon started (pid {pid})")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Promote and demote: the daemon changes the role and restarts itself in it; this waits
/// until it answers in the new role.
fn change_role(typed: &str, request: Request) -> anyhow::Result<ExitCode> {
    let (spec, _) = configured(typed)?;
    let want = match request {
        Request::Promote { .. } => Role::Primary,
        _ => Role::Secondary,
    };
    let reply = ask_ok(&spec, &request)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = ask(&spec, &Request::Status)
            && let Some(s) = r.status
            && s.role == want
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{typed}: the daemon did not come back in its new role within 30 s; see {}",
                log_path(&spec).display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    outln!("{}", reply.message)?;
    Ok(ExitCode::SUCCESS)
}

/// Stops the daemon serving `spec` (and its group) and waits until it let go of the LUN;
/// true if one was running.
fn stop_daemon(spec: &Spec) -> anyhow::Result<bool> {
    let Some(pid) = ask(spec, &Request::Status)
        .ok()
        .and_then(|r| r.status)
        .and_then(|s| s.pid)
    else {
        return Ok(false);
    };
    let reply = ask(spec, &Request::Stop)?;
    if !reply.ok {
        bail!("{}", reply.message);
    }
    // The claims go together when the daemon has closed every link, just before it exits
    // (a zombie holds no lock).
    let deadline = Instant::now() + Duration::from_secs(60);
    while Claim::holder(spec)?.is_some_and(|h| h.pid == pid) {
        if Instant::now() > deadline {
            bail!(
                "{}: the replication daemon did not stop within 60 s",
                spec.typed
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}

/// The members of `group` in this host's registry, in a stable order.
pub fn group_members(group: &str) -> anyhow::Result<Vec<(Spec, Config)>> {
    Ok(all_configs()?
        .into_iter()
        .filter(|c| c.group.as_deref() == Some(group))
        .map(|c| (Spec::parse(&c.lun), c))
        .collect())
}

fn delete(typed: &str) -> anyhow::Result<ExitCode> {
    let (spec, cfg) = configured(typed)?;
    let was_running = stop_daemon(&spec)?;
    if let Ok(lun::LunSpec::Path(path)) = lun::LunSpec::parse(&cfg.meta)
        && fs::metadata(&path).is_ok_and(|m| m.is_file())
    {
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    if let Some(pool) = &cfg.made_pool {
        remove_pool_unless_used(&spec, pool);
    }
    fs::remove_file(config_path(&spec))
        .with_context(|| format!("removing {}", config_path(&spec).display()))?;
    let _ = fs::remove_file(log_path(&spec));
    // The rest of its group goes on in a daemon of its own.
    if let Some(group) = &cfg.group
        && was_running
        && let Some((rest, _)) = group_members(group)?.into_iter().next()
    {
        start_daemon(&rest)?;
    }
    outln!("{typed}: replication deleted; it is an ordinary LUN again")?;
    Ok(ExitCode::SUCCESS)
}

/// Removes the pool create made when only replication's own sessions are in it.
fn remove_pool_unless_used(spec: &Spec, pool: &str) {
    let replication_only = (|| -> anyhow::Result<bool> {
        let source = lunspec::open_raw(&spec.source, true)?;
        let snaps = snapshot::Snapshots::open(source, lunspec::open_raw(pool, false)?)?;
        Ok(snaps.list().iter().all(|s| {
            s.name.starts_with("repl-delta-")
                || s.name == replication::GOLD_SNAPSHOT
                || s.name == replication::PRE_RESYNC_SNAPSHOT
        }))
    })();
    match replication_only {
        Ok(true) => {
            if let Err(e) = fs::remove_file(pool) {
                tracing::warn!(pool, error = %e, "cannot remove the snapshot pool replication made");
            }
        }
        Ok(false) => {
            tracing::info!(
                pool,
                "the snapshot pool replication made holds sessions; kept"
            )
        }
        Err(e) => tracing::warn!(
            pool,
            error = format!("{e:#}"),
            "cannot open the snapshot pool replication made; kept"
        ),
    }
}

/// Every replica in this host's registry.
fn all_configs() -> anyhow::Result<Vec<Config>> {
    let dir = replicas_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut configs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml")
            && let Some(cfg) = lunspec::read_toml::<Config>(&path)?
        {
            configs.push(cfg);
        }
    }
    configs.sort_by(|a, b| a.lun.cmp(&b.lun));
    Ok(configs)
}

fn status_of(cfg: &Config) -> StatusJson {
    let spec = Spec::parse(&cfg.lun);
    match ask(&spec, &Request::Status) {
        Ok(Reply {
            ok: true,
            status: Some(s),
            ..
        }) => s,
        _ => {
            let mut s = StatusJson::offline(cfg);
            // The metadata says how far apart the sites are, even with the daemon down.
            let meta = lunspec::open_raw(&cfg.meta, true)
                .and_then(|m| Ok(replication::offline_status(m)?));
            if let Ok(m) = meta {
                s.generation = GenerationJson {
                    current: m.gens.current,
                    bitmap: m.gens.bitmap,
                    history: m.gens.history,
                };
                if m.primary {
                    s.out_of_sync_bytes = m.bytes_waiting;
                    if m.fractured {
                        s.link = "fractured".into();
                    }
                } else {
                    s.secondary = Some(SecondaryJson {
                        inconsistent: m.inconsistent,
                        point_in_time_ms: (m.delta_cut_ms > 0).then_some(m.delta_cut_ms),
                        delta_id: m.delta_id,
                    });
                }
            }
            s
        }
    }
}

fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let configs = match &args.lun {
        Some(typed) => vec![configured(typed)?.1],
        None => all_configs()?,
    };
    loop {
        let all: Vec<StatusJson> = configs.iter().map(status_of).collect();
        let text = if args.json {
            serde_json::to_string_pretty(&all)?
        } else {
            table(&all)
        };
        if args.watch && std::io::stdout().is_terminal() {
            // Home and clear, as watch(1) redraws.
            crate::cmd::print(format_args!("\x1b[H\x1b[2J"))?;
        }
        outln!("{text}")?;
        if !args.watch {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn table(all: &[StatusJson]) -> String {
    let mut out = format!(
        "{:<32} {:<9} {:<5} {:<8} {:<12} {:>11} {:>9} {:>7}  PEER",
        "LUN", "ROLE", "MODE", "RUNNING", "LINK", "OUT-OF-SYNC", "RPO", "RESYNC"
    );
    for s in all {
        let role = match s.role {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        };
        let mode = match s.mode {
            ModeName::Sync => "sync",
            ModeName::Async => "async",
        };
        let running = match s.pid {
            Some(pid) if s.running => pid.to_string(),
            _ => "no".into(),
        };
        let rpo = s
            .rpo_ms
            .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let resync = if s.link == "resyncing" {
            format!("{:.0}%", s.resync.fraction * 100.0)
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "\n{:<32} {:<9} {:<5} {:<8} {:<12} {:>11} {:>9} {:>7}  {}",
            s.lun,
            role,
            mode,
            running,
            s.link,
            bytes(s.out_of_sync_bytes),
            rpo,
            resync,
            s.peer
        ));
        if let Some(e) = &s.last_error {
            out.push_str(&format!("\n    last error: {e}"));
        }
    }
    out
}
