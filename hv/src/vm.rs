//! A VM: created (and fully checked) from a [`VmConfig`] before any guest instruction runs,
//! then started on one thread per vCPU and ended by the guest or by [`VmHandle::stop`].

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use tracing::{debug, info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::acpi::{self, MmioDevice};
use crate::boot;
use crate::config::{Disk, Nic, SERIAL_BYTES, VmConfig};
use crate::cpu::{self, BootEntry};
use crate::devices::ged::Ged;
use crate::devices::legacy::{AcpiRegisters, ExitStatusPort, I8042, SerialPort};
use crate::devices::virtio_blk::Block;
use crate::devices::virtio_mmio::MmioTransport;
use crate::devices::virtio_net::{Net, run_backend};
use crate::devices::{Bus, BusDevice};
use crate::error::{HvError, Result};
use crate::exit::{ExitLatch, VmExit};
use crate::host::{self, HostInfo};
use crate::layout::{
    ACPI_SLEEP_CONTROL_PORT, BOOT_GDT, COM1_GSI, COM1_PORT, GED_ADDR, GED_GSI, GED_SIZE,
    I8042_DATA_PORT, KVM_TSS_ADDR, MAX_DISKS, MAX_VIRTIO_DEVICES, MIN_MEMORY, VIRTIO_MMIO_SIZE,
    ram_regions, virtio_mmio_device,
};
use crate::net::Tap;
use crate::vcpu::{Vcpu, install_kick_handler};

/// The exit-status port (QEMU's isa-debug-exit port): see [`VmExit::PowerOff`].
pub const EXIT_STATUS_PORT: u16 = 0xf4;
const STABLE_KVM_API: i32 = 12;
const PAGE_SIZE: u64 = 4096;

/// An open /dev/kvm: the host's limits, and a factory of VMs.
pub struct Hypervisor {
    kvm: Kvm,
    info: HostInfo,
    supported_cpuid: CpuId,
}

impl Hypervisor {
    /// Opens /dev/kvm.
    pub fn open() -> Result<Hypervisor> {
        Self::open_at(Path::new("/dev/kvm"))
    }

    /// Opens the KVM device at `path`.
    pub fn open_at(path: &Path) -> Result<Hypervisor> {
        let shown = path.display().to_string();
        let unavailable = |source: std::io::Error| HvError::KvmUnavailable {
            path: shown.clone(),
            source,
        };
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| unavailable(std::io::ErrorKind::InvalidInput.into()))?;
        let kvm = Kvm::new_with_path(&c_path)
            .map_err(|e| unavailable(std::io::Error::from_raw_os_error(e.errno())))?;
        let version = kvm.get_api_version();
        if version != STABLE_KVM_API {
            return Err(HvError::KvmApiVersion {
                path: shown,
                found: version,
                expected: STABLE_KVM_API,
            });
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| unavailable(std::io::Error::from_raw_os_error(e.errno())))?;
        let info = HostInfo::probe(&kvm, &shown);
        Ok(Hypervisor {
            kvm,
            info,
            supported_cpuid,
        })
    }

    pub fn host_info(&self) -> &HostInfo {
        &self.info
    }

    /// Checks `config`, builds the VM and loads its kernel; no guest code runs yet.
    pub fn create_vm(&self, config: VmConfig) -> Result<Vm> {
        validate(&config, &self.info)?;
        Vm::build(self, config)
    }
}

