//! Raw device mappings used as a user uses a virtual disk, on loop devices with 512- and
//! 4096-byte sectors: a VM's disk (the test guest checks the host's pattern and writes its
//! own, which must land on the device), the GET_ID serial and discard of a physical mapping,
//! a second VM refused while the first holds the mapping, NBD export and the FUSE mount
//! (reads and writes reach the device), snapshots of a virtual mapping, and snapshots refused
//! for a physical one.
#![allow(clippy::unwrap_used)]

mod export_support;
mod fuse_support;
mod vm_support;

use std::path::Path;
use std::process::Command;

use hv::test_guest::{
    DISCARD_OFFSET, GUEST_PATTERN_OFFSET, HOST_PATTERN_OFFSET, PATTERN_BYTES, guest_pattern,
    host_pattern,
};
use lun::Lun;
use vm_support::Fixture;

const DEVICE_SIZE: u64 = 8 << 20;

fn have_loop_devices_and_kvm() -> bool {
    lun::prereq::require(
        lun::prereq::is_root()
            && lun::prereq::have_command("losetup")
            && Path::new("/dev/loop-control").exists(),
        "root and losetup for loop devices",
    ) && vm_support::kvm_available()
}

/// A loop device over a file of `dir`, detached however the test ends.
struct Loop {
    dev: String,
}

