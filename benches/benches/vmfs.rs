//! The vmfs datastore against the same work without it, in the same run.
//!
//! - `vmfs_seq_write_1g` / `vmfs_seq_read_1g`: 1 GiB in 1 MiB requests through a thin virtual
//!   disk opened as a LUN (`vmfs`), vs the same requests on a raw LUN file (`baseline`).
//!   Writes go to fresh storage each iteration (the raw file truncated to 0 and re-extended /
//!   a new thin disk) and end with a flush, so both measure durable first-write throughput.
//! - `vmfs_rand_read_4k`: 4 KiB reads at the same random offsets of that 1 GiB.
//! - `vmfs_create_10k`: 10,000 files of 1 KiB in one directory, then a sync; the baseline
//!   creates the same files in a directory of the host file system and fsyncs it.
//! - `vmfs_fsck_10k`: a full fsck of a datastore holding those 10,000 files; there is no raw
//!   equivalent, so the baseline walks the same tree on the host file system and stats every
//!   file (what `find -ls` does).
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use lun::Lun;
use rand::{Rng, SeedableRng, rngs::StdRng};
use vmfs::{Access, Creds, Datastore, FormatOptions, NewFile, OpenOptions};

const MIB: u64 = 1 << 20;
const DISK: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;
const RANDOM_READS: usize = 20_000;
const FILES: usize = 10_000;

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, secs: u64) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(secs));
}

fn file_lun(path: &Path, create: Option<u64>) -> Arc<dyn Lun> {
    lun::open(
        path.to_str().unwrap(),
        &lun::OpenOptions {
            create_size: create,
            ..Default::default()
        },
    )
    .unwrap()
}

fn new_datastore(dir: &Path, name: &str, size: u64) -> (std::path::PathBuf, Datastore) {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let lun = file_lun(&path, Some(size));
    vmfs::format(
        lun.clone(),
        &FormatOptions {
            label: "bench".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let ds = Datastore::open(lun, &OpenOptions::read_write()).unwrap();
    (path, ds)
}

fn write_disk(lun: &dyn Lun, data: &[u8]) {
    let mut off = 0;
    while off < DISK {
        lun.write_at(data, off).unwrap();
        off += data.len() as u64;
    }
    lun.flush().unwrap();
}

fn read_disk(lun: &dyn Lun, buf: &mut [u8]) {
    let mut off = 0;
    while off < DISK {
        lun.read_at(buf, off).unwrap();
        off += buf.len() as u64;
    }
}

fn sequential(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 7 + 3) as u8).collect();

    let mut group = c.benchmark_group("vmfs_seq_write_1g");
    configure(&mut group, 8);
    group.throughput(Throughput::Bytes(DISK));
    group.bench_function("baseline", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let path = dir.path().join("raw.img");
            if !path.exists() {
                file_lun(&path, Some(DISK));
            }
            for _ in 0..iters {
                // Deallocate, like the thin disk that is recreated for each vmfs iteration.
                let f = std::fs::File::options().write(true).open(&path).unwrap();
                f.set_len(0).unwrap();
                f.set_len(DISK).unwrap();
                drop(f);
                let lun = file_lun(&path, None);
                let t = Instant::now();
                write_disk(&*lun, &data);
                total += t.elapsed();
            }
            total
        })
    });
    let (_, ds) = new_datastore(dir.path(), "ds-write.vmfs", DISK + 512 * MIB);
    group.bench_function("vmfs", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = ds.remove_path("/disk.vdisk", false);
                ds.create_vdisk("/disk.vdisk", DISK, false, Creds::default())
                    .unwrap();
                let lun = ds.open_lun("/disk.vdisk", Access::Exclusive).unwrap();
                let t = Instant::now();
                write_disk(&*lun, &data);
                total += t.elapsed();
            }
            total
        })
    });
    group.finish();

    // Reads (and random reads) of the disk just written, from the page cache on both sides.
    // A run filtered to the read groups writes both first.
    let raw_path = dir.path().join("raw.img");
    if !raw_path.exists() {
        write_disk(&*file_lun(&raw_path, Some(DISK)), &data);
    }
    if ds.stat_path("/disk.vdisk").is_err() {
        ds.create_vdisk("/disk.vdisk", DISK, false, Creds::default())
            .unwrap();
        write_disk(
            &*ds.open_lun("/disk.vdisk", Access::Exclusive).unwrap(),
            &data,
        );
    }
    let raw = file_lun(&raw_path, None);
    let disk = ds.open_lun("/disk.vdisk", Access::ReadOnly).unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut group = c.benchmark_group("vmfs_seq_read_1g");
    configure(&mut group, 5);
    group.throughput(Throughput::Bytes(DISK));
    group.bench_function("baseline", |b| b.iter(|| read_disk(&*raw, &mut buf)));
    group.bench_function("vmfs", |b| b.iter(|| read_disk(&*disk, &mut buf)));
    group.finish();

    let mut rng = StdRng::seed_from_u64(42);
    let offsets: Vec<u64> = (0..RANDOM_READS)
        .map(|_| rng.random_range(0..DISK / 4096) * 4096)
        .collect();
    let mut small = vec![0u8; 4096];
    let mut group = c.benchmark_group("vmfs_rand_read_4k");
    configure(&mut group, 4);
    group.throughput(Throughput::Bytes((RANDOM_READS * 4096) as u64));
    group.bench_function("baseline", |b| {
        b.iter(|| {
            for &o in &offsets {
                raw.read_at(&mut small, o).unwrap();
            }
        })
    });
    group.bench_function("vmfs", |b| {
        b.iter(|| {
            for &o in &offsets {
                disk.read_at(&mut small, o).unwrap();
            }
        })
    });
    group.finish();
    drop(disk);
    ds.close().unwrap();
}

