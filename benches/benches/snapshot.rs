//! The snapshot engine on regular files: 64 MiB of sequential 64 KiB writes (then a flush)
//! through the engine's source LUN, and 64 MiB of reads.
//!
//! - first write: `baseline` with no session; `cofw` right after a session is taken, so
//!   every chunk is copied to the pool first.
//! - random first write: 1024 writes of 4 KiB, one in each 64 KiB chunk in a random order,
//!   submitted 32 at a time (an io_uring queue at depth 32), then a flush; `baseline` with
//!   no session, `cofw` right after a session is taken.
//! - rewrite: `baseline` with no session; `after_cofw` with a session whose chunks are all
//!   copied already (writes go straight to the source).
//! - sessions: the first write with 1 session open (`baseline`), 8 and 64.
//! - read: the source (`baseline`) and a session whose chunks are all in the pool.
//! - clone sync: a full copy to a clone (`baseline`) and a sync after 1 % of the chunks
//!   changed on the source since the fracture.
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
use lun::{FileLun, IoRequest, Lun};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const IO: usize = 64 * 1024;
/// What the rollback bench changes since its session.
const CHANGED: u64 = 64 * MIB;

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Bytes(SIZE));
}

fn file(path: &Path, size: u64) -> Arc<dyn Lun> {
    if !path.exists() {
        FileLun::create(path, size).unwrap();
    }
    Arc::new(FileLun::open(path, false).unwrap())
}

/// A source, filled, with an empty pool twice its size.
fn engine(dir: &Path, name: &str) -> Snapshots {
    let source = file(&dir.join(format!("{name}.img")), SIZE);
    let pool = file(&dir.join(format!("{name}.snap")), 2 * SIZE + 4 * MIB);
    write_pass(source.as_ref(), 1);
    Snapshots::create(source, pool, PoolOptions::default()).unwrap()
}

fn write_pass(lun: &dyn Lun, fill: u8) {
    let buf = vec![fill; IO];
    for offset in (0..SIZE).step_by(IO) {
        lun.write_at(&buf, offset).unwrap();
    }
    lun.flush().unwrap();
}

fn read_pass(lun: &dyn Lun) {
    let mut buf = vec![0u8; IO];
    for offset in (0..SIZE).step_by(IO) {
        lun.read_at(&mut buf, offset).unwrap();
    }
}

/// Times the first write pass after `sessions` fresh sessions are taken.
fn first_write(snaps: &Snapshots, sessions: usize, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let source = snaps.source();
    for i in 0..iters {
        for s in 0..sessions {
            snaps.create_session(&format!("s{s}"), false).unwrap();
        }
        let t = Instant::now();
        write_pass(source.as_ref(), i as u8);
        total += t.elapsed();
        for s in 0..sessions {
            snaps.delete_session(&format!("s{s}")).unwrap();
        }
    }
    total
}

const RAND_IO: usize = 4096;
const QD: usize = 32;

/// Times the random first-write pass after `sessions` fresh sessions are taken.
fn random_first_write(snaps: &Snapshots, sessions: usize, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let source = snaps.source();
    let mut offsets: Vec<u64> = (0..SIZE / IO as u64).map(|c| c * IO as u64).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for i in 0..iters {
        offsets.shuffle(&mut rng);
        let buf = vec![i as u8; RAND_IO];
        for s in 0..sessions {
            snaps.create_session(&format!("s{s}"), false).unwrap();
        }
        let t = Instant::now();
        for queue in offsets.chunks(QD) {
            let mut batch: Vec<IoRequest<'_>> = queue
                .iter()
                .map(|&offset| IoRequest::Write { buf: &buf, offset })
                .collect();
            source.submit(&mut batch).unwrap();
        }
        source.flush().unwrap();
        total += t.elapsed();
        for s in 0..sessions {
            snaps.delete_session(&format!("s{s}")).unwrap();
        }
    }
    total
}

fn writes(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let snaps = engine(dir.path(), "w");

    let mut group = c.benchmark_group("snapshot_first_write_64MiB");
    configure(&mut group);
    group.bench_function("baseline", |b| b.iter_custom(|n| first_write(&snaps, 0, n)));
    group.bench_function("cofw", |b| b.iter_custom(|n| first_write(&snaps, 1, n)));
    group.finish();

    let mut group = c.benchmark_group("snapshot_first_write_rand4k_qd32");
    configure(&mut group);
    group.throughput(Throughput::Bytes((SIZE / IO as u64) * RAND_IO as u64));
    group.bench_function("baseline", |b| {
        b.iter_custom(|n| random_first_write(&snaps, 0, n))
    });
    group.bench_function("cofw", |b| {
        b.iter_custom(|n| random_first_write(&snaps, 1, n))
    });
    group.finish();

    let mut group = c.benchmark_group("snapshot_rewrite_64MiB");
    configure(&mut group);
    let source = snaps.source();
    group.bench_function("baseline", |b| b.iter(|| write_pass(source.as_ref(), 5)));
    snaps.create_session("kept", false).unwrap();
    write_pass(source.as_ref(), 6);
    group.bench_function("after_cofw", |b| b.iter(|| write_pass(source.as_ref(), 7)));
    group.finish();
    snaps.delete_session("kept").unwrap();

    let mut group = c.benchmark_group("snapshot_sessions_first_write_64MiB");
    configure(&mut group);
    group.bench_function("baseline", |b| b.iter_custom(|n| first_write(&snaps, 1, n)));
    group.bench_function("8_sessions", |b| {
        b.iter_custom(|n| first_write(&snaps, 8, n))
    });
    group.bench_function("64_sessions", |b| {
        b.iter_custom(|n| first_write(&snaps, 64, n))
    });
    group.finish();
}

fn reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let snaps = engine(dir.path(), "r");
    snaps.create_session("s", false).unwrap();
    let source = snaps.source();
    write_pass(source.as_ref(), 2);
    let session = snaps.session("s").unwrap();
    let mut group = c.benchmark_group("snapshot_read_64MiB");
    configure(&mut group);
    group.bench_function("baseline", |b| b.iter(|| read_pass(source.as_ref())));
    group.bench_function("session", |b| b.iter(|| read_pass(session.as_ref())));
    group.finish();
}

fn clone_sync(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let snaps = engine(dir.path(), "c");
    let clone = file(&dir.path().join("clone.img"), SIZE);
    snaps.add_clone("c", clone).unwrap();
    snaps.run_sync("c").unwrap();
    let source = snaps.source();
    let chunks = SIZE / IO as u64;
    let mut group = c.benchmark_group("snapshot_clone_sync_64MiB");
    configure(&mut group);
    // A full copy: what a sync costs with every chunk logged.
    group.bench_function("baseline", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                snaps.remove_clone("c").unwrap();
                snaps
                    .add_clone("c", file(&dir.path().join("clone.img"), SIZE))
                    .unwrap();
                let t = Instant::now();
                snaps.run_sync("c").unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    group.bench_function("after_1pct_changed", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                source.flush().unwrap();
                snaps.fracture("c").unwrap();
                for chunk in (0..chunks).step_by(100) {
                    source
                        .write_at(&vec![i as u8; IO], chunk * IO as u64)
                        .unwrap();
                }
                let t = Instant::now();
                snaps.sync("c").unwrap();
                snaps.run_sync("c").unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    group.finish();
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
        &(SIZE / IO as u64).to_string(),
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

criterion_group!(benches, writes, reads, clone_sync, qcow2_peer, rollback);
criterion_main!(benches);
