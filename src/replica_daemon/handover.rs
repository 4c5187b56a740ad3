//! Planned handover, both ends (replication/FORMAT.md, "Planned handover").
//!
//! At the protected site the primary's daemon listens on its `--listen` address and, asked by
//! the peer that proves the link's secret, stops the plan's VMs there, waits for their locks
//! to go, makes every write reach the replica, and demotes itself; or changes nothing (a VM
//! not on its LUNs, the link down), or undoes what it did (a VM that will not stop: the VMs
//! it stopped are started again, and it stays the primary). At the DR site the secondary's
//! daemon sends the request and promotes nothing itself: it checks that the answer says the
//! other side is a secondary now and that this replica holds the generation the other side
//! had when it stopped writing, so `dr failover` promotes only when no acknowledged write
//! is missing and the other side can no longer write.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use replication::handover::{
    HandoverError, HandoverHandler, HandoverMember, HandoverOutcome, HandoverReply,
    HandoverRequest, HandoverServer, HandoverStep, HandoverVm,
};
use replication::{LinkState, Mode};
use tracing::{info, warn};

use super::{Daemon, Member, Side, demote_all, link_name, lock, primaries, sides, subject};
use crate::cmd::replica::{self, HANDOVER_SLACK_S, HandoverJson, HandoverStepJson, Reply, Role};
use crate::lunspec;

/// How long the VMs' locks, the final sync and a restarted VM each get.
const STEP_WAIT: Duration = Duration::from_secs(30);

