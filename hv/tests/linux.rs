//! The Debian cloud kernel (scripts/guest-assets.sh) boots under hv: its own banner reaches
//! our serial console. With hardware virtualization it goes on to run an initramfs that
//! prints a marker and powers off; PVM emulates guest kernel code and its emulator stops a
//! distribution kernel long before that (see `Backend::guest_limits`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::kvm_available;
use hv::{Console, ConsoleBuffer, Hypervisor, VmConfig, VmExit};

const MARKER: &str = "VAPP-INITRAMFS-MARKER";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// build/guest with the kernel, busybox and modules, fetched by the script when missing.
fn guest_assets() -> Option<PathBuf> {
    let dir = workspace().join("build/guest");
    let ready = |d: &Path| d.join("vmlinuz").is_file() && d.join("busybox").is_file();
    if !ready(&dir) {
        let _ = Command::new(workspace().join("scripts/guest-assets.sh"))
            .arg(&dir)
            .current_dir(workspace())
            .status();
    }
    lun::prereq::require(
        ready(&dir),
        "build/guest/vmlinuz and busybox (scripts/guest-assets.sh could not fetch them)",
    )
    .then_some(dir)
}

fn initramfs(assets: &Path, tmp: &tempfile::TempDir) -> Vec<u8> {
    let init = tmp.path().join("init");
    std::fs::write(&init, format!("#!/bin/sh\necho {MARKER}\npoweroff -f\n")).unwrap();
    let out = tmp.path().join("initramfs.cpio.gz");
    let status = Command::new(workspace().join("scripts/mkinitramfs.sh"))
        .arg(&out)
        .arg(&init)
        .arg(assets)
        .status()
        .unwrap();
    assert!(status.success(), "mkinitramfs.sh failed");
    std::fs::read(out).unwrap()
}

#[test]
fn debian_cloud_kernel_prints_its_banner_on_our_serial_console() {
    if !kvm_available() {
        return;
    }
    let Some(assets) = guest_assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let hv = Hypervisor::open().unwrap();
    let backend = hv.host_info().backend;

    let mut config = VmConfig::new("debian", std::fs::read(assets.join("vmlinuz")).unwrap());
    config.vcpus = 2;
    config.memory_bytes = 256 << 20;
    config.initrd = Some(initramfs(&assets, &tmp));
    config.cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1".to_string();
    let console = ConsoleBuffer::new();
    config.console = Console::Buffer(console.clone());

    let started = Instant::now();
    let handle = hv.create_vm(config).unwrap().start().unwrap();
    let banner = console.wait_for("Linux version", Duration::from_secs(120));
    if !banner {
        handle.stop();
    }
    assert!(
        banner,
        "no kernel banner; exit {:?}, console:\n{}",
        handle.exit(),
        console.contents()
    );
    eprintln!(
        "kernel banner after {:?} on a {backend} host",
        started.elapsed()
    );

    if backend.emulates_guest_kernel() {
        eprintln!(
            "not waiting for the initramfs marker: {backend} backend: {}",
            backend.guest_limits()
        );
        handle.stop();
        let exit = handle.wait();
        assert!(
            matches!(exit, VmExit::Stopped | VmExit::Crashed { .. }),
            "{exit}"
        );
        return;
    }
    let marker = console.wait_for(MARKER, Duration::from_secs(120));
    if !marker {
        handle.stop();
    }
    assert!(
        marker,
        "no initramfs marker; console:\n{}",
        console.contents()
    );
    let exit = common::finish(handle, &console);
    assert_eq!(
        exit,
        VmExit::PowerOff { status: 0 },
        "{}",
        console.contents()
    );
}
