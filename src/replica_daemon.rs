//! `vapp replica run LUN`: the daemon of a replicated LUN (or of every member of its
//! consistency group), in the foreground.
//!
//! It holds each member LUN's claim (see [`crate::lunspec`]) for as long as it runs, so
//! nothing writes a member around it. As the primary it opens each LUN through the
//! snapshot engine when the LUN has a pool, wraps it in a [`PrimaryLun`], and serves that
//! over NBD on a private Unix socket named in the claim record: every other vapp writer
//! of the LUN (`-d LUN put`, a mount, an export, a VM) reaches it there. It keeps the link
//! up (reconnecting with backoff, resyncing in steps so writers interleave) or, in
//! asynchronous mode, cuts and ships delta sets every period. The members of a group run
//! as one [`ConsistencyGroup`]: a lost link on one fractures all, delta sets are cut at
//! one point across all, and a command on any member acts on the group. As the secondary
//! it listens for its primary and refuses every other writer. A promote or demote changes
//! the role in the registry and the daemon executes itself again, so the new role starts
//! from a clean process with the same pid. SIGTERM or SIGINT close the links cleanly (both
//! sides flushed) and exit 0.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lun::Lun;
use lun::nbd::{ExportConfig, ListenAddr, NbdServer, ShutdownHandle};
use nix::sys::signal::{SigSet, Signal};
use replication::{
    ConsistencyGroup, LinkState, Mode, PrimaryLun, Secondary, SecondaryGroup, SecondaryServer,
    TcpPeer,
};
use tracing::{info, warn};

use crate::cmd::replica::{
    self, Config, GenerationJson, ModeName, Reply, Request, ResyncJson, Role, SecondaryJson,
    StatusJson,
};
use crate::lunspec::{self, Claim, Spec};

mod handover;

/// Regions a resync copies between two looks at the writers and the control socket.
const RESYNC_STEP: u64 = 64;
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Clone)]
enum Side {
    Primary(Arc<PrimaryLun>),
    Secondary(Arc<Secondary>),
}

/// One replicated LUN of this daemon.
struct Member {
    spec: Spec,
    cfg: Mutex<Config>,
    side: Mutex<Option<Side>>,
    /// Why the last connection attempt failed; cleared when one succeeds.
    connect_error: Mutex<Option<String>>,
    /// Makes a writer's compare-and-write one step against the others'.
    compare_and_write: Mutex<()>,
    /// The link's shared secret: a handover request is sent and taken with it.
    secret: Vec<u8>,
}

