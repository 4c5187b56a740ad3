//! Putting a kernel in guest memory: recognise its format, load it with linux-loader, place the
//! command line and initrd, and write the boot information its entry protocol expects (a PVH
//! start_info or a Linux zero page), each with the e820 map and the ACPI RSDP.

use std::io::Cursor;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams, linux::LinuxBootConfigurator};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use tracing::warn;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::cpu::BootEntry;
use crate::error::{HvError, Result};
use crate::layout::{
    CMDLINE, CMDLINE_MAX, HIGH_RAM_START, MMIO_GAP_START, PVH_MEMMAP, PVH_MODLIST, PVH_START_INFO,
    ZERO_PAGE, e820_map,
};
use crate::unpack;

const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1 << 0;
const LOADED_HIGH: u8 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;
/// bzImage: the 64-bit entry point is 0x200 past the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 4096;

/// What the boot vCPU needs to start the kernel.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub entry: BootEntry,
    /// A short description for the logs, e.g. "bzImage" or "ELF (PVH)".
    pub format: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    BzImage,
    Elf,
}

/// Checks, without loading it, that `kernel` is something [`crate::Vm::create`] can boot: a
/// bzImage or an x86-64 ELF. Returns the format's name ("bzImage" or "ELF"); the error names
/// `vm` and says what is wrong. Lets a caller refuse a kernel before it stores it anywhere.
pub fn check_kernel(vm: &str, kernel: &[u8]) -> Result<&'static str> {
    Ok(match detect(vm, kernel)? {
        Format::BzImage => "bzImage",
        Format::Elf => "ELF",
    })
}

/// Recognises the kernel by its magic numbers, before anything is loaded.
fn detect(vm: &str, kernel: &[u8]) -> Result<Format> {
    let bad = |reason: &str| HvError::BadKernel {
        vm: vm.to_string(),
        reason: reason.to_string(),
    };
    if kernel.is_empty() {
        return Err(HvError::MissingKernel { vm: vm.to_string() });
    }
    if kernel.len() >= 0x206 && kernel[0x202..0x206] == HDRS_MAGIC.to_le_bytes() {
        return Ok(Format::BzImage);
    }
    if kernel.starts_with(b"\x7fELF") {
        const ELFCLASS64: u8 = 2;
        const EM_X86_64: u16 = 62;
        if kernel.len() < 64 {
            return Err(bad("truncated ELF header"));
        }
        if kernel[4] != ELFCLASS64 {
            return Err(bad("a 32-bit ELF; only x86-64 ELF kernels boot"));
        }
        if u16::from_le_bytes([kernel[18], kernel[19]]) != EM_X86_64 {
            return Err(bad("an ELF for another machine than x86-64"));
        }
        return Ok(Format::Elf);
    }
    let shown: Vec<String> = kernel.iter().take(4).map(|b| format!("{b:02x}")).collect();
    Err(bad(&format!(
        "no ELF magic and no bzImage \"HdrS\" header (first bytes: {})",
        shown.join(" ")
    )))
}

/// Loads `kernel` and everything it needs into `mem`, a guest of `memory` bytes. With
/// `unpack_bzimage`, a bzImage's kernel is decompressed here rather than by the guest (see
/// [`crate::unpack`]); a payload we cannot unpack still boots the usual way.
#[allow(clippy::too_many_arguments)]
pub(crate) fn load(
    vm: &str,
    mem: &GuestMemoryMmap,
    memory: u64,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    rsdp: u64,
    unpack_bzimage: bool,
) -> Result<Loaded> {
    let format = detect(vm, kernel)?;
    let load_error = |source| HvError::KernelLoad {
        vm: vm.to_string(),
        source,
    };
    let bad = |reason: String| HvError::BadKernel {
        vm: vm.to_string(),
        reason,
    };
    let start = Some(GuestAddress(HIGH_RAM_START));

    // (what was loaded, the bzImage setup header if any, the entry protocol, a description)
    let (loaded, header, linux64, description) = match format {
        Format::Elf => {
            let loaded =
                Elf::load(mem, None, &mut Cursor::new(kernel), start).map_err(load_error)?;
            let pvh = matches!(loaded.pvh_boot_cap, PvhBootCapability::PvhEntryPresent(_));
            let description = if pvh {
                "ELF (PVH entry)"
            } else {
                "ELF (64-bit entry)"
            };
            (loaded, None, !pvh, description)
        }
        Format::BzImage => {
            let header = bzimage_header(kernel)
                .ok_or_else(|| bad("truncated bzImage setup header".into()))?;
            if { header.version } < 0x20c || { header.xloadflags } & XLF_KERNEL_64 == 0 {
                return Err(bad(format!(
                    "bzImage (boot protocol {}.{:02}) has no 64-bit entry point",
                    { header.version } >> 8,
                    { header.version } & 0xff
                )));
            }
            let unpacked = if unpack_bzimage {
                match unpack::payload(kernel).map(unpack::unpack) {
                    Some(Ok(vmlinux)) => Some(vmlinux),
                    Some(Err(reason)) => {
                        warn!(vm, %reason, "the guest will decompress its kernel itself");
                        None
                    }
                    None => None,
                }
            } else {
                None
            };
            match unpacked {
                Some(vmlinux) => {
                    let loaded = Elf::load(mem, None, &mut Cursor::new(&vmlinux), start)
                        .map_err(load_error)?;
                    (
                        loaded,
                        Some(header),
                        true,
                        "bzImage (kernel unpacked on the host)",
                    )
                }
                None => {
                    let mut loaded = BzImage::load(mem, None, &mut Cursor::new(kernel), start)
                        .map_err(load_error)?;
                    loaded.kernel_load =
                        GuestAddress(loaded.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET);
                    (loaded, loaded.setup_header, true, "bzImage")
                }
            }
        }
    };

    let max_cmdline = match &header {
        // Before boot protocol 2.06 the limit was 255 bytes.
        Some(hdr) if { hdr.version } >= 0x206 => hdr.cmdline_size as usize,
        Some(_) => 255,
        None => CMDLINE_MAX,
    }
    .min(CMDLINE_MAX);
    write_cmdline(vm, mem, cmdline, max_cmdline)?;

    let initrd_max = match &header {
        Some(hdr) if { hdr.initrd_addr_max } != 0 => u64::from(hdr.initrd_addr_max) + 1,
        _ => MMIO_GAP_START,
    };
    let initrd = match initrd {
        Some(bytes) => Some(place_initrd(vm, mem, memory, &loaded, bytes, initrd_max)?),
        None => None,
    };

    let entry = if linux64 {
        write_zero_page(vm, mem, memory, header, cmdline, initrd, rsdp)?;
        BootEntry::Linux64 {
            entry: loaded.kernel_load.raw_value(),
            zero_page: ZERO_PAGE,
        }
    } else {
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(bad("ELF without a PVH entry".into()));
        };
        write_start_info(vm, mem, memory, cmdline, initrd, rsdp)?;
        BootEntry::Pvh {
            entry: entry.raw_value(),
            start_info: PVH_START_INFO,
        }
    };
    Ok(Loaded {
        entry,
        format: description,
    })
}