fn validate(config: &VmConfig, host: &HostInfo) -> Result<()> {
    let vm = config.name.as_str();
    let invalid = |reason: String| HvError::InvalidConfig {
        vm: vm.to_string(),
        reason,
    };
    if vm.is_empty() {
        return Err(invalid("the VM has no name".to_string()));
    }
    if config.vcpus == 0 {
        return Err(invalid("a VM needs at least one vCPU".to_string()));
    }
    if config.vcpus > host.hv_max_vcpus {
        return Err(HvError::TooManyVcpus {
            vm: vm.to_string(),
            requested: config.vcpus,
            max: host.hv_max_vcpus,
        });
    }
    if config.memory_bytes < MIN_MEMORY {
        return Err(invalid(format!(
            "{} bytes of memory, at least {MIN_MEMORY} are needed",
            config.memory_bytes
        )));
    }
    if config.memory_bytes % PAGE_SIZE != 0 {
        return Err(invalid(format!(
            "memory ({} bytes) is not a multiple of the {PAGE_SIZE}-byte page",
            config.memory_bytes
        )));
    }
    let available = host::available_memory().unwrap_or(host.host_memory_available_bytes);
    if config.memory_bytes > available {
        return Err(HvError::MemoryTooLarge {
            vm: vm.to_string(),
            requested: config.memory_bytes,
            available,
        });
    }
    if config.kernel.is_empty() {
        return Err(HvError::MissingKernel { vm: vm.to_string() });
    }
    if config.disks.len() > MAX_DISKS {
        return Err(invalid(format!(
            "{} disks, at most {MAX_DISKS} are supported",
            config.disks.len()
        )));
    }
    if config.disks.len() + config.nics.len() > MAX_VIRTIO_DEVICES {
        return Err(invalid(format!(
            "{} disks and {} NICs, at most {MAX_VIRTIO_DEVICES} devices in all are supported",
            config.disks.len(),
            config.nics.len()
        )));
    }
    for (index, disk) in config.disks.iter().enumerate() {
        let lun = &disk.lun;
        let bad = |reason: String| HvError::BadDisk {
            vm: vm.to_string(),
            index,
            lun: lun.name().to_string(),
            reason,
        };
        let sector = lun.sector_size();
        if !sector.is_power_of_two() || sector < 512 {
            return Err(bad(format!(
                "sector size {sector} is not a power of two ≥ 512"
            )));
        }
        if lun.size() == 0 || lun.size() % u64::from(sector) != 0 {
            return Err(bad(format!(
                "size {} is not a positive multiple of its {sector}-byte sector",
                lun.size()
            )));
        }
        if let Some(serial) = &disk.serial
            && (serial.len() > SERIAL_BYTES || !serial.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(bad(format!(
                "serial {serial:?} is not at most {SERIAL_BYTES} printable ASCII characters"
            )));
        }
    }
    for (index, nic) in config.nics.iter().enumerate() {
        if let Some(other) = config.nics[..index].iter().position(|n| n.mac == nic.mac) {
            return Err(HvError::BadNic {
                vm: vm.to_string(),
                index,
                tap: nic.tap.name().to_string(),
                reason: format!("MAC {} is also nic {other}'s", nic.mac),
            });
        }
    }
    Ok(())
}

/// A VM ready to start.
pub struct Vm {
    name: String,
    vm_fd: VmFd,
    vcpus: Vec<Vcpu>,
    mem: Arc<GuestMemoryMmap>,
    serial: Arc<Mutex<SerialPort>>,
    ged: Arc<Mutex<Ged>>,
    exit: Arc<ExitLatch>,
    nic_backends: Vec<NicBackend>,
}

/// What a NIC's backend thread needs.
struct NicBackend {
    name: String,
    transport: Arc<Mutex<MmioTransport<Net>>>,
    tap: Arc<Tap>,
    kick: EventFd,
}

