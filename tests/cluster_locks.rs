//! File locks between host processes: an exclusive open is refused to every other host with
//! an error naming the holder (the `vapp` CLI too), read-only shared opens coexist,
//! multi-writer holders write the same file at the same time; `vapp datastore hosts` shows
//! who holds what.
#![allow(clippy::unwrap_used)]

mod cluster_support;

use std::time::Duration;

use cluster_support::*;
use vmfs::{Access, Datastore, Error, OpenOptions};

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A host that opens one file, optionally writes its share of it, and holds it until told.
fn hold() {
    init_host_logging();
    let lun = lun::open(&var("LUN"), &lun::OpenOptions::default()).unwrap();
    let ds = Datastore::open(lun, &OpenOptions::default()).unwrap();
    let access = match var("ACCESS").as_str() {
        "exclusive" => Access::Exclusive,
        "read-only" => Access::ReadOnly,
        _ => Access::MultiWriter,
    };
    let handle = match ds.open_path(&var("FILE"), access) {
        Ok(h) => h,
        Err(e @ Error::Busy { .. }) => {
            report(format!("BUSY {e}"));
            return;
        }
        Err(e) => panic!("{e}"),
    };
    report(format!("HOLDING {}", ds.host_slot().unwrap()));
    if let Ok(at) = std::env::var("WRITE_AT") {
        let at: u64 = at.parse().unwrap();
        let seed: u64 = var("SEED").parse().unwrap();
        for round in 0..10 {
            for k in 0..8u64 {
                let chunk = pattern(64 << 10, seed * 100 + k + round);
                handle.write_at(&chunk, at + k * (64 << 10)).unwrap();
            }
        }
        for k in 0..8u64 {
            handle
                .write_at(&pattern(64 << 10, seed * 100 + k), at + k * (64 << 10))
                .unwrap();
        }
        handle.sync().unwrap();
        report("WROTE");
    }
    wait_for_stdin_eof();
    drop(handle);
    ds.close().unwrap();
    report("CLOSED");
}

fn setup(protocol: &str) -> (tempfile::TempDir, String) {
    let dir = scratch_dir();
    let lun = format_datastore(dir.path(), protocol, "200ms");
    let lun = lun.to_str().unwrap().to_string();
    for args in [
        vec!["-d", &lun, "mkdir", "/vm"],
        vec![
            "-d",
            &lun,
            "vdisk",
            "create",
            "/vm/disk.vdisk",
            "--size",
            "1M",
        ],
        vec![
            "-d",
            &lun,
            "vdisk",
            "create",
            "/vm/quorum.vdisk",
            "--size",
            "1M",
            "--thick",
        ],
    ] {
        let (ok, _, err) = run_vapp(&args, &[]);
        assert!(ok, "{args:?}: {err}");
    }
    (dir, lun)
}

fn holder(
    test: &str,
    name: &str,
    lun: &str,
    file: &str,
    access: &str,
    extra: &[(&str, String)],
) -> Host {
    let mut vars = vec![
        ("LUN", lun.to_string()),
        ("FILE", file.to_string()),
        ("ACCESS", access.to_string()),
    ];
    vars.extend(extra.iter().cloned());
    spawn(test, "hold", name, &vars, &[])
}

