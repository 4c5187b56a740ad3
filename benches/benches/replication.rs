//! The replication engine over a real TCP link: the primary (a `PrimaryLun` with a
//! `TcpPeer`) in network namespace A, the secondary (`Secondary` behind a
//! `SecondaryServer`, with a snapshot pool as the daemon gives it) in namespace B, the two
//! joined by a veth pair. Needs root (skips with a printed reason otherwise); the
//! namespaces are removed at the end. Every LUN is a regular file in /dev/shm, so the
//! figures are the engine's and the link's cost, not the one disk both "sites" share here.
//! Default geometry (64 KiB regions, 16 activity-log extents of 4 MiB).
//!
//! - `repl_seq_write_1MiB_4writers`: 128 MiB of sequential 1 MiB writes then a flush, by
//!   4 writer threads each writing its own 32 MiB stripe (the queue depth of a real
//!   writer): `baseline` to the local LUN, `sync` through a synchronous primary, `async`
//!   through an asynchronous one whose delta-set cycle (period 1 s) runs meanwhile, measured
//!   for 6 s so that several cycles fall in it.
//! - `repl_write_4KiB_qd1`: one writer, 4 KiB writes at random offsets in 32 MiB, each
//!   acknowledged before the next: `baseline` local, `sync`; `link_floor` is a 4 KiB
//!   request and an 8-byte answer over the same link to a bare echo server in B, what
//!   the link costs without the engine.
//! - `repl_write_4KiB_qd1_1ms_rtt`: the same through a proxy in this file that delays each
//!   direction by 0.5 ms; `baseline` is the local write plus exactly 1 ms, `link_floor`
//!   the echo through the same proxy (what the proxy adds beyond its 1 ms shows there).
//! - `repl_resync_128MiB`: `baseline` is a full initial sync of a written 128 MiB LUN to a
//!   new replica; `after_1pct_changed` fractures, writes 1 % of the regions, and times
//!   resume + resync.
//! - `repl_crash_resync_256MiB`: a synchronous primary under 500 random 4 KiB writes
//!   over the whole LUN is dropped without `close` (a crash); timed: reopen, connect and
//!   resync. The largest `bytes_resynced` of the run is a figure (goal ≤ 64 MiB); the
//!   replica must then equal the primary byte for byte.
//! - `repl_initial_sync_thin_<N>GiB`: a thin LUN (1 GiB by default, `VAPP_BENCH_REPL_THIN_GIB`
//!   for the 10 GiB, then on disk instead of /dev/shm) with a tenth written, every
//!   tenth MiB: `baseline` copies it whole (1 MiB reads and writes, as cp without hole
//!   detection), `initial_sync` is connect + resync to a new replica.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use lun::{FileLun, Lun};
use nix::sched::{CloneFlags, setns};
use rand::{Rng, SeedableRng};
use replication::{
    Geometry, LinkPolicy, LinkState, PrimaryLun, Secondary, SecondaryServer, TcpPeer, metadata_size,
};
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;
const SECRET: &[u8] = b"replication bench secret";
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);

const SEQ_SIZE: u64 = 128 * MIB;
const WRITERS: u64 = 4;
const SEQ_IO: usize = 1 << 20;
const SMALL_IO: usize = 4096;
/// The 4 KiB writes stay in 8 activity-log extents, a working set the log keeps hot.
const SMALL_SPAN: u64 = 32 * MIB;
const RESYNC_SIZE: u64 = 128 * MIB;
const CRASH_SIZE: u64 = 256 * MIB;
const CRASH_WRITES: usize = 500;
const ASYNC_PERIOD: Duration = Duration::from_secs(1);
const ONE_WAY_DELAY: Duration = Duration::from_micros(500);

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, measure: Duration) {
    group
        .sample_size(10)
        // Ten samples need no 100,000 bootstrap resamples, which take seconds per
        // function on a loaded machine.
        .nresamples(10_000)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(measure);
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces A and B joined by a veth pair, removed (with the pair) on drop.
struct Netns {
    a: String,
    b: String,
}

impl Netns {
    fn new() -> Result<Netns, String> {
        remove_stale_namespaces();
        let pid = std::process::id();
        let net = Netns {
            a: format!("vrb{pid}a"),
            b: format!("vrb{pid}b"),
        };
        let (va, vb) = (format!("vrb{pid}x"), format!("vrb{pid}y"));
        let (a, b) = (net.a.as_str(), net.b.as_str());
        let ip_a = format!("{IP_A}/30");
        let ip_b = format!("{IP_B}/30");
        run("ip", &["netns", "add", a])?;
        run("ip", &["netns", "add", b])?;
        run(
            "ip",
            &["link", "add", &va, "type", "veth", "peer", "name", &vb],
        )?;
        run("ip", &["link", "set", &va, "netns", a])?;
        run("ip", &["link", "set", &vb, "netns", b])?;
        run("ip", &["-n", a, "addr", "add", &ip_a, "dev", &va])?;
        run("ip", &["-n", b, "addr", "add", &ip_b, "dev", &vb])?;
        for (ns, dev) in [(a, va.as_str()), (b, vb.as_str())] {
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                eprintln!("replication bench: cannot remove namespace {ns}: {e}");
            }
        }
    }
}

