//! The datastore and file commands, run as a user would: the real `vapp` binary on a
//! datastore in a sparse temporary file.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn vapp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(args)
        .env_remove("VAPP_DATASTORE")
        .output()
        .unwrap()
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

/// Fails with exit code `code` and one line on stderr that mentions `needle`.
fn fails(args: &[&str], code: i32, needle: &str) {
    let out = vapp(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "vapp {args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "vapp {args:?}: stderr {stderr:?} lacks {needle:?}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
}

fn sha256(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

#[test]
fn format_put_get_ls_stat_mv_rm_fsck() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds.vmfs");
    let ds = ds.to_str().unwrap();
    ok(&["datastore", "format", ds, "--name", "cli", "--size", "1G"]);
    assert_eq!(std::fs::metadata(ds).unwrap().len(), 1 << 30);

    let info: serde_json::Value =
        serde_json::from_str(&ok(&["datastore", "info", ds, "--json"])).unwrap();
    assert_eq!(info["label"], "cli");
    assert_eq!(info["block_size"], 1 << 20);
    assert_eq!(info["superblock"], "primary");

    // A file with data, a hole and an odd tail.
    let local = dir.path().join("in.bin");
    let mut data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    data.extend(std::iter::repeat_n(0u8, 9 << 20));
    data.extend(std::iter::repeat_n(1u8, 5000));
    data.extend(std::iter::repeat_n(0u8, 3 << 20));
    data.extend_from_slice(b"tail");
    std::fs::write(&local, &data).unwrap();
    ok(&["-d", ds, "mkdir", "-p", "/vms/web01"]);
    ok(&["-d", ds, "put", local.to_str().unwrap(), "/vms/web01/"]);
    let back = dir.path().join("out.bin");
    ok(&["-d", ds, "get", "/vms/web01/in.bin", back.to_str().unwrap()]);
    assert_eq!(sha256(&local), sha256(&back));

    let ls = ok(&["-d", ds, "ls", "-l", "/vms/web01"]);
    assert!(ls.starts_with("-rw-r--r--"), "{ls}");
    assert!(
        ls.contains(&data.len().to_string()) && ls.trim_end().ends_with("in.bin"),
        "{ls}"
    );

    let stat: serde_json::Value =
        serde_json::from_str(&ok(&["-d", ds, "stat", "/vms/web01/in.bin", "--json"])).unwrap();
    assert_eq!(stat["size"], data.len() as u64);
    assert_eq!(stat["type"], "file");
    assert!(
        stat["allocated"].as_u64().unwrap() < data.len() as u64,
        "zero chunks stay holes"
    );

    ok(&[
        "-d",
        ds,
        "vdisk",
        "create",
        "/vms/web01/disk0.vdisk",
        "--size",
        "20G",
    ]);
    ok(&[
        "-d",
        ds,
        "vdisk",
        "create",
        "/vms/web01/disk1.vdisk",
        "--size",
        "4M",
        "--thick",
    ]);
    let thick: serde_json::Value =
        serde_json::from_str(&ok(&["-d", ds, "stat", "/vms/web01/disk1.vdisk", "--json"])).unwrap();
    assert_eq!(
        (thick["thick"].as_bool(), thick["allocated"].as_u64()),
        (Some(true), Some(4 << 20))
    );

    ok(&["-d", ds, "mkdir", "/archive"]);
    ok(&["-d", ds, "mv", "/vms/web01/in.bin", "/archive"]);
    assert_eq!(
        vapp(&["-d", ds, "cat", "/archive/in.bin"]).stdout.len(),
        data.len()
    );
    assert_eq!(ok(&["-d", ds, "ls", "/"]), "archive\nvms\n");
    ok(&["-d", ds, "rm", "-r", "/vms"]);
    assert_eq!(ok(&["-d", ds, "ls", "/"]), "archive\n");

    let fsck: serde_json::Value =
        serde_json::from_str(&ok(&["datastore", "fsck", ds, "--json"])).unwrap();
    assert_eq!(fsck["clean"], true);
    assert_eq!(fsck["stats"]["files"], 1);
}

#[test]
fn read_only_commands_do_not_touch_the_lun() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds.vmfs");
    let ds = ds.to_str().unwrap();
    ok(&["datastore", "format", ds, "--name", "ro", "--size", "160M"]);
    let local = dir.path().join("a.txt");
    std::fs::write(&local, "hello\n").unwrap();
    ok(&["-d", ds, "put", local.to_str().unwrap(), "/a.txt"]);
    let before = std::fs::read(ds).unwrap();
    ok(&["-d", ds, "ls", "-l", "/"]);
    ok(&["-d", ds, "stat", "/a.txt"]);
    assert_eq!(ok(&["-d", ds, "cat", "/a.txt"]), "hello\n");
    ok(&[
        "-d",
        ds,
        "get",
        "/a.txt",
        dir.path().join("b.txt").to_str().unwrap(),
    ]);
    ok(&["datastore", "info", ds]);
    ok(&["datastore", "fsck", ds]);
    assert!(
        std::fs::read(ds).unwrap() == before,
        "a read-only command wrote to the LUN"
    );
}

