//! Model-based test: random sequences of aligned reads, writes, batches, zeroing, flushes
//! and compare-and-writes against an in-memory model, for every engine and cache mode.
#![allow(clippy::unwrap_used)]

use lun::{CompareAndWrite, FileLun, IoEngine, IoRequest, Lun, LunError, OpenOptions};
use proptest::prelude::*;

const SECTORS: u64 = 256;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        count: u64,
        seed: u8,
        odd_address: bool,
    },
    Read {
        sector: u64,
        count: u64,
        odd_address: bool,
    },
    Zero {
        sector: u64,
        count: u64,
    },
    /// Disjoint writes then reads of the same places, as one batch each.
    Batch {
        sectors: Vec<(u64, u64)>,
        seed: u8,
    },
    Cas {
        sector: u64,
        seed: u8,
        expect_current: bool,
    },
    Flush,
}

fn extent() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS).prop_flat_map(|sector| (Just(sector), 1..=(SECTORS - sector).min(40)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (extent(), any::<u8>(), any::<bool>()).prop_map(|((sector, count), seed, odd_address)| {
            Op::Write { sector, count, seed, odd_address }
        }),
        3 => (extent(), any::<bool>())
            .prop_map(|((sector, count), odd_address)| Op::Read { sector, count, odd_address }),
        1 => extent().prop_map(|(sector, count)| Op::Zero { sector, count }),
        2 => (prop::collection::vec(extent(), 1..12), any::<u8>())
            .prop_map(|(sectors, seed)| Op::Batch { sectors, seed }),
        1 => (0..SECTORS, any::<u8>(), any::<bool>())
            .prop_map(|(sector, seed, expect_current)| Op::Cas { sector, seed, expect_current }),
        1 => Just(Op::Flush),
    ]
}

fn fill(len: usize, seed: u8, salt: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(31) ^ (salt as u8) ^ (i >> 9) as u8)
        .collect()
}

/// `len` bytes at an address that O_DIRECT can use directly or, with `odd`, cannot.
fn buffer(len: usize, odd: bool) -> (Vec<u8>, usize) {
    let storage = vec![0u8; len + 4096 + 1];
    let aligned = storage.as_ptr().align_offset(4096);
    let start = aligned + usize::from(odd);
    (storage, start)
}

