//! `vapp dr ...`: recovery plans run at the DR site (see the `dr` crate for the plan and
//! the report). A drill copies the replicas at one point through their replication
//! daemons (writable snapshot sessions taken between applied writes), resignatures the
//! datastore copies, and starts and verifies the plan's VMs from them, while replication
//! goes on and the replicas are never written. What a drill set up is recorded in
//! `$VAPP_STATE_DIR/dr/PLAN/active.json` until `dr cleanup`; every drill's record stays
//! in `dr/PLAN/drills/`.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dr::report::{PointRecord, secs};
use dr::{DrillRecord, Outcome, Plan, ReplicaRef, StepRecord, VmResult};
use serde::{Deserialize, Serialize};

use crate::cmd::dr_net::{self, Networking, Nics};
use crate::cmd::replica::{self, PointJson, Request, Role};
use crate::lunspec::{self, Spec};
use crate::outln;

#[derive(Subcommand)]
pub enum DrCommand {
    /// Check a recovery plan against this (DR) site; changes nothing.
    Validate(PlanArg),
    /// Drill: start the plan's VMs from copies of the replicas, verify and report.
    Test(TestArgs),
    /// Stop a drill's VMs and delete its copies; checks that nothing of it remains.
    Cleanup(PlanArg),
    /// The plan's drills and failovers, oldest first.
    History(HistoryArgs),
    /// Real recovery at this site: promote the replicas and start the plan's VMs on them.
    Failover(FailoverArgs),
    /// After a failover: wait until this site replicates back to the old protected site
    /// (only what changed is copied) and report it; failover run there brings VMs home.
    Reprotect(ReprotectArgs),
}

