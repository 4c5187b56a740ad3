//! A DR drill's copy: `take_point` snapshots a replica between two applied writes while
//! the primary keeps writing, and the copy's writes never reach the replica.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use lun::Lun;
use replication::{LinkPolicy, LocalPeer, PrimaryLun, Secondary, take_point};
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;
const REGION: u64 = 65536;
const SIZE: u64 = 4 * MIB;
const REGIONS: u64 = SIZE / REGION;

fn pair(dir: &Path, snaps: bool) -> (Arc<PrimaryLun>, Arc<Secondary>) {
    named_pair(dir, "", snaps)
}

fn named_pair(dir: &Path, tag: &str, snaps: bool) -> (Arc<PrimaryLun>, Arc<Secondary>) {
    init_tracing();
    let a_img = file_lun(dir, &format!("a{tag}.img"), SIZE);
    let b_img = file_lun(dir, &format!("b{tag}.img"), SIZE);
    let pool = snaps.then(|| {
        let pool = file_lun(dir, &format!("b{tag}.img.snap"), 2 * SIZE);
        Snapshots::create(b_img.clone(), pool, PoolOptions::default()).expect("pool")
    });
    let b = Arc::new(
        Secondary::create(
            b_img,
            meta_lun(dir, &format!("b{tag}.meta"), SIZE),
            pool,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let a = PrimaryLun::create(
        a_img,
        meta_lun(dir, &format!("a{tag}.meta"), SIZE),
        Box::new(LocalPeer::new(b.clone())),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    a.connect().expect("connect");
    a.resync().expect("initial sync");
    (Arc::new(a), b)
}

fn first_byte(lun: &dyn Lun, r: u64) -> u8 {
    let mut b = vec![0u8; 4096];
    lun.read_at(&mut b, r * REGION).expect("read");
    b[0]
}

#[test]
fn a_drill_point_is_a_prefix_of_the_primarys_writes_and_its_copy_never_reaches_the_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = pair(dir.path(), true);
    let stop = Arc::new(AtomicBool::new(false));
    // Pass p writes byte p+1 over every region in order: any point of this sequence has
    // a run of regions at byte p+1 followed by regions at byte p.
    let writer = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut pass = 0u8;
            while !stop.load(Ordering::SeqCst) {
                pass = pass.wrapping_add(1).max(1);
                for r in 0..REGIONS {
                    a.write_at(&vec![pass; REGION as usize], r * REGION)
                        .expect("replicated write");
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let point =
        take_point(std::slice::from_ref(&b), "drill", Duration::from_secs(5)).expect("point");
    assert!(point.connected);
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");

    let engine = b.engine().expect("a replica with a pool has an engine");
    let copy = engine.session("drill").expect("the drill's session");
    let bytes: Vec<u8> = (0..REGIONS).map(|r| first_byte(&*copy, r)).collect();
    let head = bytes[0];
    let split = bytes.iter().position(|x| *x != head).unwrap_or(bytes.len());
    assert!(
        bytes[split..].iter().all(|x| *x == head.wrapping_sub(1)),
        "the copy is no point of the write sequence: {bytes:?}"
    );

    // The drill writes its copy; the replica keeps the primary's bytes.
    copy.write_at(&vec![0xEE; REGION as usize], 0)
        .expect("copy write");
    assert_eq!(first_byte(&*copy, 0), 0xEE);
    let replica = engine.source();
    assert_eq!(first_byte(&*replica, 0), first_byte(&*a, 0));

    let again = take_point(std::slice::from_ref(&b), "drill", Duration::from_secs(1));
    assert!(
        again.is_err_and(|e| e.to_string().contains("already has a session")),
        "a second session of one name is refused"
    );
}

#[test]
fn a_replica_without_a_pool_has_no_drill_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_a, b) = pair(dir.path(), false);
    let err = take_point(&[b], "drill", Duration::from_secs(1)).expect_err("no pool");
    assert!(err.to_string().contains("keeps no snapshot pool"), "{err}");
}

fn newest(lun: &dyn Lun) -> u64 {
    let mut b = vec![0u8; 4096];
    (0..REGIONS)
        .map(|r| {
            lun.read_at(&mut b, r * REGION).expect("read");
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_drill_point_across_members_is_one_point_of_their_common_write_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a0, b0) = named_pair(dir.path(), "0", true);
    let (a1, b1) = named_pair(dir.path(), "1", true);
    let stop = Arc::new(AtomicBool::new(false));
    // Write k goes to member 0, then to member 1, each acknowledged before the next.
    let writer = {
        let (a0, a1, stop) = (a0.clone(), a1.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::SeqCst) {
                k += 1;
                let mut block = vec![0u8; 4096];
                block[..8].copy_from_slice(&k.to_le_bytes());
                let at = (k % REGIONS) * REGION;
                a0.write_at(&block, at).expect("member 0");
                a1.write_at(&block, at).expect("member 1");
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    take_point(&[b0.clone(), b1.clone()], "drill", Duration::from_secs(5)).expect("point");
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    let copy = |b: &Secondary| {
        b.engine()
            .expect("engine")
            .session("drill")
            .expect("session on every member")
    };
    let (n0, n1) = (newest(&*copy(&b0)), newest(&*copy(&b1)));
    assert!(n1 > 0, "the copies hold writes");
    assert!(
        n0 == n1 || n0 == n1 + 1,
        "member 0 holds write {n0}, member 1 write {n1}: no single point of the write order"
    );
}
