//! Several hosts on one datastore, in one process: each host is its own `Datastore` (or
//! `Node`) on its own handle of the LUN file, coordinating only through the LUN. Both lock
//! protocols run: compare-and-write, and Disk Paxos on a LUN that hides compare-and-write.
//! The multi-process tests (separate host processes, kill -9, network namespaces) are the
//! root `tests/cluster_*.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use lun::Lun;
use lun::fault::FaultLun;
use vmfs::cluster::{Identity, LockTarget, Node};
use vmfs::{Access, Datastore, Error, LockMode, LockProtocol, NewFile};

const PROTOCOLS: [LockProtocol; 2] = [LockProtocol::CompareAndWrite, LockProtocol::DiskPaxos];

fn open(t: &TestDs, p: LockProtocol, name: &str) -> Datastore {
    Datastore::open(t.host_lun(p), &host_named(name)).unwrap()
}

/// Retries `f` until it succeeds or `limit` passes; returns the value and how long it took.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> vmfs::Result<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return (v, start.elapsed()),
            Err(e) if start.elapsed() < limit => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("still failing after {limit:?}: {e}"),
        }
    }
}

#[test]
fn hosts_share_one_namespace_and_see_each_others_changes() {
    for p in PROTOCOLS {
        let t = TestDs::cluster(p, 100);
        let a = open(&t, p, "host-a");
        let b = open(&t, p, "host-b");
        assert_ne!(a.host_slot(), b.host_slot());
        a.mkdir_path("/shared", 0o755, creds()).unwrap();
        let f = a.create_path("/shared/x", &NewFile::default()).unwrap();
        let data = pattern(200_000, 1);
        a.write(f.ino, 0, &data).unwrap();
        a.sync().unwrap();

        let seen = b.stat_path("/shared/x").unwrap();
        assert_eq!(seen.size, data.len() as u64, "{p:?}");
        let mut back = vec![0u8; data.len()];
        b.read(seen.ino, 0, &mut back).unwrap();
        assert!(back == data, "{p:?}: host b reads what host a wrote");
        b.remove_path("/shared/x", false).unwrap();
        b.sync().unwrap();
        assert!(matches!(
            a.stat_path("/shared/x"),
            Err(Error::NotFound { .. })
        ));

        // Both hosts create in the same directory at once: the directory's lock serialises
        // them, nothing is lost.
        std::thread::scope(|s| {
            for (ds, tag) in [(&a, "a"), (&b, "b")] {
                s.spawn(move || {
                    for i in 0..40 {
                        ds.create_path(&format!("/shared/{tag}-{i}"), &NewFile::default())
                            .unwrap();
                    }
                    ds.sync().unwrap();
                });
            }
        });
        assert_eq!(a.list("/shared").unwrap().len(), 80, "{p:?}");
        assert_eq!(b.list("/shared").unwrap().len(), 80, "{p:?}");
        a.close().unwrap();
        b.close().unwrap();
        t.assert_clean();
    }
}

#[test]
fn exclusive_open_is_refused_naming_the_holder() {
    for p in PROTOCOLS {
        let t = TestDs::cluster(p, 100);
        let a = open(&t, p, "esx-a");
        let b = open(&t, p, "esx-b");
        a.create_path("/disk", &NewFile::default()).unwrap();
        a.sync().unwrap();
        let slot = a.host_slot().unwrap();
        let held = a.open_path("/disk", Access::Exclusive).unwrap();
        for access in [Access::Exclusive, Access::ReadOnly, Access::MultiWriter] {
            let err = b.open_path("/disk", access).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::Busy { .. }), "{p:?}: {text}");
            assert!(
                text.contains("/disk")
                    && text.contains("host esx-a")
                    && text.contains(&format!("slot {slot}")),
                "{p:?}: the error names the object and the holder: {text}"
            );
        }
        // Deleting a file another host has open is refused the same way.
        let err = b.remove_path("/disk", false).unwrap_err();
        assert!(err.to_string().contains("host esx-a"), "{p:?}: {err}");
        drop(held);
        // The lock is given up at a's next commit point.
        let (h, waited) = eventually(Duration::from_secs(3), || {
            b.open_path("/disk", Access::Exclusive)
        });
        assert!(waited < Duration::from_secs(2), "{p:?}: {waited:?}");
        drop(h);
        drop((a, b));
        t.assert_clean();
    }
}

