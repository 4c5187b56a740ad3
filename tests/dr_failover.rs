//! Real recovery with `vapp dr failover`: site A runs test guests writing to a datastore
//! replicated synchronously to site B. Unplanned: A is killed (its VM and its replication
//! daemon kill -9, the link cut) and B comes up with every write A's guest had
//! acknowledged. Planned: B asks A over the replication link to stop its VMs, ship its last
//! writes and demote itself, then takes over; the replication turns round by itself (only
//! what changed goes back), and a planned failover at A brings the VMs home the same way.
//! A VM at A that will not stop aborts it with A still the primary; an A that cannot be
//! reached, a wrong secret and a VM that is not on the replicated LUN are refused.
#![allow(clippy::unwrap_used)]

mod dr_support;
mod replica_support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use dr_support::*;
use replication::handover::{
    HandoverError, HandoverOutcome, HandoverReply, HandoverRequest, HandoverVm, request_handover,
};
use serde_json::Value;

const WEB: &str = r#"
[[vm]]
path = "/vms/web"
datastore = "prod"
verify.ready = true
"#;

/// `dr failover` at `site`, which cannot reach `other`'s storage.
fn failover(site: &Site, other: &Site, plan: &str, planned: bool) -> Value {
    failover_with(site, other, plan, planned, &[])
}

fn failover_with(site: &Site, other: &Site, plan: &str, planned: bool, extra: &[&str]) -> Value {
    let mut args = vec!["dr", "failover", plan, "--json"];
    if planned {
        args.push("--planned");
    }
    args.extend_from_slice(extra);
    let out = isolated(site, other, &args);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "site {}: dr failover failed: {text}{}{}",
        site.name,
        String::from_utf8_lossy(&out.stderr),
        site.logs()
    );
    let record: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(record["passed"], true, "{record:#}");
    for vm in record["vms"].as_array().unwrap() {
        assert_eq!(vm["outcome"], "verified", "{record:#}");
    }
    record
}

/// The counter guest's disk as `site` reads it from the datastore on `lun`.
fn db_writes(site: &Site, lun: &str) -> u64 {
    let out = site.p("db-disk.img");
    site.ok(&["-d", lun, "get", "/vms/db/disk0.vdisk", &out]);
    let bytes = std::fs::read(&out).unwrap();
    hv::test_guest::counter_prefix(&[bytes[..64 * 512].to_vec()], 64).unwrap_or_else(|e| {
        panic!(
            "the db disk at site {} is no point of its writes: {e}",
            site.name
        )
    })
}

#[test]
fn unplanned_failover_after_site_a_dies_keeps_every_acknowledged_write() {
    if !prerequisites() || !kvm() {
        return;
    }
    let mut p = protected(&["--mode", "sync"]);
    let plan = write_plan(&p, WEB);
    wait_counter(&p.db_console, 1024);
    // Site A dies: its guest, its replication daemon, its link.
    p.db.kill().unwrap();
    p.db.wait().unwrap();
    let acknowledged = counter(&p.db_console);
    p.sites.a.kill9_daemon(&p.a);
    p.sites.cut();

    let record = failover(&p.sites.b, &p.sites.a, &plan, false);
    assert_eq!(record["kind"], "failover-unplanned");
    assert_eq!(p.sites.b.status(&p.b)["role"], "primary");
    let writes = db_writes(&p.sites.b, &p.b);
    assert!(
        writes >= acknowledged,
        "B holds {writes} of the guest's writes, it had acknowledged {acknowledged}"
    );
    let history = p.sites.b.ok(&["dr", "history", &plan]);
    assert!(history.contains("failover-unplanned"), "{history}");

    // Site A comes back: it rejoins as a secondary, discarding what it wrote that B never
    // got, and B copies back only what changed since the failover.
    let (sa, sb) = (&p.sites.a, &p.sites.b);
    let err = sb.fails(&["dr", "reprotect", &plan, "--timeout", "1"]);
    assert!(err.contains("has not rejoined"), "{err}");
    p.sites.restore();
    sa.ok(&["replica", "resume", &p.a]);
    sa.ok(&["replica", "demote", &p.a, "--discard-local"]);
    let out = sb.ok(&["dr", "reprotect", &plan, "--timeout", "60"]);
    assert!(out.contains("replicates to"), "{out}");
    eprintln!("{out}");
    let resynced = u(&sb.status(&p.b)["bytes_resynced"]);
    assert!(
        resynced < 16 * MIB,
        "reprotect copied {resynced} bytes of a 256 MiB LUN"
    );
}

