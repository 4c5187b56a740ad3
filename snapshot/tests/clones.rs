//! Clones: a full copy with progress, mirrored until fractured; after a fracture, sync and
//! reverse sync copy only the chunks changed on either side.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use lun::fault::FaultLun;
use lun::{FileLun, Lun};
use snapshot::{CloneState, PoolOptions, SnapError, Snapshots};

use common::{files, open, read_all};

const CHUNK: u32 = 4096;
const C: u64 = CHUNK as u64;
const CHUNKS: u64 = 400;

fn fill(lun: &dyn Lun, seed: u8) {
    let data: Vec<u8> = (0..lun.size()).map(|i| (i / 512) as u8 ^ seed).collect();
    lun.write_at(&data, 0).unwrap();
}

struct Setup {
    f: common::Files,
    snaps: Snapshots,
    clone: Arc<FaultLun>,
}

fn setup() -> Setup {
    let f = files(CHUNKS * C, 8 << 20);
    let clone_path = f.dir.path().join("clone.img");
    FileLun::create(&clone_path, CHUNKS * C).unwrap();
    fill(open(&f.source).as_ref(), 0x5a);
    let snaps = Snapshots::create(
        open(&f.source),
        open(&f.pool),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    let clone = Arc::new(FaultLun::new(open(&clone_path)));
    snaps.add_clone("c1", clone.clone()).unwrap();
    Setup { f, snaps, clone }
}

#[test]
fn a_clone_copies_fully_with_progress_then_follows_the_source_until_fractured() {
    let s = setup();
    let first = s.snaps.sync_step("c1", 100).unwrap().unwrap();
    assert_eq!(first.state, CloneState::Syncing);
    assert_eq!(first.logged_chunks, CHUNKS - 100);
    // A write while the copy runs reaches the clone too.
    s.snaps.source().write_at(&vec![7u8; 512], 350 * C).unwrap();
    s.snaps.run_sync("c1").unwrap();
    let source = s.snaps.source();
    assert_eq!(read_all(s.clone.as_ref()), read_all(source.as_ref()));
    assert_eq!(s.snaps.clones()[0].state, CloneState::Synchronized);

    source.write_at(&vec![8u8; 1024], 3 * C + 512).unwrap();
    source.flush().unwrap();
    assert_eq!(
        read_all(s.clone.inner().as_ref()),
        read_all(source.as_ref())
    );
    // The flush made both sides durable: nothing left to copy.
    assert_eq!(s.snaps.clones()[0].logged_chunks, 0);
    // A synchronized clone follows the source: it takes no writes of its own.
    let err = s
        .snaps
        .clone_view("c1")
        .unwrap()
        .write_at(&[0u8; 512], 0)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("follows the source until fractured"),
        "{err}"
    );

    s.snaps.fracture("c1").unwrap();
    source.write_at(&vec![9u8; 512], 0).unwrap();
    let mut first_sector = vec![0u8; 512];
    s.clone.read_at(&mut first_sector, 0).unwrap();
    assert_ne!(
        first_sector,
        vec![9u8; 512],
        "a fractured clone no longer follows"
    );
}

#[test]
fn sync_after_one_percent_changed_copies_only_the_changed_chunks() {
    let s = setup();
    s.snaps.run_sync("c1").unwrap();
    s.snaps.source().flush().unwrap();
    s.snaps.fracture("c1").unwrap();
    let source = s.snaps.source();
    // 1% of the chunks on the source, and two more on the clone.
    for c in (0..CHUNKS).step_by(100) {
        source.write_at(&vec![1u8; 512], c * C + 512).unwrap();
    }
    let view = s.snaps.clone_view("c1").unwrap();
    view.write_at(&vec![2u8; 512], 7 * C).unwrap();
    view.write_at(&vec![2u8; 512], 9 * C).unwrap();
    assert_eq!(s.snaps.clones()[0].logged_chunks, CHUNKS / 100 + 2);
    let before = s.clone.writes();
    s.snaps.sync("c1").unwrap();
    s.snaps.run_sync("c1").unwrap();
    assert_eq!(
        s.clone.writes() - before,
        CHUNKS / 100 + 2,
        "one write per changed chunk"
    );
    assert_eq!(read_all(s.clone.as_ref()), read_all(source.as_ref()));
    assert_eq!(s.snaps.clones()[0].state, CloneState::Synchronized);
}

