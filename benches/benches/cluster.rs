//! The cluster layer, against the simplest work it could be compared to, in the same run.
//!
//! - `cluster_lock_acquire_release`: one uncontended lock acquire + release of an inode's
//!   lock record, by a host joined to the datastore: `compare-and-write` (ATS-style: read,
//!   then compare-and-write, twice) and `disk-paxos` (plain reads and writes under a Disk
//!   Paxos lease). Baseline: one sector read + one sector write at the same offset. The I/O
//!   count of each variant is printed.
//! - `cluster_metadata_ops`: 1,440 metadata operations (create with 100 bytes, rename,
//!   unlink; 480 files) split evenly over 1 (`baseline`), 2 and 4 host processes, each in
//!   its own directory of one datastore file: above 1.0 the cluster scales.
//! - `cluster_dead_host_break`: time from kill -9 of a host holding a file open exclusively
//!   until a waiting host has broken its lock (after replaying its journal). Baseline: the
//!   configured dead-host timeout itself (slept); the ratio printed by `make bench` is
//!   timeout / time-to-break, so the goal (break within 1.2 x the timeout) is >= 0.83.
//!
//! Host processes are this benchmark binary started again with a role in the environment.
//! Datastores live on tmpfs (/dev/shm) when there is one.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use lun::{CompareAndWrite, IoRequest, Lun};
use vmfs::cluster::{Identity, LockTarget, Node};
use vmfs::{Access, Datastore, FormatOptions, LockMode, LockProtocol, NewFile, OpenOptions};

const ROLE: &str = "VAPP_BENCH_CLUSTER_ROLE";
const FILES: usize = 480;
const KILL_IO_TIMEOUT: Duration = Duration::from_millis(100);

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, secs: u64) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(secs));
}

/// On tmpfs when there is one: the figures are about the cluster protocol and its scaling,
/// not about the flush latency of the disk under /tmp.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn format(path: &Path, protocol: LockProtocol, io_timeout: Duration) {
    let _ = std::fs::remove_file(path);
    let lun = lun::open(
        path.to_str().unwrap(),
        &lun::OpenOptions {
            create_size: Some(2 << 30),
            ..Default::default()
        },
    )
    .unwrap();
    vmfs::format(
        lun,
        &FormatOptions {
            label: "bench".into(),
            block_size: 64 << 10,
            lock_protocol: Some(protocol),
            io_timeout: Some(io_timeout),
            ..Default::default()
        },
    )
    .unwrap();
}

fn file_lun(path: &Path) -> Arc<dyn Lun> {
    lun::open(path.to_str().unwrap(), &lun::OpenOptions::default()).unwrap()
}

