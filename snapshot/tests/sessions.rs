//! Sessions at scale, a full pool, and bad input: each a clear error that changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use lun::Lun;
use lun::fault::FaultLun;
use snapshot::{PoolOptions, SessionState, SnapError, Snapshots};

use common::{files, open, read_all};

const CHUNK: u32 = 4096;
const C: u64 = CHUNK as u64;

fn chunk_of(fill: u8) -> Vec<u8> {
    vec![fill; C as usize]
}

/// Pool writes caused by the first write to a chunk with `sessions` sessions open.
fn pool_writes_for_first_write(sessions: usize) -> u64 {
    let f = files(64 * C, 4 << 20);
    let pool = Arc::new(FaultLun::new(open(&f.pool)));
    let snaps = Snapshots::create(
        open(&f.source),
        pool.clone(),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    for i in 0..sessions {
        snaps.create_session(&format!("s{i}"), false).unwrap();
    }
    let before = pool.writes();
    snaps.source().write_at(&chunk_of(9), 5 * C).unwrap();
    let cost = pool.writes() - before;
    // The one copy serves every session.
    for i in 0..sessions {
        let lun = snaps.session(&format!("s{i}")).unwrap();
        let mut buf = chunk_of(1);
        lun.read_at(&mut buf, 5 * C).unwrap();
        assert_eq!(buf, chunk_of(0));
    }
    assert_eq!(snaps.usage().used, 1);
    cost
}

#[test]
fn a_first_write_costs_the_same_with_64_sessions_as_with_one() {
    let one = pool_writes_for_first_write(1);
    let many = pool_writes_for_first_write(64);
    assert_eq!(one, 2, "data and its table entry");
    assert_eq!(many, one);
}

#[test]
fn a_full_pool_invalidates_only_the_sessions_it_cannot_keep_and_never_fails_the_source() {
    // 64 KiB header copies + 4 KiB table + 9 × 4 KiB bitmaps (rollback, 8 clone logs)
    // leave 6 data slots of 4 KiB.
    let f = files(64 * C, 64 * 1024 + 40 * 1024 + 6 * C);
    let snaps = Snapshots::create(
        open(&f.source),
        open(&f.pool),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    assert_eq!(snaps.usage().total, 6);
    let source = snaps.source();
    source.write_at(&vec![1u8; (64 * C) as usize], 0).unwrap();
    snaps.create_session("old", false).unwrap();
    // Every other chunk, so each write preserves just its own chunk.
    for c in [0, 2, 4, 6] {
        source.write_at(&chunk_of(2), c * C).unwrap();
    }
    snaps.create_session("new", false).unwrap();
    // The same chunks again: "new" needs their 2s, two slots remain.
    for c in [0, 2, 4, 6] {
        source.write_at(&chunk_of(3), c * C).unwrap();
    }
    let list = snaps.list();
    assert_eq!(list[0].name, "old");
    assert_eq!(list[0].state, SessionState::Valid);
    assert_eq!(list[1].name, "new");
    assert_eq!(list[1].state, SessionState::Invalid);
    assert!(matches!(
        snaps.session("new"),
        Err(SnapError::SessionInvalid { .. })
    ));
    // "new"'s copies are free again, "old" still reads its point in time.
    assert_eq!(snaps.usage().used, 4);
    assert_eq!(
        read_all(snaps.session("old").unwrap().as_ref()),
        vec![1u8; (64 * C) as usize]
    );
    let mut expected = vec![1u8; (64 * C) as usize];
    for c in [0, 2, 4, 6] {
        expected[(c * C) as usize..((c + 1) * C) as usize].fill(3);
    }
    assert_eq!(read_all(source.as_ref()), expected);
    // The state survives a reopen and fsck sees nothing wrong.
    drop(snaps);
    let report = snapshot::fsck(open(&f.pool).as_ref()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.invalid_sessions, 1);
    let snaps = Snapshots::open(open(&f.source), open(&f.pool)).unwrap();
    assert_eq!(snaps.list()[1].state, SessionState::Invalid);
    // A writable session out of room gets ENOSPC; the source still writes.
    snaps.create_session("rw", true).unwrap();
    let rw = snaps.session("rw").unwrap();
    rw.write_at(&chunk_of(7), 10 * C).unwrap();
    rw.write_at(&chunk_of(7), 11 * C).unwrap();
    let err = rw.write_at(&chunk_of(7), 12 * C).unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);
    snaps.source().write_at(&chunk_of(4), 20 * C).unwrap();
}

/// Every byte of the pool, to prove a refused request changed nothing.
fn pool_bytes(path: &std::path::Path) -> Vec<u8> {
    read_all(open(path).as_ref())
}

#[test]
fn bad_input_is_a_clear_error_and_changes_nothing() {
    let f = files(64 * C, 1 << 20);
    let snaps = Snapshots::create(
        open(&f.source),
        open(&f.pool),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    snaps.create_session("a", false).unwrap();
    let before = pool_bytes(&f.pool);

    let err = snaps.delete_session("nope").unwrap_err();
    assert!(matches!(err, SnapError::UnknownSession { .. }));
    assert!(err.to_string().contains("\"nope\""), "{err}");
    assert!(matches!(
        snaps.session("nope"),
        Err(SnapError::UnknownSession { .. })
    ));
    assert!(matches!(
        snaps.rollback("nope"),
        Err(SnapError::UnknownSession { .. })
    ));
    assert!(matches!(
        snaps.create_session("a", false),
        Err(SnapError::SessionExists { .. })
    ));
    assert!(matches!(
        snaps.create_session("no/slash", false),
        Err(SnapError::BadName { .. })
    ));
    let ro = snaps.session("a").unwrap();
    assert!(matches!(
        ro.write_at(&chunk_of(1), 0),
        Err(lun::LunError::ReadOnly { .. })
    ));
    assert_eq!(pool_bytes(&f.pool), before);
    drop(snaps);

    // A pool of another source.
    let other = f.dir.path().join("other.img");
    lun::FileLun::create(&other, 64 * C).unwrap();
    let err = Snapshots::open(open(&other), open(&f.pool)).unwrap_err();
    assert!(matches!(err, SnapError::WrongSource { .. }), "{err}");
    assert!(err.to_string().contains("source.img"), "{err}");
    // Making it a pool again is refused too.
    let err = Snapshots::create(open(&other), open(&f.pool), PoolOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("already the snapshot pool of"),
        "{err}"
    );
    assert_eq!(pool_bytes(&f.pool), before);
    // The pool beside the source names it.
    assert_eq!(f.pool, f.dir.path().join("source.img.snap"));
    assert_eq!(
        snapshot::pool_source(open(&f.pool).as_ref()).unwrap(),
        (open(&f.source).name().to_string(), 64 * C)
    );

    // A pool too small, and chunk sizes out of range.
    let small = f.dir.path().join("small.snap");
    lun::FileLun::create(&small, 64 * 1024).unwrap();
    let small_before = pool_bytes(&small);
    let err = Snapshots::create(open(&f.source), open(&small), PoolOptions::default()).unwrap_err();
    assert!(matches!(err, SnapError::PoolTooSmall { .. }), "{err}");
    for chunk_size in [256, 3 * 4096, 2 << 20] {
        let err = Snapshots::create(open(&f.source), open(&small), PoolOptions { chunk_size })
            .unwrap_err();
        assert!(matches!(err, SnapError::BadChunkSize { .. }), "{err}");
    }
    assert_eq!(pool_bytes(&small), small_before);
    // Not a pool at all.
    let err = Snapshots::open(open(&f.source), open(&small)).unwrap_err();
    assert!(err.to_string().contains("bad magic"), "{err}");
}

#[test]
fn fsck_names_a_damaged_entry_and_a_damaged_header_copy_falls_back_to_the_other() {
    let f = files(64 * C, 1 << 20);
    let snaps = Snapshots::create(
        open(&f.source),
        open(&f.pool),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    snaps.create_session("a", false).unwrap();
    snaps.source().write_at(&chunk_of(5), 0).unwrap();
    drop(snaps);
    let pool = open(&f.pool);
    // The newest header copy is damaged: the previous one (before session "a") is used.
    let report = snapshot::fsck(pool.as_ref()).unwrap();
    assert_eq!(report.sessions, 1);
    assert_eq!(report.used_slots, 1);
    let mut sector = vec![0u8; 512];
    pool.read_at(&mut sector, 0).unwrap();
    sector[100] ^= 0xff;
    pool.write_at(&sector, 0).unwrap();
    let report = snapshot::fsck(pool.as_ref()).unwrap();
    assert!(report.is_clean());
    assert_eq!(report.sessions, 0);
    // A damaged table entry is named.
    let mut table = vec![0u8; 512];
    pool.read_at(&mut table, 64 * 1024).unwrap();
    table[3] ^= 0x01;
    pool.write_at(&table, 64 * 1024).unwrap();
    let report = snapshot::fsck(pool.as_ref()).unwrap();
    assert_eq!(
        report.problems,
        vec!["slot 0: checksum mismatch".to_string()]
    );
    let err = Snapshots::open(open(&f.source), open(&f.pool)).unwrap_err();
    assert!(
        err.to_string().contains("slot 0: checksum mismatch"),
        "{err}"
    );
}

/// A copy whose data no longer matches its entry, though the header vouches that it was
/// complete, is damage, and fsck names it (an unvouched one is a copy a crash cut short).
#[test]
fn fsck_names_a_damaged_copy_that_the_header_vouches_for() {
    let f = files(64 * C, 1 << 20);
    {
        let snaps = Snapshots::create(
            open(&f.source),
            open(&f.pool),
            PoolOptions { chunk_size: CHUNK },
        )
        .unwrap();
        snaps.source().write_at(&chunk_of(0x5a), 3 * C).unwrap();
        snaps.create_session("a", false).unwrap();
        snaps.source().write_at(&chunk_of(6), 3 * C).unwrap();
        snaps.create_session("b", false).unwrap();
    }
    assert!(snapshot::fsck(open(&f.pool).as_ref()).unwrap().is_clean());
    let bytes = pool_bytes(&f.pool);
    let at = (0..bytes.len() / C as usize)
        .map(|i| i * C as usize)
        .find(|&i| bytes[i..i + C as usize] == chunk_of(0x5a)[..])
        .unwrap();
    let pool = open(&f.pool);
    let mut sector = vec![0u8; 512];
    pool.read_at(&mut sector, at as u64).unwrap();
    sector[7] ^= 0x10;
    pool.write_at(&sector, at as u64).unwrap();
    let report = snapshot::fsck(pool.as_ref()).unwrap();
    assert_eq!(
        report.problems,
        vec!["slot 0: chunk 3's copy does not match its checksum".to_string()]
    );
}

/// Counts flushes that reach a LUN.
#[derive(Debug)]
struct CountFlushes {
    inner: Arc<dyn Lun>,
    flushes: std::sync::atomic::AtomicU64,
}

impl Lun for CountFlushes {
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
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.flush()
    }
}

#[test]
fn a_sequential_writer_pays_the_pool_flushes_once_per_run_not_per_chunk() {
    let f = files(64 * C, 4 << 20);
    let pool = Arc::new(CountFlushes {
        inner: open(&f.pool),
        flushes: Default::default(),
    });
    let snaps = Snapshots::create(
        open(&f.source),
        pool.clone(),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    let source = snaps.source();
    source.write_at(&vec![1u8; (64 * C) as usize], 0).unwrap();
    snaps.create_session("s", false).unwrap();
    let before = pool.flushes.load(std::sync::atomic::Ordering::SeqCst);
    for c in 0..64 {
        source.write_at(&chunk_of(2), c * C).unwrap();
    }
    let flushes = pool.flushes.load(std::sync::atomic::Ordering::SeqCst) - before;
    // Runs of 1, 2, 4, ... 32 chunks and the last one: one flush each, not 64.
    assert!(
        flushes <= 7,
        "{flushes} pool flushes for 64 sequential chunks"
    );
    assert_eq!(
        read_all(snaps.session("s").unwrap().as_ref()),
        vec![1u8; (64 * C) as usize]
    );
    assert_eq!(snaps.usage().used, 64);
}

/// Copy-on-first-write of a chunk costs one pool flush (entry and data sealed together),
/// however scattered the writes, and each session still reads its point in time.
#[test]
fn a_first_write_to_a_scattered_chunk_costs_one_pool_flush() {
    let f = files(64 * C, 4 << 20);
    let pool = Arc::new(CountFlushes {
        inner: open(&f.pool),
        flushes: Default::default(),
    });
    let snaps = Snapshots::create(
        open(&f.source),
        pool.clone(),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    let source = snaps.source();
    source.write_at(&vec![1u8; (64 * C) as usize], 0).unwrap();
    snaps.create_session("s", false).unwrap();
    for c in [40, 7, 23, 61, 2] {
        let before = pool.flushes.load(std::sync::atomic::Ordering::SeqCst);
        source.write_at(&vec![2u8; 512], c * C + 512).unwrap();
        let flushes = pool.flushes.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert_eq!(flushes, 1, "pool flushes for the first write to chunk {c}");
    }
    assert_eq!(
        read_all(snaps.session("s").unwrap().as_ref()),
        vec![1u8; (64 * C) as usize]
    );
    drop(snaps);
    assert!(snapshot::fsck(open(&f.pool).as_ref()).unwrap().is_clean());
}

/// A queue of 32 writes submitted together (io_uring at QD32) to chunks never written
/// since the session: all their copies share one pool flush, the session reads its point in
/// time and the source the new bytes.
#[test]
fn a_batch_of_first_writes_shares_one_pool_flush() {
    let f = files(64 * C, 4 << 20);
    let pool = Arc::new(CountFlushes {
        inner: open(&f.pool),
        flushes: Default::default(),
    });
    let snaps = Snapshots::create(
        open(&f.source),
        pool.clone(),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    let source = snaps.source();
    let old = vec![1u8; (64 * C) as usize];
    source.write_at(&old, 0).unwrap();
    snaps.create_session("s", false).unwrap();
    let data = vec![2u8; 512];
    // Every other chunk, in a scattered order, one of them written twice.
    let mut offsets: Vec<u64> = (0..31).map(|i| (i * 17 % 32) * 2 * C + 1024).collect();
    offsets.push(offsets[3] + 512);
    let mut batch: Vec<lun::IoRequest<'_>> = offsets
        .iter()
        .map(|&offset| lun::IoRequest::Write { buf: &data, offset })
        .collect();
    let before = pool.flushes.load(std::sync::atomic::Ordering::SeqCst);
    source.submit(&mut batch).unwrap();
    let flushes = pool.flushes.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(flushes, 1, "pool flushes for a batch of 32 first writes");
    assert!(read_all(snaps.session("s").unwrap().as_ref()) == old);
    let mut now = old.clone();
    for &o in &offsets {
        now[o as usize..o as usize + 512].copy_from_slice(&data);
    }
    assert!(read_all(source.as_ref()) == now);
    assert_eq!(snaps.usage().used, 31);
    drop(snaps);
    assert!(snapshot::fsck(open(&f.pool).as_ref()).unwrap().is_clean());
}

/// Counts reads of exactly `len` bytes (a pool chunk, when no other read has that size).
#[derive(Debug)]
struct CountReads {
    inner: Arc<dyn Lun>,
    len: usize,
    reads: std::sync::atomic::AtomicU64,
}

impl Lun for CountReads {
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
        if buf.len() == self.len {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        self.inner.flush()
    }
}

/// Opening a pool checks the data of only the copies made since its header was last
/// written (the header vouches for the ones before), so open time does not grow with the
/// pool's contents.
#[test]
fn open_reads_back_only_the_copies_made_since_the_last_header_write() {
    let chunk = 8192u64;
    let f = files(64 * chunk, 4 << 20);
    let old = vec![1u8; (64 * chunk) as usize];
    {
        let snaps = Snapshots::create(
            open(&f.source),
            open(&f.pool),
            PoolOptions {
                chunk_size: chunk as u32,
            },
        )
        .unwrap();
        let source = snaps.source();
        source.write_at(&old, 0).unwrap();
        snaps.create_session("a", false).unwrap();
        for c in (0..32).step_by(2) {
            source.write_at(&[2u8; 512], c * chunk).unwrap();
        }
        // Vouches for the 16 copies above.
        snaps.create_session("b", false).unwrap();
        for c in [41, 45, 49, 53] {
            source.write_at(&[3u8; 512], c * chunk).unwrap();
        }
    }
    let pool = Arc::new(CountReads {
        inner: open(&f.pool),
        len: chunk as usize,
        reads: Default::default(),
    });
    let snaps = Snapshots::open(open(&f.source), pool.clone()).unwrap();
    assert_eq!(
        pool.reads.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "pool chunks read on open"
    );
    assert!(read_all(snaps.session("a").unwrap().as_ref()) == old);
}

thread_local! {
    static SLOW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A source whose reads, on a thread marked slow, announce the chunk they are about to
/// read and then wait: the window in which a concurrent write copies and overwrites it.
#[derive(Debug)]
struct SlowReads {
    inner: Arc<dyn Lun>,
    reading: Arc<std::sync::atomic::AtomicU64>,
}

impl Lun for SlowReads {
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
        if SLOW.with(|s| s.get()) {
            self.reading
                .store(offset / C + 1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        self.inner.flush()
    }
}

/// A session read racing a source write to the chunk it is reading returns the point in
/// time, never the new bytes: the read looks up the chunk's copy again after reading the
/// source, and rereads from the pool when the write copied it meanwhile.
#[test]
fn a_session_read_racing_a_write_to_its_chunk_sees_only_the_point_in_time() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const N: u64 = 16;
    let f = files(N * C, 4 << 20);
    let reading = Arc::new(AtomicU64::new(0));
    let source = Arc::new(SlowReads {
        inner: open(&f.source),
        reading: reading.clone(),
    });
    let snaps = Arc::new(
        Snapshots::create(source, open(&f.pool), PoolOptions { chunk_size: CHUNK }).unwrap(),
    );
    snaps
        .source()
        .write_at(&vec![1u8; (N * C) as usize], 0)
        .unwrap();
    snaps.create_session("s", false).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (source, reading, done) = (snaps.source(), reading.clone(), done.clone());
        std::thread::spawn(move || {
            let mut written = vec![false; N as usize];
            let mut hits = 0;
            while !done.load(Ordering::SeqCst) {
                let r = reading.load(Ordering::SeqCst);
                if r > 0 && !written[(r - 1) as usize] {
                    written[(r - 1) as usize] = true;
                    source.write_at(&chunk_of(2), (r - 1) * C).unwrap();
                    hits += 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            hits
        })
    };
    let session = snaps.session("s").unwrap();
    let mut buf = vec![0u8; (N * C) as usize];
    SLOW.with(|s| s.set(true));
    session.read_at(&mut buf, 0).unwrap();
    SLOW.with(|s| s.set(false));
    done.store(true, Ordering::SeqCst);
    let hits = writer.join().unwrap();
    assert!(hits > 0, "the writer never raced the reader");
    assert!(
        buf.iter().all(|&b| b == 1),
        "a session read saw a later write"
    );
}

#[test]
fn copies_made_ahead_of_a_sequential_writer_are_taken_back_before_a_session_is_invalidated() {
    // 6 data slots, as in the pool-full test.
    let f = files(64 * C, 64 * 1024 + 40 * 1024 + 6 * C);
    let snaps = Snapshots::create(
        open(&f.source),
        open(&f.pool),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    let source = snaps.source();
    source.write_at(&vec![1u8; (64 * C) as usize], 0).unwrap();
    snaps.create_session("s", false).unwrap();
    // A sequential run: chunks 0, 1 and 3 written, the copies run ahead and fill the pool.
    for c in [0, 1, 3] {
        source.write_at(&chunk_of(2), c * C).unwrap();
    }
    assert_eq!(snaps.usage().used, 6);
    // Elsewhere: the copies nobody wrote over are taken back, the session stays whole.
    source.write_at(&chunk_of(3), 20 * C).unwrap();
    assert_eq!(snaps.list()[0].state, SessionState::Valid);
    assert_eq!(
        read_all(snaps.session("s").unwrap().as_ref()),
        vec![1u8; (64 * C) as usize]
    );
    drop(snaps);
    let report = snapshot::fsck(open(&f.pool).as_ref()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let snaps = Snapshots::open(open(&f.source), open(&f.pool)).unwrap();
    assert_eq!(
        read_all(snaps.session("s").unwrap().as_ref()),
        vec![1u8; (64 * C) as usize]
    );
}

#[test]
fn zeroing_the_source_keeps_the_sessions_point_and_leaves_the_source_thin() {
    use std::os::unix::fs::MetadataExt;
    let f = files(1024 * C, 4 << 20);
    let snaps = Snapshots::create(
        open(&f.source),
        open(&f.pool),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    let source = snaps.source();
    let data: Vec<u8> = (0..256 * C).map(|i| (i % 253) as u8 + 1).collect();
    source.write_at(&data, 0).unwrap();
    source.flush().unwrap();
    snaps.create_session("before", false).unwrap();
    source.write_zeroes(0, 256 * C).unwrap();
    source.flush().unwrap();
    let mut back = vec![1u8; 256 * C as usize];
    source.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0), "the source reads zeroes");
    let session = snaps.session("before").unwrap();
    session.read_at(&mut back, 0).unwrap();
    assert_eq!(back, data, "the session keeps its point");
    let allocated = std::fs::metadata(&f.source).unwrap().blocks() * 512;
    assert!(
        allocated < 64 * 1024,
        "{allocated} bytes still allocated in the source"
    );
}