#[test]
fn reverse_sync_serves_the_clone_at_once_and_keeps_sessions() {
    let s = setup();
    s.snaps.run_sync("c1").unwrap();
    s.snaps.source().flush().unwrap();
    let original = read_all(s.snaps.source().as_ref());
    s.snaps.create_session("before", false).unwrap();
    s.snaps.fracture("c1").unwrap();
    let view = s.snaps.clone_view("c1").unwrap();
    view.write_at(&vec![3u8; 2 * C as usize], 20 * C).unwrap();
    view.write_at(&vec![4u8; 512], 399 * C).unwrap();
    let wanted = read_all(view.as_ref());

    s.snaps.reverse_sync("c1").unwrap();
    // Before anything is copied the source already reads the clone's contents.
    assert_eq!(read_all(s.snaps.source().as_ref()), wanted);
    let err = s.snaps.create_session("during", false).unwrap_err();
    assert!(matches!(err, SnapError::CloneBusy { .. }), "{err}");
    s.snaps.run_sync("c1").unwrap();
    assert_eq!(read_all(open(&s.f.source).as_ref()), wanted);
    assert_eq!(
        read_all(s.snaps.session("before").unwrap().as_ref()),
        original
    );
    assert_eq!(s.snaps.clones()[0].state, CloneState::Synchronized);
}