/// Counts the requests a LUN sees.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn Lun>,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl Lun for Counting {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        self.inner.flush()
    }
    fn supports_compare_and_write(&self) -> bool {
        self.inner.supports_compare_and_write()
    }
    fn compare_and_write_scope(&self) -> lun::CasScope {
        self.inner.compare_and_write_scope()
    }
    fn reach(&self) -> lun::Reach {
        self.inner.reach()
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> lun::Result<CompareAndWrite> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.compare_and_write(expected, new, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_zeroes(offset, len)
    }
    fn submit(&self, batch: &mut [IoRequest<'_>]) -> lun::Result<()> {
        for r in batch.iter() {
            match r {
                IoRequest::Read { .. } => self.reads.fetch_add(1, Ordering::SeqCst),
                IoRequest::Write { .. } => self.writes.fetch_add(1, Ordering::SeqCst),
            };
        }
        self.inner.submit(batch)
    }
}

fn lock_group(c: &mut Criterion) {
    let dir = scratch();
    let mut group = c.benchmark_group("cluster_lock_acquire_release");
    configure(&mut group, 3);
    group.throughput(Throughput::Elements(1));
    let target = LockTarget::Inode(5);

    let path = dir.path().join("cas.vmfs");
    format(&path, LockProtocol::CompareAndWrite, Duration::from_secs(2));
    let raw = file_lun(&path);
    let sb = vmfs::read_superblock(&*raw).unwrap().0;
    let off = target.offset(&sb);
    let mut sector = vec![0u8; 512];
    group.bench_function("baseline", |b| {
        b.iter(|| {
            raw.read_at(&mut sector, off).unwrap();
            raw.write_at(&sector, off).unwrap();
        })
    });

    for (id, protocol) in [
        ("compare-and-write", LockProtocol::CompareAndWrite),
        ("disk-paxos", LockProtocol::DiskPaxos),
    ] {
        let path = dir.path().join(format!("{id}.vmfs"));
        format(&path, protocol, Duration::from_secs(2));
        let counting = Arc::new(Counting {
            inner: file_lun(&path),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        });
        let node = Node::join(
            counting.clone(),
            &Identity {
                name: "bench".into(),
                uuid: uuid::Uuid::new_v4(),
            },
        )
        .unwrap();
        let (r0, w0) = (
            counting.reads.load(Ordering::SeqCst),
            counting.writes.load(Ordering::SeqCst),
        );
        node.try_lock(target, LockMode::Exclusive).unwrap();
        node.unlock(target).unwrap();
        eprintln!(
            "cluster_lock_acquire_release/{id}: {} reads + {} writes per acquire+release (baseline: 1 + 1)",
            counting.reads.load(Ordering::SeqCst) - r0,
            counting.writes.load(Ordering::SeqCst) - w0
        );
        group.bench_function(id, |b| {
            b.iter(|| {
                node.try_lock(target, LockMode::Exclusive).unwrap();
                node.unlock(target).unwrap();
            })
        });
        node.leave().unwrap();
    }
    group.finish();
}

/// A host process: mounts, waits for "go", runs its share of the metadata operations in its
/// own directory, reports, unmounts.
fn metadata_host() {
    let lun = file_lun(Path::new(&std::env::var("LUN").unwrap()));
    let ds = Datastore::open(lun, &OpenOptions::default()).unwrap();
    let dir = std::env::var("DIR").unwrap();
    let files: usize = std::env::var("FILES").unwrap().parse().unwrap();
    println!("ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    for i in 0..files {
        let a = ds
            .create_path(&format!("{dir}/f{i}"), &NewFile::default())
            .unwrap();
        ds.write(a.ino, 0, &[7u8; 100]).unwrap();
        ds.rename_path(&format!("{dir}/f{i}"), &format!("{dir}/g{i}"))
            .unwrap();
    }
    for i in 0..files {
        ds.remove_path(&format!("{dir}/g{i}"), false).unwrap();
    }
    ds.sync().unwrap();
    println!("done");
    ds.close().unwrap();
}

fn spawn_role(
    role: &str,
    vars: &[(&str, String)],
) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(ROLE, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

fn expect(out: &mut BufReader<std::process::ChildStdout>, word: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "host exited before {word:?}"
        );
        if line.trim() == word {
            return;
        }
    }
}

fn metadata_group(c: &mut Criterion) {
    let dir = scratch();
    let path = dir.path().join("meta.vmfs");
    let mut group = c.benchmark_group("cluster_metadata_ops");
    configure(&mut group, 10);
    group.throughput(Throughput::Elements(3 * FILES as u64));
    for (id, hosts) in [("baseline", 1usize), ("2-hosts", 2), ("4-hosts", 4)] {
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    format(&path, LockProtocol::CompareAndWrite, Duration::from_secs(2));
                    let lun = file_lun(&path);
                    let ds = Datastore::open(lun, &OpenOptions::default()).unwrap();
                    for h in 0..hosts {
                        ds.mkdir_path(&format!("/h{h}"), 0o755, vmfs::Creds::default())
                            .unwrap();
                    }
                    ds.close().unwrap();
                    let mut procs: Vec<_> = (0..hosts)
                        .map(|h| {
                            spawn_role(
                                "metadata",
                                &[
                                    ("LUN", path.to_str().unwrap().to_string()),
                                    ("DIR", format!("/h{h}")),
                                    ("FILES", (FILES / hosts).to_string()),
                                    ("VAPP_HOST_NAME", format!("bench-{h}")),
                                    ("VAPP_HOST_UUID", uuid::Uuid::new_v4().to_string()),
                                ],
                            )
                        })
                        .collect();
                    for (_, out) in &mut procs {
                        expect(out, "ready");
                    }
                    let start = Instant::now();
                    for (child, _) in &mut procs {
                        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
                    }
                    for (_, out) in &mut procs {
                        expect(out, "done");
                    }
                    total += start.elapsed();
                    for (mut child, _) in procs {
                        assert!(child.wait().unwrap().success());
                    }
                }
                total
            })
        });
    }
    group.finish();
}

