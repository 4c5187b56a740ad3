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
    SecondaryGroup, SecondaryServer, TcpPeer,
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

/// Two asynchronous members whose secondaries form one [`SecondaryGroup`], in sync.
struct AsyncGroup {
    group: ConsistencyGroup,
    members: Vec<Arc<PrimaryLun>>,
    links: Vec<LinkSwitch>,
    secondaries: SecondaryGroup,
}

fn async_group(dir: &Path) -> AsyncGroup {
    let mut secondaries = Vec::new();
    for i in 0..2 {
        let b_img = file_lun(dir, &format!("b{i}.img"), SIZE);
        let pool = file_lun(dir, &format!("b{i}.snap"), 2 * SIZE);
        let snaps = Snapshots::create(b_img.clone(), pool, PoolOptions::default()).expect("pool");
        secondaries.push(Arc::new(
            Secondary::create(
                b_img,
                meta_lun(dir, &format!("b{i}.meta"), SIZE),
                Some(snaps),
                small_geometry(),
            )
            .expect("secondary"),
        ));
    }
    let sgroup = SecondaryGroup::new("db", secondaries.clone()).expect("secondary group");
    let (mut members, mut links) = (Vec::new(), Vec::new());
    for (i, b) in secondaries.into_iter().enumerate() {
        let peer = LocalPeer::new(b);
        links.push(peer.switch());
        let a_img = file_lun(dir, &format!("a{i}.img"), SIZE);
        let pool = file_lun(dir, &format!("a{i}.snap"), 2 * SIZE);
        let snaps = Snapshots::create(a_img, pool, PoolOptions::default()).expect("pool");
        let a = PrimaryLun::create(
            snaps.source(),
            meta_lun(dir, &format!("a{i}.meta"), SIZE),
            Box::new(peer),
            small_geometry(),
            LinkPolicy::Continue,
        )
        .expect("primary")
        .into_async(snaps, Duration::from_secs(5))
        .expect("async");
        a.connect().expect("connect");
        a.resync().expect("initial sync");
        members.push(Arc::new(a));
    }
    let group = ConsistencyGroup::new("db", members.clone()).expect("group");
    AsyncGroup {
        group,
        members,
        links,
        secondaries: sgroup,
    }
}

/// The sequence number a replica holds at `offset`.
fn seq_in(lun: &dyn Lun, offset: u64) -> u64 {
    let mut b = vec![0u8; 512];
    lun.read_at(&mut b, offset).expect("read");
    u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"))
}

/// Write `k` of a dependent pair: the log record on member 0, then the data on member 1
/// (two regions, so member 1's set takes two steps to ship).
fn dependent_write(m: &[Arc<PrimaryLun>], k: u64) {
    m[0].write_at(&seq_block(k), 0).expect("log write");
    m[1].write_at(&seq_block(k), 0).expect("data write");
    m[1].write_at(&seq_block(k), 65536).expect("data write");
}

#[test]
fn a_link_lost_between_two_members_delta_ends_leaves_both_replicas_at_the_previous_cut() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let g = async_group(dir.path());
    dependent_write(&g.members, 1);
    g.group.replicate_now().expect("set 1");
    dependent_write(&g.members, 2);
    g.group.cut_delta().expect("cut set 2");
    // Member 0's set 2 ends at the secondary; the link to member 1 goes before its own.
    while !g.members[0].ship_step(64).expect("ship member 0") {}
    g.links[1].cut();
    assert!(
        g.members[1].ship_step(64).is_err(),
        "member 1 shipped over a cut link"
    );
    let (b0, b1) = (open(dir.path(), "b0.img"), open(dir.path(), "b1.img"));
    assert_eq!(
        (seq_in(&*b0, 0), seq_in(&*b1, 0), seq_in(&*b1, 65536)),
        (1, 1, 1),
        "the replicas are not both at set 1"
    );
    // Writes go on; once the link is back everything converges.
    dependent_write(&g.members, 3);
    g.links[1].restore();
    g.group.connect().expect("group reconnect");
    g.group.resync().expect("group resync");
    dependent_write(&g.members, 4);
    g.group.replicate_now().expect("set after reconnect");
    for i in 0..2 {
        assert_eq!(
            read_all(&*open(dir.path(), &format!("a{i}.img"))),
            read_all(&*open(dir.path(), &format!("b{i}.img"))),
            "member {i} did not converge"
        );
    }
    assert_eq!(seq_in(&*b1, 65536), 4);
}

