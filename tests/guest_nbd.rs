//! A real guest on `vapp export`: QEMU (software emulation) boots the Debian cloud kernel with
//! a busybox initramfs whose two disks are NBD drives served by `vapp export` of plain files,
//! one over TCP and one over a Unix socket. The guest reads a marker the host put on each
//! disk, writes its own, syncs and powers off; the host then finds the guest's markers in
//! the files.
#![allow(clippy::unwrap_used)]

mod export_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use export_support::{Export, require_tools};

const DISK_SIZE: u64 = 64 << 20;
/// Where the host's and the guest's markers go, in 512-byte sectors.
const HOST_SECTOR: u64 = 1;
const GUEST_SECTOR: u64 = 2048;

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

fn write_marker(file: &Path, sector: u64, text: &str) {
    use std::os::unix::fs::FileExt;
    let disk = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    disk.write_all_at(text.as_bytes(), sector * 512).unwrap();
}

fn read_marker(file: &Path, sector: u64, len: usize) -> String {
    use std::os::unix::fs::FileExt;
    let disk = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; len];
    disk.read_exact_at(&mut buf, sector * 512).unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn a_qemu_guest_boots_with_disks_on_vapp_export() {
    if !require_tools(&[("qemu-system-x86_64", "qemu-system-x86"), ("cpio", "cpio")]) {
        return;
    }
    let Some(assets) = guest_assets() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let nonce = format!("{:08x}", std::process::id() ^ 0x5eed_1234);
    let disks: Vec<PathBuf> = ["tcp.raw", "unix.raw"]
        .iter()
        .map(|name| {
            let path = dir.path().join(name);
            std::fs::File::create(&path)
                .unwrap()
                .set_len(DISK_SIZE)
                .unwrap();
            path
        })
        .collect();
    for (disk, name) in disks.iter().zip(["vda", "vdb"]) {
        write_marker(disk, HOST_SECTOR, &format!("HOST-{name}-{nonce}\n"));
    }

    // Each disk: read the host's marker to the console, write the guest's, sync.
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
sync
echo GUEST-DONE
poweroff -f
"#,
            skip = HOST_SECTOR * 512 / 32,
            seek = GUEST_SECTOR,
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

    let tcp = Export::start(&disks[0], &["--listen", "127.0.0.1:0", "--name", "vda"]);
    let socket = dir.path().join("vdb.sock");
    let unix = Export::start(
        &disks[1],
        &["--socket", socket.to_str().unwrap(), "--name", "vdb"],
    );

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
        .arg(format!("file={},format=raw,if=virtio", tcp.url))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", unix.url))
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
            console.contains(&format!("GUEST-SAW HOST-{name}-{nonce}")),
            "the guest did not read the host's marker on {name}:\n{console}"
        );
    }

    // Orderly stop: each export flushes before exiting.
    for mut export in [tcp, unix] {
        export.signal(libc::SIGTERM);
        assert_eq!(export.wait(Duration::from_secs(20)).code(), Some(0));
    }
    for (disk, name) in disks.iter().zip(["vda", "vdb"]) {
        let expected = format!("GUEST-{name}-{nonce}\n");
        assert_eq!(read_marker(disk, GUEST_SECTOR, expected.len()), expected);
    }
}