/// Heartbeat guest (continues the counter the last boot left on its disk, on any site) and
/// the waiting guest, which shuts down at its power button.
const HB_WEB: &str = r#"
[[vm]]
path = "/vms/hb"
datastore = "prod"
priority = 1
verify.console = "heartbeat: boot"
[[vm]]
path = "/vms/web"
datastore = "prod"
priority = 2
verify.ready = true
"#;

/// `vm start --foreground` of `folder` at `site` on `lun`, its console in `console`.
fn start_vm(site: &Site, lun: &str, folder: &str, console: &str) -> Child {
    site.command()
        .args([
            "-d",
            lun,
            "vm",
            "start",
            folder,
            "--foreground",
            "--console-log",
            console,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_console(console: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} on {console}: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The heartbeat guest's `(boot, continued boot, first counter)` from a console.
fn hb_boot(console: &str) -> (String, String, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The line is whole once its newline is written.
        let text = wait_console(console, "heartbeat: boot");
        let line = text
            .split_inclusive('\n')
            .find_map(|l| l.strip_prefix("vapp-testguest: heartbeat: boot "))
            .filter(|l| l.ends_with('\n'));
        if let Some(line) = line {
            let w: Vec<&str> = line.split_whitespace().collect();
            return (w[0].into(), w[3].into(), w[5].parse().unwrap());
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The highest heartbeat counter a console printed (every 256th write, each flushed first).
fn hb_last(console: &str) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("vapp-testguest: heartbeat: "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn exits(child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{what} still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The console of `folder` started by failover `record` at `site`.
fn failover_console(site: &Site, record: &Value, folder: &str) -> String {
    site.path("state")
        .join("dr/prod/drills")
        .join(record["drill"].as_str().unwrap())
        .join(format!(
            "{}.console",
            folder.trim_matches('/').replace('/', "_")
        ))
        .to_str()
        .unwrap()
        .to_string()
}

fn step_names(record: &Value) -> Vec<String> {
    record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(u(&s["end_ms"]) >= u(&s["start_ms"]), "{s:#}");
            s["step"].as_str().unwrap().to_string()
        })
        .collect()
}

/// `vm list`'s state of `folder` at `site`, and the host running it.
fn vm_state(site: &Site, lun: &str, folder: &str) -> (String, String) {
    let list: Value = serde_json::from_str(&site.ok(&["-d", lun, "vm", "list", "--json"])).unwrap();
    let vm = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["path"] == folder)
        .cloned()
        .unwrap_or_default();
    (
        vm["state"].as_str().unwrap_or_default().to_string(),
        vm["host"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn planned_failover_stops_site_a_ships_every_write_and_fails_back() {
    if !prerequisites() || !kvm() {
        return;
    }
    let mut p = protected(&["--mode", "sync"]);
    // The counter guest is not protected by this plan.
    p.db.kill().unwrap();
    p.db.wait().unwrap();
    let (sa, sb) = (&p.sites.a, &p.sites.b);
    let guest = sa.p("guest.elf");
    sa.ok(&[
        "-d",
        &p.a,
        "vm",
        "create",
        "/vms/hb",
        "--kernel",
        &guest,
        "--vcpus",
        "1",
        "--memory",
        "64M",
        "--cmdline",
        "mode=heartbeat",
        "--disk",
        "4M",
    ]);
    let hb_console = sa.p("hb.console");
    let mut hb = start_vm(sa, &p.a, "/vms/hb", &hb_console);
    let mut web = start_vm(sa, &p.a, "/vms/web", &sa.p("web.console"));
    wait_console(&hb_console, "heartbeat: 512");
    let (a_boot, _, _) = hb_boot(&hb_console);
    let plan_b = write_plan(&p, HB_WEB);

    // B drives A: the heartbeat guest ignores its power button, so it is powered off
    // after the stop timeout.
    let record = failover_with(
        sb,
        sa,
        &plan_b,
        true,
        &["--stop-timeout", "2", "--force-stop"],
    );
    assert_eq!(record["kind"], "failover-planned");
    for st in record["steps"].as_array().unwrap() {
        eprintln!(
            "{} ({}): {} ms to {} ms: {}",
            st["step"], st["site"], st["start_ms"], st["end_ms"], st["detail"]
        );
    }
    exits(&mut hb, "A's heartbeat VM");
    exits(&mut web, "A's web VM");
    let acknowledged = hb_last(&hb_console);
    let steps = step_names(&record);
    for want in [
        "stop /vms/hb",
        "stop /vms/web",
        "locks released",
        "final sync",
        "demote",
        "start and verify VMs",
    ] {
        assert!(
            steps.iter().any(|s| s == want),
            "no step {want}: {record:#}"
        );
    }
    assert!(steps.iter().any(|s| s.starts_with("promote")), "{record:#}");
    assert_eq!(sa.status(&p.a)["role"], "secondary", "A is demoted");
    assert_eq!(sb.status(&p.b)["role"], "primary");
    // B's boot of the heartbeat guest continued A's boot after every write A acknowledged.
    let (b_boot, continued, first) = hb_boot(&failover_console(sb, &record, "/vms/hb"));
    assert_eq!(continued, a_boot, "B's boot {b_boot} continues A's");
    assert!(
        first > acknowledged,
        "B continued at {first}; A had acknowledged heartbeat {acknowledged}"
    );
    let history = sb.ok(&["dr", "history", &plan_b, "--json"]);
    assert!(history.contains("final sync"), "{history}");

    // Reprotect: B now replicates to A, copying only what changed, not the LUN.
    let out = sb.ok(&["dr", "reprotect", &plan_b, "--timeout", "60"]);
    eprintln!("{out}");
    let s = sb.status(&p.b);
    let resynced = u(&s["bytes_resynced"]);
    assert!(
        resynced < 16 * MIB,
        "reprotect copied {resynced} bytes of a 256 MiB LUN: {s:#}"
    );

    // Failback with the plan kept at A: A asks B to stop its VMs and demote, the same way.
    let plan_a = write_plan_at(sa, &p.a, HB_WEB);
    let b_hb = failover_console(sb, &record, "/vms/hb");
    wait_console(&b_hb, "heartbeat: 256");
    let back = failover_with(
        sa,
        sb,
        &plan_a,
        true,
        &["--stop-timeout", "2", "--force-stop"],
    );
    assert_eq!(back["kind"], "failover-planned");
    assert_eq!(sb.status(&p.b)["role"], "secondary", "B is demoted");
    // The replica B is again shows the VM held by A's runner: B's was stopped first.
    assert_eq!(
        vm_state(sb, &p.b, "/vms/hb"),
        ("running".to_string(), "site-a".to_string())
    );
    let (_, continued, first) = hb_boot(&failover_console(sa, &back, "/vms/hb"));
    let (b_boot, _, _) = hb_boot(&b_hb);
    assert_eq!(continued, b_boot, "A's new boot continues B's");
    assert!(first > hb_last(&b_hb));
    let s = sa.wait_in_sync(&p.a, Duration::from_secs(60));
    assert!(
        u(&s["bytes_resynced"]) < 16 * MIB,
        "failback copied {} bytes: {s:#}",
        s["bytes_resynced"]
    );
}

#[test]
fn a_vm_at_site_a_that_will_not_stop_aborts_the_planned_failover_with_a_still_primary() {
    if !prerequisites() || !kvm() {
        return;
    }
    let p = protected(&["--mode", "sync"]);
    let (sa, sb) = (&p.sites.a, &p.sites.b);
    let web_console = sa.p("web.console");
    let mut web = start_vm(sa, &p.a, "/vms/web", &web_console);
    wait_console(&web_console, "power button");
    let plan = write_plan(&p, VMS);
    // The counter guest does not heed its power button and nothing forces it.
    let out = isolated(
        sb,
        sa,
        &["dr", "failover", &plan, "--planned", "--stop-timeout", "1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("vm /vms/db") && err.contains("did not power off"),
        "{err}"
    );
    assert!(
        err.contains("aborted") && err.contains("restart /vms/web"),
        "{err}"
    );
    assert_eq!(sb.status(&p.b)["role"], "secondary", "B changed nothing");
    assert_eq!(sa.status(&p.a)["role"], "primary", "A stays the primary");
    exits(&mut web, "the web VM the handover stopped");
    sa.wait_in_sync(&p.a, Duration::from_secs(30));
    // A's counter guest kept writing, and the web VM the handover stopped runs again.
    let before = counter(&p.db_console);
    wait_counter(&p.db_console, before + 256);
    assert_eq!(
        vm_state(sa, &p.a, "/vms/web"),
        ("running".to_string(), "site-a".to_string())
    );
}

#[test]
fn a_planned_failover_is_refused_when_site_a_cannot_be_reached() {
    if !prerequisites() || !kvm() {
        return;
    }
    let p = protected(&["--mode", "sync"]);
    let (sa, sb) = (&p.sites.a, &p.sites.b);
    let plan = write_plan(&p, WEB);
    p.sites.cut();
    let out = isolated(sb, sa, &["dr", "failover", &plan, "--planned"]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot be reached") && err.contains("unplanned"),
        "{err}"
    );
    assert_eq!(sb.status(&p.b)["role"], "secondary", "B changed nothing");
    let history = sb.ok(&["dr", "history", &plan]);
    assert!(history.contains("no drills"), "{history}");
    p.sites.restore();
    assert_eq!(sa.status(&p.a)["role"], "primary");
    sa.wait_in_sync(&p.a, Duration::from_secs(30));
    let before = counter(&p.db_console);
    wait_counter(&p.db_console, before + 256);
}

fn handover_from_b(
    p: &Protected,
    secret: &[u8],
    vms: Vec<(String, &str)>,
) -> Result<HandoverReply, HandoverError> {
    let addr = p.sites.a.addr(PORT).parse().unwrap();
    let secret = secret.to_vec();
    let request = HandoverRequest {
        vms: vms
            .into_iter()
            .map(|(datastore, path)| HandoverVm {
                datastore,
                path: path.into(),
            })
            .collect(),
        stop_timeout_ms: 1000,
        force: true,
    };
    Sites::in_site(&p.sites.b, move || {
        request_handover(
            addr,
            &secret,
            &request,
            Duration::from_secs(5),
            Duration::from_secs(30),
        )
    })
}

#[test]
fn a_handover_request_needs_the_links_secret_and_names_only_vms_on_the_replicated_lun() {
    if !prerequisites() || !kvm() {
        return;
    }
    let p = protected(&["--mode", "sync"]);
    let sa = &p.sites.a;
    let info: Value = serde_json::from_str(&sa.ok(&["datastore", "info", &p.a, "--json"])).unwrap();
    let uuid = info["uuid"].as_str().unwrap().to_string();

    let wrong = handover_from_b(&p, b"not the secret", vec![(uuid.clone(), "/vms/db")]);
    match wrong {
        Err(HandoverError::Refused { reason, .. }) => {
            assert!(reason.contains("secret"), "{reason}")
        }
        other => panic!("a wrong secret got {other:?}"),
    }
    let secret = b"dr test secret";
    let elsewhere = handover_from_b(&p, secret, vec![(uuid.clone(), "/vms/nope")]).unwrap();
    assert_eq!(elsewhere.outcome, HandoverOutcome::Refused, "{elsewhere:?}");
    assert!(elsewhere.message.contains("/vms/nope"), "{elsewhere:?}");
    let other_ds = handover_from_b(
        &p,
        secret,
        vec![
            (uuid.clone(), "/vms/web"),
            ("6a1f0c52-0000-4000-8000-000000000000".into(), "/vms/db"),
        ],
    )
    .unwrap();
    assert_eq!(other_ds.outcome, HandoverOutcome::Refused, "{other_ds:?}");
    assert!(
        other_ds.message.contains("not on the replicated LUN"),
        "{other_ds:?}"
    );
    // Nothing changed: A is the primary, in sync, and its guest writes on.
    assert_eq!(sa.status(&p.a)["role"], "primary");
    sa.wait_in_sync(&p.a, Duration::from_secs(30));
    let before = counter(&p.db_console);
    wait_counter(&p.db_console, before + 256);
}

#[test]
fn a_planned_failover_after_site_a_was_demoted_by_hand_checks_it_and_loses_nothing() {
    if !prerequisites() || !kvm() {
        return;
    }
    let mut p = protected(&["--mode", "sync"]);
    let (sa, sb) = (&p.sites.a, &p.sites.b);
    let plan = write_plan(&p, WEB);
    // The old way: A's VM stopped and its replica demoted there by hand.
    p.db.kill().unwrap();
    p.db.wait().unwrap();
    sa.wait_in_sync(&p.a, Duration::from_secs(30));
    let written = db_writes(sa, &p.a);
    sa.ok(&["replica", "demote", &p.a]);
    let record = failover(sb, sa, &plan, true);
    let handover = record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"].as_str().unwrap().starts_with("handover of"))
        .cloned()
        .unwrap_or_else(|| panic!("{record:#}"));
    assert!(
        handover["detail"]
            .as_str()
            .unwrap()
            .contains("already a secondary"),
        "{handover:#}"
    );
    assert_eq!(db_writes(sb, &p.b), written, "nothing is lost");
}

#[test]
fn a_planned_failover_in_async_mode_ships_a_last_delta_set_before_b_promotes() {
    if !prerequisites() || !kvm() {
        return;
    }
    // Sets every 10 s: without a last one, B would miss seconds of A's writes.
    let mut p = protected(&["--mode", "async", "--period", "10s"]);
    p.db.kill().unwrap();
    p.db.wait().unwrap();
    let (sa, sb) = (&p.sites.a, &p.sites.b);
    let guest = sa.p("guest.elf");
    sa.ok(&[
        "-d",
        &p.a,
        "vm",
        "create",
        "/vms/hb",
        "--kernel",
        &guest,
        "--vcpus",
        "1",
        "--memory",
        "64M",
        "--cmdline",
        "mode=heartbeat",
        "--disk",
        "4M",
    ]);
    // The datastore and the VM reach B in a set; the guest's writes after it do not yet.
    sa.wait_in_sync(&p.a, Duration::from_secs(60));
    let hb_console = sa.p("hb.console");
    let mut hb = start_vm(sa, &p.a, "/vms/hb", &hb_console);
    wait_console(&hb_console, "heartbeat: 512");
    let (a_boot, _, _) = hb_boot(&hb_console);
    let plan = write_plan(
        &p,
        r#"
[[vm]]
path = "/vms/hb"
datastore = "prod"
verify.console = "heartbeat: boot"
"#,
    );
    let record = failover_with(
        sb,
        sa,
        &plan,
        true,
        &["--stop-timeout", "1", "--force-stop"],
    );
    exits(&mut hb, "A's heartbeat VM");
    let acknowledged = hb_last(&hb_console);
    assert_eq!(record["rpo_ms"], 0, "{record:#}");
    let (_, continued, first) = hb_boot(&failover_console(sb, &record, "/vms/hb"));
    assert_eq!(continued, a_boot);
    assert!(
        first > acknowledged,
        "B continued at {first}; A had acknowledged heartbeat {acknowledged}"
    );
    assert_eq!(sa.status(&p.a)["role"], "secondary");
}

#[test]
fn a_planned_failover_hands_over_every_member_of_a_consistency_group() {
    if !prerequisites() || !kvm() {
        return;
    }
    let sites = Sites::new();
    let (sa, sb) = (&sites.a, &sites.b);
    sa.secret("secret", "dr test secret");
    sb.secret("secret", "dr test secret");
    let luns_a = [sa.lun("a1.lun", 128 * MIB), sa.lun("a2.lun", 128 * MIB)];
    let luns_b = [sb.lun("b1.lun", 128 * MIB), sb.lun("b2.lun", 128 * MIB)];
    let group = ["--group", "g", "--mode", "sync"];
    for (i, port) in [PORT, PORT + 1].into_iter().enumerate() {
        sb.create_on(&luns_b[i], "secondary", sa, port, &group);
    }
    for (i, port) in [PORT, PORT + 1].into_iter().enumerate() {
        sa.create_on(&luns_a[i], "primary", sb, port, &group);
    }
    for lun in &luns_a {
        sa.wait_in_sync(lun, Duration::from_secs(60));
    }
    // One VM on each member's datastore.
    let guest = sa.p("guest.elf");
    sa.ok(&["vm", "test-guest", &guest]);
    let mut running = Vec::new();
    for (lun, name, folder, cmdline) in [
        (&luns_a[0], "prod", "/vms/hb", "mode=heartbeat"),
        (&luns_a[1], "logs", "/vms/web", "mode=wait"),
    ] {
        sa.ok(&["datastore", "format", lun, "--name", name]);
        sa.ok(&[
            "-d",
            lun,
            "vm",
            "create",
            folder,
            "--kernel",
            &guest,
            "--vcpus",
            "1",
            "--memory",
            "64M",
            "--cmdline",
            cmdline,
            "--disk",
            "4M",
        ]);
        let console = sa.p(&format!("{name}.console"));
        running.push((start_vm(sa, lun, folder, &console), console));
    }
    let hb_console = running[0].1.clone();
    wait_console(&hb_console, "heartbeat: 512");
    // Both run before the failover: a runner still starting holds no lock A could wait for.
    wait_console(&running[1].1, "power button");
    let (a_boot, _, _) = hb_boot(&hb_console);
    let plan = sb.p("plan.toml");
    std::fs::write(
        &plan,
        format!(
            r#"name = "prod"
[[replica]]
group = "g"
[[datastore]]
name = "prod"
lun = "{}"
[[datastore]]
name = "logs"
lun = "{}"
[[vm]]
path = "/vms/hb"
datastore = "prod"
verify.console = "heartbeat: boot"
[[vm]]
path = "/vms/web"
datastore = "logs"
verify.ready = true
"#,
            luns_b[0], luns_b[1]
        ),
    )
    .unwrap();
    let record = failover_with(
        sb,
        sa,
        &plan,
        true,
        &["--stop-timeout", "2", "--force-stop"],
    );
    for (child, console) in &mut running {
        exits(child, console);
    }
    let steps = step_names(&record);
    assert!(steps.iter().any(|s| s == "stop /vms/hb"), "{record:#}");
    assert!(steps.iter().any(|s| s == "stop /vms/web"), "{record:#}");
    for lun in &luns_a {
        assert_eq!(sa.status(lun)["role"], "secondary", "{lun}");
    }
    for lun in &luns_b {
        assert_eq!(sb.status(lun)["role"], "primary", "{lun}");
    }
    let acknowledged = hb_last(&hb_console);
    let (_, continued, first) = hb_boot(&failover_console(sb, &record, "/vms/hb"));
    assert_eq!(continued, a_boot);
    assert!(
        first > acknowledged,
        "B continued at {first}, A acknowledged {acknowledged}"
    );
}

#[test]
fn a_handover_whose_answer_is_lost_leaves_b_a_secondary_until_it_asks_again() {
    if !prerequisites() || !kvm() {
        return;
    }
    let mut p = protected(&["--mode", "sync"]);
    let info: Value =
        serde_json::from_str(&p.sites.a.ok(&["datastore", "info", &p.a, "--json"])).unwrap();
    let uuid = info["uuid"].as_str().unwrap().to_string();
    // B gives up waiting while A is still stopping its VM (forced after 2 s): the answer
    // is lost, as when the link drops mid-handover.
    let addr = p.sites.a.addr(PORT).parse().unwrap();
    let request = HandoverRequest {
        vms: vec![HandoverVm {
            datastore: uuid,
            path: "/vms/db".into(),
        }],
        stop_timeout_ms: 2000,
        force: true,
    };
    let lost = Sites::in_site(&p.sites.b, move || {
        request_handover(
            addr,
            b"dr test secret",
            &request,
            Duration::from_secs(5),
            Duration::from_millis(300),
        )
    });
    assert!(
        matches!(lost, Err(HandoverError::NoAnswer { .. })),
        "{lost:?}"
    );
    let (sa, sb) = (&p.sites.a, &p.sites.b);
    assert_eq!(sb.status(&p.b)["role"], "secondary", "B promoted nothing");
    // A finishes all the same: its VM stopped, demoted.
    p.db.wait().unwrap();
    let acknowledged = counter(&p.db_console);
    sa.wait(&p.a, "demoted", Duration::from_secs(30), |s| {
        s["role"] == "secondary" && s["running"] == true
    });
    // Asked again, A says it is a secondary and what it holds; B takes over losing nothing.
    let plan = write_plan(&p, WEB);
    let record = failover(sb, sa, &plan, true);
    assert_eq!(sb.status(&p.b)["role"], "primary");
    let writes = db_writes(sb, &p.b);
    assert!(
        writes >= acknowledged,
        "B holds {writes} of the guest's writes, it had acknowledged {acknowledged}: {record:#}"
    );
}
