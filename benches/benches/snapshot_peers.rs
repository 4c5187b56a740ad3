//! Snapshots against their peers, on regular files in one file system:
//!
//! - `snapshot_qcow2_peer_64MiB`: QEMU's own copy-on-write snapshot, the peer the issue
//!   names. `qemu-img bench` writes 64 MiB sequentially in 64 KiB requests (O_DIRECT,
//!   `-t none`) to a raw image (`baseline`), to a filled qcow2 image (`qcow2`) and to the
//!   same qcow2 image right after `qemu-img snapshot -c` (`qcow2_internal_snapshot`), so
//!   every cluster is first written after the snapshot. Read its ratio beside the engine's
//!   `snapshot_first_write_64MiB/cofw`.
//! - `snapshot_rollback_1GiB`: a 1 GiB source with 64 MiB changed since its session.
//!   `baseline` copies those 64 MiB with plain reads and writes (what a restore costs at
//!   best); `usable` is the time from the rollback call until a read of a changed chunk
//!   returns the session's data (the goal: ≤ 100 ms); `complete` runs the background copy
//!   to its end.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use lun::{FileLun, Lun};
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;
const CHANGED: u64 = 64 * MIB;
const IO: usize = 64 * 1024;

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Bytes(CHANGED));
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img bench` writing the whole 64 MiB image once, pattern `fill`.
fn bench_write(format: &str, image: &Path, fill: u8) {
    let pattern = format!("--pattern={fill}");
    qemu_img(&[
        "bench",
        "-w",
        "-q",
        "-t",
        "none",
        "-f",
        format,
        "-c",
        &(CHANGED / IO as u64).to_string(),
        "-s",
        "64k",
        "-S",
        "64k",
        "-d",
        "1",
        &pattern,
        image.to_str().unwrap(),
    ]);
}

fn qcow2_peer(c: &mut Criterion) {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("SKIPPED: snapshot_qcow2_peer_64MiB: qemu-img is not installed");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let raw = dir.path().join("peer.raw");
    let qcow2 = dir.path().join("peer.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "64M"]);
    bench_write("raw", &raw, 1);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        qcow2.to_str().unwrap(),
        "64M",
    ]);
    bench_write("qcow2", &qcow2, 1);

    let mut group = c.benchmark_group("snapshot_qcow2_peer_64MiB");
    configure(&mut group);
    group.bench_function("baseline", |b| b.iter(|| bench_write("raw", &raw, 2)));
    group.bench_function("qcow2", |b| b.iter(|| bench_write("qcow2", &qcow2, 3)));
    group.bench_function("qcow2_internal_snapshot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let name = format!("s{i}");
                qemu_img(&["snapshot", "-c", &name, qcow2.to_str().unwrap()]);
                let t = Instant::now();
                bench_write("qcow2", &qcow2, i as u8);
                total += t.elapsed();
                qemu_img(&["snapshot", "-d", &name, qcow2.to_str().unwrap()]);
            }
            total
        })
    });
    group.finish();
}

fn file(path: &Path, size: u64) -> Arc<dyn Lun> {
    if !path.exists() {
        FileLun::create(path, size).unwrap();
    }
    Arc::new(FileLun::open(path, false).unwrap())
}

fn write_changed(lun: &dyn Lun, fill: u8) {
    let buf = vec![fill; IO];
    for offset in (0..CHANGED).step_by(IO) {
        lun.write_at(&buf, offset).unwrap();
    }
    lun.flush().unwrap();
}

fn rollback(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let source = file(&dir.path().join("rb.img"), 1024 * MIB);
    let pool = file(&dir.path().join("rb.snap"), CHANGED + 16 * MIB);
    write_changed(source.as_ref(), 1);
    let snaps = Snapshots::create(source.clone(), pool, PoolOptions::default()).unwrap();
    let copy_from = file(&dir.path().join("copy-from.img"), CHANGED);
    let copy_to = file(&dir.path().join("copy-to.img"), CHANGED);
    write_changed(copy_from.as_ref(), 4);

    // Each sample: a session, 64 MiB written over it (copied to the pool), then the rollback.
    let prepared = |i: u64| {
        snaps.create_session("rb", false).unwrap();
        write_changed(snaps.source().as_ref(), 2 + (i % 2) as u8);
    };
    let finish = || {
        snaps.wait_rollback().unwrap();
        snaps.delete_session("rb").unwrap();
    };

    let mut group = c.benchmark_group("snapshot_rollback_1GiB");
    configure(&mut group);
    group.bench_function("baseline", |b| {
        b.iter(|| {
            let mut buf = vec![0u8; IO];
            for offset in (0..CHANGED).step_by(IO) {
                copy_from.read_at(&mut buf, offset).unwrap();
                copy_to.write_at(&buf, offset).unwrap();
            }
            copy_to.flush().unwrap();
        })
    });
    group.bench_function("usable", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut buf = vec![0u8; IO];
            for i in 0..iters {
                prepared(i);
                let t = Instant::now();
                snaps.rollback("rb").unwrap();
                snaps
                    .source()
                    .read_at(&mut buf, CHANGED - IO as u64)
                    .unwrap();
                total += t.elapsed();
                assert!(
                    buf.iter().all(|&b| b == 1),
                    "the rollback read a wrong chunk"
                );
                finish();
            }
            total
        })
    });
    group.bench_function("complete", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                prepared(i);
                let t = Instant::now();
                snaps.rollback("rb").unwrap();
                snaps.wait_rollback().unwrap();
                total += t.elapsed();
                finish();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, qcow2_peer, rollback);
criterion_main!(benches);
