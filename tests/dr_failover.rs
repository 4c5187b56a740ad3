//! Real recovery with `vapp dr failover`: site A runs a test guest writing counters to a
//! datastore replicated synchronously to site B. Unplanned: A is killed (its VM and its
//! replication daemon kill -9, the link cut) and B comes up with every write A's guest
//! had acknowledged. Planned: A shuts down in order, B takes over, the replication turns
//! round by itself (only what changed goes back), and a failover at A brings the VMs home.
#![allow(clippy::unwrap_used)]

mod dr_support;
mod replica_support;

use std::time::Duration;

use dr_support::*;
use serde_json::Value;

const WEB: &str = r#"
[[vm]]
path = "/vms/web"
datastore = "prod"
verify.ready = true
"#;

/// `dr failover` at `site`, which cannot reach `other`'s storage.
fn failover(site: &Site, other: &Site, plan: &str, planned: bool) -> Value {
    let mut args = vec!["dr", "failover", plan, "--json"];
    if planned {
        args.push("--planned");
    }
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

#[test]
fn planned_failover_reprotects_incrementally_and_fails_back() {
    if !prerequisites() || !kvm() {
        return;
    }
    let mut p = protected(&["--mode", "sync"]);
    let (sa, sb) = (&p.sites.a, &p.sites.b);
    let plan_b = write_plan(&p, WEB);
    wait_counter(&p.db_console, 512);
    let err = sb.fails(&["dr", "failover", &plan_b, "--planned"]);
    assert!(err.contains("still replicates to it"), "{err}");
    assert_eq!(
        sb.status(&p.b)["role"],
        "secondary",
        "a refused failover changes nothing"
    );

    // A shuts down in order: its VM stopped, its replica demoted (final sync).
    p.db.kill().unwrap();
    p.db.wait().unwrap();
    sa.wait_in_sync(&p.a, Duration::from_secs(30));
    let written = db_writes(sa, &p.a);
    sa.ok(&["replica", "demote", &p.a]);
    let record = failover(sb, sa, &plan_b, true);
    assert_eq!(record["kind"], "failover-planned");
    assert_eq!(
        db_writes(sb, &p.b),
        written,
        "a planned failover loses nothing"
    );

    // Reprotect: B now replicates to A, copying only what changed, not the LUN.
    let out = sb.ok(&["dr", "reprotect", &plan_b, "--timeout", "60"]);
    eprintln!("{out}");
    let s = sb.status(&p.b);
    let resynced = u(&s["bytes_resynced"]);
    assert!(
        resynced < 16 * MIB,
        "reprotect copied {resynced} bytes of a 256 MiB LUN: {s:#}"
    );
    // Failback: the web VM stops at B, B is demoted, and A's plan brings it home.
    let stop = isolated(sb, sa, &["-d", &p.b, "vm", "stop", "/vms/web", "--force"]);
    assert!(
        stop.status.success(),
        "vm stop at B: {}",
        String::from_utf8_lossy(&stop.stderr)
    );
    sb.wait_in_sync(&p.b, Duration::from_secs(30));
    sb.ok(&["replica", "demote", &p.b]);
    let plan_a = write_plan_at(sa, &p.a, WEB);
    sa.wait(&p.a, "a secondary", Duration::from_secs(30), |s| {
        s["role"] == "secondary" && s["running"] == true
    });
    let back = failover(sa, sb, &plan_a, true);
    assert_eq!(back["kind"], "failover-planned");
    let s = sa.wait_in_sync(&p.a, Duration::from_secs(60));
    assert!(
        u(&s["bytes_resynced"]) < 16 * MIB,
        "failback copied {} bytes: {s:#}",
        s["bytes_resynced"]
    );
}