/// Namespaces an earlier run left behind when it was killed (its pid is gone).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let pid = name
            .strip_prefix("vrb")
            .and_then(|rest| rest.strip_suffix(['a', 'b']))
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap();
    setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
}

/// This thread in namespace A until dropped, then back where it was.
struct InNamespace {
    home: File,
}

impl InNamespace {
    fn enter(ns: &str) -> InNamespace {
        let home = File::open("/proc/thread-self/ns/net").unwrap();
        enter(ns);
        InNamespace { home }
    }
}

impl Drop for InNamespace {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.home, CloneFlags::CLONE_NEWNET) {
            eprintln!("replication bench: cannot return to the first network namespace: {e}");
        }
    }
}

fn dir_for(size: u64) -> tempfile::TempDir {
    // Big thin LUNs would fill memory once copied whole: those go to the disk.
    let dir = if size <= 2 << 30 && Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR"))
    };
    tempfile::Builder::new()
        .prefix("vapp-replbench-")
        .tempdir_in(dir)
        .unwrap()
}

fn new_file(path: &Path, size: u64) -> Arc<dyn Lun> {
    let _ = std::fs::remove_file(path);
    Arc::new(FileLun::create(path, size).unwrap())
}

fn open_file(path: &Path) -> Arc<dyn Lun> {
    Arc::new(FileLun::open(path, false).unwrap())
}

/// Site B: an empty replica with a snapshot pool, served in namespace B.
struct SiteB {
    server: SecondaryServer,
}

impl SiteB {
    fn new(dir: &Path, name: &str, size: u64, ns: &str) -> SiteB {
        let replica = new_file(&dir.join(format!("{name}.img")), size);
        let pool = new_file(&dir.join(format!("{name}.snap")), 2 * size + 16 * MIB);
        let snaps = Snapshots::create(replica.clone(), pool, PoolOptions::default()).unwrap();
        let meta = new_file(
            &dir.join(format!("{name}.repl")),
            metadata_size(size, Geometry::default()),
        );
        let secondary =
            Arc::new(Secondary::create(replica, meta, Some(snaps), Geometry::default()).unwrap());
        let ns = ns.to_string();
        let server = std::thread::spawn(move || {
            enter(&ns);
            let listener = TcpListener::bind((IP_B, 0)).unwrap();
            SecondaryServer::start(listener, secondary, SECRET.to_vec()).unwrap()
        })
        .join()
        .unwrap();
        SiteB { server }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}

fn peer(addr: SocketAddr) -> Box<TcpPeer> {
    Box::new(TcpPeer::new(addr, SECRET.to_vec()))
}

/// A new primary of `local`, connected to `addr` and in sync.
fn primary(dir: &Path, name: &str, local: Arc<dyn Lun>, addr: SocketAddr) -> PrimaryLun {
    let meta = new_file(
        &dir.join(format!("{name}.repl")),
        metadata_size(local.size(), Geometry::default()),
    );
    let p = PrimaryLun::create(
        local,
        meta,
        peer(addr),
        Geometry::default(),
        LinkPolicy::Continue,
    )
    .unwrap();
    p.connect().unwrap();
    p.resync().unwrap();
    assert_eq!(p.link_state(), LinkState::Connected);
    p
}

/// Every writer writes its own stripe in 1 MiB writes; then one flush.
fn striped_pass(lun: &dyn Lun, fill: u8) {
    let stripe = SEQ_SIZE / WRITERS;
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            s.spawn(move || {
                let buf = vec![fill ^ w as u8; SEQ_IO];
                for offset in (w * stripe..(w + 1) * stripe).step_by(SEQ_IO) {
                    lun.write_at(&buf, offset).unwrap();
                }
            });
        }
    });
    lun.flush().unwrap();
}

fn timed_passes(lun: &dyn Lun, iters: u64) -> Duration {
    let t = Instant::now();
    for i in 0..iters {
        striped_pass(lun, i as u8);
    }
    t.elapsed()
}