#[derive(Args)]
pub struct ReprotectArgs {
    pub plan: PathBuf,
    /// How long to wait for the other site to rejoin and catch up, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Args)]
pub struct FailoverArgs {
    pub plan: PathBuf,
    /// The protected site is up: ask it, over the replication link, to stop the plan's VMs,
    /// ship its last writes and demote itself, and promote here only once it has, so
    /// nothing is lost. Refused, changing nothing, when it cannot be reached.
    #[arg(long)]
    pub planned: bool,
    /// Planned: seconds each VM at the protected site gets to shut down after its power
    /// button.
    #[arg(long, default_value_t = 60, value_name = "S")]
    pub stop_timeout: u64,
    /// Planned: power off a VM still running after the stop timeout, instead of aborting
    /// the failover.
    #[arg(long)]
    pub force_stop: bool,
    /// Write the failover's report as an HTML page.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PlanArg {
    pub plan: PathBuf,
}

#[derive(Args)]
pub struct TestArgs {
    pub plan: PathBuf,
    /// Write the drill's report as an HTML page.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print the drill's record as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct HistoryArgs {
    pub plan: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: DrCommand) -> anyhow::Result<ExitCode> {
    match command {
        DrCommand::Validate(a) => {
            let (plan, site) = load_checked(&a.plan)?;
            dr_net::check_recovery_network(&plan, None)?;
            outln!(
                "plan {}: valid: {} replica(s) ({} LUNs), {} datastore(s), {} VM(s) in {} priority group(s)",
                plan.name,
                plan.replicas.len(),
                site.luns().len(),
                plan.datastores.len(),
                plan.vms.len(),
                plan.start_order().len()
            )?;
            let with_nics = site.nics.values().filter(|n| !n.is_empty()).count();
            if with_nics > 0 {
                outln!(
                    "  {with_nics} VM(s) with NICs: a drill puts them on an isolated network {}-XXXX of its own; a failover on {}",
                    plan.drill_network_prefix(),
                    plan.recovery_network
                        .as_ref()
                        .map_or("the networks their vm.toml names".into(), |n| format!(
                            "the recovery network {n}"
                        ))
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DrCommand::Test(a) => test(&a),
        DrCommand::Cleanup(a) => cleanup(&a.plan),
        DrCommand::History(a) => history(&a),
        DrCommand::Failover(a) => failover(&a),
        DrCommand::Reprotect(a) => reprotect(&a),
    }
}

/// One `[[replica]]` as this site has it: the LUN its daemon is asked through, and every
/// LUN the point covers (a group: all its members).
struct Replica {
    what: String,
    ask: Spec,
    luns: Vec<Spec>,
}

struct Site {
    replicas: Vec<Replica>,
    /// The networks of each plan VM's NICs, as its vm.toml on the replica names them.
    nics: Nics,
}

impl Site {
    fn luns(&self) -> Vec<&Spec> {
        self.replicas.iter().flat_map(|r| r.luns.iter()).collect()
    }
}

fn load_checked(path: &Path) -> anyhow::Result<(Plan, Site)> {
    let plan = Plan::load(path)?;
    let site = check_site(&plan)?;
    Ok((plan, site))
}

/// The checks that need this site: every replica is a running, consistent secondary,
/// every datastore is on one of them, every VM is on its datastore's replica.
fn check_site(plan: &Plan) -> anyhow::Result<Site> {
    check_site_for(plan, false)
}

/// [`check_site`]; for a failover a replica already promoted (a failover run again) and
/// one mid-resync (promote returns it to its last point) are accepted.
fn check_site_for(plan: &Plan, failover: bool) -> anyhow::Result<Site> {
    let p = &plan.name;
    let mut replicas = Vec::new();
    for r in &plan.replicas {
        replicas.push(check_replica(p, r, failover)?);
    }
    let mut site = Site {
        replicas,
        nics: Nics::new(),
    };
    for d in &plan.datastores {
        let spec = Spec::parse(&d.lun);
        if !site.luns().iter().any(|l| l.source == spec.source) {
            if replica::load(&spec)?.is_none() {
                bail!(
                    "plan {p}: datastore {}: LUN {} is not replicated on this host",
                    d.name,
                    d.lun
                );
            }
            bail!(
                "plan {p}: datastore {}: LUN {} is not one of the plan's [[replica]] LUNs",
                d.name,
                d.lun
            );
        }
    }
    let mut by_ds: BTreeMap<&str, Vec<&dr::VmEntry>> = BTreeMap::new();
    for vm in &plan.vms {
        by_ds.entry(vm.datastore.as_str()).or_default().push(vm);
    }
    for (name, vms) in by_ds {
        let Some(d) = plan.datastore(name) else {
            continue;
        };
        // Replication writes the replica while this reads it: a metadata unit caught
        // mid-write fails its checksum, and is read whole a moment later.
        let mut tries = 0;
        let ds = loop {
            match super::datastore::open_datastore(&d.lun, &vmfs::OpenOptions::read_only()) {
                Ok(ds) => break ds,
                Err(_) if tries < 3 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("plan {p}: datastore {name} on replica {}", d.lun)
                    });
                }
            }
        };
        for entry in vms {
            let vm = &entry.path;
            let config = format!("{}/vm.toml", vm.trim_end_matches('/'));
            let Ok(attr) = ds.stat_path(&config) else {
                bail!(
                    "plan {p}: vm {vm}: not found on datastore {name} (replica {}): no {config}",
                    d.lun
                );
            };
            let networks = dr_net::vm_networks(p, entry, &ds, &config, attr)?;
            site.nics
                .insert((entry.datastore.clone(), vm.clone()), networks);
        }
    }
    Ok(site)
}

fn check_replica(p: &str, r: &ReplicaRef, failover: bool) -> anyhow::Result<Replica> {
    let members: Vec<(Spec, replica::Config)> = match (&r.lun, &r.group) {
        (Some(lun), _) => {
            let spec = Spec::parse(lun);
            let Some(cfg) = replica::load(&spec)? else {
                bail!("plan {p}: replica {lun}: LUN not replicated on this host");
            };
            match &cfg.group {
                Some(g) => replica::group_members(g)?,
                None => vec![(spec, cfg)],
            }
        }
        (None, Some(g)) => {
            let m = replica::group_members(g)?;
            if m.is_empty() {
                bail!("plan {p}: replica group {g}: no such consistency group on this host");
            }
            m
        }
        (None, None) => bail!("plan {p}: a [[replica]] names neither lun nor group"),
    };
    let what = r.describe();
    for (spec, cfg) in &members {
        let lun = &spec.typed;
        if cfg.role != Role::Secondary && !failover {
            bail!(
                "plan {p}: replica {lun}: a replication primary on this host; a plan runs at the DR site, on the secondary"
            );
        }
        if let Some(peer) = &r.peer
            && *peer != cfg.peer
        {
            bail!(
                "plan {p}: replica {lun}: replicates from {}, not the plan's peer {peer}",
                cfg.peer
            );
        }
        let reply = replica::ask(spec, &Request::Status).with_context(|| {
            format!(
                "plan {p}: replica {lun}: its daemon is not running (vapp replica resume {lun})"
            )
        })?;
        let status = reply
            .status
            .with_context(|| format!("plan {p}: replica {lun}: its daemon sent no status"))?;
        if !failover && lunspec::existing_pool(spec)?.is_none() {
            bail!(
                "plan {p}: replica {lun}: has no snapshot pool, so a drill cannot copy it; make one with vapp snapshot create {lun} NAME --pool POOL before vapp replica create"
            );
        }
        if !failover && status.secondary.as_ref().is_some_and(|s| s.inconsistent) {
            bail!(
                "plan {p}: replica {lun}: not consistent (a resync is in progress); wait until `vapp replica status` shows it done"
            );
        }
    }
    let ask = members[0].0.clone();
    Ok(Replica {
        what,
        ask,
        luns: members.into_iter().map(|(s, _)| s).collect(),
    })
}

/// What a drill set up, so `cleanup` can undo it even after a crash of `dr test`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Active {
    drill: String,
    session: String,
    /// Every LUN that has the drill's session.
    luns: Vec<String>,
    vms: Vec<ActiveVm>,
    /// The drill's isolated network, once it is (about to be) created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    network: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ActiveVm {
    /// `LUN@SESSION`: the copy the VM runs from.
    datastore: String,
    path: String,
    pid: u32,
}

