//! Networking as a user meets it: `vapp host network create/list/delete`, `[[net]]` in
//! vm.toml, and test guests (hv/guest) pinging each other, the host's uplink, or failing to.
//! (Pings come from guests only: ping(8) is not installed everywhere.)
//! Needs root (bridges and taps), /dev/net/tun, KVM and `ip` (a veth uplink in a network
//! namespace); each test uses its own state directory and interface names.
#![allow(clippy::unwrap_used)]

mod vm_support;

use std::process::{Command, Output};

use vm_support::{Fixture, kvm_available};

fn net_available() -> bool {
    kvm_available()
        && lun::prereq::require(
            lun::prereq::is_root()
                && lun::prereq::have_device("/dev/net/tun")
                && lun::prereq::have_command("ip"),
            "root, /dev/net/tun and ip(8) for bridges, taps and veths",
        )
}

/// A fixture with a state directory of its own, and a unique suffix for host-wide names.
fn fixture() -> (Fixture, String) {
    let mut fx = Fixture::new();
    let state = fx.dir.path().join("state");
    fx.env.push((
        "VAPP_STATE_DIR".to_string(),
        state.to_str().unwrap().to_string(),
    ));
    (fx, (std::process::id() % 10_000).to_string())
}

/// Deletes the networks it names when the test ends, even after a failure.
struct Networks<'a> {
    fx: &'a Fixture,
    names: Vec<String>,
}

impl Drop for Networks<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = self.fx.run(&["host", "network", "delete", name]);
        }
    }
}

/// The MAC vm.toml of `path` holds for its first NIC.
fn mac_of(fx: &Fixture, path: &str) -> String {
    let toml = fx.ok(&["cat", &format!("{path}/vm.toml")]);
    let line = toml
        .lines()
        .find(|l| l.starts_with("mac = "))
        .unwrap_or_else(|| panic!("no mac in {toml}"));
    line.trim_start_matches("mac = ")
        .trim_matches('"')
        .to_string()
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap()
}

#[test]
fn two_vms_on_one_network_ping_each_other_and_keep_their_macs_across_a_restart() {
    if !net_available() {
        return;
    }
    let (fx, id) = fixture();
    let net = format!("lan{id}");
    let _cleanup = Networks {
        fx: &fx,
        names: vec![net.clone()],
    };
    let out = fx.ok(&["host", "network", "create", &net]);
    assert!(
        out.contains(&format!("bridge vb-{net}, no uplink")),
        "{out}"
    );
    fx.create_vm_on(
        "/vms/a",
        "mode=test net_ip=10.98.0.1 net_ping=10.98.0.2 net_count=3",
        &[&net],
    );
    fx.create_vm_on(
        "/vms/b",
        "mode=test net_ip=10.98.0.2 net_ping=10.98.0.1 net_count=3",
        &[&net],
    );
    let (mac_a, mac_b) = (mac_of(&fx, "/vms/a"), mac_of(&fx, "/vms/b"));
    assert_ne!(mac_a, mac_b);
    let created = fx.create_vm_on("/vms/c", "mode=test", &[&net, &net]);
    assert!(
        created.contains(&format!("  net 0: network {net}, MAC 52:54:00:")),
        "{created}"
    );
    assert!(
        created.contains(&format!("  net 1: network {net}, MAC 52:54:00:")),
        "{created}"
    );

    let a = fx.start("/vms/a", &[]);
    let b = fx.start("/vms/b", &[]);
    a.expect_console("net: ping 10.98.0.2: 3 sent, 3 received");
    b.expect_console("net: ping 10.98.0.1: 3 sent, 3 received");
    a.expect_console(&format!("mac {mac_a}"));
    b.expect_console(&format!("mac {mac_b}"));
    for seq in 1..=3 {
        a.expect_console(&format!("reply from 10.98.0.2 seq={seq}"));
        b.expect_console(&format!("reply from 10.98.0.1 seq={seq}"));
    }
    let list = fx.ok(&["host", "network", "list"]);
    assert!(list.contains(&format!("/vms/a {mac_a}")), "{list}");
    assert!(list.contains(&format!("/vms/b {mac_b}")), "{list}");
    fx.fails(
        &["host", "network", "delete", &net],
        &[&format!("network {net:?}: 2 VM NIC(s) still attached")],
    );
    drop(a);
    drop(b);

    // Killed with -9: the taps went with the processes; the VM comes back with its MAC.
    let again = fx.start("/vms/a", &[]);
    again.expect_console(&format!("net: nic at 0xd0000000, mac {mac_a}"));
    drop(again);
    assert_eq!(mac_of(&fx, "/vms/a"), mac_a);
    fx.ok(&["host", "network", "delete", &net]);
    let list = fx.ok(&["host", "network", "list"]);
    assert!(!list.contains(&net), "{list}");
    assert!(!std::path::Path::new(&format!("/sys/class/net/vb-{net}")).exists());
}