/// A running NIC backend thread and how to end it.
struct NicThread {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl Vm {
    /// Opens /dev/kvm and creates the VM: see [`Hypervisor::create_vm`].
    pub fn create(config: VmConfig) -> Result<Vm> {
        Hypervisor::open()?.create_vm(config)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn build(hv: &Hypervisor, config: VmConfig) -> Result<Vm> {
        let mut builder = Builder::new(hv, &config.name, config.memory_bytes)?;
        let Platform { serial, ged } = builder.add_platform_devices(config.console)?;
        let mut cmdline = config.cmdline.trim().to_string();
        let mut mmio_devices = builder.add_disks(config.disks, &mut cmdline)?;
        let nic_backends = builder.add_nics(config.nics, mmio_devices.len(), &mut cmdline)?;
        mmio_devices.extend(nic_backends.iter().map(|b| b.1));
        let nic_backends: Vec<NicBackend> = nic_backends.into_iter().map(|b| b.0).collect();
        let entry = builder.load_guest(
            config.vcpus,
            &mmio_devices,
            &config.kernel,
            config.initrd.as_deref(),
            &cmdline,
        )?;
        let exit = Arc::new(ExitLatch::default());
        let vcpus = builder.create_vcpus(config.vcpus, entry, &exit)?;
        Ok(Vm {
            name: builder.name,
            vm_fd: builder.vm_fd,
            vcpus,
            mem: builder.mem,
            serial,
            ged,
            exit,
            nic_backends,
        })
    }

    /// Starts the vCPU threads.
    pub fn start(self) -> Result<VmHandle> {
        let vm = self.name.clone();
        install_kick_handler().map_err(|source| HvError::Io {
            vm: vm.clone(),
            what: "installing the vCPU kick signal handler".to_string(),
            source,
        })?;
        let mut handle = VmHandle {
            name: self.name,
            threads: Vec::new(),
            exit: self.exit,
            serial: self.serial,
            ged: self.ged,
            mem: self.mem,
            nic_threads: Vec::new(),
            _vm_fd: self.vm_fd,
        };
        for backend in self.nic_backends {
            let NicBackend {
                name,
                transport,
                tap,
                kick,
            } = backend;
            let io = |source| HvError::Io {
                vm: vm.clone(),
                what: format!("starting the backend of {name}"),
                source,
            };
            let stop = EventFd::new(EFD_NONBLOCK).map_err(io)?;
            let stop_clone = stop.try_clone().map_err(io)?;
            let thread = std::thread::Builder::new()
                .name(format!("{name}-rx"))
                .spawn(move || run_backend(transport, tap, kick, stop_clone))
                .map_err(io)?;
            handle.nic_threads.push(NicThread { stop, thread });
        }
        for vcpu in self.vcpus {
            let id = vcpu.id;
            let exit = handle.exit.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let vm = vcpu.vm.clone();
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run()))
                        .is_err()
                    {
                        warn!(vm, vcpu = id, "vCPU thread panicked");
                        exit.set(VmExit::Crashed {
                            vcpu: id,
                            reason: "the vCPU thread panicked (a hypervisor bug)".to_string(),
                            registers: None,
                        });
                    }
                });
            match spawned {
                Ok(thread) => handle.threads.push(thread),
                Err(source) => {
                    handle.stop();
                    return Err(HvError::Io {
                        vm,
                        what: format!("spawning the thread of vCPU {id}"),
                        source,
                    });
                }
            }
        }
        info!(vm = %handle.name, "started");
        Ok(handle)
    }

    /// Starts the VM and waits until it ends.
    pub fn run(self) -> Result<VmExit> {
        Ok(self.start()?.wait())
    }
}

/// The platform devices the host talks to after the VM is built.
struct Platform {
    serial: Arc<Mutex<SerialPort>>,
    ged: Arc<Mutex<Ged>>,
}

/// The steps of building a VM, in order; each fails with an error naming the VM.
struct Builder<'h> {
    hv: &'h Hypervisor,
    name: String,
    vm_fd: VmFd,
    mem: Arc<GuestMemoryMmap>,
    memory_bytes: u64,
    pio: Bus,
    mmio: Bus,
}

