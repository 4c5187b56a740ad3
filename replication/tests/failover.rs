//! Generation identifiers at work: promote, demote and failback copy only what changed
//! at either side; split brain is refused, says why, and is resolved by discard-local.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::*;
use lun::{FileLun, Lun};
use replication::{LinkPolicy, LinkState, LocalPeer, PrimaryLun, ReplError, Secondary, TcpPeer};
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;
const REGION: u64 = 65536;
const SIZE: u64 = 4 * MIB;

fn open(dir: &Path, name: &str) -> Arc<dyn Lun> {
    Arc::new(FileLun::open(&dir.join(name), false).expect("open LUN"))
}

/// A peer that is never reached: for a primary that is only being demoted.
fn nowhere() -> Box<TcpPeer> {
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    Box::new(TcpPeer::new(addr, b"x".to_vec()))
}

/// A (primary) in sync with B (secondary) over an in-process link; A filled with 0x11.
fn in_sync_pair(dir: &Path, snaps: bool) -> (PrimaryLun, Arc<Secondary>, replication::LinkSwitch) {
    init_tracing();
    let a_img = file_lun(dir, "a.img", SIZE);
    let b_img = file_lun(dir, "b.img", SIZE);
    let pool = snaps.then(|| {
        let pool = file_lun(dir, "b.img.snap", 2 * SIZE);
        Snapshots::create(b_img.clone(), pool, PoolOptions::default()).expect("pool")
    });
    let b = Arc::new(
        Secondary::create(b_img, meta_lun(dir, "b.meta", SIZE), pool, small_geometry())
            .expect("secondary"),
    );
    let peer = LocalPeer::new(b.clone());
    let link = peer.switch();
    let a = PrimaryLun::create(
        a_img,
        meta_lun(dir, "a.meta", SIZE),
        Box::new(peer),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    fill(&a, 0x11);
    a.connect().expect("connect");
    a.resync().expect("initial sync");
    (a, b, link)
}

fn write_regions(lun: &dyn Lun, regions: &[u64], byte: u8) {
    for r in regions {
        lun.write_at(&vec![byte; REGION as usize], r * REGION)
            .expect("write region");
    }
}

fn region_bytes(lun: &dyn Lun, r: u64) -> Vec<u8> {
    let mut b = vec![0u8; REGION as usize];
    lun.read_at(&mut b, r * REGION).expect("read region");
    b
}

/// B promoted and opened as a primary whose peer is A reopened as a secondary.
fn fail_over(dir: &Path, a_discard: bool, b: Arc<Secondary>) -> (PrimaryLun, Arc<Secondary>) {
    b.promote(false).expect("promote B");
    drop(b);
    // A comes back and is demoted.
    let a = PrimaryLun::open(
        open(dir, "a.img"),
        open(dir, "a.meta"),
        nowhere(),
        LinkPolicy::Continue,
    )
    .expect("reopen A");
    a.demote(a_discard).expect("demote A");
    assert!(
        a.write_at(&vec![0; 512], 0).is_err(),
        "a demoted side takes no writes"
    );
    drop(a);
    let sa = Arc::new(
        Secondary::open(open(dir, "a.img"), open(dir, "a.meta"), None).expect("A as secondary"),
    );
    let b = PrimaryLun::open(
        open(dir, "b.img"),
        open(dir, "b.meta"),
        Box::new(LocalPeer::new(sa.clone())),
        LinkPolicy::Continue,
    )
    .expect("B as primary");
    (b, sa)
}

#[test]
fn promote_is_refused_while_the_primary_is_connected_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, _link) = in_sync_pair(dir.path(), false);
    match b.promote(false) {
        Err(ReplError::WrongState { reason, .. }) => {
            assert!(reason.contains("connected"), "{reason}")
        }
        other => panic!("promote while connected: {other:?}"),
    }
    a.write_at(&seq_block(1), 0).expect("A still replicates");
    b.promote(true).expect("forced promote");
    // A's next write finds B gone as a secondary: tracked, and the link is down.
    a.write_at(&seq_block(2), 0)
        .expect("write with policy continue");
    assert_eq!(a.link_state(), LinkState::Disconnected);
    // Two primaries never resync.
    match a.connect() {
        Err(ReplError::Refused { reason, .. }) => assert!(reason.contains("primary"), "{reason}"),
        other => panic!("connect to a promoted peer: {other:?}"),
    }
}

