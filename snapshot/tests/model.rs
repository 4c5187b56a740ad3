//! Random source writes, sessions taken and deleted, writes to writable sessions,
//! rollbacks (with writes while they run), a clone fractured, written, synced and
//! reverse-synced (with writes while it runs), and reopens, checked byte for byte against
//! an in-memory model after every step.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use lun::Lun;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use snapshot::{PoolOptions, SessionState, Snapshots};

use common::{S, files, open, read_all};

const SOURCE: u64 = 256 * 1024;
const CHUNK: u32 = 4096;

struct Model {
    source: Vec<u8>,
    sessions: BTreeMap<String, Vec<u8>>,
    /// The clone's contents once fractured; `None` while it follows the source.
    clone: Option<Vec<u8>>,
}

fn random_write(rng: &mut StdRng, size: u64) -> (u64, Vec<u8>) {
    let sectors = size / S;
    let len = rng.random_range(1..=24u64).min(sectors);
    let start = rng.random_range(0..=sectors - len);
    let mut data = vec![0u8; (len * S) as usize];
    rng.fill(&mut data[..]);
    (start * S, data)
}

fn check(snaps: &Snapshots, model: &Model, step: usize) {
    let clone = read_all(snaps.clone_view("c").unwrap().as_ref());
    assert!(
        clone == *model.clone.as_ref().unwrap_or(&model.source),
        "clone after step {step}"
    );
    assert_eq!(
        read_all(snaps.source().as_ref()),
        model.source,
        "source after step {step}"
    );
    let listed: Vec<String> = snaps.list().into_iter().map(|s| s.name).collect();
    let expected: Vec<&String> = model.sessions.keys().collect();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(
        listed_sorted.iter().collect::<Vec<_>>(),
        expected,
        "sessions after step {step}"
    );
    for (name, data) in &model.sessions {
        let lun = snaps.session(name).unwrap();
        assert!(
            read_all(lun.as_ref()) == *data,
            "session {name} after step {step}"
        );
    }
    assert!(snaps.list().iter().all(|s| s.state == SessionState::Valid));
}