impl<'h> Builder<'h> {
    /// A KVM VM with its in-kernel interrupt controllers, timer and guest memory.
    fn new(hv: &'h Hypervisor, name: &str, memory_bytes: u64) -> Result<Self> {
        let vm_fd = hv
            .kvm
            .create_vm()
            .map_err(kvm_error(name, "KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_error(name, "KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_error(name, "KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_error(name, "KVM_CREATE_PIT2"))?;
        let mem = Arc::new(guest_memory(name, memory_bytes)?);
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| HvError::GuestMemory {
                    vm: name.to_string(),
                    reason: "region without a host mapping".to_string(),
                })?;
            // Transparent huge pages for guest RAM, as Cloud Hypervisor does: fewer host page
            // faults and TLB misses for the guest and for device DMA (measured 10-15 % on disk
            // reads). Only advice: without THP the guest runs on small pages.
            // SAFETY: the range is exactly the mapping `mem` owns.
            let advised =
                unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
            if advised != 0 {
                debug!(vm = name, error = %std::io::Error::last_os_error(), "no huge pages for guest RAM");
            }
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the VM keeps until
            // its vCPUs are gone.
            unsafe { vm_fd.set_user_memory_region(region) }
                .map_err(kvm_error(name, "KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Builder {
            hv,
            name: name.to_string(),
            vm_fd,
            mem,
            memory_bytes,
            pio: Bus::default(),
            mmio: Bus::default(),
        })
    }

    fn irq(&self, gsi: u32) -> Result<EventFd> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| HvError::Io {
            vm: self.name.clone(),
            what: "eventfd".to_string(),
            source,
        })?;
        self.vm_fd
            .register_irqfd(&irq, gsi)
            .map_err(kvm_error(&self.name, "KVM_IRQFD"))?;
        Ok(irq)
    }

    /// COM1 writing to `console`, the i8042, the ACPI registers, the exit-status port and the
    /// GED with the power button.
    fn add_platform_devices(&mut self, console: crate::Console) -> Result<Platform> {
        let serial = Arc::new(Mutex::new(SerialPort::new(
            &self.name,
            self.irq(COM1_GSI)?,
            console.into_writer(),
        )));
        self.pio.insert(u64::from(COM1_PORT), 8, serial.clone());
        self.pio.insert(
            u64::from(I8042_DATA_PORT),
            5,
            Arc::new(Mutex::new(I8042::new())),
        );
        self.pio.insert(
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            3,
            Arc::new(Mutex::new(AcpiRegisters)),
        );
        self.pio.insert(
            u64::from(EXIT_STATUS_PORT),
            4,
            Arc::new(Mutex::new(ExitStatusPort)),
        );
        let ged = Arc::new(Mutex::new(Ged::new(self.irq(GED_GSI)?)));
        self.mmio.insert(GED_ADDR, GED_SIZE, ged.clone());
        Ok(Platform { serial, ged })
    }

    /// A virtio-blk device per disk, each also named on `cmdline`.
    fn add_disks(&mut self, disks: Vec<Disk>, cmdline: &mut String) -> Result<Vec<MmioDevice>> {
        let vm = self.name.clone();
        let mut devices = Vec::new();
        for (index, disk) in disks.into_iter().enumerate() {
            let (base, gsi) = virtio_mmio_device(index);
            let disk_name = format!("disk{index}");
            let lun_name = disk.lun.name().to_string();
            let (read_only, discard) = (disk.read_only, disk.discard.is_some());
            let block = Block::new(&vm, &disk_name, disk);
            let transport =
                MmioTransport::new(&vm, &disk_name, block, self.mem.clone(), self.irq(gsi)?)
                    .map_err(|e| HvError::BadDisk {
                        vm: vm.clone(),
                        index,
                        lun: lun_name.clone(),
                        reason: format!("virtqueue: {e}"),
                    })?;
            self.mmio.insert(
                base,
                VIRTIO_MMIO_SIZE,
                Arc::new(Mutex::new(transport)) as Arc<Mutex<dyn BusDevice>>,
            );
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
            devices.push(MmioDevice { base, gsi });
            info!(vm, disk = index, lun = %lun_name, base, gsi, read_only, discard, "virtio-blk attached");
        }
        Ok(devices)
    }

