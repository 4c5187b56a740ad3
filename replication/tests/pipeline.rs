//! The synchronous primary over real TCP on 127.0.0.1 with many writers at once: writes
//! overlap at both sites instead of queueing behind one another, overlapping writes
//! reach both sides in one order, a link cut with writes in flight loses no
//! acknowledged write, an idle link stays up and a dead one is noticed while idle.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use lun::Lun;
use lun::fault::FaultLun;
use rand::{Rng, SeedableRng};
use replication::{
    LinkPolicy, LinkState, LocalPeer, PrimaryLun, Role, Secondary, SecondaryServer, TcpPeer,
};
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;
const REGION: u64 = 64 * 1024;
const SECRET: &[u8] = b"pipeline secret";
/// Short, so liveness tests finish quickly; writes here never take this long.
const TIMEOUT: Duration = Duration::from_millis(400);

struct Sites {
    _dir: tempfile::TempDir,
    local: Arc<FaultLun>,
    replica: Arc<FaultLun>,
    secondary: Arc<Secondary>,
    server: Option<SecondaryServer>,
    primary: PrimaryLun,
}

/// A primary and a secondary of `size` bytes, linked through `via` (the secondary's
/// own address when `None`), connected and in sync.
fn sites(size: u64, policy: LinkPolicy, via: Option<&Proxy>) -> Sites {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Arc::new(FaultLun::new(file_lun(dir.path(), "a.img", size)));
    let replica = Arc::new(FaultLun::new(file_lun(dir.path(), "b.img", size)));
    let secondary = Arc::new(
        Secondary::create(
            replica.clone(),
            meta_lun(dir.path(), "b.meta", size),
            None,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let server = SecondaryServer::start_with_timeout(
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        secondary.clone(),
        SECRET.to_vec(),
        TIMEOUT,
    )
    .expect("server");
    let addr = match via {
        Some(p) => {
            p.target(server.local_addr());
            p.addr
        }
        None => server.local_addr(),
    };
    let primary = PrimaryLun::create(
        local.clone(),
        meta_lun(dir.path(), "a.meta", size),
        Box::new(TcpPeer::new(addr, SECRET.to_vec()).with_link_timeout(TIMEOUT)),
        small_geometry(),
        policy,
    )
    .expect("primary");
    primary.connect().expect("connect");
    primary.resync().expect("initial sync");
    assert_eq!(primary.link_state(), LinkState::Connected);
    Sites {
        _dir: dir,
        local,
        replica,
        secondary,
        server: Some(server),
        primary,
    }
}

fn assert_same(s: &Sites) {
    let a = read_all(&*s.local);
    let b = read_all(&*s.replica);
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(
        first, None,
        "the replica differs from the primary at this byte"
    );
}

/// A TCP relay between the primary and the secondary that can drop everything (as a
/// firewall rule would) or reset its connections (as a killed peer's kernel would).
struct Proxy {
    addr: SocketAddr,
    to: Arc<Mutex<Option<SocketAddr>>>,
    drop_all: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn new() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let p = Proxy {
            addr: listener.local_addr().expect("addr"),
            to: Arc::default(),
            drop_all: Arc::default(),
            conns: Arc::default(),
            stop: Arc::default(),
        };
        let (to, drop_all, conns, stop) = (
            p.to.clone(),
            p.drop_all.clone(),
            p.conns.clone(),
            p.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let Some(target) = *to.lock().expect("proxy target") else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for (from, into) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut into) = (
                        from.try_clone().expect("clone"),
                        into.try_clone().expect("clone"),
                    );
                    let drop_all = drop_all.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            if !drop_all.load(Ordering::SeqCst)
                                && into.write_all(&buf[..n]).is_err()
                            {
                                break;
                            }
                        }
                        // A dropped link carries no hang-up either.
                        if !drop_all.load(Ordering::SeqCst) {
                            let _ = into.shutdown(Shutdown::Both);
                        }
                    });
                }
                conns.lock().expect("conns").extend([client, server]);
            }
        });
        p
    }

    fn target(&self, to: SocketAddr) {
        *self.to.lock().expect("proxy target") = Some(to);
    }

    /// Everything sent either way from now on vanishes; the connections stay open.
    fn blackhole(&self) {
        self.drop_all.store(true, Ordering::SeqCst);
    }

    /// Closes every connection through the relay; new ones go through.
    fn reset(&self) {
        for c in self.conns.lock().expect("conns").drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.reset();
    }
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

