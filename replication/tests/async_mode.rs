//! Asynchronous delta sets: each set is the primary at its cut, visible whole or not at
//! all; a cut link or a crash mid-apply leaves the last complete set; the status shows
//! the RPO and the bytes waiting.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lun::{FileLun, Lun};
use replication::{
    LinkPolicy, LinkState, LinkSwitch, LocalPeer, Mode, PrimaryLun, ReplError, Secondary,
};
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const REGION: u64 = 65536;

fn open(dir: &Path, name: &str) -> Arc<dyn Lun> {
    Arc::new(FileLun::open(&dir.join(name), false).expect("open LUN"))
}

fn pool(dir: &Path, lun: &Arc<dyn Lun>, name: &str) -> Snapshots {
    let pool = file_lun(dir, name, 2 * SIZE);
    Snapshots::create(lun.clone(), pool, PoolOptions::default()).expect("pool")
}

struct Async {
    a: PrimaryLun,
    b: Arc<Secondary>,
    link: LinkSwitch,
}

/// A (asynchronous primary, filled with 0x11) and B with snapshot pools on both sides.
fn setup(dir: &Path, b_pool: bool, period: Duration) -> Async {
    init_tracing();
    let a_img = file_lun(dir, "a.img", SIZE);
    fill(&*a_img, 0x11);
    let b_img = file_lun(dir, "b.img", SIZE);
    let b_snaps = b_pool.then(|| pool(dir, &b_img, "b.snap"));
    let b = Arc::new(
        Secondary::create(
            b_img,
            meta_lun(dir, "b.meta", SIZE),
            b_snaps,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let a_snaps = pool(dir, &a_img, "a.snap");
    let peer = LocalPeer::new(b.clone());
    let link = peer.switch();
    let a = PrimaryLun::create(
        a_snaps.source(),
        meta_lun(dir, "a.meta", SIZE),
        Box::new(peer),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary")
    .into_async(a_snaps, period)
    .expect("async");
    Async { a, b, link }
}

fn connected(s: &Async) {
    s.a.connect().expect("connect");
    s.a.resync().expect("initial sync");
    assert_eq!(s.a.link_state(), LinkState::Connected);
}

fn write_seq(lun: &dyn Lun, regions: std::ops::Range<u64>, base: u64) {
    for r in regions {
        lun.write_at(&seq_block(base + r), r * REGION + 4096)
            .expect("write");
    }
}

#[test]
fn a_delta_set_is_the_primary_at_its_cut_and_nothing_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path(), true, Duration::from_secs(5));
    connected(&s);
    write_seq(&s.a, 0..8, 1000);
    let at_cut = read_all(&s.a);
    let id = s.a.cut_delta().expect("cut").expect("a set was cut");
    // Written after the cut, before the set ships: not part of it.
    write_seq(&s.a, 0..8, 2000);
    while !s.a.ship_step(2).expect("ship") {}
    let b_img = open(dir.path(), "b.img");
    assert_eq!(
        read_all(&*b_img),
        at_cut,
        "the replica is exactly the primary at the cut"
    );
    assert_eq!(s.b.point_in_time().0, id);
    s.a.replicate_now().expect("next set");
    assert_eq!(read_all(&*b_img), read_all(&s.a));
}

#[test]
fn a_link_cut_mid_apply_leaves_the_last_complete_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path(), true, Duration::from_secs(5));
    connected(&s);
    let b_img = open(dir.path(), "b.img");
    let point = read_all(&*b_img);
    write_seq(&s.a, 0..8, 1);
    s.a.cut_delta().expect("cut");
    assert!(!s.a.ship_step(3).expect("three regions shipped"));
    assert_ne!(read_all(&*b_img), point, "the set is being applied");
    s.link.cut();
    assert!(s.a.ship_step(3).is_err());
    assert_eq!(
        read_all(&*b_img),
        point,
        "a partial set must never be visible"
    );
    assert_eq!(
        s.a.status().dirty_regions,
        8,
        "nothing of the set is forgotten"
    );
    s.link.restore();
    s.a.connect().expect("reconnect");
    s.a.resync().expect("resync");
    assert_eq!(read_all(&*b_img), read_all(&s.a));
}

