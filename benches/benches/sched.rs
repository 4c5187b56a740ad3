//! The disk scheduler (sched::Clock) in the virtio-blk path of real VMs (the test guest in
//! `mode=diskio`: one 4 KiB read at a time, forever).
//!
//! - `sched_disk_iops_4k`: the time for 1,024 guest reads of a page-cached 1 MiB disk;
//!   `baseline` without a scheduler, `mclock` through a host clock with default shares (the
//!   path every `vm start` takes). Goal: at least 0.95 of the baseline's rate.
//! - Printed, not timed: under contention between VMs in this process, the fairness error of
//!   2:1 disk shares (|measured ratio / 2 - 1|) and the reservation error of a 100 IOPS
//!   reservation beside a VM with 100 times its shares (shortfall / 100, 0 when met).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use hv::{Console, ConsoleBuffer, Disk, Vm, VmConfig, VmHandle};
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
    c.final_summary();
}
