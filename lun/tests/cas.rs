//! compare_and_write on file LUNs: semantics, and atomicity when threads and processes race
//! on one sector (exactly one winner per round).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use lun::{CompareAndWrite, FileLun, IoEngine, Lun, LunError, OpenOptions};

const SECTOR: usize = 512;
/// The contended sector; the one before it is written by nobody and must stay zero.
const OFFSET: u64 = 8 * SECTOR as u64;

/// A sector recording that `winner` completed `round`: every byte depends on both, so a
/// sector mixing two writes is detected.
fn state(round: u64, winner: u64) -> Vec<u8> {
    let mut sector = vec![(round.wrapping_mul(31) ^ winner.wrapping_mul(7)) as u8; SECTOR];
    sector[..8].copy_from_slice(&round.to_le_bytes());
    sector[8..16].copy_from_slice(&winner.to_le_bytes());
    sector
}

fn decode(sector: &[u8]) -> (u64, u64) {
    let round = u64::from_le_bytes(sector[..8].try_into().unwrap());
    let winner = u64::from_le_bytes(sector[8..16].try_into().unwrap());
    assert_eq!(
        sector,
        state(round, winner),
        "sector is not a whole state: torn or mixed"
    );
    (round, winner)
}

/// Plays until the sector reaches `rounds`; returns the rounds this participant won.
/// Losers retry from the contents the miscompare returned, without another read.
fn play(lun: &dyn Lun, me: u64, rounds: u64) -> Vec<u64> {
    let mut won = Vec::new();
    let mut current = vec![0u8; SECTOR];
    lun.read_at(&mut current, OFFSET).unwrap();
    loop {
        let (round, _) = decode(&current);
        if round >= rounds {
            return won;
        }
        let next = state(round + 1, me);
        match lun.compare_and_write(&current, &next, OFFSET).unwrap() {
            CompareAndWrite::Written => {
                won.push(round + 1);
                current = next;
            }
            CompareAndWrite::Miscompare(now) => {
                let (now_round, _) = decode(&now);
                assert!(now_round > round, "a miscompare must show a later round");
                current = now;
            }
        }
    }
}

fn new_lun(dir: &Path, options: &OpenOptions) -> FileLun {
    let lun = FileLun::create_with(&dir.join("lun"), 1 << 20, options).unwrap();
    lun.write_at(&state(0, u64::MAX), OFFSET).unwrap();
    lun
}

/// Every round from 1 to `rounds` won exactly once, and the sector says the last round.
fn assert_one_winner_per_round(mut won: Vec<u64>, rounds: u64, lun: &dyn Lun) {
    won.sort_unstable();
    let expected: Vec<u64> = (1..=rounds).collect();
    assert!(
        won == expected,
        "rounds won: {} for {rounds} rounds (duplicates mean two winners)",
        won.len()
    );
    let mut sector = vec![0u8; SECTOR];
    lun.read_at(&mut sector, OFFSET).unwrap();
    assert_eq!(decode(&sector).0, rounds);
    lun.read_at(&mut sector, OFFSET - SECTOR as u64).unwrap();
    assert!(
        sector.iter().all(|&b| b == 0),
        "neighbouring sector untouched"
    );
}

#[test]
fn match_writes_and_miscompare_returns_current_contents() {
    let dir = tempfile::tempdir().unwrap();
    let lun = new_lun(dir.path(), &OpenOptions::default());
    assert!(lun.supports_compare_and_write());

    let old = state(0, u64::MAX);
    let new = state(1, 1);
    assert_eq!(
        lun.compare_and_write(&old, &new, OFFSET).unwrap(),
        CompareAndWrite::Written
    );

    // The same expectation again is stale now: nothing changes, the current data comes back.
    let other = state(1, 2);
    assert_eq!(
        lun.compare_and_write(&old, &other, OFFSET).unwrap(),
        CompareAndWrite::Miscompare(new.clone())
    );
    let mut sector = vec![0u8; SECTOR];
    lun.read_at(&mut sector, OFFSET).unwrap();
    assert_eq!(sector, new);

    // Multi-sector compare-and-write.
    let two_old = [new.clone(), vec![0u8; SECTOR]].concat();
    let two_new = [state(2, 3), state(2, 4)].concat();
    assert_eq!(
        lun.compare_and_write(&two_old, &two_new, OFFSET).unwrap(),
        CompareAndWrite::Written
    );
}