#[test]
fn a_vm_on_an_isolated_network_reaches_neither_another_network_nor_the_uplink() {
    if !net_available() {
        return;
    }
    let (fx, id) = fixture();
    let (prod, drill, drill2) = (
        format!("prod{id}"),
        format!("drill{id}"),
        format!("drl{id}b"),
    );
    let (uplink, peer, netns) = (format!("vu{id}"), format!("vp{id}"), format!("vappnet{id}"));
    let _cleanup = Networks {
        fx: &fx,
        names: vec![prod.clone(), drill.clone(), drill2.clone()],
    };
    // The outside world: the far end of a veth in a namespace, at 10.97.0.254.
    let _ = sh(&["ip", "netns", "del", &netns]);
    let _ = sh(&["ip", "link", "del", &uplink]);
    assert!(sh(&["ip", "netns", "add", &netns]).status.success());
    struct Outside(String, String);
    impl Drop for Outside {
        fn drop(&mut self) {
            let _ = sh(&["ip", "link", "del", &self.1]);
            let _ = sh(&["ip", "netns", "del", &self.0]);
        }
    }
    let _outside = Outside(netns.clone(), uplink.clone());
    for args in [
        vec![
            "ip", "link", "add", &uplink, "type", "veth", "peer", "name", &peer, "netns", &netns,
        ],
        vec![
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            "10.97.0.254/24",
            "dev",
            &peer,
        ],
        vec!["ip", "-n", &netns, "link", "set", &peer, "up"],
    ] {
        let out = sh(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    fx.ok(&["host", "network", "create", &prod, "--uplink", &uplink]);
    fx.ok(&["host", "network", "create", &drill, "--isolated"]);
    // Isolated networks exist side by side, one per drill.
    fx.ok(&["host", "network", "create", &drill2, "--isolated"]);
    let list = fx.ok(&["host", "network", "list"]);
    assert!(list.contains(&uplink), "{list}");
    assert_eq!(list.matches("(isolated)").count(), 2, "{list}");

    fx.create_vm_on(
        "/vms/web",
        "mode=test net_ip=10.97.0.1 net_ping=10.97.0.254 net_count=3",
        &[&prod],
    );
    // The same addresses as production, as a DR drill has: one drill VM looks for the
    // uplink's far end, one (on a second isolated network) for the production VM.
    fx.create_vm_on(
        "/vms/drill",
        "mode=test net_ip=10.97.0.1 net_ping=10.97.0.254 net_count=3 net_arp=8",
        &[&drill],
    );
    fx.create_vm_on(
        "/vms/drill2",
        "mode=test net_ip=10.97.0.2 net_ping=10.97.0.1 net_count=3 net_arp=8",
        &[&drill2],
    );
    let web = fx.start("/vms/web", &[]);
    web.expect_console("net: ping 10.97.0.254: 3 sent, 3 received");
    let drill_vm = fx.start("/vms/drill", &[]);
    let drill2_vm = fx.start("/vms/drill2", &[]);
    drill_vm.expect_console("net: 10.97.0.254 unreachable (no ARP reply)");
    drill2_vm.expect_console("net: 10.97.0.1 unreachable (no ARP reply)");
    assert!(!drill_vm.stdout.text().contains("reply from"));
    assert!(!drill2_vm.stdout.text().contains("reply from"));
}

#[test]
fn bad_network_input_is_refused_before_the_guest_starts() {
    if !net_available() {
        return;
    }
    let (fx, id) = fixture();
    let net = format!("bad{id}");
    let _cleanup = Networks {
        fx: &fx,
        names: vec![net.clone()],
    };
    fx.fails(
        &["host", "network", "create", "Bad/Name"],
        &["network \"Bad/Name\": use lowercase letters"],
    );
    fx.fails(
        &["host", "network", "create", "waytoolongname"],
        &["1 to 12 characters"],
    );
    fx.fails(
        &["host", "network", "create", &net, "--uplink", "nosuchif0"],
        &["uplink nosuchif0: no such interface"],
    );
    fx.fails(
        &["host", "network", "delete", &net],
        &[&format!("network {net:?} does not exist on this host")],
    );
    fx.ok(&["host", "network", "create", &net]);
    fx.fails(
        &["host", "network", "create", &net],
        &[&format!("network {net:?} already exists")],
    );
    fx.fails(
        &[
            "host",
            "network",
            "create",
            "other",
            "--uplink",
            &format!("vb-{net}"),
        ],
        &["is a bridge: networks are never bridged to each other"],
    );

    // An unknown network: refused before the guest prints anything.
    fx.create_vm_on("/vms/lost", "mode=test net_ip=10.96.0.9", &["nowhere"]);
    let (status, console, messages) = fx.start("/vms/lost", &[]).wait();
    assert_eq!(status.code(), Some(1), "{console}\n{messages}");
    assert!(
        messages.contains("network \"nowhere\" does not exist on this host"),
        "{messages}"
    );
    assert!(!console.contains("vapp-testguest"), "{console}");

    // A MAC a running VM already uses on the network.
    fx.create_vm_on("/vms/one", "mode=test net_ip=10.96.0.1", &[&net]);
    fx.create_vm_on("/vms/two", "mode=test net_ip=10.96.0.2", &[&net]);
    let mac = mac_of(&fx, "/vms/one");
    let toml = fx.ok(&["cat", "/vms/two/vm.toml"]);
    let copied = toml.replace(&mac_of(&fx, "/vms/two"), &mac);
    let local = fx.dir.path().join("two.toml");
    std::fs::write(&local, copied).unwrap();
    fx.ok(&["rm", "/vms/two/vm.toml"]);
    fx.ok(&["put", local.to_str().unwrap(), "/vms/two/vm.toml"]);
    let one = fx.start("/vms/one", &[]);
    one.expect_console("net: serving");
    let (status, console, messages) = fx.start("/vms/two", &[]).wait();
    assert_eq!(status.code(), Some(1), "{console}\n{messages}");
    assert!(
        messages.contains(&format!(
            "network {net:?}: MAC {mac} is already used by vm /vms/one"
        )),
        "{messages}"
    );
    assert!(!console.contains("vapp-testguest"), "{console}");
    drop(one);

    // Without CAP_NET_ADMIN no tap can be made: said so, before the guest starts.
    let vapp = fx.command(&["vm", "start", "/vms/one"]);
    let mut command = Command::new("setpriv");
    command
        .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"])
        .arg(vapp.get_program())
        .args(vapp.get_args());
    for (key, value) in vapp.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("needs CAP_NET_ADMIN"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("vapp-testguest"));
}

#[test]
fn a_nic_added_by_hand_gets_its_mac_at_the_first_start_and_keeps_it() {
    if !net_available() {
        return;
    }
    let (fx, id) = fixture();
    let net = format!("hand{id}");
    let _cleanup = Networks {
        fx: &fx,
        names: vec![net.clone()],
    };
    fx.ok(&["host", "network", "create", &net]);
    fx.create_vm_on("/vms/h", "mode=test net_ip=10.95.0.1", &[]);
    let toml = fx.ok(&["cat", "/vms/h/vm.toml"]);
    let local = fx.dir.path().join("h.toml");
    std::fs::write(&local, format!("{toml}\n[[net]]\nnetwork = \"{net}\"\n")).unwrap();
    fx.ok(&["rm", "/vms/h/vm.toml"]);
    fx.ok(&["put", local.to_str().unwrap(), "/vms/h/vm.toml"]);

    let first = fx.start("/vms/h", &[]);
    first.expect_console("net: serving");
    // The polling NIC driver still hears the power button: a graceful stop works.
    fx.ok(&["vm", "stop", "/vms/h"]);
    let (status, console, messages) = first.wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    assert!(
        console.contains("power button pressed, shutting down"),
        "{console}"
    );
    let mac = mac_of(&fx, "/vms/h");
    assert!(mac.starts_with("52:54:00:"), "{mac}");
    let again = fx.start("/vms/h", &[]);
    again.expect_console(&format!("mac {mac}, ip 10.95.0.1"));
    drop(again);
    assert_eq!(mac_of(&fx, "/vms/h"), mac);
}