/// Serves handover requests on every member's `--listen` address while this daemon is the
/// primary, from threads that bind it (retrying a few seconds, as the secondary this process
/// was a moment ago may still hold it) so the link comes up meanwhile. A member whose address
/// cannot be bound is logged: the DR site then finds this side unreachable and changes
/// nothing. The servers stop when the returned value is dropped.
pub(super) fn listen(d: &Arc<Daemon>) -> Arc<Mutex<Vec<HandoverServer>>> {
    let handler: Arc<dyn HandoverHandler> = Arc::new(Handler {
        d: d.clone(),
        one_at_a_time: Mutex::new(()),
    });
    let servers = Arc::new(Mutex::new(Vec::new()));
    for m in &d.members {
        let (d, m, handler, servers) = (d.clone(), m.clone(), handler.clone(), servers.clone());
        let spawned = std::thread::Builder::new()
            .name("handover-bind".into())
            .spawn(move || {
                let listen = lock(&m.cfg).listen.clone();
                let bound = replica::resolve(&listen, "--listen").and_then(|addr| {
                    let mut tries = 0;
                    loop {
                        match TcpListener::bind(addr) {
                            Ok(l) => break Ok(l),
                            Err(_) if tries < 50 && !d.stop.load(Ordering::SeqCst) => {
                                tries += 1;
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            Err(e) => break Err(anyhow::Error::new(e)),
                        }
                    }
                });
                let started = bound.and_then(|l| {
                    HandoverServer::start(l, m.secret.clone(), handler).map_err(Into::into)
                });
                match started {
                    // Held only while the daemon runs in this role.
                    Ok(s) if !d.stop.load(Ordering::SeqCst) => lock(&servers).push(s),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(lun = %m.spec.typed, listen = %listen, error = %e, "cannot listen for planned-handover requests")
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start listening for planned-handover requests");
        }
    }
    servers
}

struct Handler {
    d: Arc<Daemon>,
    one_at_a_time: Mutex<()>,
}

impl HandoverHandler for Handler {
    fn handover(&self, from: SocketAddr, request: &HandoverRequest) -> HandoverReply {
        let _alone = lock(&self.one_at_a_time);
        let reply = hand_over(&self.d, request);
        info!(peer = %from, outcome = reply.outcome.name(), message = %reply.message, "planned handover answered");
        reply
    }

    fn answered(&self, reply: &HandoverReply, sent: bool) {
        if reply.outcome != HandoverOutcome::Demoted {
            return;
        }
        if !sent {
            warn!(
                "the DR site did not get the handover's answer; this side is demoted all the same and waits as a secondary"
            );
        }
        if let Err(e) = super::switch_role(&self.d, Role::Secondary) {
            warn!(error = %e, "cannot record the secondary role after a planned handover");
        }
    }
}

/// One VM of the request, found on one of this daemon's LUNs.
struct Located {
    lun: String,
    folder: String,
}

struct Steps {
    t0: Instant,
    steps: Vec<HandoverStep>,
}

impl Steps {
    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn push(&mut self, step: String, start_ms: u64, detail: String) {
        let end_ms = self.ms();
        self.steps.push(HandoverStep {
            step,
            start_ms,
            end_ms,
            detail,
        });
    }
}

fn refused(message: String) -> HandoverReply {
    HandoverReply {
        outcome: HandoverOutcome::Refused,
        members: Vec::new(),
        steps: Vec::new(),
        message,
    }
}

fn hand_over(d: &Daemon, request: &HandoverRequest) -> HandoverReply {
    let what = subject(d, &d.members[0]);
    let prims = match primaries(d) {
        Ok(p) => p,
        Err(e) => return refused(format!("{e:#}")),
    };
    for (m, p) in &prims {
        let state = p.link_state();
        if state != LinkState::Connected {
            return refused(format!(
                "{}: the replication link is {} here, so the DR site cannot get every write; \
                 nothing changed (bring the link up with vapp replica resume {} and retry)",
                m.spec.typed,
                link_name(state),
                m.spec.typed
            ));
        }
    }
    let vms = match locate(d, &request.vms) {
        Ok(v) => v,
        Err(e) => return refused(format!("{e:#}; nothing changed")),
    };
    let mut steps = Steps {
        t0: Instant::now(),
        steps: Vec::new(),
    };
    let timeout = Duration::from_millis(request.stop_timeout_ms);
    // Each VM's stop is timed by its own thread: they run at once.
    let t0 = steps.t0;
    let ms = move || t0.elapsed().as_millis() as u64;
    let outcomes: Vec<(u64, u64, Result<bool, String>)> = std::thread::scope(|scope| {
        let running: Vec<_> = vms
            .iter()
            .map(|vm| {
                scope.spawn(move || {
                    let start = ms();
                    let outcome = stop_vm(vm, timeout, request.force);
                    (start, ms(), outcome)
                })
            })
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| (0, 0, Err("the stopping thread panicked".into())))
            })
            .collect()
    });
    let mut stopped = Vec::new();
    let mut failures = Vec::new();
    for (vm, (start_ms, end_ms, outcome)) in vms.iter().zip(outcomes) {
        let detail = match outcome {
            Ok(true) => {
                stopped.push(vm);
                "stopped".to_string()
            }
            Ok(false) => "was not running here".to_string(),
            Err(e) => {
                let detail = format!("FAILED: {e}");
                failures.push(if e.starts_with("vm ") {
                    e
                } else {
                    format!("vm {}: {e}", vm.folder)
                });
                detail
            }
        };
        steps.steps.push(HandoverStep {
            step: format!("stop {}", vm.folder),
            start_ms,
            end_ms,
            detail,
        });
    }
    if !failures.is_empty() {
        return abort(d, steps, &stopped, failures.join("; "));
    }
    let start = steps.ms();
    if let Err(e) = wait_locks_released(&stopped) {
        steps.push("locks released".into(), start, format!("FAILED: {e:#}"));
        return abort(d, steps, &stopped, format!("{e:#}"));
    }
    steps.push(
        "locks released".into(),
        start,
        format!("{} VM(s): no host holds their vm.toml", stopped.len()),
    );
    let start = steps.ms();
    let members = match final_sync(d) {
        Ok(m) => m,
        Err(e) => {
            steps.push("final sync".into(), start, format!("FAILED: {e:#}"));
            return abort(d, steps, &stopped, format!("final sync: {e:#}"));
        }
    };
    steps.push(
        "final sync".into(),
        start,
        format!(
            "{} LUN(s): link connected, nothing left to ship",
            members.len()
        ),
    );
    let start = steps.ms();
    if let Err(e) = demote_all(d, &what, false) {
        steps.push("demote".into(), start, format!("FAILED: {e:#}"));
        for (m, p) in primaries(d).unwrap_or_default() {
            if let Err(e) = p.resume() {
                warn!(lun = %m.spec.typed, error = %e, "cannot resume the link after a failed handover");
            }
        }
        return abort(d, steps, &stopped, format!("{e:#}"));
    }
    steps.push("demote".into(), start, format!("{what}: now a secondary"));
    // A writer outside the plan may have written between the final sync and the fracture:
    // what it left is dirty here, and the DR site refuses to promote over it.
    let mut members = members;
    for (m, (_, p)) in members.iter_mut().zip(primaries(d).unwrap_or_default()) {
        m.dirty_regions = p.status().dirty_regions;
    }
    HandoverReply {
        outcome: HandoverOutcome::Demoted,
        members,
        steps: steps.steps,
        message: format!(
            "{what}: {} VM(s) stopped, every acknowledged write shipped, demoted to secondary",
            stopped.len()
        ),
    }
}