/// Holds /victim exclusively until killed.
fn holder() {
    let ds = Datastore::open(
        file_lun(Path::new(&std::env::var("LUN").unwrap())),
        &OpenOptions::default(),
    )
    .unwrap();
    let _h = ds.open_path("/victim", Access::Exclusive).unwrap();
    println!("holding");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Waits for /victim; prints "taken" the moment it has it.
fn waiter() {
    let ds = Datastore::open(
        file_lun(Path::new(&std::env::var("LUN").unwrap())),
        &OpenOptions::default(),
    )
    .unwrap();
    println!("ready");
    loop {
        match ds.open_path("/victim", Access::Exclusive) {
            Ok(_) => break,
            Err(vmfs::Error::Busy { .. }) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("{e}"),
        }
    }
    println!("taken");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn kill_group(c: &mut Criterion) {
    let dir = scratch();
    let path: PathBuf = dir.path().join("kill.vmfs");
    let dead_after = vmfs::Timing::new(KILL_IO_TIMEOUT).dead_after();
    let mut group = c.benchmark_group("cluster_dead_host_break");
    configure(&mut group, 12);
    group.bench_function("baseline", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                std::thread::sleep(dead_after);
            }
            start.elapsed()
        })
    });
    let mut ratios = Vec::new();
    group.bench_function("kill-9", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                format(&path, LockProtocol::CompareAndWrite, KILL_IO_TIMEOUT);
                let ds = Datastore::open(file_lun(&path), &OpenOptions::default()).unwrap();
                ds.create_path("/victim", &NewFile::default()).unwrap();
                ds.close().unwrap();
                let lun = ("LUN", path.to_str().unwrap().to_string());
                let (mut held, mut held_out) = spawn_role(
                    "holder",
                    &[lun.clone(), ("VAPP_HOST_NAME", format!("doomed-{i}"))],
                );
                expect(&mut held_out, "holding");
                let (mut waiting, mut waiting_out) =
                    spawn_role("waiter", &[lun, ("VAPP_HOST_NAME", format!("waiter-{i}"))]);
                expect(&mut waiting_out, "ready");
                // Let the waiter see the holder renew before it dies.
                std::thread::sleep(KILL_IO_TIMEOUT * 3);
                held.kill().unwrap();
                let killed = Instant::now();
                let _ = held.wait();
                expect(&mut waiting_out, "taken");
                let took = killed.elapsed();
                ratios.push(took.as_secs_f64() / dead_after.as_secs_f64());
                total += took;
                drop(waiting.stdin.take());
                let _ = waiting.wait();
            }
            total
        })
    });
    group.finish();
    if !ratios.is_empty() {
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        let max = ratios.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "cluster_dead_host_break: kill -9 to lock broken = {mean:.2} x the dead-host timeout ({dead_after:?}) on average, {max:.2} x at worst, over {} kills (goal <= 1.2)",
            ratios.len()
        );
    }
}

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("metadata") => return metadata_host(),
        Ok("holder") => return holder(),
        Ok("waiter") => return waiter(),
        _ => {}
    }
    let mut c = Criterion::default().configure_from_args();
    lock_group(&mut c);
    metadata_group(&mut c);
    kill_group(&mut c);
    c.final_summary();
}
