//! A real guest on `vapp export`: QEMU (software emulation) boots the Debian cloud kernel with
//! a busybox initramfs and two NBD disks. Its first disk is a virtual disk on a vapp
//! datastore served by `vapp -d DATASTORE export` over TCP; its second a plain file served by
//! `vapp export` over a Unix socket. The guest reads the marker the host put on each disk,
//! writes its own, copies a file (its /init) onto the datastore disk, syncs and powers off;
//! the host then finds the guest's data in the file and, through vmfs, in the datastore.
#![allow(clippy::unwrap_used)]

mod export_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use export_support::{Datastore, Export, require_tools};
use lun::Lun;

const DISK_SIZE: u64 = 64 << 20;
const VDISK: &str = "/vms/guest/root.vdisk";
/// Where the host's and the guest's markers go, and the guest's file, in 512-byte sectors.
const HOST_SECTOR: u64 = 1;
const GUEST_SECTOR: u64 = 2048;
const FILE_SECTOR: u64 = 4096;

/// build/guest, fetched by scripts/guest-assets.sh when missing.
fn guest_assets() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let assets = root.join("build/guest");
    let ready =
        |dir: &Path| dir.join("vmlinuz").exists() && dir.join("modules/virtio_blk.ko").exists();
    if !ready(&assets) {
        let fetched = Command::new("bash")
            .arg(root.join("scripts/guest-assets.sh"))
            .arg(&assets)
            .current_dir(root)
            .status()
            .is_ok_and(|s| s.success());
        if !fetched || !ready(&assets) {
            lun::prereq::require(
                false,
                "guest kernel and busybox (scripts/guest-assets.sh needs apt and network)",
            );
            return None;
        }
    }
    Some(assets)
}

fn read_marker(file: &Path, sector: u64, len: usize) -> String {
    use std::os::unix::fs::FileExt;
    let disk = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; len];
    disk.read_exact_at(&mut buf, sector * 512).unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn a_qemu_guest_boots_with_a_datastore_disk_on_vapp_export() {
    if !require_tools(&[("qemu-system-x86_64", "qemu-system-x86"), ("cpio", "cpio")]) {
        return;
    }
    let Some(assets) = guest_assets() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let nonce = format!("{:08x}", std::process::id() ^ 0x5eed_1234);
    let host_marker = |name: &str| format!("HOST-{name}-{nonce}\n");

    let ds = Datastore::format("1G");
    ds.vdisk(VDISK, DISK_SIZE, false);
    let vda = ds
        .export(1, VDISK, &["--listen", "127.0.0.1:0", "--name", "vda"])
        .unwrap();
    let client = lun::open(&vda.url, &Default::default()).unwrap();
    let mut sector = vec![0u8; 512];
    sector[..host_marker("vda").len()].copy_from_slice(host_marker("vda").as_bytes());
    client.write_at(&sector, HOST_SECTOR * 512).unwrap();
    client.flush().unwrap();
    drop(client);

    let plain = dir.path().join("vdb.raw");
    let file = std::fs::File::create(&plain).unwrap();
    file.set_len(DISK_SIZE).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &file,
        host_marker("vdb").as_bytes(),
        HOST_SECTOR * 512,
    )
    .unwrap();
    let socket = dir.path().join("vdb.sock");
    let vdb = Export::start(
        &plain,
        &["--socket", socket.to_str().unwrap(), "--name", "vdb"],
    );

    // Each disk: read the host's marker to the console, write the guest's; then a file onto
    // the datastore disk, and sync.
    let init = dir.path().join("init");
    std::fs::write(
        &init,
        format!(
            r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
/load-virtio
for disk in vda vdb; do
  i=0
  while [ ! -b /dev/$disk ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  echo "GUEST-SAW $(dd if=/dev/$disk bs=32 skip={skip} count=1 2>/dev/null)"
  echo "GUEST-$disk-{nonce}" | dd of=/dev/$disk bs=512 seek={seek} conv=notrunc 2>/dev/null
done
dd if=/init of=/dev/vda bs=512 seek={file} conv=notrunc 2>/dev/null
sync
echo GUEST-DONE
poweroff -f
"#,
            skip = HOST_SECTOR * 512 / 32,
            seek = GUEST_SECTOR,
            file = FILE_SECTOR,
        ),
    )
    .unwrap();
    let initramfs = dir.path().join("initramfs.cpio.gz");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = Command::new("bash")
        .arg(root.join("scripts/mkinitramfs.sh"))
        .arg(&initramfs)
        .arg(&init)
        .arg(&assets)
        .status()
        .unwrap();
    assert!(built.success(), "mkinitramfs.sh failed");

    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
        ])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(assets.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", vda.url))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", vdb.url))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    while qemu.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = qemu.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = qemu.wait_with_output().unwrap();
    let console = String::from_utf8_lossy(&output.stdout);
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(
        console.contains("GUEST-DONE"),
        "the guest did not finish\n--- console ---\n{console}\n--- qemu stderr ---\n{errors}"
    );
    for name in ["vda", "vdb"] {
        assert!(
            console.contains(&format!("GUEST-SAW {}", host_marker(name).trim_end())),
            "the guest did not read the host's marker on {name}:\n{console}"
        );
    }

    // Orderly stop: each export flushes; the datastore one also commits and closes.
    vda.stop();
    vdb.stop();
    let expected = format!("GUEST-vdb-{nonce}\n");
    assert_eq!(read_marker(&plain, GUEST_SECTOR, expected.len()), expected);

    let disk = ds.get(VDISK);
    let expected = format!("GUEST-vda-{nonce}\n");
    let at = (GUEST_SECTOR * 512) as usize;
    assert_eq!(
        String::from_utf8_lossy(&disk[at..at + expected.len()]),
        expected,
        "the guest's marker is not in the datastore"
    );
    let script = std::fs::read(&init).unwrap();
    let at = (FILE_SECTOR * 512) as usize;
    assert!(
        disk[at..at + script.len()] == script[..],
        "the file the guest copied is not in the datastore"
    );
    ds.assert_clean();
}
