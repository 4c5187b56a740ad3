//! The Debian cloud kernel (build/guest/vmlinuz, from scripts/guest-assets.sh) and an
//! initramfs, copied onto a datastore by `vapp vm create` and booted by `vapp vm start` from
//! there: the kernel's own banner arrives on our console. With hardware virtualization the
//! initramfs runs, prints its marker and powers off; the PVM backend emulates guest kernel code
//! and stops a distribution kernel long before (see `hv::Backend::guest_limits`), so there the
//! VM is powered off once the banner is seen.
#![allow(clippy::unwrap_used)]

mod vm_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vm_support::{Fixture, kvm_available, workspace};

const MARKER: &str = "VAPP-INITRAMFS-MARKER";

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

#[test]
fn debian_kernel_boots_from_the_datastore_to_its_banner() {
    if !kvm_available() {
        return;
    }
    let Some(assets) = guest_assets() else {
        return;
    };
    let fx = Fixture::new();
    let init = fx.dir.path().join("init");
    std::fs::write(&init, format!("#!/bin/sh\necho {MARKER}\npoweroff -f\n")).unwrap();
    let initramfs = fx.dir.path().join("initramfs.cpio.gz");
    let built = Command::new(workspace().join("scripts/mkinitramfs.sh"))
        .arg(&initramfs)
        .arg(&init)
        .arg(&assets)
        .status()
        .unwrap();
    assert!(built.success(), "mkinitramfs.sh failed");
    fx.ok(&[
        "vm",
        "create",
        "/vms/debian",
        "--kernel",
        assets.join("vmlinuz").to_str().unwrap(),
        "--initrd",
        initramfs.to_str().unwrap(),
        "--vcpus",
        "2",
        "--memory",
        "256M",
        "--cmdline",
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1",
        "--on-reset",
        "power-off",
    ]);
    // The kernel in the VM folder is the one booted: the host file is not used again.
    assert_eq!(
        fx.read("/vms/debian/kernel", 0, 1 << 20),
        std::fs::read(assets.join("vmlinuz")).unwrap()[..1 << 20]
    );

    let started = Instant::now();
    let vm = fx.start("/vms/debian", &[]);
    assert!(
        vm.stdout
            .wait_for("Linux version", Duration::from_secs(120)),
        "no kernel banner; console:\n{}\nstderr:\n{}",
        vm.stdout.text(),
        vm.stderr.text()
    );
    eprintln!("kernel banner after {:?}", started.elapsed());

    let backend = hv::Hypervisor::open().unwrap().host_info().backend;
    if backend.emulates_guest_kernel() {
        eprintln!(
            "not waiting for the initramfs marker: {backend} backend: {}",
            backend.guest_limits()
        );
        fx.ok(&["vm", "stop", "--force", "/vms/debian"]);
        let (status, _, messages) = vm.wait();
        // Powered off by us, or the emulator gave up on the kernel first.
        assert!(
            matches!(status.code(), Some(4) | Some(5)),
            "{status}: {messages}"
        );
        return;
    }
    assert!(
        vm.stdout.wait_for(MARKER, Duration::from_secs(120)),
        "no initramfs marker; console:\n{}",
        vm.stdout.text()
    );
    let (status, console, messages) = vm.wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
}
