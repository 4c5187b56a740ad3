//! Consistency groups under concurrent writers on every member: a write acknowledged
//! before another was issued is never missing from a group session that holds the later
//! one, whichever members they went to.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lun::Lun;
use snapshot::{PoolOptions, SnapError, Snapshots, create_group_session};

use common::{S, files, open, read_all};

const MEMBERS: usize = 3;
const SECTORS: u64 = 2048;

/// One write: its ticket when issued (also what it writes) and when acknowledged.
#[derive(Clone, Copy)]
struct Write {
    issued: u64,
    acked: u64,
}

#[test]
fn a_group_session_is_one_point_in_time_across_members_under_concurrent_writers() {
    let fs: Vec<_> = (0..MEMBERS).map(|_| files(SECTORS * S, 16 << 20)).collect();
    let members: Vec<Arc<Snapshots>> = fs
        .iter()
        .map(|f| {
            Arc::new(
                Snapshots::create(
                    open(&f.source),
                    open(&f.pool),
                    PoolOptions { chunk_size: 4096 },
                )
                .unwrap(),
            )
        })
        .collect();
    let clock = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<HashMap<u64, Write>>> = Arc::default();
    let writers: Vec<_> = members
        .iter()
        .map(|m| {
            let (source, clock, stop, log) = (m.source(), clock.clone(), stop.clone(), log.clone());
            std::thread::spawn(move || {
                // Writer k's n-th write goes to sector n and holds its issue ticket.
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < SECTORS {
                    let issued = clock.fetch_add(1, Ordering::SeqCst);
                    let mut sector = vec![0u8; S as usize];
                    sector[..8].copy_from_slice(&issued.to_le_bytes());
                    source.write_at(&sector, n * S).unwrap();
                    let acked = clock.fetch_add(1, Ordering::SeqCst);
                    log.lock().unwrap().insert(issued, Write { issued, acked });
                    n += 1;
                }
            })
        })
        .collect();
    let refs: Vec<&Snapshots> = members.iter().map(|m| m.as_ref()).collect();
    let mut points = Vec::new();
    for i in 0..4 {
        // Some acknowledged writes since the last point, however loaded the machine is.
        let seen = log.lock().unwrap().len();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let all = MEMBERS * SECTORS as usize;
        while log.lock().unwrap().len() < (seen + 3).min(all) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let before = clock.load(Ordering::SeqCst);
        let infos = create_group_session(&refs, &format!("cg{i}"), false).unwrap();
        let after = clock.load(Ordering::SeqCst);
        assert!(
            infos
                .iter()
                .all(|s| s.group == infos[0].group && s.group.is_some())
        );
        points.push((format!("cg{i}"), before, after));
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let log = log.lock().unwrap();
    for (name, before, after) in points {
        let mut inside = Vec::new();
        for m in &members {
            let data = read_all(m.session(&name).unwrap().as_ref());
            for sector in data.chunks(S as usize) {
                let ticket = u64::from_le_bytes(sector[..8].try_into().unwrap());
                if ticket != 0 {
                    inside.push(ticket);
                }
            }
        }
        let max_issued_in = inside.iter().map(|t| log[t].issued).max().unwrap_or(0);
        let min_acked_out = log
            .values()
            .filter(|w| !inside.contains(&w.issued))
            .map(|w| w.acked)
            .min()
            .unwrap_or(u64::MAX);
        assert!(
            min_acked_out > max_issued_in,
            "{name}: a write acknowledged at {min_acked_out} is missing while one issued at \
             {max_issued_in} is in"
        );
        // Acknowledged before the call: in; issued after it returned: out.
        for w in log.values() {
            if w.acked < before {
                assert!(
                    inside.contains(&w.issued),
                    "{name}: write {} missing",
                    w.issued
                );
            }
            if w.issued > after {
                assert!(
                    !inside.contains(&w.issued),
                    "{name}: write {} too late",
                    w.issued
                );
            }
        }
        assert!(!inside.is_empty(), "{name}: the writers had not started");
    }
}

#[test]
fn a_group_with_a_member_that_cannot_take_the_session_changes_nothing() {
    let fs: Vec<_> = (0..2).map(|_| files(64 * S, 1 << 20)).collect();
    let a = Snapshots::create(
        open(&fs[0].source),
        open(&fs[0].pool),
        PoolOptions::default(),
    )
    .unwrap();
    let b = Snapshots::create(
        open(&fs[1].source),
        open(&fs[1].pool),
        PoolOptions::default(),
    )
    .unwrap();
    b.create_session("x", false).unwrap();
    let err = create_group_session(&[&a, &b], "x", false).unwrap_err();
    assert!(matches!(err, SnapError::SessionExists { .. }), "{err}");
    assert!(a.list().is_empty());
    assert_eq!(b.list().len(), 1);
    let err = create_group_session(&[&a, &a], "y", false).unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
    assert!(a.list().is_empty());
}
