//! Booting the test guest: every vCPU comes up, the guest powers off with its status, two VMs
//! run side by side, and a guest reset is reported.
#![allow(clippy::unwrap_used)]

mod common;

use common::{disk, guest_config, kvm_available, pattern_disk, run_to_end};
use hv::test_guest::{GUEST_PATTERN_OFFSET, PATTERN_BYTES, guest_pattern};
use hv::{Vm, VmExit};
use lun::Lun;

#[test]
fn one_vcpu_boots_and_powers_off_cleanly() {
    if !kvm_available() {
        return;
    }
    let (config, console) = guest_config("boot1", 1, "mode=boot");
    let (exit, out) = run_to_end(config, &console);
    assert_eq!(exit, VmExit::PowerOff { status: 0 }, "console:\n{out}");
    assert!(out.contains("cpu 0 up (apic id 0)"), "{out}");
    assert!(out.contains("1 of 1 cpus up"), "{out}");
}

#[test]
fn every_vcpu_of_an_smp_guest_reports_its_apic_id() {
    if !kvm_available() {
        return;
    }
    // More vCPUs than the host has cores: vCPUs are threads, they need not have a core each.
    let vcpus = 4;
    let (config, console) = guest_config("smp4", vcpus, "mode=boot");
    let (exit, out) = run_to_end(config, &console);
    assert_eq!(exit, VmExit::PowerOff { status: 0 }, "console:\n{out}");
    for id in 0..vcpus {
        assert!(
            out.contains(&format!("cpu {id} up (apic id {id})")),
            "cpu {id}:\n{out}"
        );
    }
    assert!(out.contains("4 of 4 cpus up"), "{out}");
}

#[test]
fn two_vms_run_side_by_side_each_on_its_own_disk() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vms = Vec::new();
    for name in ["left", "right"] {
        let lun = pattern_disk(&dir, 0, 1 << 20);
        std::fs::rename(
            dir.path().join("disk0.img"),
            dir.path().join(format!("{name}.img")),
        )
        .unwrap();
        let (mut config, console) = guest_config(name, 2, "mode=wait");
        config.disks.push(disk(&lun));
        vms.push((Vm::create(config).unwrap().start().unwrap(), console, lun));
    }
    // Both are running at the same time: each has done its work and is waiting.
    for (_, console, _) in &vms {
        assert!(
            console.wait_for("waiting to be stopped", common::GUEST_TIMEOUT),
            "{}",
            console.contents()
        );
    }
    for (handle, console, lun) in vms {
        assert_eq!(handle.exit(), None, "{} ended early", handle.name());
        handle.stop();
        assert_eq!(handle.wait(), VmExit::Stopped);
        let out = console.contents();
        assert!(out.contains("2 of 2 cpus up"), "{out}");
        assert!(
            out.contains("disk 0: guest pattern written, flushed, read back"),
            "{out}"
        );
        let mut written = vec![0u8; PATTERN_BYTES];
        lun.read_at(&mut written, GUEST_PATTERN_OFFSET).unwrap();
        assert_eq!(written, guest_pattern(0));
    }
}

#[test]
fn guest_reset_ends_the_vm_as_reset() {
    if !kvm_available() {
        return;
    }
    let (config, console) = guest_config("reset", 1, "mode=reset");
    let (exit, _) = run_to_end(config, &console);
    assert_eq!(exit, VmExit::Reset, "console:\n{}", console.contents());
}