impl Loop {
    /// A device of DEVICE_SIZE with `sector`-byte logical sectors, holding the test guest's
    /// host pattern of disk 0 and, where the guest discards, bytes that are not zero.
    fn with_pattern(dir: &Path, sector: u32) -> Loop {
        let file = dir.join(format!("lun{sector}.img"));
        let mut bytes = vec![0u8; DEVICE_SIZE as usize];
        let at = HOST_PATTERN_OFFSET as usize;
        bytes[at..at + PATTERN_BYTES].copy_from_slice(&host_pattern(0));
        let at = DISCARD_OFFSET as usize;
        bytes[at..at + PATTERN_BYTES].fill(0xa5);
        std::fs::write(&file, bytes).unwrap();
        let out = Command::new("losetup")
            .args(["--sector-size", &sector.to_string(), "-f", "--show"])
            .arg(&file)
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

    /// `len` bytes at `offset`, read from the device itself.
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let lun = lun::open(
            &self.dev,
            &lun::OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; len];
        lun.read_at(&mut buf, offset).unwrap();
        buf
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Maps `device` at /maps/db.rdm in `mode` and makes VM /vms/db of the test guest on it.
fn vm_on_mapping(fx: &Fixture, device: &Loop, mode: &str, cmdline: &str) {
    fx.ok(&["mkdir", "-p", "/maps"]);
    fx.ok(&[
        "rdm",
        "create",
        "/maps/db.rdm",
        "--lun",
        &device.dev,
        "--mode",
        mode,
    ]);
    fx.create_vm("/vms/db", 1, cmdline, &["/maps/db.rdm"]);
}

/// The serial the guest printed for disk 0.
fn serial_seen(console: &str) -> String {
    let line = console
        .lines()
        .find(|l| l.contains("disk 0: id \""))
        .unwrap_or_else(|| panic!("no GET_ID line: {console}"));
    line.split('"').nth(1).unwrap().to_string()
}

fn guest_writes_land_on_the_device(mode: &str, sector: u32) {
    if !have_loop_devices_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    let device = Loop::with_pattern(fx.dir.path(), sector);
    vm_on_mapping(&fx, &device, mode, "mode=test");

    let (status, console, messages) = fx.start("/vms/db", &[]).wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    let sectors = DEVICE_SIZE / 512;
    assert!(
        console.contains(&format!(
            "disk 0: {sectors} sectors, block size {sector}, read-write"
        )),
        "{console}"
    );
    assert!(console.contains("disk 0: host pattern ok"), "{console}");
    assert_eq!(
        device.read(GUEST_PATTERN_OFFSET, PATTERN_BYTES),
        guest_pattern(0),
        "{mode}, {sector}-byte sectors: the guest's write is not on the device"
    );
    // A loop device has no serial of its own: the guest sees the mapping's.
    let serial = serial_seen(&console);
    assert!(
        serial.starts_with("vapp-") && serial.len() == hv::SERIAL_BYTES,
        "{serial:?}"
    );
    if mode == "physical" {
        // The device's own discard: a loop device punches a hole, which reads back zeroes.
        assert!(
            console.contains("disk 0: discard status=0, reads back zeroes"),
            "{console}"
        );
        assert_eq!(
            device.read(DISCARD_OFFSET, PATTERN_BYTES),
            vec![0; PATTERN_BYTES]
        );
    } else {
        assert!(console.contains("disk 0: no discard offered"), "{console}");
        assert_eq!(
            device.read(DISCARD_OFFSET, PATTERN_BYTES),
            vec![0xa5; PATTERN_BYTES]
        );
    }
    // The serial is the mapping's: the same at the next start, wherever the device is.
    let (status, again, messages) = fx.start("/vms/db", &[]).wait();
    assert_eq!(status.code(), Some(0), "{again}\n{messages}");
    assert_eq!(serial_seen(&again), serial);
    fx.assert_fsck_clean();
}

#[test]
fn a_vm_on_a_physical_mapping_of_a_512_byte_sector_device_writes_the_device() {
    guest_writes_land_on_the_device("physical", 512);
}

#[test]
fn a_vm_on_a_physical_mapping_of_a_4k_sector_device_writes_the_device() {
    guest_writes_land_on_the_device("physical", 4096);
}

#[test]
fn a_vm_on_a_virtual_mapping_of_a_512_byte_sector_device_writes_the_device() {
    guest_writes_land_on_the_device("virtual", 512);
}

#[test]
fn a_vm_on_a_virtual_mapping_of_a_4k_sector_device_writes_the_device() {
    guest_writes_land_on_the_device("virtual", 4096);
}

#[test]
fn a_second_vm_on_a_mapping_in_use_is_refused_naming_the_holder() {
    if !have_loop_devices_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    let device = Loop::with_pattern(fx.dir.path(), 512);
    vm_on_mapping(&fx, &device, "physical", "mode=wait");
    fx.create_vm("/vms/other", 1, "mode=wait", &["/maps/db.rdm"]);
    let first = fx.start("/vms/db", &[]);
    first.expect_console("waiting to be stopped");

    fx.fails(
        &["vm", "start", "/vms/other"],
        &["/maps/db.rdm", "busy", "esx-a"],
    );
    // Nor does the running VM take a snapshot that would leave its physical disk out.
    fx.fails(
        &["vm", "snapshot", "/vms/db", "s1"],
        &["/maps/db.rdm", "physical-mode raw device mapping"],
    );
    fx.ok(&["vm", "stop", "/vms/db"]);
    let (status, console, messages) = first.wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    // Once the first is gone, the second runs on the mapping.
    let second = fx.start("/vms/other", &[]);
    second.expect_console("waiting to be stopped");
    fx.ok(&["vm", "stop", "/vms/other"]);
    let (status, console, messages) = second.wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
}

#[test]
fn a_physical_mapping_is_never_snapshotted_by_vapp() {
    if !lun::prereq::require(
        lun::prereq::is_root() && lun::prereq::have_command("losetup"),
        "root and losetup for loop devices",
    ) {
        return;
    }
    let fx = Fixture::with_size("128M");
    let device = Loop::with_pattern(fx.dir.path(), 512);
    fx.ok(&["mkdir", "-p", "/maps"]);
    fx.ok(&[
        "rdm",
        "create",
        "/maps/db.rdm",
        "--lun",
        &device.dev,
        "--mode",
        "physical",
    ]);
    fx.fails(
        &["snapshot", "create", "/maps/db.rdm", "before"],
        &["/maps/db.rdm", "physical-mode raw device mapping", "array"],
    );
    // Nothing was made beside it, and the device is untouched.
    fx.create_vm("/vms/db", 1, "mode=test", &["/maps/db.rdm"]);
    fx.fails(
        &["vm", "snapshot", "/vms/db", "before"],
        &["/maps/db.rdm", "physical-mode raw device mapping"],
    );
    fx.fails(&["stat", "/maps/.db.rdm.snap"], &["/maps/.db.rdm.snap"]);
    assert_eq!(device.read(0, PATTERN_BYTES), host_pattern(0));
}

/// `vapp -d DS export` of the mapping: a client reads the device's bytes and its writes land
/// on the device.
fn export_reaches_the_device(mode: &str, sector: u32) {
    if !lun::prereq::require(
        lun::prereq::is_root() && lun::prereq::have_command("losetup"),
        "root and losetup for loop devices",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let device = Loop::with_pattern(dir.path(), sector);
    let ds = export_support::Datastore::format("128M");
    ds.ok(&["mkdir", "-p", "/maps"]);
    ds.ok(&[
        "rdm",
        "create",
        "/maps/db.rdm",
        "--lun",
        &device.dev,
        "--mode",
        mode,
    ]);
    let export = ds
        .export(1, "/maps/db.rdm", &["--listen", "127.0.0.1:0"])
        .unwrap();
    let client = lun::open(&export.url, &Default::default()).unwrap();
    assert_eq!(client.size(), DEVICE_SIZE);
    let mut head = vec![0u8; PATTERN_BYTES];
    client.read_at(&mut head, HOST_PATTERN_OFFSET).unwrap();
    assert_eq!(head, host_pattern(0), "{mode}: the export's bytes");
    let written = vec![0x5a; 2 * PATTERN_BYTES];
    client.write_at(&written, 1 << 20).unwrap();
    client.flush().unwrap();
    drop(client);
    // Another export of the mapping while this one holds it is refused, naming it.
    let refused = ds
        .export(2, "/maps/db.rdm", &["--listen", "127.0.0.1:0"])
        .err()
        .expect("a second export of a mapping in use was accepted");
    assert!(
        refused.contains("/maps/db.rdm") && refused.contains("busy"),
        "{refused}"
    );
    export.stop();
    assert_eq!(device.read(1 << 20, written.len()), written, "{mode}");
    ds.assert_clean();
}

#[test]
fn an_exported_physical_mapping_of_a_4k_sector_device_is_the_device_over_nbd() {
    export_reaches_the_device("physical", 4096);
}

#[test]
fn an_exported_virtual_mapping_of_a_512_byte_sector_device_is_the_device_over_nbd() {
    export_reaches_the_device("virtual", 512);
}

#[test]
fn a_snapshot_of_a_virtual_mapping_keeps_the_bytes_the_vm_then_overwrote_on_the_device() {
    if !have_loop_devices_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    let device = Loop::with_pattern(fx.dir.path(), 4096);
    vm_on_mapping(&fx, &device, "virtual", "mode=test");
    let taken = fx.ok(&["snapshot", "create", "/maps/db.rdm", "before"]);
    assert!(taken.contains("before"), "{taken}");

    let (status, console, messages) = fx.start("/vms/db", &[]).wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    assert_eq!(
        device.read(GUEST_PATTERN_OFFSET, PATTERN_BYTES),
        guest_pattern(0)
    );

    // The snapshot, served over NBD, still holds what was there before the VM ran.
    let export = export_support::Export::launch(
        &[
            "-d",
            &fx.ds,
            "export",
            "/maps/db.rdm@before",
            "--listen",
            "127.0.0.1:0",
            "--read-only",
        ],
        &[],
    )
    .unwrap();
    let client = lun::open(&export.url, &Default::default()).unwrap();
    let mut old = vec![0u8; PATTERN_BYTES];
    client.read_at(&mut old, GUEST_PATTERN_OFFSET).unwrap();
    assert_eq!(old, vec![0; PATTERN_BYTES], "the snapshot's bytes");
    client.read_at(&mut old, HOST_PATTERN_OFFSET).unwrap();
    assert_eq!(old, host_pattern(0));
    drop(client);
    export.stop();
    let listed = fx.ok(&["snapshot", "list", "/maps/db.rdm"]);
    assert!(listed.contains("before"), "{listed}");
    let copy = fx.dir.path().join("copy.img");
    fx.fails(
        &["get", "/maps/db.rdm@before", copy.to_str().unwrap()],
        &["/maps/db.rdm@before", "export"],
    );
    fx.assert_fsck_clean();
}

#[test]
fn through_the_fuse_mount_a_mappings_data_is_its_device() {
    if !lun::prereq::require(
        lun::prereq::is_root() && lun::prereq::have_command("losetup"),
        "root and losetup for loop devices",
    ) || !fuse_support::fuse_available()
    {
        return;
    }
    let fx = fuse_support::Fixture::new("128M");
    let device = Loop::with_pattern(fx.dir.path(), 4096);
    fuse_support::ok(&["-d", fx.lun(), "mkdir", "-p", "/maps"]);
    fuse_support::ok(&[
        "-d",
        fx.lun(),
        "rdm",
        "create",
        "/maps/db.rdm",
        "--lun",
        &device.dev,
        "--mode",
        "physical",
    ]);
    let mount = fuse_support::Mounted::new(&fx, "mnt", &[]);
    let file = mount.path("maps/db.rdm");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), DEVICE_SIZE);
    // Reads, aligned or not, are the device's bytes.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; 1000];
    f.read_exact_at(&mut head, 100).unwrap();
    assert_eq!(head[..], host_pattern(0)[100..1100]);
    // A write that covers no whole sector lands on the device, its neighbours kept.
    f.write_all_at(b"written through the mount", (1 << 20) + 10)
        .unwrap();
    f.sync_all().unwrap();
    let on_device = device.read(1 << 20, 4096);
    assert_eq!(&on_device[10..35], b"written through the mount");
    assert!(
        on_device[..10]
            .iter()
            .chain(&on_device[35..])
            .all(|&b| b == 0)
    );
    // A write past the device's end is refused: a mapping cannot grow.
    let past = f.write_all_at(b"x", DEVICE_SIZE).unwrap_err();
    assert_eq!(past.raw_os_error(), Some(libc::EFBIG), "{past}");
    // Nor can it be truncated: its size is its device's.
    assert!(f.set_len(0).is_err());
    assert_eq!(std::fs::metadata(&file).unwrap().len(), DEVICE_SIZE);
    drop(f);
    mount.unmount();
    fx.assert_clean();
}

#[test]
fn a_virtual_disks_serial_is_stable_across_starts_and_its_own() {
    if !vm_support::kvm_available() {
        return;
    }
    let fx = Fixture::with_size("128M");
    fx.create_vm("/vms/two", 1, "mode=test", &["1M", "1M"]);
    let serials = |console: &str| -> Vec<String> {
        (0..2)
            .map(|i| {
                let line = console
                    .lines()
                    .find(|l| l.contains(&format!("disk {i}: id \"")))
                    .unwrap_or_else(|| panic!("no GET_ID line for disk {i}: {console}"));
                line.split('"').nth(1).unwrap().to_string()
            })
            .collect()
    };
    let (status, console, messages) = fx.start("/vms/two", &[]).wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    let first = serials(&console);
    assert!(
        first
            .iter()
            .all(|s| s.starts_with("vapp-") && s.len() == 20),
        "{first:?}"
    );
    assert_ne!(first[0], first[1]);
    let (status, console, messages) = fx.start("/vms/two", &[]).wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    assert_eq!(serials(&console), first);
}
