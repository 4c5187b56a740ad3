//! DR drills and failovers of VMs with NICs, as SRM's network mappings: site A protects a
//! test guest with a NIC on network `prod`; at site B a production VM with the same address
//! runs on B's own `prod`. A drill puts the copy's NIC on an isolated network of its own,
//! where `verify.ping` finds it (and only it), while production keeps answering on `prod`;
//! `dr cleanup` leaves no bridge, tap or namespace of the drill. A failover starts the VM on
//! the plan's recovery network, and a plan naming a network B does not have is refused
//! before anything changes.
#![allow(clippy::unwrap_used)]

mod dr_support;
mod replica_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dr_support::*;
use serde_json::Value;

fn net_prerequisites() -> bool {
    prerequisites()
        && kvm()
        && lun::prereq::require(
            lun::prereq::have_device("/dev/net/tun"),
            "/dev/net/tun for the VMs' taps",
        )
}

/// The protected VM: answers on 10.9.0.1 and looks for 10.9.0.2, which only production has.
const APP_CMDLINE: &str = "mode=test net_ip=10.9.0.1 net_ping=10.9.0.2 net_count=1 net_arp=5";

const APP: &str = r#"
[[vm]]
path = "/vms/app"
datastore = "prod"
verify.ping = "10.9.0.1"
timeout_s = 90
"#;

/// Site A's `/vms/app` on network `prod`; its MAC (given at creation, kept in vm.toml).
fn create_app(p: &Protected) -> String {
    let guest = p.sites.a.p("guest.elf");
    let out = p.sites.a.ok(&[
        "-d",
        &p.a,
        "vm",
        "create",
        "/vms/app",
        "--kernel",
        &guest,
        "--vcpus",
        "1",
        "--memory",
        "64M",
        "--cmdline",
        APP_CMDLINE,
        "--net",
        "prod",
    ]);
    mac_in(&out)
}

fn mac_in(text: &str) -> String {
    let at = text
        .find("MAC ")
        .unwrap_or_else(|| panic!("no MAC in {text}"));
    text[at + 4..at + 21].to_string()
}

fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A VM of site B's own datastore `ds`, running in the background; killed on drop.
struct Running(Child, String);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_local(site: &Site, ds: &str, vm: &str) -> Running {
    let console = site.p(&format!("{}.console", vm.trim_start_matches("/vms/")));
    let child = site
        .command()
        .args([
            "-d",
            ds,
            "vm",
            "start",
            vm,
            "--foreground",
            "--console-log",
            &console,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Running(child, console)
}

fn wait_console(console: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{console}: no {needle:?} in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Site B's production: network `prod`, a datastore of B's own with VMs `/vms/prod1` on
/// 10.9.0.1 (the protected VM's address) and `/vms/prod2` on 10.9.0.2, both running.
fn production_at_b(p: &Protected) -> (String, String, Running, Running) {
    let sb = &p.sites.b;
    sb.ok(&["host", "network", "create", "prod"]);
    let local = sb.lun("local.lun", 128 * MIB);
    sb.ok(&["datastore", "format", &local, "--name", "local"]);
    let guest = sb.p("guest.elf");
    sb.ok(&["vm", "test-guest", &guest]);
    let mut macs = Vec::new();
    for (vm, cmdline) in [
        ("/vms/prod1", "mode=test net_ip=10.9.0.1"),
        ("/vms/prod2", "mode=test net_ip=10.9.0.2"),
        (
            "/vms/pinger",
            "mode=test net_ip=10.9.0.3 net_ping=10.9.0.1 net_count=3",
        ),
    ] {
        let out = sb.ok(&[
            "-d",
            &local,
            "vm",
            "create",
            vm,
            "--kernel",
            &guest,
            "--vcpus",
            "1",
            "--memory",
            "64M",
            "--cmdline",
            cmdline,
            "--net",
            "prod",
        ]);
        macs.push(mac_in(&out));
    }
    let prod1 = start_local(sb, &local, "/vms/prod1");
    let prod2 = start_local(sb, &local, "/vms/prod2");
    wait_console(&prod1.1, "net: serving");
    wait_console(&prod2.1, "net: serving");
    (local, macs.remove(0), prod1, prod2)
}

/// The running VMs' NICs on `network` at `site`, as `host network list --json` says.
fn ports(site: &Site, network: &str) -> Vec<String> {
    let list: Value =
        serde_json::from_str(&site.ok(&["host", "network", "list", "--json"])).unwrap();
    let mut vms: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["name"] == network)
        .flat_map(|n| n["ports"].as_array().unwrap().clone())
        .map(|port| port["vm"].as_str().unwrap().to_string())
        .collect();
    vms.sort();
    vms
}

#[test]
fn a_drill_pings_its_copy_on_an_isolated_network_while_production_keeps_the_same_address() {
    if !net_prerequisites() {
        return;
    }
    let p = protected(&["--mode", "sync"]);
    let sb = &p.sites.b;
    let app_mac = create_app(&p);
    let (local, prod1_mac, _prod1, _prod2) = production_at_b(&p);
    assert_ne!(app_mac, prod1_mac);
    let plan = write_plan(&p, &format!("{APP}verify.ping_from = \"10.9.0.200\"\n"));

    let out = sb.ok(&["dr", "validate", &plan]);
    assert!(
        out.contains("1 VM(s) with NICs: a drill puts them on an isolated network drill-XXXX"),
        "{out}"
    );
    let report = sb.p("report.html");
    let out = sb.vapp(&["dr", "test", &plan, "--json", "--report", &report]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "dr test failed: {text}{}{}",
        String::from_utf8_lossy(&out.stderr),
        sb.logs()
    );
    let record: Value = serde_json::from_str(&text).unwrap();
    let network = record["network"].as_str().unwrap().to_string();
    assert!(network.starts_with("drill-"), "{record:#}");
    let vm = &record["vms"][0];
    assert_eq!(vm["outcome"], "verified", "{record:#}");
    eprintln!(
        "drill {network}: network created in {} ms, VM running at {} ms, ping answered at {} ms, RTO {} ms",
        record["network_ms"], vm["running_ms"], vm["done_ms"], record["rto_ms"]
    );
    // The copy answered, not production's VM with the same address.
    let detail = vm["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "ping 10.9.0.1: answered by {app_mac} on network {network}"
        )) && detail.contains("asked from 10.9.0.200"),
        "{record:#}"
    );
    assert!(
        std::fs::read_to_string(&report)
            .unwrap()
            .contains(&format!("isolated network <code>{network}</code>")),
        "the report names the drill's network"
    );

    // Each network has its own VM at 10.9.0.1: the copy alone on the drill's, production's
    // VMs alone on prod, and the copy cannot reach production's 10.9.0.2.
    assert_eq!(ports(sb, &network), ["/vms/app"]);
    assert_eq!(ports(sb, "prod"), ["/vms/prod1", "/vms/prod2"]);
    let drill = record["drill"].as_str().unwrap();
    let copy_console = sb.p(&format!("state/dr/prod/drills/{drill}/vms_app.console"));
    wait_console(&copy_console, "net: 10.9.0.2 unreachable (no ARP reply)");
    let pinger = start_local(sb, &local, "/vms/pinger");
    let seen = wait_console(&pinger.1, "net: serving");
    assert!(
        seen.contains("net: ping 10.9.0.1: 3 sent, 3 received"),
        "production's 10.9.0.1 answers on prod during the drill:\n{seen}"
    );
    drop(pinger);

    let out = sb.ok(&["dr", "cleanup", &plan]);
    assert!(out.contains(&format!("network {network} deleted")), "{out}");
    let links = ip(&sb.ns, &["-o", "link", "show"]);
    assert!(!links.contains(&format!("vb-{network}")), "{links}");
    assert!(
        !links.contains("vdr"),
        "no ping probe's tap remains: {links}"
    );
    // Production's two VMs' taps are the only ones left, on prod's bridge.
    let taps: Vec<&str> = links
        .lines()
        .filter(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with("vapp")))
        .collect();
    assert_eq!(taps.len(), 2, "{links}");
    assert!(taps.iter().all(|l| l.contains("master vb-prod")), "{links}");
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&network),
        "no namespace of the drill"
    );
    let list = sb.ok(&["host", "network", "list"]);
    assert!(!list.contains(&network), "{list}");
    assert_eq!(ports(sb, "prod"), ["/vms/prod1", "/vms/prod2"]);
}

