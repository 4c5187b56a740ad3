//! The `nbd://` LUN against two servers on the same file in the same run: `vapp_export`
//! (our server, in this process, over TCP loopback) and `qemu_nbd` (qemu-nbd over TCP
//! loopback, cache=writeback like ours). `baseline` is a FileLun on the file itself, so each
//! ratio is the cost of going through NBD. The client is the same for both servers, with
//! default options (structured replies, up to 4 connections when multi-conn is offered).
//!
//! Sequential: 64 MiB in 1 MiB requests, 8 per submit. Random: 4 KiB requests at queue
//! depth 32 (one submit of 32), and reads at queue depth 1 for latency. Writes end with a
//! flush. The file stays in the page cache, so this measures the protocol path, not a disk.
//!
//! The `nbd_vdisk_*` groups serve a virtual disk of a datastore the way `vapp -d DS export
//! PATH` does (`vapp_export_vdisk`: the disk opened exclusively through vmfs, our server in
//! this process) against `baseline`, qemu-nbd serving the same bytes as a raw file: the
//! whole cost of the datastore plus our server, against the common way of exporting an
//! image. The disk is thin and fully written beforehand, so writes overwrite allocated
//! blocks; each write pass ends with a flush, which commits the datastore's journal.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use lun::nbd::{ExportConfig, ListenAddr, ShutdownHandle};
use lun::{FileLun, IoRequest, Lun, NbdLun, NbdOptions, NbdServer, NbdTarget};
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use vmfs::{Access, Creds, Datastore, FormatOptions};

const MIB: usize = 1 << 20;
const FILE_SIZE: usize = 64 * MIB;
const CHUNK: usize = MIB;
const SEQ_BATCH: usize = 8;
const RANDOM_OPS: usize = 4096;
const RANDOM_SIZE: usize = 4096;
const QUEUE_DEPTH: usize = 32;
const QD1_OPS: usize = 1024;

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
}

/// The LUNs under test, by criterion function id, all on one file.
struct Setup {
    luns: Vec<(&'static str, Arc<dyn Lun>)>,
    _vapp: ServerThread,
    _qemu: Option<QemuNbd>,
    /// Closed after the server that serves its disk has stopped.
    _datastore: Option<Datastore>,
    _dir: tempfile::TempDir,
}

struct ServerThread {
    shutdown: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.raw");
    let mut data = vec![0u8; FILE_SIZE];
    StdRng::seed_from_u64(1).fill_bytes(&mut data);
    std::fs::write(&path, &data).unwrap();
    let file: Arc<dyn Lun> = Arc::new(FileLun::open(&path, false).unwrap());

