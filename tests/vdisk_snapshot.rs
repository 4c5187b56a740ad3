//! Snapshots of virtual disks inside a datastore, as a user takes them: `vdisk snapshot`
//! (the CLI's `snapshot` with `-d`), `PATH@NAME`, `vm snapshot` / `vm revert` of stopped and
//! running VMs booted from the test guest, with the real `vapp` binary on a datastore file.
#![allow(clippy::unwrap_used)]

mod export_support;
mod fuse_support;
mod vm_support;

use std::process::Command;

use hv::test_guest::{GUEST_PATTERN_OFFSET, PATTERN_BYTES, counter_prefix, guest_pattern};
use vm_support::{Fixture, kvm_available};

const DISK: &str = "/vms/a/disk0.vdisk";
const POOL: &str = "/vms/a/.disk0.vdisk.snap";

fn free_bytes(fx: &Fixture) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(["datastore", "info", &fx.ds, "--json"])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["free_bytes"].as_u64().unwrap()
}

fn names(fx: &Fixture, dir: &str) -> Vec<String> {
    fx.ok(&["ls", dir]).lines().map(str::to_string).collect()
}

/// The whole of `path` (a file or `PATH@NAME`) through `vapp get`.
fn get(fx: &Fixture, path: &str) -> Vec<u8> {
    let local = fx.dir.path().join("got.bin");
    fx.ok(&["get", path, local.to_str().unwrap()]);
    std::fs::read(&local).unwrap()
}

