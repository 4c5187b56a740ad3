//! Helpers shared by the hv integration tests: a KVM prerequisite, the test guest, disks
//! carrying the host pattern, and a bounded wait.
#![allow(clippy::unwrap_used, dead_code)]

use std::sync::Arc;
use std::time::Duration;

use hv::test_guest::{self, HOST_PATTERN_OFFSET};
use hv::{Console, ConsoleBuffer, Disk, VmConfig, VmExit, VmHandle};
use lun::{FileLun, Lun};

/// Longest any test guest may take: its kernel code runs in an emulator on PVM hosts.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// True when /dev/kvm is usable; otherwise the test is skipped (or fails under CI=true).
pub fn kvm_available() -> bool {
    lun::prereq::require(
        lun::prereq::have_device("/dev/kvm"),
        "/dev/kvm (read-write) for booting guests",
    )
}

/// A test-guest VM with `vcpus` vCPUs, 64 MiB, `cmdline`, console captured in the buffer.
pub fn guest_config(name: &str, vcpus: u32, cmdline: &str) -> (VmConfig, ConsoleBuffer) {
    let image = test_guest::image().expect("test guest image");
    let mut config = VmConfig::new(name, image.to_vec());
    config.vcpus = vcpus;
    config.memory_bytes = 64 << 20;
    config.cmdline = cmdline.to_string();
    let console = ConsoleBuffer::new();
    config.console = Console::Buffer(console.clone());
    (config, console)
}

/// A sparse file LUN of `size` bytes with the host pattern of disk `index` at its start.
pub fn pattern_disk(dir: &tempfile::TempDir, index: u32, size: u64) -> Arc<FileLun> {
    let lun =
        Arc::new(FileLun::create(&dir.path().join(format!("disk{index}.img")), size).unwrap());
    lun.write_at(&test_guest::host_pattern(index), HOST_PATTERN_OFFSET)
        .unwrap();
    lun
}

pub fn disk(lun: &Arc<FileLun>) -> Disk {
    Disk::new(lun.clone() as Arc<dyn Lun>)
}

/// Waits for the VM to end; stops it and fails the test if it does not within the timeout.
pub fn finish(handle: VmHandle, console: &ConsoleBuffer) -> VmExit {
    if handle.wait_timeout(GUEST_TIMEOUT).is_none() {
        handle.stop();
        panic!(
            "guest did not finish within {GUEST_TIMEOUT:?}; console:\n{}",
            console.contents()
        );
    }
    handle.wait()
}

/// Creates and starts the VM, waits for it to end: how it ended, and its console.
pub fn run_to_end(config: VmConfig, console: &ConsoleBuffer) -> (VmExit, String) {
    let exit = finish(hv::Vm::create(config).unwrap().start().unwrap(), console);
    (exit, console.contents())
}
