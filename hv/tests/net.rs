//! virtio-net on taps: two test guests on one bridge ping each other, and transmit and
//! receive rate limits hold, measured on the host side of the tap and by the receiving guest.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{GUEST_TIMEOUT, guest_config, kvm_available};
use hv::net::{MacAddr, RateLimit, Tap, add_interface, create_bridge, delete_bridge};
use hv::{ConsoleBuffer, Nic, Vm, VmHandle};

fn net_available() -> bool {
    kvm_available()
        && lun::prereq::require(
            lun::prereq::is_root() && lun::prereq::have_device("/dev/net/tun"),
            "root and /dev/net/tun for taps and bridges",
        )
}

/// A bridge removed when the test ends, whatever happens.
struct TestBridge(String);

impl TestBridge {
    fn new(tag: &str) -> TestBridge {
        let name = format!("vt{tag}{}", std::process::id() % 100_000);
        let _ = delete_bridge(&name);
        create_bridge(&name).unwrap();
        TestBridge(name)
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = delete_bridge(&self.0);
    }
}

fn tap_name(tag: &str) -> String {
    format!("vt{tag}{}", std::process::id() % 100_000)
}

fn start(name: &str, tap: Tap, mac: MacAddr, cmdline: &str) -> (VmHandle, ConsoleBuffer) {
    let (mut config, console) = guest_config(name, 1, cmdline);
    config.nics.push(Nic::new(tap, mac));
    (Vm::create(config).unwrap().start().unwrap(), console)
}

#[test]
fn two_guests_on_one_bridge_ping_each_other() {
    if !net_available() {
        return;
    }
    let bridge = TestBridge::new("b");
    let mut vms = Vec::new();
    for (i, (me, peer)) in [("10.99.0.1", "10.99.0.2"), ("10.99.0.2", "10.99.0.1")]
        .into_iter()
        .enumerate()
    {
        let tap = Tap::create(&tap_name(&format!("p{i}"))).unwrap();
        add_interface(&bridge.0, tap.name()).unwrap();
        let mac = MacAddr([0x52, 0x54, 0x00, 0x99, 0x00, i as u8 + 1]);
        let cmdline = format!("mode=test net_ip={me} net_ping={peer} net_count=5");
        vms.push((start(&format!("ping{i}"), tap, mac, &cmdline), peer, mac));
    }
    for ((vm, console), peer, mac) in &vms {
        let done = format!("net: ping {peer}: 5 sent, 5 received");
        let ok = console.wait_for(&done, GUEST_TIMEOUT);
        let out = console.contents();
        assert!(
            ok,
            "{} did not get its 5 replies; console:\n{out}",
            vm.name()
        );
        assert!(out.contains(&format!("mac {mac}")), "{out}");
        for seq in 1..=5 {
            assert!(
                out.contains(&format!("net: reply from {peer} seq={seq}")),
                "{out}"
            );
        }
    }
}

fn tap_rx_bytes(tap: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/rx_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_transmit_bandwidth_limit_holds_within_ten_percent() {
    if !net_available() {
        return;
    }
    // Low enough that a guest starved by a loaded host still offers more than the limit.
    let limit = 1u64 << 20;
    let name = tap_name("rl");
    let tap = Tap::create(&name).unwrap();
    let mut nic = Nic::new(tap, MacAddr([0x52, 0x54, 0x00, 0x99, 0x01, 0x01]));
    nic.tx.bytes = Some(RateLimit::per_second(limit));
    // 3 s of traffic at the limit in 1514-byte frames.
    let frames = 3 * limit / 1514;
    let (mut config, console) = guest_config(
        "ratelimit",
        1,
        &format!("mode=test net_ip=10.99.1.1 net_burst={frames} net_frame=1514"),
    );
    config.nics.push(nic);
    let vm = Vm::create(config).unwrap().start().unwrap();
    assert!(
        console.wait_for("net: burst start", GUEST_TIMEOUT),
        "{}",
        console.contents()
    );
    // Measure past the bucket's initial burst, over a window well inside the transfer.
    std::thread::sleep(Duration::from_millis(500));
    let (t0, b0) = (Instant::now(), tap_rx_bytes(&name));
    std::thread::sleep(Duration::from_millis(1500));
    let (t1, b1) = (Instant::now(), tap_rx_bytes(&name));
    let rate = (b1 - b0) as f64 / (t1 - t0).as_secs_f64();
    assert!(
        console.wait_for("net: burst of", GUEST_TIMEOUT),
        "{}",
        console.contents()
    );
    vm.stop();
    let ratio = rate / limit as f64;
    eprintln!("transmit limit {limit} B/s, measured {rate:.0} B/s");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "measured {rate:.0} B/s against a limit of {limit} B/s ({ratio:.3})"
    );
}

#[test]
fn a_receive_bandwidth_limit_holds_within_ten_percent() {
    if !net_available() {
        return;
    }
    let limit = 1u64 << 20;
    let bridge = TestBridge::new("r");
    let tap = Tap::create(&tap_name("rx")).unwrap();
    add_interface(&bridge.0, tap.name()).unwrap();
    let sender = Tap::create(&tap_name("rs")).unwrap();
    add_interface(&bridge.0, sender.name()).unwrap();
    let mac = MacAddr([0x52, 0x54, 0x00, 0x99, 0x02, 0x01]);
    let mut nic = Nic::new(tap, mac);
    nic.rx.bytes = Some(RateLimit::per_second(limit));
    let (mut config, console) = guest_config("rxlimit", 1, "mode=test net_ip=10.99.2.1");
    config.nics.push(nic);
    let vm = Vm::create(config).unwrap().start().unwrap();
    assert!(
        console.wait_for("net: serving", GUEST_TIMEOUT),
        "{}",
        console.contents()
    );
    // Offer about four times the limit, paced, for as long as the test measures.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut frame = vec![0u8; 1514];
            frame[..6].copy_from_slice(&mac.0);
            frame[6..12].copy_from_slice(&[0x52, 0x54, 0x00, 0x99, 0x02, 0x02]);
            frame[12..14].copy_from_slice(&[0x88, 0xb5]);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..4 {
                    let _ = sender.write_frame(&frame);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let timed = |n: u32| {
        let ok = console.wait_for(&format!("net: received {n} burst frames"), GUEST_TIMEOUT);
        assert!(ok, "{}", console.contents());
        Instant::now()
    };
    // Past the bucket's initial burst, then 1536 frames.
    let t0 = timed(512);
    let t1 = timed(2048);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    vm.stop();
    let rate = 1536.0 * 1514.0 / (t1 - t0).as_secs_f64();
    eprintln!("receive limit {limit} B/s, measured {rate:.0} B/s");
    let ratio = rate / limit as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "measured {rate:.0} B/s against a limit of {limit} B/s ({ratio:.3})"
    );
}
