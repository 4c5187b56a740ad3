//! Bad input is refused before the guest starts, with an error naming the VM and what is
//! wrong with it.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{guest_config, kvm_available, pattern_disk};
use hv::{Disk, HvError, Hypervisor, Vm, VmConfig};
use lun::Lun;

fn refused(config: VmConfig) -> HvError {
    match Vm::create(config) {
        Ok(vm) => panic!("VM {} was created", vm.name()),
        Err(error) => error,
    }
}

#[test]
fn no_kvm_device_is_a_clear_error() {
    let error = Hypervisor::open_at(Path::new("/nonexistent/kvm"))
        .err()
        .expect("opened a KVM device that does not exist");
    assert!(matches!(error, HvError::KvmUnavailable { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("/nonexistent/kvm"), "{message}");
    let cause = std::error::Error::source(&error)
        .expect("the OS error")
        .to_string();
    assert!(cause.contains("No such file"), "{cause}");
}

#[test]
fn a_device_that_is_not_kvm_is_refused() {
    let error = Hypervisor::open_at(Path::new("/dev/null"))
        .err()
        .expect("/dev/null accepted as KVM");
    assert!(error.to_string().contains("/dev/null"), "{error}");
}

#[test]
fn zero_vcpus_are_refused() {
    if !kvm_available() {
        return;
    }
    let (mut config, _) = guest_config("novcpu", 1, "");
    config.vcpus = 0;
    let message = refused(config).to_string();
    assert!(message.contains("vm novcpu"), "{message}");
    assert!(message.contains("at least one vCPU"), "{message}");
}

#[test]
fn more_vcpus_than_the_host_allows_are_refused() {
    if !kvm_available() {
        return;
    }
    let max = Hypervisor::open().unwrap().host_info().hv_max_vcpus;
    let (mut config, _) = guest_config("wide", 1, "");
    config.vcpus = max + 1;
    let error = refused(config);
    assert!(
        matches!(error, HvError::TooManyVcpus { requested, .. } if requested == max + 1),
        "{error:?}"
    );
}

#[test]
fn memory_larger_than_the_host_can_give_is_refused() {
    if !kvm_available() {
        return;
    }
    let (mut config, _) = guest_config("huge", 1, "");
    config.memory_bytes = 1 << 50;
    let error = refused(config);
    assert!(matches!(error, HvError::MemoryTooLarge { .. }), "{error:?}");
    assert!(error.to_string().contains("vm huge"), "{error}");
}

#[test]
fn memory_too_small_or_unaligned_is_refused() {
    if !kvm_available() {
        return;
    }
    for bytes in [1 << 20, (64 << 20) + 100] {
        let (mut config, _) = guest_config("odd", 1, "");
        config.memory_bytes = bytes;
        assert!(
            matches!(refused(config), HvError::InvalidConfig { .. }),
            "{bytes}"
        );
    }
}

#[test]
fn a_missing_kernel_is_refused() {
    if !kvm_available() {
        return;
    }
    let (mut config, _) = guest_config("nokernel", 1, "");
    config.kernel = Vec::new();
    let error = refused(config);
    assert!(matches!(error, HvError::MissingKernel { .. }), "{error:?}");
    assert_eq!(error.to_string(), "vm nokernel: no kernel given");
}

#[test]
fn a_kernel_that_is_neither_bzimage_nor_elf_is_refused() {
    if !kvm_available() {
        return;
    }
    let (mut config, _) = guest_config("script", 1, "");
    config.kernel = b"#!/bin/sh\necho this is not a kernel\n".to_vec();
    let error = refused(config);
    assert!(matches!(error, HvError::BadKernel { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("neither a bzImage nor an x86-64 ELF"),
        "{message}"
    );
}

#[test]
fn a_32_bit_elf_is_refused() {
    if !kvm_available() {
        return;
    }
    let (mut config, _) = guest_config("elf32", 1, "");
    config.kernel[4] = 1; // ELFCLASS32
    let message = refused(config).to_string();
    assert!(message.contains("32-bit"), "{message}");
}

#[test]
fn a_command_line_longer_than_the_kernel_accepts_is_refused() {
    if !kvm_available() {
        return;
    }
    let (config, _) = guest_config("longcmd", 1, &"x".repeat(5000));
    let error = refused(config);
    assert!(matches!(error, HvError::Cmdline { .. }), "{error:?}");
}

#[test]
fn an_initrd_that_does_not_fit_is_refused() {
    if !kvm_available() {
        return;
    }
    let (mut config, _) = guest_config("bigrd", 1, "");
    config.initrd = Some(vec![0u8; 80 << 20]);
    let error = refused(config);
    assert!(matches!(error, HvError::InitrdTooLarge { .. }), "{error:?}");
}

#[test]
fn too_many_disks_are_refused() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = pattern_disk(&dir, 0, 1 << 20);
    let (mut config, _) = guest_config("disks", 1, "");
    config.disks = vec![Disk::new(lun as Arc<dyn Lun>); 40];
    let message = refused(config).to_string();
    assert!(message.contains("40 disks"), "{message}");
}