fn seq_writes(c: &mut Criterion, ns_b: &str) {
    let dir = dir_for(SEQ_SIZE);
    let d = dir.path();
    let local = new_file(&d.join("local.img"), SEQ_SIZE);
    striped_pass(local.as_ref(), 1);

    let sync_b = SiteB::new(d, "sync-b", SEQ_SIZE, ns_b);
    let sync_a = primary(
        d,
        "sync-a",
        new_file(&d.join("sync-a.img"), SEQ_SIZE),
        sync_b.addr(),
    );
    striped_pass(&sync_a, 1);

    let async_b = SiteB::new(d, "async-b", SEQ_SIZE, ns_b);
    let async_img = new_file(&d.join("async-a.img"), SEQ_SIZE);
    let pool = new_file(&d.join("async-a.snap"), 2 * SEQ_SIZE + 16 * MIB);
    let snaps = Snapshots::create(async_img, pool, PoolOptions::default()).unwrap();
    let async_a = primary(d, "async-a", snaps.source(), async_b.addr());
    let async_a = Arc::new(async_a.into_async(snaps, ASYNC_PERIOD).unwrap());
    let cycle = async_a.start_cycle().unwrap();
    striped_pass(async_a.as_ref(), 1);

    let mut group = c.benchmark_group("repl_seq_write_1MiB_4writers");
    configure(&mut group, Duration::from_secs(3));
    group.throughput(Throughput::Bytes(SEQ_SIZE));
    group.bench_function("baseline", |b| {
        b.iter_custom(|n| timed_passes(local.as_ref(), n))
    });
    group.bench_function("sync", |b| b.iter_custom(|n| timed_passes(&sync_a, n)));
    // Long enough to span several delta-set cycles: a cycle's session makes writes copy
    // first while its set ships, so a short run would measure the phase, not the mode.
    group.measurement_time(Duration::from_secs(6));
    group.bench_function("async", |b| {
        b.iter_custom(|n| timed_passes(async_a.as_ref(), n))
    });
    group.finish();
    drop(cycle);
    let st = async_a.status();
    eprintln!(
        "replication bench: async primary after the run: link {:?}, {} bytes waiting, rpo {:?}",
        st.link, st.bytes_waiting, st.rpo
    );
}

/// `n` 4 KiB writes at random offsets, one at a time.
fn small_writes(lun: &dyn Lun, n: u64, rng: &mut rand::rngs::StdRng) -> Duration {
    let buf = vec![0x5a; SMALL_IO];
    let t = Instant::now();
    for _ in 0..n {
        let offset = rng.random_range(0..SMALL_SPAN / SMALL_IO as u64) * SMALL_IO as u64;
        lun.write_at(&buf, offset).unwrap();
    }
    t.elapsed()
}

/// Forwards every connection to `target`, each direction delayed by `delay`.
fn delay_proxy(target: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            for s in [&client, &server] {
                let _ = s.set_nodelay(true);
            }
            forward(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                delay,
            );
            forward(server, client, delay);
        }
    });
    addr
}

