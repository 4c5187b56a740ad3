//! KVM hypervisor: boots guests whose disks are any [`lun::Lun`].
//!
//! Built on the rust-vmm crates (kvm-ioctls, vm-memory, linux-loader, vm-superio,
//! virtio-queue, acpi_tables), the way Firecracker and Cloud Hypervisor are: one thread per
//! vCPU, Linux bzImage or PVH ELF boot, ACPI (MADT, FADT, DSDT) for CPUs, power and devices,
//! an 8250 console, virtio-blk and virtio-net (on a tap) over virtio-mmio.
//!
//! ```no_run
//! # fn demo(kernel: Vec<u8>, disk: std::sync::Arc<dyn lun::Lun>) -> Result<(), hv::HvError> {
//! let mut config = hv::VmConfig::new("web1", kernel);
//! config.vcpus = 2;
//! config.memory_bytes = 256 << 20;
//! config.cmdline = "console=ttyS0".to_string();
//! config.disks.push(hv::Disk::new(disk));
//! config.console = hv::Console::Stdout;
//! let vm = hv::Vm::create(config)?.start()?;
//! println!("{}", vm.wait());
//! # Ok(()) }
//! ```

mod acpi;
mod boot;
mod config;
mod cpu;
mod devices;
mod error;
mod exit;
mod host;
mod layout;
pub mod net;
pub mod test_guest;
mod unpack;
mod vcpu;
mod vm;

pub use boot::check_kernel;
pub use config::{
    Console, ConsoleBuffer, Discard, DiscardError, Disk, Nic, NicLimits, SERIAL_BYTES, VmConfig,
};
pub use cpu::Registers;
pub use error::{HvError, Result};
pub use exit::VmExit;
pub use host::{Backend, HostInfo, total_memory};
pub use layout::{MAX_DISKS, MAX_VIRTIO_DEVICES, MIN_MEMORY};
pub use vm::{EXIT_STATUS_PORT, Hypervisor, Vm, VmHandle};
