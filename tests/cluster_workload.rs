//! Four host processes work on one datastore file at once for a bounded time: create,
//! write, extend, shrink, rename and delete in a shared directory and in private ones, and
//! append records to one shared file under its exclusive lock. Each host reports what it
//! saw acknowledged; afterwards every acknowledged byte must be there, every append exactly
//! once, and fsck must find the datastore clean.
#![allow(clippy::unwrap_used)]

mod cluster_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cluster_support::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use vmfs::{Access, Datastore, Error, NewFile, OpenOptions};

const RECORD: usize = 32;

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One host: random operations on its own files until the time is up.
fn workload() {
    init_host_logging();
    let name = var("VAPP_HOST_NAME");
    let seconds: u64 = var("SECONDS").parse().unwrap();
    let seed: u64 = var("SEED").parse().unwrap();
    let lun = lun::open(&var("LUN"), &lun::OpenOptions::default()).unwrap();
    let ds = Datastore::open(lun, &OpenOptions::default()).unwrap();
    report(format!("SLOT {}", ds.host_slot().unwrap()));
    let private = format!("/{name}");
    ds.mkdir_path(&private, 0o755, vmfs::Creds::default())
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut next = 0u64;
    let mut appends = 0u64;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut ops = 0u64;
    while Instant::now() < deadline {
        ops += 1;
        let dir = if rng.random_bool(0.5) {
            "/shared"
        } else {
            private.as_str()
        };
        let pick = |rng: &mut StdRng, model: &BTreeMap<String, Vec<u8>>| {
            let k = rng.random_range(0..model.len());
            model.keys().nth(k).cloned().unwrap()
        };
        match rng.random_range(0..100) {
            0..=24 => {
                let path = format!("{dir}/{name}-{next}");
                next += 1;
                let data = bytes(rng.random_range(0..150_000), rng.random());
                let a = ds.create_path(&path, &NewFile::default()).unwrap();
                ds.write(a.ino, 0, &data).unwrap();
                model.insert(path, data);
            }
            25..=44 if !model.is_empty() => {
                let path = pick(&mut rng, &model);
                let data = model.get_mut(&path).unwrap();
                let off = rng.random_range(0..data.len() + 70_000);
                let chunk = bytes(rng.random_range(1..90_000), rng.random());
                let ino = ds.resolve(&path).unwrap();
                ds.write(ino, off as u64, &chunk).unwrap();
                if data.len() < off + chunk.len() {
                    data.resize(off + chunk.len(), 0);
                }
                data[off..off + chunk.len()].copy_from_slice(&chunk);
            }
            45..=54 if !model.is_empty() => {
                let path = pick(&mut rng, &model);
                let data = model.get_mut(&path).unwrap();
                let size = if rng.random_bool(0.6) {
                    data.len() + rng.random_range(1..300_000)
                } else {
                    rng.random_range(0..data.len() + 1)
                };
                let ino = ds.resolve(&path).unwrap();
                ds.truncate(ino, size as u64).unwrap();
                data.resize(size, 0);
            }
            55..=69 if !model.is_empty() => {
                let from = pick(&mut rng, &model);
                let to = format!("{dir}/{name}-{next}");
                next += 1;
                ds.rename_path(&from, &to).unwrap();
                let data = model.remove(&from).unwrap();
                model.insert(to, data);
            }
            70..=79 if !model.is_empty() => {
                let path = pick(&mut rng, &model);
                ds.remove_path(&path, false).unwrap();
                model.remove(&path);
            }
            80..=94 => {
                // Append a record to the shared log under its exclusive lock: two holders at
                // once would write at the same end and lose a record.
                let log = loop {
                    match ds.open_path("/shared/log", Access::Exclusive) {
                        Ok(h) => break h,
                        Err(Error::Busy { .. }) => std::thread::sleep(Duration::from_millis(2)),
                        Err(e) => panic!("{e}"),
                    }
                };
                let end = log.size().unwrap();
                let mut rec = format!("{name}:{appends}").into_bytes();
                rec.resize(RECORD - 1, b' ');
                rec.push(b'\n');
                log.write_at(&rec, end).unwrap();
                log.sync().unwrap();
                drop(log);
                report(format!("APPEND {name}:{appends}"));
                appends += 1;
            }
            _ => ds.sync().unwrap(),
        }
    }
    ds.close().unwrap();
    for (path, data) in &model {
        report(format!("FILE {path} {} {}", data.len(), hex(data)));
    }
    report(format!("DONE {ops}"));
}

#[test]
fn four_hosts_lose_nothing_acknowledged_with_compare_and_write() {
    four_hosts(
        "four_hosts_lose_nothing_acknowledged_with_compare_and_write",
        "cas",
    );
}

