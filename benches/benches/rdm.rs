//! Raw device mappings against the device itself: sequential 1 MiB writes and reads of
//! 256 MiB, and 4 KiB random reads and writes at queue depth 32, on a loop device. `baseline`
//! is the loop device opened directly (block devices are always O_DIRECT); `physical` and
//! `virtual` reach the same device through a mapping file on a datastore (one datastore per
//! mode: a LUN is mapped once per datastore), in the same run. `virtual` is wrapped as a VM's
//! writable disk is (a `SwitchLun`, under which a snapshot engine can be put while it runs).
//! Buffers are page-aligned, so no variant pays for a bounce copy.
//!
//! Needs root and losetup; skipped (with a line saying so) without them.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use lun::{AlignedBuf, IoRequest, Lun, SwitchLun};
use rand::{Rng, SeedableRng, rngs::StdRng};

const MIB: usize = 1 << 20;
const DEVICE_SIZE: usize = 256 * MIB;
/// Sequential I/O unit, and how many of them one submit batch carries.
const CHUNK: usize = MIB;
const BATCH: usize = 32;
const RANDOM_IOS: usize = 4096;
const RANDOM_SIZE: usize = 4096;
const QUEUE_DEPTH: usize = 32;

/// A loop device, detached however the bench ends.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
}

fn write_all(lun: &dyn Lun, source: &[u8]) {
    vapp_benches::write_whole(lun, source, DEVICE_SIZE, CHUNK);
}

fn read_all(lun: &dyn Lun, target: &mut [u8]) {
    vapp_benches::read_whole(lun, target, DEVICE_SIZE, CHUNK);
}

/// RANDOM_IOS requests of RANDOM_SIZE at `offsets`, QUEUE_DEPTH per submit; writes end with
/// a flush.
fn random(lun: &dyn Lun, offsets: &[u64], buffers: &mut [AlignedBuf], write: bool) {
    for window in offsets.chunks(QUEUE_DEPTH) {
        let mut batch: Vec<IoRequest<'_>> = buffers
            .iter_mut()
            .zip(window)
            .map(|(buf, &offset)| {
                if write {
                    IoRequest::Write { buf, offset }
                } else {
                    IoRequest::Read { buf, offset }
                }
            })
            .collect();
        lun.submit(&mut batch).unwrap();
    }
    if write {
        lun.flush().unwrap();
    }
}

/// The device and every way of reaching it, by criterion function id.
struct Setup {
    targets: Vec<(&'static str, Arc<dyn Lun>)>,
    // Dropped after the targets: the mappings' locks go before their datastores close.
    _datastores: Vec<vmfs::Datastore>,
    _device: Loop,
    _dir: tempfile::TempDir,
}

/// A datastore in a file of `dir`, holding a mapping of `device` in `mode` at `/db.rdm`,
/// and the mapping opened as a VM opens its disk.
fn mapped(dir: &Path, device: &str, mode: rdm::Mode) -> (vmfs::Datastore, Arc<rdm::RdmLun>) {
    let path = dir.join(format!("{mode}.vmfs"));
    let lun = lun::open(
        &path.to_string_lossy(),
        &lun::OpenOptions {
            create_size: Some(256 * MIB as u64),
            ..lun::OpenOptions::default()
        },
    )
    .unwrap();
    vmfs::format(
        lun.clone(),
        &vmfs::FormatOptions {
            label: "bench".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let ds = vmfs::Datastore::open(lun, &vmfs::OpenOptions::read_write()).unwrap();
    rdm::create(&ds, "/db.rdm", device, mode).unwrap();
    let rdm = Arc::new(rdm::open(&ds, "/db.rdm", vmfs::Access::Exclusive).unwrap());
    (ds, rdm)
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("device.img");
    // Written in full, so reads come from allocated blocks, not holes.
    let data: Vec<u8> = (0..DEVICE_SIZE)
        .map(|i| (i / 4096) as u8 ^ i as u8)
        .collect();
    std::fs::write(&backing, &data).unwrap();
    let device = Loop::attach(&backing);
    let direct = lun::open(&device.dev, &lun::OpenOptions::default()).unwrap();
    let (physical_ds, physical) = mapped(dir.path(), &device.dev, rdm::Mode::Physical);
    let (virtual_ds, virtual_rdm) = mapped(dir.path(), &device.dev, rdm::Mode::Virtual);
    let virtual_disk: Arc<dyn Lun> = Arc::new(SwitchLun::new(virtual_rdm));
    Setup {
        targets: vec![
            ("baseline", direct),
            ("physical", physical),
            ("virtual", virtual_disk),
        ],
        _datastores: vec![physical_ds, virtual_ds],
        _device: device,
        _dir: dir,
    }
}

fn sequential(c: &mut Criterion, setup: &Setup) {
    let mut source = AlignedBuf::new(BATCH * CHUNK);
    for (i, byte) in source.iter_mut().enumerate() {
        *byte = (i * 7 + i / 4096) as u8;
    }
    let mut group = c.benchmark_group("rdm_seq_write_256MiB");
    configure(&mut group);
    group.throughput(Throughput::Bytes(DEVICE_SIZE as u64));
    for (id, lun) in &setup.targets {
        group.bench_function(*id, |b| b.iter(|| write_all(lun.as_ref(), &source)));
    }
    group.finish();

    let mut target = AlignedBuf::new(BATCH * CHUNK);
    let mut group = c.benchmark_group("rdm_seq_read_256MiB");
    configure(&mut group);
    group.throughput(Throughput::Bytes(DEVICE_SIZE as u64));
    for (id, lun) in &setup.targets {
        group.bench_function(*id, |b| b.iter(|| read_all(lun.as_ref(), &mut target)));
        assert!(
            target[..CHUNK] == source[..CHUNK],
            "{id}: sequential reads returned what was written"
        );
    }
    group.finish();
}

fn random_io(c: &mut Criterion, setup: &Setup) {
    let mut rng = StdRng::seed_from_u64(42);
    let offsets: Vec<u64> = (0..RANDOM_IOS)
        .map(|_| (rng.random_range(0..DEVICE_SIZE / RANDOM_SIZE) * RANDOM_SIZE) as u64)
        .collect();
    let mut buffers: Vec<AlignedBuf> = (0..QUEUE_DEPTH)
        .map(|_| AlignedBuf::new(RANDOM_SIZE))
        .collect();
    for (write, name) in [
        (false, "rdm_rand_read_4KiB_qd32"),
        (true, "rdm_rand_write_4KiB_qd32"),
    ] {
        let mut group = c.benchmark_group(name);
        configure(&mut group);
        group.throughput(Throughput::Bytes((RANDOM_IOS * RANDOM_SIZE) as u64));
        for (id, lun) in &setup.targets {
            group.bench_function(*id, |b| {
                b.iter(|| random(lun.as_ref(), &offsets, &mut buffers, write))
            });
        }
        group.finish();
    }
}

fn main() {
    if !(lun::prereq::is_root()
        && lun::prereq::have_command("losetup")
        && Path::new("/dev/loop-control").exists())
    {
        eprintln!("rdm bench: skipped, needs root and losetup for a loop device");
        return;
    }
    let setup = setup();
    let mut c = Criterion::default().configure_from_args();
    sequential(&mut c, &setup);
    random_io(&mut c, &setup);
    c.final_summary();
}