fn exclusive_refused(test: &str, protocol: &str) {
    if role().is_some() {
        hold();
        return;
    }
    let (_dir, lun) = setup(protocol);
    let mut a = holder(test, "esx-a", &lun, "/vm/disk.vdisk", "exclusive", &[]);
    let held = a.expect("HOLDING", Duration::from_secs(30));
    let slot = held.trim_start_matches("HOLDING ").to_string();

    // Another host process is refused, and told who holds the file.
    let mut b = holder(test, "esx-b", &lun, "/vm/disk.vdisk", "exclusive", &[]);
    let busy = b.expect("BUSY", Duration::from_secs(30));
    assert!(
        busy.contains("host esx-a")
            && busy.contains(&format!("slot {slot}"))
            && busy.contains("exclusive"),
        "{busy}"
    );
    assert!(b.wait(Duration::from_secs(20)).success());

    // So is the CLI, which deletes nothing.
    let (ok, _, err) = run_vapp(&["-d", &lun, "rm", "/vm/disk.vdisk"], &[]);
    assert!(!ok, "rm of a file held open elsewhere succeeded");
    assert!(
        err.contains("/vm/disk.vdisk") && err.contains("busy") && err.contains("host esx-a"),
        "{err}"
    );
    // A read-only command takes no host id and no lock: fast next to a running host.
    let started = std::time::Instant::now();
    let (ok, out, _) = run_vapp(&["-d", &lun, "ls", "/vm"], &[]);
    let took = started.elapsed();
    assert!(ok && out.contains("disk.vdisk"), "{out}");
    assert!(took < Duration::from_millis(500), "vapp ls took {took:?}");

    // `datastore hosts` shows the holder, renewing, with its lock.
    let (ok, out, err) = run_vapp(&["datastore", "hosts", &lun, "--json"], &[]);
    assert!(ok, "{err}");
    let survey: serde_json::Value = serde_json::from_str(&out).unwrap();
    let hosts = survey["hosts"].as_array().unwrap();
    let me = hosts
        .iter()
        .find(|h| h["host_name"] == "esx-a")
        .unwrap_or_else(|| panic!("esx-a not listed: {out}"));
    assert_eq!(me["slot"].to_string(), slot);
    assert_eq!(me["renewing"], true, "{out}");
    let locks = me["locks"].as_array().unwrap();
    assert!(
        locks
            .iter()
            .any(|l| l["mode"] == "exclusive" && l["open"] == true),
        "{out}"
    );

    a.finish(Duration::from_secs(20));
    a.expect("CLOSED", Duration::from_secs(5));
    let (ok, _, err) = run_vapp(&["-d", &lun, "rm", "/vm/disk.vdisk"], &[]);
    assert!(ok, "rm after the holder closed: {err}");
    assert_fsck_clean(&lun);
}

#[test]
fn exclusive_open_is_refused_naming_the_holder_with_compare_and_write() {
    exclusive_refused(
        "exclusive_open_is_refused_naming_the_holder_with_compare_and_write",
        "cas",
    );
}

#[test]
fn exclusive_open_is_refused_naming_the_holder_with_disk_paxos() {
    exclusive_refused(
        "exclusive_open_is_refused_naming_the_holder_with_disk_paxos",
        "paxos",
    );
}

#[test]
fn read_only_opens_share_and_multi_writers_write_at_once() {
    const TEST: &str = "read_only_opens_share_and_multi_writers_write_at_once";
    if role().is_some() {
        hold();
        return;
    }
    let (_dir, lun) = setup("cas");
    let mut r1 = holder(TEST, "reader-1", &lun, "/vm/disk.vdisk", "read-only", &[]);
    let mut r2 = holder(TEST, "reader-2", &lun, "/vm/disk.vdisk", "read-only", &[]);
    r1.expect("HOLDING", Duration::from_secs(30));
    r2.expect("HOLDING", Duration::from_secs(30));
    let mut w = holder(TEST, "writer", &lun, "/vm/disk.vdisk", "exclusive", &[]);
    let busy = w.expect("BUSY", Duration::from_secs(30));
    assert!(
        busy.contains("read-only shared") && busy.contains("reader-"),
        "{busy}"
    );
    r1.finish(Duration::from_secs(20));
    r2.finish(Duration::from_secs(20));

    let half = 512u64 << 10;
    let mut m1 = holder(
        TEST,
        "mw-1",
        &lun,
        "/vm/quorum.vdisk",
        "multi-writer",
        &[("WRITE_AT", "0".into()), ("SEED", "1".into())],
    );
    let mut m2 = holder(
        TEST,
        "mw-2",
        &lun,
        "/vm/quorum.vdisk",
        "multi-writer",
        &[("WRITE_AT", half.to_string()), ("SEED", "2".into())],
    );
    m1.expect("HOLDING", Duration::from_secs(30));
    m2.expect("HOLDING", Duration::from_secs(30));
    m1.expect("WROTE", Duration::from_secs(60));
    m2.expect("WROTE", Duration::from_secs(60));
    m1.finish(Duration::from_secs(20));
    m2.finish(Duration::from_secs(20));

    let ro = lun::open(
        &lun,
        &lun::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ds = Datastore::open(ro, &OpenOptions::read_only()).unwrap();
    let f = ds.stat_path("/vm/quorum.vdisk").unwrap();
    let mut data = vec![0u8; 1 << 20];
    ds.read(f.ino, 0, &mut data).unwrap();
    for (seed, base) in [(1u64, 0usize), (2, half as usize)] {
        for k in 0..8usize {
            let at = base + k * (64 << 10);
            assert!(
                data[at..at + (64 << 10)] == pattern(64 << 10, seed * 100 + k as u64)[..],
                "writer {seed} chunk {k} lost"
            );
        }
    }
    drop(ds);
    assert_fsck_clean(&lun);
}
