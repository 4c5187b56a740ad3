//! Compare-and-write through the engine: what a datastore's lock records need from a LUN
//! with snapshots. Threads racing on one sector each win exactly the rounds they claim, and
//! the session keeps the sector as it was.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::thread;

use lun::{CompareAndWrite, Lun};
use snapshot::{PoolOptions, Snapshots};

const S: usize = 512;

fn round_of(sector: &[u8]) -> u64 {
    u64::from_le_bytes(sector[..8].try_into().unwrap())
}

fn sector_of(round: u64) -> Vec<u8> {
    let mut s = vec![0u8; S];
    s[..8].copy_from_slice(&round.to_le_bytes());
    s
}

#[test]
fn racing_test_and_sets_through_the_engine_win_each_round_once_and_the_session_keeps_its_point() {
    let f = common::files(4 << 20, 8 << 20);
    let snaps = Arc::new(
        Snapshots::create(
            common::open(&f.source),
            common::open(&f.pool),
            PoolOptions::default(),
        )
        .unwrap(),
    );
    let source = snaps.source();
    source.write_at(&sector_of(0), 0).unwrap();
    snaps.create_session("before", true).unwrap();
    assert!(source.supports_compare_and_write());

    let rounds = 400;
    let players: Vec<_> = (0..4)
        .map(|_| {
            let source = snaps.source();
            thread::spawn(move || {
                let mut won = Vec::new();
                let mut current = vec![0u8; S];
                source.read_at(&mut current, 0).unwrap();
                while round_of(&current) < rounds {
                    let next = sector_of(round_of(&current) + 1);
                    match source.compare_and_write(&current, &next, 0).unwrap() {
                        CompareAndWrite::Written => {
                            won.push(round_of(&next));
                            current = next;
                        }
                        CompareAndWrite::Miscompare(now) => current = now,
                    }
                }
                won
            })
        })
        .collect();
    let mut won: Vec<u64> = players
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    won.sort_unstable();
    assert_eq!(
        won,
        (1..=rounds).collect::<Vec<_>>(),
        "a round won twice or never"
    );

    let session = snaps.session("before").unwrap();
    let mut seen = vec![0u8; S];
    session.read_at(&mut seen, 0).unwrap();
    assert_eq!(round_of(&seen), 0, "the session moved with the source");
    // A writable session takes its own test-and-set; the source does not see it.
    assert_eq!(
        session
            .compare_and_write(&sector_of(0), &sector_of(7), 0)
            .unwrap(),
        CompareAndWrite::Written
    );
    let mut now = vec![0u8; S];
    source.read_at(&mut now, 0).unwrap();
    assert_eq!(round_of(&now), rounds);
    assert!(matches!(
        session.compare_and_write(&sector_of(0), &sector_of(8), 0).unwrap(),
        CompareAndWrite::Miscompare(cur) if round_of(&cur) == 7
    ));
}
