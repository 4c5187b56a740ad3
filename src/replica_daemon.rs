//! `vapp replica run LUN`: the daemon of one replicated LUN, in the foreground.
//!
//! It holds the LUN's claim (see [`crate::lunspec`]) for as long as it runs, so nothing
//! writes the LUN around it. As the primary it opens the LUN through the snapshot engine
//! when the LUN has a pool, wraps it in a [`PrimaryLun`], and serves that over NBD on a
//! private Unix socket named in the claim record: every other vapp writer of the LUN
//! (`-d LUN put`, a mount, an export, a VM) reaches it there. It keeps the link up
//! (reconnecting with backoff, resyncing in steps so writers interleave) or, in
//! asynchronous mode, runs the engine's delta-set cycle. As the secondary it listens for
//! its primary and refuses every other writer. A promote or demote changes the role in
//! the registry and the daemon executes itself again, so the new role starts from a
//! clean process with the same pid. SIGTERM or SIGINT close the link cleanly (both sides
//! flushed) and exit 0.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lun::Lun;
use lun::nbd::{ExportConfig, ListenAddr, NbdServer};
use nix::sys::signal::{SigSet, Signal};
use replication::{LinkState, Mode, PrimaryLun, Secondary, SecondaryServer, TcpPeer};
use tracing::{info, warn};

use crate::cmd::replica::{
    self, Config, GenerationJson, ModeName, Reply, Request, ResyncJson, Role, SecondaryJson,
    StatusJson,
};
use crate::lunspec::{self, Claim, Spec};

/// Regions a resync copies between two looks at the writers and the control socket.
const RESYNC_STEP: u64 = 64;
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

enum Side {
    Primary(Arc<PrimaryLun>),
    Secondary(Arc<Secondary>),
}

