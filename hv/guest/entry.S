/*
 * vapp test guest: boot code.
 *
 * The VMM enters through the PVH ABI: 32-bit protected mode, paging off, %ebx holding the
 * physical address of struct hvm_start_info. We switch to long mode on identity-mapped page
 * tables that are data in this image (no code runs to build them: on the PVM backend every
 * kernel-mode instruction is emulated, so instructions are the budget).
 *
 * Secondary CPUs start in real mode at the SIPI page (0x8000) from a trampoline the BSP copies
 * there, and follow the same path to long mode.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define PTE_PRESENT_RW 0x3
#define PDE_2M 0x83           /* present, writable, page size */
#define PDE_2M_UNCACHED 0x9b  /* the same plus PWT|PCD, for device memory */
#define AP_STACK_SHIFT 14     /* 16 KiB per secondary CPU */
#define MAX_CPUS 64
#define SIPI_PAGE 0x8000

/*
 * From 32-bit protected mode with %cr0 missing \cr0_bits: the identity map, PAE, EFER.LME,
 * paging, then a far jump to the 64-bit code at \target. The BSP and the APs share it.
 */
    .macro enter_long_mode cr0_bits, target
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or \cr0_bits, %eax
    mov %eax, %cr0
    ljmp $0x08, $\target
    .endm

/* Flat data segments in long mode; %fs and %gs null. */
    .macro load_data_segments
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    .endm

/* The PVH entry point, found by the loader in this ELF note. */
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4
    .long 4
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long pvh_entry

    .section .text.entry, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    cli
    mov %ebx, %esi
    lgdt gdt_ptr
    enter_long_mode $(CR0_PG|CR0_PE), bsp_long

    .code64
bsp_long:
    load_data_segments
    lea boot_stack_top(%rip), %rsp
    mov %esi, %edi
    call bsp_main
    jmp halt_forever

/* Secondary CPUs arrive here in long mode from the trampoline. */
ap_long:
    load_data_segments
    mov $1, %eax
    lock xadd %eax, ap_next_slot(%rip)
    mov %eax, %edi
    inc %eax
    shl $AP_STACK_SHIFT, %rax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    call ap_main
    /* fall through */

    .globl halt_forever
halt_forever:
    cli
    hlt
    jmp halt_forever

/*
 * Loads an empty IDT and executes an undefined instruction: the #UD cannot be delivered, which
 * escalates to a triple fault (or, where the backend emulates the guest, an emulation failure).
 * The address of the faulting instruction is returned by fault_rip() so the guest can print it
 * and the host can compare it with the register dump.
 */
    .globl triple_fault
triple_fault:
    lidt null_idt_ptr(%rip)
    .globl triple_fault_insn
triple_fault_insn:
    ud2
    jmp halt_forever

/* The real-mode trampoline, copied to SIPI_PAGE; it only uses addresses relative to it. */
    .code16
    .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_gdt_ptr - ap_trampoline_start)
    mov %cr0, %eax
    or $CR0_PE, %eax
    mov %eax, %cr0
    ljmpl $0x18, $(ap_protected - ap_trampoline_start + SIPI_PAGE)
    .code32
ap_protected:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    enter_long_mode $CR0_PG, ap_long
    .p2align 2
ap_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

    .section .data
    .p2align 3
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: flat data */
    .quad 0x00cf9a000000ffff    /* 0x18: flat 32-bit code, for the trampoline */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
null_idt_ptr:
    .word 0
    .quad 0
ap_next_slot:
    .long 0

/* Identity map: 0-1 GiB with write-back 2 MiB pages, 3-4 GiB (devices, LAPIC) uncached. */
    .p2align 12
pml4:
    .quad pdpt + PTE_PRESENT_RW
    .fill 511, 8, 0
pdpt:
    .quad pd_low + PTE_PRESENT_RW
    .quad 0
    .quad 0
    .quad pd_high + PTE_PRESENT_RW
    .fill 508, 8, 0
pd_low:
    .set i, 0
    .rept 512
    .quad (i << 21) + PDE_2M
    .set i, i + 1
    .endr
pd_high:
    .set i, 0
    .rept 512
    .quad 0xc0000000 + (i << 21) + PDE_2M_UNCACHED
    .set i, i + 1
    .endr

    .section .bss
    .p2align 12
boot_stack:
    .skip 16384
boot_stack_top:
    .p2align 12
ap_stacks:
    .skip (MAX_CPUS + 1) << AP_STACK_SHIFT
