//! `vapp datastore fsck` as a user runs it after a crash or on a damaged datastore.
//!
//! A host killed with -9 while it had an unlinked file open leaves unfinished work behind:
//! its slot is still live, its orphan list names the file, and the file's descriptor and
//! blocks are still allocated. fsck reports that as recovery pending (exit 0, not damage),
//! and the next command of any host on the same machine recovers the dead host at once.
//!
//! Random bytes over the Disk Paxos lease areas: fsck says so in a few lines (one per kind
//! of damage), `--repair` rewrites them, and `put` and `rm` work again.
#![allow(clippy::unwrap_used)]

mod cluster_support;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use cluster_support::*;
use vmfs::{Access, Datastore, NewFile, OpenOptions};

const TEST: &str = "a_dead_hosts_unfinished_delete_is_pending_recovery_until_the_next_command";

/// Deletes /gone while holding it open, makes that durable, and waits to be killed.
fn doomed() {
    init_host_logging();
    let lun = lun::open(&var("LUN"), &lun::OpenOptions::default()).unwrap();
    let ds = Datastore::open(lun, &OpenOptions::default()).unwrap();
    let a = ds.create_path("/gone", &NewFile::default()).unwrap();
    ds.write(a.ino, 0, &vec![7u8; 300 << 10]).unwrap();
    let held = ds.open_path("/gone", Access::Exclusive).unwrap();
    ds.remove_path("/gone", false).unwrap();
    ds.sync().unwrap();
    report(format!("ORPHANED {}", ds.host_slot().unwrap()));
    wait_for_stdin_eof();
    drop(held);
}

fn fsck_json(lun: &str) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(vapp())
        .args(["datastore", "fsck", lun, "--json"])
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fsck --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), v)
}

#[test]
fn a_dead_hosts_unfinished_delete_is_pending_recovery_until_the_next_command() {
    if role().as_deref() == Some("doomed") {
        return doomed();
    }
    let dir = scratch_dir();
    let lun = format_datastore(dir.path(), "cas", "2s");
    let lun = lun.to_str().unwrap().to_string();
    let mut host = spawn(TEST, "doomed", "doomed", &[("LUN", lun.clone())], &[]);
    let slot = host.expect("ORPHANED", Duration::from_secs(30));
    let slot = slot.trim_start_matches("ORPHANED ").to_string();
    host.kill9();

    // Right after the kill: the dead host's work is pending, nothing is damaged.
    let (code, report) = fsck_json(&lun);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["clean"], true, "{report:#}");
    assert_eq!(report["remaining"], 0, "{report:#}");
    assert!(report["pending"].as_u64().unwrap() > 0, "{report:#}");
    let findings = report["findings"].as_array().unwrap();
    assert!(
        findings
            .iter()
            .all(|f| f["severity"] != "error" && f["repaired"] == false),
        "{report:#}"
    );
    let pending: Vec<&serde_json::Value> = findings
        .iter()
        .filter(|f| f["severity"] == "pending")
        .collect();
    let slot_object = format!("host slot {slot}");
    assert!(
        pending
            .iter()
            .any(|f| f["object"].as_str().unwrap().contains(&slot_object)
                && f["problem"]
                    .as_str()
                    .unwrap()
                    .contains("interrupted delete")),
        "{report:#}"
    );
    assert!(
        pending
            .iter()
            .all(|f| f["repair"].as_str().unwrap().contains("doomed")),
        "each pending item names the dead host and who finishes it: {report:#}"
    );
    let (_, text, _) = run_vapp(&["datastore", "fsck", &lun], &[]);
    assert!(text.contains("recovery pending"), "{text}");

    // Any short-lived command of this machine (another host identity) recovers it first.
    let (ok, _, err) = run_vapp(&["-d", &lun, "mkdir", "/after"], &[]);
    assert!(ok, "{err}");
    let (code, report) = fsck_json(&lun);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["pending"], 0, "{report:#}");
    assert_eq!(report["problems"], 0, "{report:#}");
    let (ok, out, err) = run_vapp(&["-d", &lun, "ls", "/"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("after") && !out.contains("gone"), "{out}");
}

#[test]
fn random_bytes_over_the_lease_areas_are_reported_by_kind_and_repaired() {
    let dir = scratch_dir();
    let lun = format_datastore(dir.path(), "paxos", "200ms");
    let path = lun.clone();
    let lun = lun.to_str().unwrap().to_string();
    let src = dir.path().join("src");
    std::fs::write(&src, b"before the damage").unwrap();
    let (ok, _, err) = run_vapp(&["-d", &lun, "put", src.to_str().unwrap(), "/before"], &[]);
    assert!(ok, "{err}");
    let sb = {
        let raw = lun::open(&lun, &lun::OpenOptions::default()).unwrap();
        vmfs::read_superblock(&*raw).unwrap().0
    };
    let noise: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&noise, sb.lease_offset)
        .unwrap();

    let out = std::process::Command::new(vapp())
        .args(["datastore", "fsck", &lun])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("lease area") && text.contains("NOT CLEAN"),
        "{text}"
    );
    assert!(
        text.lines().count() <= 6,
        "one line per kind of damage expected:\n{text}"
    );
    let (_, verbose, _) = run_vapp(&["datastore", "fsck", &lun, "--verbose"], &[]);
    assert!(verbose.lines().count() > 200, "{verbose}");
    let (code, report) = fsck_json(&lun);
    assert_eq!(code, 1);
    let groups = report["groups"].as_array().unwrap();
    let counted: u64 = groups.iter().map(|g| g["count"].as_u64().unwrap()).sum();
    assert_eq!(
        counted as usize,
        report["findings"].as_array().unwrap().len()
    );
    assert!(groups.len() <= 4, "{groups:#?}");

    let (ok, out, err) = run_vapp(&["datastore", "fsck", &lun, "--repair"], &[]);
    assert!(ok, "{out}{err}");
    let (code, report) = fsck_json(&lun);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["problems"], 0, "{report:#}");
    let start = Instant::now();
    let (ok, _, err) = run_vapp(&["-d", &lun, "put", src.to_str().unwrap(), "/after"], &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = run_vapp(&["-d", &lun, "rm", "/before"], &[]);
    assert!(ok, "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "put and rm took {:?}",
        start.elapsed()
    );
    let (ok, out, err) = run_vapp(&["-d", &lun, "cat", "/after"], &[]);
    assert!(ok && out == "before the damage", "{out}{err}");
    assert_fsck_clean(&lun);
}
