//! Power cuts at every write of a workload, on the source and the pool at once (a shared
//! power supply), with torn writes and lost volatile caches: after reopening, every
//! surviving session reads exactly what the source held at its point in time (plus, for a
//! writable session, its flushed writes), the source reads its last flushed state, and the
//! pool passes fsck.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use lun::Lun;
use lun::fault::CrashMode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use snapshot::{PoolOptions, SessionState, Snapshots};

use common::{Machine, S, files, open, read_all, same_outside};

const SOURCE: u64 = 64 * 1024;
const POOL: u64 = 512 * 1024;
const CHUNK: u32 = 4096;

/// What must hold after the crash, recorded as the workload runs.
#[derive(Default)]
struct Expect {
    /// The source's contents at its last flush that returned before the power cut.
    flushed: Vec<u8>,
    /// Also acceptable: the contents flushed by a session creation the cut interrupted
    /// after its source flush.
    maybe_flushed: Option<Vec<u8>>,
    /// Every session ever asked for, with its point in time.
    sessions: BTreeMap<String, Vec<u8>>,
    /// Sessions whose creation returned before the cut: they must survive, unless deleted.
    created: Vec<String>,
    /// Sessions whose deletion was asked for: they may survive (the cut came first).
    deleted: Vec<String>,
    /// A writable session's write not known to be flushed: (offset, old, new) bytes;
    /// each of its sectors may hold either.
    pending: BTreeMap<String, (usize, Vec<u8>, Vec<u8>)>,
}

