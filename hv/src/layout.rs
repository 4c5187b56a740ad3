//! The guest physical address map: where boot data, ACPI tables, RAM and devices live.
//!
//! ```text
//! 0x0000_0500  boot GDT (long-mode and PVH entry)
//! 0x0000_6000  PVH hvm_start_info, then its memory map
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_9000  boot page tables (PML4, PDPT, PD: 1 GiB identity map)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  end of low RAM; EBDA, VGA and BIOS area reserved up to 1 MiB
//! 0x000e_0000  ACPI tables (RSDP first, where legacy scans look)
//! 0x0010_0000  kernel; RAM continues to the end of memory or the MMIO gap
//! 0xc000_0000  MMIO gap (1 GiB): virtio-mmio windows, the GED, then IOAPIC and LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than 3 GiB
//! ```

pub const BOOT_GDT: u64 = 0x500;
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MEMMAP: u64 = PVH_START_INFO + 0x100;
pub const PVH_MODLIST: u64 = PVH_START_INFO + 0xc00;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_PML4: u64 = 0x9000;
pub const BOOT_PDPT: u64 = 0xa000;
pub const BOOT_PD: u64 = 0xb000;
/// Boot stack for the Linux 64-bit entry, below the page tables.
pub const BOOT_STACK: u64 = 0x8ff0;
pub const CMDLINE: u64 = 0x20000;
/// The longest command line we place; Linux accepts at most what its header says.
pub const CMDLINE_MAX: usize = 4096;
pub const LOW_RAM_END: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
pub const HIGH_RAM_START: u64 = 0x100000;

pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The ACPI Generic Event Device's register window (the power button).
pub const GED_ADDR: u64 = 0xd100_0000;
pub const GED_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Where KVM keeps the TSS and identity page it needs for real-mode guests on Intel.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// GSIs: the GED takes the unused ISA line of COM2, COM1 keeps its own, virtio devices
/// follow from 5 up to the IOAPIC's last pin.
pub const GED_GSI: u32 = 3;
pub const COM1_GSI: u32 = 4;
pub const VIRTIO_GSI_BASE: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - VIRTIO_GSI_BASE) as usize;
/// Disks and NICs share the virtio-mmio slots: at most this many of either.
pub const MAX_DISKS: usize = MAX_VIRTIO_DEVICES;

/// I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const I8042_DATA_PORT: u16 = 0x60;
/// ACPI sleep control and status registers and the reset register (hardware-reduced ACPI).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// SLP_TYP of S5 (soft off) in our DSDT's \_S5 package.
pub const ACPI_S5_SLP_TYP: u8 = 5;

/// Guests below this cannot hold the boot data, the tables and a kernel.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The RAM regions of a guest with `memory` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(memory: u64) -> Vec<(u64, u64)> {
    if memory <= MMIO_GAP_START {
        vec![(0, memory)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, memory - MMIO_GAP_START)]
    }
}

/// The e820 map the guest sees: (start, length, usable).
pub fn e820_map(memory: u64) -> Vec<(u64, u64, bool)> {
    let mut map = vec![
        (0, LOW_RAM_END, true),
        (LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, false),
    ];
    for (start, len) in ram_regions(memory) {
        let (start, len) = if start == 0 {
            (HIGH_RAM_START, len - HIGH_RAM_START)
        } else {
            (start, len)
        };
        map.push((start, len, true));
    }
    map
}

/// The window and GSI of the `index`th virtio-mmio device.
pub fn virtio_mmio_device(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_GSI_BASE + index as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region_and_the_bios_hole_is_reserved() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        let map = e820_map(256 << 20);
        assert_eq!(map[0], (0, LOW_RAM_END, true));
        assert!(!map[1].2);
        assert_eq!(map[2], (HIGH_RAM_START, (256 << 20) - HIGH_RAM_START, true));
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let memory = 5u64 << 30;
        let regions = ram_regions(memory);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].1 + regions[1].1, memory);
        assert_eq!(regions[1].0, MMIO_GAP_END);
        assert!(
            e820_map(memory)
                .iter()
                .all(|&(start, len, _)| start + len <= MMIO_GAP_START || start >= MMIO_GAP_END)
        );
    }

    #[test]
    fn virtio_windows_fit_in_the_gap_below_the_ged_and_the_ioapic() {
        let (last, gsi) = virtio_mmio_device(MAX_DISKS - 1);
        assert!(last + VIRTIO_MMIO_SIZE <= GED_ADDR);
        assert!(GED_ADDR + GED_SIZE <= u64::from(IOAPIC_ADDR));
        assert!(gsi < IOAPIC_PINS);
        const { assert!(GED_GSI < VIRTIO_GSI_BASE && GED_GSI != COM1_GSI) };
    }
}
