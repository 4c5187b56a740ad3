//! Ending a VM: the ACPI power button asking a guest to shut down, stopping a running guest
//! from the host, and a crashing guest reported with the registers of the vCPU that crashed.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{finish, guest_config, kvm_available, run_to_end};
use hv::{Vm, VmExit};

#[test]
fn the_power_button_makes_a_waiting_guest_power_off() {
    if !kvm_available() {
        return;
    }
    let (config, console) = guest_config("button", 2, "mode=wait");
    let handle = Vm::create(config).unwrap().start().unwrap();
    assert!(
        console.wait_for("waiting to be stopped", common::GUEST_TIMEOUT),
        "{}",
        console.contents()
    );
    assert!(handle.power_button());
    let exit = finish(handle, &console);
    assert_eq!(
        exit,
        VmExit::PowerOff { status: 0 },
        "{}",
        console.contents()
    );
    let out = console.contents();
    assert!(
        out.contains("power button: GED register 0xd1000000, GSI 3"),
        "{out}"
    );
    assert!(out.contains("power button pressed, shutting down"), "{out}");
}

#[test]
fn console_input_reaches_a_waiting_guest() {
    if !kvm_available() {
        return;
    }
    let (config, console) = guest_config("typist", 1, "mode=wait");
    let handle = Vm::create(config).unwrap().start().unwrap();
    assert!(console.wait_for("waiting to be stopped", common::GUEST_TIMEOUT));
    assert_eq!(handle.console_input(b"hello vm\r"), 9);
    assert!(
        console.wait_for("console input \"hello vm\"", common::GUEST_TIMEOUT),
        "{}",
        console.contents()
    );
    handle.stop();
    assert_eq!(handle.wait(), VmExit::Stopped);
}

#[test]
fn a_guest_that_ignores_the_power_button_keeps_running_until_stopped() {
    if !kvm_available() {
        return;
    }
    let (config, console) = guest_config("stubborn", 1, "mode=wait power_button=ignore");
    let handle = Vm::create(config).unwrap().start().unwrap();
    assert!(console.wait_for("waiting to be stopped", common::GUEST_TIMEOUT));
    assert!(handle.power_button());
    assert!(
        console.wait_for("power button pressed, ignored", common::GUEST_TIMEOUT),
        "{}",
        console.contents()
    );
    assert_eq!(handle.wait_timeout(Duration::from_millis(200)), None);
    handle.stop();
    assert_eq!(handle.wait(), VmExit::Stopped);
}

#[test]
fn a_running_guest_is_stopped_promptly() {
    if !kvm_available() {
        return;
    }
    let (config, console) = guest_config("stopme", 2, "mode=wait");
    let handle = Vm::create(config).unwrap().start().unwrap();
    assert!(
        console.wait_for("waiting to be stopped", common::GUEST_TIMEOUT),
        "{}",
        console.contents()
    );
    assert_eq!(
        handle.wait_timeout(Duration::from_millis(200)),
        None,
        "ended on its own"
    );
    let started = Instant::now();
    handle.stop();
    assert_eq!(handle.wait(), VmExit::Stopped);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn dropping_the_handle_stops_the_guest() {
    if !kvm_available() {
        return;
    }
    let (config, console) = guest_config("dropme", 2, "mode=wait");
    let handle = Vm::create(config).unwrap().start().unwrap();
    assert!(console.wait_for("waiting to be stopped", common::GUEST_TIMEOUT));
    let started = Instant::now();
    drop(handle);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_triple_fault_ends_the_vm_with_the_faulting_registers() {
    if !kvm_available() {
        return;
    }
    let (config, console) = guest_config("fault", 1, "mode=fault");
    let (exit, out) = run_to_end(config, &console);
    let rip = out
        .split("triple fault at rip=0x")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|hex| u64::from_str_radix(hex, 16).unwrap())
        .unwrap_or_else(|| panic!("no fault address on the console:\n{out}"));
    match exit {
        VmExit::Crashed {
            vcpu,
            reason,
            registers,
        } => {
            assert_eq!(vcpu, 0);
            // A triple fault on hardware; where the backend emulates the guest the emulator
            // may give up first. Either way the VM ends and says why.
            assert!(
                reason.contains("triple fault") || reason.contains("emulation"),
                "{reason}"
            );
            let registers = registers.expect("registers of the faulting vCPU");
            assert_eq!(registers.rip, rip, "{registers}");
            assert!(registers.long_mode);
        }
        other => panic!("expected a crash, got {other}"),
    }
}
