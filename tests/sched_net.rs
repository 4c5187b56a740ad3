//! The network part of the resource scheduler with real VMs (`vm start` of the test guest on
//! KVM, sending bursts of 1514-byte frames to a host network): a VM-wide limit holds over two
//! NICs, shares divide the host's transmit capacity (`VAPP_NET_CAPACITY`) 2:1, a reservation is
//! met while another VM saturates, and admission refuses an over-reservation naming the
//! numbers. What a VM sent is counted on its taps (the host side of each NIC), not by vapp.
//! Needs root (bridges, taps, cgroups), /dev/net/tun, KVM and ip(8).
#![allow(clippy::unwrap_used)]

mod vm_support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vm_support::{Fixture, Running, kvm_available};

/// Sends "forever" (until the VM is stopped): 10^9 frames.
const SENDER: &str = "mode=test net_burst=1000000000 net_frame=1514";
const MIB: f64 = (1 << 20) as f64;
/// How long the rates are measured over, after a moment for the senders to settle.
const MEASURE: Duration = Duration::from_secs(3);

/// The VMs of one test contend with each other only: tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn net_available() -> bool {
    kvm_available()
        && lun::prereq::require(
            lun::prereq::is_root()
                && lun::prereq::have_device("/dev/net/tun")
                && lun::prereq::have_command("ip"),
            "root, /dev/net/tun and ip(8) for bridges and taps",
        )
}

/// A fixture with its own state directory and, if given, a host transmit capacity; and a
/// suffix for host-wide interface names.
fn fixture(capacity: Option<&str>) -> (Fixture, String) {
    let mut fx = Fixture::new();
    let state = fx.dir.path().join("state");
    fx.env.push((
        "VAPP_STATE_DIR".to_string(),
        state.to_str().unwrap().to_string(),
    ));
    if let Some(c) = capacity {
        fx.env
            .push(("VAPP_NET_CAPACITY".to_string(), c.to_string()));
    }
    (fx, (std::process::id() % 10_000).to_string())
}

/// Host networks, deleted when the test ends, even after a failure.
struct Networks<'a> {
    fx: &'a Fixture,
    names: Vec<String>,
}

impl<'a> Networks<'a> {
    fn create(fx: &'a Fixture, names: &[String]) -> Networks<'a> {
        let networks = Networks {
            fx,
            names: names.to_vec(),
        };
        for name in names {
            fx.ok(&["host", "network", "create", name]);
        }
        networks
    }
}

impl Drop for Networks<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = self.fx.run(&["host", "network", "delete", name]);
        }
    }
}

/// `vm create` of the test guest with a NIC on each of `networks`, then `extra_toml`
/// appended to its vm.toml.
fn create(fx: &Fixture, path: &str, cmdline: &str, networks: &[&String], extra_toml: &str) {
    let networks: Vec<&str> = networks.iter().map(|n| n.as_str()).collect();
    fx.create_vm_on(path, cmdline, &networks);
    let toml_path = format!("{path}/vm.toml");
    let config = fx.ok(&["cat", &toml_path]);
    let local = fx.dir.path().join("vm.toml.new");
    std::fs::write(&local, format!("{config}\n{extra_toml}")).unwrap();
    fx.ok(&["rm", &toml_path]);
    fx.ok(&["put", local.to_str().unwrap(), &toml_path]);
}

/// Bytes the host received from NIC `nic` of the VM run by process `pid` (its tap's rx).
fn tap_bytes(pid: u32, nic: usize) -> u64 {
    let path = format!("/sys/class/net/vapp{pid:x}n{nic}/statistics/rx_bytes");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// Starts `path` and waits until its guest sends.
fn start_sending(fx: &Fixture, path: &str) -> Running {
    let vm = fx.start(path, &[]);
    vm.expect_console("net: burst start");
    vm
}

/// Bytes/s each NIC of each VM sent over `MEASURE` (while `during` runs, if it takes longer).
fn measure(vms: &[(&Running, usize)], during: impl FnOnce()) -> Vec<Vec<f64>> {
    // Past the first bursts the limits and the wire allow.
    std::thread::sleep(Duration::from_millis(500));
    let sample = || -> Vec<Vec<u64>> {
        vms.iter()
            .map(|(vm, nics)| (0..*nics).map(|n| tap_bytes(vm.pid(), n)).collect())
            .collect()
    };
    let before = sample();
    let t0 = Instant::now();
    during();
    let left = MEASURE.saturating_sub(t0.elapsed());
    std::thread::sleep(left);
    let after = sample();
    let secs = t0.elapsed().as_secs_f64();
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            b.iter()
                .zip(a)
                .map(|(b, a)| (a - b) as f64 / secs)
                .collect()
        })
        .collect()
}

fn total(rates: &[f64]) -> f64 {
    rates.iter().sum()
}