    /// A virtio-net device per NIC in the slots after the `first` used ones, each also named
    /// on `cmdline`.
    fn add_nics(
        &mut self,
        nics: Vec<Nic>,
        first: usize,
        cmdline: &mut String,
    ) -> Result<Vec<(NicBackend, MmioDevice)>> {
        let vm = self.name.clone();
        let mut backends = Vec::new();
        for (index, nic) in nics.into_iter().enumerate() {
            let (base, gsi) = virtio_mmio_device(first + index);
            let name = format!("nic{index}");
            let tap_name = nic.tap.name().to_string();
            let io = |source| HvError::Io {
                vm: vm.clone(),
                what: format!("eventfd of {name}"),
                source,
            };
            let kick = EventFd::new(EFD_NONBLOCK).map_err(io)?;
            let tap = Arc::new(nic.tap);
            let net = Net::new(
                &vm,
                &name,
                tap.clone(),
                nic.mac,
                &nic.rx,
                &nic.tx,
                kick.try_clone().map_err(io)?,
            )
            .scheduled(nic.clock.clone());
            let transport = MmioTransport::new(&vm, &name, net, self.mem.clone(), self.irq(gsi)?)
                .map_err(|e| HvError::BadNic {
                vm: vm.clone(),
                index,
                tap: tap_name.clone(),
                reason: format!("virtqueue: {e}"),
            })?;
            let transport = Arc::new(Mutex::new(transport));
            self.mmio.insert(
                base,
                VIRTIO_MMIO_SIZE,
                transport.clone() as Arc<Mutex<dyn BusDevice>>,
            );
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
            info!(vm, nic = index, tap = %tap_name, mac = %nic.mac, base, gsi, "virtio-net attached");
            backends.push((
                NicBackend {
                    name,
                    transport,
                    tap,
                    kick,
                },
                MmioDevice { base, gsi },
            ));
        }
        Ok(backends)
    }

    /// ACPI tables, boot GDT, kernel, initrd and boot information; returns the entry.
    fn load_guest(
        &self,
        vcpus: u32,
        devices: &[MmioDevice],
        kernel: &[u8],
        initrd: Option<&[u8]>,
        cmdline: &str,
    ) -> Result<BootEntry> {
        let vm = self.name.as_str();
        let tables = acpi::build(vcpus, devices).map_err(|reason| HvError::InvalidConfig {
            vm: vm.to_string(),
            reason,
        })?;
        for (addr, blob) in &tables.blobs {
            write_guest(vm, &self.mem, *addr, blob, "ACPI tables")?;
        }
        let gdt: Vec<u8> = cpu::GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
        write_guest(vm, &self.mem, BOOT_GDT, &gdt, "boot GDT")?;
        let loaded = boot::load(
            vm,
            &self.mem,
            self.memory_bytes,
            kernel,
            initrd,
            cmdline,
            tables.rsdp_addr,
            self.hv.info.backend.emulates_guest_kernel(),
        )?;
        if matches!(loaded.entry, BootEntry::Linux64 { .. }) {
            for (addr, table) in cpu::boot_page_tables() {
                write_guest(vm, &self.mem, addr, &table, "boot page tables")?;
            }
        }
        info!(vm, format = loaded.format, vcpus, memory = self.memory_bytes, %cmdline,
              "kernel loaded");
        Ok(loaded.entry)
    }

    /// The vCPUs: the first at the kernel entry, the others waiting for INIT/SIPI as on a PC.
    /// The buses are final from here on: the vCPUs share them.
    fn create_vcpus(
        &mut self,
        count: u32,
        entry: BootEntry,
        exit: &Arc<ExitLatch>,
    ) -> Result<Vec<Vcpu>> {
        let pio = Arc::new(std::mem::take(&mut self.pio));
        let mmio = Arc::new(std::mem::take(&mut self.mmio));
        let name = self.name.as_str();
        let mut vcpus = Vec::with_capacity(count as usize);
        for id in 0..count {
            let fd = self
                .vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_error(name, "KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpu::vcpu_cpuid(&self.hv.supported_cpuid, id, count))
                .map_err(kvm_error(name, "KVM_SET_CPUID2"))?;
            cpu::wire_local_apic(&fd).map_err(kvm_error(name, "KVM_SET_LAPIC"))?;
            fd.set_fpu(&cpu::boot_fpu())
                .map_err(kvm_error(name, "KVM_SET_FPU"))?;
            if id == 0 {
                let sregs = fd.get_sregs().map_err(kvm_error(name, "KVM_GET_SREGS"))?;
                let (regs, sregs) = cpu::boot_registers(entry, sregs);
                fd.set_sregs(&sregs)
                    .map_err(kvm_error(name, "KVM_SET_SREGS"))?;
                fd.set_regs(&regs)
                    .map_err(kvm_error(name, "KVM_SET_REGS"))?;
            }
            vcpus.push(Vcpu {
                id,
                fd,
                vm: name.to_string(),
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
            });
        }
        Ok(vcpus)
    }
}

fn kvm_error(vm: &str, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HvError {
    let vm = vm.to_string();
    move |source| HvError::Kvm { vm, op, source }
}

fn guest_memory(vm: &str, bytes: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(bytes)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| HvError::GuestMemory {
        vm: vm.to_string(),
        reason: format!("cannot map {bytes} bytes: {e}"),
    })
}

fn write_guest(vm: &str, mem: &GuestMemoryMmap, addr: u64, bytes: &[u8], what: &str) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| HvError::GuestMemory {
            vm: vm.to_string(),
            reason: format!("cannot write the {what} at {addr:#x}"),
        })
}