#[test]
fn read_only_opens_share_and_multi_writers_write_together() {
    for p in PROTOCOLS {
        let t = TestDs::cluster(p, 100);
        let a = open(&t, p, "ro-a");
        let b = open(&t, p, "ro-b");
        let c = open(&t, p, "ro-c");
        let thick = NewFile {
            thick: true,
            ..Default::default()
        };
        let f = a.create_path("/quorum", &thick).unwrap();
        a.truncate(f.ino, 1 << 20).unwrap();
        a.create_path("/readme", &NewFile::default()).unwrap();
        let r = a.resolve("/readme").unwrap();
        a.write(r, 0, b"shared text").unwrap();
        a.sync().unwrap();

        let ra = a.open_path("/readme", Access::ReadOnly).unwrap();
        let rb = b.open_path("/readme", Access::ReadOnly).unwrap();
        let mut buf = [0u8; 11];
        rb.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"shared text");
        let err = c.open_path("/readme", Access::Exclusive).unwrap_err();
        assert!(err.to_string().contains("read-only shared"), "{p:?}: {err}");
        drop((ra, rb));

        // Two hosts hold the file multi-writer and write disjoint halves at the same time.
        let wa = a.open_path("/quorum", Access::MultiWriter).unwrap();
        let wb = b.open_path("/quorum", Access::MultiWriter).unwrap();
        let half = 512 << 10;
        std::thread::scope(|s| {
            for (h, seed, at) in [(&wa, 7u64, 0u64), (&wb, 8, half as u64)] {
                s.spawn(move || {
                    for k in 0..8u64 {
                        let chunk = pattern(64 << 10, seed * 100 + k);
                        h.write_at(&chunk, at + k * (64 << 10)).unwrap();
                    }
                });
            }
        });
        // Growing the file needs the exclusive lock: refused while another writer holds it.
        let err = wa.truncate(2 << 20).unwrap_err();
        assert!(matches!(err, Error::Busy { .. }), "{p:?}: {err}");
        drop((wa, wb));
        a.sync().unwrap();
        b.sync().unwrap();
        let mut back = vec![0u8; 1 << 20];
        c.read(f.ino, 0, &mut back).unwrap();
        for k in 0..8usize {
            let at = k * (64 << 10);
            assert!(back[at..at + (64 << 10)] == pattern(64 << 10, 700 + k as u64)[..]);
            let at = half + at;
            assert!(back[at..at + (64 << 10)] == pattern(64 << 10, 800 + k as u64)[..]);
        }
        drop((a, b, c));
        t.assert_clean();
    }
}

#[test]
fn freeing_into_a_cluster_another_host_allocates_from_waits_for_its_lock() {
    for p in PROTOCOLS {
        let t = TestDs::cluster(p, 100);
        let a = open(&t, p, "allocator");
        let b = open(&t, p, "deleter");
        let before = b.statfs().unwrap().blocks_free;
        let f = a.create_path("/big", &NewFile::default()).unwrap();
        a.write(f.ino, 0, &pattern(40 * 65536, 3)).unwrap();
        a.sync().unwrap();
        // a goes on allocating from the same clusters, holding their locks between its
        // commit points, while b frees a's blocks into them.
        let g = a.create_path("/more", &NewFile::default()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                for k in 0..20u64 {
                    a.write(g.ino, k * 65536, &pattern(65536, k)).unwrap();
                }
            });
            b.remove_path("/big", false).unwrap();
        });
        a.remove_path("/more", false).unwrap();
        a.sync().unwrap();
        b.sync().unwrap();
        std::thread::sleep(a.timing().commit_interval() * 2);
        assert_eq!(
            b.statfs().unwrap().blocks_free,
            before,
            "{p:?}: blocks leaked"
        );
        drop((a, b));
        t.assert_clean();
    }
}

