//! The datastore on real block devices: loop devices with 512-byte and 4 KiB logical sectors.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use vmfs::{Datastore, FormatOptions, NewFile};

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
    if !lun::prereq::require(
        lun::prereq::is_root()
            && lun::prereq::have_command("losetup")
            && std::path::Path::new("/dev/loop-control").exists(),
        "root and losetup for loop devices",
    ) {
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
    vmfs::format(
        lun.clone(),
        &FormatOptions {
            label: format!("loop{sector}"),
            ..Default::default()
        },
    )
    .unwrap();
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
