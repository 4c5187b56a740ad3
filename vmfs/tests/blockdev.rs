//! The datastore on real block devices: loop devices with 512-byte and 4 KiB logical sectors.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use vmfs::{Datastore, Error, FormatOptions, LockProtocol, NewFile};

fn have_loop_devices() -> bool {
    lun::prereq::require(
        lun::prereq::is_root()
            && lun::prereq::have_command("losetup")
            && std::path::Path::new("/dev/loop-control").exists(),
        "root and losetup for loop devices",
    )
}

/// A loop device that is detached however the test ends.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &std::path::Path, sector: u32) -> Loop {
        let out = Command::new("losetup")
            .args(["--sector-size", &sector.to_string(), "-f", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn run_on_loop(sector: u32) {
    if !have_loop_devices() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backing.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let dev = Loop::attach(&file, sector);
    let lun = lun::open(&dev.dev, &lun::OpenOptions::default()).unwrap();
    assert_eq!(lun.sector_size(), sector, "{} sector size", dev.dev);
    assert_eq!(lun.size(), 256 << 20);
    let report = vmfs::format(
        lun.clone(),
        &FormatOptions {
            label: format!("loop{sector}"),
            ..Default::default()
        },
    )
    .unwrap();
    // A loop device has no atomic command of its own and could be a LUN other machines
    // see: the default must not be a lock only this machine honours.
    assert_eq!(report.lock_protocol, LockProtocol::DiskPaxos);
    assert!(report.lock_safety.safe_across_machines);
    let data = pattern(3 << 20, u64::from(sector));
    {
        let ds = Datastore::open(lun.clone(), &host()).unwrap();
        ds.mkdir_all("/vms/a", 0o755, creds()).unwrap();
        let f = ds.create_path("/vms/a/blob", &NewFile::default()).unwrap();
        // Unaligned pieces exercise read-modify-write of partial sectors.
        ds.write(f.ino, 0, &data[..1000]).unwrap();
        ds.write(f.ino, 1000, &data[1000..]).unwrap();
        ds.create_vdisk("/vms/a/disk.vdisk", 8 << 20, false, creds())
            .unwrap();
        let disk = ds
            .open_lun("/vms/a/disk.vdisk", vmfs::Access::Exclusive)
            .unwrap();
        disk.write_at(&data[..4096], 512).unwrap();
        disk.flush().unwrap();
        drop(disk);
        ds.close().unwrap();
    }
    drop(lun);
    let lun = lun::open(
        &dev.dev,
        &lun::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ds = Datastore::open(lun.clone(), &vmfs::OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; data.len()];
    ds.read(ds.resolve("/vms/a/blob").unwrap(), 0, &mut back)
        .unwrap();
    assert!(
        back == data,
        "file differs on the {sector}-byte-sector device"
    );
    let disk = ds
        .open_lun("/vms/a/disk.vdisk", vmfs::Access::ReadOnly)
        .unwrap();
    let mut sector_buf = vec![0u8; 4096];
    disk.read_at(&mut sector_buf, 512).unwrap();
    assert!(sector_buf == data[..4096]);
    drop(disk);
    drop(ds);
    let report = vmfs::fsck(lun, &vmfs::FsckOptions::default()).unwrap();
    assert!(report.clean, "{:#?}", report.findings);
}

#[test]
fn datastore_on_a_512_byte_sector_loop_device() {
    run_on_loop(512);
}

#[test]
fn datastore_on_a_4k_sector_loop_device() {
    run_on_loop(4096);
}

/// A datastore formatted for compare-and-write on a local file, where the host-local lock is
/// enough, must not be mounted read-write once it is reached as a block device: its locks
/// would then be an OFD lock that another machine sharing the device never sees.
#[test]
fn compare_and_write_datastore_reached_through_a_loop_device_is_refused_read_write() {
    if !have_loop_devices() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ds.vmfs");
    let local: std::sync::Arc<dyn lun::Lun> =
        std::sync::Arc::new(lun::FileLun::create(&file, 256 << 20).unwrap());
    let report = vmfs::format(local.clone(), &FormatOptions::default()).unwrap();
    assert_eq!(report.lock_protocol, LockProtocol::CompareAndWrite);
    drop(local);

    let dev = Loop::attach(&file, 512);
    let lun = lun::open(&dev.dev, &lun::OpenOptions::default()).unwrap();
    let Err(err) = Datastore::open(lun.clone(), &host()) else {
        panic!(
            "{} mounted read-write with a host-local compare-and-write",
            dev.dev
        );
    };
    let text = err.to_string();
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
    assert!(
        text.contains(&dev.dev)
            && text.contains("loop")
            && text.contains("set-lock-protocol LUN paxos"),
        "the refusal names the LUN, how it is reached and the fix: {text}"
    );
    // Read-only still works, and says why read-write would not.
    let ro = lun::open(
        &dev.dev,
        &lun::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ds = Datastore::open(ro, &vmfs::OpenOptions::read_only()).unwrap();
    let info = ds.info().unwrap();
    assert!(!info.lock_safety.safe_across_machines);
    assert!(info.lock_safety.refused.is_some());
    assert!(
        info.hosts.iter().all(|h| h.state == "free"),
        "a refused open took a heartbeat slot: {:?}",
        info.hosts
    );
}

/// On a block device without its own compare-and-write, `cas` is refused at format (it
/// would be a lock only this machine honours) and `local` is how a user states that only
/// this machine reaches the LUN: it formats, mounts, and is reported as not safe across
/// machines.
#[test]
fn loop_device_takes_cas_only_when_declared_single_machine() {
    if !have_loop_devices() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backing.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let dev = Loop::attach(&file, 512);
    let lun = lun::open(&dev.dev, &lun::OpenOptions::default()).unwrap();
    let err = vmfs::format(
        lun.clone(),
        &FormatOptions {
            lock_protocol: Some(LockProtocol::CompareAndWrite),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("--lock-protocol local"),
        "the refusal names the flag: {err}"
    );
    assert!(
        vmfs::read_superblock(&*lun).is_err(),
        "a refused format writes nothing"
    );

    let report = vmfs::format(
        lun.clone(),
        &FormatOptions {
            lock_protocol: Some(LockProtocol::HostLocal),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.lock_protocol, LockProtocol::HostLocal);
    assert!(!report.lock_safety.safe_across_machines);
    let ds = Datastore::open(lun.clone(), &host()).unwrap();
    ds.mkdir_all("/a", 0o755, creds()).unwrap();
    assert_eq!(ds.info().unwrap().lock_protocol, LockProtocol::HostLocal);
    ds.close().unwrap();
    let report = vmfs::fsck(lun, &vmfs::FsckOptions::default()).unwrap();
    assert!(report.clean, "{:#?}", report.findings);
}