#[test]
fn a_vm_wide_net_limit_holds_over_two_nics() {
    if !net_available() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, id) = fixture(None);
    let (n0, n1) = (format!("sl{id}a"), format!("sl{id}b"));
    let _networks = Networks::create(&fx, &[n0.clone(), n1.clone()]);
    create(
        &fx,
        "/vms/capped",
        SENDER,
        &[&n0, &n1],
        "[resources.net]\nlimit = \"1MiB/s\"\n",
    );
    let vm = start_sending(&fx, "/vms/capped");
    let mut report = String::new();
    let rates = measure(&[(&vm, 2)], || {
        report = fx.ok(&[
            "host",
            "resources",
            "--json",
            "--interval",
            &MEASURE.as_secs_f64().to_string(),
        ]);
    });
    let sent = total(&rates[0]);
    assert!(
        (0.9..=1.1).contains(&(sent / MIB)),
        "{:.2} MiB/s over both NICs ({rates:?}) under a 1 MiB/s limit",
        sent / MIB
    );
    for (nic, rate) in rates[0].iter().enumerate() {
        assert!(
            *rate > sent / 4.0,
            "NIC {nic} sent {rate:.0} of {sent:.0} bytes/s: the guest sends on both"
        );
    }
    // host resources sees the same VM-wide rate, and says shares divide nothing here.
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report["net_capacity_bytes_per_sec"].is_null(), "{report}");
    let entry = &report["vms"][0];
    assert_eq!(entry["net_limit_bytes_per_sec"], 1 << 20, "{entry}");
    let seen = entry["net_bytes_per_sec"].as_f64().unwrap();
    assert!(
        (0.9..=1.1).contains(&(seen / MIB)),
        "host resources: {:.2} MiB/s",
        seen / MIB
    );
    let text = fx.ok(&["host", "resources", "--interval", "0.2"]);
    assert!(
        text.contains("network: no transmit capacity set (VAPP_NET_CAPACITY)"),
        "{text}"
    );
}

#[test]
fn two_to_one_net_shares_divide_the_host_capacity_two_to_one() {
    if !net_available() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, id) = fixture(Some("1536KiB/s"));
    let (na, nb) = (format!("ss{id}a"), format!("ss{id}b"));
    let _networks = Networks::create(&fx, &[na.clone(), nb.clone()]);
    create(
        &fx,
        "/vms/high",
        SENDER,
        &[&na],
        "[resources.net]\nshares = 2000\n",
    );
    create(
        &fx,
        "/vms/normal",
        SENDER,
        &[&nb],
        "[resources.net]\nshares = 1000\n",
    );
    let high = start_sending(&fx, "/vms/high");
    let normal = start_sending(&fx, "/vms/normal");
    let rates = measure(&[(&high, 1), (&normal, 1)], || {});
    let (h, n) = (total(&rates[0]), total(&rates[1]));
    let ratio = h / n;
    assert!(
        (1.8..=2.2).contains(&ratio),
        "{:.2} and {:.2} MiB/s: ratio {ratio:.2} for 2:1 shares",
        h / MIB,
        n / MIB
    );
    // Both together fill, and stay within, the host's 1.5 MiB/s.
    assert!(
        (0.85..=1.1).contains(&((h + n) / (1.5 * MIB))),
        "{:.2} MiB/s sent on a 1.5 MiB/s host",
        (h + n) / MIB
    );
}

#[test]
fn a_net_reservation_is_met_while_another_vm_saturates() {
    if !net_available() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (fx, id) = fixture(Some("1536KiB/s"));
    let (na, nb) = (format!("sr{id}a"), format!("sr{id}b"));
    let _networks = Networks::create(&fx, &[na.clone(), nb.clone()]);
    create(
        &fx,
        "/vms/reserved",
        SENDER,
        &[&na],
        "[resources.net]\nshares = 100\nreservation = \"768KiB/s\"\n",
    );
    create(
        &fx,
        "/vms/hog",
        SENDER,
        &[&nb],
        "[resources.net]\nshares = 4000\n",
    );
    let hog = start_sending(&fx, "/vms/hog");
    let reserved = start_sending(&fx, "/vms/reserved");
    let rates = measure(&[(&reserved, 1), (&hog, 1)], || {});
    let (r, h) = (total(&rates[0]), total(&rates[1]));
    // By shares alone it would get 100/4100 of 1.5 MiB/s, 0.04 MiB/s.
    assert!(
        r >= 0.9 * 0.75 * MIB,
        "the 0.75 MiB/s reservation got {:.2} MiB/s beside {:.2} MiB/s",
        r / MIB,
        h / MIB
    );
    assert!(
        r + h <= 1.1 * 1.5 * MIB,
        "{:.2} MiB/s on a 1.5 MiB/s host",
        (r + h) / MIB
    );
}

#[test]
fn admission_refuses_a_net_reservation_the_host_cannot_guarantee() {
    if !kvm_available()
        || !lun::prereq::require(lun::prereq::is_root(), "root for the VMs' cgroups")
    {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let reservation = "[resources.net]\nreservation = \"6MiB/s\"\n";
    let (fx, _) = fixture(Some("10MiB/s"));
    create(&fx, "/vms/first", "mode=wait", &[], reservation);
    create(&fx, "/vms/second", "mode=wait", &[], reservation);
    let first = fx.start("/vms/first", &[]);
    first.expect_console("waiting to be stopped");
    fx.fails(
        &["vm", "start", "/vms/second"],
        &[
            "cannot power on /vms/second: its network reservation of 6 MiB/s does not fit",
            "the host has 10 MiB/s",
            "6 MiB/s reserved by running VMs, leaving 4 MiB/s",
        ],
    );
    drop(first);

    // A host that sets no capacity guarantees nothing.
    let (bare, _) = fixture(None);
    create(&bare, "/vms/first", "mode=wait", &[], reservation);
    bare.fails(
        &["vm", "start", "/vms/first"],
        &[
            "cannot power on /vms/first: its network reservation of 6 MiB/s cannot be guaranteed",
            "VAPP_NET_CAPACITY",
        ],
    );
}