/// A fixed workload: source writes, flushes, sessions taken and deleted.
fn workload(snaps: &Snapshots, machine: &Machine, expect: &mut Expect, small_pool: bool) {
    let mut rng = StdRng::seed_from_u64(7);
    let source = snaps.source();
    let mut current = expect.flushed.clone();
    let mut live: Vec<String> = Vec::new();
    let mut writable: Vec<String> = Vec::new();
    for step in 0..40 {
        match rng.random_range(0..10) {
            0..5 => {
                let len = rng.random_range(1..=12u64) * S;
                let offset = rng.random_range(0..(SOURCE - len) / S) * S;
                let fill = rng.random::<u8>();
                let data = vec![fill; len as usize];
                source.write_at(&data, offset).unwrap();
                current[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            5 => {
                // A queue of writes submitted together, one in each quarter of the source
                // so they never overlap: their copies share a pool flush.
                let quarter = SOURCE / 4;
                let mut writes = Vec::new();
                for q in 0..4 {
                    let len = rng.random_range(1..=12u64) * S;
                    let offset = q * quarter + rng.random_range(0..(quarter - len) / S) * S;
                    writes.push((offset, vec![rng.random::<u8>(); len as usize]));
                }
                let mut batch: Vec<lun::IoRequest<'_>> = writes
                    .iter()
                    .map(|(offset, buf)| lun::IoRequest::Write {
                        buf,
                        offset: *offset,
                    })
                    .collect();
                source.submit(&mut batch).unwrap();
                for (offset, data) in &writes {
                    current[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                }
            }
            6..8 => {
                let name = format!("s{step}");
                expect.sessions.insert(name.clone(), current.clone());
                let before = machine.crashed();
                // A writable session's write may fail on a full pool: only with room.
                let rw = step % 2 == 1 && !small_pool;
                snaps.create_session(&name, rw).unwrap();
                if rw {
                    writable.push(name.clone());
                }
                if !before && machine.crashed() {
                    expect.maybe_flushed = Some(current.clone());
                }
                // Taking a session flushes the source.
                if !machine.crashed() {
                    expect.flushed = current.clone();
                    expect.created.push(name.clone());
                }
                live.push(name);
            }
            8 if live.len() > 1 => {
                let name = live.remove(0);
                expect.deleted.push(name.clone());
                writable.retain(|w| *w != name);
                snaps.delete_session(&name).unwrap();
            }
            9 if !writable.is_empty() => {
                // A write to a writable session, then its flush.
                let name = writable[rng.random_range(0..writable.len())].clone();
                let len = rng.random_range(1..=12u64) * S;
                let offset = (rng.random_range(0..(SOURCE - len) / S) * S) as usize;
                let new = vec![rng.random::<u8>(); len as usize];
                let image = expect.sessions.get_mut(&name).unwrap();
                let old = image[offset..offset + new.len()].to_vec();
                // After the cut nothing lands: the write caught by it stays the pending one.
                if !machine.crashed() {
                    expect
                        .pending
                        .insert(name.clone(), (offset, old, new.clone()));
                }
                let lun = snaps.session(&name).unwrap();
                lun.write_at(&new, offset as u64).unwrap();
                lun.flush().unwrap();
                if !machine.crashed() {
                    image[offset..offset + new.len()].copy_from_slice(&new);
                    expect.pending.remove(&name);
                }
            }
            _ => {}
        }
        if rng.random_bool(0.3) {
            source.flush().unwrap();
            if !machine.crashed() {
                expect.flushed = current.clone();
            }
        }
    }
}

/// Runs the workload on fresh files with the power cut after `cut` writes (never when
/// `None`); returns the total writes and checks the state after reopening.
/// A pool with 8 data slots: sessions get invalidated as the workload runs.
const SMALL_POOL: u64 = 64 * 1024 + 40 * 1024 + 8 * CHUNK as u64;

/// Returns the writes the workload issued and how many sessions were invalid after it.
fn run(cut: Option<u64>, mode: CrashMode, tear: bool, small_pool: bool) -> (u64, usize) {
    let f = files(SOURCE, if small_pool { SMALL_POOL } else { POOL });
    // The source starts with known bytes, flushed.
    let mut initial = vec![0u8; SOURCE as usize];
    StdRng::seed_from_u64(1).fill(&mut initial[..]);
    open(&f.source).write_at(&initial, 0).unwrap();
    Snapshots::create(
        open(&f.source),
        open(&f.pool),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();

    let machine = Machine::new(tear);
    let source = machine.lun(&f.source, mode);
    let pool = machine.lun(&f.pool, mode);
    let mut expect = Expect {
        flushed: initial,
        ..Expect::default()
    };
    {
        let snaps = Snapshots::open(source, pool).unwrap();
        if let Some(n) = cut {
            machine.crash_after(n);
        }
        workload(&snaps, &machine, &mut expect, small_pool);
    }
    let writes = machine.writes();

    // Power back: the bare files, no fault layer.
    let context = format!("cut after {cut:?} writes, {mode:?}, tear {tear}");
    let report = snapshot::fsck(open(&f.pool).as_ref()).unwrap();
    assert!(report.is_clean(), "{context}: {:?}", report.problems);
    let snaps = Snapshots::open(open(&f.source), open(&f.pool))
        .unwrap_or_else(|e| panic!("{context}: {e}"));
    let listed = snaps.list();
    let mut invalid = 0;
    for name in &expect.created {
        assert!(
            expect.deleted.contains(name) || listed.iter().any(|s| &s.name == name),
            "{context}: session {name} lost"
        );
    }
    for s in &listed {
        if small_pool && s.state == SessionState::Invalid {
            invalid += 1;
            continue;
        }
        assert_eq!(s.state, SessionState::Valid, "{context}: {}", s.name);
        let data = read_all(snaps.session(&s.name).unwrap().as_ref());
        let mut image = expect.sessions[&s.name].clone();
        if let Some((offset, old, new)) = expect.pending.get(&s.name) {
            // Sector by sector, the unacknowledged write may or may not have landed.
            for i in (0..new.len()).step_by(S as usize) {
                let at = offset + i;
                let sector = &data[at..at + S as usize];
                if sector == &new[i..i + S as usize] || sector == &old[i..i + S as usize] {
                    image[at..at + S as usize].copy_from_slice(sector);
                }
            }
        }
        assert!(
            data == image,
            "{context}: session {} does not read its point in time and flushed writes",
            s.name
        );
    }
    if mode == CrashMode::DropUnflushed {
        let torn = machine.torn_range(open(&f.source).name());
        let now = read_all(snaps.source().as_ref());
        let maybe = expect.maybe_flushed.as_ref();
        assert!(
            same_outside(&now, &expect.flushed, torn.clone())
                || maybe.is_some_and(|m| same_outside(&now, m, torn)),
            "{context}: source is not its last flushed state"
        );
    }
    (writes, invalid)
}

fn every_cut(mode: CrashMode, tear: bool, small_pool: bool) {
    let (total, invalid) = run(None, mode, tear, small_pool);
    assert!(
        total > 20,
        "the workload writes too little to test ({total})"
    );
    if small_pool {
        assert!(invalid > 0, "the small pool never filled");
    }
    for cut in 0..total {
        run(Some(cut), mode, tear, small_pool);
    }
}

#[test]
fn a_power_cut_at_every_write_keeps_sessions_exact() {
    every_cut(CrashMode::DropLater, false, false);
}

#[test]
fn torn_writes_and_lost_caches_keep_sessions_exact_and_the_source_flushed() {
    every_cut(CrashMode::DropUnflushed, true, false);
}

/// The same with a pool that fills: sessions are invalidated and copies taken back as the
/// workload runs, and every session still listed as valid after the cut reads exactly.
#[test]
fn a_power_cut_while_a_full_pool_invalidates_sessions_keeps_the_valid_ones_exact() {
    every_cut(CrashMode::DropUnflushed, true, true);
}

/// A rollback cut by a power failure at every write resumes on the next open and ends
/// with the source at the session's point in time, keeping a write flushed during it.
#[test]
fn a_rollback_cut_at_every_write_resumes_on_open() {
    let total = rollback_run(None);
    for cut in 0..total {
        rollback_run(Some(cut));
    }
}

fn rollback_run(cut: Option<u64>) -> u64 {
    let f = files(SOURCE, POOL);
    let old = vec![0x11u8; SOURCE as usize];
    let new = vec![0x22u8; SOURCE as usize];
    {
        let snaps = Snapshots::create(
            open(&f.source),
            open(&f.pool),
            PoolOptions { chunk_size: CHUNK },
        )
        .unwrap();
        snaps.source().write_at(&old, 0).unwrap();
        snaps.create_session("gold", false).unwrap();
        snaps.create_session("other", false).unwrap();
        snaps.source().write_at(&new, 0).unwrap();
        snaps.source().flush().unwrap();
    }
    let machine = Machine::new(true);
    let source = machine.lun(&f.source, CrashMode::DropUnflushed);
    let pool = machine.lun(&f.pool, CrashMode::DropUnflushed);
    let late_write = vec![0x33u8; 4096];
    let late_at = SOURCE - 8192;
    let (started, late_flushed) = {
        let snaps = Snapshots::open(source, pool).unwrap();
        if let Some(n) = cut {
            machine.crash_after(n);
        }
        snaps.start_rollback("gold").unwrap();
        let started = !machine.crashed();
        snaps.rollback_step(3).unwrap();
        // A write to a chunk not yet restored.
        snaps.source().write_at(&late_write, late_at).unwrap();
        snaps.source().flush().unwrap();
        let late_flushed = !machine.crashed();
        while snaps.rollback_step(3).unwrap().is_some() {}
        (started, late_flushed)
    };
    let writes = machine.writes();
    let context = format!("cut after {cut:?} writes");
    let report = snapshot::fsck(open(&f.pool).as_ref()).unwrap();
    assert!(report.is_clean(), "{context}: {:?}", report.problems);
    let snaps = Snapshots::open(open(&f.source), open(&f.pool)).unwrap();
    snaps.wait_rollback().unwrap();
    let mut expected = old.clone();
    if late_flushed {
        expected[late_at as usize..late_at as usize + 4096].copy_from_slice(&late_write);
    }
    let now = read_all(snaps.source().as_ref());
    let torn = machine.torn_range(open(&f.source).name());
    if started {
        assert!(
            same_outside(&now, &expected, torn),
            "{context}: source is not the session's point in time"
        );
    } else {
        assert!(
            same_outside(&now, &expected, torn.clone()) || same_outside(&now, &new, torn),
            "{context}: source is neither before nor after"
        );
    }
    assert!(
        read_all(snaps.session("gold").unwrap().as_ref()) == old,
        "{context}: gold"
    );
    assert!(
        read_all(snaps.session("other").unwrap().as_ref()) == old,
        "{context}: other"
    );
    let _: Arc<dyn Lun> = snaps.source();
    writes
}

/// A copy's entry and data share one pool flush, entry first: a power cut that lands the
/// entry and tears the data (on a disk without a volatile cache, or one that reorders
/// within a flush) leaves an entry that names bytes the slot does not hold. The source
/// write it protected was never issued, so on open the copy is discarded, the session
/// reads the source, and the next write to the chunk copies it again.
#[test]
fn a_cut_between_a_copys_entry_and_its_data_discards_the_copy_on_open() {
    let f = files(SOURCE, POOL);
    let old: Vec<u8> = (0..SOURCE).map(|i| (i / 7) as u8).collect();
    {
        let snaps = Snapshots::create(
            open(&f.source),
            open(&f.pool),
            PoolOptions { chunk_size: CHUNK },
        )
        .unwrap();
        snaps.source().write_at(&old, 0).unwrap();
        snaps.create_session("s", false).unwrap();
    }
    let machine = Machine::new(true);
    let source = machine.lun(&f.source, CrashMode::DropLater);
    let pool = machine.lun(&f.pool, CrashMode::DropLater);
    let at = 5 * u64::from(CHUNK);
    {
        let snaps = Snapshots::open(source, pool).unwrap();
        // The entry's sector lands; the chunk's data is cut halfway.
        machine.crash_after(1);
        let _ = snaps.source().write_at(&[0xeeu8; 512], at);
        assert!(machine.crashed());
        assert_eq!(
            machine.torn_range(open(&f.pool).name()).map(|r| r.len()),
            Some(CHUNK as usize),
            "the cut did not catch the chunk's data"
        );
    }
    let report = snapshot::fsck(open(&f.pool).as_ref()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.unfinished_copies, 1);
    let snaps = Snapshots::open(open(&f.source), open(&f.pool)).unwrap();
    assert!(
        read_all(snaps.source().as_ref()) == old,
        "the source changed"
    );
    assert!(
        read_all(snaps.session("s").unwrap().as_ref()) == old,
        "the session reads the torn copy"
    );
    // A header written now vouches for every copy so far: the discarded one must be gone
    // from the table by then, or the next open would trust it.
    snaps.create_session("t", false).unwrap();
    drop(snaps);
    let report = snapshot::fsck(open(&f.pool).as_ref()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.unfinished_copies, 0);
    let snaps = Snapshots::open(open(&f.source), open(&f.pool)).unwrap();
    assert!(
        read_all(snaps.session("s").unwrap().as_ref()) == old,
        "the session reads the torn copy after another open"
    );
    snaps.source().write_at(&[0xeeu8; 512], at).unwrap();
    assert!(
        read_all(snaps.session("s").unwrap().as_ref()) == old,
        "the chunk was not copied again"
    );
    drop(snaps);
    let report = snapshot::fsck(open(&f.pool).as_ref()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}
