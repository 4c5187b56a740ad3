//! `vapp snapshot` on plain LUNs, as a user runs it: sessions read back as `LUN@NAME`,
//! snapshots taken by a running export, rollback, bad input that changes nothing, and a
//! datastore snapshotted while two hosts write it over NBD.
#![allow(clippy::unwrap_used)]

mod snapshot_support;

use std::time::{Duration, Instant};

use lun::Lun;
use snapshot_support::*;

const SIZE: u64 = 8 * MIB;

#[test]
fn a_session_keeps_its_point_in_time_while_the_source_moves_on() {
    let env = Env::new();
    let lun = env.file("disk.img", SIZE, 1);
    let before = file_sha(&lun);
    let out = env.ok(&["snapshot", "create", &lun, "before"]);
    assert!(out.contains("session taken"), "{out}");
    assert!(
        env.path("disk.img.snap").exists(),
        "the default pool is beside the LUN"
    );

    // Writes through vapp go through the engine: the export puts it under its clients.
    let export = env.export(&lun, &[]);
    let c = export.client();
    c.write_at(&[0xAB; 65536], 0).unwrap();
    c.write_at(&[0xCD; 4096], 3 * MIB).unwrap();
    c.flush().unwrap();
    drop(c);
    export.stop();
    assert_ne!(file_sha(&lun), before, "the source moved on");

    let listing = env.list(&lun);
    let sessions = listing["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["name"], "before");
    assert_eq!(sessions[0]["state"], "valid");
    assert_eq!(sessions[0]["writable"], false);
    assert_eq!(sessions[0]["chunks"], 2, "two chunks were preserved");
    assert_eq!(listing["pool_used_chunks"], 2);
    assert!(listing["pool_total_chunks"].as_u64().unwrap() > 2);

    let at = format!("{lun}@before");
    assert_eq!(sha(&read_through_export(&env, &at)), before);

    // The second session shares the pool; naming the same pool again is fine.
    let pool = env.p("disk.img.snap");
    env.ok(&["snapshot", "create", &lun, "after", "--pool", &pool]);
    let names: Vec<String> = env.list(&lun)["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["before", "after"]);

    env.ok(&["snapshot", "delete", &lun, "before"]);
    let err = env.fails(&["export", &at, "--read-only"]);
    assert!(
        err.contains("no snapshot session \"before\"") && err.contains("after"),
        "names the sessions that exist: {err}"
    );
}

#[test]
fn a_writable_session_takes_writes_and_the_source_keeps_its_bytes() {
    let env = Env::new();
    let lun = env.file("disk.img", SIZE, 2);
    let source = file_sha(&lun);
    env.ok(&["snapshot", "create", &lun, "w", "--writable"]);
    let at = format!("{lun}@w");
    let export = env.export(&at, &[]);
    let c = export.client();
    c.write_at(&[0x5A; 8192], MIB).unwrap();
    c.flush().unwrap();
    drop(c);
    export.stop();
    assert_eq!(file_sha(&lun), source, "the source is untouched");
    let session = read_through_export(&env, &at);
    assert!(
        session[MIB as usize..MIB as usize + 8192]
            .iter()
            .all(|&b| b == 0x5A)
    );
    let mut expected = std::fs::read(&lun).unwrap();
    expected[MIB as usize..MIB as usize + 8192].fill(0x5A);
    assert_eq!(session, expected);

    let err = env.fails(&["export", &format!("{lun}@w2")]);
    assert!(err.contains("no snapshot session \"w2\""), "{err}");
}

#[test]
fn a_snapshot_of_an_exported_lun_is_taken_by_the_export_and_its_clients_keep_going() {
    let env = Env::new();
    let lun = env.file("disk.img", SIZE, 3);
    let original = file_sha(&lun);
    let export = env.export(&lun, &[]);
    let c = export.client();
    c.write_at(&[1; 65536], 0).unwrap();
    c.flush().unwrap();
    let at_snapshot = export.read_all();

    // No pool yet: the export makes it and puts the engine under its connected client.
    env.ok(&["snapshot", "create", &lun, "s1"]);
    c.write_at(&[2; 65536], 0).unwrap();
    c.write_at(&[3; 65536], 5 * MIB).unwrap();
    c.flush().unwrap();
    let listing = env.list(&lun);
    assert_eq!(listing["served_by"], export.child.id());
    assert_eq!(listing["sessions"][0]["chunks"], 2);

    // Bad input: rollback under a client, and a direct writer, are refused; nothing changes.
    let pool = env.p("disk.img.snap");
    let hashes = (file_sha(&lun), file_sha(&pool));
    let err = env.fails(&["snapshot", "rollback", &lun, "s1"]);
    assert!(err.contains("stop the export"), "{err}");
    let err = env.fails(&["datastore", "set-lock-protocol", &lun, "paxos"]);
    assert!(err.contains(&format!("pid {}", export.child.id())), "{err}");
    assert_eq!((file_sha(&lun), file_sha(&pool)), hashes);
    // Its session is served by the export to whoever opens LUN@NAME meanwhile.
    let live = read_through_export(&env, &format!("{lun}@s1"));
    assert_eq!(sha(&live), sha(&at_snapshot));

    drop(c);
    export.stop();
    assert_ne!(file_sha(&lun), original);
    assert_eq!(
        sha(&read_through_export(&env, &format!("{lun}@s1"))),
        sha(&at_snapshot)
    );
}

#[test]
fn rollback_returns_the_source_to_the_session() {
    let env = Env::new();
    let lun = env.file("disk.img", SIZE, 4);
    let original = file_sha(&lun);
    env.ok(&["snapshot", "create", &lun, "s1"]);
    let export = env.export(&lun, &[]);
    let c = export.client();
    for i in 0..8u64 {
        c.write_at(&[0xEE; 65536], i * MIB).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    export.stop();
    assert_ne!(file_sha(&lun), original);

    let out = env.ok(&["snapshot", "rollback", &lun, "s1"]);
    assert!(out.contains("rolling back"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !env.list(&lun)["rollback"].is_null() {
        assert!(Instant::now() < deadline, "the rollback did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The background runner releases the LUN once done.
    let held = || {
        env.path("run/luns")
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "lock"))
    };
    while held() {
        assert!(
            Instant::now() < deadline,
            "the rollback runner did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(file_sha(&lun), original, "the source is back to s1");
    let fsck = env.ok(&["snapshot", "fsck", &env.p("disk.img.snap")]);
    assert!(fsck.contains("clean"), "{fsck}");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let env = Env::new();
    let lun = env.file("a.img", SIZE, 5);
    let other = env.file("b.img", SIZE, 6);
    env.ok(&["snapshot", "create", &lun, "s1"]);
    let pool = env.p("a.img.snap");
    let hashes = || (file_sha(&lun), file_sha(&pool), file_sha(&other));
    let before = hashes();

    let err = env.fails(&["snapshot", "delete", &lun, "nope"]);
    assert!(err.contains("no snapshot session named \"nope\""), "{err}");
    let err = env.fails(&["snapshot", "rollback", &lun, "nope"]);
    assert!(err.contains("nope"), "{err}");
    let err = env.fails(&["snapshot", "create", &lun, "s1"]);
    assert!(err.contains("already exists"), "{err}");
    let err = env.fails(&["snapshot", "create", &lun, "bad/name"]);
    assert!(err.contains("bad session name"), "{err}");
    let err = env.fails(&[
        "snapshot",
        "create",
        &lun,
        "s2",
        "--pool",
        &env.p("elsewhere.snap"),
    ]);
    assert!(err.contains("naming another pool"), "{err}");
    assert!(!env.path("elsewhere.snap").exists());

    // A pool of another source, a pool too small: refused, no pool left behind.
    let err = env.fails(&["snapshot", "create", &other, "s1", "--pool", &pool]);
    assert!(err.contains("already the snapshot pool of"), "{err}");
    let err = env.fails(&["snapshot", "create", &other, "s1", "--pool-size", "64K"]);
    assert!(err.contains("pool too small"), "{err}");
    assert!(!env.path("b.img.snap").exists());
    let err = env.fails(&["snapshot", "list", &format!("{lun}@s1")]);
    assert!(err.contains("not its session"), "{err}");
    let err = env.fails(&["-d", &lun, "snapshot", "list", &lun]);
    assert!(err.contains("not a vapp datastore"), "{err}");
    assert_eq!(hashes(), before);
    let fsck = env.ok(&["snapshot", "fsck", &pool]);
    assert!(fsck.contains("clean"), "{fsck}");
}

#[test]
fn an_nbd_lun_needs_pool_at_its_first_session_and_the_registry_finds_it() {
    let env = Env::new();
    let lun = env.file("disk.img", SIZE, 7);
    let export = env.export(&lun, &[]);
    let url = export.url.clone();
    let err = env.fails(&["snapshot", "create", &url, "s1"]);
    assert!(err.contains("--pool"), "{err}");
    let pool = env.p("remote.snap");
    env.ok(&["snapshot", "create", &url, "s1", "--pool", &pool]);
    // Found again through this host's registry, from the URL alone.
    let listing = env.list(&url);
    assert_eq!(listing["pool"], pool);
    assert_eq!(listing["sessions"][0]["name"], "s1");
    // Read through the session while the export still serves its source.
    let session = read_through_export(&env, &format!("{url}@s1"));
    assert_eq!(sha(&session), file_sha(&lun));
    export.stop();
}

#[test]
fn a_consistency_group_takes_one_session_on_every_member() {
    let env = Env::new();
    let a = env.file("a.img", SIZE, 8);
    let b = env.file("b.img", SIZE, 9);
    env.ok(&["snapshot", "group", "create", "app", &a, &b]);
    let err = env.fails(&["snapshot", "group", "create", "dup", &a, &a]);
    assert!(err.contains("twice"), "{err}");
    env.ok(&["snapshot", "group", "snapshot", "app", "g1"]);
    let (la, lb) = (env.list(&a), env.list(&b));
    assert_eq!(la["sessions"][0]["name"], "g1");
    assert_eq!(lb["sessions"][0]["name"], "g1");
    assert!(!la["sessions"][0]["group"].is_null());
    assert_eq!(la["sessions"][0]["group"], lb["sessions"][0]["group"]);
    let err = env.fails(&["snapshot", "group", "snapshot", "nogroup", "g1"]);
    assert!(err.contains("no group nogroup"), "{err}");
}

/// A datastore in a file, served by `vapp export`, written by two hosts over NBD and
/// snapshotted while they write: the session is a crash-consistent datastore holding
/// every file acknowledged before the snapshot. Then a direct writer (`-d FILE put`, no
/// server) goes through the engine too: the session does not change.
#[test]
fn a_datastore_snapshotted_while_two_hosts_write_over_nbd_is_consistent() {
    let env = Env::new();
    let ds = env.p("ds.vmfs");
    env.ok(&[
        "datastore",
        "format",
        &ds,
        "--name",
        "snap",
        "--size",
        "128M",
        "--io-timeout",
        "1s",
        "--lock-protocol",
        "paxos",
    ]);
    let local = env.file("payload.bin", 200_000, 10);
    let export = env.export(&ds, &[]);
    let url = export.url.clone();
    let acked = std::sync::Mutex::new(Vec::<(String, Instant)>::new());
    let snapshot_at = std::sync::Mutex::new(None::<Instant>);
    std::thread::scope(|scope| {
        for host in 1..=2u8 {
            let (env, url, local, acked, snapshot_at) = (&env, &url, &local, &acked, &snapshot_at);
            scope.spawn(move || {
                for i in 0.. {
                    let name = format!("/h{host}-{i}");
                    let out = env
                        .command()
                        .args(["-d", url, "put", local, &name])
                        .env("VAPP_HOST_NAME", format!("host-{host}"))
                        .env(
                            "VAPP_HOST_UUID",
                            format!("00000000-0000-4000-8000-0000000000{host:02x}"),
                        )
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "put {name}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    acked.lock().unwrap().push((name, Instant::now()));
                    let taken = *snapshot_at.lock().unwrap();
                    if taken.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) && i >= 3 {
                        break;
                    }
                }
            });
        }
        while acked.lock().unwrap().len() < 3 {
            std::thread::sleep(Duration::from_millis(50));
        }
        let started = Instant::now();
        env.ok(&["snapshot", "create", &ds, "s1"]);
        *snapshot_at.lock().unwrap() = Some(started);
    });
    let started = snapshot_at.lock().unwrap().unwrap();
    let before: Vec<String> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t)| *t < started)
        .map(|(n, _)| n.clone())
        .collect();
    assert!(before.len() >= 3);

    // Checked twice: through the export that still serves the LUN, then from the pool.
    let at = format!("{ds}@s1");
    let check = || {
        let fsck = env.vapp(&["datastore", "fsck", &at]);
        assert!(
            fsck.status.success(),
            "the session's datastore is consistent: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        let ls = env.ok(&["-d", &at, "ls", "/"]);
        for name in &before {
            assert!(
                ls.contains(&name[1..]),
                "{name} acknowledged before the snapshot is missing: {ls}"
            );
        }
    };
    check();
    export.stop();
    check();

    // No server now: a direct writer opens the LUN through the engine.
    let session = sha(&read_through_export(&env, &at));
    env.ok(&["-d", &ds, "put", &local, "/direct"]);
    assert!(env.ok(&["-d", &ds, "ls", "/"]).contains("direct"));
    assert!(!env.ok(&["-d", &at, "ls", "/"]).contains("direct"));
    assert_eq!(
        sha(&read_through_export(&env, &at)),
        session,
        "the session did not change"
    );
}

#[test]
fn formatting_a_lun_that_has_sessions_goes_through_the_engine() {
    let env = Env::new();
    // Patterned all through: format zeroes the metadata regions, and the session keeps
    // every chunk it overwrites (the pool holds the whole LUN).
    let lun = env.file("disk.img", 80 * MIB, 11);
    let original = file_sha(&lun);
    env.ok(&["snapshot", "create", &lun, "s1", "--pool-size", "100M"]);
    env.ok(&[
        "datastore",
        "format",
        &lun,
        "--name",
        "x",
        "--lock-protocol",
        "paxos",
        "--block-size",
        "64K",
        "--max-files",
        "64",
    ]);
    assert_ne!(file_sha(&lun), original);
    assert_eq!(
        sha(&read_through_export(&env, &format!("{lun}@s1"))),
        original
    );

    // A process using the LUN through the engine (here exporting a file of the datastore)
    // takes snapshot commands for it, and refuses a rollback under itself.
    let local = env.file("payload.bin", 128 * 1024, 12);
    env.ok(&["-d", &lun, "put", &local, "/f"]);
    let user = env.export("/f", &["-d", &lun]);
    env.ok(&["snapshot", "create", &lun, "s2"]);
    let listing = env.list(&lun);
    assert_eq!(listing["served_by"], user.child.id());
    assert_eq!(listing["sessions"][1]["name"], "s2");
    let err = env.fails(&["snapshot", "rollback", &lun, "s1"]);
    assert!(err.contains("stop it first"), "{err}");
    let err = env.fails(&["-d", &lun, "put", &local, "/g"]);
    assert!(err.contains(&format!("pid {}", user.child.id())), "{err}");
    user.stop();
    assert!(
        env.ok(&["-d", &format!("{lun}@s2"), "ls", "/"])
            .contains('f')
    );
}

#[test]
fn the_first_snapshot_waits_until_no_other_process_writes_around_the_engine() {
    let env = Env::new();
    let lun = env.file("disk.img", SIZE, 13);
    let first = env.export(&lun, &[]);
    let second = env.export(&lun, &[]);
    let err = env.fails(&["snapshot", "create", &lun, "s1"]);
    assert!(
        err.contains("another vapp process writes it directly"),
        "{err}"
    );
    assert!(!env.path("disk.img.snap").exists(), "no pool was made");
    second.stop();
    env.ok(&["snapshot", "create", &lun, "s1"]);
    // Now protected: a second server is refused, naming the first.
    let socket = env.p("third.sock");
    let err = env.fails(&["export", &lun, "--socket", &socket]);
    assert!(err.contains(&format!("pid {}", first.child.id())), "{err}");
    first.stop();
}

#[test]
fn a_block_device_names_its_pool_once_and_this_hosts_registry_finds_it() {
    if !lun::prereq::require(
        lun::prereq::is_root() && lun::prereq::have_command("losetup"),
        "root and losetup for a loop device",
    ) {
        return;
    }
    let env = Env::new();
    let backing = env.file("backing.img", SIZE, 14);
    let original = file_sha(&backing);
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", &backing])
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup failed");
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(dev.clone());

    let err = env.fails(&["snapshot", "create", &dev, "s1"]);
    assert!(err.contains("--pool"), "{err}");
    let pool = env.p("loop.snap");
    env.ok(&["snapshot", "create", &dev, "s1", "--pool", &pool]);
    assert_eq!(env.list(&dev)["pool"], pool);

    let export = env.export(&dev, &[]);
    let c = export.client();
    c.write_at(&[0x77; 65536], 2 * MIB).unwrap();
    c.flush().unwrap();
    drop(c);
    export.stop();
    assert_ne!(file_sha(&backing), original);
    assert_eq!(
        sha(&read_through_export(&env, &format!("{dev}@s1"))),
        original
    );
}

/// A datastore formatted with the defaults on a local file locks by compare-and-write: with
/// snapshots it is still mounted read-write (the engine does the test-and-set), and a
/// writable snapshot of it is a copy of the datastore, refused read-write while the original
/// is here until it is resignatured; then the two are written side by side.
#[test]
fn a_compare_and_write_datastore_with_snapshots_stays_writable_and_its_snapshot_is_a_copy() {
    let env = Env::new();
    let ds = env.p("ds.vmfs");
    env.ok(&[
        "datastore",
        "format",
        &ds,
        "--name",
        "cas",
        "--size",
        "256M",
    ]);
    let local = env.path("a.bin");
    std::fs::write(&local, pattern(200_000, 3)).unwrap();
    env.ok(&["-d", &ds, "put", path_str(&local), "/a.bin"]);
    env.ok(&["snapshot", "create", &ds, "w1", "--writable"]);
    env.ok(&["-d", &ds, "mkdir", "/after"]);
    env.ok(&["-d", &ds, "rm", "/a.bin"]);

    let session = format!("{ds}@w1");
    let info = env.ok(&["datastore", "info", &session]);
    assert!(info.contains("copy        yes"), "{info}");
    let refused = env.fails(&["-d", &session, "mkdir", "/x"]);
    assert!(refused.contains("is a copy"), "{refused}");
    assert!(refused.contains("resignature"), "{refused}");
    env.ok(&["datastore", "resignature", &session, "--name", "test-copy"]);
    env.ok(&["-d", &session, "mkdir", "/x"]);

    let listing = |spec: &str| env.ok(&["-d", spec, "ls", "/"]);
    assert_eq!(
        listing(&session).split_whitespace().collect::<Vec<_>>(),
        ["a.bin", "x"]
    );
    assert_eq!(
        listing(&ds).split_whitespace().collect::<Vec<_>>(),
        ["after"]
    );
    let got = env.path("got.bin");
    env.ok(&["-d", &session, "get", "/a.bin", path_str(&got)]);
    assert_eq!(std::fs::read(&got).unwrap(), pattern(200_000, 3));
    for spec in [&ds, &session] {
        let fsck = env.ok(&["datastore", "fsck", spec]);
        assert!(fsck.contains("clean"), "{spec}: {fsck}");
    }
}
