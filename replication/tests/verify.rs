//! Online verify finds what differs at the replica and marks it for resync; it resumes
//! after a restart; an initial sync can skip regions that already match, and zero
//! regions cross as holes.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::*;
use lun::{FileLun, Lun};
use replication::{LinkPolicy, LinkState, LocalPeer, PrimaryLun, Secondary};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const REGION: u64 = 65536;

fn open(dir: &Path, name: &str) -> Arc<dyn Lun> {
    Arc::new(FileLun::open(&dir.join(name), false).expect("open LUN"))
}

fn pair(dir: &Path, a_byte: u8, b_byte: u8) -> (PrimaryLun, Arc<Secondary>, LocalPeer) {
    init_tracing();
    let a_img = file_lun(dir, "a.img", SIZE);
    if a_byte != 0 {
        fill(&*a_img, a_byte);
    }
    let b_img = file_lun(dir, "b.img", SIZE);
    if b_byte != 0 {
        fill(&*b_img, b_byte);
    }
    let b = Arc::new(
        Secondary::create(b_img, meta_lun(dir, "b.meta", SIZE), None, small_geometry())
            .expect("secondary"),
    );
    let peer = LocalPeer::new(b.clone());
    let spy = LocalPeer::new(b.clone()).sharing(peer.switch(), peer.bytes_sent());
    let a = PrimaryLun::create(
        a_img,
        meta_lun(dir, "a.meta", SIZE),
        Box::new(peer),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    (a, b, spy)
}

#[test]
fn verify_finds_regions_changed_behind_the_engine_and_resync_repairs_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, _b, _spy) = pair(dir.path(), 0x42, 0);
    a.connect().expect("connect");
    a.resync().expect("initial sync");
    let b_img = open(dir.path(), "b.img");
    for r in [1u64, 17, 63] {
        b_img
            .write_at(&[0xde; 512], r * REGION + 1024)
            .expect("corrupt the replica");
    }
    let p = a.verify().expect("verify");
    assert_eq!((p.differences, p.regions_done, p.running), (3, 64, false));
    let st = a.status();
    assert_eq!(
        (st.link, st.bytes_waiting),
        (LinkState::Resyncing, 3 * REGION)
    );
    let before = st.bytes_resynced;
    a.resync().expect("resync");
    assert_eq!(a.status().bytes_resynced - before, 3 * REGION);
    assert_eq!(read_all(&*b_img), read_all(&a));
    assert_eq!(a.verify().expect("verify again").differences, 0);
}

#[test]
fn a_verify_resumes_from_where_a_restart_stopped_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, spy) = pair(dir.path(), 0x42, 0);
    a.connect().expect("connect");
    a.resync().expect("initial sync");
    open(dir.path(), "b.img")
        .write_at(&[0xde; 512], 50 * REGION)
        .expect("corrupt the replica");
    let p = a.verify_step(20).expect("part of a verify");
    assert_eq!((p.regions_done, p.running), (20, true));
    a.close().expect("close");
    drop(a);
    let a = PrimaryLun::open(
        open(dir.path(), "a.img"),
        open(dir.path(), "a.meta"),
        Box::new(LocalPeer::new(b).sharing(spy.switch(), spy.bytes_sent())),
        LinkPolicy::Continue,
    )
    .expect("reopen");
    let p = a.verify_progress();
    assert_eq!(
        (p.regions_done, p.running),
        (20, true),
        "the cursor survived"
    );
    a.connect().expect("connect");
    let p = a.verify().expect("finish the verify");
    assert_eq!(p.differences, 1);
}

#[test]
fn an_initial_sync_can_skip_regions_whose_checksums_already_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The replica was seeded from a copy: equal but for two regions.
    let (a, _b, spy) = pair(dir.path(), 0x42, 0x42);
    let b_img = open(dir.path(), "b.img");
    b_img
        .write_at(&[0; 4096], 5 * REGION)
        .expect("seed difference");
    a.write_at(&[7; 4096], 9 * REGION)
        .expect("primary difference");
    a.set_compare_before_copy(true);
    a.connect().expect("connect");
    a.resync().expect("initial sync");
    assert_eq!(a.status().bytes_resynced, 2 * REGION);
    assert!(spy.bytes_sent().load(Ordering::Relaxed) < 4 * REGION);
    assert_eq!(read_all(&*b_img), read_all(&a));
}

#[test]
fn unallocated_regions_of_a_thin_lun_cross_as_holes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A thin primary with two regions written; the replica holds old garbage.
    let (a, _b, spy) = pair(dir.path(), 0, 0x99);
    a.write_at(&[1; 65536], 0).expect("write");
    a.write_at(&[2; 65536], 30 * REGION).expect("write");
    a.connect().expect("connect");
    a.resync().expect("initial sync");
    let sent = spy.bytes_sent().load(Ordering::Relaxed);
    assert!(
        sent < 2 * REGION + 64 * 1024,
        "{sent} bytes sent for 2 data regions"
    );
    assert_eq!(read_all(&*open(dir.path(), "b.img")), read_all(&a));
}