struct Daemon {
    members: Vec<Arc<Member>>,
    /// The consistency group of a primary with a `--group`.
    group: Mutex<Option<Arc<ConsistencyGroup>>>,
    stop: AtomicBool,
    /// Run again in the role the registry now names (after promote or demote).
    exec: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn run(typed: &str) -> anyhow::Result<ExitCode> {
    let spec = Spec::parse(typed);
    let cfg =
        replica::load(&spec)?.with_context(|| format!("{typed}: not replicated on this host"))?;
    let configs = match &cfg.group {
        None => vec![(spec.clone(), cfg.clone())],
        Some(group) => replica::group_members(group)?,
    };
    if let Some((odd, c)) = configs.iter().find(|(_, c)| c.role != cfg.role) {
        bail!(
            "{typed}: its group member {} is a {:?}; every member of a group has one role",
            odd.typed,
            c.role
        );
    }
    // Blocked before any thread starts, so only the waiting thread below takes them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .context("cannot block SIGINT/SIGTERM for orderly shutdown")?;
    let mut claims = Vec::new();
    let mut controls = Vec::new();
    let mut secrets = Vec::new();
    for (spec, cfg) in &configs {
        let typed = &spec.typed;
        secrets.push(replica::read_secret_file(&cfg.secret_file)?);
        claims.push(match Claim::take(spec)? {
            Ok(claim) => claim,
            Err(holder) => bail!(
                "{typed}: in use by `vapp {}` (pid {}); it cannot be replicated while another \
                 process writes it",
                holder.command,
                holder.pid
            ),
        });
        drop(lunspec::Users::alone(spec, None).map_err(|_| {
            anyhow::anyhow!(
                "{typed}: another vapp process writes it directly (a mount, an export or a \
                 command on it); stop it, then vapp replica resume {typed}"
            )
        })?);
        controls.push(bind_control(spec)?);
    }
    let daemon = Arc::new(Daemon {
        members: configs
            .iter()
            .zip(&secrets)
            .map(|((spec, cfg), secret)| {
                Arc::new(Member {
                    spec: spec.clone(),
                    cfg: Mutex::new(cfg.clone()),
                    side: Mutex::new(None),
                    connect_error: Mutex::new(None),
                    compare_and_write: Mutex::new(()),
                    secret: secret.clone(),
                })
            })
            .collect(),
        group: Mutex::new(None),
        stop: AtomicBool::new(false),
        exec: AtomicBool::new(false),
    });
    {
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(signal) = signals.wait() {
                    info!(?signal, "stopping the replication daemon");
                    d.stop.store(true, Ordering::SeqCst);
                }
            })?;
    }
    {
        // A registry entry removed under a running daemon (its state directory deleted)
        // leaves it nothing to answer for.
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("registry".into())
            .spawn(move || {
                while !d.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_secs(1));
                    if let Some(m) = d
                        .members
                        .iter()
                        .find(|m| !replica::config_path(&m.spec).exists())
                    {
                        warn!(lun = %m.spec.typed, "registry entry gone; stopping");
                        d.stop.store(true, Ordering::SeqCst);
                    }
                }
            })?;
    }
    for (m, control) in daemon.members.iter().zip(controls) {
        let (d, m) = (daemon.clone(), m.clone());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve_control(&d, &m, control))?;
    }
    let ran = match cfg.role {
        Role::Primary => run_primary(&daemon, &mut claims, secrets),
        Role::Secondary => run_secondary(&daemon, &mut claims, secrets),
    };
    for m in &daemon.members {
        let _ = fs::remove_file(replica::control_path(&m.spec));
    }
    drop(claims);
    ran?;
    if daemon.exec.load(Ordering::SeqCst) {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("cannot find the vapp executable")?;
        info!(lun = %spec.typed, "restarting in the new role");
        let e = std::process::Command::new(exe)
            .args(["replica", "run", &spec.source])
            .exec();
        bail!("{typed}: cannot restart the replication daemon: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

fn bind_control(spec: &Spec) -> anyhow::Result<UnixListener> {
    let path = replica::control_path(spec);
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    // The claim makes this the only daemon of the LUN: a socket left here is a dead one's.
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))
}

/// A member's primary, served to its writers.
struct Served {
    primary: Arc<PrimaryLun>,
    shutdown: ShutdownHandle,
    serving: JoinHandle<Result<(), lun::nbd::ServeError>>,
}

