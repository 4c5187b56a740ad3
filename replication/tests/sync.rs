//! The synchronous engine over an in-process link (no sockets): acknowledgement only
//! when both sides have a write, link-loss policies, fracture/resume, incremental resync
//! and resync after a primary crash.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::*;
use lun::Lun;
use lun::fault::{CrashMode, FaultLun};
use rand::{Rng, SeedableRng};
use replication::{LinkPolicy, LinkState, LocalPeer, PrimaryLun, ReplError, Secondary};
use snapshot::{PoolOptions, Snapshots};

const MIB: u64 = 1 << 20;

struct Pair {
    dir: tempfile::TempDir,
    local: Arc<dyn Lun>,
    replica: Arc<dyn Lun>,
    secondary: Arc<Secondary>,
}

fn pair(size: u64) -> Pair {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = file_lun(dir.path(), "a.img", size);
    let replica = file_lun(dir.path(), "b.img", size);
    let smeta = meta_lun(dir.path(), "b.meta", size);
    let secondary = Arc::new(
        Secondary::create(replica.clone(), smeta, None, small_geometry()).expect("secondary"),
    );
    Pair {
        dir,
        local,
        replica,
        secondary,
    }
}

fn primary(p: &Pair, policy: LinkPolicy) -> (PrimaryLun, LocalPeer) {
    let peer = LocalPeer::new(p.secondary.clone());
    let meta = meta_lun(p.dir.path(), "a.meta", p.local.size());
    let link = peer.switch();
    let bytes = peer.bytes_sent();
    let primary = PrimaryLun::create(
        p.local.clone(),
        meta,
        Box::new(peer),
        small_geometry(),
        policy,
    )
    .expect("primary");
    // A handle that shares the link switch and byte counter of the boxed peer.
    let spy = LocalPeer::new(p.secondary.clone()).sharing(link, bytes);
    (primary, spy)
}

fn in_sync(primary: &PrimaryLun) {
    primary.connect().expect("connect");
    primary.resync().expect("initial sync");
    assert_eq!(primary.link_state(), LinkState::Connected);
}

#[test]
fn a_write_is_on_the_replica_when_it_is_acknowledged() {
    let p = pair(4 * MIB);
    let (a, _) = primary(&p, LinkPolicy::Continue);
    in_sync(&a);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for seq in 1..=200u64 {
        let off = rng.random_range(0..(4 * MIB / 512)) * 512;
        a.write_at(&seq_block(seq), off).expect("write");
        let mut got = vec![0u8; 512];
        p.replica.read_at(&mut got, off).expect("read replica");
        assert_eq!(
            got,
            seq_block(seq),
            "write {seq} acknowledged but not on the replica"
        );
    }
    assert_eq!(read_all(&*p.local), read_all(&*p.replica));
}

