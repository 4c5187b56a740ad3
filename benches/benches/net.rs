//! virtio-net with the test guest (hv/guest): throughput of bursts of 1514-byte frames and
//! ICMP echo round trips, guest to host and guest to guest over a bridge.
//!
//! - `net_tx_1514B`: frames per boot of the sending guest, timed between its console markers
//!   (`net: burst start` and `net: burst of N frames ... sent`, once every frame left its
//!   ring). `guest_to_host` sends to a tap the host stack receives; `guest_to_guest` sends to
//!   another test guest on the same bridge. `baseline` is this process writing the same
//!   frames into a tap on a bridge whose other port a thread drains: the host's own datapath,
//!   what a VMM's transmit costs at best. QEMU's virtio-net is not the baseline: QEMU microvm
//!   does not describe its virtio-mmio devices to a PVH kernel (no `virtio_mmio.device=` is
//!   appended, and the test guest reads no DSDT for devices), so the test guest cannot find
//!   QEMU's NIC.
//! - `net_rtt`: per echo request and reply, a guest pinging the host's address on its tap
//!   (`guest_to_host`) or another guest on the bridge (`guest_to_guest`), timed between the
//!   pinging guest's `ping ... start` and `ping ...: N sent, N received` markers.
//!
//! Needs root (taps, bridges) and /dev/kvm; skips with a printed reason otherwise.
#![allow(clippy::unwrap_used)]

use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use hv::net::{MacAddr, Tap, add_interface, create_bridge, delete_bridge};
use hv::{Console, ConsoleBuffer, Nic, Vm, VmConfig, VmHandle};

const FRAME: u64 = 1514;
const FRAMES_PER_ITER: u64 = 2048;
const TIMEOUT: Duration = Duration::from_secs(120);

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
}

fn names() -> (String, String, String) {
    let id = std::process::id() % 100_000;
    (format!("vnb{id}"), format!("vna{id}"), format!("vnc{id}"))
}

struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = delete_bridge(&self.0);
    }
}

fn guest(name: &str, tap: Tap, last: u8, cmdline: &str) -> (VmHandle, ConsoleBuffer) {
    let mut config = VmConfig::new(name, hv::test_guest::image().unwrap().to_vec());
    config.memory_bytes = 64 << 20;
    config.cmdline = cmdline.to_string();
    let console = ConsoleBuffer::new();
    config.console = Console::Buffer(console.clone());
    config
        .nics
        .push(Nic::new(tap, MacAddr([0x52, 0x54, 0x00, 0x77, 0x00, last])));
    (Vm::create(config).unwrap().start().unwrap(), console)
}

/// The time between two console markers of a running guest.
fn between(console: &ConsoleBuffer, start: &str, end: &str) -> Duration {
    assert!(console.wait_for(start, TIMEOUT), "{}", console.contents());
    let t0 = Instant::now();
    assert!(console.wait_for(end, TIMEOUT), "{}", console.contents());
    t0.elapsed()
}

/// A peer guest answering on the bridge at 10.92.0.2.
fn peer(bridge: &str, tap: &str) -> (VmHandle, ConsoleBuffer) {
    let tap = Tap::create(tap).unwrap();
    add_interface(bridge, tap.name()).unwrap();
    let (vm, console) = guest("peer", tap, 2, "mode=test net_ip=10.92.0.2");
    assert!(
        console.wait_for("net: serving", TIMEOUT),
        "{}",
        console.contents()
    );
    (vm, console)
}