#[test]
fn failures_exit_non_zero_with_one_line_naming_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds.vmfs");
    let ds = ds.to_str().unwrap();
    fails(
        &["datastore", "format", ds, "--name", "tiny", "--size", "8M"],
        1,
        "minimum",
    );
    assert!(
        !Path::new(ds).exists(),
        "a failed format leaves no file behind"
    );
    ok(&["datastore", "format", ds, "--name", "x", "--size", "512M"]);
    fails(&["datastore", "format", ds, "--name", "y"], 1, "--force");
    ok(&["datastore", "format", ds, "--name", "y", "--force"]);
    fails(&["-d", ds, "cat", "/missing.txt"], 1, "/missing.txt");
    fails(&["-d", ds, "mkdir", "/a/b"], 1, "/a/b");
    let long = format!("/{}", "n".repeat(300));
    fails(&["-d", ds, "mkdir", &long], 1, "longer than 255");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 1 << 20]).unwrap();
    fails(
        &["datastore", "info", junk.to_str().unwrap()],
        1,
        "not a vapp datastore",
    );
    fails(&["ls", "/"], 1, "no datastore given");
    let usage = vapp(&["datastore", "fsck"]);
    assert_eq!(usage.status.code(), Some(2));
    fails(
        &[
            "datastore",
            "format",
            ds,
            "--name",
            "z",
            "--force",
            "--block-size",
            "3M",
        ],
        1,
        "block size",
    );
}

#[test]
fn fsck_exit_codes_follow_the_repair_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds.vmfs");
    let ds_s = ds.to_str().unwrap();
    ok(&["datastore", "format", ds_s, "--name", "f", "--size", "512M"]);
    ok(&["-d", ds_s, "mkdir", "/d"]);
    // Damage the primary superblock: fsck reports it (exit 1), --repair fixes it (exit 0).
    let f = std::fs::OpenOptions::new().write(true).open(&ds).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 8], 64).unwrap();
    let out = vapp(&["datastore", "fsck", ds_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("primary superblock"));
    let info = ok(&["datastore", "info", ds_s]);
    assert!(info.contains("WARNING"), "{info}");
    ok(&["datastore", "fsck", ds_s, "--repair"]);
    ok(&["datastore", "fsck", ds_s]);
}