#[test]
fn an_acknowledged_flush_is_durable_on_the_replica() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 2 * MIB;
    let local = file_lun(dir.path(), "a.img", size);
    let inner = file_lun(dir.path(), "b.img", size);
    let fault = Arc::new(FaultLun::new(inner.clone()));
    fault.set_crash_mode(CrashMode::DropUnflushed);
    let replica: Arc<dyn Lun> = fault.clone();
    let secondary = Arc::new(
        Secondary::create(
            replica,
            meta_lun(dir.path(), "b.meta", size),
            None,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let a = PrimaryLun::create(
        local,
        meta_lun(dir.path(), "a.meta", size),
        Box::new(LocalPeer::new(secondary)),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    a.connect().expect("connect");
    a.resync().expect("sync");
    a.write_at(&seq_block(1), 0).expect("write 1");
    a.flush().expect("flush");
    a.write_at(&seq_block(2), 4096).expect("write 2");
    fault.crash().expect("power cut at the secondary");
    let mut got = vec![0u8; 512];
    inner.read_at(&mut got, 0).expect("read");
    assert_eq!(got, seq_block(1), "flushed write lost at the secondary");
    inner.read_at(&mut got, 4096).expect("read");
    assert_ne!(
        got,
        seq_block(2),
        "the power cut should drop the unflushed write"
    );
}

#[test]
fn initial_sync_copies_everything_then_link_is_in_sync() {
    let p = pair(2 * MIB);
    fill(&*p.local, 0xa5);
    let (a, spy) = primary(&p, LinkPolicy::Continue);
    assert_eq!(a.status().bytes_waiting, 2 * MIB);
    a.connect().expect("connect");
    let prog = a.resync().expect("resync");
    assert_eq!(prog.regions_left, 0);
    assert_eq!(read_all(&*p.replica), read_all(&*p.local));
    let st = a.status();
    assert_eq!(
        (st.link, st.dirty_regions, st.bytes_resynced),
        (LinkState::Connected, 0, 2 * MIB)
    );
    assert_eq!(p.secondary.gens().current, st.gens.current);
    assert!(spy.bytes_sent().load(Ordering::Relaxed) >= 2 * MIB);
}

#[test]
fn link_loss_with_continue_tracks_and_resyncs_only_what_was_written_apart() {
    let p = pair(8 * MIB);
    let (a, spy) = primary(&p, LinkPolicy::Continue);
    in_sync(&a);
    spy.switch().cut();
    // Writes in 5 distinct 64 KiB regions, several per region.
    let offsets = [
        0u64,
        4096,
        MIB,
        MIB + 8192,
        3 * MIB,
        5 * MIB + 512,
        7 * MIB + 65536,
    ];
    for (i, off) in offsets.iter().enumerate() {
        a.write_at(&seq_block(i as u64 + 1), *off)
            .expect("write while apart is acknowledged");
    }
    let st = a.status();
    assert_eq!(st.link, LinkState::Disconnected);
    assert_eq!(st.dirty_regions, 5);
    assert_eq!(st.bytes_waiting, 5 * 65536);
    spy.switch().restore();
    let before = spy.bytes_sent().load(Ordering::Relaxed);
    let resynced_before = a.status().bytes_resynced;
    assert_eq!(a.connect().expect("reconnect"), LinkState::Resyncing);
    a.resync().expect("resync");
    let sent = spy.bytes_sent().load(Ordering::Relaxed) - before;
    assert_eq!(a.status().bytes_resynced - resynced_before, 5 * 65536);
    assert!(
        sent < 5 * 65536 + 4096,
        "resync sent {sent} bytes for 5 regions"
    );
    assert_eq!(read_all(&*p.local), read_all(&*p.replica));
    assert_eq!(a.status().link, LinkState::Connected);
}

#[test]
fn link_loss_with_block_fails_writes_and_every_acknowledged_write_is_on_the_replica() {
    let p = pair(2 * MIB);
    let (a, spy) = primary(&p, LinkPolicy::Block);
    in_sync(&a);
    let mut acked = Vec::new();
    for seq in 1..=50u64 {
        if seq == 30 {
            spy.switch().cut();
        }
        let off = (seq % 40) * 4096;
        if a.write_at(&seq_block(seq), off).is_ok() {
            acked.push((seq, off));
        }
    }
    assert_eq!(acked.len(), 29, "writes after the cut must fail");
    // No resync yet: the replica alone holds every acknowledged write.
    for (seq, off) in &acked {
        let mut got = vec![0u8; 512];
        p.replica.read_at(&mut got, *off).expect("read");
        assert_eq!(
            &got,
            &seq_block(*seq),
            "acknowledged write {seq} missing at B"
        );
    }
    // Once the link is down, a write is refused before it touches the local LUN.
    let mut before = vec![0u8; 512];
    p.local.read_at(&mut before, MIB).expect("read");
    assert!(a.write_at(&seq_block(999), MIB).is_err());
    assert!(a.flush().is_err());
    let mut after = vec![0u8; 512];
    p.local.read_at(&mut after, MIB).expect("read");
    assert_eq!(before, after, "a refused write changed the local LUN");
    spy.switch().restore();
    a.connect().expect("reconnect");
    a.resync().expect("resync");
    a.write_at(&seq_block(1000), MIB)
        .expect("writes flow again");
    assert_eq!(read_all(&*p.local), read_all(&*p.replica));
}

#[test]
fn fracture_on_command_tracks_writes_across_a_restart_until_resumed() {
    let p = pair(4 * MIB);
    let (a, spy) = primary(&p, LinkPolicy::Block);
    in_sync(&a);
    a.fracture().expect("fracture");
    // A fracture is deliberate: even the block policy lets writes through, tracked.
    a.write_at(&seq_block(1), 2 * MIB)
        .expect("write while fractured");
    assert_eq!(a.status().dirty_regions, 1);
    let mut got = vec![0u8; 512];
    p.replica.read_at(&mut got, 2 * MIB).expect("read");
    assert_ne!(got, seq_block(1), "a fractured link must not ship writes");
    a.close().expect("close");
    drop(a);
    let a = PrimaryLun::open(
        p.local.clone(),
        Arc::new(lun::FileLun::open(&p.dir.path().join("a.meta"), false).expect("meta")),
        Box::new(LocalPeer::new(p.secondary.clone()).sharing(spy.switch(), spy.bytes_sent())),
        LinkPolicy::Block,
    )
    .expect("reopen");
    assert_eq!(a.link_state(), LinkState::Fractured);
    assert!(matches!(a.connect(), Err(ReplError::WrongState { .. })));
    assert_eq!(a.resume().expect("resume"), LinkState::Resyncing);
    a.resync().expect("resync");
    assert_eq!(a.status().bytes_resynced, 65536);
    assert_eq!(read_all(&*p.local), read_all(&*p.replica));
}

#[test]
fn a_primary_crash_resyncs_only_the_hot_extents() {
    let p = pair(16 * MIB);
    let (a, spy) = primary(&p, LinkPolicy::Continue);
    in_sync(&a);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut last = 0;
    for seq in 1..=500u64 {
        last = rng.random_range(0..(16 * MIB / 4096)) * 4096;
        a.write_at(&seq_block(seq), last).expect("write");
    }
    // The crash hits between the local write and the peer's: the sides differ there.
    p.local
        .write_at(&seq_block(9999), last)
        .expect("local-only write");
    drop(a); // no clean close: as a killed process leaves it
    let a = PrimaryLun::open(
        p.local.clone(),
        Arc::new(lun::FileLun::open(&p.dir.path().join("a.meta"), false).expect("meta")),
        Box::new(LocalPeer::new(p.secondary.clone()).sharing(spy.switch(), spy.bytes_sent())),
        LinkPolicy::Continue,
    )
    .expect("reopen after crash");
    let waiting = a.status().bytes_waiting;
    // 4 hot extents of 256 KiB: at most 1 MiB of a 16 MiB LUN.
    assert!(
        waiting > 0 && waiting <= MIB,
        "{waiting} bytes to resync after a crash"
    );
    a.connect().expect("connect");
    a.resync().expect("resync");
    assert!(a.status().bytes_resynced <= MIB);
    assert_eq!(read_all(&*p.local), read_all(&*p.replica));
}

#[test]
fn a_clean_close_then_restart_resyncs_nothing() {
    let p = pair(2 * MIB);
    let (a, spy) = primary(&p, LinkPolicy::Continue);
    in_sync(&a);
    a.write_at(&seq_block(1), 0).expect("write");
    a.close().expect("close");
    drop(a);
    let a = PrimaryLun::open(
        p.local.clone(),
        Arc::new(lun::FileLun::open(&p.dir.path().join("a.meta"), false).expect("meta")),
        Box::new(LocalPeer::new(p.secondary.clone()).sharing(spy.switch(), spy.bytes_sent())),
        LinkPolicy::Continue,
    )
    .expect("reopen");
    assert_eq!(a.status().dirty_regions, 0);
    assert_eq!(a.connect().expect("connect"), LinkState::Connected);
}

#[test]
fn the_secondary_keeps_its_point_in_time_in_a_snapshot_while_a_resync_runs() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4 * MIB;
    let local = file_lun(dir.path(), "a.img", size);
    let replica = file_lun(dir.path(), "b.img", size);
    let pool = file_lun(dir.path(), "b.img.snap", 8 * MIB);
    let snaps = Snapshots::create(replica.clone(), pool, PoolOptions::default()).expect("pool");
    let secondary = Arc::new(
        Secondary::create(
            replica.clone(),
            meta_lun(dir.path(), "b.meta", size),
            Some(snaps),
            small_geometry(),
        )
        .expect("secondary"),
    );
    let peer = LocalPeer::new(secondary.clone());
    let switch = peer.switch();
    let a = PrimaryLun::create(
        local.clone(),
        meta_lun(dir.path(), "a.meta", size),
        Box::new(peer),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    fill(&a, 0x11);
    a.connect().expect("connect");
    a.resync_step(2).expect("two regions of the initial sync");
    assert!(
        secondary.pre_resync_snapshot().expect("list").is_none(),
        "a new replica has no point in time to keep"
    );
    a.resync().expect("initial sync");
    let point = read_all(&*replica);
    switch.cut();
    for r in 0..8u64 {
        a.write_at(&vec![0x22; 65536], r * 65536)
            .expect("write apart");
    }
    switch.restore();
    a.connect().expect("reconnect");
    a.resync_step(2).expect("two regions");
    assert!(secondary.is_inconsistent());
    // The replica is half-way; the snapshot still reads the last complete point.
    assert_ne!(read_all(&*replica), point);
    let snap = secondary
        .pre_resync_snapshot()
        .expect("snapshot")
        .expect("a pre-resync snapshot exists while inconsistent");
    assert_eq!(read_all(&*snap), point);
    drop(snap);
    let p = a.resync().expect("finish");
    assert!((p.fraction() - 1.0).abs() < f64::EPSILON);
    assert!(!secondary.is_inconsistent());
    assert_eq!(read_all(&*local), read_all(&*replica));
    assert!(secondary.pre_resync_snapshot().expect("list").is_none());
}

#[test]
fn a_failed_local_write_is_marked_and_resynced_from_the_primary() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 2 * MIB;
    let inner = file_lun(dir.path(), "a.img", size);
    let fault = Arc::new(FaultLun::new(inner.clone()));
    let replica = file_lun(dir.path(), "b.img", size);
    let secondary = Arc::new(
        Secondary::create(
            replica.clone(),
            meta_lun(dir.path(), "b.meta", size),
            None,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let a = PrimaryLun::create(
        fault.clone(),
        meta_lun(dir.path(), "a.meta", size),
        Box::new(LocalPeer::new(secondary)),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    a.connect().expect("connect");
    a.resync().expect("sync");
    fault.fail_writes(0..4096);
    assert!(
        a.write_at(&seq_block(1), 0).is_err(),
        "the local failure is reported"
    );
    let st = a.status();
    assert_eq!((st.link, st.dirty_regions), (LinkState::Resyncing, 1));
    fault.clear_faults();
    a.resync().expect("resync");
    assert_eq!(a.link_state(), LinkState::Connected);
    assert_eq!(
        read_all(&*inner),
        read_all(&*replica),
        "the sides disagree after a failed local write"
    );
}

/// Counts the bytes read from a LUN, to show what a resync leaves unread.
#[derive(Debug)]
struct CountingReads {
    inner: Arc<dyn Lun>,
    read: std::sync::atomic::AtomicU64,
}

impl Lun for CountingReads {
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
        self.read.fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        self.inner.flush()
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> lun::Result<bool> {
        self.inner.may_hold_data(offset, len)
    }
}

#[test]
fn an_initial_sync_of_a_thin_lun_reads_and_sends_only_what_was_written() {
    let p = pair(64 * MIB);
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    p.local.write_at(&data, 5 * MIB).expect("write");
    p.local.write_at(&data, 40 * MIB).expect("write");
    let counting = Arc::new(CountingReads {
        inner: p.local.clone(),
        read: Default::default(),
    });
    let peer = LocalPeer::new(p.secondary.clone());
    let bytes = peer.bytes_sent();
    let meta = meta_lun(p.dir.path(), "a.meta", p.local.size());
    let a = PrimaryLun::create(
        counting.clone(),
        meta,
        Box::new(peer),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    a.connect().expect("connect");
    a.resync().expect("initial sync");
    assert_eq!(read_all(&*p.local), read_all(&*p.replica));
    assert_eq!(
        counting.read.load(Ordering::SeqCst),
        2 * MIB,
        "holes left unread"
    );
    assert_eq!(a.status().bytes_resynced, 2 * MIB);
    let sent = bytes.load(Ordering::SeqCst);
    // The 62 MiB of holes cross as a few runs, not a frame per region (40 KiB of them).
    assert!(
        sent < 2 * MIB + 8 * 1024,
        "{sent} bytes on the wire for 2 MiB of data"
    );
}