fn plan_dir(plan: &Plan) -> PathBuf {
    lunspec::state_dir().join("dr").join(&plan.name)
}

fn active_path(plan: &Plan) -> PathBuf {
    plan_dir(plan).join("active.json")
}

fn save_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let dir = path.parent().context("a state file has a folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn load_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: damaged", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn now_ms() -> u64 {
    replication::now_ms()
}

/// `vapp ARGS` as a child, with this process's registry and runtime directories.
fn vapp(args: &[&str]) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("cannot find the vapp executable")?;
    let mut c = Command::new(exe);
    c.args(args)
        .env_remove("VAPP_DATASTORE")
        .env_remove(vmfs::KEEP_SIGNATURE_ENV)
        .stdin(Stdio::null());
    Ok(c)
}

/// Runs `vapp ARGS` to the end; its last error line when it fails.
fn vapp_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = vapp(args)?
        .output()
        .with_context(|| format!("cannot run vapp {}", args.join(" ")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    bail!("{}", line.trim_start_matches("vapp: "))
}

fn test(a: &TestArgs) -> anyhow::Result<ExitCode> {
    let (plan, site) = load_checked(&a.plan)?;
    let active_file = active_path(&plan);
    if let Some(active) = load_json::<Active>(&active_file)? {
        bail!(
            "plan {}: drill {} is still set up; vapp dr cleanup {} first",
            plan.name,
            active.drill,
            a.plan.display()
        );
    }
    let started = Instant::now();
    let started_unix_ms = now_ms();
    let drill = format!("drill-{started_unix_ms}");
    let session = format!("dr-{}-{started_unix_ms}", plan.name);
    let mut active = Active {
        drill: drill.clone(),
        session: session.clone(),
        ..Active::default()
    };
    save_json(&active_file, &active)?;
    let mut record = DrillRecord::begin(&plan, drill.clone(), "test", started_unix_ms);
    let ran = drill_steps(
        &plan,
        &site,
        &session,
        &mut active,
        &mut record,
        (started, started_unix_ms),
    );
    if let Err(e) = ran {
        record.failures.push(format!("{e:#}"));
    }
    save_json(&active_file, &active)?;
    finish(&plan, record, a.report.as_deref(), a.json)
}

fn print_summary(r: &DrillRecord) -> anyhow::Result<()> {
    outln!(
        "drill {} of plan {}: {}",
        r.drill,
        r.plan,
        if r.passed { "passed" } else { "FAILED" }
    )?;
    outln!(
        "  RPO {} (target {}), RTO {} (target {}); copies {}, resignature {}",
        r.rpo_ms.map_or("-".into(), secs),
        r.rpo_target_s.map_or("-".into(), |t| format!("{t} s")),
        r.rto_ms.map_or("-".into(), secs),
        r.rto_target_s.map_or("-".into(), |t| format!("{t} s")),
        secs(r.snapshot_ms),
        secs(r.open_ms)
    )?;
    match (&r.network, r.kind.as_str()) {
        (Some(n), "test") => outln!(
            "  NICs on the drill's isolated network {n} (created in {})",
            secs(r.network_ms)
        )?,
        (Some(n), _) => outln!("  NICs on the recovery network {n}")?,
        (None, _) => {}
    }
    for v in &r.vms {
        outln!(
            "  [{}] {} ({}): {:?}, boot {}: {}",
            v.priority,
            v.path,
            v.datastore,
            v.outcome,
            v.boot_ms().map_or("-".into(), secs),
            v.detail
        )?;
    }
    for st in &r.steps {
        outln!(
            "  {} at {} ({}, {}): {}",
            st.step,
            secs(st.start_ms),
            st.site,
            secs(st.end_ms.saturating_sub(st.start_ms)),
            st.detail
        )?;
    }
    for f in &r.failures {
        outln!("  failed: {f}")?;
    }
    Ok(())
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

fn drill_steps(
    plan: &Plan,
    site: &Site,
    session: &str,
    active: &mut Active,
    record: &mut DrillRecord,
    (started, started_unix_ms): (Instant, u64),
) -> anyhow::Result<()> {
    let active_file = active_path(plan);
    for r in &site.replicas {
        let reply = replica::ask(
            &r.ask,
            &Request::DrillPoint {
                name: session.to_string(),
            },
        )?;
        let point: PointJson = match reply.point {
            Some(point) if reply.ok => point,
            _ => bail!("replica {}: {}", r.what, reply.message),
        };
        active.luns.extend(point.luns.iter().cloned());
        save_json(&active_file, active)?;
        record.points.push(PointRecord {
            replica: r.what.clone(),
            luns: point.luns.clone(),
            mode: format!("{:?}", point.mode).to_lowercase(),
            point_unix_ms: point.point_ms,
            rpo_ms: point.taken_ms.saturating_sub(point.point_ms),
            session: session.to_string(),
        });
    }
    record.rpo_ms = record.points.iter().map(|p| p.rpo_ms).max();
    record.snapshot_ms = elapsed_ms(started);
    for d in &plan.datastores {
        let copy = format!("{}@{session}", d.lun);
        let label = format!("{}-{}", d.name, record.drill);
        // The session was taken by this drill and is served only to it: no host can
        // have it mounted, so its frozen heartbeats are not watched.
        let lun = lunspec::open(&copy, true)?;
        vmfs::resignature_frozen(lun, Some(&label))
            .with_context(|| format!("datastore {}: cannot resignature its copy {copy}", d.name))?;
        record.copies.push((copy, label));
    }
    record.open_ms = elapsed_ms(started) - record.snapshot_ms;
    // The copies' VMs have production's addresses and MACs: their NICs go on a network of
    // the drill's own, which nothing else reaches.
    if dr_net::any_nic(&site.nics) {
        let network = dr_net::create_drill_network(plan, started_unix_ms, &mut |name| {
            active.network = name.map(str::to_string);
            save_json(&active_file, active)
        })?;
        record.network = Some(network);
        record.network_ms = elapsed_ms(started) - record.snapshot_ms - record.open_ms;
    }
    let mut networking = Networking::new(record.network.clone(), site.nics.clone());
    let on_disk = |d: &dr::plan::DatastoreEntry| format!("{}@{session}", d.lun);
    start_by_priority(
        plan,
        &on_disk,
        false,
        started,
        record,
        &mut networking,
        &mut |vm| {
            active.vms.push(vm);
            save_json(&active_file, active)
        },
    )
}

/// Starts the plan's VMs by priority group from the datastores `on_disk` names, each as
/// its own `vm start` process that outlives this command, and verifies each group before
/// the next starts.
fn start_by_priority(
    plan: &Plan,
    on_disk: &dyn Fn(&dr::plan::DatastoreEntry) -> String,
    keep_signature: bool,
    started: Instant,
    record: &mut DrillRecord,
    networking: &mut Networking,
    spawned: &mut dyn FnMut(ActiveVm) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let logs = plan_dir(plan).join("drills").join(&record.drill);
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    for group in plan.start_order() {
        let mut running = Vec::new();
        for vm in group {
            let d = plan
                .datastore(&vm.datastore)
                .context("a checked plan names its datastores")?;
            let lun = on_disk(d);
            let file = vm.path.trim_matches('/').replace('/', "_");
            let console = logs.join(format!("{file}.console"));
            let log = logs.join(format!("{file}.log"));
            let mut result = VmResult {
                path: vm.path.clone(),
                datastore: vm.datastore.clone(),
                priority: vm.priority,
                verify: vm.verify.describe(),
                start_ms: Some(elapsed_ms(started)),
                running_ms: None,
                done_ms: None,
                outcome: Outcome::Failed,
                detail: String::new(),
            };
            let console_arg = console.to_string_lossy().into_owned();
            let child = std::fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))
                .and_then(|stderr| {
                    let mut c = vapp(&[
                        "-d",
                        &lun,
                        "vm",
                        "start",
                        &vm.path,
                        "--foreground",
                        "--console-log",
                        &console_arg,
                    ])?;
                    c.args(dr_net::start_args(networking));
                    if keep_signature {
                        c.env(vmfs::KEEP_SIGNATURE_ENV, "1");
                    }
                    // Its own process group: the VMs outlive this command and a Ctrl-C
                    // of it does not reach them.
                    c.stdout(Stdio::null()).stderr(stderr).process_group(0);
                    c.spawn().context("cannot run vapp vm start")
                });
            match child {
                Ok(child) => {
                    spawned(ActiveVm {
                        datastore: lun.clone(),
                        path: vm.path.clone(),
                        pid: child.id(),
                    })?;
                    running.push((vm, child, console, log, result));
                }
                Err(e) => {
                    result.detail = format!("{e:#}");
                    result.done_ms = Some(elapsed_ms(started));
                    record.vms.push(result);
                }
            }
        }
        verify_group(running, started, record, networking)?;
    }
    Ok(())
}

