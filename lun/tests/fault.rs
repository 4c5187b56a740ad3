//! The fault-injecting wrapper: every behaviour checked against what really reached the
//! inner LUN (a real file, read back through a fresh open).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lun::fault::{CrashMode, FaultLun};
use lun::{CompareAndWrite, FileLun, IoRequest, Lun, LunError};

const S: u64 = 512;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    fault: FaultLun,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inner");
    let inner: Arc<dyn Lun> = Arc::new(FileLun::create(&path, 64 * S).unwrap());
    Fixture {
        fault: FaultLun::new(inner),
        path,
        _dir: dir,
    }
}

fn sector(fill: u8) -> Vec<u8> {
    vec![fill; S as usize]
}

/// What the file holds now, through a new open (not through the wrapper).
fn on_disk(path: &Path, index: u64) -> Vec<u8> {
    let lun = FileLun::open(path, true).unwrap();
    let mut buf = sector(0);
    lun.read_at(&mut buf, index * S).unwrap();
    buf
}

#[test]
fn name_and_geometry_follow_the_inner_lun() {
    let f = fixture();
    assert_eq!(f.fault.name(), format!("fault:{}", f.fault.inner().name()));
    assert_eq!(f.fault.size(), 64 * S);
    assert_eq!(f.fault.sector_size(), 512);
    assert!(f.fault.supports_compare_and_write());
    // Refused requests are not writes.
    assert!(matches!(
        f.fault.write_at(&[0u8; 100], 0),
        Err(LunError::Misaligned { .. })
    ));
    assert!(matches!(
        f.fault.write_at(&sector(1), 64 * S),
        Err(LunError::OutOfRange { .. })
    ));
    assert_eq!(f.fault.writes(), 0);
}

#[test]
fn writes_after_the_crash_point_are_silently_dropped() {
    let f = fixture();
    f.fault.write_at(&sector(0xEE), 20 * S).unwrap();
    f.fault.crash_after_writes(3);
    for i in 0..6u64 {
        f.fault.write_at(&sector(i as u8 + 1), i * S).unwrap();
        assert_eq!(f.fault.crashed(), i >= 3, "after write {i}");
    }
    f.fault.flush().unwrap();
    assert_eq!(f.fault.writes(), 7, "dropped writes are counted too");
    for i in 0..3 {
        assert_eq!(on_disk(&f.path, i), sector(i as u8 + 1), "write {i} landed");
    }
    for i in 3..6 {
        assert_eq!(on_disk(&f.path, i), sector(0), "write {i} was dropped");
    }
    assert_eq!(on_disk(&f.path, 20), sector(0xEE));

    // Zeroing and compare-and-write after the crash are dropped as well.
    f.fault.write_zeroes(20 * S, S).unwrap();
    assert_eq!(
        f.fault
            .compare_and_write(&sector(0), &sector(9), 10 * S)
            .unwrap(),
        CompareAndWrite::Written
    );
    assert_eq!(on_disk(&f.path, 20), sector(0xEE));
    assert_eq!(on_disk(&f.path, 10), sector(0));
    assert_eq!(f.fault.writes(), 9);
}

#[test]
fn crash_at_every_k_lands_exactly_the_first_k_writes() {
    // The intended use: count a workload's writes once, then crash after each k.
    let workload = |lun: &FaultLun| {
        for i in 0..5u64 {
            lun.write_at(&sector(0x10 + i as u8), i * S).unwrap();
        }
        lun.write_zeroes(S, S).unwrap();
        let mut batch = [
            IoRequest::Write {
                buf: &sector(0x20),
                offset: 10 * S,
            },
            IoRequest::Write {
                buf: &sector(0x21),
                offset: 11 * S,
            },
        ];
        lun.submit(&mut batch).unwrap();
        lun.flush().unwrap();
    };
    let counting = fixture();
    workload(&counting.fault);
    let total = counting.fault.writes();
    assert_eq!(total, 8, "5 writes + 1 zeroing + 2 batched writes");

    // What each sector holds after the first k writes, in workload order.
    let expected = |k: u64| -> Vec<(u64, Vec<u8>)> {
        let mut sectors: Vec<(u64, Vec<u8>)> = (0..5).map(|i| (i, sector(0))).collect();
        sectors.push((10, sector(0)));
        sectors.push((11, sector(0)));
        for i in 0..k.min(5) {
            sectors[i as usize].1 = sector(0x10 + i as u8);
        }
        if k >= 6 {
            sectors[1].1 = sector(0);
        }
        if k >= 7 {
            sectors[5].1 = sector(0x20);
        }
        if k >= 8 {
            sectors[6].1 = sector(0x21);
        }
        sectors
    };
    for k in 0..=total {
        let f = fixture();
        f.fault.crash_after_writes(k);
        workload(&f.fault);
        assert_eq!(f.fault.crashed(), k < total, "k={k}");
        for (index, want) in expected(k) {
            assert_eq!(on_disk(&f.path, index), want, "k={k}, sector {index}");
        }
    }
}

