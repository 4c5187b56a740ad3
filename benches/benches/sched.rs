//! The host's I/O schedulers (sched::Clock) in the virtio-blk and virtio-net paths of real VMs
//! (the test guest in `mode=diskio`: one 4 KiB read at a time, forever; or sending bursts of
//! 1514-byte frames to a tap).
//!
//! - `sched_disk_iops_4k`: the time for 1,024 guest reads of a page-cached 1 MiB disk;
//!   `baseline` without a scheduler, `mclock` through a host clock with default shares (the
//!   path every `vm start` takes). Goal: at least 0.95 of the baseline's rate.
//! - Printed, not timed: under contention between VMs in this process, the fairness error of
//!   2:1 disk shares (|measured ratio / 2 - 1|) and the reservation error of a 100 IOPS
//!   reservation beside a VM with 100 times its shares (shortfall / 100, 0 when met).
//! - `sched_net_tx_1514B` (root: taps): the time for a guest to send 4,096 frames per iteration to
//!   a tap the host stack receives, between its console markers; `baseline` without a scheduler,
//!   `mclock` through a net clock with a capacity far above what it sends, so every frame takes
//!   the whole path (limit, tags, the wire). Goal: at least 0.95 of the baseline's rate.
//! - Printed, not timed (root): the net fairness error of 2:1 net shares dividing a 1.5 MiB/s
//!   host capacity between two sending VMs, counted on their taps.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use hv::net::{MacAddr, Tap};
use hv::{Console, ConsoleBuffer, Disk, Nic, Vm, VmConfig, VmHandle};
use lun::FileLun;

const TIMEOUT: Duration = Duration::from_secs(60);

fn start(dir: &Path, name: &str, clock: Option<Arc<sched::Clock>>) -> (VmHandle, ConsoleBuffer) {
    let path = dir.join(format!("{name}.img"));
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let lun = Arc::new(FileLun::open(&path, false).unwrap());
    let console = ConsoleBuffer::new();
    let mut config = VmConfig::new(name, hv::test_guest::image().unwrap().to_vec());
    config.memory_bytes = 64 << 20;
    config.cmdline = "mode=diskio".to_string();
    config.console = Console::Buffer(console.clone());
    let mut disk = Disk::new(lun);
    disk.clock = clock;
    config.disks.push(disk);
    let handle = Vm::create(config).unwrap().start().unwrap();
    assert!(
        console.wait_for("diskio: started", TIMEOUT),
        "{}",
        console.contents()
    );
    (handle, console)
}