#[test]
fn eight_writers_overlap_their_writes_at_both_sites() {
    let s = sites(MIB, LinkPolicy::Continue, None);
    // Each device takes 60 ms a write: one at a time, eight writes take 480 ms.
    let latency = Duration::from_millis(60);
    s.local.set_latency(latency);
    s.replica.set_latency(latency);
    let t = Instant::now();
    std::thread::scope(|scope| {
        for i in 0..8u64 {
            let p = &s.primary;
            scope.spawn(move || {
                let data = vec![0x30 + i as u8; REGION as usize];
                p.write_at(&data, i * 2 * REGION).expect("write");
            });
        }
    });
    let took = t.elapsed();
    s.local.set_latency(Duration::ZERO);
    s.replica.set_latency(Duration::ZERO);
    assert!(
        took < latency * 4,
        "eight concurrent 64 KiB writes took {took:?} with {latency:?} devices: they queued"
    );
    assert_eq!(s.primary.status().dirty_regions, 0);
    assert_same(&s);
}

#[test]
fn a_resync_step_reads_here_while_the_replica_writes_the_region_before() {
    let s = sites(MIB, LinkPolicy::Continue, None);
    s.primary.fracture().expect("fracture");
    for r in 0..8u64 {
        s.primary
            .write_at(&[r as u8 + 1; 4096], r * 2 * REGION)
            .expect("write");
    }
    s.primary.resume().expect("resume");
    assert_eq!(s.primary.link_state(), LinkState::Resyncing);
    // Reading a region here and writing it there take 80 ms each: one region after
    // the other, eight take 1.28 s, and the flushes 160 ms more (18 latencies);
    // overlapped, about 11.
    let latency = Duration::from_millis(80);
    s.local.set_latency(latency);
    s.replica.set_latency(latency);
    let t = Instant::now();
    s.primary.resync().expect("resync");
    let took = t.elapsed();
    s.local.set_latency(Duration::ZERO);
    s.replica.set_latency(Duration::ZERO);
    assert_eq!(s.primary.link_state(), LinkState::Connected);
    // Overlapped: eight reads beside eight writes, then the replica's flushes.
    assert!(
        took < latency * 14,
        "resyncing eight regions took {took:?} with {latency:?} devices: one at a time"
    );
    assert_same(&s);
}

#[test]
fn overlapping_writers_leave_both_sites_identical() {
    let s = sites(MIB, LinkPolicy::Continue, None);
    std::thread::scope(|scope| {
        for w in 0..8u64 {
            let p = &s.primary;
            scope.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                for n in 0..150u64 {
                    // Sector-aligned writes of 512 B to 96 KiB, often straddling regions.
                    let len = rng.random_range(1..=192u64) * 512;
                    let off = rng.random_range(0..(MIB - len) / 512) * 512;
                    let data = vec![(w * 31 + n) as u8; len as usize];
                    p.write_at(&data, off).expect("write");
                }
            });
        }
    });
    s.primary.flush().expect("flush");
    assert_eq!(s.primary.status().dirty_regions, 0);
    assert_same(&s);
}

/// Many writers, the link reset under them: every write acknowledged before or after
/// the cut is either at the replica or in a dirty region, which the resync after the
/// link returns copies, so the replica ends equal to the primary.
#[test]
fn a_link_cut_with_writes_in_flight_loses_no_acknowledged_write() {
    let proxy = Proxy::new();
    let s = sites(2 * MIB, LinkPolicy::Continue, Some(&proxy));
    let acked = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for w in 0..8u64 {
            let (p, acked) = (&s.primary, &acked);
            scope.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + w);
                for n in 0..300u64 {
                    let len = rng.random_range(1..=64u64) * 4096;
                    let off = rng.random_range(0..(2 * MIB - len) / 4096) * 4096;
                    let mut data = vec![w as u8; len as usize];
                    data[..8].copy_from_slice(&n.to_le_bytes());
                    p.write_at(&data, off)
                        .expect("policy continue acknowledges every write");
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Cut once writes are flowing, with some in flight.
        while acked.load(Ordering::Relaxed) < 200 {
            std::thread::yield_now();
        }
        proxy.reset();
    });
    assert_eq!(s.primary.link_state(), LinkState::Disconnected);
    assert!(s.primary.status().dirty_regions > 0);
    // The replica as the cut left it, then the resync of the dirty regions alone.
    s.primary.connect().expect("reconnect");
    s.primary.resync().expect("resync");
    assert_eq!(s.primary.link_state(), LinkState::Connected);
    assert_same(&s);
}