#[test]
fn a_disk_with_snapshots_refuses_writers_around_the_engine_and_delete_removes_its_pool() {
    let fx = Fixture::with_size("256M");
    fx.ok(&["mkdir", "-p", "/vms/a"]);
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let local = fx.dir.path().join("data.bin");
    std::fs::write(&local, &data).unwrap();
    fx.ok(&["put", local.to_str().unwrap(), DISK]);
    let free_before = free_bytes(&fx);

    // A bad name changes nothing: no pool is left behind.
    fx.fails(
        &["vdisk", "snapshot", "create", DISK, "no/slash"],
        &["no/slash"],
    );
    assert_eq!(names(&fx, "/vms/a"), ["disk0.vdisk"]);

    let taken = fx.ok(&["snapshot", "create", DISK, "s1"]);
    assert!(taken.contains("s1"), "{taken}");
    assert!(names(&fx, "/vms/a").contains(&".disk0.vdisk.snap".to_string()));
    let listed = fx.ok(&["snapshot", "list", DISK, "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["sessions"][0]["name"], "s1");
    assert_eq!(listed["sessions"][0]["state"], "valid");
    assert_eq!(listed["pool"], POOL);

    // Every writer around the engine is refused, naming the pool, and changes nothing.
    let other = fx.dir.path().join("other.bin");
    std::fs::write(&other, vec![7u8; 4 << 20]).unwrap();
    fx.fails(&["put", other.to_str().unwrap(), DISK], &[DISK, POOL]);
    fx.fails(&["rm", DISK], &[DISK, POOL]);
    fx.fails(&["mv", DISK, "/vms/a/renamed.vdisk"], &[DISK, POOL]);
    fx.fails(
        &["rm", POOL],
        &[POOL, "snapshot pool of /vms/a/disk0.vdisk"],
    );
    fx.fails(&["rm", "-r", "/vms"], &[POOL]);
    assert_eq!(get(&fx, DISK), data);
    assert_eq!(get(&fx, &format!("{DISK}@s1")), data);
    fx.fails(&["get", &format!("{DISK}@nope"), "-"], &["nope"]);
    fx.assert_fsck_clean();

    // Deleting the last snapshot removes the pool and gives its space back; the disk is an
    // ordinary file again.
    fx.ok(&["vdisk", "snapshot", "delete", DISK, "s1"]);
    assert_eq!(names(&fx, "/vms/a"), ["disk0.vdisk"]);
    assert_eq!(free_bytes(&fx), free_before);
    fx.ok(&["put", other.to_str().unwrap(), DISK]);
    assert_eq!(get(&fx, DISK), vec![7u8; 4 << 20]);
    fx.assert_fsck_clean();

    // A file of the pool's name that is no pool is left alone, and the snapshot refused.
    fx.ok(&["put", local.to_str().unwrap(), POOL]);
    fx.fails(
        &["vdisk", "snapshot", "create", DISK, "s2"],
        &[POOL, "not its snapshot pool"],
    );
    assert_eq!(get(&fx, POOL), data);
    fx.ok(&["rm", POOL]);
    // A pool left by a first snapshot cut short (flagged, its disk not yet) is replaced.
    {
        let lun = lun::open(&fx.ds, &Default::default()).unwrap();
        let ds = vmfs::Datastore::open(lun, &vmfs::OpenOptions::read_write()).unwrap();
        let pool = ds
            .create_vdisk(POOL, 1 << 20, false, vmfs::Creds::current())
            .unwrap();
        ds.set_snapshot_role(pool.ino, vmfs::SnapshotRole::Pool)
            .unwrap();
        ds.close().unwrap();
    }
    fx.assert_fsck_clean();
    fx.ok(&["vdisk", "snapshot", "create", DISK, "s2"]);
    assert_eq!(get(&fx, &format!("{DISK}@s2")), vec![7u8; 4 << 20]);
    fx.ok(&["vdisk", "snapshot", "delete", DISK, "s2"]);
    assert_eq!(names(&fx, "/vms/a"), ["disk0.vdisk"]);
    fx.assert_fsck_clean();
}

#[test]
fn a_stopped_vm_snapshot_keeps_its_point_while_the_guest_writes_and_revert_returns_to_it() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/a", 1, "mode=test", &["1M"]);
    fx.write_host_pattern(DISK, 0);
    let before = get(&fx, DISK);
    let taken = fx.ok(&["vm", "snapshot", "/vms/a", "s1"]);
    assert!(taken.contains("snapshot s1 of 1 disk(s) taken"), "{taken}");
    // A second snapshot of the same name is refused and changes nothing.
    fx.fails(&["vm", "snapshot", "/vms/a", "s1"], &["s1"]);

    // The guest writes its pattern through the engine.
    let (status, console, messages) = fx.start("/vms/a", &[]).wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    let at = GUEST_PATTERN_OFFSET as usize;
    let now = get(&fx, DISK);
    assert_eq!(now[at..at + PATTERN_BYTES], guest_pattern(0)[..]);
    // The snapshot still reads the disk as it was.
    assert_eq!(get(&fx, &format!("{DISK}@s1")), before);
    fx.assert_fsck_clean();

    fx.fails(&["vm", "revert", "/vms/a", "nope"], &["nope"]);
    assert_eq!(get(&fx, DISK), now);
    let reverted = fx.ok(&["vm", "revert", "/vms/a", "s1"]);
    assert!(
        reverted.contains("1 disk(s) reverted to snapshot s1"),
        "{reverted}"
    );
    assert_eq!(get(&fx, DISK), before);
    fx.assert_fsck_clean();

    // A writable snapshot boots as another VM's disk; its writes stay in the snapshot.
    let read_only_disk = format!("{DISK}@s1");
    fx.fails(
        &[
            "vm",
            "create",
            "/vms/b",
            "--kernel",
            fx.guest.to_str().unwrap(),
            "--vcpus",
            "1",
            "--memory",
            "64M",
            "--disk",
            &read_only_disk,
        ],
        &["read-only snapshot", "--writable"],
    );
    fx.ok(&["vdisk", "snapshot", "create", DISK, "w1", "--writable"]);
    fx.create_vm("/vms/b", 1, "mode=test", &[&format!("{DISK}@w1")]);
    let (status, console, messages) = fx.start("/vms/b", &[]).wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    let booted = get(&fx, &format!("{DISK}@w1"));
    assert_eq!(booted[at..at + PATTERN_BYTES], guest_pattern(0)[..]);
    assert_eq!(get(&fx, DISK), before);
    fx.assert_fsck_clean();
}

#[test]
fn a_running_vm_snapshot_is_one_point_of_all_its_disks_and_survives_a_kill_9() {
    if !kvm_available() {
        return;
    }
    const SECTORS: u64 = 1024;
    let fx = Fixture::new();
    let cmdline = format!("mode=counter counter_sectors={SECTORS}");
    fx.create_vm("/vms/c", 1, &cmdline, &["1M", "1M"]);
    let disks = ["/vms/c/disk0.vdisk", "/vms/c/disk1.vdisk"];

    let vm = fx.start("/vms/c", &[]);
    vm.expect_console("counter: 256");
    let taken = fx.ok(&["vm", "snapshot", "/vms/c", "s1"]);
    assert!(
        taken.contains("snapshot s1 of 2 disk(s) taken while running; guest disk writes paused"),
        "{taken}"
    );
    // Reverting a running VM is refused.
    fx.fails(&["vm", "revert", "/vms/c", "s1"], &["stop it first"]);
    // The snapshot is copied out while the guest keeps writing: one point of both disks.
    let bytes = |path: &str| get(&fx, path)[..(SECTORS * 512) as usize].to_vec();
    let while_running: Vec<Vec<u8>> = disks.iter().map(|d| bytes(&format!("{d}@s1"))).collect();
    let writes = counter_prefix(&while_running, SECTORS).unwrap();
    assert!(writes >= 256, "the snapshot holds only {writes} writes");
    let seen = vm.stdout.text().matches("counter: ").count();
    assert!(
        vm.stdout.wait_for(
            &format!("counter: {}", (seen as u64 + 2) * 256),
            vm_support::GUEST_TIMEOUT
        ),
        "the guest stopped writing after the snapshot:\n{}",
        vm.stdout.text()
    );
    // The VM process dies in the middle of writes through the engine.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (status, _, _) = vm.wait();
    assert_eq!(status.code(), None);

    // Started again, it writes through the engine once more, then is powered off.
    let again = fx.start("/vms/c", &[]);
    again.expect_console("counter: 256");
    fx.ok(&["vm", "stop", "--force", "/vms/c"]);
    again.wait();

    let snapshot: Vec<Vec<u8>> = disks.iter().map(|d| bytes(&format!("{d}@s1"))).collect();
    assert_eq!(counter_prefix(&snapshot, SECTORS), Ok(writes));
    assert_eq!(snapshot, while_running);
    let current: Vec<Vec<u8>> = disks.iter().map(|d| bytes(d)).collect();
    assert_ne!(
        current, snapshot,
        "the disks did not move on after the snapshot"
    );
    let listed = fx.ok(&["vdisk", "snapshot", "list", disks[1], "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["sessions"][0]["state"], "valid", "{listed}");
    assert!(listed["sessions"][0]["group"].is_string(), "{listed}");
    fx.assert_fsck_clean();
}

#[test]
fn the_fuse_mount_reads_a_disk_with_snapshots_but_refuses_to_write_it() {
    if !fuse_support::fuse_available() {
        return;
    }
    let fx = fuse_support::Fixture::new("256M");
    let ds = fx.lun().to_string();
    let local = fx.dir.path().join("data.bin");
    let data = vec![0x5au8; 1 << 20];
    std::fs::write(&local, &data).unwrap();
    fuse_support::ok(&["-d", &ds, "mkdir", "-p", "/vms/a"]);
    fuse_support::ok(&["-d", &ds, "put", local.to_str().unwrap(), DISK]);
    fuse_support::ok(&["-d", &ds, "vdisk", "snapshot", "create", DISK, "s1"]);

    let mount = fuse_support::Mounted::new(&fx, "mnt", &[]);
    let disk = mount.path("vms/a/disk0.vdisk");
    assert_eq!(std::fs::read(&disk).unwrap(), data);
    let opened = std::fs::OpenOptions::new().write(true).open(&disk);
    assert_eq!(
        opened.map(|_| ()).unwrap_err().raw_os_error(),
        Some(libc::EPERM),
        "a writable open of a disk with snapshots through FUSE"
    );
    let removed = std::fs::remove_file(mount.path("vms/a/.disk0.vdisk.snap"));
    assert_eq!(removed.unwrap_err().raw_os_error(), Some(libc::EPERM));
    mount.unmount();
    fx.assert_clean();
}

#[test]
fn writes_through_an_export_keep_the_snapshot_and_rollback_returns_to_it() {
    const MIB: u64 = 1 << 20;
    let ds = export_support::Datastore::format("256M");
    let size = 8 * MIB;
    ds.vdisk(DISK, size, false);
    let listen = ["--listen", "127.0.0.1:0"];
    let old = export_support::random_bytes(size as usize, 1);
    let export = ds.export(1, DISK, &listen).unwrap();
    let client = lun::open(&export.url, &Default::default()).unwrap();
    client.write_at(&old, 0).unwrap();
    client.flush().unwrap();
    drop(client);
    export.stop();

    ds.ok(&["vdisk", "snapshot", "create", DISK, "s1"]);
    let export = ds.export(1, DISK, &listen).unwrap();
    let mut new = old.clone();
    let client = lun::open(&export.url, &Default::default()).unwrap();
    for (at, len, seed) in [
        (0, MIB, 2),
        (3 * MIB + 4096, 200 * 1024, 3),
        (size - 512, 512, 4),
    ] {
        let data = export_support::random_bytes(len as usize, seed);
        client.write_at(&data, at).unwrap();
        new[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    client.flush().unwrap();
    // While the export writes the disk, its snapshot is refused naming the holder.
    let refused = ds.export(2, &format!("{DISK}@s1"), &listen).err().unwrap();
    assert!(refused.contains("busy"), "{refused}");
    drop(client);
    export.stop();

    export_support::assert_same(
        &ds.get(DISK),
        &new,
        "the disk after writes through the engine",
    );
    export_support::assert_same(&ds.get(&format!("{DISK}@s1")), &old, "DISK@s1");
    let export = ds.export(1, &format!("{DISK}@s1"), &listen).unwrap();
    let client = lun::open(&export.url, &Default::default()).unwrap();
    let mut seen = vec![0u8; size as usize];
    client.read_at(&mut seen, 0).unwrap();
    export_support::assert_same(&seen, &old, "DISK@s1 over NBD");
    assert!(
        client.write_at(&new[..512], 0).is_err(),
        "a read-only snapshot took a write"
    );
    drop(client);
    export.stop();

    // A writable snapshot takes writes of its own; the disk does not see them.
    ds.ok(&["vdisk", "snapshot", "create", DISK, "w1", "--writable"]);
    let export = ds.export(1, &format!("{DISK}@w1"), &listen).unwrap();
    let client = lun::open(&export.url, &Default::default()).unwrap();
    let private = export_support::random_bytes(64 * 1024, 5);
    client.write_at(&private, MIB).unwrap();
    client.flush().unwrap();
    drop(client);
    export.stop();
    let mut w1 = new.clone();
    w1[MIB as usize..(MIB + 64 * 1024) as usize].copy_from_slice(&private);
    export_support::assert_same(&ds.get(&format!("{DISK}@w1")), &w1, "DISK@w1");
    export_support::assert_same(&ds.get(DISK), &new, "the disk beside a writable snapshot");

    ds.ok(&["vdisk", "snapshot", "rollback", DISK, "s1"]);
    export_support::assert_same(&ds.get(DISK), &old, "the disk after rollback");
    ds.ok(&["vdisk", "snapshot", "delete", DISK, "s1"]);
    ds.ok(&["vdisk", "snapshot", "delete", DISK, "w1"]);
    assert!(!ds.ok(&["ls", "/vms/a"]).contains(".snap"));
    ds.assert_clean();
}

/// The pool is reserved whole at the first snapshot, so a datastore that fills up afterwards
/// never fails a write to the disk: when the pool's own slots run out the snapshot is
/// invalidated, as an array does, and the disk keeps every byte written.
#[test]
fn a_full_datastore_never_fails_a_write_to_a_disk_with_snapshots() {
    const MIB: u64 = 1 << 20;
    let ds = export_support::Datastore::format("128M");
    let size = 16 * MIB;
    // Thick, so the disk's own blocks need nothing from the full datastore.
    ds.vdisk(DISK, size, true);
    ds.ok(&["vdisk", "snapshot", "create", DISK, "s1"]);
    // Fill the datastore: `put` of a file larger than what is free fails, so fill in steps.
    let filler = ds.path.with_file_name("filler.bin");
    let mut n = 0;
    loop {
        std::fs::write(&filler, vec![9u8; 8 << 20]).unwrap();
        let out = ds.vapp(&["put", filler.to_str().unwrap(), &format!("/fill{n}")]);
        if !out.status.success() {
            break;
        }
        n += 1;
        assert!(n < 64, "the datastore never filled up");
    }
    let listen = ["--listen", "127.0.0.1:0"];
    let export = ds.export(1, DISK, &listen).unwrap();
    let client = lun::open(&export.url, &Default::default()).unwrap();
    // Every chunk of the disk is written once: more copies than a quarter-size pool holds.
    let data = export_support::random_bytes(size as usize, 7);
    for at in (0..size).step_by(MIB as usize) {
        client
            .write_at(&data[at as usize..(at + MIB) as usize], at)
            .unwrap();
    }
    client.flush().unwrap();
    drop(client);
    export.stop();
    export_support::assert_same(&ds.get(DISK), &data, "the disk written on a full datastore");
    let listed: serde_json::Value =
        serde_json::from_str(&ds.ok(&["snapshot", "list", DISK, "--json"])).unwrap();
    assert_eq!(listed["sessions"][0]["state"], "invalid", "{listed}");
    ds.ok(&["vdisk", "snapshot", "delete", DISK, "s1"]);
}