fn run(engine: IoEngine, direct: bool, sector_size: u32, ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let options = OpenOptions {
        engine,
        direct,
        sector_size: Some(sector_size),
        ..OpenOptions::default()
    };
    let size = SECTORS * u64::from(sector_size);
    let lun = match FileLun::create_with(&dir.path().join("lun"), size, &options) {
        Err(LunError::Open { reason, .. }) if reason.contains("io_uring") => {
            lun::prereq::require(false, &reason);
            return;
        }
        other => other.unwrap(),
    };
    let ss = sector_size as usize;
    let mut model = vec![0u8; size as usize];

    for (step, op) in ops.iter().enumerate() {
        let salt = step as u64;
        match op {
            Op::Write {
                sector,
                count,
                seed,
                odd_address,
            } => {
                let (at, len) = ((*sector as usize) * ss, (*count as usize) * ss);
                let data = fill(len, *seed, salt);
                let (mut storage, start) = buffer(len, *odd_address);
                storage[start..start + len].copy_from_slice(&data);
                lun.write_at(&storage[start..start + len], at as u64)
                    .unwrap();
                model[at..at + len].copy_from_slice(&data);
            }
            Op::Read {
                sector,
                count,
                odd_address,
            } => {
                let (at, len) = ((*sector as usize) * ss, (*count as usize) * ss);
                let (mut storage, start) = buffer(len, *odd_address);
                lun.read_at(&mut storage[start..start + len], at as u64)
                    .unwrap();
                assert!(
                    storage[start..start + len] == model[at..at + len],
                    "step {step}: {op:?}"
                );
            }
            Op::Zero { sector, count } => {
                let (at, len) = ((*sector as usize) * ss, (*count as usize) * ss);
                lun.write_zeroes(at as u64, len as u64).unwrap();
                model[at..at + len].fill(0);
            }
            Op::Batch { sectors, seed } => {
                // Keep only extents that do not overlap an earlier one: a batch's requests
                // are independent, so overlapping writes would have no defined outcome.
                let mut taken = vec![false; SECTORS as usize];
                let extents: Vec<(usize, usize)> = sectors
                    .iter()
                    .filter(|(s, c)| {
                        let range = *s as usize..(*s + *c) as usize;
                        let free = taken[range.clone()].iter().all(|t| !t);
                        if free {
                            taken[range].fill(true);
                        }
                        free
                    })
                    .map(|(s, c)| ((*s as usize) * ss, (*c as usize) * ss))
                    .collect();
                let data: Vec<Vec<u8>> = extents
                    .iter()
                    .enumerate()
                    .map(|(i, (_, len))| fill(*len, seed.wrapping_add(i as u8), salt))
                    .collect();
                let mut batch: Vec<IoRequest<'_>> = extents
                    .iter()
                    .zip(&data)
                    .map(|((at, _), buf)| IoRequest::Write {
                        buf,
                        offset: *at as u64,
                    })
                    .collect();
                lun.submit(&mut batch).unwrap();
                for ((at, len), buf) in extents.iter().zip(&data) {
                    model[*at..at + len].copy_from_slice(buf);
                }
                let mut back: Vec<Vec<u8>> = extents.iter().map(|(_, len)| vec![0; *len]).collect();
                let mut batch: Vec<IoRequest<'_>> = extents
                    .iter()
                    .zip(back.iter_mut())
                    .map(|((at, _), buf)| IoRequest::Read {
                        buf,
                        offset: *at as u64,
                    })
                    .collect();
                lun.submit(&mut batch).unwrap();
                for ((at, len), buf) in extents.iter().zip(&back) {
                    assert!(
                        buf[..] == model[*at..at + len],
                        "step {step}: batch read at {at}"
                    );
                }
            }
            Op::Cas {
                sector,
                seed,
                expect_current,
            } => {
                let at = (*sector as usize) * ss;
                let current = model[at..at + ss].to_vec();
                let expected = if *expect_current {
                    current.clone()
                } else {
                    let mut wrong = current.clone();
                    wrong[ss / 2] ^= 0x5A;
                    wrong
                };
                let new = fill(ss, *seed, salt);
                let outcome = lun.compare_and_write(&expected, &new, at as u64).unwrap();
                if *expect_current {
                    assert_eq!(outcome, CompareAndWrite::Written, "step {step}");
                    model[at..at + ss].copy_from_slice(&new);
                } else {
                    assert_eq!(outcome, CompareAndWrite::Miscompare(current), "step {step}");
                }
            }
            Op::Flush => lun.flush().unwrap(),
        }
    }
    let mut whole = vec![0u8; size as usize];
    lun.read_at(&mut whole, 0).unwrap();
    assert!(whole == model, "final contents differ from the model");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sync_buffered_agrees_with_model(ops in prop::collection::vec(op(), 1..40)) {
        run(IoEngine::Sync, false, 512, &ops);
    }

    #[test]
    fn sync_direct_agrees_with_model(ops in prop::collection::vec(op(), 1..40)) {
        run(IoEngine::Sync, true, 512, &ops);
    }

    #[test]
    fn uring_buffered_agrees_with_model(ops in prop::collection::vec(op(), 1..40)) {
        run(IoEngine::Uring, false, 512, &ops);
    }

    #[test]
    fn uring_direct_agrees_with_model(ops in prop::collection::vec(op(), 1..40)) {
        run(IoEngine::Uring, true, 512, &ops);
    }

    #[test]
    fn uring_direct_4k_sectors_agree_with_model(ops in prop::collection::vec(op(), 1..40)) {
        run(IoEngine::Uring, true, 4096, &ops);
    }
}