/// The setup header of a bzImage, as the file holds it.
fn bzimage_header(kernel: &[u8]) -> Option<setup_header> {
    let start = 0x1f1;
    let bytes = kernel.get(start..start + std::mem::size_of::<setup_header>())?;
    setup_header::from_slice(bytes).copied()
}

fn memory_error(vm: &str, what: &str) -> HvError {
    HvError::GuestMemory {
        vm: vm.to_string(),
        reason: format!("cannot write the {what}"),
    }
}

fn write_cmdline(vm: &str, mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<()> {
    let error = |reason: String| HvError::Cmdline {
        vm: vm.to_string(),
        reason,
    };
    if cmdline.len() >= max {
        return Err(error(format!(
            "{} bytes, the kernel accepts at most {}",
            cmdline.len(),
            max - 1
        )));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(error("contains a NUL byte".to_string()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE))
        .map_err(|_| memory_error(vm, "command line"))
}

/// Puts the initrd as high as allowed below `limit`, above the kernel; returns (addr, size).
fn place_initrd(
    vm: &str,
    mem: &GuestMemoryMmap,
    memory: u64,
    kernel: &KernelLoaderResult,
    initrd: &[u8],
    limit: u64,
) -> Result<(u64, u64)> {
    let size = initrd.len() as u64;
    let too_large = |reason: String| HvError::InitrdTooLarge {
        vm: vm.to_string(),
        size,
        reason,
    };
    let top = memory.min(MMIO_GAP_START).min(limit);
    let kernel_end = kernel.kernel_end.next_multiple_of(PAGE_SIZE);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| {
            too_large(format!(
                "{} bytes free between the kernel's end at {kernel_end:#x} and {top:#x}",
                top.saturating_sub(kernel_end)
            ))
        })?;
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(|_| memory_error(vm, "initrd"))?;
    Ok((addr, size))
}

fn write_start_info(
    vm: &str,
    mem: &GuestMemoryMmap,
    memory: u64,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(memory)
        .into_iter()
        .map(|(addr, size, usable)| hvm_memmap_table_entry {
            addr,
            size,
            type_: if usable { E820_RAM } else { E820_RESERVED },
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST },
        cmdline_paddr: if cmdline.is_empty() { 0 } else { CMDLINE },
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|_| memory_error(vm, "PVH start_info"))
}

fn write_zero_page(
    vm: &str,
    mem: &GuestMemoryMmap,
    memory: u64,
    header: Option<setup_header>,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(header) = header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(memory);
    for (slot, (addr, size, usable)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: if *usable { E820_RAM } else { E820_RESERVED },
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE)), mem)
        .map_err(|_| memory_error(vm, "zero page"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_formats_and_names_what_is_wrong() {
        assert!(matches!(
            detect("t", &[]),
            Err(HvError::MissingKernel { .. })
        ));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect("t", &bz).unwrap(), Format::BzImage);
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[18] = 62;
        assert_eq!(detect("t", &elf).unwrap(), Format::Elf);
        elf[4] = 1;
        let err = detect("t", &elf).unwrap_err().to_string();
        assert!(err.contains("32-bit"), "{err}");
        let err = detect("t", b"#!/bin/sh\necho not a kernel\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("23 21 2f 62"), "{err}");
    }
}