/// A tap with the host's address 10.92.0.254 on it, so the host stack answers the guest.
fn host_tap(name: &str) -> Tap {
    let tap = Tap::create(name).unwrap();
    let out = Command::new("ip")
        .args(["addr", "add", "10.92.0.254/24", "dev", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    tap
}

fn sender(tap: Tap, cmdline: &str) -> Duration {
    let (vm, console) = guest("sender", tap, 1, cmdline);
    let elapsed = between(&console, "net: burst start", "net: burst of");
    vm.stop();
    elapsed
}

fn throughput(c: &mut Criterion) {
    let (br, a, b) = names();
    let _ = delete_bridge(&br);
    create_bridge(&br).unwrap();
    let _bridge = Bridge(br.clone());
    let mut group = c.benchmark_group("net_tx_1514B");
    configure(&mut group);
    group.throughput(Throughput::Bytes(FRAMES_PER_ITER * FRAME));

    group.bench_function("baseline", |bench| {
        let writer = Tap::create(&a).unwrap();
        let reader = Arc::new(Tap::create(&b).unwrap());
        add_interface(&br, &a).unwrap();
        add_interface(&br, &b).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let drain = {
            let (reader, stop) = (reader.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let mut fd = libc::pollfd {
                        fd: reader.as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one live pollfd.
                    unsafe { libc::poll(&mut fd, 1, 100) };
                    while reader.read_frame(&mut buf).is_ok() {}
                }
            })
        };
        let mut frame = vec![0u8; FRAME as usize];
        frame[..6].copy_from_slice(&[0x52, 0x54, 0x00, 0x77, 0x00, 2]);
        frame[6..12].copy_from_slice(&[0x52, 0x54, 0x00, 0x77, 0x00, 1]);
        frame[12..14].copy_from_slice(&[0x88, 0xb5]);
        bench.iter(|| {
            for _ in 0..FRAMES_PER_ITER {
                // A full tap queue drops the frame, as it does for the VMM.
                let _ = writer.write_frame(&frame);
            }
        });
        stop.store(true, Ordering::Relaxed);
        drain.join().unwrap();
    });

    group.bench_function("guest_to_host", |bench| {
        bench.iter_custom(|iters| {
            let tap = host_tap(&a);
            sender(
                tap,
                &format!(
                    "mode=test net_ip=10.92.0.1 net_burst={} net_frame={FRAME}",
                    iters * FRAMES_PER_ITER
                ),
            )
        });
    });

    group.bench_function("guest_to_guest", |bench| {
        let (_peer, _) = peer(&br, &b);
        bench.iter_custom(|iters| {
            let tap = Tap::create(&a).unwrap();
            add_interface(&br, &a).unwrap();
            sender(
                tap,
                &format!(
                    "mode=test net_ip=10.92.0.1 net_ping=10.92.0.2 net_count=0 net_burst={} net_frame={FRAME}",
                    iters * FRAMES_PER_ITER
                ),
            )
        });
    });
    group.finish();
}

fn pinger(tap: Tap, peer: &str, iters: u64) -> Duration {
    let (vm, console) = guest(
        "pinger",
        tap,
        1,
        &format!("mode=test net_ip=10.92.0.1 net_ping={peer} net_count={iters}"),
    );
    let elapsed = between(
        &console,
        &format!("net: ping {peer} start"),
        &format!("net: ping {peer}: {iters} sent, {iters} received"),
    );
    vm.stop();
    elapsed
}

fn round_trips(c: &mut Criterion) {
    let (br, a, b) = names();
    let _ = delete_bridge(&br);
    create_bridge(&br).unwrap();
    let _bridge = Bridge(br.clone());
    let mut group = c.benchmark_group("net_rtt");
    configure(&mut group);
    group.bench_function("guest_to_host", |bench| {
        bench.iter_custom(|iters| pinger(host_tap(&a), "10.92.0.254", iters));
    });
    group.bench_function("guest_to_guest", |bench| {
        let (_peer, _) = peer(&br, &b);
        bench.iter_custom(|iters| {
            let tap = Tap::create(&a).unwrap();
            add_interface(&br, &a).unwrap();
            pinger(tap, "10.92.0.2", iters)
        });
    });
    group.finish();
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0
        || !std::path::Path::new("/dev/kvm").exists()
        || hv::test_guest::image().is_err()
    {
        eprintln!("net bench: skipped, needs root (taps, bridges), /dev/kvm and the test guest");
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    throughput(&mut criterion);
    round_trips(&mut criterion);
    criterion.final_summary();
}