#[test]
fn a_secondary_crash_mid_apply_rolls_back_when_it_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path(), true, Duration::from_secs(5));
    connected(&s);
    let point = read_all(&*open(dir.path(), "b.img"));
    write_seq(&s.a, 0..8, 1);
    s.a.cut_delta().expect("cut");
    assert!(!s.a.ship_step(3).expect("ship part"));
    // Both processes die here: nothing runs their shutdown.
    std::mem::forget(s);
    let b_img = open(dir.path(), "b.img");
    let snaps = Snapshots::open(b_img.clone(), open(dir.path(), "b.snap")).expect("pool");
    let b =
        Secondary::open(b_img.clone(), open(dir.path(), "b.meta"), Some(snaps)).expect("reopen B");
    assert_eq!(
        read_all(&*b_img),
        point,
        "restart rolls back to the gold copy"
    );
    assert!(!b.is_inconsistent());
}

#[test]
fn the_status_shows_the_rpo_and_the_bytes_waiting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path(), true, Duration::from_secs(5));
    connected(&s);
    assert_eq!(s.a.status().rpo, Some(Duration::ZERO));
    write_seq(&s.a, 0..3, 1);
    std::thread::sleep(Duration::from_millis(120));
    let st = s.a.status();
    assert_eq!(
        st.mode,
        Mode::Async {
            period: Duration::from_secs(5)
        }
    );
    assert_eq!(st.bytes_waiting, 3 * REGION);
    assert!(
        st.rpo.expect("a point exists") >= Duration::from_millis(100),
        "{:?}",
        st.rpo
    );
    s.a.replicate_now().expect("ship");
    let st = s.a.status();
    assert_eq!((st.bytes_waiting, st.rpo), (0, Some(Duration::ZERO)));
}

#[test]
fn the_cycle_connects_syncs_and_ships_on_its_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path(), true, Duration::from_millis(100));
    let a = Arc::new(s.a);
    let _cycle = a.start_cycle().expect("cycle");
    write_seq(&*a, 0..16, 7);
    let b_img = open(dir.path(), "b.img");
    let t = Instant::now();
    loop {
        let st = a.status();
        if st.link == LinkState::Connected
            && st.bytes_waiting == 0
            && read_all(&*b_img) == read_all(&*a)
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not replicated: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_replica_without_a_snapshot_pool_refuses_delta_sets_and_stays_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path(), false, Duration::from_secs(5));
    connected(&s);
    let b_img = open(dir.path(), "b.img");
    let point = read_all(&*b_img);
    write_seq(&s.a, 0..2, 1);
    s.a.cut_delta().expect("cut");
    match s.a.ship_step(8) {
        Err(ReplError::Refused { reason, .. }) => {
            assert!(reason.contains("snapshot pool"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(read_all(&*b_img), point);
}

#[test]
fn an_async_primary_restarted_with_a_set_in_flight_ships_it_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path(), true, Duration::from_secs(5));
    connected(&s);
    write_seq(&s.a, 0..6, 1);
    s.a.cut_delta().expect("cut");
    assert!(!s.a.ship_step(2).expect("part of the set"));
    // The primary process dies with the set half-shipped; the secondary sees the
    // connection go and rolls back to its gold copy.
    let Async { a, b, link } = s;
    std::mem::forget(a);
    b.disconnected();
    let a_img = open(dir.path(), "a.img");
    let snaps = Snapshots::open(a_img.clone(), open(dir.path(), "a.snap")).expect("pool");
    let a = PrimaryLun::open(
        snaps.source(),
        open(dir.path(), "a.meta"),
        Box::new(LocalPeer::new(b.clone()).sharing(link, Default::default())),
        LinkPolicy::Continue,
    )
    .expect("reopen")
    .into_async(snaps, Duration::from_secs(5))
    .expect("async again");
    assert_eq!(a.status().bytes_waiting, 6 * REGION);
    a.connect().expect("connect");
    a.resync().expect("resync");
    write_seq(&a, 10..12, 50);
    a.replicate_now().expect("a new set after the restart");
    assert_eq!(read_all(&*open(dir.path(), "b.img")), read_all(&a));
}