/// Finds each requested VM on this daemon's LUNs: its datastore by UUID, its folder by its
/// `vm.toml`. Anything else is refused, so a request cannot name a VM elsewhere.
fn locate(d: &Daemon, vms: &[HandoverVm]) -> anyhow::Result<Vec<Located>> {
    let mut on_luns = Vec::new();
    for m in &d.members {
        // A group may hold LUNs without a datastore; none of the plan's VMs is on them.
        match open_read_only(&m.spec.typed) {
            Ok(ds) => on_luns.push((m.spec.typed.clone(), ds)),
            Err(e) => info!(lun = %m.spec.typed, error = %e, "no datastore to look for VMs on"),
        }
    }
    let mut found = Vec::new();
    for vm in vms {
        let folder = crate::cmd::vm::folder_path(&vm.path)?;
        if folder.split('/').any(|c| c == ".." || c == ".") {
            bail!("vm {folder}: not a plain folder path");
        }
        let Some((lun, ds)) = on_luns
            .iter()
            .find(|(_, ds)| ds.superblock().uuid.to_string() == vm.datastore)
        else {
            bail!(
                "vm {folder}: datastore {} is not on the replicated LUN(s) {}",
                vm.datastore,
                on_luns
                    .iter()
                    .map(|(l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let config = format!("{folder}/vm.toml");
        if ds.stat_path(&config).is_err() {
            bail!("vm {folder}: no VM there on {lun} (no {config})");
        }
        found.push(Located {
            lun: lun.clone(),
            folder,
        });
    }
    Ok(found)
}

/// Writers go on while this reads: a metadata unit caught mid-write fails its checksum and
/// reads whole a moment later.
fn open_read_only(lun: &str) -> anyhow::Result<vmfs::Datastore> {
    let mut tries = 0;
    loop {
        match crate::cmd::datastore::open_datastore(lun, &vmfs::OpenOptions::read_only()) {
            Ok(ds) => return Ok(ds),
            Err(_) if tries < 5 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `vapp ARGS` with this daemon's registry and runtime directories; its output, or its last
/// error line.
fn vapp(args: &[&str]) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find vapp: {e}"))?;
    let out = Command::new(exe)
        .args(args)
        .env_remove("VAPP_DATASTORE")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run vapp {}: {e}", args.join(" ")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("failed")
        .trim_start_matches("vapp: ")
        .to_string())
}

/// Stops one VM: its power button through its runner (`vapp vm stop`, which reaches a VM the
/// host agent runs too; a guest that powers off is a clean stop the agent does not restart),
/// then, when forced, powered off: through this host's agent when one runs here
/// (`POST /vms/<folder>/stop`, so the agent knows it was stopped and does not restart it; it
/// powers the VM off after its own grace), else through its runner. `Ok(false)`: it was not
/// running on this host, nor on any other.
fn stop_vm(vm: &Located, timeout: Duration, force: bool) -> Result<bool, String> {
    let secs = timeout.as_secs().max(1).to_string();
    let graceful = vapp(&["-d", &vm.lun, "vm", "stop", &vm.folder, "--timeout", &secs]);
    let e = match graceful {
        Ok(_) => return Ok(true),
        Err(e) if e.contains("is not running on this host") && !e.contains("runs on host") => {
            return Ok(false);
        }
        Err(e) if force && e.contains("did not power off") => e,
        Err(e) => return Err(e),
    };
    let agent = crate::cmd::host::agent_socket();
    if agent.exists() {
        let uuid = open_read_only(&vm.lun)
            .map(|ds| ds.superblock().uuid.to_string())
            .map_err(|e| format!("{e:#}"))?;
        let path = host::client::vm_path(&vm.folder, "stop", &uuid);
        // The agent's grace (60 s) before it powers the VM off, and some slack.
        match host::client::request(&agent, "POST", &path, Duration::from_secs(90)) {
            Ok((status, _)) if (200..300).contains(&status) => return Ok(true),
            Ok((status, body)) => {
                info!(vm = %vm.folder, status, body = %body, "the host agent does not run the VM; powering it off through its runner")
            }
            Err(e) => {
                info!(vm = %vm.folder, error = %e, "the host agent did not answer; powering the VM off through its runner")
            }
        }
    }
    vapp(&["-d", &vm.lun, "vm", "stop", &vm.folder, "--force"])
        .map(|_| true)
        .map_err(|f| format!("{e}; then forced: {f}"))
}

/// Waits until no live host holds a stopped VM's `vm.toml`: its runner let its locks go.
fn wait_locks_released(stopped: &[&Located]) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_WAIT;
    for vm in stopped {
        loop {
            let ds = open_read_only(&vm.lun)?;
            let ino = crate::cmd::vm::folder_config_ino(&ds, &vm.folder)?;
            let holder = crate::cmd::vm::lock_holders(&ds)?.remove(&ino);
            let Some(h) = holder else { break };
            if Instant::now() > deadline {
                bail!(
                    "vm {}: host {} (pid {}) still holds its lock {} s after it stopped",
                    vm.folder,
                    h.host,
                    h.pid,
                    STEP_WAIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Ships what the replica lacks (asynchronous mode: one more delta set) and waits until
/// every member is connected with nothing waiting; returns each member's generation then,
/// which the replica holds too.
fn final_sync(d: &Daemon) -> anyhow::Result<Vec<HandoverMember>> {
    let prims = primaries(d)?;
    let group = lock(&d.group).clone();
    let deadline = Instant::now() + STEP_WAIT;
    loop {
        let statuses: Vec<_> = prims.iter().map(|(_, p)| p.status()).collect();
        if let Some((m, s)) = prims
            .iter()
            .zip(&statuses)
            .find(|(_, s)| s.link != LinkState::Connected)
        {
            bail!(
                "{}: the replication link went {} before the last writes were shipped",
                m.0.spec.typed,
                link_name(s.link)
            );
        }
        if statuses.iter().all(|s| s.bytes_waiting == 0) {
            return Ok(statuses
                .iter()
                .map(|s| HandoverMember {
                    generation: s.gens.current,
                    bitmap_generation: s.gens.bitmap,
                    dirty_regions: 0,
                })
                .collect());
        }
        if Instant::now() > deadline {
            bail!(
                "{} bytes still not shipped after {} s",
                statuses.iter().map(|s| s.bytes_waiting).sum::<u64>(),
                STEP_WAIT.as_secs()
            );
        }
        if matches!(statuses[0].mode, Mode::Async { .. }) {
            let shipped = match &group {
                Some(g) => g.replicate_now(),
                None => prims[0].1.replicate_now().map(drop),
            };
            if let Err(e) = shipped {
                warn!(error = %e, "the handover's last delta set failed; retrying");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Undoes a handover that cannot finish: the VMs it stopped are started again and this
/// side stays the primary.
fn abort(d: &Daemon, mut steps: Steps, stopped: &[&Located], why: String) -> HandoverReply {
    let mut restarted = Vec::new();
    for vm in stopped {
        let start = steps.ms();
        let detail = match restart_vm(vm) {
            Ok(detail) => {
                restarted.push(vm.folder.as_str());
                detail
            }
            Err(e) => format!("FAILED: {e:#}"),
        };
        steps.push(format!("restart {}", vm.folder), start, detail);
    }
    let what = subject(d, &d.members[0]);
    HandoverReply {
        outcome: HandoverOutcome::Aborted,
        members: Vec::new(),
        steps: steps.steps,
        message: format!(
            "{why}; handover aborted: {what} stays the primary and keeps replicating, its other \
             VMs kept running{}",
            if restarted.is_empty() {
                String::new()
            } else {
                format!(
                    " and the ones it had stopped were started again ({})",
                    restarted.join(", ")
                )
            }
        ),
    }
}

/// Starts a VM again as `vapp vm start` would from a shell here (through the agent when one
/// runs), detached, and waits until its runner holds its lock.
fn restart_vm(vm: &Located) -> anyhow::Result<String> {
    let dir = lunspec::state_dir().join("replicas");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join(format!(
        "handover-restart{}.log",
        vm.folder.replace('/', "_")
    ));
    let out =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let exe = std::env::current_exe().context("cannot find the vapp executable")?;
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(exe)
        .args(["-d", &vm.lun, "vm", "start", &vm.folder])
        .env_remove("VAPP_DATASTORE")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .context("cannot run vapp vm start")?;
    let pid = child.id();
    // Reaped whenever it ends, so it never lingers as a zombie of this daemon.
    std::thread::spawn(move || child.wait());
    let deadline = Instant::now() + STEP_WAIT;
    loop {
        let ds = open_read_only(&vm.lun)?;
        let ino = crate::cmd::vm::folder_config_ino(&ds, &vm.folder)?;
        if crate::cmd::vm::lock_holders(&ds)?.contains_key(&ino) {
            return Ok(format!("started again (pid {pid}, log {})", log.display()));
        }
        if Instant::now() > deadline {
            bail!(
                "started (pid {pid}) but not running after {} s; see {}",
                STEP_WAIT.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The DR site's side: asks the primary to hand over and checks its answer.
pub(super) fn ask_peer(
    d: &Daemon,
    m: &Member,
    vms: &[(String, String)],
    stop_timeout_s: u64,
    force: bool,
) -> anyhow::Result<Reply> {
    let what = subject(d, m);
    let mut secondaries = Vec::new();
    for (member, side) in sides(d)? {
        match side {
            Side::Secondary(x) => secondaries.push((member, x)),
            Side::Primary(_) => bail!("{what}: already the primary here; nothing to hand over"),
        }
    }
    let peer = lock(&m.cfg).peer.clone();
    let addr = replica::resolve(&peer, "--peer")?;
    let request = HandoverRequest {
        vms: vms
            .iter()
            .map(|(datastore, path)| HandoverVm {
                datastore: datastore.clone(),
                path: path.clone(),
            })
            .collect(),
        stop_timeout_ms: stop_timeout_s.saturating_mul(1000),
        force,
    };
    let t0 = Instant::now();
    // Shorter than the control request's own limit, so the caller hears why.
    let wait = Duration::from_secs(
        stop_timeout_s
            .saturating_mul(2)
            .saturating_add(HANDOVER_SLACK_S - 10),
    );
    let answer = replication::handover::request_handover(
        addr,
        &m.secret,
        &request,
        replication::link_timeout(),
        wait,
    );
    let reply = match answer {
        Ok(r) => r,
        Err(HandoverError::Unreachable { reason, .. }) => {
            let why = if reason.contains("refused") {
                " (nothing listens there: its replication daemon is down, or is a vapp from \
                 before planned handover, in which case stop its VMs and run vapp replica \
                 demote there, then fail over planned again)"
            } else {
                ""
            };
            bail!(
                "{what}: the protected site's replication daemon at {peer} cannot be reached \
                 ({reason}){why}; nothing changed at either site. If that site is lost, run the \
                 failover unplanned"
            )
        }
        Err(HandoverError::Refused { reason, .. }) => {
            let old = if reason.contains("unknown message type") {
                " (a vapp there from before planned handover: stop its VMs and run vapp \
                 replica demote there, then fail over planned again)"
            } else {
                ""
            };
            bail!(
                "{what}: {peer} refused the planned handover: {reason}{old}; nothing changed at \
                 either site"
            )
        }
        Err(HandoverError::NoAnswer { reason, .. }) => bail!(
            "{what}: the planned handover request reached {peer} but no answer came back \
             ({reason}): that site may have stopped its VMs and demoted, or may still be the \
             primary. This site stays a secondary; see vapp replica status there, then run the \
             planned failover again (it asks again)"
        ),
    };
    let json = HandoverJson {
        outcome: reply.outcome.name().into(),
        peer: peer.clone(),
        message: reply.message.clone(),
        steps: reply
            .steps
            .iter()
            .map(|s| HandoverStepJson {
                step: s.step.clone(),
                start_ms: s.start_ms,
                end_ms: s.end_ms,
                detail: s.detail.clone(),
            })
            .collect(),
        took_ms: t0.elapsed().as_millis() as u64,
    };
    let failed = |message: String| Reply {
        handover: Some(json.clone()),
        ..Reply::failed(message)
    };
    let holds_all = match reply.outcome {
        HandoverOutcome::Refused | HandoverOutcome::Aborted => {
            return Ok(failed(format!(
                "{what}: {peer} {} the planned handover: {}",
                reply.outcome.name(),
                reply.message
            )));
        }
        HandoverOutcome::Demoted => {
            reply.members.len() == secondaries.len()
                && reply.members.iter().all(|r| r.dirty_regions == 0)
                && secondaries.iter().all(|(_, x)| {
                    let current = x.gens().current;
                    reply.members.iter().any(|r| r.generation == current)
                })
        }
        // It answers for the LUN this side asked through, which is also the one checked.
        HandoverOutcome::AlreadySecondary => {
            let asked = secondaries
                .iter()
                .find(|(member, _)| member.spec.typed == m.spec.typed)
                .map(|(_, x)| x.gens().current);
            reply.members.first().is_some_and(|r| {
                r.dirty_regions == 0
                    && asked.is_some_and(|c| r.bitmap_generation == c || r.generation == c)
            })
        }
    };
    if !holds_all {
        return Ok(failed(format!(
            "{what}: {peer} is a secondary now, but this replica does not hold every write it \
             acknowledged (its generations {:?}, this side's {:?}): promoting would lose them, \
             so nothing changed here; bring the link up (vapp replica promote at {peer} \
             resumes replication from there), then retry",
            reply.members,
            secondaries
                .iter()
                .map(|(_, x)| x.gens().current)
                .collect::<Vec<_>>()
        )));
    }
    // The old primary closed its link as it demoted; a promote waits for it to be gone.
    let deadline = Instant::now() + replication::link_timeout() + Duration::from_secs(2);
    while secondaries.iter().any(|(_, x)| x.is_connected()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Reply {
        handover: Some(json),
        ..Reply::done(format!("{what}: {peer} handed over: {}", reply.message))
    })
}
