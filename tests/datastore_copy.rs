//! Copies of a datastore (what an array snapshot or clone looks like: `cp --sparse=always`
//! of the image) are told from their original by the LUN identity recorded at format, as
//! VMFS tells snapshot LUNs: `datastore info` says so, read-write opens are refused while
//! the original is reachable, `datastore resignature` gives the copy a signature of its
//! own, and `--keep-signature` opens it in the original's place once that is gone.
#![allow(clippy::unwrap_used)]

mod export_support;
mod fuse_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use fuse_support::{Fixture, Mounted, fuse_available, sh, sha256_file};

fn vapp_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(args)
        .env_remove("VAPP_DATASTORE")
        .env_remove("VAPP_HOST_NAME")
        .env_remove("VAPP_HOST_UUID")
        .env_remove("VAPP_KEEP_SIGNATURE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn vapp(args: &[&str]) -> Output {
    vapp_env(args, &[])
}

fn ok(args: &[&str]) -> String {
    let out = vapp(args);
    assert!(
        out.status.success(),
        "vapp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fails with status 1 and one line on stderr holding every needle; returns that line.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let out = vapp(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "vapp {args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    }
    stderr
}

fn info(lun: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["datastore", "info", lun, "--json"])).unwrap()
}

fn assert_clean(lun: &str) {
    let report: serde_json::Value =
        serde_json::from_str(&ok(&["datastore", "fsck", lun, "--json"])).unwrap();
    assert_eq!(report["clean"], true, "fsck of {lun}: {report}");
}

/// A datastore file with a small and a multi-block file, and the local originals.
struct Original {
    dir: tempfile::TempDir,
    lun: PathBuf,
    files: Vec<(String, PathBuf)>,
}

impl Original {
    fn new(extra: &[&str]) -> Original {
        let dir = tempfile::tempdir().unwrap();
        let lun = dir.path().join("orig.vmfs");
        let mut args = vec![
            "datastore",
            "format",
            lun.to_str().unwrap(),
            "--name",
            "prod",
            "--size",
            "256M",
            "--io-timeout",
            "100ms",
        ];
        args.extend_from_slice(extra);
        ok(&args);
        let small = dir.path().join("small.txt");
        std::fs::write(&small, b"hello from the original\n").unwrap();
        let big = dir.path().join("big.bin");
        let data: Vec<u8> = (0..3_500_000u32).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(&big, data).unwrap();
        let ds = lun.to_str().unwrap();
        ok(&["-d", ds, "mkdir", "-p", "/vms/web"]);
        ok(&[
            "-d",
            ds,
            "put",
            small.to_str().unwrap(),
            "/vms/web/small.txt",
        ]);
        ok(&["-d", ds, "put", big.to_str().unwrap(), "/vms/web/big.bin"]);
        let files = vec![
            ("/vms/web/small.txt".to_string(), small),
            ("/vms/web/big.bin".to_string(), big),
        ];
        Original { dir, lun, files }
    }

    fn lun(&self) -> &str {
        self.lun.to_str().unwrap()
    }

    /// `cp --sparse=always` of the image, as an array copy looks to a host.
    fn copy(&self, name: &str) -> PathBuf {
        let copy = self.dir.path().join(name);
        sh(&format!(
            "cp --sparse=always '{}' '{}'",
            self.lun.display(),
            copy.display()
        ));
        copy
    }

    /// Every file reads back from `lun` with the original bytes.
    fn assert_files(&self, lun: &str) {
        for (i, (path, local)) in self.files.iter().enumerate() {
            let back = self.dir.path().join(format!("back-{i}"));
            let _ = std::fs::remove_file(&back);
            ok(&["-d", lun, "get", path, back.to_str().unwrap()]);
            assert_eq!(
                std::fs::read(&back).unwrap(),
                std::fs::read(local).unwrap(),
                "{path} on {lun}"
            );
        }
    }
}

fn sha(path: &Path) -> String {
    sha256_file(path)
}