/// `datastore info` says what the locks rest on and whether they hold across machines; a
/// datastore formatted on a local file (compare-and-write through a host-local lock) and
/// then reached as a block device is refused for read-write commands, naming the fix.
#[test]
fn info_tells_lock_safety_and_a_local_file_datastore_is_refused_as_a_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds.vmfs");
    let ds = ds.to_str().unwrap();
    let out = ok(&[
        "datastore",
        "format",
        ds,
        "--name",
        "safe",
        "--size",
        "256M",
    ]);
    assert!(out.contains("locking compare-and-write"), "{out}");
    let text = ok(&["datastore", "info", ds]);
    assert!(
        text.contains(
            "holds among this machine's processes only, enough here: \
             no other machine can reach a file on a local file system"
        ),
        "{text}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["datastore", "info", ds, "--json"])).unwrap();
    assert_eq!(info["lock_safety"]["safe_across_machines"], false);
    assert_eq!(info["lock_safety"]["refused"], serde_json::Value::Null);

    if !lun::prereq::require(
        lun::prereq::is_root() && lun::prereq::have_command("losetup"),
        "root and losetup for a loop device",
    ) {
        return;
    }
    let out = Command::new("losetup")
        .args(["-f", "--show", ds])
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup failed");
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    fails(
        &["-d", &dev, "mkdir", "/x"],
        1,
        "set-lock-protocol LUN paxos",
    );
    let text = ok(&["datastore", "info", &dev]);
    assert!(
        text.contains("a loop block device: formatted for compare-and-write")
            && text.contains("read-write mount refused"),
        "{text}"
    );
    // Nothing was written: the file still opens read-write where it was formatted.
    ok(&["-d", ds, "mkdir", "/x"]);

    // The fix the refusal names: `cas` stays refused through the loop device, Disk Paxos
    // is safe there, and the datastore's files are all still there.
    fails(
        &["datastore", "set-lock-protocol", &dev, "cas"],
        1,
        "--lock-protocol local",
    );
    let out = ok(&["datastore", "set-lock-protocol", &dev, "paxos"]);
    assert!(out.contains("safe across machines"), "{out}");
    ok(&["-d", &dev, "mkdir", "/y"]);
    assert!(ok(&["-d", &dev, "ls", "/"]).contains('x'));
    ok(&["datastore", "fsck", &dev]);
}

/// A LUN that held something else (random bytes, an older datastore of another geometry)
/// formats into a datastore whose every lock record, descriptor and journal reads as free:
/// files go in and out and fsck finds nothing, with either lock protocol.
#[test]
fn format_over_a_lun_that_held_other_data_leaves_nothing_of_it_in_the_metadata() {
    use rand::RngCore;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("payload.bin");
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&local, &payload).unwrap();
    let local = local.to_str().unwrap();
    let back = dir.path().join("back.bin");
    let back = back.to_str().unwrap();
    let lun = dir.path().join("reused.img");
    let lun = lun.to_str().unwrap();
    let mut noise = vec![0u8; 128 << 20];
    rand::rng().fill_bytes(&mut noise);
    let cases: [&[&str]; 3] = [
        &[],
        &["--lock-protocol", "paxos", "--force"],
        // Over the datastore of the previous case, with another geometry.
        &["--block-size", "64K", "--max-files", "300", "--force"],
    ];
    for (n, extra) in cases.iter().enumerate() {
        if n < 2 {
            std::fs::write(lun, &noise).unwrap();
        }
        let mut format = vec![
            "datastore",
            "format",
            lun,
            "--name",
            "reused",
            "--io-timeout",
            "500ms",
        ];
        format.extend_from_slice(extra);
        ok(&format);
        ok(&["-d", lun, "mkdir", "-p", "/a/b"]);
        for i in 0..8 {
            ok(&["-d", lun, "put", local, &format!("/a/b/f{i}")]);
        }
        ok(&["-d", lun, "rm", "/a/b/f3"]);
        ok(&["-d", lun, "get", "/a/b/f7", back]);
        assert_eq!(std::fs::read(back).unwrap(), payload, "case {n}");
        let fsck = ok(&["datastore", "fsck", lun]);
        assert!(fsck.contains("0 problem(s)"), "case {n}: {fsck}");
    }
}
