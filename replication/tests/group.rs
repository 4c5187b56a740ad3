//! Consistency groups: a link lost on one member fractures all before the next write,
//! delta sets are cut at one point across all members, and a fracture fractures all.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use lun::{FileLun, Lun};
use replication::{
    ConsistencyGroup, LinkPolicy, LinkState, LinkSwitch, LocalPeer, PrimaryLun, Secondary,
};
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 2 * MIB;

fn open(dir: &Path, name: &str) -> Arc<dyn Lun> {
    Arc::new(FileLun::open(&dir.join(name), false).expect("open LUN"))
}

/// Member `i`: a primary over `a{i}.img` replicating to `b{i}.img`, in sync.
fn member(dir: &Path, i: usize, asynchronous: bool) -> (Arc<PrimaryLun>, LinkSwitch) {
    let a_img = file_lun(dir, &format!("a{i}.img"), SIZE);
    let b_img = file_lun(dir, &format!("b{i}.img"), SIZE);
    let b_snaps = asynchronous.then(|| {
        let pool = file_lun(dir, &format!("b{i}.snap"), 2 * SIZE);
        Snapshots::create(b_img.clone(), pool, PoolOptions::default()).expect("pool")
    });
    let b = Arc::new(
        Secondary::create(
            b_img,
            meta_lun(dir, &format!("b{i}.meta"), SIZE),
            b_snaps,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let peer = LocalPeer::new(b);
    let link = peer.switch();
    let meta = meta_lun(dir, &format!("a{i}.meta"), SIZE);
    let a = if asynchronous {
        let pool = file_lun(dir, &format!("a{i}.snap"), 2 * SIZE);
        let snaps = Snapshots::create(a_img, pool, PoolOptions::default()).expect("pool");
        PrimaryLun::create(
            snaps.source(),
            meta,
            Box::new(peer),
            small_geometry(),
            LinkPolicy::Continue,
        )
        .expect("primary")
        .into_async(snaps, Duration::from_secs(5))
        .expect("async")
    } else {
        PrimaryLun::create(
            a_img,
            meta,
            Box::new(peer),
            small_geometry(),
            LinkPolicy::Continue,
        )
        .expect("primary")
    };
    a.connect().expect("connect");
    a.resync().expect("initial sync");
    (Arc::new(a), link)
}

#[test]
fn a_link_lost_on_one_member_fractures_all_before_the_next_write() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (m0, link0) = member(dir.path(), 0, false);
    let (m1, _link1) = member(dir.path(), 1, false);
    let group = ConsistencyGroup::new("db", vec![m0.clone(), m1.clone()]).expect("group");
    link0.cut();
    // The log write finds member 0's link gone; it is acknowledged (tracked) ...
    m0.write_at(&seq_block(1), 0).expect("log write");
    // ... so the dependent data write on member 1 must not reach its replica alone.
    m1.write_at(&seq_block(2), 0).expect("data write");
    let mut got = vec![0u8; 512];
    open(dir.path(), "b1.img")
        .read_at(&mut got, 0)
        .expect("read");
    assert_ne!(
        got,
        seq_block(2),
        "member 1's replica got a write its group partner lacks"
    );
    assert!(group.is_fractured());
    assert_eq!(m1.link_state(), LinkState::Disconnected);
    assert!(m1.connect().is_err(), "a member alone cannot rejoin");
    link0.restore();
    group.connect().expect("group reconnect");
    group.resync().expect("group resync");
    for i in 0..2 {
        assert_eq!(
            read_all(&*open(dir.path(), &format!("a{i}.img"))),
            read_all(&*open(dir.path(), &format!("b{i}.img")))
        );
    }
}

#[test]
fn a_group_fracture_fractures_every_member() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (m0, _l0) = member(dir.path(), 0, false);
    let (m1, _l1) = member(dir.path(), 1, false);
    let group = ConsistencyGroup::new("db", vec![m0.clone(), m1.clone()]).expect("group");
    group.fracture().expect("fracture");
    assert_eq!(
        (m0.link_state(), m1.link_state()),
        (LinkState::Fractured, LinkState::Fractured)
    );
    m1.write_at(&seq_block(9), 4096)
        .expect("write while fractured");
    group.resume().expect("resume");
    group.resync().expect("resync");
    // The initial sync runs now: the LUN's holes cross as holes, so only the written
    // region carries data.
    assert_eq!(m1.status().bytes_resynced, 65536);
    assert_eq!(m0.link_state(), LinkState::Connected);
}

#[test]
fn delta_sets_are_cut_at_one_point_across_the_group() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (m0, _l0) = member(dir.path(), 0, true);
    let (m1, _l1) = member(dir.path(), 1, true);
    let group = ConsistencyGroup::new("db", vec![m0.clone(), m1.clone()]).expect("group");
    // A writer whose write k on member 1 depends on its write k on member 0.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (m0, m1, stop) = (m0.clone(), m1.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut k = 1u64;
            while !stop.load(Ordering::SeqCst) && k < 5000 {
                m0.write_at(&seq_block(k), 0).expect("write m0");
                m1.write_at(&seq_block(k), 0).expect("write m1");
                k += 1;
            }
        })
    };
    let seq_at = |name: &str| {
        let mut b = vec![0u8; 512];
        open(dir.path(), name).read_at(&mut b, 0).expect("read");
        u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"))
    };
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(20));
        group.replicate_now().expect("group delta set");
        let (k0, k1) = (seq_at("b0.img"), seq_at("b1.img"));
        // Member 1's replica never holds a write whose predecessor member 0's lacks,
        // and the cut is one point: at most the one write in between.
        assert!(k1 <= k0 && k0 <= k1 + 1, "replicas at {k0} and {k1}");
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    assert!(seq_at("b0.img") > 0, "no write was ever shipped");
}