/// Runs `steps` random operations; returns how many syncs and reverse syncs ran.
fn run(seed: u64, steps: usize) -> (usize, usize) {
    let (mut syncs, mut reverse_syncs) = (0, 0);
    let f = files(SOURCE, 8 << 20);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model {
        source: vec![0u8; SOURCE as usize],
        sessions: BTreeMap::new(),
        clone: None,
    };
    let mut snaps = Snapshots::create(
        open(&f.source),
        open(&f.pool),
        PoolOptions { chunk_size: CHUNK },
    )
    .unwrap();
    let clone_path = f.dir.path().join("clone.img");
    lun::FileLun::create(&clone_path, SOURCE).unwrap();
    snaps.add_clone("c", open(&clone_path)).unwrap();
    snaps.run_sync("c").unwrap();
    let mut writable = BTreeMap::new();
    let mut counter = 0;
    for step in 0..steps {
        match rng.random_range(0..100) {
            0..45 => {
                let (offset, data) = random_write(&mut rng, SOURCE);
                snaps.source().write_at(&data, offset).unwrap();
                model.source[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            }
            45..57 if model.sessions.len() < 8 => {
                counter += 1;
                let name = format!("s{counter}");
                let w = rng.random_bool(0.5);
                snaps.create_session(&name, w).unwrap();
                model.sessions.insert(name.clone(), model.source.clone());
                writable.insert(name, w);
            }
            57..65 if !model.sessions.is_empty() => {
                let i = rng.random_range(0..model.sessions.len());
                let name = model.sessions.keys().nth(i).unwrap().clone();
                snaps.delete_session(&name).unwrap();
                model.sessions.remove(&name);
            }
            65..80 if !model.sessions.is_empty() => {
                let i = rng.random_range(0..model.sessions.len());
                let name = model.sessions.keys().nth(i).unwrap().clone();
                let (offset, data) = random_write(&mut rng, SOURCE);
                let lun = snaps.session(&name).unwrap();
                let outcome = lun.write_at(&data, offset);
                if writable[&name] {
                    outcome.unwrap();
                    let image = model.sessions.get_mut(&name).unwrap();
                    image[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                } else {
                    assert!(matches!(outcome, Err(lun::LunError::ReadOnly { .. })));
                }
            }
            80..88 if !model.sessions.is_empty() => {
                let i = rng.random_range(0..model.sessions.len());
                let name = model.sessions.keys().nth(i).unwrap().clone();
                snaps.start_rollback(&name).unwrap();
                model.source = model.sessions[&name].clone();
                if writable[&name] {
                    // The session being restored from holds still until the end.
                    let err = snaps.session(&name).unwrap().write_at(&[0u8; 512], 0);
                    assert!(err.unwrap_err().to_string().contains("rollback"));
                }
                // Writes and reads while the copy back runs.
                while snaps
                    .rollback_step(rng.random_range(1..20))
                    .unwrap()
                    .is_some()
                {
                    if rng.random_bool(0.5) {
                        let (offset, data) = random_write(&mut rng, SOURCE);
                        snaps.source().write_at(&data, offset).unwrap();
                        model.source[offset as usize..offset as usize + data.len()]
                            .copy_from_slice(&data);
                    }
                    assert_eq!(read_all(snaps.source().as_ref()), model.source);
                }
            }
            88..94 => {
                snaps.source().flush().unwrap();
                drop(snaps);
                snaps = Snapshots::open(open(&f.source), open(&f.pool)).unwrap();
                snaps.attach_clone("c", open(&clone_path)).unwrap();
            }
            94..100 => match model.clone.take() {
                None => {
                    snaps.fracture("c").unwrap();
                    model.clone = Some(model.source.clone());
                }
                Some(mut image) => match rng.random_range(0..4) {
                    0 | 1 => {
                        let (offset, data) = random_write(&mut rng, SOURCE);
                        let view = snaps.clone_view("c").unwrap();
                        view.write_at(&data, offset).unwrap();
                        image[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                        model.clone = Some(image);
                    }
                    2 => {
                        snaps.sync("c").unwrap();
                        snaps.run_sync("c").unwrap();
                        syncs += 1;
                    }
                    _ => {
                        snaps.reverse_sync("c").unwrap();
                        reverse_syncs += 1;
                        model.source = image;
                        // The source reads the clone at once; writes go to both meanwhile.
                        while snaps
                            .sync_step("c", rng.random_range(1..8))
                            .unwrap()
                            .is_some()
                        {
                            assert_eq!(read_all(snaps.source().as_ref()), model.source);
                            let (offset, data) = random_write(&mut rng, SOURCE);
                            snaps.source().write_at(&data, offset).unwrap();
                            model.source[offset as usize..offset as usize + data.len()]
                                .copy_from_slice(&data);
                        }
                    }
                },
            },
            _ => {}
        }
        check(&snaps, &model, step);
        if step % 10 == 0 {
            let report = snapshot::fsck(open(&f.pool).as_ref()).unwrap();
            assert!(report.is_clean(), "{:?}", report.problems);
        }
    }
    // Deleting every session frees the whole pool.
    for name in model.sessions.keys() {
        snaps.delete_session(name).unwrap();
    }
    assert_eq!(snaps.usage().used, 0);
    (syncs, reverse_syncs)
}

#[test]
fn random_operations_match_the_model() {
    let (mut syncs, mut reverse_syncs) = (0, 0);
    for seed in 0..3 {
        let (s, r) = run(seed, 150);
        syncs += s;
        reverse_syncs += r;
    }
    assert!(
        syncs > 0 && reverse_syncs > 0,
        "{syncs} syncs, {reverse_syncs} reverse syncs"
    );
}

#[test]
fn a_background_rollback_leaves_the_source_usable_and_ends_at_the_session() {
    let f = files(SOURCE, 8 << 20);
    let snaps = Snapshots::create(open(&f.source), open(&f.pool), PoolOptions::default()).unwrap();
    let source = snaps.source();
    source.write_at(&vec![1u8; SOURCE as usize], 0).unwrap();
    snaps.create_session("before", false).unwrap();
    source.write_at(&vec![2u8; SOURCE as usize], 0).unwrap();
    snaps.rollback("before").unwrap();
    // Usable at once: what it reads is the session's point in time.
    let mut first = vec![0u8; 4096];
    source.read_at(&mut first, 0).unwrap();
    assert_eq!(first, vec![1u8; 4096]);
    snaps.wait_rollback().unwrap();
    assert!(snaps.rollback_progress().is_none());
    assert_eq!(read_all(source.as_ref()), vec![1u8; SOURCE as usize]);
    assert_eq!(
        read_all(open(&f.source).as_ref()),
        vec![1u8; SOURCE as usize]
    );
    let _: Arc<dyn Lun> = snaps.session("before").unwrap();
}