/// One direction: a reader stamps what arrives, a writer passes it on once `delay` old.
fn forward(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        // The default 50 µs timer slack would add a tenth to every 0.5 ms sleep.
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// A server in namespace B answering every 4 KiB it reads with 8 bytes, as the secondary
/// answers a write: what the link alone costs.
fn echo_server(ns_b: &str) -> SocketAddr {
    let ns = ns_b.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        let listener = TcpListener::bind((IP_B, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; SMALL_IO];
                    while conn.read_exact(&mut buf).is_ok() {
                        if conn.write_all(&[0u8; 8]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    })
    .join()
    .unwrap()
}

/// `n` round trips of a 4 KiB request and its 8-byte answer.
fn round_trips(conn: &mut TcpStream, n: u64) -> Duration {
    let request = vec![0x5a; SMALL_IO];
    let mut answer = [0u8; 8];
    let t = Instant::now();
    for _ in 0..n {
        conn.write_all(&request).unwrap();
        conn.read_exact(&mut answer).unwrap();
    }
    t.elapsed()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let conn = TcpStream::connect(addr).unwrap();
    conn.set_nodelay(true).unwrap();
    conn
}

fn small_write_latency(c: &mut Criterion, ns_b: &str) {
    let dir = dir_for(SMALL_SPAN);
    let d = dir.path();
    let local = new_file(&d.join("local.img"), SMALL_SPAN);
    let site_b = SiteB::new(d, "b", SMALL_SPAN, ns_b);
    let a = primary(
        d,
        "a",
        new_file(&d.join("a.img"), SMALL_SPAN),
        site_b.addr(),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Make every activity-log extent hot first.
    small_writes(&a, 4096, &mut rng);
    let echo = echo_server(ns_b);
    let mut direct = connect(echo);

    let mut group = c.benchmark_group("repl_write_4KiB_qd1");
    configure(&mut group, Duration::from_secs(2));
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline", |b| {
        b.iter_custom(|n| small_writes(local.as_ref(), n, &mut rng))
    });
    group.bench_function("sync", |b| b.iter_custom(|n| small_writes(&a, n, &mut rng)));
    group.bench_function("link_floor", |b| {
        b.iter_custom(|n| round_trips(&mut direct, n))
    });
    group.finish();
    drop(a);

    let site_b = SiteB::new(d, "b-delayed", SMALL_SPAN, ns_b);
    let proxy = delay_proxy(site_b.addr(), ONE_WAY_DELAY);
    let a = primary(
        d,
        "a-delayed",
        new_file(&d.join("a.img"), SMALL_SPAN),
        proxy,
    );
    small_writes(&a, 1024, &mut rng);
    let mut group = c.benchmark_group("repl_write_4KiB_qd1_1ms_rtt");
    configure(&mut group, Duration::from_secs(2));
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline", |b| {
        b.iter_custom(|n| small_writes(local.as_ref(), n, &mut rng) + 2 * ONE_WAY_DELAY * n as u32)
    });
    group.bench_function("sync", |b| b.iter_custom(|n| small_writes(&a, n, &mut rng)));
    let mut delayed = connect(delay_proxy(echo, ONE_WAY_DELAY));
    group.bench_function("link_floor", |b| {
        b.iter_custom(|n| round_trips(&mut delayed, n))
    });
    group.finish();
}

fn fill_pattern(lun: &dyn Lun, seed: u8) {
    let mut buf = vec![0u8; SEQ_IO];
    for offset in (0..lun.size()).step_by(SEQ_IO) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ seed ^ (offset / SEQ_IO as u64) as u8;
        }
        lun.write_at(&buf, offset).unwrap();
    }
    lun.flush().unwrap();
}

/// A new replica and a new primary on `local` (every region dirty); times connect + resync.
fn initial_sync(dir: &Path, local: &Arc<dyn Lun>, ns_b: &str) -> (Duration, u64) {
    let site_b = SiteB::new(dir, "fresh-b", local.size(), ns_b);
    let meta = new_file(
        &dir.join("fresh-a.repl"),
        metadata_size(local.size(), Geometry::default()),
    );
    let a = PrimaryLun::create(
        local.clone(),
        meta,
        peer(site_b.addr()),
        Geometry::default(),
        LinkPolicy::Continue,
    )
    .unwrap();
    let t = Instant::now();
    a.connect().unwrap();
    a.resync().unwrap();
    let took = t.elapsed();
    assert_eq!(a.link_state(), LinkState::Connected);
    (took, a.status().bytes_resynced)
}

fn resync(c: &mut Criterion, ns_b: &str) {
    let dir = dir_for(RESYNC_SIZE);
    let d = dir.path();
    let local = new_file(&d.join("a.img"), RESYNC_SIZE);
    fill_pattern(local.as_ref(), 1);
    let site_b = SiteB::new(d, "b", RESYNC_SIZE, ns_b);
    let a = primary(d, "a", local.clone(), site_b.addr());
    let region = u64::from(Geometry::default().region_size);
    let regions = RESYNC_SIZE / region;

    let mut group = c.benchmark_group("repl_resync_128MiB");
    configure(&mut group, Duration::from_secs(3));
    group.throughput(Throughput::Bytes(RESYNC_SIZE));
    group.bench_function("baseline", |b| {
        b.iter_custom(|n| (0..n).map(|_| initial_sync(d, &local, ns_b).0).sum())
    });
    group.bench_function("after_1pct_changed", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for i in 0..n {
                a.fracture().unwrap();
                let buf = vec![i as u8; region as usize];
                for r in (0..regions).step_by(100) {
                    a.write_at(&buf, r * region).unwrap();
                }
                let t = Instant::now();
                a.resume().unwrap();
                a.resync().unwrap();
                total += t.elapsed();
                assert_eq!(a.link_state(), LinkState::Connected);
            }
            total
        })
    });
    group.finish();
}