/// Copies the secondary's files as they are now (a power cut), or back.
fn copy_secondary(from: &Path, to: &Path) {
    copy_member(from, to, 0);
    copy_member(from, to, 1);
}

fn copy_member(from: &Path, to: &Path, i: usize) {
    {
        for ext in ["img", "meta", "snap"] {
            let name = format!("b{i}.{ext}");
            std::fs::copy(from.join(&name), to.join(&name)).expect("copy");
        }
    }
}

/// The replicas in `dir` after a restart of the secondary's daemon.
fn reopen_secondaries(dir: &Path) -> SecondaryGroup {
    let members = (0..2)
        .map(|i| {
            let img = open(dir, &format!("b{i}.img"));
            let snaps =
                Snapshots::open(img.clone(), open(dir, &format!("b{i}.snap"))).expect("pool");
            Arc::new(
                Secondary::open(img, open(dir, &format!("b{i}.meta")), Some(snaps))
                    .expect("reopen secondary"),
            )
        })
        .collect();
    SecondaryGroup::new("db", members).expect("regroup")
}

#[test]
fn a_secondary_crash_between_two_members_delta_ends_restarts_both_at_the_previous_cut() {
    init_tracing();
    // Member 1's set half shipped when the power goes; then both ended, no commit yet.
    for both_ended in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let crashed = tempfile::tempdir().expect("tempdir");
        let g = async_group(dir.path());
        dependent_write(&g.members, 1);
        g.group.replicate_now().expect("set 1");
        dependent_write(&g.members, 2);
        g.group.cut_delta().expect("cut set 2");
        while !g.members[0].ship_step(64).expect("ship member 0") {}
        if both_ended {
            while !g.members[1].ship_step(64).expect("ship member 1") {}
        } else {
            assert!(
                !g.members[1]
                    .ship_step(1)
                    .expect("ship member 1's first region")
            );
        }
        copy_secondary(dir.path(), crashed.path());
        drop(g);
        copy_secondary(crashed.path(), dir.path());
        let group = reopen_secondaries(dir.path());
        let b = group.members();
        for (i, m) in b.iter().enumerate() {
            assert_eq!(m.status().delta_id, 1, "member {i}'s point in time");
        }
        let (b0, b1) = (open(dir.path(), "b0.img"), open(dir.path(), "b1.img"));
        assert_eq!(
            (seq_in(&*b0, 0), seq_in(&*b1, 0), seq_in(&*b1, 65536)),
            (1, 1, 1),
            "the restarted replicas are not both at set 1 (both_ended {both_ended})"
        );
        b[1].promote(true).expect("promote");
        assert_eq!(seq_in(&*b1, 65536), 1);
    }
}

#[test]
fn a_group_delta_set_leaves_the_primarys_bitmap_only_once_the_secondary_commits_it() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let g = async_group(dir.path());
    dependent_write(&g.members, 1);
    g.group.replicate_now().expect("set 1");
    dependent_write(&g.members, 2);
    g.group.cut_delta().expect("cut set 2");
    for m in &g.members {
        while !m.ship_step(64).expect("ship") {}
    }
    let (b0, b1) = (open(dir.path(), "b0.img"), open(dir.path(), "b1.img"));
    // Ended on both but not committed: the primary still holds the regions dirty.
    for m in &g.members {
        assert!(
            m.status().dirty_regions > 0,
            "regions dropped before the commit"
        );
    }
    g.group.replicate_now().expect("commit set 2");
    assert_eq!(
        (seq_in(&*b0, 0), seq_in(&*b1, 0), seq_in(&*b1, 65536)),
        (2, 2, 2)
    );
    for m in &g.members {
        assert_eq!(m.status().dirty_regions, 0, "regions left after the commit");
    }
}