/// Waits until every VM of a priority group is verified, failed or out of time.
fn verify_group(
    mut running: Vec<(&dr::VmEntry, Child, PathBuf, PathBuf, VmResult)>,
    started: Instant,
    record: &mut DrillRecord,
    networking: &mut Networking,
) -> anyhow::Result<()> {
    let patterns: Vec<Option<regex::Regex>> = running
        .iter()
        .map(|(vm, ..)| {
            vm.verify
                .console_pattern()
                .map(|p| regex::Regex::new(&p))
                .transpose()
        })
        .collect::<Result<_, _>>()
        .context("a checked plan's patterns compile")?;
    let mut pending: Vec<usize> = (0..running.len()).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for i in pending {
            let (vm, child, console, log, result) = &mut running[i];
            let now = elapsed_ms(started);
            let log_text = read_text(log);
            if result.running_ms.is_none() && log_text.contains(") started:") {
                result.running_ms = Some(now);
            }
            let done = if let Some(re) = &patterns[i] {
                let text = read_text(console);
                text.lines()
                    .find(|l| re.is_match(l))
                    .map(|l| (Outcome::Verified, format!("console: {}", l.trim())))
            } else if let Some(target) = vm.verify.ping
                && result.running_ms.is_some()
            {
                match networking.ping(vm, target) {
                    Ok(answer) => answer.map(|detail| (Outcome::Verified, detail)),
                    Err(e) => Some((Outcome::Failed, format!("{e:#}"))),
                }
            } else {
                None
            };
            let done = match done {
                Some(d) => Some(d),
                None => match child.try_wait() {
                    Ok(Some(status)) => Some(exited(vm, status.code(), &log_text)),
                    Ok(None) => None,
                    Err(e) => Some((Outcome::Failed, format!("cannot wait for vm start: {e}"))),
                },
            };
            let done = match done {
                Some(d) => Some(d),
                None if now.saturating_sub(result.start_ms.unwrap_or(0)) > vm.timeout_s * 1000 => {
                    Some((
                        Outcome::Failed,
                        format!("not verified within {} s ({})", vm.timeout_s, result.verify),
                    ))
                }
                None => None,
            };
            match done {
                Some((outcome, detail)) => {
                    result.outcome = outcome;
                    result.detail = detail;
                    result.done_ms = Some(now);
                }
                None => still.push(i),
            }
        }
        pending = still;
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (_, child, _, _, result) in running {
        // Reaped now if it ended; a running VM is left to `dr cleanup`.
        drop(child);
        record.vms.push(result);
    }
    Ok(())
}

