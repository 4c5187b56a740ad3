//! Raw device mappings on real loop devices (512- and 4096-byte sectors): `vapp rdm
//! create|show|verify`, `ls -l` and `stat`, resolution by identity after the loop devices
//! are attached again in another order, a removed, resized or duplicated device, two hosts
//! (separate processes) racing to open one mapping for writing, bad input, and a damaged
//! payload found by fsck.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MIB: u64 = 1 << 20;

fn vapp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(args)
        .env_remove("VAPP_DATASTORE")
        .env_remove("VAPP_HOST_NAME")
        .env_remove("VAPP_HOST_UUID")
        .stdin(Stdio::null())
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

/// Runs a command that must fail; returns its one-line error.
fn refused(args: &[&str]) -> String {
    let out = vapp(args);
    assert!(
        !out.status.success(),
        "vapp {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn loops_available() -> bool {
    lun::prereq::require(
        lun::prereq::is_root() && lun::prereq::have_command("losetup"),
        "root and losetup (loop devices)",
    )
}

/// Loop devices attached by a test, detached when it ends whatever happens.
#[derive(Default)]
struct Loops(Vec<String>);

impl Loops {
    fn attach(&mut self, file: &Path, sector: u32) -> String {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector.to_string()])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        self.0.push(dev.clone());
        dev
    }

    fn detach(&mut self, dev: &str) {
        let status = Command::new("losetup").args(["-d", dev]).status().unwrap();
        assert!(status.success(), "losetup -d {dev}");
        self.0.retain(|d| d != dev);
        // A device someone still has open (udev probing it) is detached on its last close:
        // until then it still claims its file.
        let name = Path::new(dev).file_name().unwrap().to_owned();
        let bound = Path::new("/sys/block").join(name).join("loop/backing_file");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while bound.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{dev} still attached 10 s after losetup -d"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for dev in &self.0 {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    ds: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds.vmfs").to_string_lossy().into_owned();
        ok(&[
            "datastore",
            "format",
            &ds,
            "--name",
            "rdm",
            "--size",
            "256M",
        ]);
        ok(&["-d", &ds, "mkdir", "-p", "/vms/a"]);
        Fixture { dir, ds }
    }

    /// A sparse file to put a loop device over.
    fn image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    fn ds(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec!["-d".to_string(), self.ds.clone()];
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }

    fn ok(&self, args: &[&str]) -> String {
        let all = self.ds(args);
        ok(&all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `rdm create PATH --lun LUN --mode MODE`, which must succeed.
    fn map(&self, path: &str, lun: &str, mode: &str) -> String {
        self.ok(&["rdm", "create", path, "--lun", lun, "--mode", mode])
    }

    fn refused(&self, args: &[&str]) -> String {
        let all = self.ds(args);
        refused(&all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn open(&self, read_only: bool) -> vmfs::Datastore {
        let lun = lun::open(
            &self.ds,
            &lun::OpenOptions {
                read_only,
                ..Default::default()
            },
        )
        .unwrap();
        let options = if read_only {
            vmfs::OpenOptions::read_only()
        } else {
            vmfs::OpenOptions::read_write()
        };
        vmfs::Datastore::open(lun, &options).unwrap()
    }

    fn fsck(&self) -> Output {
        vapp(&["datastore", "fsck", &self.ds])
    }
}

#[test]
fn create_show_verify_and_list_mappings_at_512_and_4096_byte_sectors() {
    if !loops_available() {
        return;
    }
    let f = Fixture::new();
    let mut loops = Loops::default();
    for (name, sector, mode) in [("db", 512u32, "virtual"), ("log", 4096, "physical")] {
        let image = f.image(&format!("{name}.img"), 64 * MIB);
        let dev = loops.attach(&image, sector);
        let path = format!("/vms/a/{name}.rdm");
        let created = f.json(&[
            "rdm", "create", &path, "--lun", &dev, "--mode", mode, "--json",
        ]);
        assert_eq!(created["mode"], mode);
        let shown = f.json(&["rdm", "show", &path, "--json"]);
        assert_eq!(shown, created);
        assert_eq!(shown["size"], 64 * MIB);
        assert_eq!(shown["sector_size"], sector);
        assert_eq!(shown["recorded_path"], dev.as_str());
        assert_eq!(shown["device"], "block_device");
        // A loop device is its backing file at an offset, whatever /dev/loopN it gets.
        assert!(
            shown["identity"]
                .as_str()
                .unwrap()
                .ends_with(&image.to_string_lossy().to_string()),
            "{shown}"
        );
        let verified = f.json(&["rdm", "verify", &path, "--json"]);
        assert_eq!(verified["ok"], true);
        assert_eq!(verified["found_at"], dev.as_str());
        assert_eq!(verified["moved"], false);

        let stat = f.json(&["stat", &path, "--json"]);
        assert_eq!(stat["type"], "rdm");
        assert_eq!(stat["size"], 64 * MIB);
        assert_eq!(stat["rdm"]["mode"], mode);
        assert_eq!(stat["rdm"]["sector_size"], sector);
        let text = f.ok(&["stat", &path]);
        assert!(text.contains("raw device mapping"), "{text}");
        assert!(text.contains(&format!("{mode} mapping of file")), "{text}");
    }
    let listing = f.ok(&["ls", "-l", "/vms/a"]);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 2, "{listing}");
    for (line, mode, sector) in [(lines[0], "virtual", 512), (lines[1], "physical", 4096)] {
        assert!(line.starts_with("rrw-------"), "{line}");
        assert!(line.contains(&(64 * MIB).to_string()), "{line}");
        assert!(
            line.contains(&format!("({mode}, {sector}-byte sectors)")),
            "{line}"
        );
    }
    let fsck = f.fsck();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn a_mapping_finds_its_lun_after_loop_devices_are_attached_again_in_another_order() {
    if !loops_available() {
        return;
    }
    let f = Fixture::new();
    let mut loops = Loops::default();
    let a = f.image("a.img", 16 * MIB);
    let b = f.image("b.img", 32 * MIB);
    let dev_a = loops.attach(&a, 4096);
    let dev_b = loops.attach(&b, 512);
    f.map("/vms/a/a.rdm", &dev_a, "physical");
    f.map("/vms/a/b.rdm", &dev_b, "virtual");
    loops.detach(&dev_a);
    loops.detach(&dev_b);
    // b first now, so it likely takes a's old number; either way the paths are new.
    let new_b = loops.attach(&b, 512);
    let new_a = loops.attach(&a, 4096);
    for (path, dev, old) in [
        ("/vms/a/a.rdm", &new_a, &dev_a),
        ("/vms/a/b.rdm", &new_b, &dev_b),
    ] {
        let verified = f.json(&["rdm", "verify", path, "--json"]);
        assert_eq!(verified["found_at"], dev.as_str(), "{verified}");
        assert_eq!(verified["moved"], dev != old, "{verified}");
    }

    // I/O through the mapping reaches the mapped LUN's bytes.
    let ds = f.open(false);
    let lun = rdm::open(&ds, "/vms/a/a.rdm", vmfs::Access::Exclusive).unwrap();
    assert_eq!(lun.device_path(), new_a);
    assert_eq!(lun::Lun::sector_size(&lun), 4096);
    assert_eq!(lun.mode(), rdm::Mode::Physical);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut aligned = lun::AlignedBuf::with_alignment(8192, 4096);
    aligned.copy_from_slice(&pattern);
    lun::Lun::write_at(&lun, &aligned, 3 * MIB).unwrap();
    lun::Lun::flush(&lun).unwrap();
    drop(lun);
    ds.close().unwrap();
    let mut back = vec![0u8; 8192];
    std::fs::File::open(&a)
        .unwrap()
        .read_exact_at(&mut back, 3 * MIB)
        .unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn a_removed_resized_or_doubled_device_or_new_sector_size_is_refused_naming_the_mapping() {
    if !loops_available() {
        return;
    }
    let f = Fixture::new();
    let mut loops = Loops::default();
    let image = f.image("db.img", 16 * MIB);
    let dev = loops.attach(&image, 512);
    f.map("/vms/a/db.rdm", &dev, "virtual");

    loops.detach(&dev);
    let e = f.refused(&["rdm", "verify", "/vms/a/db.rdm"]);
    assert!(
        e.contains("/vms/a/db.rdm: mapped LUN file") && e.contains("not found on this machine"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    let out = vapp(&["-d", &f.ds, "rdm", "verify", "/vms/a/db.rdm", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["ok"], false);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not found on this machine"),
        "{answer}"
    );

    let dev = loops.attach(&image, 4096);
    let e = f.refused(&["rdm", "verify", "/vms/a/db.rdm"]);
    assert!(
        e.contains("/vms/a/db.rdm")
            && e.contains("had 512-byte sectors when mapped")
            && e.contains(&format!("{dev} has 4096-byte sectors now")),
        "{e}"
    );
    loops.detach(&dev);

    let dev = loops.attach(&image, 512);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(24 * MIB)
        .unwrap();
    assert!(
        Command::new("losetup")
            .args(["-c", &dev])
            .status()
            .unwrap()
            .success()
    );
    let e = f.refused(&["rdm", "verify", "/vms/a/db.rdm"]);
    assert!(
        e.contains(&format!(
            "was {} bytes when mapped, {dev} is {} bytes now",
            16 * MIB,
            24 * MIB
        )),
        "{e}"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    assert!(
        Command::new("losetup")
            .args(["-c", &dev])
            .status()
            .unwrap()
            .success()
    );
    f.ok(&["rdm", "verify", "/vms/a/db.rdm"]);

    let second = loops.attach(&image, 512);
    let e = f.refused(&["rdm", "verify", "/vms/a/db.rdm"]);
    assert!(
        e.contains("all claim to be mapped LUN") && e.contains(&dev) && e.contains(&second),
        "{e}"
    );
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    if !loops_available() {
        return;
    }
    let f = Fixture::new();
    let mut loops = Loops::default();
    let image = f.image("db.img", 16 * MIB);
    let dev = loops.attach(&image, 512);
    f.map("/vms/a/db.rdm", &dev, "virtual");
    let before = f.ok(&["ls", "-l", "/vms/a"]);

    let missing = f
        .dir
        .path()
        .join("no-such-lun")
        .to_string_lossy()
        .into_owned();
    let own_loop = loops.attach(Path::new(&f.ds), 512);
    for (lun, mode, expect) in [
        (
            missing.as_str(),
            "virtual",
            "cannot be mapped: No such file",
        ),
        (f.ds.as_str(), "virtual", "is the LUN of this datastore"),
        (
            own_loop.as_str(),
            "physical",
            "is the LUN of this datastore",
        ),
        (
            dev.as_str(),
            "physical",
            "already mapped on this datastore by /vms/a/db.rdm",
        ),
    ] {
        let e = f.refused(&[
            "rdm",
            "create",
            "/vms/a/new.rdm",
            "--lun",
            lun,
            "--mode",
            mode,
        ]);
        assert!(e.contains(expect), "{lun}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    let e = f.refused(&[
        "rdm",
        "create",
        "/vms/a/new.rdm",
        "--lun",
        &dev,
        "--mode",
        "raw",
    ]);
    assert!(e.contains("unknown mapping mode \"raw\""), "{e}");
    let e = f.refused(&["rdm", "show", "/vms"]);
    assert!(e.contains("/vms: not a raw device mapping"), "{e}");
    assert_eq!(f.ok(&["ls", "-l", "/vms/a"]), before);

    // A mapping copied with its datastore belongs to the original until it is made again.
    let copy = f
        .dir
        .path()
        .join("copy.vmfs")
        .to_string_lossy()
        .into_owned();
    let status = Command::new("cp")
        .args(["--sparse=always", &f.ds, &copy])
        .status()
        .unwrap();
    assert!(status.success());
    ok(&["datastore", "resignature", &copy]);
    let e = refused(&["-d", &copy, "rdm", "verify", "/vms/a/db.rdm"]);
    assert!(
        e.contains("/vms/a/db.rdm: mapping was made on datastore")
            && e.contains("a copied mapping"),
        "{e}"
    );
    let ds = vmfs::Datastore::open(
        lun::open(&copy, &lun::OpenOptions::default()).unwrap(),
        &vmfs::OpenOptions::read_write(),
    )
    .unwrap();
    let e = rdm::open(&ds, "/vms/a/db.rdm", vmfs::Access::Exclusive).unwrap_err();
    assert!(matches!(e, rdm::Error::ForeignDatastore { .. }), "{e}");
    ds.close().unwrap();
}

/// Set in a child process of [`two_hosts_racing_for_one_mapping_get_one_writer`]: which
/// datastore and mapping to open, and how.
const CHILD_ENV: &str = "RDM_CLI_CHILD";

/// Runs only as a child: opens the mapping as its own host, says whether it got it, and
/// holds it for a while.
#[test]
fn child_opens_a_mapping() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, '|');
    let (access, ds_path, path) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let access = match access {
        "ro" => vmfs::Access::ReadOnly,
        "mw" => vmfs::Access::MultiWriter,
        _ => vmfs::Access::Exclusive,
    };
    let ds = vmfs::Datastore::open(
        lun::open(ds_path, &lun::OpenOptions::default()).unwrap(),
        &vmfs::OpenOptions::read_write(),
    )
    .unwrap();
    match rdm::open(&ds, path, access) {
        Ok(lun) => {
            println!("RESULT opened");
            // Held until the parent says so (closes our stdin), however slow the machine.
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
            drop(lun);
        }
        Err(e) => println!("RESULT refused: {e}"),
    }
    ds.close().unwrap();
}

/// A child process opening a mapping as a host of its own.
struct Child {
    process: std::process::Child,
    stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

fn spawn_child(access: &str, ds: &str, path: &str, host: &str) -> Child {
    let mut process = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_opens_a_mapping",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{access}|{ds}|{path}"))
        .env("VAPP_HOST_NAME", host)
        .env("VAPP_HOST_UUID", uuid::Uuid::new_v4().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufRead::lines(std::io::BufReader::new(process.stdout.take().unwrap()));
    Child { process, stdout }
}

impl Child {
    /// "opened" or "refused: …"; an opened child holds the mapping until released.
    fn result(&mut self) -> String {
        self.stdout
            .by_ref()
            .map_while(Result::ok)
            // The harness prints the test's name on the same line first.
            .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_string()))
            .expect("the child says what happened")
    }

    fn release(mut self) {
        drop(self.process.stdin.take());
        assert!(self.process.wait().unwrap().success());
    }
}

#[test]
fn two_hosts_racing_for_one_mapping_get_one_writer() {
    if !loops_available() {
        return;
    }
    let f = Fixture::new();
    let mut loops = Loops::default();
    let image = f.image("db.img", 16 * MIB);
    let dev = loops.attach(&image, 512);
    f.map("/vms/a/db.rdm", &dev, "physical");

    let mut a = spawn_child("rw", &f.ds, "/vms/a/db.rdm", "esx-a");
    let mut b = spawn_child("rw", &f.ds, "/vms/a/db.rdm", "esx-b");
    let results = [a.result(), b.result()];
    a.release();
    b.release();
    let opened = results.iter().filter(|r| *r == "opened").count();
    assert_eq!(opened, 1, "exactly one writer: {results:?}");
    let refusal = results.iter().find(|r| *r != "opened").unwrap();
    let winner = if results[0] == "opened" {
        "esx-a"
    } else {
        "esx-b"
    };
    assert!(
        refusal.contains("/vms/a/db.rdm: busy, held exclusive by host") && refusal.contains(winner),
        "{refusal}"
    );

    // Read-only opens share it, and so do the writers of a guest cluster that coordinates
    // itself (multi-writer).
    for access in ["ro", "mw"] {
        let mut a = spawn_child(access, &f.ds, "/vms/a/db.rdm", "esx-a");
        let mut b = spawn_child(access, &f.ds, "/vms/a/db.rdm", "esx-b");
        assert_eq!([a.result(), b.result()], ["opened", "opened"], "{access}");
        a.release();
        b.release();
    }

    // A writer killed with -9 leaves its lock to whoever comes next: its slot is recovered
    // (its process is gone) before the lock is broken.
    let mut holder = spawn_child("rw", &f.ds, "/vms/a/db.rdm", "esx-a");
    assert_eq!(holder.result(), "opened");
    holder.process.kill().unwrap();
    holder.process.wait().unwrap();
    let ds = f.open(false);
    let lun = rdm::open(&ds, "/vms/a/db.rdm", vmfs::Access::Exclusive).unwrap();
    drop(lun);
    ds.close().unwrap();
}

#[test]
fn fsck_finds_a_damaged_mapping_payload_and_rm_removes_it() {
    if !loops_available() {
        return;
    }
    let f = Fixture::new();
    let mut loops = Loops::default();
    let image = f.image("db.img", 16 * MIB);
    let dev = loops.attach(&image, 4096);
    f.map("/vms/a/db.rdm", &dev, "virtual");
    let ino = f.json(&["stat", "/vms/a/db.rdm", "--json"])["ino"]
        .as_u64()
        .unwrap();
    let off = {
        let ds = f.open(true);
        vmfs::debug::inode_offset(ds.superblock(), ino)
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.ds)
        .unwrap();
    let mut unit = vec![0u8; vmfs::debug::UNIT];
    file.read_exact_at(&mut unit, off).unwrap();
    unit[vmfs::debug::RDM_MODE_OFFSET] = 7;
    vmfs::debug::reseal_inode(&mut unit, off);
    file.write_all_at(&unit, off).unwrap();
    file.sync_all().unwrap();

    let fsck = f.fsck();
    let report = String::from_utf8_lossy(&fsck.stdout);
    assert_eq!(fsck.status.code(), Some(1), "{report}");
    assert!(
        report.contains("raw device mapping inode") && report.contains("unknown mapping mode 7"),
        "{report}"
    );
    let e = f.refused(&["rdm", "verify", "/vms/a/db.rdm"]);
    assert!(e.contains("unknown mapping mode 7"), "{e}");
    let listing = f.ok(&["ls", "-l", "/vms/a"]);
    assert!(listing.contains("damaged mapping"), "{listing}");

    f.ok(&["rm", "/vms/a/db.rdm"]);
    assert!(f.fsck().status.success());
}

#[test]
fn physical_mode_passes_discard_through_to_the_device() {
    if !loops_available() {
        return;
    }
    let f = Fixture::new();
    let mut loops = Loops::default();
    let image = f.image("db.img", 16 * MIB);
    let dev = loops.attach(&image, 4096);
    f.map("/vms/a/db.rdm", &dev, "physical");
    let ds = f.open(false);
    let lun = rdm::open(&ds, "/vms/a/db.rdm", vmfs::Access::Exclusive).unwrap();
    assert_eq!(lun.serial(), None, "a loop device has no serial of its own");
    let mut data = lun::AlignedBuf::with_alignment(2 * MIB as usize, 4096);
    data.fill(0xa5);
    lun::Lun::write_at(&lun, &data, 4 * MIB).unwrap();
    lun::Lun::flush(&lun).unwrap();
    lun.discard(4 * MIB, MIB).unwrap();
    let mut back = lun::AlignedBuf::with_alignment(2 * MIB as usize, 4096);
    lun::Lun::read_at(&lun, &mut back, 4 * MIB).unwrap();
    assert!(
        back[..MIB as usize].iter().all(|&b| b == 0),
        "discarded range reads zero"
    );
    assert!(
        back[MIB as usize..].iter().all(|&b| b == 0xa5),
        "the rest is kept"
    );
    let e = lun.discard(4 * MIB + 512, 4096).unwrap_err();
    assert!(
        e.to_string()
            .contains("not aligned to the 4096-byte sector"),
        "{e}"
    );
    drop(lun);
    ds.close().unwrap();
}

#[test]
fn two_hosts_racing_to_map_one_lun_leave_at_most_one_mapping() {
    if !loops_available() {
        return;
    }
    let f = Fixture::new();
    let mut loops = Loops::default();
    let image = f.image("db.img", 16 * MIB);
    let dev = loops.attach(&image, 512);
    for round in 0..4 {
        let spawn = |name: &str| {
            let path = format!("/vms/a/{name}{round}.rdm");
            Command::new(env!("CARGO_BIN_EXE_vapp"))
                .args(["-d", &f.ds, "rdm", "create", &path, "--lun", &dev])
                .args(["--mode", "virtual"])
                .env_remove("VAPP_DATASTORE")
                .env("VAPP_HOST_NAME", name)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let racers = [spawn("esx-a"), spawn("esx-b")];
        for racer in racers {
            let out = racer.wait_with_output().unwrap();
            let e = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || e.contains("already mapped on this datastore"),
                "{e}"
            );
        }
        let listing = f.ok(&["ls", "/vms/a"]);
        assert!(listing.lines().count() <= 1, "round {round}: {listing}");
        for name in listing.lines() {
            f.ok(&["rm", &format!("/vms/a/{name}")]);
        }
    }
    assert!(f.fsck().status.success());
}