fn open_primary(m: &Member, claim: &mut Claim, secret: Vec<u8>) -> anyhow::Result<Served> {
    let cfg = lock(&m.cfg).clone();
    let spec = &m.spec;
    let typed = spec.typed.as_str();
    let peer_addr = replica::resolve(&cfg.peer, "--peer")?;
    let raw = lunspec::open_raw(&spec.source, false)?;
    let meta = lunspec::open_raw(&cfg.meta, false)?;
    let mut peer = TcpPeer::new(peer_addr, secret).with_retries(1, Duration::from_millis(100));
    if let Some(limit) = cfg.bandwidth_limit {
        peer = peer.with_bandwidth_limit(limit);
    }
    let peer = Box::new(peer);
    let policy = cfg.policy.engine();
    let opened = |local: Arc<dyn Lun>, peer| {
        PrimaryLun::open(local, meta.clone(), peer, policy)
            .with_context(|| format!("{typed}: cannot open its replication metadata {}", cfg.meta))
    };
    let mut service = None;
    let primary = match (cfg.mode, lunspec::existing_pool(spec)?) {
        (ModeName::Sync, _) => {
            // Snapshot commands reach this daemon; the first one puts the engine under the
            // replicated write, as under an export.
            let snapshots = crate::cmd::snapshot::Service::open(spec.clone(), raw.clone(), None)?;
            let below = match snapshots.engine() {
                Some(snaps) => snaps.source(),
                None => raw.clone(),
            };
            let switch = Arc::new(lun::SwitchLun::new(below));
            let primary = opened(switch.clone(), peer)?;
            service = Some(
                snapshots.in_use_through(
                    switch,
                    crate::cmd::snapshot::InUse {
                        who: "vapp replica run".into(),
                        advice: "a replicated LUN is rolled back by promoting its replica or \
                             after vapp replica delete"
                            .into(),
                    },
                ),
            );
            primary
        }
        (ModeName::Async, Some(pool)) => {
            let pool_lun = lunspec::open_raw(&pool, false)?;
            let snaps = snapshot::Snapshots::open(raw.clone(), pool_lun)
                .with_context(|| format!("{typed}: cannot open its snapshot pool {pool}"))?;
            let local = snaps.source();
            let period = Duration::from_millis(cfg.period_ms);
            opened(local, peer)?
                .into_async(snaps, period)
                .with_context(|| format!("{typed}: cannot start asynchronous mode"))?
        }
        (ModeName::Async, None) => bail!(
            "{typed}: asynchronous mode needs a snapshot pool (its delta sets are snapshot \
             sessions); vapp snapshot create {typed} NAME --pool POOL makes one"
        ),
    };
    let primary = Arc::new(primary);
    primary.set_compare_before_copy(cfg.skip_matching);
    // Writers reach the LUN only through the replicated write.
    let socket = lunspec::writers_socket(spec);
    let served: Arc<dyn Lun> = primary.clone();
    let server = NbdServer::bind(
        served,
        ExportConfig::default(),
        &ListenAddr::Unix(socket.clone()),
    )
    .with_context(|| format!("{typed}: cannot serve its writers on {}", socket.display()))?;
    let shutdown = server.shutdown_handle();
    let serving = std::thread::Builder::new()
        .name("writers".into())
        .spawn(move || server.serve())?;
    claim.serve_writers(Some(socket))?;
    if let Some(service) = service {
        let listener = claim.listen()?;
        Arc::new(service).serve(listener);
    }
    *lock(&m.side) = Some(Side::Primary(primary.clone()));
    info!(lun = %typed, peer = %cfg.peer, mode = ?cfg.mode, "replication primary running");
    Ok(Served {
        primary,
        shutdown,
        serving,
    })
}

/// Connection attempts, spaced out while they fail.
struct Backoff {
    wait: Duration,
    next: Instant,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            wait: Duration::from_millis(100),
            next: Instant::now(),
        }
    }
    fn due(&self) -> bool {
        Instant::now() >= self.next
    }
    fn succeeded(&mut self) {
        self.wait = Duration::from_millis(100);
    }
    fn failed(&mut self) {
        self.next = Instant::now() + self.wait;
        self.wait = (self.wait * 2).min(MAX_BACKOFF);
    }
}

/// A peer that does not even take a TCP connection, found without the engine's lock: the
/// engine connects holding it, so its connect timeout against a silent peer (a link cut
/// by a firewall) would stall every writer. The secondary sees each probe as a connection
/// closed before the handshake, one log line per reconnect.
fn unreachable(members: &[Arc<Member>]) -> Option<replication::ReplError> {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
    for m in members {
        let peer = lock(&m.cfg).peer.clone();
        let addr = match replica::resolve(&peer, "--peer") {
            Ok(addr) => addr,
            Err(e) => {
                return Some(replication::ReplError::LinkDown {
                    peer,
                    reason: format!("{e:#}"),
                });
            }
        };
        if let Err(e) = std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            return Some(replication::ReplError::LinkDown {
                peer: format!("tcp://{addr}"),
                reason: format!("connect: {e}"),
            });
        }
    }
    None
}

fn record_connect(members: &[&Member], outcome: &replication::Result<()>) {
    for m in members {
        let mut last = lock(&m.connect_error);
        match outcome {
            Ok(()) => *last = None,
            Err(e) => {
                if last.as_deref() != Some(&e.to_string()) {
                    let cfg = lock(&m.cfg);
                    warn!(lun = %m.spec.typed, peer = %cfg.peer, error = %e, "cannot bring the replication link up; retrying");
                }
                *last = Some(e.to_string());
            }
        }
    }
}