/// The guest's last reported request count.
fn count(console: &ConsoleBuffer) -> u64 {
    let text = console.contents();
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("vapp-testguest: diskio: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

const FRAME: u64 = 1514;
const FRAMES_PER_ITER: u64 = 4096;

/// A test guest sending `cmdline`'s frames on a NIC on `tap`, scheduled by `clock` if given.
fn sender(
    name: &str,
    tap: Tap,
    last: u8,
    clock: Option<Arc<sched::Clock>>,
    cmdline: &str,
) -> (VmHandle, ConsoleBuffer) {
    let mut config = VmConfig::new(name, hv::test_guest::image().unwrap().to_vec());
    config.memory_bytes = 64 << 20;
    config.cmdline = cmdline.to_string();
    let console = ConsoleBuffer::new();
    config.console = Console::Buffer(console.clone());
    let mut nic = Nic::new(tap, MacAddr([0x52, 0x54, 0x00, 0x78, 0x00, last]));
    nic.clock = clock;
    config.nics.push(nic);
    (Vm::create(config).unwrap().start().unwrap(), console)
}

fn tap_name(i: u32) -> String {
    format!("vsb{}n{i}", std::process::id() % 100_000)
}

/// A tap with an address of the host's on it, so the host stack receives what the guest sends.
fn host_tap(i: u32) -> Tap {
    let name = tap_name(i);
    let tap = Tap::create(&name).unwrap();
    let out = std::process::Command::new("ip")
        .args(["addr", "add", &format!("10.93.{i}.254/24"), "dev", &name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    tap
}

fn tap_rx_bytes(i: u32) -> u64 {
    let path = format!("/sys/class/net/{}/statistics/rx_bytes", tap_name(i));
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn net_ticket(shares: u64) -> sched::Ticket {
    sched::Ticket {
        shares,
        ..Default::default()
    }
}

/// Guest-to-host throughput with and without the net scheduler, then the fairness of 2:1 net
/// shares on a 1.5 MiB/s host.
fn net(c: &mut Criterion, dir: &Path) {
    let mut group = c.benchmark_group("sched_net_tx_1514B");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(FRAMES_PER_ITER * FRAME));
    let runtime = dir.join("run-net");
    for variant in ["baseline", "mclock"] {
        group.bench_function(variant, |b| {
            b.iter_custom(|iters| {
                let clock = (variant == "mclock").then(|| {
                    Arc::new(
                        sched::Clock::join(
                            &runtime,
                            sched::Class::Net,
                            net_ticket(1000),
                            Some(10_000_000_000),
                        )
                        .unwrap(),
                    )
                });
                let (vm, console) = sender(
                    variant,
                    host_tap(0),
                    1,
                    clock,
                    &format!(
                        "mode=test net_ip=10.93.0.1 net_burst={} net_frame={FRAME}",
                        iters * FRAMES_PER_ITER
                    ),
                );
                assert!(
                    console.wait_for("net: burst start", TIMEOUT),
                    "{}",
                    console.contents()
                );
                let t = Instant::now();
                assert!(
                    console.wait_for("net: burst of", TIMEOUT),
                    "{}",
                    console.contents()
                );
                let elapsed = t.elapsed();
                vm.stop();
                vm.wait();
                elapsed
            })
        });
    }
    group.finish();

    let capacity = 1536 << 10;
    let runtime = dir.join("run-net-fair");
    let vms: Vec<_> = [(2000, 1), (1000, 2)]
        .into_iter()
        .map(|(shares, i)| {
            let clock = sched::Clock::join(
                &runtime,
                sched::Class::Net,
                net_ticket(shares),
                Some(capacity),
            )
            .unwrap();
            let (vm, console) = sender(
                &format!("fair{i}"),
                host_tap(i),
                i as u8,
                Some(Arc::new(clock)),
                &format!("mode=test net_ip=10.93.{i}.1 net_burst=1000000000 net_frame={FRAME}"),
            );
            assert!(
                console.wait_for("net: burst start", TIMEOUT),
                "{}",
                console.contents()
            );
            vm
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = [tap_rx_bytes(1), tap_rx_bytes(2)];
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let after = [tap_rx_bytes(1), tap_rx_bytes(2)];
    let secs = t.elapsed().as_secs_f64();
    for vm in vms {
        vm.stop();
        vm.wait();
    }
    let rate = |i: usize| (after[i] - before[i]) as f64 / secs / f64::from(1 << 20);
    let ratio = rate(0) / rate(1).max(1e-9);
    println!(
        "sched net fairness: 2:1 net shares of 1.5 MiB/s gave {:.2} and {:.2} MiB/s, ratio {ratio:.2}, error {:.1} %",
        rate(0),
        rate(1),
        (ratio / 2.0 - 1.0).abs() * 100.0
    );
}

fn ticket(shares: u64, reservation_iops: u64) -> sched::Ticket {
    sched::Ticket {
        shares,
        reservation: reservation_iops,
        ..Default::default()
    }
}

/// IOPS of each VM over `secs`, all running at once.
fn contend(dir: &Path, tickets: &[sched::Ticket], secs: f64) -> Vec<f64> {
    let runtime = dir.join("run-contend");
    let vms: Vec<_> = tickets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let clock =
                Arc::new(sched::Clock::join(&runtime, sched::Class::Disk, *t, None).unwrap());
            start(dir, &format!("c{i}"), Some(clock))
        })
        .collect();
    let before: Vec<u64> = vms.iter().map(|(_, c)| count(c)).collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let after: Vec<u64> = vms.iter().map(|(_, c)| count(c)).collect();
    for (handle, _) in vms {
        handle.stop();
        handle.wait();
    }
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b) as f64 / secs)
        .collect()
}

fn main() {
    if !Path::new("/dev/kvm").exists() || hv::test_guest::image().is_err() {
        eprintln!("sched bench: skipped, needs /dev/kvm and the test guest (gcc)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("sched_disk_iops_4k");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for variant in ["baseline", "mclock"] {
        let clock = (variant == "mclock").then(|| {
            Arc::new(
                sched::Clock::join(
                    &dir.path().join("run-single"),
                    sched::Class::Disk,
                    ticket(1000, 0),
                    None,
                )
                .unwrap(),
            )
        });
        let (handle, console) = start(dir.path(), variant, clock);
        group.bench_function(variant, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // The guest prints every 256 requests: time four prints' worth.
                    let from = count(&console) / 256 * 256 + 256;
                    while count(&console) < from {
                        std::thread::yield_now();
                    }
                    let t = Instant::now();
                    while count(&console) < from + 1024 {
                        std::thread::yield_now();
                    }
                    total += t.elapsed();
                }
                total
            })
        });
        handle.stop();
        handle.wait();
    }
    group.finish();

    let iops = contend(dir.path(), &[ticket(2000, 0), ticket(1000, 0)], 3.0);
    let ratio = iops[0] / iops[1].max(1.0);
    println!(
        "sched fairness: 2:1 disk shares gave {:.0} and {:.0} IOPS, ratio {ratio:.2}, error {:.1} %",
        iops[0],
        iops[1],
        (ratio / 2.0 - 1.0).abs() * 100.0
    );
    let iops = contend(dir.path(), &[ticket(1000, 0), ticket(10, 100)], 3.0);
    println!(
        "sched reservation: 100 IOPS reserved beside a VM with 100x its shares got {:.0} IOPS (the other {:.0}), error {:.1} %",
        iops[1],
        iops[0],
        ((100.0 - iops[1]) / 100.0).max(0.0) * 100.0
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        net(&mut c, dir.path());
    } else {
        eprintln!("sched bench: net part skipped, needs root for taps");
    }
    c.final_summary();
}