#[test]
fn a_copy_is_refused_read_write_while_its_original_exists_until_resignatured() {
    let orig = Original::new(&[]);
    let copy = orig.copy("copy.vmfs");
    let cp = copy.to_str().unwrap();

    let before = info(cp);
    assert_eq!(before["copy"], "yes", "{before}");
    assert_eq!(before["uuid"], info(orig.lun())["uuid"]);
    let original = before["lun_identity"]["original"].as_str().unwrap();
    assert!(original.ends_with("orig.vmfs"), "{before}");
    assert!(
        ok(&["datastore", "info", cp]).contains("copy        yes"),
        "text info names the copy"
    );
    assert_eq!(info(orig.lun())["copy"], "no");

    // Read-write is refused, naming both LUNs and both ways out; nothing changes.
    let image = sha(&copy);
    for rw in [
        vec!["-d", cp, "mkdir", "/new"],
        vec!["--keep-signature", "-d", cp, "mkdir", "/new"],
    ] {
        fails(
            &rw,
            &[
                "is a copy",
                "orig.vmfs",
                "copy.vmfs",
                "datastore resignature",
                "--keep-signature",
            ],
        );
    }
    assert_eq!(sha(&copy), image, "a refused open changed the copy");

    // Read-only works: files read back, fsck is clean.
    orig.assert_files(cp);
    assert_clean(cp);

    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "datastore",
        "resignature",
        cp,
        "--name",
        "prod-clone",
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["label"], "prod-clone");
    let after = info(cp);
    assert_eq!(after["copy"], "no", "{after}");
    assert_eq!(after["label"], "prod-clone");
    assert_ne!(after["uuid"], info(orig.lun())["uuid"]);
    assert_eq!(report["uuid"], after["uuid"]);

    // Both mount read-write side by side, keep the same files, and stay clean.
    ok(&["-d", cp, "mkdir", "/only-in-clone"]);
    ok(&["-d", orig.lun(), "mkdir", "/only-in-prod"]);
    orig.assert_files(cp);
    orig.assert_files(orig.lun());
    assert!(!ok(&["-d", orig.lun(), "ls", "/"]).contains("only-in-clone"));
    assert_clean(cp);
    assert_clean(orig.lun());

    // A second copy resignatured without a name is called snap-XXXXXXXX-prod.
    let second = orig.copy("second.vmfs");
    ok(&["datastore", "resignature", second.to_str().unwrap()]);
    let label = info(second.to_str().unwrap())["label"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        label.starts_with("snap-") && label.ends_with("-prod") && label.len() == 18,
        "{label}"
    );
}

#[test]
fn keep_signature_opens_a_copy_whose_original_is_gone() {
    let orig = Original::new(&[]);
    let copy = orig.copy("replica.vmfs");
    let cp = copy.to_str().unwrap();
    let uuid = info(orig.lun())["uuid"].clone();
    std::fs::remove_file(&orig.lun).unwrap();

    let recorded = info(cp)["lun_identity"]["recorded"].clone();
    assert_eq!(info(cp)["copy"], "yes");
    assert_eq!(
        info(cp)["lun_identity"]["original"],
        serde_json::Value::Null
    );
    fails(
        &["-d", cp, "mkdir", "/failover"],
        &["is a copy", "not reachable", "--keep-signature"],
    );

    ok(&["--keep-signature", "-d", cp, "mkdir", "/failover"]);
    let out = vapp_env(
        &["-d", cp, "mkdir", "/by-env"],
        &[("VAPP_KEEP_SIGNATURE", "1")],
    );
    assert!(out.status.success(), "{out:?}");
    orig.assert_files(cp);
    assert_clean(cp);

    // Failover keeps the signature: same UUID, same recorded identity, still a copy.
    let after = info(cp);
    assert_eq!(after["uuid"], uuid);
    assert_eq!(after["lun_identity"]["recorded"], recorded);
    assert_eq!(after["copy"], "yes");
}

#[test]
fn resignature_refuses_bad_input_and_changes_nothing() {
    let orig = Original::new(&[]);
    let copy = orig.copy("copy.vmfs");
    let cp = copy.to_str().unwrap();
    let junk = orig.dir.path().join("junk.img");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let long = "n".repeat(64);

    let images = || [sha(&orig.lun), sha(&copy), sha(&junk)];
    let before = images();
    fails(
        &["datastore", "resignature", orig.lun()],
        &["orig.vmfs", "is not a copy"],
    );
    fails(
        &["datastore", "resignature", cp, "--name", &long],
        &["copy.vmfs", "1 to 63 bytes"],
    );
    fails(
        &["datastore", "resignature", junk.to_str().unwrap()],
        &["junk.img", "not a vapp datastore"],
    );
    let missing = orig.dir.path().join("missing.vmfs");
    fails(
        &["datastore", "resignature", missing.to_str().unwrap()],
        &["missing.vmfs"],
    );
    assert!(!missing.exists(), "resignature created a file");
    assert_eq!(images(), before, "a refused resignature changed a LUN");
}