/// Policy block with writes in flight when the link is reset: a write that returned
/// success is at the replica; one that failed may or may not be (its content is
/// undefined, as after any failed write), and nothing after it is acknowledged.
#[test]
fn under_block_a_link_cut_acknowledges_only_writes_the_replica_has() {
    const BLOCK: u64 = 4096;
    const STRIPE: u64 = 256 * 1024;
    let proxy = Proxy::new();
    let s = sites(2 * MIB, LinkPolicy::Block, Some(&proxy));
    let sent = AtomicU64::new(0);
    // Per writer: the last acknowledged write number of each block of its stripe, and
    // the write that failed (its first block, blocks and number).
    type Outcome = (Vec<Option<u64>>, Option<(u64, u64, u64)>);
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8u64)
            .map(|w| {
                let (p, sent) = (&s.primary, &sent);
                scope.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(200 + w);
                    let mut last = vec![None; (STRIPE / BLOCK) as usize];
                    for n in 1..=400u64 {
                        let blocks = rng.random_range(1..=8u64);
                        let first = rng.random_range(0..=STRIPE / BLOCK - blocks);
                        let mut data = vec![0u8; (blocks * BLOCK) as usize];
                        for b in data.chunks_exact_mut(BLOCK as usize) {
                            b[..8].copy_from_slice(&(w << 32 | n).to_le_bytes());
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        if p.write_at(&data, w * STRIPE + first * BLOCK).is_err() {
                            return (last, Some((first, blocks, n)));
                        }
                        for b in first..first + blocks {
                            last[b as usize] = Some(n);
                        }
                    }
                    (last, None)
                })
            })
            .collect();
        while sent.load(Ordering::Relaxed) < 200 {
            std::thread::yield_now();
        }
        proxy.reset();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer"))
            .collect()
    });
    assert_eq!(s.primary.link_state(), LinkState::Disconnected);
    assert!(
        outcomes.iter().any(|(_, failed)| failed.is_some()),
        "no write failed after the cut"
    );
    let replica = read_all(&*s.replica);
    for (w, (last, failed)) in outcomes.iter().enumerate() {
        for (b, acked) in last.iter().enumerate() {
            let at = w as u64 * STRIPE + b as u64 * BLOCK;
            let mut tag = [0u8; 8];
            tag.copy_from_slice(&replica[at as usize..at as usize + 8]);
            let got = u64::from_le_bytes(tag);
            let want = acked.map_or(0, |n| (w as u64) << 32 | n);
            let failed_here = failed
                .filter(|(first, blocks, _)| (*first..first + blocks).contains(&(b as u64)))
                .map(|(_, _, n)| (w as u64) << 32 | n);
            assert!(
                got == want || Some(got) == failed_here,
                "writer {w} block {b}: the replica has write {got:#x}, the last acknowledged is {want:#x}"
            );
        }
    }
}

#[test]
fn an_idle_link_outlives_the_timeout() {
    let s = sites(MIB, LinkPolicy::Continue, None);
    let server = s.server.as_ref().expect("server");
    let primary_addr = server.connected_primary().expect("a primary is connected");
    std::thread::sleep(TIMEOUT * 3);
    assert_eq!(s.primary.status().link, LinkState::Connected);
    assert_eq!(
        server.connected_primary(),
        Some(primary_addr),
        "same connection"
    );
    s.primary.write_at(&[7u8; 4096], 0).expect("write");
    s.primary.flush().expect("flush");
    let st = s.primary.status();
    assert_eq!((st.link, st.dirty_regions), (LinkState::Connected, 0));
    assert_eq!(server.connected_primary(), Some(primary_addr));
    assert_same(&s);
}

#[test]
fn a_blackholed_idle_link_is_noticed_and_its_unflushed_regions_are_dirty() {
    let proxy = Proxy::new();
    let s = sites(MIB, LinkPolicy::Continue, Some(&proxy));
    for r in [1u64, 5, 9] {
        s.primary
            .write_at(&[r as u8; 4096], r * REGION)
            .expect("write");
    }
    assert_eq!(s.primary.status().dirty_regions, 0);
    proxy.blackhole();
    // Nobody writes: only the keepalive can tell.
    let took = wait_for(
        "the primary's status turns disconnected",
        TIMEOUT * 5,
        || s.primary.status().link == LinkState::Disconnected,
    );
    assert!(
        took >= TIMEOUT / 2,
        "noticed after {took:?}, before any timeout"
    );
    let st = s.primary.status();
    assert!(
        st.dirty_regions >= 3,
        "the three unflushed regions must be dirty, {} are",
        st.dirty_regions
    );
    let why = st.last_error.unwrap_or_default();
    assert!(why.contains("no answer"), "{why}");
    let server = s.server.as_ref().expect("server");
    wait_for(
        "the secondary drops the silent primary",
        TIMEOUT * 5,
        || !server.is_connected(),
    );
    assert!(!s.secondary.status().connected);
}