#[test]
fn drop_unflushed_reverts_exactly_the_unflushed_writes() {
    let f = fixture();
    f.fault.set_crash_mode(CrashMode::DropUnflushed);
    f.fault.write_at(&sector(0xA1), 0).unwrap();
    f.fault.write_at(&sector(0xA2), S).unwrap();
    f.fault.flush().unwrap();
    // Unflushed: overwrite a flushed sector twice, write a new one, zero a flushed one.
    f.fault.write_at(&sector(0xB1), 0).unwrap();
    f.fault.write_at(&sector(0xB2), 0).unwrap();
    f.fault.write_at(&sector(0xB3), 2 * S).unwrap();
    f.fault.write_zeroes(S, S).unwrap();
    assert_eq!(
        f.fault
            .compare_and_write(&sector(0), &sector(0xC1), 3 * S)
            .unwrap(),
        CompareAndWrite::Written
    );
    // A miscompare changed nothing and must not disturb the revert.
    assert!(matches!(
        f.fault
            .compare_and_write(&sector(7), &sector(0xC2), 3 * S)
            .unwrap(),
        CompareAndWrite::Miscompare(_)
    ));
    assert_eq!(
        on_disk(&f.path, 0),
        sector(0xB2),
        "before the crash the data is there"
    );

    f.fault.crash_after_writes(0);
    f.fault.write_at(&sector(0xD1), 4 * S).unwrap();
    assert!(f.fault.crashed());
    assert_eq!(
        on_disk(&f.path, 0),
        sector(0xA1),
        "flushed data, not the later overwrite"
    );
    assert_eq!(on_disk(&f.path, 1), sector(0xA2), "zeroing reverted");
    assert_eq!(on_disk(&f.path, 2), sector(0), "unflushed write reverted");
    assert_eq!(on_disk(&f.path, 3), sector(0), "compare-and-write reverted");
    assert_eq!(on_disk(&f.path, 4), sector(0), "the crashing write dropped");
}

#[test]
fn drop_later_keeps_unflushed_writes_that_landed() {
    let f = fixture();
    f.fault.write_at(&sector(0xA1), 0).unwrap();
    f.fault.crash_after_writes(0);
    f.fault.write_at(&sector(0xA2), S).unwrap();
    assert_eq!(on_disk(&f.path, 0), sector(0xA1));
    assert_eq!(on_disk(&f.path, 1), sector(0));
}

#[test]
fn a_torn_write_lands_only_a_prefix_of_its_sectors() {
    let f = fixture();
    f.fault.tear_writes(true);
    f.fault.crash_after_writes(1);
    f.fault.write_at(&sector(0x11), 40 * S).unwrap();
    let eight: Vec<u8> = (0..8).flat_map(|i| sector(0xA0 + i)).collect();
    f.fault.write_at(&eight, 0).unwrap();
    assert!(f.fault.crashed());
    for i in 0..4u64 {
        assert_eq!(
            on_disk(&f.path, i),
            sector(0xA0 + i as u8),
            "sector {i} of the prefix"
        );
    }
    for i in 4..8u64 {
        assert_eq!(on_disk(&f.path, i), sector(0), "sector {i} beyond the tear");
    }
    assert_eq!(on_disk(&f.path, 40), sector(0x11));

    // A one-sector write cannot tear: it is lost whole.
    let g = fixture();
    g.fault.tear_writes(true);
    g.fault.crash_after_writes(0);
    g.fault.write_at(&sector(0x22), 0).unwrap();
    assert_eq!(on_disk(&g.path, 0), sector(0));

    // With a volatile cache the unflushed writes are lost, then the prefix lands.
    let h = fixture();
    h.fault.set_crash_mode(CrashMode::DropUnflushed);
    h.fault.tear_writes(true);
    h.fault.write_at(&sector(0x33), 20 * S).unwrap();
    h.fault.crash_after_writes(0);
    let four: Vec<u8> = (0..4).flat_map(|i| sector(0xB0 + i)).collect();
    h.fault.write_at(&four, 0).unwrap();
    assert_eq!(on_disk(&h.path, 20), sector(0));
    assert_eq!(on_disk(&h.path, 0), sector(0xB0));
    assert_eq!(on_disk(&h.path, 1), sector(0xB1));
    assert_eq!(on_disk(&h.path, 2), sector(0));
}

