//! LUN backends on a regular file: sequential 256 MiB write and read, and 4 KiB random reads
//! at queue depth 32. `baseline` is std::fs::File with a pread/pwrite loop on the same file;
//! the variants are FileLun with the sync engine, the io_uring engine, and O_DIRECT (through
//! bounce buffers from ordinary Vec memory, and with page-aligned memory).
//!
//! Writes end with a flush (fdatasync), so they measure durable throughput. Buffered reads
//! come from the page cache (the file was just written); O_DIRECT reads come from the disk.
//! The random-read group also runs O_DIRECT with the sync engine (queue depth 1).
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use lun::{AlignedBuf, FileLun, IoEngine, IoRequest, Lun, OpenOptions};
use rand::{Rng, SeedableRng, rngs::StdRng};

const MIB: usize = 1 << 20;
const FILE_SIZE: usize = 256 * MIB;
/// Sequential I/O unit, and how many of them one submit batch carries.
const CHUNK: usize = MIB;
const BATCH: usize = 32;
const RANDOM_READS: usize = 4096;
const RANDOM_SIZE: usize = 4096;
const QUEUE_DEPTH: usize = 32;

/// The FileLun variants, by criterion function id.
const VARIANTS: [(&str, IoEngine, bool); 3] = [
    ("file_sync", IoEngine::Sync, false),
    ("file_uring", IoEngine::Uring, false),
    ("file_direct", IoEngine::Uring, true),
];

fn open(path: &Path, engine: IoEngine, direct: bool) -> FileLun {
    FileLun::open_with(
        path,
        &OpenOptions {
            engine,
            direct,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
}

fn write_all(lun: &dyn Lun, source: &[u8]) {
    vapp_benches::write_whole(lun, source, FILE_SIZE, CHUNK);
}

fn read_all(lun: &dyn Lun, target: &mut [u8]) {
    vapp_benches::read_whole(lun, target, FILE_SIZE, CHUNK);
}

fn sequential(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun.img");
    File::create(&path)
        .unwrap()
        .set_len(FILE_SIZE as u64)
        .unwrap();
    let source: Vec<u8> = (0..BATCH * CHUNK)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let mut aligned_source = AlignedBuf::new(BATCH * CHUNK);
    aligned_source.copy_from_slice(&source);

    let mut group = c.benchmark_group("lun_seq_write_256MiB");
    configure(&mut group);
    group.throughput(Throughput::Bytes(FILE_SIZE as u64));
    group.bench_function("baseline", |b| {
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        b.iter(|| {
            for offset in (0..FILE_SIZE).step_by(CHUNK) {
                let i = offset % (BATCH * CHUNK);
                file.write_all_at(&source[i..i + CHUNK], offset as u64)
                    .unwrap();
            }
            file.sync_data().unwrap();
        });
    });
    for (id, engine, direct) in VARIANTS {
        let lun = open(&path, engine, direct);
        group.bench_function(id, |b| b.iter(|| write_all(&lun, &source)));
    }
    let lun = open(&path, IoEngine::Uring, true);
    group.bench_function("file_direct_aligned", |b| {
        b.iter(|| write_all(&lun, &aligned_source))
    });
    group.finish();

    let mut group = c.benchmark_group("lun_seq_read_256MiB");
    configure(&mut group);
    group.throughput(Throughput::Bytes(FILE_SIZE as u64));
    let mut target = vec![0u8; BATCH * CHUNK];
    group.bench_function("baseline", |b| {
        let file = File::open(&path).unwrap();
        b.iter(|| {
            for offset in (0..FILE_SIZE).step_by(CHUNK) {
                let i = offset % (BATCH * CHUNK);
                file.read_exact_at(&mut target[i..i + CHUNK], offset as u64)
                    .unwrap();
            }
        });
    });
    for (id, engine, direct) in VARIANTS {
        let lun = open(&path, engine, direct);
        group.bench_function(id, |b| b.iter(|| read_all(&lun, &mut target)));
    }
    let lun = open(&path, IoEngine::Uring, true);
    let mut aligned_target = AlignedBuf::new(BATCH * CHUNK);
    group.bench_function("file_direct_aligned", |b| {
        b.iter(|| read_all(&lun, &mut aligned_target))
    });
    group.finish();
    assert!(
        target[..CHUNK] == source[..CHUNK],
        "reads returned what was written"
    );
}

fn random_reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun.img");
    let data: Vec<u8> = (0..FILE_SIZE).map(|i| (i / 4096) as u8 ^ i as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let offsets: Vec<u64> = (0..RANDOM_READS)
        .map(|_| (rng.random_range(0..FILE_SIZE / RANDOM_SIZE) * RANDOM_SIZE) as u64)
        .collect();
    let mut buffers = vec![vec![0u8; RANDOM_SIZE]; QUEUE_DEPTH];

    let mut group = c.benchmark_group("lun_rand_read_4KiB_qd32");
    configure(&mut group);
    group.throughput(Throughput::Bytes((RANDOM_READS * RANDOM_SIZE) as u64));
    group.bench_function("baseline", |b| {
        let file = File::open(&path).unwrap();
        b.iter(|| {
            for (i, offset) in offsets.iter().enumerate() {
                file.read_exact_at(&mut buffers[i % QUEUE_DEPTH], *offset)
                    .unwrap();
            }
        });
    });
    let run = |lun: &FileLun, buffers: &mut Vec<Vec<u8>>| {
        for window in offsets.chunks(QUEUE_DEPTH) {
            let mut batch: Vec<IoRequest<'_>> = buffers
                .iter_mut()
                .zip(window)
                .map(|(buf, offset)| IoRequest::Read {
                    buf,
                    offset: *offset,
                })
                .collect();
            lun.submit(&mut batch).unwrap();
        }
    };
    // O_DIRECT through pread one request at a time: what io_uring's queue depth buys on
    // the device.
    let direct_sync = ("file_direct_sync", IoEngine::Sync, true);
    for (id, engine, direct) in VARIANTS.into_iter().chain([direct_sync]) {
        let lun = open(&path, engine, direct);
        group.bench_function(id, |b| b.iter(|| run(&lun, &mut buffers)));
    }
    let lun = open(&path, IoEngine::Uring, true);
    let mut aligned: Vec<AlignedBuf> = (0..QUEUE_DEPTH)
        .map(|_| AlignedBuf::new(RANDOM_SIZE))
        .collect();
    group.bench_function("file_direct_aligned", |b| {
        b.iter(|| {
            for window in offsets.chunks(QUEUE_DEPTH) {
                let mut batch: Vec<IoRequest<'_>> = aligned
                    .iter_mut()
                    .zip(window)
                    .map(|(buf, offset)| IoRequest::Read {
                        buf,
                        offset: *offset,
                    })
                    .collect();
                lun.submit(&mut batch).unwrap();
            }
        });
    });
    group.finish();
    let last = offsets[RANDOM_READS - 1] as usize;
    let slot = (RANDOM_READS - 1) % QUEUE_DEPTH;
    assert!(
        aligned[slot][..] == data[last..last + RANDOM_SIZE],
        "random reads returned the file's bytes"
    );
}

criterion_group!(benches, sequential, random_reads);
criterion_main!(benches);