fn create_files(ds: &Datastore, dir: u64, content: &[u8]) {
    for i in 0..FILES {
        let a = ds
            .create(
                dir,
                OsStr::new(&format!("file-{i:05}.txt")),
                &NewFile::default(),
            )
            .unwrap();
        ds.write(a.ino, 0, content).unwrap();
    }
    ds.sync().unwrap();
}

fn small_files(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let content = vec![b'x'; 1024];

    let mut group = c.benchmark_group("vmfs_create_10k");
    configure(&mut group, 10);
    group.throughput(Throughput::Elements(FILES as u64));
    group.bench_function("baseline", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let host_dir = dir.path().join("host-files");
                let _ = std::fs::remove_dir_all(&host_dir);
                std::fs::create_dir(&host_dir).unwrap();
                let t = Instant::now();
                for i in 0..FILES {
                    std::fs::write(host_dir.join(format!("file-{i:05}.txt")), &content).unwrap();
                }
                std::fs::File::open(&host_dir).unwrap().sync_all().unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    group.bench_function("vmfs", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (_, ds) = new_datastore(dir.path(), "ds-files.vmfs", 8 << 30);
                let d = ds
                    .mkdir_path("/files", 0o755, Creds::default())
                    .unwrap()
                    .ino;
                let t = Instant::now();
                create_files(&ds, d, &content);
                total += t.elapsed();
                ds.close().unwrap();
            }
            total
        })
    });
    group.finish();

    // fsck of the datastore the last iteration left behind (10,000 files).
    let lun = file_lun(&dir.path().join("ds-files.vmfs"), None);
    let host_dir = dir.path().join("host-files");
    let mut group = c.benchmark_group("vmfs_fsck_10k");
    configure(&mut group, 6);
    group.throughput(Throughput::Elements(FILES as u64));
    group.bench_function("baseline", |b| {
        b.iter(|| {
            let mut n = 0;
            for e in std::fs::read_dir(&host_dir).unwrap() {
                let m = e.unwrap().metadata().unwrap();
                n += usize::from(m.len() > 0);
            }
            assert_eq!(n, FILES);
        })
    });
    group.bench_function("vmfs", |b| {
        b.iter(|| {
            let r = vmfs::fsck(lun.clone(), &vmfs::FsckOptions::default()).unwrap();
            assert!(r.clean && r.stats.files == FILES as u64);
        })
    });
    group.finish();
}

criterion_group!(benches, sequential, small_files);
criterion_main!(benches);