#[test]
fn failback_copies_what_changed_at_b_and_what_a_wrote_that_b_never_got() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, link) = in_sync_pair(dir.path(), false);
    link.cut();
    // A writes while apart, then dies (no clean close).
    write_regions(&a, &[0, 1, 2], 0xaa);
    drop(a);
    let (b, sa) = fail_over(dir.path(), true, b);
    write_regions(&b, &[10, 11], 0xbb);
    assert_eq!(b.connect().expect("connect"), LinkState::Resyncing);
    b.resync().expect("failback resync");
    let st = b.status();
    assert_eq!(
        st.bytes_resynced,
        5 * REGION,
        "only the 5 regions written apart"
    );
    assert_eq!(st.peer_regions_discarded, 3);
    let (a_img, b_img) = (open(dir.path(), "a.img"), open(dir.path(), "b.img"));
    assert_eq!(read_all(&*a_img), read_all(&*b_img));
    assert_eq!(
        region_bytes(&*a_img, 0),
        vec![0x11; REGION as usize],
        "A's write discarded"
    );
    assert_eq!(region_bytes(&*a_img, 10), vec![0xbb; REGION as usize]);
    assert_eq!(sa.gens().current, st.gens.current);
    // And replication flows B -> A.
    b.write_at(&seq_block(5), 0).expect("write");
    assert_eq!(region_bytes(&*a_img, 0)[..512], seq_block(5)[..]);
}

#[test]
fn split_brain_is_refused_with_a_reason_until_discard_local() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, link) = in_sync_pair(dir.path(), false);
    link.cut();
    write_regions(&a, &[3], 0xaa);
    drop(a);
    let (b, sa) = fail_over(dir.path(), false, b);
    write_regions(&b, &[20], 0xbb);
    let a_img = open(dir.path(), "a.img");
    let before = read_all(&*a_img);
    match b.connect() {
        Err(ReplError::SplitBrain { reason, .. }) => {
            assert!(reason.contains("both sides were written"), "{reason}")
        }
        other => panic!("expected split brain, got {other:?}"),
    }
    assert_eq!(read_all(&*a_img), before, "a refused resync changed A");
    assert_eq!(b.status().link, LinkState::Disconnected);
    sa.discard_local().expect("discard-local at A");
    b.connect().expect("connect after discard-local");
    b.resync().expect("resync");
    assert_eq!(b.status().bytes_resynced, 2 * REGION);
    assert_eq!(read_all(&*a_img), read_all(&*open(dir.path(), "b.img")));
}

#[test]
fn promoting_a_replica_cut_off_mid_resync_returns_to_its_last_point_in_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, link) = in_sync_pair(dir.path(), true);
    let point = read_all(&*open(dir.path(), "b.img"));
    link.cut();
    write_regions(&a, &[0, 1, 2, 3, 4, 5], 0xaa);
    link.restore();
    a.connect().expect("reconnect");
    a.resync_step(2).expect("two regions copied");
    assert!(b.is_inconsistent());
    // A is lost mid-resync.
    link.cut();
    drop(a);
    let (b, _sa) = fail_over(dir.path(), true, b);
    let b_img = open(dir.path(), "b.img");
    assert_eq!(
        read_all(&*b_img),
        point,
        "the promoted replica is its last complete point"
    );
    // Failback: A gets B's point back, including the regions the cut resync had changed.
    b.connect().expect("connect");
    b.resync().expect("resync");
    assert_eq!(read_all(&*open(dir.path(), "a.img")), point);
    assert_eq!(b.status().bytes_resynced, 6 * REGION);
}