/// A running (or ended) VM.
pub struct VmHandle {
    name: String,
    threads: Vec<JoinHandle<()>>,
    exit: Arc<ExitLatch>,
    serial: Arc<Mutex<SerialPort>>,
    ged: Arc<Mutex<Ged>>,
    mem: Arc<GuestMemoryMmap>,
    nic_threads: Vec<NicThread>,
    // Last: the VM must outlive its vCPUs and memory slots.
    _vm_fd: VmFd,
}

impl VmHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the VM now, whatever the guest is doing (the guest is not asked); the exit is
    /// [`VmExit::Stopped`] unless the VM had already ended.
    pub fn stop(&self) {
        if self.exit.set(VmExit::Stopped) {
            info!(vm = %self.name, "stopped from the host");
        }
    }

    /// Presses the ACPI power button: the graceful way to ask a guest to shut down. A guest that
    /// handles it (Linux with systemd-logind or acpid; the test guest in `mode=wait`) powers
    /// off by itself; one that does not keeps running, and [`VmHandle::stop`] is the way out.
    /// False when the VM has already ended or the interrupt could not be raised.
    pub fn power_button(&self) -> bool {
        if self.exit.is_set() {
            return false;
        }
        match self
            .ged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .press_power_button()
        {
            Ok(()) => {
                info!(vm = %self.name, "power button pressed");
                true
            }
            Err(error) => {
                warn!(vm = %self.name, %error, "cannot raise the power button interrupt");
                false
            }
        }
    }

    /// How the VM ended, if it has.
    pub fn exit(&self) -> Option<VmExit> {
        self.exit.get()
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.exit.wait(timeout)
    }

    /// Waits until the VM ends and all its vCPU threads are gone.
    pub fn wait(mut self) -> VmExit {
        self.join();
        let exit = self.exit.get().unwrap_or(VmExit::Crashed {
            vcpu: 0,
            reason: "every vCPU thread ended without an exit (a hypervisor bug)".to_string(),
            registers: None,
        });
        info!(vm = %self.name, %exit, "ended");
        exit
    }

    /// Types `bytes` on the guest's serial console; returns how many its FIFO took.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .input(bytes)
    }

    /// Host virtual address ranges (start, length) of guest RAM, e.g. to tell the VMM's own
    /// memory from the guest's in /proc/self/smaps.
    pub fn guest_memory_host_ranges(&self) -> Vec<(usize, usize)> {
        self.mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
                Some((host as usize, r.len() as usize))
            })
            .collect()
    }

    fn join(&mut self) {
        for thread in self.threads.drain(..) {
            // Each vCPU thread ends once the exit latch is set; a panic was already reported.
            let _ = thread.join();
        }
        for nic in self.nic_threads.drain(..) {
            if let Err(error) = nic.stop.write(1) {
                warn!(vm = %self.name, %error, "cannot stop a NIC backend");
                continue;
            }
            let _ = nic.thread.join();
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() || !self.nic_threads.is_empty() {
            self.stop();
            self.join();
        }
    }
}