#[test]
fn an_interrupted_drills_network_is_cleaned_up() {
    if !net_prerequisites() {
        return;
    }
    let p = protected(&["--mode", "sync"]);
    let sb = &p.sites.b;
    create_app(&p);
    sb.ok(&["host", "network", "create", "prod"]);
    let plan = write_plan(&p, APP);
    let mut drill = sb
        .command()
        .args(["dr", "test", &plan])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once its VM runs on the drill's network.
    let deadline = Instant::now() + Duration::from_secs(60);
    let network = loop {
        let active = std::fs::read_to_string(sb.path("state/dr/prod/active.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok());
        if let Some(a) = active
            && let Some(n) = a["network"].as_str()
            && !ports(sb, n).is_empty()
        {
            break n.to_string();
        }
        assert!(Instant::now() < deadline, "the drill never started its VM");
        std::thread::sleep(Duration::from_millis(50));
    };
    drill.kill().unwrap();
    drill.wait().unwrap();
    let out = sb.ok(&["dr", "cleanup", &plan]);
    assert!(out.contains(&format!("network {network} deleted")), "{out}");
    let links = ip(&sb.ns, &["-o", "link", "show"]);
    assert!(!links.contains(&format!("vb-{network}")), "{links}");
    assert!(
        !links
            .lines()
            .any(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with("vapp"))),
        "no VM tap remains: {links}"
    );
}

#[test]
fn a_failover_starts_vms_on_the_recovery_network_and_a_missing_one_is_refused() {
    if !net_prerequisites() {
        return;
    }
    let mut p = protected(&["--mode", "sync"]);
    let app_mac = create_app(&p);
    let sb = &p.sites.b;
    sb.ok(&["host", "network", "create", "recov"]);
    let plan = write_plan(&p, APP);
    // Without a recovery network the VM's own must exist here.
    let err = sb.fails(&["dr", "failover", &plan]);
    assert!(
        err.contains("vm /vms/app: its NIC's network \"prod\" does not exist on this host"),
        "{err}"
    );
    let with_network = |name: &str| {
        let text = std::fs::read_to_string(&plan).unwrap();
        std::fs::write(&plan, format!("recovery_network = \"{name}\"\n{text}")).unwrap();
    };
    with_network("nowhere");
    let err = sb.fails(&["dr", "validate", &plan]);
    assert!(
        err.contains("recovery_network \"nowhere\" does not exist on this host"),
        "{err}"
    );
    let err = sb.fails(&["dr", "failover", &plan]);
    assert!(
        err.contains("recovery_network \"nowhere\" does not exist on this host"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Nothing changed: still the secondary, A's writes still arriving, no record.
    assert_eq!(sb.status(&p.b)["role"], "secondary");
    assert_eq!(sb.status(&p.b)["link"], "connected");
    assert!(sb.ok(&["dr", "history", &plan]).contains("no drills yet"));

    let plan = write_plan(&p, APP);
    with_network("recov");
    p.db.kill().unwrap();
    p.db.wait().unwrap();
    p.sites.a.kill9_daemon(&p.a);
    p.sites.cut();
    let out = isolated(sb, &p.sites.a, &["dr", "failover", &plan, "--json"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "dr failover failed: {text}{}{}",
        String::from_utf8_lossy(&out.stderr),
        sb.logs()
    );
    let record: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(record["network"], "recov", "{record:#}");
    assert!(
        record["vms"][0]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("answered by {app_mac} on network recov")),
        "{record:#}"
    );
    assert_eq!(ports(sb, "recov"), ["/vms/app"]);
    // The recovered VM's vm.toml still names its own network: the mapping is the plan's.
    let out = isolated(sb, &p.sites.a, &["-d", &p.b, "cat", "/vms/app/vm.toml"]);
    let toml = String::from_utf8_lossy(&out.stdout);
    assert!(toml.contains("network = \"prod\""), "{toml}{out:?}");
}