#[test]
fn clone_bad_input_is_a_clear_error_and_a_reopen_keeps_the_log() {
    let s = setup();
    let small = s.f.dir.path().join("small.img");
    FileLun::create(&small, C).unwrap();
    let err = s.snaps.add_clone("c2", open(&small)).unwrap_err();
    assert!(matches!(err, SnapError::BadClone { .. }), "{err}");
    assert!(matches!(
        s.snaps.fracture("nope"),
        Err(SnapError::UnknownClone { .. })
    ));
    assert!(matches!(
        s.snaps.add_clone("c1", open(&small)),
        Err(SnapError::BadClone { .. })
    ));
    // Fracturing a clone that is not yet a full copy is refused.
    assert!(matches!(
        s.snaps.fracture("c1"),
        Err(SnapError::CloneBusy { .. })
    ));
    assert_eq!(s.snaps.clones().len(), 1);

    // After a reopen the log still names every chunk, and the clone resumes once attached.
    s.snaps.sync_step("c1", 10).unwrap();
    let (source, pool) = (s.f.source.clone(), s.f.pool.clone());
    let clone = s.clone.clone();
    drop(s.snaps);
    let snaps = Snapshots::open(open(&source), open(&pool)).unwrap();
    assert_eq!(snaps.clones()[0].logged_chunks, CHUNKS - 10);
    assert!(!snaps.clones()[0].attached);
    let err = snaps.attach_clone("c1", open(&small)).unwrap_err();
    assert!(err.to_string().contains("lives on"), "{err}");
    snaps.attach_clone("c1", clone.clone()).unwrap();
    snaps.run_sync("c1").unwrap();
    assert_eq!(
        read_all(clone.inner().as_ref()),
        read_all(open(&source).as_ref())
    );
    let report = snapshot::fsck(open(&pool).as_ref()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// A power cut at every write of a clone's life (copy, mirrored writes, flushes, fracture,
/// writes on both sides, resync), with torn writes and lost caches on the source, the pool
/// and the clone at once: after reopening, one sync makes the clone equal to the source,
/// so the fracture log named every chunk that could differ.
#[test]
fn a_power_cut_at_every_write_leaves_a_log_that_resyncs_the_clone() {
    let total = clone_crash_run(None);
    assert!(total > 20, "{total}");
    for cut in 0..total {
        clone_crash_run(Some(cut));
    }
}

fn clone_crash_run(cut: Option<u64>) -> u64 {
    use lun::fault::CrashMode;
    const N: u64 = 32;
    let f = files(N * C, 512 * 1024);
    let clone_path = f.dir.path().join("clone.img");
    FileLun::create(&clone_path, N * C).unwrap();
    fill(open(&f.source).as_ref(), 0x33);
    {
        let snaps = Snapshots::create(
            open(&f.source),
            open(&f.pool),
            PoolOptions { chunk_size: CHUNK },
        )
        .unwrap();
        snaps.add_clone("c1", open(&clone_path)).unwrap();
    }
    let machine = common::Machine::new(true);
    let source = machine.lun(&f.source, CrashMode::DropUnflushed);
    let pool = machine.lun(&f.pool, CrashMode::DropUnflushed);
    let clone = machine.lun(&clone_path, CrashMode::DropUnflushed);
    {
        let snaps = Snapshots::open(source, pool).unwrap();
        snaps.attach_clone("c1", clone).unwrap();
        if let Some(n) = cut {
            machine.crash_after(n);
        }
        let src = snaps.source();
        src.write_at(&vec![1u8; 1024], 2 * C).unwrap();
        snaps.sync_step("c1", 5).unwrap();
        src.write_at(&vec![2u8; 512], 30 * C).unwrap();
        src.flush().unwrap();
        snaps.run_sync("c1").unwrap();
        src.write_at(&vec![3u8; 4096], 10 * C).unwrap();
        src.flush().unwrap();
        src.write_at(&vec![4u8; 512], 11 * C).unwrap();
        snaps.fracture("c1").unwrap();
        src.write_at(&vec![5u8; 512], 12 * C).unwrap();
        snaps
            .clone_view("c1")
            .unwrap()
            .write_at(&vec![6u8; 512], 13 * C)
            .unwrap();
        src.flush().unwrap();
        snaps.sync("c1").unwrap();
        snaps.sync_step("c1", 1).unwrap();
        src.write_at(&vec![7u8; 512], 14 * C).unwrap();
        snaps.run_sync("c1").unwrap();
        src.flush().unwrap();
    }
    let writes = machine.writes();
    let context = format!("cut after {cut:?} writes");
    let report = snapshot::fsck(open(&f.pool).as_ref()).unwrap();
    assert!(report.is_clean(), "{context}: {:?}", report.problems);
    let snaps = Snapshots::open(open(&f.source), open(&f.pool)).unwrap();
    snaps.attach_clone("c1", open(&clone_path)).unwrap();
    snaps.sync("c1").unwrap();
    snaps.run_sync("c1").unwrap();
    assert!(
        read_all(open(&clone_path).as_ref()) == read_all(open(&f.source).as_ref()),
        "{context}: the clone differs from the source after a resync"
    );
    writes
}

#[test]
fn a_synchronized_clone_follows_a_rollback_of_its_source() {
    let s = setup();
    s.snaps.run_sync("c1").unwrap();
    s.snaps.create_session("before", false).unwrap();
    let source = s.snaps.source();
    source
        .write_at(&vec![6u8; (10 * C) as usize], 5 * C)
        .unwrap();
    s.snaps.rollback("before").unwrap();
    s.snaps.wait_rollback().unwrap();
    source.flush().unwrap();
    let now = read_all(source.as_ref());
    assert_eq!(now, read_all(s.snaps.session("before").unwrap().as_ref()));
    assert_eq!(read_all(s.clone.as_ref()), now);
}

#[test]
fn a_failed_mirrored_write_fractures_the_clone_and_the_source_write_succeeds() {
    let s = setup();
    s.snaps.run_sync("c1").unwrap();
    s.snaps.source().flush().unwrap();
    s.clone.fail_writes(0..CHUNKS * C);
    let source = s.snaps.source();
    source.write_at(&vec![4u8; 512], 8 * C).unwrap();
    let info = &s.snaps.clones()[0];
    assert_eq!(info.state, CloneState::Fractured);
    assert_eq!(info.logged_chunks, 1);
    s.clone.clear_faults();
    s.snaps.sync("c1").unwrap();
    s.snaps.run_sync("c1").unwrap();
    assert_eq!(read_all(s.clone.as_ref()), read_all(source.as_ref()));

    // During a reverse sync the clone holds the source's contents: its failure fails the write.
    s.snaps.source().flush().unwrap();
    s.snaps.fracture("c1").unwrap();
    s.snaps
        .clone_view("c1")
        .unwrap()
        .write_at(&vec![5u8; 512], 9 * C)
        .unwrap();
    s.snaps.reverse_sync("c1").unwrap();
    s.clone.fail_writes(0..CHUNKS * C);
    assert!(source.write_at(&vec![6u8; 512], 9 * C).is_err());
    assert_eq!(s.snaps.clones()[0].state, CloneState::ReverseSyncing);
    s.clone.clear_faults();
    s.snaps.run_sync("c1").unwrap();
    let mut sector = vec![0u8; 512];
    source.read_at(&mut sector, 9 * C).unwrap();
    assert_eq!(sector, vec![5u8; 512]);
}
