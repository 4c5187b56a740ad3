//! x86-64 vCPU state: CPUID topology, boot registers for the two entry protocols, the local
//! APIC wiring, and a register snapshot for crash reports.

use std::fmt;

use kvm_bindings::{CpuId, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

use crate::layout::{BOOT_GDT, BOOT_PD, BOOT_PDPT, BOOT_PML4, BOOT_STACK};

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, %ebx = hvm_start_info.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode on identity-mapped page tables, %rsi = zero page.
    Linux64 { entry: u64, zero_page: u64 },
}

/// The boot GDT: PVH needs a flat 32-bit code segment, the Linux 64-bit protocol wants
/// __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
pub(crate) const GDT: [u64; 5] = [
    0,                     // 0x00 null
    0x00cf_9b00_0000_ffff, // 0x08 flat 32-bit code (PVH)
    0x00af_9b00_0000_ffff, // 0x10 64-bit code (__BOOT_CS)
    0x00cf_9300_0000_ffff, // 0x18 flat data (__BOOT_DS)
    0x0000_8b00_0000_0fff, // 0x20 TSS, busy: VMX checks TR on entry
];
const CODE32_SELECTOR: u16 = 0x08;
const CODE64_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Identity map of the first GiB with 2 MiB pages, for the Linux 64-bit entry.
pub(crate) fn boot_page_tables() -> Vec<(u64, Vec<u8>)> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes())
        .collect();
    vec![
        (BOOT_PML4, (BOOT_PDPT | PRESENT_RW).to_le_bytes().to_vec()),
        (BOOT_PDPT, (BOOT_PD | PRESENT_RW).to_le_bytes().to_vec()),
        (BOOT_PD, pd),
    ]
}

fn segment(selector: u16) -> kvm_segment {
    let entry = GDT[usize::from(selector >> 3)];
    let flags = (entry >> 40) as u16;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            // Granularity: the limit counts 4 KiB pages.
            if flags & 0x8000 != 0 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Registers of the boot vCPU at the kernel entry.
pub(crate) fn boot_registers(entry: BootEntry, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    let data = segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            sregs.cs = segment(CODE32_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            sregs.cs = segment(CODE64_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = BOOT_PML4;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    (regs, sregs)
}

/// The x87/SSE control words Linux expects at entry.
pub(crate) fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The host's supported CPUID, made to describe vCPU `id` of a `count`-vCPU machine with one
/// thread per core and one socket, so the guest's topology matches the MADT.
pub(crate) fn vcpu_cpuid(supported: &CpuId, id: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    // Bits needed to number `count` cores, as leaf 0xb reports it.
    let core_bits = u32::BITS - (count.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                const EDX_HTT: u32 = 1 << 28;
                entry.ebx = (entry.ebx & 0xffff) | (id << 24) | (count.min(255) << 16);
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                entry.eax = (entry.eax & 0x03ff_ffff) | ((count.min(64) - 1) << 26);
            }
            0xb | 0x1f => {
                entry.edx = id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = count;
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            0x8000_0008 => {
                entry.ecx = (core_bits << 12) | (count.min(256) - 1);
            }
            0x8000_001e => {
                entry.eax = id;
                entry.ebx = id & 0xff;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

/// Routes LINT0 to ExtINT and LINT1 to NMI, as a PC's firmware leaves them.
pub(crate) fn wire_local_apic(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7 << 8;
    const DELIVERY_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic()?;
    for (offset, mode) in [(LVT_LINT0, DELIVERY_EXTINT), (LVT_LINT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = byte as std::os::raw::c_char;
        }
    }
    vcpu.set_lapic(&lapic)
}

/// The registers of a vCPU, captured when it stopped unexpectedly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registers {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: u16,
    pub ss: u16,
    /// Whether CS is a 64-bit code segment.
    pub long_mode: bool,
}

impl Registers {
    pub(crate) fn capture(vcpu: &VcpuFd) -> Option<Registers> {
        let r = vcpu.get_regs().ok()?;
        let s = vcpu.get_sregs().ok()?;
        Some(Registers {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs: s.cs.selector,
            ss: s.ss.selector,
            long_mode: s.cs.l == 1,
        })
    }
}

impl fmt::Display for Registers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} ss={:#x} {} \
             rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} \
             r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x} \
             cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.rip,
            self.rsp,
            self.rflags,
            self.cs,
            self.ss,
            if self.long_mode { "64-bit" } else { "legacy" },
            self.rax,
            self.rbx,
            self.rcx,
            self.rdx,
            self.rsi,
            self.rdi,
            self.rbp,
            self.r8,
            self.r9,
            self.r10,
            self.r11,
            self.r12,
            self.r13,
            self.r14,
            self.r15,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment(CODE64_SELECTOR);
        assert_eq!((code64.l, code64.db, code64.type_), (1, 0, 0xb));
        assert_eq!((code64.base, code64.limit), (0, 0xffff_ffff));
        let code32 = segment(CODE32_SELECTOR);
        assert_eq!((code32.l, code32.db, code32.present), (0, 1, 1));
        let data = segment(DATA_SELECTOR);
        assert_eq!((data.type_, data.s, data.limit), (3, 1, 0xffff_ffff));
        assert_eq!(segment(TSS_SELECTOR).type_, 0xb);
    }

    #[test]
    fn pvh_entry_is_protected_mode_without_paging() {
        let (regs, sregs) = boot_registers(
            BootEntry::Pvh {
                entry: 0x10_0000,
                start_info: 0x6000,
            },
            kvm_sregs::default(),
        );
        assert_eq!((regs.rip, regs.rbx), (0x10_0000, 0x6000));
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.efer, 0);
    }

    #[test]
    fn topology_numbers_every_vcpu() {
        let mut supported = CpuId::new(2).unwrap();
        supported.as_mut_slice()[0].function = 1;
        supported.as_mut_slice()[1].function = 0xb;
        supported.as_mut_slice()[1].index = 1;
        let cpuid = vcpu_cpuid(&supported, 3, 4);
        assert_eq!(cpuid.as_slice()[0].ebx >> 24, 3);
        assert_eq!(cpuid.as_slice()[1].ebx, 4);
        assert_eq!(cpuid.as_slice()[1].eax, 2);
        assert_eq!(cpuid.as_slice()[1].edx, 3);
    }
}