/// A loop device over the datastore's file is the same LUN, not a copy; a loop device over
/// a copy is a copy.
#[test]
fn a_loop_device_over_the_original_file_is_not_a_copy() {
    if !lun::prereq::require(
        lun::prereq::is_root() && lun::prereq::have_command("losetup"),
        "root and losetup (loop devices)",
    ) {
        return;
    }
    // Disk Paxos: a loop device is a block device, where a file's OFD lock is not enough.
    let orig = Original::new(&["--lock-protocol", "paxos"]);
    let copy = orig.copy("copy.vmfs");
    let attach = |path: &Path| {
        sh(&format!("losetup -f --show '{}'", path.display()))
            .trim()
            .to_string()
    };
    struct Detach(Vec<String>);
    impl Drop for Detach {
        fn drop(&mut self) {
            for dev in &self.0 {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
    }
    let loop_orig = attach(&orig.lun);
    let mut guard = Detach(vec![loop_orig.clone()]);
    let loop_copy = attach(&copy);
    guard.0.push(loop_copy.clone());

    assert_eq!(info(&loop_orig)["copy"], "no", "{}", info(&loop_orig));
    ok(&["-d", &loop_orig, "mkdir", "/through-loop"]);
    orig.assert_files(&loop_orig);

    assert_eq!(info(&loop_copy)["copy"], "yes");
    fails(
        &["-d", &loop_copy, "mkdir", "/x"],
        &["is a copy", "reachable"],
    );
    drop(guard);
}

/// A copy taken while a host had the datastore mounted (crash-consistent, as an array
/// snapshot is) holds that host's slot and journal: resignature replays the journal, frees
/// the slot, and every synced file reads back.
#[test]
fn resignature_replays_a_crashed_hosts_journal_and_frees_its_slot() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("256M");
    let m = Mounted::new(&fx, "mnt", &[]);
    let pid = m.daemon_pid();
    sh(&format!(
        "mkdir -p '{0}/vms/a' && head -c 3000000 /dev/urandom > '{0}/vms/a/disk' && \
         echo synced > '{0}/vms/a/note' && sync '{0}/vms/a/disk' '{0}/vms/a/note'",
        m.mountpoint.display()
    ));
    let disk = sha256_file(&m.path("vms/a/disk"));
    fuse_support::kill(pid, libc::SIGKILL);
    fuse_support::wait_until(Duration::from_secs(10), "the daemon to die", || {
        !fuse_support::alive(pid)
    });
    drop(m);

    let copy = fx.dir.path().join("snap.vmfs");
    sh(&format!(
        "cp --sparse=always '{}' '{}'",
        fx.lun.display(),
        copy.display()
    ));
    let cp = copy.to_str().unwrap();
    let live = |lun: &str| {
        info(lun)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["state"] != "free")
            .count()
    };
    assert_eq!(live(cp), 1, "the copy holds the crashed host's slot");

    let report: serde_json::Value =
        serde_json::from_str(&ok(&["datastore", "resignature", cp, "--json"])).unwrap();
    assert_eq!(report["slots_cleared"], 1, "{report}");
    assert_eq!(live(cp), 0);
    assert_clean(cp);
    let back = fx.dir.path().join("disk.back");
    ok(&["-d", cp, "get", "/vms/a/disk", back.to_str().unwrap()]);
    assert_eq!(sha256_file(&back), disk);
    assert_eq!(ok(&["-d", cp, "cat", "/vms/a/note"]), "synced\n");
    ok(&["-d", cp, "mkdir", "/after"]);
    assert_clean(cp);
}

/// Resignaturing a copy another host has mounted (here a failover mount with
/// --keep-signature) is refused, naming that host, and changes nothing.
#[test]
fn resignature_is_refused_while_a_host_is_live_on_the_copy() {
    if !fuse_available() {
        return;
    }
    let orig = Original::new(&[]);
    let copy = orig.copy("replica.vmfs");
    std::fs::remove_file(&orig.lun).unwrap();
    let fx = Fixture {
        dir: tempfile::tempdir().unwrap(),
        lun: copy.clone(),
    };
    let cp = copy.to_str().unwrap();
    let before = info(cp);
    let m = Mounted::with_env(
        &fx,
        "mnt",
        &["--host-name", "failover-host"],
        &[("VAPP_KEEP_SIGNATURE", "1")],
    );
    fails(
        &["datastore", "resignature", cp],
        &["replica.vmfs", "live host failover-host"],
    );
    let during = info(cp);
    assert_eq!(during["uuid"], before["uuid"]);
    assert_eq!(during["label"], before["label"]);
    m.unmount();
    ok(&["datastore", "resignature", cp]);
    assert_ne!(info(cp)["uuid"], before["uuid"]);
    assert_clean(cp);
}

/// Over NBD the client sees the export, not the server's LUN: a datastore reached that way
/// is never judged a copy, so the original served by qemu-nbd opens read-write.
#[test]
fn a_datastore_over_nbd_is_never_judged_a_copy() {
    if !export_support::require_tools(&[("qemu-nbd", "qemu-utils")]) {
        return;
    }
    let orig = Original::new(&["--lock-protocol", "paxos"]);
    let peer = export_support::Peer::qemu_nbd(&orig.lun, &orig.dir.path().join("nbd.sock"));
    let over_nbd = info(&peer.url);
    assert_eq!(over_nbd["copy"], "unknown", "{over_nbd}");
    assert!(
        over_nbd["lun_identity"]["found"]
            .as_str()
            .unwrap()
            .starts_with("nbd:"),
        "{over_nbd}"
    );
    ok(&["-d", &peer.url, "mkdir", "/over-nbd"]);
    orig.assert_files(&peer.url);
    drop(peer);
    assert_eq!(info(orig.lun())["copy"], "no");
    assert!(ok(&["-d", orig.lun(), "ls", "/"]).contains("over-nbd"));
}