/// A VM process that ended: verified when the plan wanted it to power off with that status.
fn exited(vm: &dr::VmEntry, code: Option<i32>, log: &str) -> (Outcome, String) {
    let last = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    match (vm.verify.exit_status, code) {
        (Some(0), Some(0)) => (Outcome::Verified, "powered off with status 0".into()),
        (Some(want), Some(3))
            if log.contains(&format!("{want:#x}")) || log.contains(&format!("status {want}")) =>
        {
            (Outcome::Verified, format!("powered off with status {want}"))
        }
        _ => (
            Outcome::Failed,
            format!(
                "vm start ended ({}) before it was verified: {last}",
                code.map_or("killed".into(), |c| format!("exit status {c}"))
            ),
        ),
    }
}

fn read_text(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn cleanup(path: &Path) -> anyhow::Result<ExitCode> {
    let plan = Plan::load(path)?;
    let active_file = active_path(&plan);
    let Some(active) = load_json::<Active>(&active_file)? else {
        outln!("plan {}: no drill to clean up", plan.name)?;
        return Ok(ExitCode::SUCCESS);
    };
    let mut problems = Vec::new();
    for vm in &active.vms {
        if !alive(vm.pid) {
            continue;
        }
        if let Err(e) = vapp_ok(&[
            "-d",
            &vm.datastore,
            "vm",
            "stop",
            &vm.path,
            "--force",
            "--timeout",
            "10",
        ]) {
            tracing::warn!(vm = %vm.path, error = %e, "vm stop failed; killing its process");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(vm.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while alive(vm.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(vm.pid) {
            problems.push(format!("vm {} (pid {}) is still running", vm.path, vm.pid));
        }
    }
    let mut luns = active.luns.clone();
    luns.dedup();
    for lun in &luns {
        if let Err(e) = vapp_ok(&["snapshot", "delete", lun, &active.session]) {
            let gone = e.to_string().contains("no snapshot session")
                || e.to_string().contains("unknown session");
            if !gone {
                problems.push(format!("{lun}@{}: {e:#}", active.session));
            }
        }
    }
    // What must be gone now: the sessions (their pool space), their NBD sockets, and
    // every VM process of the drill (its locks go with it).
    for lun in &luns {
        let listing = vapp_ok(&["snapshot", "list", lun, "--json"])?;
        let listing: serde_json::Value = serde_json::from_str(&listing)
            .with_context(|| format!("{lun}: snapshot list --json is not JSON"))?;
        let left = listing["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x["name"] == active.session.as_str()));
        if left {
            problems.push(format!("{lun}: session {} remains", active.session));
        }
        let socket = lunspec::session_socket(&Spec::parse(lun), &active.session);
        if socket.exists() {
            problems.push(format!(
                "{lun}: session socket {} remains",
                socket.display()
            ));
        }
    }
    for vm in &active.vms {
        if alive(vm.pid) {
            problems.push(format!("vm {} (pid {}) is still running", vm.path, vm.pid));
        }
    }
    // The network last: its VMs' taps went with their processes.
    let pids: Vec<u32> = active.vms.iter().map(|v| v.pid).collect();
    match &active.network {
        Some(network) => problems.extend(dr_net::delete_drill_network(network, &pids)),
        None => problems.extend(
            dr_net::leftover_taps(&pids)
                .into_iter()
                .map(|t| format!("tap {t} remains")),
        ),
    }
    if !problems.is_empty() {
        bail!(
            "plan {}: drill {} not fully cleaned up: {}",
            plan.name,
            active.drill,
            problems.join("; ")
        );
    }
    std::fs::remove_file(&active_file)
        .with_context(|| format!("cannot remove {}", active_file.display()))?;
    let network = active
        .network
        .as_ref()
        .map_or(String::new(), |n| format!(", network {n} deleted"));
    outln!(
        "plan {}: drill {} cleaned up: {} VM process(es) stopped, session {} deleted from {} LUN(s){network}; checked: no session, session socket, VM process, bridge or tap of it remains",
        plan.name,
        active.drill,
        active.vms.len(),
        active.session,
        luns.len()
    )?;
    Ok(ExitCode::SUCCESS)
}

fn history(a: &HistoryArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::load(&a.plan)?;
    let dir = plan_dir(&plan).join("drills");
    let mut records: Vec<DrillRecord> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json")
                && let Some(r) = load_json::<DrillRecord>(&p)?
            {
                records.push(r);
            }
        }
    }
    records.sort_by_key(|r| r.started_unix_ms);
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&records)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        outln!("plan {}: no drills yet", plan.name)?;
    }
    for r in &records {
        let verified = r
            .vms
            .iter()
            .filter(|v| v.outcome == Outcome::Verified)
            .count();
        outln!(
            "{}  {}  RPO {}  RTO {}  VMs verified {verified}/{}",
            r.drill,
            if r.passed { "passed" } else { "FAILED" },
            r.rpo_ms.map_or("-".into(), secs),
            r.rto_ms.map_or("-".into(), secs),
            r.vms.len()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn failover(a: &FailoverArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::load(&a.plan)?;
    let site = check_site_for(&plan, true)?;
    dr_net::check_recovery_network(&plan, Some(&site.nics))?;
    if let Some(active) = load_json::<Active>(&active_path(&plan))? {
        bail!(
            "plan {}: drill {} is still set up; vapp dr cleanup {} first",
            plan.name,
            active.drill,
            a.plan.display()
        );
    }
    let started = Instant::now();
    let started_unix_ms = now_ms();
    let kind = if a.planned {
        "failover-planned"
    } else {
        "failover-unplanned"
    };
    let mut record = DrillRecord::begin(
        &plan,
        format!("{kind}-{started_unix_ms}"),
        kind,
        started_unix_ms,
    );
    if a.planned {
        // Every replica is handed over before any is promoted: nothing here changes until
        // the protected site has stopped writing and the replicas hold all it wrote.
        for r in &site.replicas {
            hand_over(&plan, r, a, started, &mut record)?;
        }
    }
    let ran = (|| -> anyhow::Result<()> {
        for r in &site.replicas {
            let before = replica::ask(&r.ask, &Request::Status)?.status;
            let start = elapsed_ms(started);
            promote(r, !a.planned)?;
            record.steps.push(StepRecord {
                step: format!("promote {}", r.what),
                site: "here".into(),
                start_ms: start,
                end_ms: elapsed_ms(started),
                detail: if a.planned {
                    "the replica is the primary".into()
                } else {
                    "forced: the protected site is taken for lost".into()
                },
            });
            let now = now_ms();
            // Synchronous: every acknowledged write is here. Asynchronous: the last delta
            // set applied whole (a planned failover shipped a last one first).
            let point = before
                .as_ref()
                .and_then(|s| s.secondary.as_ref())
                .and_then(|x| x.point_in_time_ms)
                .filter(|_| {
                    !a.planned
                        && before
                            .as_ref()
                            .is_some_and(|s| s.mode == replica::ModeName::Async)
                })
                .unwrap_or(now);
            record.points.push(PointRecord {
                replica: r.what.clone(),
                luns: r.luns.iter().map(|l| l.typed.clone()).collect(),
                mode: before
                    .as_ref()
                    .map_or("sync".into(), |s| format!("{:?}", s.mode).to_lowercase()),
                point_unix_ms: point,
                rpo_ms: now.saturating_sub(point),
                session: String::new(),
            });
        }
        record.rpo_ms = record.points.iter().map(|p| p.rpo_ms).max();
        record.snapshot_ms = elapsed_ms(started);
        let on_lun = |d: &dr::plan::DatastoreEntry| d.lun.clone();
        // The replicas carry the protected datastores' signatures: they now stand in for
        // the originals, which are gone from this site's view.
        record.network.clone_from(&plan.recovery_network);
        let mut networking = Networking::new(plan.recovery_network.clone(), site.nics.clone());
        let start = elapsed_ms(started);
        let started_vms = start_by_priority(
            &plan,
            &on_lun,
            true,
            started,
            &mut record,
            &mut networking,
            &mut |_| Ok(()),
        );
        let verified = record
            .vms
            .iter()
            .filter(|v| v.outcome == Outcome::Verified)
            .count();
        record.steps.push(StepRecord {
            step: "start and verify VMs".into(),
            site: "here".into(),
            start_ms: start,
            end_ms: elapsed_ms(started),
            detail: format!("{verified} of {} VM(s) verified", plan.vms.len()),
        });
        started_vms
    })();
    if let Err(e) = ran {
        record.failures.push(format!("{e:#}"));
    }
    finish(&plan, record, a.report.as_deref(), a.json)
}

/// Asks the protected site, through this replica's daemon, to stop the plan's VMs on it,
/// ship its last writes and demote itself; records what it did. A refusal, an abort or no
/// answer is an error and nothing here has changed.
fn hand_over(
    plan: &Plan,
    r: &Replica,
    a: &FailoverArgs,
    started: Instant,
    record: &mut DrillRecord,
) -> anyhow::Result<()> {
    let p = &plan.name;
    let status = replica::ask(&r.ask, &Request::Status)?
        .status
        .with_context(|| format!("plan {p}: replica {}: its daemon sent no status", r.what))?;
    if status.role == Role::Primary {
        // A failover run again after its promote: the handover is done.
        return Ok(());
    }
    let mut vms = Vec::new();
    for d in &plan.datastores {
        let source = Spec::parse(&d.lun).source;
        if !r.luns.iter().any(|l| l.source == source) {
            continue;
        }
        let ds = super::datastore::open_datastore(&d.lun, &vmfs::OpenOptions::read_only())
            .with_context(|| format!("plan {p}: datastore {} on replica {}", d.name, d.lun))?;
        let uuid = ds.superblock().uuid.to_string();
        for vm in plan.vms.iter().filter(|v| v.datastore == d.name) {
            vms.push((uuid.clone(), vm.path.clone()));
        }
    }
    let start = elapsed_ms(started);
    let reply = replica::ask(
        &r.ask,
        &Request::Handover {
            vms,
            stop_timeout_s: a.stop_timeout,
            force: a.force_stop,
        },
    )?;
    let mut steps = String::new();
    if let Some(h) = &reply.handover {
        for s in &h.steps {
            record.steps.push(StepRecord {
                step: s.step.clone(),
                site: format!("protected ({})", h.peer),
                start_ms: start + s.start_ms,
                end_ms: start + s.end_ms,
                detail: s.detail.clone(),
            });
            steps.push_str(&format!("\n  at {}: {}: {}", h.peer, s.step, s.detail));
        }
    }
    if !reply.ok {
        let hint = if !a.force_stop && reply.message.contains("did not power off") {
            " (with --force-stop a VM still running after --stop-timeout is powered off)"
        } else {
            ""
        };
        bail!(
            "plan {p}: planned failover refused, nothing changed at this site: {}{hint}{steps}",
            reply.message
        );
    }
    record.steps.push(StepRecord {
        step: format!("handover of {}", r.what),
        site: "here".into(),
        start_ms: start,
        end_ms: elapsed_ms(started),
        detail: reply.message,
    });
    Ok(())
}

/// Concludes a drill's or a failover's record: kept in the plan's history, its report written
/// where asked, and printed; the exit status says whether it passed.
fn finish(
    plan: &dr::plan::Plan,
    mut record: DrillRecord,
    report: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    record.conclude();
    save_json(
        &plan_dir(plan)
            .join("drills")
            .join(format!("{}.json", record.drill)),
        &record,
    )?;
    if let Some(path) = report {
        std::fs::write(path, record.html())
            .with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&record)?)?;
    } else {
        print_summary(&record)?;
    }
    Ok(if record.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Promotes a replica (a group: all its members) and waits for its daemon to run as the
/// primary. `force` takes over from a primary this side still believes connected (the
/// protected site is gone but its link has not timed out yet).
fn promote(r: &Replica, force: bool) -> anyhow::Result<()> {
    // While the daemon restarts in its new role it answers from the registry (role primary,
    // no generation) before it serves writers; a VM started then would be refused.
    let is_primary = |spec: &Spec| {
        replica::ask(spec, &Request::Status)
            .ok()
            .and_then(|reply| reply.status)
            .is_some_and(|s| s.role == Role::Primary && s.running && s.generation.current != 0)
    };
    if r.luns.iter().all(is_primary) {
        return Ok(());
    }
    let reply = replica::ask(&r.ask, &Request::Promote { force })?;
    if !reply.ok {
        bail!("replica {}: cannot promote: {}", r.what, reply.message);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !r.luns.iter().all(is_primary) {
        if Instant::now() > deadline {
            bail!(
                "replica {}: its daemon did not come back as the primary within 30 s",
                r.what
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!(replica = %r.what, "promoted");
    Ok(())
}

/// The replication engine turns round by itself once the old primary is a secondary (it
/// was demoted before a planned failover, or `vapp replica demote LUN --discard-local`
/// there after an unplanned one): the promoted side copies only the regions either side
/// wrote since they parted. This waits for that and says what it copied.
fn reprotect(a: &ReprotectArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::load(&a.plan)?;
    let site = check_site_for(&plan, true)?;
    let p = &plan.name;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    for r in &site.replicas {
        for lun in &r.luns {
            let typed = &lun.typed;
            loop {
                let s = replica::ask(lun, &Request::Status)?
                    .status
                    .with_context(|| format!("plan {p}: {typed}: its daemon sent no status"))?;
                if s.role != Role::Primary {
                    bail!(
                        "plan {p}: replica {typed}: still a secondary here; vapp dr failover {} first",
                        a.plan.display()
                    );
                }
                if s.link == "connected" && s.out_of_sync_bytes == 0 {
                    outln!(
                        "plan {p}: {typed} replicates to {} again: {} copied back ({} regions were out of sync of {} bytes), {} discarded there",
                        s.peer,
                        human(s.bytes_resynced),
                        s.resync.regions_total,
                        lun_size(typed),
                        s.peer_regions_discarded
                    )?;
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "plan {p}: replica {typed}: {} has not rejoined as a secondary within {} s (link {}); at that site run vapp replica demote on its LUN (with --discard-local after an unplanned failover: its writes since are discarded)",
                        s.peer,
                        a.timeout,
                        s.link
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn lun_size(typed: &str) -> u64 {
    lunspec::open_raw(typed, true).map_or(0, |l| l.size())
}

fn human(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{bytes} bytes")
    }
}