    let (vapp, client) = serve(Arc::clone(&file));
    let mut luns: Vec<(&'static str, Arc<dyn Lun>)> =
        vec![("baseline", Arc::clone(&file)), ("vapp_export", client)];
    let qemu = start_qemu_nbd(&path);
    match &qemu {
        Some((_, client)) => luns.push(("qemu_nbd", Arc::clone(client))),
        None => eprintln!("qemu-nbd not found: measuring without the qemu_nbd variant"),
    }
    Setup {
        luns,
        _vapp: vapp,
        _qemu: qemu.map(|(child, _)| child),
        _dir: dir,
        _datastore: None,
    }
}

/// Our server on `lun` in a thread, and our client connected to it.
fn serve(lun: Arc<dyn Lun>) -> (ServerThread, Arc<dyn Lun>) {
    let server = NbdServer::bind(
        lun,
        ExportConfig {
            name: "bench".into(),
            ..Default::default()
        },
        &ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
    )
    .unwrap();
    let target = server.target();
    let thread = ServerThread {
        shutdown: server.shutdown_handle(),
        thread: Some(std::thread::spawn(move || server.serve().unwrap())),
    };
    let client = NbdLun::connect(target, "bench", NbdOptions::default()).unwrap();
    (thread, Arc::new(client))
}

/// A thin virtual disk holding `data`, on a datastore in a file in `dir`, served as
/// `vapp -d DS export` serves it; and qemu-nbd serving `data` from a raw file.
fn setup_vdisk(dir: tempfile::TempDir, data: &[u8]) -> Option<Setup> {
    let raw = dir.path().join("bench.raw");
    std::fs::write(&raw, data).unwrap();
    let Some((qemu, qemu_client)) = start_qemu_nbd(&raw) else {
        eprintln!("qemu-nbd not found: skipping the nbd_vdisk groups");
        return None;
    };
    let lun = lun::open(
        dir.path().join("ds.vmfs").to_str().unwrap(),
        &lun::OpenOptions {
            create_size: Some(4 * FILE_SIZE as u64),
            ..Default::default()
        },
    )
    .unwrap();
    let options = FormatOptions {
        label: "bench".into(),
        ..Default::default()
    };
    vmfs::format(Arc::clone(&lun), &options).unwrap();
    let ds = Datastore::open(lun, &vmfs::OpenOptions::read_write()).unwrap();
    ds.mkdir_all("/vms/bench", 0o755, Creds::current()).unwrap();
    let path = "/vms/bench/disk.vdisk";
    ds.create_vdisk(path, FILE_SIZE as u64, false, Creds::current())
        .unwrap();
    let disk = ds.open_lun(path, Access::Exclusive).unwrap();
    disk.write_at(data, 0).unwrap();
    disk.flush().unwrap();
    let (vapp, vapp_client) = serve(disk);
    Some(Setup {
        luns: vec![
            ("baseline", qemu_client),
            ("vapp_export_vdisk", vapp_client),
        ],
        _vapp: vapp,
        _qemu: Some(qemu),
        _dir: dir,
        _datastore: Some(ds),
    })
}

/// qemu-nbd on `path` (writeback cache, like our server), and our client connected to it.
fn start_qemu_nbd(path: &Path) -> Option<(QemuNbd, Arc<dyn Lun>)> {
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "--persistent",
            "--shared=16",
            "-x",
            "bench",
            "-b",
            "127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    let child = QemuNbd(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "qemu-nbd did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let target = NbdTarget::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let client = NbdLun::connect(target, "bench", NbdOptions::default()).unwrap();
    Some((child, Arc::new(client)))
}

fn sequential(c: &mut Criterion) {
    let setup = setup();
    sequential_groups(c, "nbd", &setup);
}

fn sequential_groups(c: &mut Criterion, prefix: &str, setup: &Setup) {
    let mut buf = vec![0u8; SEQ_BATCH * CHUNK];
    StdRng::seed_from_u64(2).fill_bytes(&mut buf);

    let mut group = c.benchmark_group(format!("{prefix}_seq_write_64MiB"));
    configure(&mut group);
    group.throughput(Throughput::Bytes(FILE_SIZE as u64));
    for (id, lun) in &setup.luns {
        group.bench_function(*id, |b| {
            b.iter(|| {
                for base in (0..FILE_SIZE).step_by(SEQ_BATCH * CHUNK) {
                    let mut batch: Vec<IoRequest<'_>> = buf
                        .chunks(CHUNK)
                        .enumerate()
                        .map(|(i, buf)| IoRequest::Write {
                            buf,
                            offset: (base + i * CHUNK) as u64,
                        })
                        .collect();
                    lun.submit(&mut batch).unwrap();
                }
                lun.flush().unwrap();
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group(format!("{prefix}_seq_read_64MiB"));
    configure(&mut group);
    group.throughput(Throughput::Bytes(FILE_SIZE as u64));
    for (id, lun) in &setup.luns {
        group.bench_function(*id, |b| {
            b.iter(|| {
                for base in (0..FILE_SIZE).step_by(SEQ_BATCH * CHUNK) {
                    let mut batch: Vec<IoRequest<'_>> = buf
                        .chunks_mut(CHUNK)
                        .enumerate()
                        .map(|(i, buf)| IoRequest::Read {
                            buf,
                            offset: (base + i * CHUNK) as u64,
                        })
                        .collect();
                    lun.submit(&mut batch).unwrap();
                }
            })
        });
    }
    group.finish();
}

fn random_offsets(seed: u64, n: usize) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let slots = (FILE_SIZE / RANDOM_SIZE) as u64;
    (0..n)
        .map(|_| rng.random_range(0..slots) * RANDOM_SIZE as u64)
        .collect()
}

fn random(c: &mut Criterion) {
    let setup = setup();
    random_groups(c, "nbd", &setup);

    let offsets = random_offsets(4, QD1_OPS);
    let mut buffer = vec![0u8; RANDOM_SIZE];
    let mut group = c.benchmark_group("nbd_rand_read_4KiB_qd1");
    configure(&mut group);
    group.throughput(Throughput::Bytes((QD1_OPS * RANDOM_SIZE) as u64));
    for (id, lun) in &setup.luns {
        group.bench_function(*id, |b| {
            b.iter(|| {
                for &offset in &offsets {
                    lun.read_at(&mut buffer, offset).unwrap();
                }
            })
        });
    }
    group.finish();
}

fn random_groups(c: &mut Criterion, prefix: &str, setup: &Setup) {
    let offsets = random_offsets(3, RANDOM_OPS);
    let mut buffers = vec![vec![0u8; RANDOM_SIZE]; QUEUE_DEPTH];

    let mut group = c.benchmark_group(format!("{prefix}_rand_read_4KiB_qd32"));
    configure(&mut group);
    group.throughput(Throughput::Bytes((RANDOM_OPS * RANDOM_SIZE) as u64));
    for (id, lun) in &setup.luns {
        group.bench_function(*id, |b| {
            b.iter(|| {
                for chunk in offsets.chunks(QUEUE_DEPTH) {
                    let mut batch: Vec<IoRequest<'_>> = buffers
                        .iter_mut()
                        .zip(chunk)
                        .map(|(buf, &offset)| IoRequest::Read { buf, offset })
                        .collect();
                    lun.submit(&mut batch).unwrap();
                }
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group(format!("{prefix}_rand_write_4KiB_qd32"));
    configure(&mut group);
    group.throughput(Throughput::Bytes((RANDOM_OPS * RANDOM_SIZE) as u64));
    for (id, lun) in &setup.luns {
        group.bench_function(*id, |b| {
            b.iter(|| {
                for chunk in offsets.chunks(QUEUE_DEPTH) {
                    let mut batch: Vec<IoRequest<'_>> = buffers
                        .iter()
                        .zip(chunk)
                        .map(|(buf, &offset)| IoRequest::Write { buf, offset })
                        .collect();
                    lun.submit(&mut batch).unwrap();
                }
                lun.flush().unwrap();
            })
        });
    }
    group.finish();
}

fn vdisk(c: &mut Criterion) {
    let mut data = vec![0u8; FILE_SIZE];
    StdRng::seed_from_u64(5).fill_bytes(&mut data);
    let Some(setup) = setup_vdisk(tempfile::tempdir().unwrap(), &data) else {
        return;
    };
    sequential_groups(c, "nbd_vdisk", &setup);
    random_groups(c, "nbd_vdisk", &setup);
}

criterion_group!(benches, sequential, random, vdisk);
criterion_main!(benches);