#[test]
fn promoting_one_member_mid_set_promotes_the_whole_group_at_its_last_committed_set() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let g = async_group(dir.path());
    dependent_write(&g.members, 1);
    g.group.replicate_now().expect("set 1");
    dependent_write(&g.members, 2);
    g.group.cut_delta().expect("cut set 2");
    while !g.members[0].ship_step(64).expect("ship member 0") {}
    assert!(
        !g.members[1]
            .ship_step(1)
            .expect("ship member 1's first region")
    );
    // The primary site is lost mid-set; the operator takes over with member 1 ...
    let b = g.secondaries.members();
    b[1].promote(true).expect("promote member 1");
    // ... and member 0, promoted next, shows the same point in time.
    b[0].promote(true).expect("promote member 0");
    let (b0, b1) = (open(dir.path(), "b0.img"), open(dir.path(), "b1.img"));
    assert_eq!(
        (seq_in(&*b0, 0), seq_in(&*b1, 0), seq_in(&*b1, 65536)),
        (1, 1, 1),
        "the promoted replicas are not both at set 1"
    );
    assert_eq!((b[0].status().delta_id, b[1].status().delta_id), (1, 1));
}

#[test]
fn over_tcp_a_secondary_link_closed_between_two_members_delta_ends_undoes_the_set_on_both() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let secret = b"group secret".to_vec();
    let mut secondaries = Vec::new();
    let mut servers = Vec::new();
    let mut members = Vec::new();
    for i in 0..2 {
        let b_img = file_lun(dir, &format!("b{i}.img"), SIZE);
        let pool = file_lun(dir, &format!("b{i}.snap"), 2 * SIZE);
        let snaps = Snapshots::create(b_img.clone(), pool, PoolOptions::default()).expect("pool");
        let b = Arc::new(
            Secondary::create(
                b_img,
                meta_lun(dir, &format!("b{i}.meta"), SIZE),
                Some(snaps),
                small_geometry(),
            )
            .expect("secondary"),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        servers.push(SecondaryServer::start(listener, b.clone(), secret.clone()).expect("serve"));
        secondaries.push(b);
        let a_img = file_lun(dir, &format!("a{i}.img"), SIZE);
        let pool = file_lun(dir, &format!("a{i}.snap"), 2 * SIZE);
        let snaps = Snapshots::create(a_img, pool, PoolOptions::default()).expect("pool");
        let a = PrimaryLun::create(
            snaps.source(),
            meta_lun(dir, &format!("a{i}.meta"), SIZE),
            Box::new(TcpPeer::new(addr, secret.clone())),
            small_geometry(),
            LinkPolicy::Continue,
        )
        .expect("primary")
        .into_async(snaps, Duration::from_secs(5))
        .expect("async");
        members.push(Arc::new(a));
    }
    let _sgroup = SecondaryGroup::new("db", secondaries).expect("secondary group");
    let group = ConsistencyGroup::new("db", members.clone()).expect("group");
    group.connect().expect("connect");
    group.resync().expect("initial sync");
    dependent_write(&members, 1);
    group.replicate_now().expect("set 1");
    dependent_write(&members, 2);
    group.cut_delta().expect("cut set 2");
    while !members[0].ship_step(64).expect("ship member 0") {}
    // Member 1's secondary server goes (its connection closes) before its set ends.
    drop(servers.pop());
    let _ = members[1].ship_step(64);
    let (b0, b1) = (open(dir, "b0.img"), open(dir, "b1.img"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seq_in(&*b0, 0) != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        (seq_in(&*b0, 0), seq_in(&*b1, 0), seq_in(&*b1, 65536)),
        (1, 1, 1),
        "the replicas are not both at set 1"
    );
}

#[test]
fn a_secondary_crash_mid_group_commit_restarts_both_at_the_new_set() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let crashed = tempfile::tempdir().expect("tempdir");
    let g = async_group(dir.path());
    dependent_write(&g.members, 1);
    g.group.replicate_now().expect("set 1");
    dependent_write(&g.members, 2);
    g.group.cut_delta().expect("cut set 2");
    for m in &g.members {
        while !m.ship_step(64).expect("ship") {}
    }
    // The power goes after member 0's commit record is written and before member 1's.
    copy_member(dir.path(), crashed.path(), 1);
    g.group.replicate_now().expect("commit set 2");
    copy_member(dir.path(), crashed.path(), 0);
    drop(g);
    copy_secondary(crashed.path(), dir.path());
    let group = reopen_secondaries(dir.path());
    for (i, m) in group.members().iter().enumerate() {
        assert_eq!(m.status().delta_id, 2, "member {i}'s point in time");
    }
    let (b0, b1) = (open(dir.path(), "b0.img"), open(dir.path(), "b1.img"));
    assert_eq!(
        (seq_in(&*b0, 0), seq_in(&*b1, 0), seq_in(&*b1, 65536)),
        (2, 2, 2),
        "the restarted replicas are not both at set 2"
    );
}