#[test]
fn four_hosts_lose_nothing_acknowledged_with_disk_paxos() {
    four_hosts(
        "four_hosts_lose_nothing_acknowledged_with_disk_paxos",
        "paxos",
    );
}

fn four_hosts(test: &str, protocol: &str) {
    if let Some(role) = role() {
        assert_eq!(role, "workload");
        workload();
        return;
    }
    let dir = scratch_dir();
    let lun = format_datastore(dir.path(), protocol, "200ms");
    let lun_s = lun.to_str().unwrap().to_string();
    let (ok, _, err) = run_vapp(&["-d", &lun_s, "mkdir", "/shared"], &[]);
    assert!(ok, "{err}");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let (ok, _, err) = run_vapp(
        &["-d", &lun_s, "put", empty.to_str().unwrap(), "/shared/log"],
        &[],
    );
    assert!(ok, "{err}");

    let started = Instant::now();
    let mut hosts: Vec<Host> = (0..4)
        .map(|i| {
            spawn(
                test,
                "workload",
                &format!("host{i}"),
                &[
                    ("LUN", lun_s.clone()),
                    ("SECONDS", "4".into()),
                    ("SEED", (1000 + i).to_string()),
                ],
                &[],
            )
        })
        .collect();
    let mut files = BTreeMap::new();
    let mut appended = BTreeSet::new();
    let mut slots = BTreeSet::new();
    for h in &mut hosts {
        let slot = h.expect("SLOT", Duration::from_secs(30));
        slots.insert(slot);
        let lines = h.collect_until("DONE", Duration::from_secs(90));
        let status = h.wait(Duration::from_secs(30));
        assert!(
            status.success(),
            "host {} failed:\n{}",
            h.name,
            h.stderr_text()
        );
        let done = lines.last().unwrap();
        let ops: u64 = done.trim_start_matches("DONE ").parse().unwrap();
        assert!(ops > 20, "host {} did only {ops} operations", h.name);
        for line in lines {
            if let Some(f) = line.strip_prefix("FILE ") {
                let mut parts = f.rsplitn(3, ' ');
                let sha = parts.next().unwrap().to_string();
                let len: usize = parts.next().unwrap().parse().unwrap();
                let path = parts.next().unwrap().to_string();
                files.insert(path, (len, sha));
            } else if let Some(a) = line.strip_prefix("APPEND ") {
                appended.insert(a.to_string());
            }
        }
    }
    assert_eq!(slots.len(), 4, "four hosts, four host ids: {slots:?}");
    eprintln!(
        "4 hosts ({protocol}) ran for {:?}: {} files, {} appends",
        started.elapsed(),
        files.len(),
        appended.len()
    );

    let lun_ro = lun::open(
        &lun_s,
        &lun::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ds = Datastore::open(lun_ro, &OpenOptions::read_only()).unwrap();
    for (path, (len, sha)) in &files {
        let attr = ds
            .stat_path(path)
            .unwrap_or_else(|e| panic!("acknowledged file lost: {e}"));
        assert_eq!(attr.size, *len as u64, "{path}");
        let mut data = vec![0u8; *len];
        ds.read(attr.ino, 0, &mut data).unwrap();
        assert_eq!(
            &hex(&data),
            sha,
            "{path}: content differs from what was acknowledged"
        );
    }
    // Nothing the hosts did not acknowledge is left in the directories either.
    let listed: BTreeSet<String> = ds
        .list("/shared")
        .unwrap()
        .into_iter()
        .map(|(n, _)| format!("/shared/{}", n.to_string_lossy()))
        .filter(|p| p != "/shared/log")
        .chain((0..4).flat_map(|i| {
            let d = format!("/host{i}");
            ds.list(&d)
                .unwrap()
                .into_iter()
                .map(move |(n, _)| format!("{d}/{}", n.to_string_lossy()))
        }))
        .collect();
    let expected: BTreeSet<String> = files.keys().cloned().collect();
    assert_eq!(
        listed, expected,
        "directory contents differ from the hosts' models"
    );

    let log = ds.stat_path("/shared/log").unwrap();
    let mut data = vec![0u8; log.size as usize];
    ds.read(log.ino, 0, &mut data).unwrap();
    assert_eq!(data.len() % RECORD, 0, "torn append");
    let records: Vec<String> = data
        .chunks(RECORD)
        .map(|r| String::from_utf8_lossy(r).trim().to_string())
        .collect();
    let unique: BTreeSet<String> = records.iter().cloned().collect();
    assert_eq!(unique.len(), records.len(), "an append was written twice");
    assert_eq!(
        unique, appended,
        "appends lost or invented: exclusive lock violated"
    );
    assert!(appended.len() > 10, "too few appends: {}", appended.len());
    drop(ds);
    assert_fsck_clean(&lun_s);
}
