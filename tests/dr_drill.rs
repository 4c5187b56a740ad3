//! DR drills as an operator runs them: site A (a network namespace) runs protected test
//! guests writing counters to their disks on a datastore replicated to site B; at B,
//! `vapp dr test` starts every VM of the plan from copies of the replica while A keeps
//! writing, `vapp dr cleanup` removes the drill. Judged by what a user cares about: the
//! VMs verified at B, the report, A's writes still reaching B, the replica's bytes equal to
//! A's once A stops (the drill never wrote it), and nothing of the drill left.
#![allow(clippy::unwrap_used)]

mod dr_support;
mod replica_support;

use std::time::Duration;

use dr_support::*;
use serde_json::Value;

/// Runs a drill at B while A's db writes; checks the report, cleanup, and that the
/// replica is A's LUN byte for byte once A stops. Returns the drill's record.
fn drill_and_check(p: &mut Protected) -> Value {
    let (sa, sb) = (&p.sites.a, &p.sites.b);
    let plan = write_plan(p, VMS);
    let out = sb.ok(&["dr", "validate", &plan]);
    assert!(out.contains("valid"), "{out}");
    let before = counter(&p.db_console);
    let report = sb.p("report.html");
    let out = sb.vapp(&["dr", "test", &plan, "--report", &report, "--json"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "dr test failed: {text}{}{}",
        String::from_utf8_lossy(&out.stderr),
        sb.logs()
    );
    let record: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(record["passed"], true, "{record:#}");
    let vms = record["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{record:#}");
    for vm in vms {
        assert_eq!(vm["outcome"], "verified", "{record:#}");
    }
    // Priority 2 starts once priority 1 is verified.
    assert!(
        u(&vms[1]["start_ms"]) >= u(&vms[0]["done_ms"]),
        "{record:#}"
    );
    assert!(
        record["rpo_ms"].is_u64() && record["rto_ms"].is_u64(),
        "{record:#}"
    );
    let page = std::fs::read_to_string(&report).unwrap();
    assert!(
        page.contains("passed") && page.contains("/vms/web"),
        "{page}"
    );
    assert!(!page.contains("<script"));

    // Replication went on throughout: A's guest kept writing (sync writes wait for B),
    // and A's writes still reach B: in sync mode nothing is out of sync, in async mode
    // new delta sets keep arriving.
    let during = wait_counter(&p.db_console, before + 512);
    assert!(during > before);
    if sa.status(&p.a)["mode"] == "sync" {
        sa.wait_in_sync(&p.a, Duration::from_secs(30));
    } else {
        let delta = u(&sb.status(&p.b)["delta_id"]);
        sb.wait(&p.b, "receiving delta sets", Duration::from_secs(30), |s| {
            s["delta_id"].as_u64().is_some_and(|d| d >= delta + 2)
        });
    }
    assert_eq!(sb.status(&p.b)["link"], "connected");

    let out = sb.ok(&["dr", "cleanup", &plan]);
    assert!(out.contains("cleaned up"), "{out}");
    let list: Value = serde_json::from_str(&sb.ok(&["snapshot", "list", &p.b, "--json"])).unwrap();
    assert_eq!(list["sessions"], serde_json::json!([]), "{list:#}");
    let history = sb.ok(&["dr", "history", &plan]);
    assert_eq!(history.lines().count(), 1, "{history}");
    assert!(history.contains("passed"), "{history}");

    // A stops; once in sync the replica is A's LUN exactly: no byte of the drill in it.
    let _ = p.db.kill();
    let _ = p.db.wait();
    sa.wait_in_sync(&p.a, Duration::from_secs(30));
    sb.wait(&p.b, "connected", Duration::from_secs(10), |s| {
        s["link"] == "connected"
    });
    assert_same_bytes(&p.a, &p.b);
    record
}

#[test]
fn sync_drill_verifies_every_vm_while_a_writes_and_leaves_the_replica_untouched() {
    if !prerequisites() || !kvm() {
        return;
    }
    let mut p = protected(&["--mode", "sync"]);
    let record = drill_and_check(&mut p);
    assert!(
        u(&record["rpo_ms"]) < 1000,
        "a connected sync replica's point is current: {record:#}"
    );
}

#[test]
fn async_drill_reports_the_age_of_its_delta_set() {
    if !prerequisites() || !kvm() {
        return;
    }
    let mut p = protected(&["--mode", "async", "--period", "1s"]);
    p.sites
        .b
        .wait(&p.b, "holding a delta set", Duration::from_secs(30), |s| {
            s["delta_id"].as_u64().is_some_and(|d| d > 0)
        });
    let record = drill_and_check(&mut p);
    let rpo = u(&record["rpo_ms"]);
    assert!(
        rpo < 10_000,
        "the point is the last delta set, cut every second: {record:#}"
    );
}

#[test]
fn bad_plans_are_refused_before_anything_starts() {
    if !prerequisites() || !kvm() {
        return;
    }
    let p = protected(&["--mode", "sync"]);
    let sb = &p.sites.b;
    let unknown = r#"
[[vm]]
path = "/vms/nope"
datastore = "prod"
verify.ready = true
"#;
    let plan = write_plan(&p, unknown);
    let err = sb.fails(&["dr", "test", &plan]);
    assert!(
        err.contains("vm /vms/nope: not found on datastore prod"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // A ping check needs a NIC to ping.
    let ping_without_nic = r#"
[[vm]]
path = "/vms/web"
datastore = "prod"
verify.ping = "10.9.0.1"
"#;
    let err = sb.fails(&["dr", "test", &write_plan(&p, ping_without_nic)]);
    assert!(
        err.contains("vm /vms/web: verify.ping = \"10.9.0.1\" but its /vms/web/vm.toml has no NIC"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let plan = write_plan(&p, unknown);
    let plain = sb.lun("plain.lun", 16 * MIB);
    let not_replicated = std::fs::read_to_string(&plan)
        .unwrap()
        .replace(&format!("lun = \"{}\"", p.b), &format!("lun = \"{plain}\""));
    std::fs::write(&plan, not_replicated).unwrap();
    let err = sb.fails(&["dr", "validate", &plan]);
    assert!(err.contains("LUN not replicated on this host"), "{err}");

    // A replica whose daemon is down has no point to give.
    let plan = write_plan(&p, VMS);
    sb.kill9_daemon(&p.b);
    let err = sb.fails(&["dr", "test", &plan]);
    assert!(err.contains("its daemon is not running"), "{err}");

    // Nothing started: no drill recorded, no session taken.
    assert!(sb.ok(&["dr", "history", &plan]).contains("no drills yet"));
    assert!(!sb.path("state/dr/prod/active.json").exists());
}

#[test]
fn a_replica_mid_resync_is_refused_as_not_consistent() {
    if !prerequisites() {
        return;
    }
    let sites = Sites::new();
    let (sa, sb) = (&sites.a, &sites.b);
    let a = sa.lun("a.lun", 64 * MIB);
    let b = sb.lun("b.lun", 64 * MIB);
    // Every region holds data, and the link carries 1 MiB/s: the initial sync (during
    // which B is inconsistent) takes about a minute.
    fill_pattern(&a, 7);
    sa.secret("secret", "dr test secret");
    sb.secret("secret", "dr test secret");
    let slow = ["--mode", "sync", "--bandwidth-limit", "1M"];
    sb.create(&b, "secondary", sa, &slow);
    sa.create(&a, "primary", sb, &slow);
    sb.wait(&b, "inconsistent", Duration::from_secs(30), |s| {
        s["inconsistent"] == true
    });
    let plan = write_plan_at(sb, &b, "");
    let err = sb.fails(&["dr", "validate", &plan]);
    assert!(
        err.contains("not consistent (a resync is in progress)"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let err = sb.fails(&["dr", "test", &plan]);
    assert!(err.contains("not consistent"), "{err}");
    assert!(!sb.path("state/dr/prod/active.json").exists());
}