fn crash_resync(c: &mut Criterion, ns_b: &str) {
    let dir = dir_for(CRASH_SIZE);
    let d = dir.path();
    let img = d.join("a.img");
    let meta = d.join("a.repl");
    let site_b = SiteB::new(d, "b", CRASH_SIZE, ns_b);
    let mut a = Some(primary(d, "a", new_file(&img, CRASH_SIZE), site_b.addr()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut most = 0u64;
    let mut samples = 0u64;

    let mut group = c.benchmark_group("repl_crash_resync_256MiB");
    // Each crash first runs its untimed write load: few samples.
    configure(&mut group, Duration::from_secs(1));
    group.bench_function("after_crash", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let running = a.take().unwrap();
                let buf = vec![0xc3; SMALL_IO];
                for _ in 0..CRASH_WRITES {
                    let offset =
                        rng.random_range(0..CRASH_SIZE / SMALL_IO as u64) * SMALL_IO as u64;
                    running.write_at(&buf, offset).unwrap();
                }
                // Dropped without close: the activity log is not emptied, as in a crash.
                drop(running);
                let t = Instant::now();
                let reopened = PrimaryLun::open(
                    open_file(&img),
                    open_file(&meta),
                    peer(site_b.addr()),
                    LinkPolicy::Continue,
                )
                .unwrap();
                reopened.connect().unwrap();
                reopened.resync().unwrap();
                total += t.elapsed();
                assert_eq!(reopened.link_state(), LinkState::Connected);
                most = most.max(reopened.status().bytes_resynced);
                samples += 1;
                a = Some(reopened);
            }
            total
        })
    });
    group.finish();
    if samples == 0 {
        // Filtered out on the command line: no figure, rather than a false zero.
        return;
    }
    let primary = std::fs::read(&img).unwrap();
    let replica = std::fs::read(d.join("b.img")).unwrap();
    assert!(
        primary == replica,
        "the replica differs from the primary after the last crash's resync"
    );
    println!(
        "repl_crash_resync_256MiB: at most {:.1} MiB resynced after a crash ({samples} crashes, goal ≤ 64 MiB)",
        most as f64 / MIB as f64
    );
    vapp_benches::write_figure(
        "repl_crash_resync_256MiB",
        "bytes_resynced",
        most as f64,
        "bytes",
    );
}

fn thin_initial_sync(c: &mut Criterion, ns_b: &str) {
    let gib: u64 = std::env::var("VAPP_BENCH_REPL_THIN_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&g| g > 0)
        .unwrap_or(1);
    let size = gib << 30;
    let dir = dir_for(size);
    let d = dir.path();
    let local = new_file(&d.join("thin.img"), size);
    let written = vec![0xa7u8; SEQ_IO];
    for offset in (0..size).step_by(10 * SEQ_IO) {
        local.write_at(&written, offset).unwrap();
    }
    local.flush().unwrap();
    let copy = new_file(&d.join("copy.img"), size);

    let mut group = c.benchmark_group(format!("repl_initial_sync_thin_{gib}GiB"));
    configure(&mut group, Duration::from_secs(5));
    group.throughput(Throughput::Bytes(size));
    group.bench_function("baseline", |b| {
        b.iter(|| {
            let mut buf = vec![0u8; SEQ_IO];
            for offset in (0..size).step_by(SEQ_IO) {
                local.read_at(&mut buf, offset).unwrap();
                copy.write_at(&buf, offset).unwrap();
            }
            copy.flush().unwrap();
        })
    });
    let mut resynced = 0;
    group.bench_function("initial_sync", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let (took, bytes) = initial_sync(d, &local, ns_b);
                total += took;
                resynced = bytes;
            }
            total
        })
    });
    group.finish();
    if resynced == 0 {
        return;
    }
    println!(
        "repl_initial_sync_thin_{gib}GiB: {:.0} MiB written, {:.0} MiB counted as resynced",
        (size / 10) as f64 / MIB as f64,
        resynced as f64 / MIB as f64
    );
}

fn replication(c: &mut Criterion) {
    if !lun::prereq::require(
        lun::prereq::is_root(),
        "replication bench: root, for network namespaces",
    ) {
        return;
    }
    let net = match Netns::new() {
        Ok(net) => net,
        Err(e) => {
            lun::prereq::require(false, &format!("replication bench: {e}"));
            return;
        }
    };
    let _in_a = InNamespace::enter(&net.a);
    seq_writes(c, &net.b);
    small_write_latency(c, &net.b);
    resync(c, &net.b);
    crash_resync(c, &net.b);
    thin_initial_sync(c, &net.b);
}

criterion_group!(benches, replication);
criterion_main!(benches);