struct Daemon {
    spec: Spec,
    cfg: Mutex<Config>,
    side: Mutex<Option<Side>>,
    stop: AtomicBool,
    /// Run again in the role the registry now names (after promote or demote).
    exec: AtomicBool,
    /// Why the last connection attempt failed; cleared when one succeeds.
    connect_error: Mutex<Option<String>>,
    /// When the running resync began and how many regions it had then, for its ETA.
    resync_clock: Mutex<Option<(Instant, u64)>>,
    /// Makes a writer's compare-and-write one step against the others'.
    compare_and_write: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn run(typed: &str) -> anyhow::Result<ExitCode> {
    let spec = Spec::parse(typed);
    let cfg =
        replica::load(&spec)?.with_context(|| format!("{typed}: not replicated on this host"))?;
    // Blocked before any thread starts, so only the waiting thread below takes them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .context("cannot block SIGINT/SIGTERM for orderly shutdown")?;
    let secret = replica::read_secret_file(&cfg.secret_file)?;
    let mut claim = match Claim::take(&spec)? {
        Ok(claim) => claim,
        Err(holder) => bail!(
            "{typed}: in use by `vapp {}` (pid {}); it cannot be replicated while another \
             process writes it",
            holder.command,
            holder.pid
        ),
    };
    drop(lunspec::Users::alone(&spec, None).map_err(|_| {
        anyhow::anyhow!(
            "{typed}: another vapp process writes it directly (a mount, an export or a \
             command on it); stop it, then vapp replica resume {typed}"
        )
    })?);
    let control = bind_control(&spec)?;
    let daemon = Arc::new(Daemon {
        spec: spec.clone(),
        cfg: Mutex::new(cfg.clone()),
        side: Mutex::new(None),
        stop: AtomicBool::new(false),
        exec: AtomicBool::new(false),
        connect_error: Mutex::new(None),
        resync_clock: Mutex::new(None),
        compare_and_write: Mutex::new(()),
    });
    {
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(signal) = signals.wait() {
                    info!(lun = %d.spec.typed, ?signal, "stopping the replication daemon");
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
                    if !replica::config_path(&d.spec).exists() {
                        warn!(lun = %d.spec.typed, "registry entry gone; stopping");
                        d.stop.store(true, Ordering::SeqCst);
                    }
                }
            })?;
    }
    {
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve_control(&d, control))?;
    }
    let ran = match cfg.role {
        Role::Primary => run_primary(&daemon, &mut claim, secret),
        Role::Secondary => run_secondary(&daemon, &mut claim, secret),
    };
    let _ = fs::remove_file(replica::control_path(&spec));
    drop(claim);
    ran?;
    if daemon.exec.load(Ordering::SeqCst) {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("cannot find the vapp executable")?;
        info!(lun = %spec.typed, role = ?lock(&daemon.cfg).role, "restarting in the new role");
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

fn run_primary(d: &Arc<Daemon>, claim: &mut Claim, secret: Vec<u8>) -> anyhow::Result<()> {
    let cfg = lock(&d.cfg).clone();
    let spec = &d.spec;
    let typed = spec.typed.as_str();
    let peer_addr = replica::resolve(&cfg.peer, "--peer")?;
    let raw = lunspec::open_raw(&spec.source, false)?;
    let meta = lunspec::open_raw(&cfg.meta, false)?;
    let peer =
        Box::new(TcpPeer::new(peer_addr, secret).with_retries(1, Duration::from_millis(100)));
    let policy = cfg.policy.engine();
    let opened = |local: Arc<dyn Lun>, peer| {
        PrimaryLun::open(local, meta.clone(), peer, policy)
            .with_context(|| format!("{typed}: cannot open its replication metadata {}", cfg.meta))
    };
    let mut service = None;
    let primary = match (cfg.mode, lunspec::existing_pool(spec)?) {
        (ModeName::Sync, Some(pool)) => {
            let snaps = lunspec::open_engine(spec, raw.clone(), &pool)?;
            let primary = opened(snaps.source(), peer)?;
            service = Some(crate::cmd::snapshot::Service::in_use(
                spec.clone(),
                raw.clone(),
                snaps,
                crate::cmd::snapshot::InUse {
                    who: "vapp replica run".into(),
                    advice: "a replicated LUN is rolled back by promoting its replica or \
                             after vapp replica delete"
                        .into(),
                },
            ));
            primary
        }
        (ModeName::Sync, None) => opened(raw.clone(), peer)?,
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
    *lock(&d.side) = Some(Side::Primary(primary.clone()));
    let cycle = match cfg.mode {
        ModeName::Async => Some(primary.start_cycle()?),
        ModeName::Sync => None,
    };
    info!(lun = %typed, peer = %cfg.peer, mode = ?cfg.mode, "replication primary running");

    let mut backoff = Duration::from_millis(100);
    let mut next_try = Instant::now();
    while !d.stop.load(Ordering::SeqCst) {
        if cycle.is_some() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        match primary.link_state() {
            LinkState::Disconnected if Instant::now() >= next_try => match primary.connect() {
                Ok(state) => {
                    info!(lun = %typed, peer = %cfg.peer, link = ?state, "replication link up");
                    *lock(&d.connect_error) = None;
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    let mut last = lock(&d.connect_error);
                    if last.as_deref() != Some(&e.to_string()) {
                        warn!(lun = %typed, peer = %cfg.peer, error = %e, "cannot bring the replication link up; retrying");
                    }
                    *last = Some(e.to_string());
                    next_try = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            },
            LinkState::Resyncing => {
                match primary.resync_step(RESYNC_STEP) {
                    Ok(p) if p.regions_left == 0 => {
                        info!(lun = %typed, "resync done");
                        *lock(&d.resync_clock) = None;
                    }
                    Ok(p) => {
                        lock(&d.resync_clock).get_or_insert((Instant::now(), p.regions_left));
                    }
                    Err(e) => {
                        warn!(lun = %typed, error = %e, "resync step failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                continue;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(cycle);
    shutdown.shutdown();
    match serving.join() {
        Ok(Err(e)) => warn!(lun = %typed, error = %e, "serving writers ended with an error"),
        Err(_) => warn!(lun = %typed, "the writers' server panicked"),
        Ok(Ok(())) => {}
    }
    claim.serve_writers(None)?;
    *lock(&d.side) = None;
    primary
        .close()
        .with_context(|| format!("{typed}: closing the replication link"))?;
    info!(lun = %typed, "replication primary stopped");
    Ok(())
}

fn run_secondary(d: &Arc<Daemon>, claim: &mut Claim, secret: Vec<u8>) -> anyhow::Result<()> {
    let cfg = lock(&d.cfg).clone();
    let spec = &d.spec;
    let typed = spec.typed.as_str();
    let addr = replica::resolve(&cfg.listen, "--listen")?;
    let raw = lunspec::open_raw(&spec.source, false)?;
    let meta = lunspec::open_raw(&cfg.meta, false)?;
    let snaps = match lunspec::existing_pool(spec)? {
        Some(pool) => {
            let pool_lun = lunspec::open_raw(&pool, false)?;
            Some(
                snapshot::Snapshots::open(raw.clone(), pool_lun)
                    .with_context(|| format!("{typed}: cannot open its snapshot pool {pool}"))?,
            )
        }
        None => None,
    };
    let secondary =
        Arc::new(Secondary::open(raw, meta, snaps).with_context(|| {
            format!("{typed}: cannot open its replication metadata {}", cfg.meta)
        })?);
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("{typed}: cannot listen on {}", cfg.listen))?;
    let server = SecondaryServer::start(listener, secondary.clone(), secret)
        .with_context(|| format!("{typed}: cannot listen on {}", cfg.listen))?;
    claim.refuse_writers(Some(format!(
        "a replication secondary of {}; promote it first",
        cfg.peer
    )))?;
    *lock(&d.side) = Some(Side::Secondary(secondary.clone()));
    info!(lun = %typed, listen = %cfg.listen, "replication secondary waiting for its primary");
    while !d.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
    *lock(&d.side) = None;
    drop(secondary);
    info!(lun = %typed, "replication secondary stopped");
    Ok(())
}

/// One thread per connection: a verify runs for minutes while status and the datastore
/// locks' compare-and-write must still be answered.
fn serve_control(d: &Arc<Daemon>, listener: UnixListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let d = d.clone();
        let spawned = std::thread::Builder::new()
            .name("control-request".into())
            .spawn(move || {
                let reply = match read_request(&stream) {
                    Ok(request) => {
                        handle(&d, &request).unwrap_or_else(|e| Reply::failed(format!("{e:#}")))
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

fn primary_of(d: &Daemon) -> anyhow::Result<Arc<PrimaryLun>> {
    match &*lock(&d.side) {
        Some(Side::Primary(p)) => Ok(p.clone()),
        Some(Side::Secondary(_)) => bail!(
            "{}: a replication secondary; run this on its primary ({})",
            d.spec.typed,
            lock(&d.cfg).peer
        ),
        None => bail!(
            "{}: the replication daemon is starting or stopping",
            d.spec.typed
        ),
    }
}

fn secondary_of(d: &Daemon) -> anyhow::Result<Option<Arc<Secondary>>> {
    match &*lock(&d.side) {
        Some(Side::Secondary(s)) => Ok(Some(s.clone())),
        Some(Side::Primary(_)) => Ok(None),
        None => bail!(
            "{}: the replication daemon is starting or stopping",
            d.spec.typed
        ),
    }
}

/// Records the new role and has the daemon run again in it.
fn switch_role(d: &Daemon, role: Role) -> anyhow::Result<()> {
    let mut cfg = lock(&d.cfg);
    cfg.role = role;
    replica::save(&d.spec, &cfg)?;
    d.exec.store(true, Ordering::SeqCst);
    d.stop.store(true, Ordering::SeqCst);
    Ok(())
}

fn handle(d: &Daemon, request: &Request) -> anyhow::Result<Reply> {
    let typed = d.spec.typed.as_str();
    let done = Reply::done;
    match request {
        Request::Status => Ok(Reply {
            status: Some(status(d)),
            ..done(String::new())
        }),
        Request::CompareAndWrite {
            offset,
            expected,
            new,
        } => compare_and_write(d, *offset, expected, new),
        Request::Stop => {
            d.stop.store(true, Ordering::SeqCst);
            Ok(done(format!("{typed}: replication daemon stopping")))
        }
        Request::Fracture => {
            primary_of(d)?
                .fracture()
                .with_context(|| format!("{typed}: cannot fracture"))?;
            Ok(done(format!(
                "{typed}: fractured; writes are tracked until vapp replica resume {typed}"
            )))
        }
        Request::Resume => {
            let Some(p) = primary_of(d).ok() else {
                return Ok(done(format!(
                    "{typed}: a secondary; it takes its primary when it connects"
                )));
            };
            let state = if p.link_state() == LinkState::Fractured {
                p.resume()
            } else {
                p.connect()
            }
            .with_context(|| format!("{typed}: cannot resume the link"))?;
            Ok(done(format!("{typed}: link {}", link_name(state))))
        }
        Request::Verify => {
            let p = primary_of(d)?;
            if !matches!(p.link_state(), LinkState::Connected | LinkState::Resyncing) {
                bail!(
                    "{typed}: verify needs the link up; it is {}",
                    link_name(p.link_state())
                );
            }
            let progress = p
                .verify()
                .with_context(|| format!("{typed}: verify failed"))?;
            Ok(done(format!(
                "{typed}: {} of {} regions differ{}",
                progress.differences,
                progress.regions_total,
                if progress.differences > 0 {
                    "; marked for resync"
                } else {
                    ""
                }
            )))
        }
        Request::Promote { force } => match secondary_of(d)? {
            None => Ok(done(format!("{typed}: already the primary"))),
            Some(s) => {
                s.promote(*force)
                    .with_context(|| format!("{typed}: cannot promote"))?;
                switch_role(d, Role::Primary)?;
                Ok(done(format!(
                    "{typed}: promoted; now the primary, replicating to {}",
                    lock(&d.cfg).peer
                )))
            }
        },
        Request::Demote { discard_local } => {
            if secondary_of(d)?.is_some() {
                return Ok(done(format!("{typed}: already a secondary")));
            }
            let p = primary_of(d)?;
            if matches!(p.link_state(), LinkState::Connected | LinkState::Resyncing) {
                p.fracture()
                    .with_context(|| format!("{typed}: cannot fracture before demoting"))?;
            }
            p.demote(*discard_local)
                .with_context(|| format!("{typed}: cannot demote"))?;
            switch_role(d, Role::Secondary)?;
            Ok(done(format!(
                "{typed}: demoted; now a secondary, taking its primary on {}",
                lock(&d.cfg).listen
            )))
        }
        Request::Resolve => match secondary_of(d)? {
            Some(s) => {
                s.discard_local()
                    .with_context(|| format!("{typed}: cannot resolve"))?;
                Ok(done(format!(
                    "{typed}: what this side wrote that its primary never got is overwritten \
                     at the next resync"
                )))
            }
            None => bail!(
                "{typed}: a primary keeps what it wrote; to lose it, vapp replica demote \
                 {typed} --discard-local"
            ),
        },
    }
}

/// Read, compare and write through the replicated write, one writer at a time: every
/// writer of the LUN reaches it through this daemon, and the datastore's own locks keep
/// plain writes off the sectors its lock records live in.
fn compare_and_write(
    d: &Daemon,
    offset: u64,
    expected: &[u8],
    new: &[u8],
) -> anyhow::Result<Reply> {
    let p = primary_of(d)?;
    if expected.len() != new.len() {
        bail!(
            "{}: compare-and-write of {} bytes against {} expected",
            d.spec.typed,
            new.len(),
            expected.len()
        );
    }
    let _one = lock(&d.compare_and_write);
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

fn status(d: &Daemon) -> StatusJson {
    let cfg = lock(&d.cfg).clone();
    let mut s = StatusJson::offline(&cfg);
    s.running = true;
    s.pid = Some(std::process::id());
    s.last_error = None;
    let side = match &*lock(&d.side) {
        Some(Side::Primary(p)) => Some(Side::Primary(p.clone())),
        Some(Side::Secondary(x)) => Some(Side::Secondary(x.clone())),
        None => None,
    };
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
            let eta_s = lock(&d.resync_clock).and_then(|(since, first)| {
                let done = first.saturating_sub(left);
                (done > 0 && st.link == LinkState::Resyncing).then(|| {
                    (since.elapsed().as_secs_f64() * left as f64 / done as f64).ceil() as u64
                })
            });
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
                _ => lock(&d.connect_error).clone().or(st.last_error),
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