#[test]
fn bad_compare_and_write_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lun = new_lun(dir.path(), &OpenOptions::default());
    let err = lun
        .compare_and_write(&[0u8; 512], &[1u8; 1024], 0)
        .unwrap_err();
    assert!(
        err.to_string().contains("512") && err.to_string().contains("1024"),
        "{err}"
    );
    let err = lun
        .compare_and_write(&[0u8; 100], &[1u8; 100], 0)
        .unwrap_err();
    assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
    let err = lun
        .compare_and_write(&[0u8; 512], &[1u8; 512], 1 << 20)
        .unwrap_err();
    assert!(matches!(err, LunError::OutOfRange { .. }), "{err}");
    let mut sector = vec![0u8; SECTOR];
    lun.read_at(&mut sector, 0).unwrap();
    assert!(sector.iter().all(|&b| b == 0));
}

#[test]
fn threads_sharing_one_lun_get_one_winner_per_round() {
    let dir = tempfile::tempdir().unwrap();
    let lun = Arc::new(new_lun(dir.path(), &OpenOptions::default()));
    let rounds = 2000;
    let threads: Vec<_> = (0..6)
        .map(|me| {
            let lun = Arc::clone(&lun);
            std::thread::spawn(move || play(&*lun, me, rounds))
        })
        .collect();
    let won: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_one_winner_per_round(won, rounds, &*lun);
}

#[test]
fn separate_opens_in_every_mode_get_one_winner_per_round() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun");
    let first = new_lun(dir.path(), &OpenOptions::default());
    let rounds = 1500;
    // Buffered and O_DIRECT opens, both engines, racing each other.
    let modes = [
        (IoEngine::Sync, false),
        (IoEngine::Sync, true),
        (IoEngine::Auto, false),
        (IoEngine::Auto, true),
    ];
    let threads: Vec<_> = modes
        .into_iter()
        .enumerate()
        .map(|(me, (engine, direct))| {
            let lun = FileLun::open_with(
                &path,
                &OpenOptions {
                    engine,
                    direct,
                    ..OpenOptions::default()
                },
            )
            .unwrap();
            std::thread::spawn(move || play(&lun, me as u64, rounds))
        })
        .collect();
    let won: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_one_winner_per_round(won, rounds, &first);
}

/// Set in a re-executed copy of this test binary: "PATH,ID,ROUNDS".
const CHILD_ENV: &str = "LUN_TEST_CAS_CHILD";

#[test]
fn processes_get_one_winner_per_round() {
    if let Ok(args) = std::env::var(CHILD_ENV) {
        let mut parts = args.split(',');
        let path = parts.next().unwrap();
        let me: u64 = parts.next().unwrap().parse().unwrap();
        let rounds: u64 = parts.next().unwrap().parse().unwrap();
        let lun = FileLun::open(Path::new(path), false).unwrap();
        // A child that starts late on a loaded machine could find every round already
        // played: all of them start playing together.
        let dir = Path::new(path).parent().unwrap();
        std::fs::write(dir.join(format!("ready-{me}")), b"").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while (0..4).any(|n| !dir.join(format!("ready-{n}")).exists()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the other children never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let won = play(&lun, me, rounds);
        println!(
            "WON {}",
            won.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = new_lun(dir.path(), &OpenOptions::default());
    let path = dir.path().join("lun");
    let rounds = 1500;
    let children: Vec<_> = (0..4)
        .map(|me| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "processes_get_one_winner_per_round",
                    "--nocapture",
                ])
                .env(CHILD_ENV, format!("{},{me},{rounds}", path.display()))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut won = Vec::new();
    let mut winners = 0;
    for child in children {
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line = stdout.lines().find_map(|l| l.strip_prefix("WON")).unwrap();
        let mine: Vec<u64> = line
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        winners += usize::from(!mine.is_empty());
        won.extend(mine);
    }
    assert_one_winner_per_round(won, rounds, &lun);
    assert!(winners >= 2, "the processes really competed");
}
