//! Measures a synchronous and an asynchronous primary against the bare local LUN over
//! real TCP on 127.0.0.1: sequential 1 MiB writes from several writers at once (the queue
//! depth an NBD client or virtio-blk gives) and 4 KiB writes one at a time.
//!
//! `cargo run --release -p replication --example repl_throughput [DIR] [QD] [MiB] [µs]`
//! (DIR defaults to /dev/shm, QD to 8, MiB to 256; µs, 0 by default, adds that latency
//! to every write and flush of both LUNs, as a device would, with `lun::fault`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lun::fault::FaultLun;
use lun::{FileLun, Lun};
use replication::{
    Geometry, LinkPolicy, PrimaryLun, Secondary, SecondaryServer, TcpPeer, metadata_size,
};
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;
const SECRET: &[u8] = b"bench";

fn file(dir: &Path, name: &str, size: u64) -> Arc<dyn Lun> {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    Arc::new(FileLun::create(&path, size).expect("create file LUN"))
}

fn device(dir: &Path, name: &str, size: u64, latency: Duration) -> Arc<dyn Lun> {
    let lun = file(dir, name, size);
    if latency.is_zero() {
        return lun;
    }
    let slow = FaultLun::new(lun);
    slow.set_latency(latency);
    Arc::new(slow)
}

/// Sequential `block`-byte writes over the whole LUN by `qd` writers taking the next
/// offset in turn; bytes per second.
fn stream(lun: &dyn Lun, block: u64, qd: usize, flush: bool) -> f64 {
    let next = AtomicU64::new(0);
    let size = lun.size();
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..qd {
            let next = &next;
            s.spawn(move || {
                let buf = vec![0x40 + w as u8; block as usize];
                loop {
                    let off = next.fetch_add(block, Ordering::Relaxed);
                    if off + block > size {
                        break;
                    }
                    lun.write_at(&buf, off).expect("write");
                }
            });
        }
    });
    if flush {
        lun.flush().expect("flush");
    }
    size as f64 / t.elapsed().as_secs_f64()
}

/// Mean latency of `n` 4 KiB writes one after another.
fn qd1(lun: &dyn Lun, n: u64) -> Duration {
    let buf = vec![0x77u8; 4096];
    let t = Instant::now();
    for i in 0..n {
        lun.write_at(&buf, (i * 4096 * 17) % (lun.size() - 4096))
            .expect("write");
    }
    t.elapsed() / n as u32
}

const ROUNDS: usize = 5;

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = PathBuf::from(args.get(1).map_or("/dev/shm", String::as_str));
    let qd: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let size = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(256u64) * MIB;
    let latency = Duration::from_micros(args.get(4).and_then(|s| s.parse().ok()).unwrap_or(0));
    let dir = tempfile::tempdir_in(&base).expect("tempdir");
    let d = dir.path();
    let geometry = Geometry::default();

    let local = device(d, "a.img", size, latency);
    // Overwrites throughout, as the replicated runs do, so allocation is not measured.
    stream(&*local, MIB, qd, true);
    let replica = device(d, "b.img", size, latency);
    let b_snaps = Snapshots::create(
        replica.clone(),
        file(d, "b.snap", 2 * size),
        PoolOptions::default(),
    )
    .expect("pool");
    let secondary = Arc::new(
        Secondary::create(
            replica,
            file(d, "b.meta", metadata_size(size, geometry)),
            Some(b_snaps),
            geometry,
        )
        .expect("secondary"),
    );
    let server = SecondaryServer::start(
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        secondary,
        SECRET.to_vec(),
    )
    .expect("server");
    let a = PrimaryLun::create(
        local.clone(),
        file(d, "a.meta", metadata_size(size, geometry)),
        Box::new(TcpPeer::new(server.local_addr(), SECRET.to_vec())),
        geometry,
        LinkPolicy::Continue,
    )
    .expect("primary");
    a.connect().expect("connect");
    let t = Instant::now();
    a.resync().expect("initial sync");
    let initial_sync = size as f64 / t.elapsed().as_secs_f64();
    // The machine is shared: local and replicated runs alternate, medians reported.
    let (mut local_bps, mut local_lat, mut sync_bps, mut sync_lat) =
        (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        local_bps.push(stream(&*local, MIB, qd, true));
        local_lat.push(qd1(&*local, 2000));
        sync_bps.push(stream(&a, MIB, qd, true));
        sync_lat.push(qd1(&a, 2000));
    }
    a.close().expect("close");
    drop(a);

    // Asynchronous: the primary sits on the snapshot engine's source view.
    let a_snaps = Snapshots::create(
        local.clone(),
        file(d, "a.snap", 2 * size),
        PoolOptions::default(),
    )
    .expect("pool");
    let a = PrimaryLun::open(
        a_snaps.source(),
        Arc::new(FileLun::open(&d.join("a.meta"), false).expect("meta")),
        Box::new(TcpPeer::new(server.local_addr(), SECRET.to_vec())),
        LinkPolicy::Continue,
    )
    .expect("primary")
    .into_async(a_snaps, Duration::from_secs(3600))
    .expect("async");
    a.connect().expect("connect");
    let (mut async_bps, mut async_lat, mut local2_bps) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        local2_bps.push(stream(&*local, MIB, qd, true));
        async_bps.push(stream(&a, MIB, qd, true));
        async_lat.push(qd1(&a, 2000));
    }
    let (local_bps, local_lat, sync_bps, sync_lat) = (
        median(local_bps),
        median(local_lat),
        median(sync_bps),
        median(sync_lat),
    );
    let (async_bps, async_lat, local2_bps) =
        (median(async_bps), median(async_lat), median(local2_bps));

    let mb = |bps: f64| bps / MIB as f64;
    println!(
        "dir {} qd {qd} size {} MiB device latency {latency:?}",
        base.display(),
        size / MIB
    );
    println!(
        "local  1 MiB x{qd}: {:8.1} MiB/s   4 KiB QD1: {:?}",
        mb(local_bps),
        local_lat
    );
    println!(
        "sync   1 MiB x{qd}: {:8.1} MiB/s ({:.2}x)   4 KiB QD1: {:?}",
        mb(sync_bps),
        sync_bps / local_bps,
        sync_lat
    );
    println!("initial sync: {:8.1} MiB/s", mb(initial_sync));
    println!(
        "async  1 MiB x{qd}: {:8.1} MiB/s ({:.2}x)   4 KiB QD1: {:?}",
        mb(async_bps),
        async_bps / local2_bps,
        async_lat
    );
}