#[test]
fn racing_joins_without_compare_and_write_never_share_a_host_id() {
    let t = TestDs::cluster(LockProtocol::DiskPaxos, 100);
    for round in 0..4 {
        let contenders = 5;
        let barrier = Arc::new(Barrier::new(contenders));
        let nodes: Vec<Arc<Node>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..contenders)
                .map(|i| {
                    let lun = t.host_lun(LockProtocol::DiskPaxos);
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        // Everyone uses the same UUID: the same machine's CLI processes do.
                        Node::join(
                            lun,
                            &Identity {
                                name: format!("racer-{i}"),
                                uuid: uuid_for("same-machine"),
                            },
                        )
                        .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut slots: Vec<u32> = nodes.iter().map(|n| n.host().slot).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(
            slots.len(),
            contenders,
            "round {round}: two hosts share a slot"
        );
        for n in &nodes {
            n.leave().unwrap();
        }
    }
}

/// Many hosts take the same lock over and over; a shared counter checks that exclusive
/// owners never overlap each other or readers.
fn lock_race(p: LockProtocol) {
    let t = TestDs::cluster(p, 200);
    let hosts = 5;
    let nodes: Vec<Arc<Node>> = (0..hosts)
        .map(|i| {
            Node::join(
                t.host_lun(p),
                &Identity {
                    name: format!("locker-{i}"),
                    uuid: uuid_for(&format!("locker-{i}")),
                },
            )
            .unwrap()
        })
        .collect();
    let target = LockTarget::Inode(7);
    let writers = AtomicUsize::new(0);
    let readers = AtomicUsize::new(0);
    let grants = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for (i, node) in nodes.iter().enumerate() {
            let (writers, readers, grants, stop) = (&writers, &readers, &grants, &stop);
            s.spawn(move || {
                let mut k = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    k += 1;
                    let mode = if (k + i as u64) % 3 == 0 {
                        LockMode::SharedRead
                    } else {
                        LockMode::Exclusive
                    };
                    match node.try_lock(target, mode) {
                        Ok(()) => {
                            grants.fetch_add(1, Ordering::SeqCst);
                            if mode == LockMode::Exclusive {
                                assert_eq!(
                                    writers.fetch_add(1, Ordering::SeqCst),
                                    0,
                                    "two exclusive owners"
                                );
                                assert_eq!(
                                    readers.load(Ordering::SeqCst),
                                    0,
                                    "exclusive owner next to a reader"
                                );
                                std::thread::sleep(Duration::from_micros(300));
                                writers.fetch_sub(1, Ordering::SeqCst);
                            } else {
                                readers.fetch_add(1, Ordering::SeqCst);
                                assert_eq!(
                                    writers.load(Ordering::SeqCst),
                                    0,
                                    "reader next to an exclusive owner"
                                );
                                std::thread::sleep(Duration::from_micros(300));
                                readers.fetch_sub(1, Ordering::SeqCst);
                            }
                            node.unlock(target).unwrap();
                        }
                        Err(Error::Busy { holder, .. }) => assert!(holder.contains("locker-")),
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::SeqCst);
    });
    let granted = grants.load(Ordering::SeqCst);
    eprintln!("{p:?}: {granted} grants among {hosts} hosts in 1.5 s, never two owners");
    assert!(granted > 20, "{p:?}: only {granted} grants");
    let rec = nodes[0].read_lock(target).unwrap();
    assert_eq!(rec.mode, None, "{p:?}: every holder released");
    for n in &nodes {
        n.leave().unwrap();
    }
}

#[test]
fn lock_races_without_compare_and_write_never_give_two_owners() {
    lock_race(LockProtocol::DiskPaxos);
}

#[test]
fn lock_races_with_compare_and_write_never_give_two_owners() {
    lock_race(LockProtocol::CompareAndWrite);
}

/// Offsets of every record unit vmfs shares between hosts, and the gaps after the
/// heartbeat and lease regions.
fn guarded_ranges(ds: &Datastore) -> Vec<(u64, u64)> {
    let sb = ds.superblock();
    let unit = vmfs::debug::UNIT as u64;
    let mut out = Vec::new();
    for slot in 0..sb.host_slots {
        out.push((sb.heartbeat_slot_offset(slot) + 512, unit - 512));
    }
    let hb_end = sb.heartbeat_slot_offset(sb.host_slots);
    out.push((hb_end, sb.lease_offset - hb_end));
    for a in 0..u64::from(sb.lease_areas) {
        for k in 0..=u64::from(sb.host_slots) {
            out.push((
                sb.lease_offset + a * sb.lease_area_len() + k * unit + 512,
                unit - 512,
            ));
        }
    }
    let lease_end = sb.lease_offset + u64::from(sb.lease_areas) * sb.lease_area_len();
    out.push((lease_end, sb.journal_offset - lease_end));
    for ino in 1..=sb.inodes.count {
        out.push((sb.inode_lock_offset(ino) + 512, unit - 512));
    }
    for kind in vmfs::ResourceKind::ALL {
        let area = sb.area(kind);
        for c in 0..area.clusters() {
            out.push((area.lock_offset(c) + 512, unit - 512));
        }
    }
    out
}

fn guard_pattern(off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (((off + i) * 31) % 251) as u8 | 0x80)
        .collect()
}

#[test]
fn guard_bytes_past_every_record_are_never_touched() {
    for p in PROTOCOLS {
        let t = TestDs::cluster(p, 100);
        let ranges = guarded_ranges(&t.open_ro());
        let raw = t.lun();
        for &(off, len) in &ranges {
            raw.write_at(&guard_pattern(off, len), off).unwrap();
        }
        {
            let hosts: Vec<Datastore> =
                (0..3).map(|i| open(&t, p, &format!("guard-{i}"))).collect();
            hosts[0].mkdir_path("/g", 0o755, creds()).unwrap();
            hosts[0].sync().unwrap();
            std::thread::scope(|s| {
                for (i, ds) in hosts.iter().enumerate() {
                    s.spawn(move || {
                        for k in 0..15 {
                            let path = format!("/g/{i}-{k}");
                            let a = ds.create_path(&path, &NewFile::default()).unwrap();
                            ds.write(a.ino, 0, &pattern(70_000, k)).unwrap();
                            let h = ds.open_path(&path, Access::Exclusive).unwrap();
                            h.write_at(b"x", 5).unwrap();
                            drop(h);
                            if k % 3 == 0 {
                                ds.remove_path(&path, false).unwrap();
                            }
                        }
                        ds.sync().unwrap();
                    });
                }
            });
        }
        for &(off, len) in &ranges {
            let mut back = vec![0u8; len as usize];
            raw.read_at(&mut back, off).unwrap();
            assert!(
                back == guard_pattern(off, len),
                "{p:?}: guard bytes at {off} ({len} bytes) changed"
            );
        }
        t.assert_clean();
    }
}

#[test]
fn dead_host_locks_are_broken_only_after_its_journal_is_replayed() {
    let p = LockProtocol::CompareAndWrite;
    let t = TestDs::cluster(p, 100);
    let fault = Arc::new(CutAfterCommit::new(t.lun()));
    let a = Datastore::open(fault.clone(), &host_named("doomed")).unwrap();
    let b = open(&t, p, "survivor");
    a.mkdir_path("/d", 0o755, creds()).unwrap();
    a.create_path("/d/f", &NewFile::default()).unwrap();
    a.sync().unwrap();
    let held = a.open_path("/d/f", Access::Exclusive).unwrap();
    // A metadata change under a's locks reaches a's journal, then the power goes: nothing
    // of it is in place, and a's locks stay on the LUN.
    fault.arm();
    a.rename_path("/d/f", "/d/renamed").unwrap();
    a.sync().unwrap();
    assert!(fault.is_cut());
    let crashed_at = Instant::now();
    assert!(
        b.stat_path("/d/renamed").is_err(),
        "not in place before replay"
    );

    // b waits for a's directory lock: it gets it only by recovering a.
    let ((), waited) = eventually(Duration::from_secs(5), || {
        b.rename_path("/d/renamed", "/d/mine")
    });
    let dead_after = b.timing().dead_after();
    assert!(
        crashed_at.elapsed() >= dead_after - b.timing().io_timeout,
        "lock broken after {waited:?}, before the dead-host timeout {dead_after:?}"
    );
    assert!(
        waited < dead_after + Duration::from_millis(800),
        "took {waited:?} (dead-host timeout {dead_after:?})"
    );
    // The rename a journaled was replayed before b could work on the directory; a's open
    // file lock is stale now too.
    let h = b.open_path("/d/mine", Access::Exclusive).unwrap();
    drop(h);
    drop(held);
    drop(a);
    b.close().unwrap();
    t.assert_clean();
}

#[test]
fn a_host_that_cannot_renew_fences_itself_before_the_others_take_over() {
    for p in PROTOCOLS {
        let t = TestDs::cluster(p, 100);
        let inner: Arc<dyn Lun> = t.host_lun(p);
        let fault = Arc::new(FaultLun::new(inner));
        let a = Datastore::open(fault.clone(), &host_named("cut-off")).unwrap();
        let b = open(&t, p, "other");
        a.create_path("/vm.vmdk", &NewFile::default()).unwrap();
        a.sync().unwrap();
        let handle = a.open_path("/vm.vmdk", Access::Exclusive).unwrap();
        // a loses its heartbeat: every write to its slot fails from now on.
        let sb = a.superblock().clone();
        let slot = a.host_slot().unwrap();
        let at = sb.heartbeat_slot_offset(slot);
        fault.fail_writes(at..at + 4096);
        let cut = Instant::now();
        let timing = a.timing();

        let (_, fenced_after) = eventually(Duration::from_secs(3), || {
            match a.create_path("/after-cut", &NewFile::default()) {
                Err(e @ Error::HostFenced { .. }) => Ok(e),
                Ok(_) => Err(Error::Invalid {
                    object: "a".into(),
                    reason: "still writing".into(),
                }),
                Err(e) => Err(e),
            }
        });
        let fenced_at = cut.elapsed();
        assert!(
            fenced_after <= timing.fence_after() + timing.io_timeout * 2,
            "{p:?}: fenced after {fenced_after:?}"
        );
        assert!(
            handle.write_at(b"late", 0).is_err(),
            "{p:?}: a fenced host writes no data either"
        );
        let (h, _) = eventually(Duration::from_secs(5), || {
            b.open_path("/vm.vmdk", Access::Exclusive)
        });
        let taken_at = cut.elapsed();
        assert!(
            fenced_at < taken_at && taken_at >= timing.dead_after() - timing.io_timeout,
            "{p:?}: fenced at {fenced_at:?}, lock taken over at {taken_at:?}"
        );
        let e = a.sync().unwrap_err();
        assert!(e.to_string().contains("host fenced"), "{p:?}: {e}");
        drop(h);
        drop(handle);
        drop(a);
        b.close().unwrap();
        t.assert_clean();
    }
}

#[test]
fn a_recovery_cut_short_by_the_recoverers_death_is_finished_by_another_host() {
    let p = LockProtocol::CompareAndWrite;
    let t = TestDs::cluster(p, 100);
    let fa = Arc::new(CutAfterCommit::new(t.lun()));
    let a = Datastore::open(fa.clone(), &host_named("first-victim")).unwrap();
    a.create_path("/x", &NewFile::default()).unwrap();
    a.sync().unwrap();
    let held = a.open_path("/x", Access::Exclusive).unwrap();
    fa.arm();
    a.rename_path("/x", "/y").unwrap();
    a.sync().unwrap();
    assert!(fa.is_cut());

    // r starts recovering a, but dies before finishing: its write of a's journal header
    // (the end of the replay) fails, and then it loses power.
    let fr = Arc::new(FaultLun::new(t.lun()));
    let r = Datastore::open(fr.clone(), &host_named("second-victim")).unwrap();
    let sb = r.superblock().clone();
    let a_journal = sb.journal_area(a.host_slot().unwrap());
    fr.fail_writes(a_journal..a_journal + 4096);
    let (err, _) = eventually(Duration::from_secs(5), || match r.rename_path("/y", "/z") {
        Ok(()) => Err(Error::Invalid {
            object: "r".into(),
            reason: "recovery should have failed".into(),
        }),
        Err(e @ Error::Busy { .. }) => Err(Error::Invalid {
            object: "r".into(),
            reason: format!("not yet: {e}"),
        }),
        Err(e) => Ok(e),
    });
    assert!(err.to_string().contains("injected"), "{err}");
    fr.crash().unwrap();

    // c finds a's slot claimed by a recoverer that is dead too: it recovers r, redoes a's
    // recovery, and gets the file a journaled a rename of.
    let c = open(&t, p, "finisher");
    let ((), waited) = eventually(Duration::from_secs(8), || c.rename_path("/y", "/z"));
    assert!(
        waited >= c.timing().dead_after() - c.timing().io_timeout,
        "{waited:?}"
    );
    let h = c.open_path("/z", Access::Exclusive).unwrap();
    drop(h);
    drop((held, a, r));
    // c took a's slot over when it needed a's lock; r's own slot is recovered by c's
    // background sweep, which may come a moment later: closing c first would leave it.
    let me = c.host_slot().unwrap();
    eventually(Duration::from_secs(5), || {
        let info = t.open_ro().info()?;
        match info
            .hosts
            .iter()
            .find(|h| h.slot != me && h.state != "free")
        {
            Some(h) => Err(Error::Invalid {
                object: format!("slot {}", h.slot),
                reason: format!("still {}", h.state),
            }),
            None => Ok(()),
        }
    });
    c.close().unwrap();
    let info = t.open_ro().info().unwrap();
    assert!(
        info.hosts.iter().all(|h| h.state == "free"),
        "every slot recovered and freed: {:?}",
        info.hosts
    );
    t.assert_clean();
}

#[test]
fn a_compare_and_write_datastore_refuses_hosts_that_cannot_compare_and_write() {
    let t = TestDs::cluster(LockProtocol::CompareAndWrite, 100);
    let plain: Arc<dyn Lun> = Arc::new(NoCas(t.lun()));
    let Err(err) = Datastore::open(plain.clone(), &host_named("nbd-host")) else {
        panic!("a host without compare-and-write mounted a compare-and-write datastore");
    };
    let text = err.to_string();
    assert!(
        text.contains("compare-and-write") && text.contains("refused"),
        "{text}"
    );
    // Nothing was written: no slot taken.
    assert!(t.open_ro().info().unwrap().hosts.is_empty());
    // Reading needs no lock protocol at all.
    let ro = Datastore::open(plain, &vmfs::OpenOptions::read_only()).unwrap();
    assert!(ro.list("/").unwrap().is_empty());
    // Formatting for compare-and-write on a LUN without it is refused too.
    let err = vmfs::format(
        Arc::new(NoCas(t.lun())),
        &vmfs::FormatOptions {
            force: true,
            lock_protocol: Some(LockProtocol::CompareAndWrite),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("compare-and-write"), "{err}");
}

#[test]
fn hosts_racing_to_make_one_path_both_succeed() {
    // `mkdir -p` of one path by two hosts at once: the loser of each mkdir takes the winner's
    // directory (two host agents making their records' folder on first start).
    let p = LockProtocol::CompareAndWrite;
    let t = TestDs::cluster(p, 100);
    let hosts = [open(&t, p, "host-a"), open(&t, p, "host-b")];
    for round in 0..20 {
        let path = format!("/race{round}/records");
        let start = Barrier::new(2);
        let made: Vec<_> = std::thread::scope(|s| {
            let runs: Vec<_> = hosts
                .iter()
                .map(|ds| {
                    let (start, path) = (&start, &path);
                    s.spawn(move || {
                        start.wait();
                        ds.mkdir_all(path, 0o755, creds())
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let inos: Vec<u64> = made
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("round {round}: {e}")).ino)
            .collect();
        assert_eq!(inos[0], inos[1], "round {round}: one directory for both");
    }
}