fn run_primary(d: &Arc<Daemon>, claims: &mut [Claim], secrets: Vec<Vec<u8>>) -> anyhow::Result<()> {
    let mut served = Vec::new();
    for ((m, claim), secret) in d.members.iter().zip(claims.iter_mut()).zip(secrets) {
        served.push(open_primary(m, claim, secret)?);
    }
    let primaries: Vec<Arc<PrimaryLun>> = served.iter().map(|s| s.primary.clone()).collect();
    let first = lock(&d.members[0].cfg).clone();
    let group = match &first.group {
        Some(name) => Some(Arc::new(
            ConsistencyGroup::new(name, primaries.clone())
                .with_context(|| format!("consistency group {name}"))?,
        )),
        None => None,
    };
    *lock(&d.group) = group.clone();
    let handover = handover::listen(d);
    // Asynchronous sets are cut here rather than by the engine's own cycle, which connects
    // without first probing the peer (holding every writer up against a silent one), and a
    // group's are cut at one point across its members.
    let period = Duration::from_millis(first.period_ms);
    let mut next_cut = Instant::now() + period;
    let mut backoff = Backoff::new();
    let all: Vec<&Member> = d.members.iter().map(|m| &**m).collect();
    while !d.stop.load(Ordering::SeqCst) {
        let states: Vec<LinkState> = primaries.iter().map(|p| p.link_state()).collect();
        let fractured = states.contains(&LinkState::Fractured);
        if !fractured && states.contains(&LinkState::Disconnected) && backoff.due() {
            let outcome = match unreachable(&d.members) {
                Some(e) => Err(e),
                None => match &group {
                    Some(g) => g.connect(),
                    None => primaries[0].connect().map(drop),
                },
            };
            record_connect(&all, &outcome);
            match outcome {
                Ok(()) => {
                    info!(peer = %first.peer, "replication link up");
                    backoff.succeeded();
                }
                Err(_) => backoff.failed(),
            }
        }
        let mut resyncing = false;
        for (m, p) in d.members.iter().zip(&primaries) {
            if p.link_state() != LinkState::Resyncing {
                continue;
            }
            match p.resync_step(RESYNC_STEP) {
                // A group member that copied everything waits for the others, idle.
                Ok(r) if r.regions_left > 0 => resyncing = true,
                Ok(_) if p.link_state() != LinkState::Resyncing => {
                    info!(lun = %m.spec.typed, "resync done");
                    resyncing = true;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(lun = %m.spec.typed, error = %e, "resync step failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        if first.mode == ModeName::Async && !resyncing && Instant::now() >= next_cut {
            next_cut = Instant::now() + period;
            if primaries
                .iter()
                .all(|p| p.link_state() == LinkState::Connected)
            {
                let shipped = match &group {
                    Some(g) => g.replicate_now(),
                    None => primaries[0].replicate_now().map(drop),
                };
                if let Err(e) = shipped {
                    warn!(lun = %first.lun, group = ?first.group, error = %e, "delta set failed; retrying next period");
                }
            }
        }
        if !resyncing {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    lock(&handover).clear();
    for s in &served {
        s.shutdown.shutdown();
    }
    *lock(&d.group) = None;
    let mut closed = Ok(());
    for ((m, s), claim) in d.members.iter().zip(served).zip(claims.iter_mut()) {
        match s.serving.join() {
            Ok(Err(e)) => {
                warn!(lun = %m.spec.typed, error = %e, "serving writers ended with an error")
            }
            Err(_) => warn!(lun = %m.spec.typed, "the writers' server panicked"),
            Ok(Ok(())) => {}
        }
        claim.serve_writers(None)?;
        *lock(&m.side) = None;
        let r = s
            .primary
            .close()
            .with_context(|| format!("{}: closing the replication link", m.spec.typed));
        if closed.is_ok() {
            closed = r;
        }
        info!(lun = %m.spec.typed, "replication primary stopped");
    }
    closed
}

fn run_secondary(
    d: &Arc<Daemon>,
    claims: &mut [Claim],
    secrets: Vec<Vec<u8>>,
) -> anyhow::Result<()> {
    let mut secondaries = Vec::new();
    for m in &d.members {
        let cfg = lock(&m.cfg).clone();
        let spec = &m.spec;
        let typed = spec.typed.as_str();
        let raw = lunspec::open_raw(&spec.source, false)?;
        let meta = lunspec::open_raw(&cfg.meta, false)?;
        let snaps = match lunspec::existing_pool(spec)? {
            Some(pool) => {
                let pool_lun = lunspec::open_raw(&pool, false)?;
                Some(
                    snapshot::Snapshots::open(raw.clone(), pool_lun).with_context(|| {
                        format!("{typed}: cannot open its snapshot pool {pool}")
                    })?,
                )
            }
            None => None,
        };
        secondaries.push(Arc::new(Secondary::open(raw, meta, snaps).with_context(
            || format!("{typed}: cannot open its replication metadata {}", cfg.meta),
        )?));
    }
    // Formed before any primary is heard, so a set a crash left committed on some
    // members only is finished or undone first; kept while the members serve.
    let first = lock(&d.members[0].cfg).clone();
    let _group = match &first.group {
        Some(name) => Some(
            SecondaryGroup::new(name, secondaries.clone())
                .with_context(|| format!("consistency group {name}"))?,
        ),
        None => None,
    };
    let mut servers = Vec::new();
    for (((m, claim), secret), secondary) in d
        .members
        .iter()
        .zip(claims.iter_mut())
        .zip(secrets)
        .zip(secondaries)
    {
        let cfg = lock(&m.cfg).clone();
        let typed = m.spec.typed.as_str();
        let addr = replica::resolve(&cfg.listen, "--listen")?;
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("{typed}: cannot listen on {}", cfg.listen))?;
        servers.push(
            SecondaryServer::start(listener, secondary.clone(), secret)
                .with_context(|| format!("{typed}: cannot listen on {}", cfg.listen))?,
        );
        claim.refuse_writers(Some(format!(
            "a replication secondary of {}; promote it first",
            cfg.peer
        )))?;
        // A drill's sessions (`LUN@NAME`) are served to other processes from here, and
        // `vapp snapshot list|delete` reach the engine here.
        if let Some(engine) = secondary.engine() {
            let raw = lunspec::open_raw(&m.spec.source, true)?;
            let service = crate::cmd::snapshot::Service::in_use(
                m.spec.clone(),
                raw,
                engine,
                crate::cmd::snapshot::InUse {
                    who: "vapp replica run".into(),
                    advice: "a replica changes only through its primary".into(),
                },
            );
            Arc::new(service).serve(claim.listen()?);
        }
        *lock(&m.side) = Some(Side::Secondary(secondary));
        info!(lun = %typed, listen = %cfg.listen, "replication secondary waiting for its primary");
    }
    while !d.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(servers);
    for m in &d.members {
        *lock(&m.side) = None;
        info!(lun = %m.spec.typed, "replication secondary stopped");
    }
    Ok(())
}

/// One thread per connection: a verify runs for minutes while status and the datastore
/// locks' compare-and-write must still be answered.
fn serve_control(d: &Arc<Daemon>, m: &Arc<Member>, listener: UnixListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (d, m) = (d.clone(), m.clone());
        let spawned = std::thread::Builder::new()
            .name("control-request".into())
            .spawn(move || {
                let reply = match read_request(&stream) {
                    Ok(request) => {
                        handle(&d, &m, &request).unwrap_or_else(|e| Reply::failed(format!("{e:#}")))
                    }
                    Err(e) => Reply::failed(format!("{e:#}")),
                };
                let mut line = serde_json::to_vec(&reply).unwrap_or_default();
                line.push(b'\n');
                let _ = (&stream).write_all(&line);
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot answer a control request");
        }
    }
}

fn read_request(stream: &UnixStream) -> anyhow::Result<Request> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(line.trim()).with_context(|| {
        let shown: String = line.chars().take(120).collect();
        format!("bad control request {shown:?}")
    })
}

fn side_of(m: &Member) -> anyhow::Result<Side> {
    lock(&m.side).clone().with_context(|| {
        format!(
            "{}: the replication daemon is starting or stopping",
            m.spec.typed
        )
    })
}

fn primary_of(m: &Member) -> anyhow::Result<Arc<PrimaryLun>> {
    match side_of(m)? {
        Side::Primary(p) => Ok(p),
        Side::Secondary(_) => bail!(
            "{}: a replication secondary; run this on its primary ({})",
            m.spec.typed,
            lock(&m.cfg).peer
        ),
    }
}

/// What a command acts on: every member of the group (in registry order), or the LUN alone.
fn sides(d: &Daemon) -> anyhow::Result<Vec<(Arc<Member>, Side)>> {
    d.members
        .iter()
        .map(|m| Ok((m.clone(), side_of(m)?)))
        .collect()
}

fn primaries(d: &Daemon) -> anyhow::Result<Vec<(Arc<Member>, Arc<PrimaryLun>)>> {
    d.members
        .iter()
        .map(|m| Ok((m.clone(), primary_of(m)?)))
        .collect()
}

/// Records the new role of every member and has the daemon run again in it.
fn switch_role(d: &Daemon, role: Role) -> anyhow::Result<()> {
    for m in &d.members {
        let mut cfg = lock(&m.cfg);
        cfg.role = role;
        replica::save(&m.spec, &cfg)?;
    }
    d.exec.store(true, Ordering::SeqCst);
    d.stop.store(true, Ordering::SeqCst);
    Ok(())
}

/// How a message names what a command acted on: the LUN, or its group.
fn subject(d: &Daemon, m: &Member) -> String {
    match &lock(&m.cfg).group {
        Some(g) if d.members.len() > 1 => format!("group {g} ({} LUNs)", d.members.len()),
        Some(g) => format!("{} (group {g})", m.spec.typed),
        None => m.spec.typed.clone(),
    }
}

fn handle(d: &Daemon, m: &Member, request: &Request) -> anyhow::Result<Reply> {
    let typed = m.spec.typed.as_str();
    let what = subject(d, m);
    let done = Reply::done;
    let group = lock(&d.group).clone();
    match request {
        Request::Status => Ok(Reply {
            status: Some(status(m)),
            ..done(String::new())
        }),
        Request::CompareAndWrite {
            offset,
            expected,
            new,
        } => compare_and_write(m, *offset, expected, new),
        Request::DrillPoint { name } => drill_point(d, name),
        Request::Stop => {
            d.stop.store(true, Ordering::SeqCst);
            Ok(done(format!("{what}: replication daemon stopping")))
        }
        Request::Fracture => {
            match &group {
                Some(g) => g.fracture(),
                None => primary_of(m)?.fracture(),
            }
            .with_context(|| format!("{what}: cannot fracture"))?;
            Ok(done(format!(
                "{what}: fractured; writes are tracked until vapp replica resume {typed}"
            )))
        }
        Request::Resume => {
            let Ok(p) = primary_of(m) else {
                return Ok(done(format!(
                    "{what}: a secondary; it takes its primary when it connects"
                )));
            };
            let fractured = primaries(d)?
                .iter()
                .any(|(_, p)| p.link_state() == LinkState::Fractured);
            match (&group, fractured) {
                (Some(g), true) => g.resume(),
                (Some(g), false) => g.connect(),
                (None, true) => p.resume().map(drop),
                (None, false) => p.connect().map(drop),
            }
            .with_context(|| format!("{what}: cannot resume the link"))?;
            *lock(&m.connect_error) = None;
            Ok(done(format!("{what}: link {}", link_name(p.link_state()))))
        }
        Request::Verify => {
            let (mut differ, mut total) = (0, 0);
            for (m, p) in primaries(d)? {
                if !matches!(p.link_state(), LinkState::Connected | LinkState::Resyncing) {
                    bail!(
                        "{}: verify needs the link up; it is {}",
                        m.spec.typed,
                        link_name(p.link_state())
                    );
                }
                let progress = p
                    .verify()
                    .with_context(|| format!("{}: verify failed", m.spec.typed))?;
                differ += progress.differences;
                total += progress.regions_total;
            }
            Ok(done(format!(
                "{what}: {differ} of {total} regions differ{}",
                if differ > 0 {
                    "; marked for resync"
                } else {
                    ""
                }
            )))
        }
        Request::Promote { force } => {
            let all = sides(d)?;
            if all.iter().all(|(_, s)| matches!(s, Side::Primary(_))) {
                return Ok(done(format!("{what}: already the primary")));
            }
            if !force
                && let Some((m, _)) = all
                    .iter()
                    .find(|(_, s)| matches!(s, Side::Secondary(x) if x.is_connected()))
            {
                bail!(
                    "{}: cannot promote: a primary is connected and replicating; promote \
                     with --force to take over anyway",
                    m.spec.typed
                );
            }
            for (m, s) in &all {
                if let Side::Secondary(x) = s {
                    x.promote(*force)
                        .with_context(|| format!("{}: cannot promote", m.spec.typed))?;
                }
            }
            switch_role(d, Role::Primary)?;
            Ok(done(format!(
                "{what}: promoted; now the primary, replicating to {}",
                lock(&m.cfg).peer
            )))
        }
        Request::Demote { discard_local } => {
            let all = sides(d)?;
            if all.iter().all(|(_, s)| matches!(s, Side::Secondary(_))) {
                return Ok(done(format!("{what}: already a secondary")));
            }
            demote_all(d, &what, *discard_local)?;
            switch_role(d, Role::Secondary)?;
            Ok(done(format!(
                "{what}: demoted; now a secondary, taking its primary on {}",
                lock(&m.cfg).listen
            )))
        }
        Request::Handover {
            vms,
            stop_timeout_s,
            force,
        } => handover::ask_peer(d, m, vms, *stop_timeout_s, *force),
        Request::Resolve => {
            let all = sides(d)?;
            if all.iter().any(|(_, s)| matches!(s, Side::Primary(_))) {
                bail!(
                    "{typed}: a primary keeps what it wrote; to lose it, vapp replica demote \
                     {typed} --discard-local"
                );
            }
            for (m, s) in &all {
                if let Side::Secondary(x) = s {
                    x.discard_local()
                        .with_context(|| format!("{}: cannot resolve", m.spec.typed))?;
                }
            }
            Ok(done(format!(
                "{what}: what this side wrote that its primary never got is overwritten at \
                 the next resync"
            )))
        }
    }
}

/// Fractures every member whose link is up (a group's all at once), then demotes each:
/// the engine's half of a demote; the daemon takes the new role with [`switch_role`].
fn demote_all(d: &Daemon, what: &str, discard_local: bool) -> anyhow::Result<()> {
    let group = lock(&d.group).clone();
    if let Some(g) = &group
        && primaries(d)?
            .iter()
            .any(|(_, p)| matches!(p.link_state(), LinkState::Connected | LinkState::Resyncing))
    {
        g.fracture()
            .with_context(|| format!("{what}: cannot fracture before demoting"))?;
    }
    for (m, p) in primaries(d)? {
        if matches!(p.link_state(), LinkState::Connected | LinkState::Resyncing) {
            p.fracture()
                .with_context(|| format!("{}: cannot fracture before demoting", m.spec.typed))?;
        }
        p.demote(discard_local)
            .with_context(|| format!("{}: cannot demote", m.spec.typed))?;
    }
    Ok(())
}

/// The longest a drill waits for a delta set being applied to become whole.
const DRILL_POINT_WAIT: Duration = Duration::from_secs(30);

fn drill_point(d: &Daemon, name: &str) -> anyhow::Result<Reply> {
    let mut secondaries = Vec::new();
    for (m, side) in sides(d)? {
        match side {
            Side::Secondary(x) => secondaries.push(x),
            Side::Primary(_) => bail!(
                "{}: a replication primary; a drill takes its point at the secondary",
                m.spec.typed
            ),
        }
    }
    let point = replication::take_point(&secondaries, name, DRILL_POINT_WAIT)?;
    let taken_ms = replication::now_ms();
    let mode = lock(&d.members[0].cfg).mode;
    // Synchronous: a connected replica holds every acknowledged write; one cut off holds
    // them up to the last thing its primary sent. Asynchronous: the last set applied whole.
    let point_ms = match mode {
        ModeName::Sync if point.connected => taken_ms,
        ModeName::Async if point.delta_cut_ms > 0 => point.delta_cut_ms,
        _ => point.last_heard_ms,
    };
    let luns: Vec<String> = d.members.iter().map(|m| m.spec.typed.clone()).collect();
    info!(session = %name, luns = ?luns, point_ms, delta_id = point.delta_id, "drill point taken");
    Ok(Reply {
        point: Some(replica::PointJson {
            mode,
            point_ms,
            taken_ms,
            connected: point.connected,
            delta_id: point.delta_id,
            luns,
        }),
        ..Reply::done(format!("session {name} taken"))
    })
}

/// Read, compare and write through the replicated write, one writer at a time: every
/// writer of the LUN reaches it through this daemon, and the datastore's own locks keep
/// plain writes off the sectors its lock records live in.
fn compare_and_write(
    m: &Member,
    offset: u64,
    expected: &[u8],
    new: &[u8],
) -> anyhow::Result<Reply> {
    let p = primary_of(m)?;
    if expected.len() != new.len() {
        bail!(
            "{}: compare-and-write of {} bytes against {} expected",
            m.spec.typed,
            new.len(),
            expected.len()
        );
    }
    let _one = lock(&m.compare_and_write);
    let mut current = vec![0u8; expected.len()];
    p.read_at(&mut current, offset)?;
    if current != expected {
        return Ok(Reply {
            miscompare: Some(current),
            ..Reply::done(String::new())
        });
    }
    p.write_at(new, offset)?;
    Ok(Reply::done(String::new()))
}

fn link_name(state: LinkState) -> &'static str {
    match state {
        LinkState::Connected => "connected",
        LinkState::Resyncing => "resyncing",
        LinkState::Disconnected => "disconnected",
        LinkState::Fractured => "fractured",
        LinkState::Demoted => "demoted",
    }
}

fn status(m: &Member) -> StatusJson {
    let cfg = lock(&m.cfg).clone();
    let mut s = StatusJson::offline(&cfg);
    s.running = true;
    s.pid = Some(std::process::id());
    s.last_error = None;
    let side = lock(&m.side).clone();
    match side {
        Some(Side::Primary(p)) => {
            let st = p.status();
            s.role = Role::Primary;
            s.link = link_name(st.link).into();
            s.mode = match st.mode {
                Mode::Sync => ModeName::Sync,
                Mode::Async { .. } => ModeName::Async,
            };
            s.out_of_sync_bytes = st.bytes_waiting;
            s.rpo_ms = st.rpo.map(|r| r.as_millis() as u64);
            let left = st.resync.regions_left;
            let eta_s = p.resync_eta().map(|d| d.as_secs_f64().ceil() as u64);
            s.resync = ResyncJson {
                regions_total: st.resync.regions_total,
                regions_left: left,
                fraction: st.resync.fraction(),
                eta_s,
            };
            s.bytes_resynced = st.bytes_resynced;
            s.peer_regions_discarded = st.peer_regions_discarded;
            s.last_error = match st.link {
                LinkState::Connected | LinkState::Resyncing => None,
                _ => lock(&m.connect_error).clone().or(st.last_error),
            };
            s.generation = GenerationJson {
                current: st.gens.current,
                bitmap: st.gens.bitmap,
                history: st.gens.history,
            };
        }
        Some(Side::Secondary(x)) => {
            s.role = Role::Secondary;
            s.link = if x.is_connected() {
                "connected"
            } else {
                "waiting"
            }
            .into();
            let gens = x.gens();
            s.generation = GenerationJson {
                current: gens.current,
                bitmap: gens.bitmap,
                history: gens.history,
            };
            let (delta_id, cut_ms) = x.point_in_time();
            s.secondary = Some(SecondaryJson {
                inconsistent: x.is_inconsistent(),
                point_in_time_ms: (cut_ms > 0).then_some(cut_ms),
                delta_id,
            });
        }
        None => {}
    }
    s
}