#[test]
fn a_killed_secondary_is_noticed_while_idle() {
    let mut s = sites(MIB, LinkPolicy::Continue, None);
    s.primary.write_at(&[1u8; 4096], 0).expect("write");
    drop(s.server.take());
    wait_for(
        "the primary's status turns disconnected",
        TIMEOUT * 5,
        || s.primary.link_state() == LinkState::Disconnected,
    );
    assert!(s.primary.status().dirty_regions >= 1);
}

#[test]
fn status_accessors_tell_the_daemon_what_it_shows() {
    let s = sites(MIB, LinkPolicy::Continue, None);
    let st = s.secondary.status();
    assert_eq!(st.role, Role::Secondary);
    assert!(st.connected && !st.inconsistent);
    assert_eq!(st.gens, s.secondary.gens());
    assert_eq!(st.gens.current, s.primary.status().gens.current);
    assert_eq!((st.delta_id, st.point_in_time_ms), (0, None));
    // A fracture, writes, then a resync one region at a time has a rate and an ETA.
    s.primary.fracture().expect("fracture");
    let before = s.primary.status().bytes_resynced;
    for r in 0..8u64 {
        s.primary
            .write_at(&[r as u8 + 1; 4096], r * REGION)
            .expect("write");
    }
    s.primary.resume().expect("resume");
    assert_eq!(s.primary.resync_eta(), None, "nothing copied yet");
    s.replica.set_latency(Duration::from_millis(5));
    s.primary.resync_step(2).expect("step");
    s.primary.resync_step(2).expect("step");
    let eta = s.primary.resync_eta().expect("a running resync has an ETA");
    assert!(eta > Duration::ZERO);
    assert_eq!(s.primary.status().resync.regions_left, 4);
    s.replica.set_latency(Duration::ZERO);
    s.primary.resync().expect("resync");
    assert_eq!(s.primary.resync_eta(), None);
    assert_eq!(s.primary.status().bytes_resynced - before, 8 * REGION);
    assert_same(&s);
}

/// Asynchronous mode: concurrent writers overlap their local writes, and a write whose
/// regions are already dirty costs no metadata write.
#[test]
fn async_writers_overlap_and_rewrites_of_dirty_regions_skip_the_bitmap() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Arc::new(FaultLun::new(file_lun(dir.path(), "a.img", MIB)));
    let meta = Arc::new(FaultLun::new(meta_lun(dir.path(), "a.meta", MIB)));
    let snaps = Snapshots::create(
        local.clone(),
        file_lun(dir.path(), "a.snap", 2 * MIB),
        PoolOptions::default(),
    )
    .expect("pool");
    let replica = file_lun(dir.path(), "b.img", MIB);
    let secondary = Arc::new(
        Secondary::create(
            replica,
            meta_lun(dir.path(), "b.meta", MIB),
            None,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let primary = PrimaryLun::create(
        snaps.source(),
        meta.clone(),
        Box::new(LocalPeer::new(secondary)),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary")
    .into_async(snaps, Duration::from_secs(3600))
    .expect("async");
    let latency = Duration::from_millis(60);
    local.set_latency(latency);
    let write_all = |fill: u8| {
        std::thread::scope(|scope| {
            for i in 0..8u64 {
                let p = &primary;
                scope.spawn(move || {
                    p.write_at(&[fill + i as u8; 4096], i * 2 * REGION)
                        .expect("write");
                });
            }
        })
    };
    let t = Instant::now();
    write_all(0x10);
    let took = t.elapsed();
    assert!(
        took < latency * 4,
        "eight concurrent asynchronous writes took {took:?} with a {latency:?} device: they queued"
    );
    let meta_writes = meta.writes();
    write_all(0x40);
    assert_eq!(
        meta.writes(),
        meta_writes,
        "rewriting dirty regions wrote metadata"
    );
    local.set_latency(Duration::ZERO);
    let mut b = [0u8; 4096];
    for i in 0..8u64 {
        primary.read_at(&mut b, i * 2 * REGION).expect("read");
        assert!(b.iter().all(|&c| c == 0x40 + i as u8));
    }
}