#[test]
fn injected_errors_hit_exactly_the_chosen_ranges() {
    let f = fixture();
    f.fault.write_at(&sector(0x55), 8 * S).unwrap();
    f.fault.fail_reads(8 * S..9 * S);
    f.fault.fail_writes(16 * S..18 * S);

    let mut buf = sector(0);
    f.fault.read_at(&mut buf, 7 * S).unwrap();
    f.fault.read_at(&mut buf, 9 * S).unwrap();
    let err = f.fault.read_at(&mut buf, 8 * S).unwrap_err();
    assert!(
        matches!(err, LunError::Injected { offset, len, .. } if offset == 8 * S && len == S),
        "{err}"
    );
    assert!(err.to_string().starts_with("fault:"), "{err}");
    // A request overlapping the range by one sector fails whole.
    let mut two = vec![0u8; 2 * S as usize];
    assert!(matches!(
        f.fault.read_at(&mut two, 7 * S),
        Err(LunError::Injected { .. })
    ));
    // Writes to the read-failing range still work.
    f.fault.write_at(&sector(0x66), 8 * S).unwrap();

    f.fault.write_at(&sector(1), 15 * S).unwrap();
    f.fault.write_at(&sector(1), 18 * S).unwrap();
    for index in [16, 17] {
        let err = f.fault.write_at(&sector(2), index * S).unwrap_err();
        assert!(
            matches!(err, LunError::Injected { offset, .. } if offset == index * S),
            "{err}"
        );
        assert_eq!(
            on_disk(&f.path, index),
            sector(0),
            "failed write changed nothing"
        );
    }
    assert!(matches!(
        f.fault.write_zeroes(15 * S, 2 * S),
        Err(LunError::Injected { .. })
    ));
    assert_eq!(on_disk(&f.path, 15), sector(1));
    let mut batch = [IoRequest::Write {
        buf: &sector(3),
        offset: 17 * S,
    }];
    assert!(matches!(
        f.fault.submit(&mut batch),
        Err(LunError::Injected { .. })
    ));

    f.fault.fail_flushes(true);
    assert!(matches!(f.fault.flush(), Err(LunError::Injected { .. })));

    f.fault.clear_faults();
    f.fault.read_at(&mut buf, 8 * S).unwrap();
    assert_eq!(buf, sector(0x66));
    f.fault.write_at(&sector(4), 16 * S).unwrap();
    assert_eq!(on_disk(&f.path, 16), sector(4));
    f.fault.flush().unwrap();
}

#[test]
fn clear_faults_restores_power_and_keeps_the_count() {
    let f = fixture();
    f.fault.crash_after_writes(0);
    f.fault.write_at(&sector(1), 0).unwrap();
    assert!(f.fault.crashed());
    f.fault.clear_faults();
    assert!(!f.fault.crashed());
    f.fault.write_at(&sector(2), 0).unwrap();
    assert_eq!(on_disk(&f.path, 0), sector(2));
    assert_eq!(f.fault.writes(), 2);
}

#[test]
fn submit_counts_and_crashes_per_request() {
    let f = fixture();
    let data: Vec<Vec<u8>> = (0..4).map(|i| sector(0x70 + i)).collect();
    let mut back = sector(0);
    let mut batch = [
        IoRequest::Write {
            buf: &data[0],
            offset: 0,
        },
        IoRequest::Read {
            buf: &mut back,
            offset: 30 * S,
        },
        IoRequest::Write {
            buf: &data[1],
            offset: S,
        },
    ];
    f.fault.submit(&mut batch).unwrap();
    assert_eq!(f.fault.writes(), 2, "reads are not writes");

    f.fault.crash_after_writes(1);
    let mut batch = [
        IoRequest::Write {
            buf: &data[2],
            offset: 2 * S,
        },
        IoRequest::Write {
            buf: &data[3],
            offset: 3 * S,
        },
    ];
    f.fault.submit(&mut batch).unwrap();
    assert_eq!(f.fault.writes(), 4);
    assert_eq!(on_disk(&f.path, 1), data[1]);
    assert_eq!(on_disk(&f.path, 2), data[2]);
    assert_eq!(
        on_disk(&f.path, 3),
        sector(0),
        "the batch's second write fell after the crash"
    );
}

#[test]
fn latency_delays_each_request_but_overlaps_across_threads() {
    let f = Arc::new(fixture());
    f.fault.set_latency(Duration::from_millis(50));
    let start = Instant::now();
    f.fault.write_at(&sector(1), 0).unwrap();
    let mut buf = sector(0);
    f.fault.read_at(&mut buf, 0).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(100));

    let start = Instant::now();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let mut buf = sector(0);
                f.fault.read_at(&mut buf, 0).unwrap();
            })
        })
        .collect();
    for reader in readers {
        reader.join().unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_millis(190),
        "four 50 ms reads overlapped"
    );
}
