/*
 * vapp test guest: a freestanding kernel that checks what a VMM must get right and says so on
 * the serial port, then powers off with a status whose bits name what failed (0: all passed).
 *
 * It boots through PVH, finds its CPUs in the ACPI MADT and starts each with INIT/SIPI, finds
 * its virtio-blk devices on the command line (virtio_mmio.device=SIZE@BASE:IRQ, as Linux does),
 * verifies the pattern the host wrote at the start of every disk (a blank disk is new and has
 * none), writes its own pattern after it, flushes and reads it back, and checks that error paths
 * (out-of-range read, write to a read-only disk, unknown request type) come back with the
 * virtio status they must. In mode=wait it then halts until the ACPI power button is pressed
 * (the GED interrupt wakes it) and powers off. In mode=counter it writes an ordered counter to
 * its disks until stopped, so a snapshot of them can be checked for one point in time; in
 * mode=heartbeat it continues a counter another boot left on its disk (see write_heartbeat).
 *
 * On the PVM backend every kernel-mode instruction here is emulated at about a million per
 * second, and events are not injected while an instruction is being emulated, so the code polls
 * while it works and keeps loops short; only a halted CPU takes an interrupt. It must not use
 * SSE, x87 or XSAVE, which that emulator does not implement (built with -mgeneral-regs-only).
 *
 * The disk patterns are defined identically in hv/src/test_guest.rs; keep them in step.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define COM1 0x3f8
#define EXIT_STATUS_PORT 0xf4
#define LAPIC_BASE 0xfee00000UL
#define SIPI_PAGE 0x8000
#define MAX_CPUS 64
#define MAX_DISKS 16

/* Bits of the power-off status. */
#define FAIL_BOOT_INFO 0x01    /* start_info, command line or ACPI tables unusable */
#define FAIL_CPUS 0x02         /* a CPU listed in the MADT did not come up */
#define FAIL_DISK_SETUP 0x04   /* a virtio-blk device could not be initialised */
#define FAIL_HOST_PATTERN 0x08 /* the data the host wrote did not read back */
#define FAIL_DISK_IO 0x10      /* a request that should succeed failed */
#define FAIL_ERROR_PATH 0x20   /* a request that should fail did not, or failed wrongly */
#define FAIL_VERIFY 0x40       /* the guest's own pattern did not read back */

/* The disk patterns (see hv/src/test_guest.rs). */
#define HOST_TAG 0x686f737470617474ULL  /* "hostpatt" */
#define GUEST_TAG 0x6775657374706174ULL /* "guestpat" */
#define GOLDEN 0x9e3779b97f4a7c15ULL
#define PATTERN_BYTES 4096
#define HOST_PATTERN_SECTOR 0
#define GUEST_PATTERN_SECTOR 8
#define DISCARD_SECTOR 16 /* 4096 bytes discarded here when the device offers discard */

extern char ap_trampoline_start[], ap_trampoline_end[], triple_fault_insn[];
extern void triple_fault(void) __attribute__((noreturn));
extern void halt_forever(void) __attribute__((noreturn));

/* ---- freestanding basics ---- */

void *memcpy(void *dst, const void *src, size_t n)
{
    void *ret = dst;
    asm volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
    return ret;
}

void *memset(void *dst, int c, size_t n)
{
    void *ret = dst;
    asm volatile("rep stosb" : "+D"(dst), "+c"(n) : "a"(c) : "memory");
    return ret;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}

static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline void cpu_relax(void) { asm volatile("pause" : : : "memory"); }
static inline void barrier(void) { asm volatile("" : : : "memory"); }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static u32 cpuid_apic_id(void)
{
    u32 a = 1, b, c = 0, d;
    asm volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return b >> 24;
}

/* ---- serial console, shared by all CPUs ---- */

static volatile u32 console_lock;

/* A 16550A takes 16 bytes into its transmit FIFO once THRE says it is empty; polling the
 * line status once per FIFO rather than once per byte halves the port accesses (VM exits). */
#define UART_FIFO 16
static unsigned tx_room; /* guarded by console_lock */

static void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* no interrupts while it works: it polls (mode=wait takes input) */
    outb(COM1 + 3, 0x03); /* 8 data bits, no parity, one stop bit */
    outb(COM1 + 2, 0x07); /* FIFOs on and cleared */
    outb(COM1 + 4, 0x03); /* DTR, RTS */
}

static void serial_putc(char c)
{
    if (!tx_room) {
        while (!(inb(COM1 + 5) & 0x20)) /* transmit holding register (FIFO) empty */
            cpu_relax();
        tx_room = UART_FIFO;
    }
    tx_room--;
    outb(COM1, c);
}

static void put_unsigned(u64 v, unsigned base)
{
    char buf[24];
    int n = 0;
    do {
        unsigned digit = v % base;
        buf[n++] = digit < 10 ? '0' + digit : 'a' + digit - 10;
        v /= base;
    } while (v);
    while (n)
        serial_putc(buf[--n]);
}

/* printf with %s %c %u %x %lu %lx: all this guest needs. */
static void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            serial_putc(*p);
            continue;
        }
        int is_long = 0;
        if (p[1] == 'l') {
            is_long = 1;
            p++;
        }
        switch (*++p) {
        case 's':
            for (const char *s = va_arg(ap, const char *); *s; s++)
                serial_putc(*s);
            break;
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'u':
            put_unsigned(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 10);
            break;
        case 'x':
            put_unsigned(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 16);
            break;
        default:
            serial_putc('%');
            serial_putc(*p);
        }
    }
    __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
    va_end(ap);
}

/* ---- boot information: PVH start_info and the command line ---- */

#define HVM_START_MAGIC 0x336ec578
#define E820_RAM 1

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};

struct hvm_memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};

enum mode { MODE_TEST, MODE_BOOT, MODE_WAIT, MODE_FAULT, MODE_RESET, MODE_READ, MODE_COUNTER,
            MODE_SPIN, MODE_DISKIO,
            MODE_HEARTBEAT };

struct disk_desc {
    u64 base;
    u32 irq;
};

static struct {
    enum mode mode;
    struct disk_desc disks[MAX_DISKS];
    unsigned ndisks;
    u32 read_mib, req_kib, depth;
    u32 counter_sectors;
    int diskio_write; /* mode=diskio: write instead of read */
    u64 boot_id; /* mode=heartbeat: 0 draws one at boot */
    int ignore_power_button;
    int prompt; /* prompt=login: end the output with a getty's "login: " and no newline */
} cfg = {.read_mib = 64, .req_kib = 1024, .depth = 4, .counter_sectors = 64};

static int starts_with(const char *s, const char *prefix, const char **rest)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    *rest = s;
    return 1;
}

static int word_is(const char *s, const char *word)
{
    while (*word)
        if (*s++ != *word++)
            return 0;
    return *s == ' ' || *s == 0;
}

/* Parses decimal or 0x-hex with an optional K/M/G suffix. */
static u64 parse_num(const char **sp)
{
    const char *s = *sp;
    u64 v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2;; s++) {
            char c = *s;
            if (c >= '0' && c <= '9')
                v = v * 16 + (c - '0');
            else if (c >= 'a' && c <= 'f')
                v = v * 16 + (c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                v = v * 16 + (c - 'A' + 10);
            else
                break;
        }
    } else {
        for (; *s >= '0' && *s <= '9'; s++)
            v = v * 10 + (*s - '0');
    }
    switch (*s) {
    case 'K': case 'k': v <<= 10; s++; break;
    case 'M': case 'm': v <<= 20; s++; break;
    case 'G': case 'g': v <<= 30; s++; break;
    }
    *sp = s;
    return v;
}

static void parse_cmdline(const char *s)
{
    while (*s) {
        const char *v;
        if (starts_with(s, "virtio_mmio.device=", &v)) {
            parse_num(&v); /* window size */
            if (*v == '@') {
                v++;
                u64 base = parse_num(&v);
                u64 irq = 0;
                if (*v == ':') {
                    v++;
                    irq = parse_num(&v);
                }
                if (cfg.ndisks < MAX_DISKS)
                    cfg.disks[cfg.ndisks++] = (struct disk_desc){base, (u32)irq};
            }
        } else if (starts_with(s, "mode=", &v)) {
            if (word_is(v, "boot"))
                cfg.mode = MODE_BOOT;
            else if (word_is(v, "wait"))
                cfg.mode = MODE_WAIT;
            else if (word_is(v, "fault"))
                cfg.mode = MODE_FAULT;
            else if (word_is(v, "reset"))
                cfg.mode = MODE_RESET;
            else if (word_is(v, "read"))
                cfg.mode = MODE_READ;
            else if (word_is(v, "counter"))
                cfg.mode = MODE_COUNTER;
            else if (word_is(v, "spin"))
                cfg.mode = MODE_SPIN;
            else if (word_is(v, "diskio"))
                cfg.mode = MODE_DISKIO;
            else if (word_is(v, "heartbeat"))
                cfg.mode = MODE_HEARTBEAT;
        } else if (starts_with(s, "read_mib=", &v)) {
            cfg.read_mib = parse_num(&v);
        } else if (starts_with(s, "req_kib=", &v)) {
            cfg.req_kib = parse_num(&v);
        } else if (starts_with(s, "counter_sectors=", &v)) {
            cfg.counter_sectors = parse_num(&v);
        } else if (starts_with(s, "boot_id=", &v)) {
            cfg.boot_id = parse_num(&v);
        } else if (starts_with(s, "depth=", &v)) {
            cfg.depth = parse_num(&v);
        } else if (starts_with(s, "diskio_write=", &v)) {
            cfg.diskio_write = parse_num(&v) != 0;
        } else if (starts_with(s, "power_button=", &v)) {
            cfg.ignore_power_button = word_is(v, "ignore");
        } else if (starts_with(s, "prompt=", &v)) {
            cfg.prompt = word_is(v, "login");
        }
        while (*s && *s != ' ')
            s++;
        while (*s == ' ')
            s++;
    }
}

/* ---- ACPI: the MADT names the CPUs, the FADT says how to power off and reset ---- */

struct acpi_header {
    char signature[4];
    u32 length;
    u8 revision, checksum;
    char oem_id[6], oem_table_id[8];
    u32 oem_revision, creator_id, creator_revision;
} __attribute__((packed));

struct acpi_gas {
    u8 space_id, bit_width, bit_offset, access_size;
    u64 address;
} __attribute__((packed));

#define FADT_DSDT 40
#define FADT_RESET_REG 116
#define FADT_RESET_VALUE 128
#define FADT_X_DSDT 140
#define FADT_SLEEP_CONTROL_REG 244
#define FADT_MIN_LENGTH 268
#define GAS_SYSTEM_MEMORY 0
#define GAS_SYSTEM_IO 1
#define SLP_TYP_S5 5
#define SLP_EN (1 << 5)

static struct {
    u32 apic_ids[MAX_CPUS];
    unsigned ncpus;
    struct acpi_gas sleep_control, reset_reg;
    u8 reset_value;
    int have_fadt;
    u64 ged_register; /* the GED's event register, 0 if the DSDT has no GED */
    u32 ged_gsi;
} platform;

static int checksum_ok(const void *p, u32 len)
{
    const u8 *b = p;
    u8 sum = 0;
    for (u32 i = 0; i < len; i++)
        sum += b[i];
    return sum == 0;
}

static int sig_is(const char *sig, const char *want)
{
    return sig[0] == want[0] && sig[1] == want[1] && sig[2] == want[2] && sig[3] == want[3];
}

static void parse_madt(const struct acpi_header *h)
{
    const u8 *p = (const u8 *)h + 44, *end = (const u8 *)h + h->length;
    while (p + 2 <= end && p[1] >= 2) {
        /* Processor Local APIC: enabled, or online capable */
        if (p[0] == 0 && p[1] >= 8 && (*(const u32 *)(p + 4) & 3) && platform.ncpus < MAX_CPUS)
            platform.apic_ids[platform.ncpus++] = p[3];
        p += p[1];
    }
}

/*
 * The Generic Event Device as hv's DSDT describes it: a device with _HID "ACPI0013" whose _CRS
 * holds one Extended Interrupt descriptor (0x89, length 6), and its event register as
 * OperationRegion GDST in SystemMemory at a DWord address (5B 80 "GDST" 00 0C addr). An OS runs
 * the AML; matching the encoding of our own tables is enough here and costs few instructions.
 */
static void find_ged(const struct acpi_header *dsdt)
{
    static const u8 region[] = {0x5b, 0x80, 'G', 'D', 'S', 'T', 0x00, 0x0c};
    const u8 *p = (const u8 *)dsdt + sizeof(*dsdt), *end = (const u8 *)dsdt + dsdt->length;
    int in_ged = 0, have_gsi = 0;
    for (; p + 12 <= end; p++) {
        if (!in_ged && !memcmp(p, "ACPI0013", 8))
            in_ged = 1;
        else if (in_ged && !have_gsi && p[0] == 0x89 && p[1] == 6 && p[2] == 0) {
            platform.ged_gsi = *(const u32 *)(p + 5);
            have_gsi = 1;
        } else if (!memcmp(p, region, sizeof(region))) {
            platform.ged_register = *(const u32 *)(p + sizeof(region));
        }
    }
    if (!have_gsi)
        platform.ged_register = 0;
}

static void parse_fadt(const struct acpi_header *h)
{
    if (h->length < FADT_MIN_LENGTH)
        return;
    const u8 *b = (const u8 *)h;
    memcpy(&platform.sleep_control, b + FADT_SLEEP_CONTROL_REG, sizeof(struct acpi_gas));
    memcpy(&platform.reset_reg, b + FADT_RESET_REG, sizeof(struct acpi_gas));
    platform.reset_value = b[FADT_RESET_VALUE];
    platform.have_fadt = 1;
    u64 dsdt = *(const u64 *)(b + FADT_X_DSDT);
    if (!dsdt)
        dsdt = *(const u32 *)(b + FADT_DSDT);
    if (dsdt && checksum_ok((const void *)dsdt, ((const struct acpi_header *)dsdt)->length))
        find_ged((const struct acpi_header *)dsdt);
}

/* Returns 0 when the tables were found and valid. */
static int parse_acpi(u64 rsdp_addr)
{
    const u8 *rsdp = (const u8 *)rsdp_addr;
    if (!rsdp || memcmp(rsdp, "RSD PTR ", 8) || !checksum_ok(rsdp, 20)) {
        kprintf("vapp-testguest: no valid ACPI RSDP at 0x%lx\n", rsdp_addr);
        return -1;
    }
    if (rsdp[15] < 2 || !checksum_ok(rsdp, 36)) {
        kprintf("vapp-testguest: ACPI RSDP revision %u has no valid XSDT\n", rsdp[15]);
        return -1;
    }
    const struct acpi_header *xsdt = (const void *)*(const u64 *)(rsdp + 24);
    if (!sig_is(xsdt->signature, "XSDT") || !checksum_ok(xsdt, xsdt->length)) {
        kprintf("vapp-testguest: bad ACPI XSDT\n");
        return -1;
    }
    const u64 *entries = (const u64 *)((const u8 *)xsdt + sizeof(*xsdt));
    unsigned n = (xsdt->length - sizeof(*xsdt)) / 8;
    for (unsigned i = 0; i < n; i++) {
        const struct acpi_header *t = (const void *)entries[i];
        if (!checksum_ok(t, t->length)) {
            kprintf("vapp-testguest: ACPI table %c%c%c%c has a bad checksum\n", t->signature[0],
                    t->signature[1], t->signature[2], t->signature[3]);
            return -1;
        }
        if (sig_is(t->signature, "APIC"))
            parse_madt(t);
        else if (sig_is(t->signature, "FACP"))
            parse_fadt(t);
    }
    if (!platform.ncpus) {
        kprintf("vapp-testguest: the MADT lists no CPU\n");
        return -1;
    }
    return 0;
}

static void gas_write8(const struct acpi_gas *g, u8 v)
{
    if (g->space_id == GAS_SYSTEM_IO && g->address)
        outb((u16)g->address, v);
    else if (g->space_id == GAS_SYSTEM_MEMORY && g->address)
        mmio_write8(g->address, v);
}

static void __attribute__((noreturn)) power_off(u32 status)
{
    kprintf("vapp-testguest: power off status=0x%x\n", status);
    outl(EXIT_STATUS_PORT, status);
    /* A platform without the exit-status port: ACPI S5 through the FADT sleep control register. */
    if (platform.have_fadt)
        gas_write8(&platform.sleep_control, (SLP_TYP_S5 << 2) | SLP_EN);
    halt_forever();
}

/* ---- SMP: INIT/SIPI each CPU of the MADT through the local APIC ---- */

#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define ICR_INIT 0x4500    /* INIT, level assert */
#define ICR_STARTUP 0x4600 /* start-up IPI, level assert */
#define ICR_BUSY (1 << 12)
#define AP_TIMEOUT_TSC (20ULL * 1000 * 1000 * 1000) /* ~10 s at 2 GHz: emulated CPUs are slow */

static volatile u32 cpus_up = 1;

static void lapic_ipi(u32 apic_id, u32 command)
{
    mmio_write32(LAPIC_BASE + LAPIC_ICR_HIGH, apic_id << 24);
    mmio_write32(LAPIC_BASE + LAPIC_ICR_LOW, command);
    while (mmio_read32(LAPIC_BASE + LAPIC_ICR_LOW) & ICR_BUSY)
        cpu_relax();
}

void ap_main(u32 slot)
{
    kprintf("vapp-testguest: cpu %u up (apic id %u)\n", slot + 1, cpuid_apic_id());
    __atomic_add_fetch(&cpus_up, 1, __ATOMIC_RELEASE);
}

/* Returns the number of CPUs running. */
static unsigned start_secondary_cpus(u32 bsp_apic_id)
{
    memcpy((void *)SIPI_PAGE, ap_trampoline_start, ap_trampoline_end - ap_trampoline_start);
    for (unsigned i = 0; i < platform.ncpus; i++) {
        u32 id = platform.apic_ids[i];
        if (id == bsp_apic_id)
            continue;
        u32 want = cpus_up + 1;
        lapic_ipi(id, ICR_INIT);
        lapic_ipi(id, ICR_STARTUP | (SIPI_PAGE >> 12));
        u64 start = rdtsc();
        while (__atomic_load_n(&cpus_up, __ATOMIC_ACQUIRE) < want) {
            if (rdtsc() - start > AP_TIMEOUT_TSC) {
                kprintf("vapp-testguest: cpu with apic id %u did not start\n", id);
                break;
            }
            cpu_relax();
        }
    }
    return cpus_up;
}

/* ---- virtio-blk over virtio-mmio (version 2), polled ---- */

#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG 0x100

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8

#define VIRTIO_BLK_F_RO (1u << 5)
#define VIRTIO_BLK_F_BLK_SIZE (1u << 6)
#define VIRTIO_BLK_F_FLUSH (1u << 9)
#define VIRTIO_BLK_F_DISCARD (1u << 13)
#define VIRTIO_F_VERSION_1_HIGH 1u /* bit 32 */

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_ID_BYTES 20
#define VIRTIO_BLK_T_BOGUS 0x7e
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define STATUS_PENDING 0xff

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define QSIZE 16
#define MAX_INFLIGHT (QSIZE / 3)

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};
struct virtq_avail {
    u16 flags, idx, ring[QSIZE], used_event;
};
struct virtq_used {
    u16 flags, idx;
    struct {
        u32 id, len;
    } ring[QSIZE];
    u16 avail_event;
};
struct blk_req {
    u32 type, reserved;
    u64 sector;
};

struct disk {
    u64 base;
    u64 capacity; /* 512-byte sectors */
    u32 blk_size;
    int read_only, has_flush, has_discard;
    u16 qsize, avail_idx;
    struct virtq_desc desc[QSIZE] __attribute__((aligned(16)));
    struct virtq_avail avail __attribute__((aligned(2)));
    struct virtq_used used __attribute__((aligned(4)));
    struct blk_req hdr[MAX_INFLIGHT];
    volatile u8 status[MAX_INFLIGHT];
};

static struct disk disks[MAX_DISKS];
static u64 sector_buf[PATTERN_BYTES / 8], expect_buf[PATTERN_BYTES / 8];

static u32 vreg(struct disk *d, u32 off) { return mmio_read32(d->base + off); }
static void vset(struct disk *d, u32 off, u32 v) { mmio_write32(d->base + off, v); }

/* Returns 0 when the device is ready; prints why not otherwise. */
static int disk_init(struct disk *d, unsigned index, u64 base)
{
    d->base = base;
    if (vreg(d, VIRTIO_MMIO_MAGIC) != 0x74726976 || vreg(d, VIRTIO_MMIO_VERSION) != 2 ||
        vreg(d, VIRTIO_MMIO_DEVICE_ID) != 2) {
        kprintf("vapp-testguest: disk %u: no virtio-mmio v2 block device at 0x%lx\n", index, base);
        return -1;
    }
    vset(d, VIRTIO_MMIO_STATUS, 0);
    vset(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    vset(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u32 low = vreg(d, VIRTIO_MMIO_DEVICE_FEATURES);
    vset(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    u32 high = vreg(d, VIRTIO_MMIO_DEVICE_FEATURES);
    if (!(high & VIRTIO_F_VERSION_1_HIGH)) {
        kprintf("vapp-testguest: disk %u: device does not offer VIRTIO_F_VERSION_1\n", index);
        return -1;
    }
    low &= VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD;
    vset(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vset(d, VIRTIO_MMIO_DRIVER_FEATURES, low);
    vset(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vset(d, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_F_VERSION_1_HIGH);
    vset(d, VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(vreg(d, VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK)) {
        kprintf("vapp-testguest: disk %u: device refused the features\n", index);
        return -1;
    }
    vset(d, VIRTIO_MMIO_QUEUE_SEL, 0);
    u32 max = vreg(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max < 4) {
        kprintf("vapp-testguest: disk %u: queue 0 too small (%u)\n", index, max);
        return -1;
    }
    d->qsize = max < QSIZE ? max : QSIZE;
    vset(d, VIRTIO_MMIO_QUEUE_NUM, d->qsize);
    vset(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)d->desc);
    vset(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)d->desc >> 32));
    vset(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)&d->avail);
    vset(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)&d->avail >> 32));
    vset(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)&d->used);
    vset(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)&d->used >> 32));
    /* This driver polls: no interrupts, and so nothing to acknowledge (each MMIO access is a
     * VM exit, which costs tens of microseconds where the guest is emulated). */
    d->avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    vset(d, VIRTIO_MMIO_QUEUE_READY, 1);
    vset(d, VIRTIO_MMIO_STATUS,
         STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);

    d->read_only = !!(low & VIRTIO_BLK_F_RO);
    d->has_flush = !!(low & VIRTIO_BLK_F_FLUSH);
    d->has_discard = !!(low & VIRTIO_BLK_F_DISCARD);
    d->capacity = vreg(d, VIRTIO_MMIO_CONFIG) | ((u64)vreg(d, VIRTIO_MMIO_CONFIG + 4) << 32);
    d->blk_size = (low & VIRTIO_BLK_F_BLK_SIZE) ? vreg(d, VIRTIO_MMIO_CONFIG + 20) : 512;
    kprintf("vapp-testguest: disk %u: %lu sectors, block size %u, %s\n", index, d->capacity,
            d->blk_size, d->read_only ? "read-only" : "read-write");
    return 0;
}

/* Makes the chain starting at descriptor `head` available to the device. */
static void publish(struct disk *d, u16 head)
{
    d->avail.ring[d->avail_idx % d->qsize] = head;
    barrier();
    d->avail_idx++;
    d->avail.idx = d->avail_idx;
}

/* Builds the chain of request `slot` (header, optional data, status) at descriptor 3*slot. */
static void build_chain(struct disk *d, unsigned slot, u32 type, u64 sector, void *buf, u32 len)
{
    unsigned first = slot * 3;
    d->hdr[slot] = (struct blk_req){type, 0, sector};
    d->status[slot] = STATUS_PENDING;
    d->desc[first] = (struct virtq_desc){(u64)&d->hdr[slot], sizeof(struct blk_req),
                                         VIRTQ_DESC_F_NEXT, first + 1};
    unsigned last = first + 1;
    if (len) {
        int to_guest = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;
        u16 flags = VIRTQ_DESC_F_NEXT | (to_guest ? VIRTQ_DESC_F_WRITE : 0);
        d->desc[first + 1] = (struct virtq_desc){(u64)buf, len, flags, first + 2};
        last = first + 2;
    }
    d->desc[last] = (struct virtq_desc){(u64)&d->status[slot], 1, VIRTQ_DESC_F_WRITE, 0};
}

/* Queues request `slot` without notifying the device. */
static void disk_queue(struct disk *d, unsigned slot, u32 type, u64 sector, void *buf, u32 len)
{
    build_chain(d, slot, type, sector, buf, len);
    publish(d, slot * 3);
}

static void disk_kick_and_wait(struct disk *d)
{
    barrier();
    vset(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    while (*(volatile u16 *)&d->used.idx != d->avail_idx)
        cpu_relax();
}

/* One synchronous request; returns its virtio status. */
static u8 disk_request(struct disk *d, u32 type, u64 sector, void *buf, u32 len)
{
    disk_queue(d, 0, type, sector, buf, len);
    disk_kick_and_wait(d);
    return d->status[0];
}

/* A synchronous read whose data goes to two buffers, `first` bytes into `a`, the rest into `b`
 * (a device may not assume one buffer per request). */
static u8 disk_read_split(struct disk *d, u64 sector, void *a, u32 first, void *b, u32 len)
{
    d->hdr[0] = (struct blk_req){VIRTIO_BLK_T_IN, 0, sector};
    d->status[0] = STATUS_PENDING;
    d->desc[0] = (struct virtq_desc){(u64)&d->hdr[0], sizeof(struct blk_req), VIRTQ_DESC_F_NEXT, 1};
    d->desc[1] = (struct virtq_desc){(u64)a, first, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2};
    d->desc[2] = (struct virtq_desc){(u64)b, len - first, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 3};
    d->desc[3] = (struct virtq_desc){(u64)&d->status[0], 1, VIRTQ_DESC_F_WRITE, 0};
    publish(d, 0);
    disk_kick_and_wait(d);
    return d->status[0];
}

static void fill_pattern(u64 *words, u64 tag, unsigned disk)
{
    for (unsigned k = 0; k < PATTERN_BYTES / 8; k++)
        words[k] = tag ^ ((u64)(disk + 1) << 48) ^ ((u64)k * GOLDEN);
}

static int is_zero(const void *p, unsigned bytes)
{
    const u64 *w = p;
    for (unsigned k = 0; k < bytes / 8; k++)
        if (w[k])
            return 0;
    return 1;
}

/* Returns the index of the first word that differs, or -1. */
static int first_difference(const u64 *a, const u64 *b)
{
    for (unsigned k = 0; k < PATTERN_BYTES / 8; k++)
        if (a[k] != b[k])
            return k;
    return -1;
}

static u32 test_disk(struct disk *d, unsigned i)
{
    u32 fail = 0;
    u8 st = disk_request(d, VIRTIO_BLK_T_IN, HOST_PATTERN_SECTOR, sector_buf, PATTERN_BYTES);
    fill_pattern(expect_buf, HOST_TAG, i);
    int diff = first_difference(sector_buf, expect_buf);
    if (st != VIRTIO_BLK_S_OK) {
        kprintf("vapp-testguest: disk %u: read failed status=%u\n", i, st);
        fail |= FAIL_DISK_IO;
    } else if (diff >= 0 && is_zero(sector_buf, PATTERN_BYTES)) {
        kprintf("vapp-testguest: disk %u: blank, no host pattern to check\n", i);
        memset(expect_buf, 0, PATTERN_BYTES); /* what the split read must find */
    } else if (diff >= 0) {
        kprintf("vapp-testguest: disk %u: host pattern MISMATCH at byte %u\n", i, diff * 8);
        fail |= FAIL_HOST_PATTERN;
    } else {
        kprintf("vapp-testguest: disk %u: host pattern ok\n", i);
    }

    /* The same data again, into two half-size buffers out of order in memory. */
    memset(sector_buf, 0, PATTERN_BYTES);
    u8 *half = (u8 *)sector_buf + PATTERN_BYTES / 2;
    st = disk_read_split(d, HOST_PATTERN_SECTOR, half, PATTERN_BYTES / 2, sector_buf,
                         PATTERN_BYTES);
    int split_ok = st == VIRTIO_BLK_S_OK &&
                   !memcmp(half, expect_buf, PATTERN_BYTES / 2) &&
                   !memcmp(sector_buf, (u8 *)expect_buf + PATTERN_BYTES / 2, PATTERN_BYTES / 2);
    kprintf("vapp-testguest: disk %u: split read status=%u %s\n", i, st,
            split_ok ? "matches" : "DIFFERS");
    if (!split_ok)
        fail |= st == VIRTIO_BLK_S_OK ? FAIL_HOST_PATTERN : FAIL_DISK_IO;

    char id[VIRTIO_BLK_ID_BYTES + 1] = {0};
    st = disk_request(d, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES);
    kprintf("vapp-testguest: disk %u: id \"%s\" status=%u\n", i, id, st);
    if (st != VIRTIO_BLK_S_OK)
        fail |= FAIL_DISK_IO;

    fill_pattern(expect_buf, GUEST_TAG, i);
    st = disk_request(d, VIRTIO_BLK_T_OUT, GUEST_PATTERN_SECTOR, expect_buf, PATTERN_BYTES);
    if (d->read_only) {
        kprintf("vapp-testguest: disk %u: write to read-only disk status=%u\n", i, st);
        if (st != VIRTIO_BLK_S_IOERR)
            fail |= FAIL_ERROR_PATH;
    } else if (st != VIRTIO_BLK_S_OK) {
        kprintf("vapp-testguest: disk %u: write failed status=%u\n", i, st);
        fail |= FAIL_DISK_IO;
    } else {
        st = d->has_flush ? disk_request(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0) : VIRTIO_BLK_S_OK;
        memset(sector_buf, 0, PATTERN_BYTES);
        u8 rst = disk_request(d, VIRTIO_BLK_T_IN, GUEST_PATTERN_SECTOR, sector_buf, PATTERN_BYTES);
        if (st != VIRTIO_BLK_S_OK || rst != VIRTIO_BLK_S_OK) {
            kprintf("vapp-testguest: disk %u: flush status=%u, read back status=%u\n", i, st, rst);
            fail |= FAIL_DISK_IO;
        } else if (first_difference(sector_buf, expect_buf) >= 0) {
            kprintf("vapp-testguest: disk %u: guest pattern did not read back\n", i);
            fail |= FAIL_VERIFY;
        } else {
            kprintf("vapp-testguest: disk %u: guest pattern written, %s, read back\n", i,
                    d->has_flush ? "flushed" : "no flush offered");
        }
    }

    if (d->has_discard) {
        struct {
            u64 sector;
            u32 num_sectors, flags;
        } range = {DISCARD_SECTOR, PATTERN_BYTES / 512, 0};
        st = disk_request(d, VIRTIO_BLK_T_DISCARD, 0, &range, sizeof(range));
        u8 rst = disk_request(d, VIRTIO_BLK_T_IN, DISCARD_SECTOR, sector_buf, PATTERN_BYTES);
        const char *back = rst != VIRTIO_BLK_S_OK               ? "an error"
                           : is_zero(sector_buf, PATTERN_BYTES) ? "zeroes"
                                                                : "data";
        kprintf("vapp-testguest: disk %u: discard status=%u, reads back %s\n", i, st, back);
        if (st != VIRTIO_BLK_S_OK || rst != VIRTIO_BLK_S_OK)
            fail |= FAIL_DISK_IO;
    } else {
        kprintf("vapp-testguest: disk %u: no discard offered\n", i);
    }

    st = disk_request(d, VIRTIO_BLK_T_IN, d->capacity, sector_buf, PATTERN_BYTES);
    kprintf("vapp-testguest: disk %u: out-of-range read status=%u\n", i, st);
    if (st != VIRTIO_BLK_S_IOERR)
        fail |= FAIL_ERROR_PATH;
    st = disk_request(d, VIRTIO_BLK_T_BOGUS, 0, 0, 0);
    kprintf("vapp-testguest: disk %u: unknown request type status=%u\n", i, st);
    if (st != VIRTIO_BLK_S_UNSUPP)
        fail |= FAIL_ERROR_PATH;
    return fail;
}

/* Sequential read of disk 0 with large requests, `depth` in flight, into RAM at 16 MiB. */
#define READ_BUFFER 0x1000000UL

/* Chains for `depth` reads of `req` bytes into the read buffers, built once: in the loop
 * only the sector changes, which keeps the guest's (possibly emulated) share of the work small
 * next to the device's. */
static void read_prepare(struct disk *d, u64 req, u32 depth)
{
    for (unsigned slot = 0; slot < depth; slot++)
        build_chain(d, slot, VIRTIO_BLK_T_IN, 0, (void *)(READ_BUFFER + slot * req), req);
}

/* Reads the first `bytes` of the disk, `req` bytes a request; returns failure bits. */
static u32 read_sequential(struct disk *d, u64 bytes, u64 req, u32 depth)
{
    for (u64 done = 0; done < bytes;) {
        unsigned n = 0;
        for (; n < depth && done < bytes; n++, done += req) {
            d->hdr[n].sector = done >> 9;
            d->status[n] = STATUS_PENDING;
            publish(d, n * 3);
        }
        disk_kick_and_wait(d);
        for (unsigned s = 0; s < n; s++)
            if (d->status[s] != VIRTIO_BLK_S_OK) {
                kprintf("vapp-testguest: read: status=%u\n", d->status[s]);
                return FAIL_DISK_IO;
            }
    }
    return 0;
}

static u32 read_benchmark(struct disk *d, const struct hvm_start_info *si)
{
    u64 req = (u64)cfg.req_kib << 10, total = (u64)cfg.read_mib << 20;
    u32 depth = cfg.depth < 1 ? 1 : cfg.depth > MAX_INFLIGHT ? MAX_INFLIGHT : cfg.depth;
    if (!req || req > (1u << 31) || total % req || total > d->capacity * 512) {
        kprintf("vapp-testguest: read: bad request size or disk too small\n");
        return FAIL_ERROR_PATH;
    }
    int fits = 0;
    const struct hvm_memmap_entry *m = (const void *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++)
        if (m[i].type == E820_RAM && m[i].addr <= READ_BUFFER &&
            m[i].addr + m[i].size >= READ_BUFFER + depth * req)
            fits = 1;
    if (!fits) {
        kprintf("vapp-testguest: read: not enough RAM for %u buffers of %lu bytes\n", depth, req);
        return FAIL_BOOT_INFO;
    }
    /* One untimed batch first: the first touch of the buffers costs page faults on the host,
     * which is not what this measures. */
    read_prepare(d, req, depth);
    u64 warm = depth * req < total ? depth * req : total;
    u32 fail = read_sequential(d, warm, req, depth);
    if (fail)
        return fail;
    kprintf("vapp-testguest: read start\n");
    fail = read_sequential(d, total, req, depth);
    if (!fail)
        kprintf("vapp-testguest: read done %u MiB\n", cfg.read_mib);
    return fail;
}

/* ---- waiting for the power button: the GED interrupt wakes the halted boot CPU ---- */

#define IOAPIC_BASE 0xfec00000UL
#define IOAPIC_REDIRECTION 0x10
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_SOFTWARE_ENABLE 0x100
#define VECTOR_GED 0x40
#define VECTOR_SERIAL 0x41
#define VECTOR_SPURIOUS 0xff
#define GED_POWER_BUTTON 1
#define COM1_GSI 4
#define UART_IER_RX 0x01 /* interrupt when a byte was received */
#define UART_LSR_DATA 0x01

struct idt_gate {
    u16 offset_low, selector;
    u8 ist, type;
    u16 offset_mid;
    u32 offset_high, zero;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));
volatile u32 ged_interrupts;
extern char ged_isr[], other_isr[];

/* Interrupt handlers: count the GED's, acknowledge every one at the local APIC. */
asm(".text\n"
    "ged_isr:\n"
    "    incl ged_interrupts(%rip)\n"
    "other_isr:\n"
    "    push %rax\n"
    "    movabs $0xfee000b0, %rax\n" /* LAPIC_BASE + LAPIC_EOI */
    "    movl $0, (%rax)\n"
    "    pop %rax\n"
    "    iretq\n");

static void set_gate(unsigned vector, const void *handler)
{
    u64 a = (u64)handler;
    idt[vector] = (struct idt_gate){(u16)a, 0x08, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
}

static void ioapic_write(u32 reg, u32 value)
{
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, value);
}

/* Echoes what was typed on the console, a line at a time, so tests see input arrive. */
static void read_console_input(void)
{
    static char line[64];
    static unsigned len;
    while (inb(COM1 + 5) & UART_LSR_DATA) {
        char c = (char)inb(COM1);
        if (c != '\r' && c != '\n' && len < sizeof(line) - 1) {
            line[len++] = c;
            continue;
        }
        line[len] = 0;
        kprintf("vapp-testguest: console input \"%s\"\n", line);
        len = 0;
    }
}

/* Halts until the power button is pressed, then powers off with `status`. Console input
 * (COM1's receive interrupt) is echoed meanwhile. */
static void __attribute__((noreturn)) wait_for_power_button(u32 bsp, u32 status)
{
    if (!platform.ged_register) {
        kprintf("vapp-testguest: no GED in the DSDT: the power button cannot reach this guest\n");
        kprintf("vapp-testguest: waiting to be stopped\n");
        halt_forever();
    }
    /* Exceptions (0-31) stay fatal; any interrupt is acknowledged, the GED's counted. The
     * 8259s are moved off the exception vectors and masked: nothing here programs them. */
    for (unsigned v = 32; v < 256; v++)
        set_gate(v, other_isr);
    set_gate(VECTOR_GED, ged_isr);
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    asm volatile("lidt %0" : : "m"(idtr));
    static const u8 pic_init[][2] = {{0x20, 0x11}, {0xa0, 0x11}, {0x21, 0x20}, {0xa1, 0x28},
                                     {0x21, 0x04}, {0xa1, 0x02}, {0x21, 0x01}, {0xa1, 0x01},
                                     {0x21, 0xff}, {0xa1, 0xff}};
    for (unsigned i = 0; i < sizeof(pic_init) / sizeof(pic_init[0]); i++)
        outb(pic_init[i][0], pic_init[i][1]);
    mmio_write32(LAPIC_BASE + LAPIC_SVR, LAPIC_SOFTWARE_ENABLE | VECTOR_SPURIOUS);
    /* Fixed delivery to this CPU, edge-triggered, active high, unmasked. */
    ioapic_write(IOAPIC_REDIRECTION + 2 * platform.ged_gsi + 1, bsp << 24);
    ioapic_write(IOAPIC_REDIRECTION + 2 * platform.ged_gsi, VECTOR_GED);
    ioapic_write(IOAPIC_REDIRECTION + 2 * COM1_GSI + 1, bsp << 24);
    ioapic_write(IOAPIC_REDIRECTION + 2 * COM1_GSI, VECTOR_SERIAL);
    outb(COM1 + 1, UART_IER_RX);
    kprintf("vapp-testguest: power button: GED register 0x%lx, GSI %u%s\n", platform.ged_register,
            platform.ged_gsi, cfg.ignore_power_button ? ", ignored" : "");
    kprintf("vapp-testguest: waiting to be stopped\n");
    if (cfg.prompt)
        kprintf("vapp-testguest login: ");
    u32 seen = 0;
    for (;;) {
        asm volatile("sti; hlt; cli" : : : "memory");
        read_console_input();
        if (ged_interrupts == seen)
            continue;
        seen = ged_interrupts;
        if (!(mmio_read32(platform.ged_register) & GED_POWER_BUTTON))
            continue;
        if (cfg.ignore_power_button) {
            kprintf("vapp-testguest: power button pressed, ignored\n");
            continue;
        }
        kprintf("vapp-testguest: power button pressed, shutting down\n");
        power_off(status);
    }
}

/* mode=counter: write k = 1, 2, 3, ... one 512-byte sector at a time, each flushed before the
 * next, write k going to disk k % ndisks, sector (k / ndisks) % counter_sectors, every word of
 * the sector holding k. Any point in time of the disks is then a prefix of that sequence, which
 * hv::test_guest::counter_prefix checks from the host. Runs until the VM is stopped. */
static void __attribute__((noreturn)) write_counter(unsigned ndisks)
{
    static u64 sector[512 / 8];
    u64 nsect = cfg.counter_sectors ? cfg.counter_sectors : 1;
    for (unsigned i = 0; i < ndisks; i++)
        if (disks[i].capacity < nsect)
            nsect = disks[i].capacity;
    kprintf("vapp-testguest: counter: started on %u disk(s), %lu sectors each\n", ndisks, nsect);
    for (u64 k = 1;; k++) {
        struct disk *d = &disks[k % ndisks];
        for (unsigned w = 0; w < 512 / 8; w++)
            sector[w] = k;
        u8 st = disk_request(d, VIRTIO_BLK_T_OUT, (k / ndisks) % nsect, sector, 512);
        if (st == VIRTIO_BLK_S_OK && d->has_flush)
            st = disk_request(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
        if (st != VIRTIO_BLK_S_OK) {
            kprintf("vapp-testguest: counter: write %lu failed, status %u\n", k, st);
            power_off(FAIL_DISK_IO);
        }
        if (k % 256 == 0)
            kprintf("vapp-testguest: counter: %lu\n", k);
    }
}

/* ---- virtio-net: a polled NIC that answers ARP and ICMP echo, pings a peer and sends bursts
 * of frames for measurement. Configured by net_ip=A.B.C.D (its address), net_ping=A.B.C.D
 * (peer to ping), net_count=N (echo requests, default 4), net_burst=N (frames to send to the
 * peer, or broadcast without one), net_frame=B (bytes per burst frame, default 1514) and
 * net_arp=N (ARP requests before the peer is unreachable, ~0.4 s apart, default 40). Burst
 * frames it receives are counted on the console every 256.
 * The first virtio-net device found among the virtio_mmio.device= entries pings and answers; a
 * burst alternates its frames over the first NET_NICS devices (to the peer on the first, as
 * broadcasts on the others), so a VM-wide limit over several NICs can be measured. After its
 * work the guest keeps answering until the VM is stopped or its power button pressed. ---- */

#define VIRTIO_ID_NET 1
#define VIRTIO_NET_F_MAC (1u << 5)
#define NET_QSIZE 64
#define NET_BUF 2048
#define NET_HDR 12
#define ETH_HLEN 14
#define ETHERTYPE_IP 0x0800
#define ETHERTYPE_ARP 0x0806
#define ETHERTYPE_BURST 0x88b5 /* IEEE local experimental: burst frames */
#define NET_WAIT_TSC (1ULL << 30) /* ~0.3-0.5 s: how long one ping or ARP request waits */

struct net_queue {
    struct virtq_desc desc[NET_QSIZE] __attribute__((aligned(16)));
    struct {
        u16 flags, idx, ring[NET_QSIZE], used_event;
    } avail __attribute__((aligned(2)));
    struct {
        u16 flags, idx;
        struct {
            u32 id, len;
        } ring[NET_QSIZE];
        u16 avail_event;
    } used __attribute__((aligned(4)));
    u16 avail_idx, last_used;
};

#define NET_NICS 2

/* Every function works on the current NIC, `net`; only the burst switches between them. */
static struct net_nic {
    u64 base;
    int present;
    u8 mac[6], peer_mac[6];
    int peer_known;
    u32 ip, peer_ip, count, burst, frame, arp_tries;
    u32 replies, last_seq, burst_received;
    struct net_queue rx, tx;
    u8 rxbuf[NET_QSIZE][NET_BUF] __attribute__((aligned(64)));
    u8 txbuf[NET_QSIZE][NET_BUF] __attribute__((aligned(64)));
} nets[NET_NICS] = {{.count = 4, .frame = 1514, .arp_tries = 40}};
static unsigned net_cur, net_nics;
#define net (nets[net_cur])

static u32 net_parse_ip(const char **sp)
{
    u32 ip = 0;
    for (int i = 0; i < 4; i++) {
        ip = (ip << 8) | (u8)parse_num(sp);
        if (i < 3 && **sp == '.')
            (*sp)++;
    }
    return ip;
}

static void net_parse_cmdline(const char *s)
{
    while (*s) {
        const char *v;
        if (starts_with(s, "net_ip=", &v))
            net.ip = net_parse_ip(&v);
        else if (starts_with(s, "net_ping=", &v))
            net.peer_ip = net_parse_ip(&v);
        else if (starts_with(s, "net_count=", &v))
            net.count = parse_num(&v);
        else if (starts_with(s, "net_burst=", &v))
            net.burst = parse_num(&v);
        else if (starts_with(s, "net_frame=", &v))
            net.frame = parse_num(&v);
        else if (starts_with(s, "net_arp=", &v))
            net.arp_tries = parse_num(&v);
        while (*s && *s != ' ')
            s++;
        while (*s == ' ')
            s++;
    }
    if (net.frame < 60)
        net.frame = 60;
    if (net.frame > NET_BUF - NET_HDR)
        net.frame = NET_BUF - NET_HDR;
}

static u32 nreg(u32 off) { return mmio_read32(net.base + off); }
static void nset(u32 off, u32 v) { mmio_write32(net.base + off, v); }

/* Takes the virtio-net devices out of the disk list (both come as virtio_mmio.device=); the
 * first NET_NICS are used, each with the settings of the command line. */
static void net_claim(void)
{
    unsigned kept = 0;
    for (unsigned i = 0; i < cfg.ndisks; i++) {
        u64 base = cfg.disks[i].base;
        if (mmio_read32(base + VIRTIO_MMIO_MAGIC) == 0x74726976 &&
            mmio_read32(base + VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_NET) {
            if (net_nics < NET_NICS) {
                struct net_nic *n = &nets[net_nics];
                if (net_nics)
                    *n = nets[0];
                n->present = 1;
                n->base = base;
                net_nics++;
            }
            continue;
        }
        cfg.disks[kept++] = cfg.disks[i];
    }
    cfg.ndisks = kept;
}

static void net_queue_setup(unsigned index, struct net_queue *q)
{
    nset(VIRTIO_MMIO_QUEUE_SEL, index);
    nset(VIRTIO_MMIO_QUEUE_NUM, NET_QSIZE);
    nset(VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
    nset(VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
    nset(VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)&q->avail);
    nset(VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)&q->avail >> 32));
    nset(VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)&q->used);
    nset(VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)&q->used >> 32));
    q->avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT; /* polled, as the disks */
    nset(VIRTIO_MMIO_QUEUE_READY, 1);
}

static int net_init(void)
{
    if (nreg(VIRTIO_MMIO_VERSION) != 2) {
        kprintf("vapp-testguest: net: no virtio-mmio v2 device at 0x%lx\n", net.base);
        return -1;
    }
    nset(VIRTIO_MMIO_STATUS, 0);
    nset(VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    nset(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u32 low = nreg(VIRTIO_MMIO_DEVICE_FEATURES);
    nset(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    if (!(nreg(VIRTIO_MMIO_DEVICE_FEATURES) & VIRTIO_F_VERSION_1_HIGH) ||
        !(low & VIRTIO_NET_F_MAC)) {
        kprintf("vapp-testguest: net: device offers neither VERSION_1 nor a MAC\n");
        return -1;
    }
    nset(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    nset(VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_NET_F_MAC);
    nset(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    nset(VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_F_VERSION_1_HIGH);
    nset(VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(nreg(VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK)) {
        kprintf("vapp-testguest: net: device refused the features\n");
        return -1;
    }
    if (nreg(VIRTIO_MMIO_QUEUE_NUM_MAX) < NET_QSIZE) {
        kprintf("vapp-testguest: net: queues smaller than %u\n", NET_QSIZE);
        return -1;
    }
    net_queue_setup(0, &net.rx);
    net_queue_setup(1, &net.tx);
    for (unsigned i = 0; i < 6; i++)
        net.mac[i] = *(volatile u8 *)(net.base + VIRTIO_MMIO_CONFIG + i);
    nset(VIRTIO_MMIO_STATUS,
         STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    for (u16 i = 0; i < NET_QSIZE; i++) {
        net.rx.desc[i] = (struct virtq_desc){(u64)net.rxbuf[i], NET_BUF, VIRTQ_DESC_F_WRITE, 0};
        net.rx.avail.ring[i] = i;
    }
    barrier();
    net.rx.avail_idx = NET_QSIZE;
    net.rx.avail.idx = NET_QSIZE;
    barrier();
    nset(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    static const char hex[] = "0123456789abcdef";
    char mac[18];
    for (unsigned i = 0; i < 6; i++) {
        mac[3 * i] = hex[net.mac[i] >> 4];
        mac[3 * i + 1] = hex[net.mac[i] & 0xf];
        mac[3 * i + 2] = i == 5 ? 0 : ':';
    }
    kprintf("vapp-testguest: net: nic at 0x%lx, mac %s, ip %u.%u.%u.%u\n", net.base, mac,
            net.ip >> 24, (net.ip >> 16) & 0xff, (net.ip >> 8) & 0xff, net.ip & 0xff);
    return 0;
}

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { put16(p, v >> 16); put16(p + 2, (u16)v); }

static u16 ip_checksum(const u8 *p, u32 len)
{
    u32 sum = 0;
    for (u32 i = 0; i + 1 < len; i += 2)
        sum += get16(p + i);
    if (len & 1)
        sum += (u32)p[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

/* Frees the transmit slots the device has used; returns how many are in flight. */
static u16 net_tx_reclaim(void)
{
    net.tx.last_used = *(volatile u16 *)&net.tx.used.idx;
    return (u16)(net.tx.avail_idx - net.tx.last_used);
}

/* A transmit buffer to fill with a frame (after its virtio header), waiting for room. */
static u8 *net_tx_buffer(void)
{
    while (net_tx_reclaim() == NET_QSIZE) {
        nset(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        cpu_relax();
    }
    u8 *buf = net.txbuf[net.tx.avail_idx % NET_QSIZE];
    memset(buf, 0, NET_HDR);
    return buf + NET_HDR;
}

/* Queues the frame written into the last net_tx_buffer(); `kick` notifies the device. */
static void net_tx_queue(u32 len, int kick)
{
    u16 slot = net.tx.avail_idx % NET_QSIZE;
    net.tx.desc[slot] = (struct virtq_desc){(u64)net.txbuf[slot], NET_HDR + len, 0, 0};
    net.tx.avail.ring[slot] = slot;
    barrier();
    net.tx.avail_idx++;
    net.tx.avail.idx = net.tx.avail_idx;
    barrier();
    if (kick)
        nset(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
}

static u8 *eth_header(u8 *f, const u8 *dst, u16 type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, net.mac, 6);
    put16(f + 12, type);
    return f + ETH_HLEN;
}

static void arp_send(u16 op, const u8 *dst_mac, u32 dst_ip)
{
    static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    u8 *f = net_tx_buffer();
    u8 *a = eth_header(f, op == 1 ? broadcast : dst_mac, ETHERTYPE_ARP);
    put16(a, 1);             /* Ethernet */
    put16(a + 2, ETHERTYPE_IP);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, net.mac, 6);
    put32(a + 14, net.ip);
    if (op == 1)
        memset(a + 18, 0, 6);
    else
        memcpy(a + 18, dst_mac, 6);
    put32(a + 24, dst_ip);
    net_tx_queue(ETH_HLEN + 28 + 18, 1); /* padded to the 60-byte minimum */
}

static void icmp_echo_send(const u8 *dst_mac, u32 dst_ip, u8 type, u16 id, u16 seq,
                           const u8 *payload, u32 plen)
{
    u8 *f = net_tx_buffer();
    u8 *ip = eth_header(f, dst_mac, ETHERTYPE_IP);
    u32 total = 20 + 8 + plen;
    memset(ip, 0, 20);
    ip[0] = 0x45;
    put16(ip + 2, (u16)total);
    ip[8] = 64; /* TTL */
    ip[9] = 1;  /* ICMP */
    put32(ip + 12, net.ip);
    put32(ip + 16, dst_ip);
    put16(ip + 10, ip_checksum(ip, 20));
    u8 *icmp = ip + 20;
    icmp[0] = type;
    icmp[1] = 0;
    put16(icmp + 2, 0);
    put16(icmp + 4, id);
    put16(icmp + 6, seq);
    memcpy(icmp + 8, payload, plen);
    put16(icmp + 2, ip_checksum(icmp, 8 + plen));
    u32 len = ETH_HLEN + total;
    net_tx_queue(len < 60 ? 60 : len, 1);
}

#define PING_ID 0x7661 /* "va" */

static void net_handle(const u8 *f, u32 len)
{
    if (len < ETH_HLEN)
        return;
    u16 type = get16(f + 12);
    const u8 *p = f + ETH_HLEN;
    len -= ETH_HLEN;
    if (type == ETHERTYPE_BURST) {
        /* Another's burst: counted, so the host can time what arrives. */
        if (++net.burst_received % 256 == 0)
            kprintf("vapp-testguest: net: received %u burst frames\n", net.burst_received);
    } else if (type == ETHERTYPE_ARP && len >= 28) {
        u16 op = get16(p + 6);
        u32 sender_ip = get32(p + 14), target_ip = get32(p + 24);
        if (sender_ip == net.peer_ip && net.peer_ip) {
            memcpy(net.peer_mac, p + 8, 6);
            net.peer_known = 1;
        }
        if (op == 1 && target_ip == net.ip && net.ip)
            arp_send(2, p + 8, sender_ip);
    } else if (type == ETHERTYPE_IP && len >= 28 && (p[0] >> 4) == 4) {
        u32 ihl = (p[0] & 0xf) * 4;
        u32 total = get16(p + 2);
        if (p[9] != 1 || get32(p + 16) != net.ip || total > len || total < ihl + 8)
            return;
        const u8 *icmp = p + ihl;
        u32 icmp_len = total - ihl;
        if (icmp[0] == 8) /* echo request */
            icmp_echo_send(f + 6, get32(p + 12), 0, get16(icmp + 4), get16(icmp + 6), icmp + 8,
                           icmp_len - 8 > NET_BUF - 100 ? NET_BUF - 100 : icmp_len - 8);
        else if (icmp[0] == 0 && get16(icmp + 4) == PING_ID && get32(p + 12) == net.peer_ip) {
            net.replies++;
            net.last_seq = get16(icmp + 6);
        }
    }
}

/* Handles every received frame and gives the buffers back; returns how many there were. */
static unsigned net_poll(void)
{
    unsigned n = 0;
    while (net.rx.last_used != *(volatile u16 *)&net.rx.used.idx) {
        barrier();
        u16 at = net.rx.last_used % NET_QSIZE;
        u32 id = net.rx.used.ring[at].id % NET_QSIZE, len = net.rx.used.ring[at].len;
        if (len > NET_HDR && len <= NET_BUF)
            net_handle(net.rxbuf[id] + NET_HDR, len - NET_HDR);
        net.rx.avail.ring[net.rx.avail_idx % NET_QSIZE] = (u16)id;
        net.rx.last_used++;
        net.rx.avail_idx++;
        n++;
    }
    if (n) {
        barrier();
        net.rx.avail.idx = net.rx.avail_idx;
        barrier();
        nset(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }
    return n;
}

/* Polls until `cond` holds or about NET_WAIT_TSC cycles pass; returns whether it held. */
static int net_poll_until(volatile u32 *value, u32 want)
{
    u64 start = rdtsc();
    while (rdtsc() - start < NET_WAIT_TSC) {
        net_poll();
        if (*value == want)
            return 1;
    }
    return 0;
}

static void net_print_ip(const char *prefix, u32 ip, const char *suffix)
{
    kprintf("vapp-testguest: net: %s%u.%u.%u.%u%s", prefix, ip >> 24, (ip >> 16) & 0xff,
            (ip >> 8) & 0xff, ip & 0xff, suffix);
}

static int net_resolve_peer(void)
{
    for (unsigned i = 0; i < net.arp_tries && !net.peer_known; i++) {
        arp_send(1, 0, net.peer_ip);
        net_poll_until((volatile u32 *)&net.peer_known, 1);
    }
    return net.peer_known;
}

static void net_ping(void)
{
    static const u8 payload[56] = "vapp-testguest ping payload";
    if (!net_resolve_peer()) {
        net_print_ip("", net.peer_ip, " unreachable (no ARP reply)\n");
        return;
    }
    net_print_ip("ping ", net.peer_ip, " start\n");
    u32 received = 0;
    for (u32 seq = 1; seq <= net.count; seq++) {
        u32 before = net.replies;
        icmp_echo_send(net.peer_mac, net.peer_ip, 8, PING_ID, (u16)seq, payload, sizeof(payload));
        if (net_poll_until(&net.replies, before + 1) && net.last_seq == (u16)seq) {
            received++;
            if (seq <= 10)
                kprintf("vapp-testguest: net: reply from %u.%u.%u.%u seq=%u\n", net.peer_ip >> 24,
                        (net.peer_ip >> 16) & 0xff, (net.peer_ip >> 8) & 0xff,
                        net.peer_ip & 0xff, seq);
        }
    }
    kprintf("vapp-testguest: net: ping %u.%u.%u.%u: %u sent, %u received\n", net.peer_ip >> 24,
            (net.peer_ip >> 16) & 0xff, (net.peer_ip >> 8) & 0xff, net.peer_ip & 0xff, net.count,
            received);
}

static void net_send_burst(void)
{
    static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    const u8 *dst = broadcast;
    if (net.peer_ip && net_resolve_peer())
        dst = net.peer_mac;
    u32 burst = net.burst, frame = net.frame;
    kprintf("vapp-testguest: net: burst start\n");
    for (u32 i = 0; i < burst; i++) {
        net_cur = i % net_nics;
        u32 k = i / net_nics; /* this NIC's frame number */
        u8 *f = net_tx_buffer();
        u8 *p = eth_header(f, net_cur ? broadcast : dst, ETHERTYPE_BURST);
        put32(p, i);
        /* Notify once per quarter ring: each notify is a VM exit. */
        net_tx_queue(frame, (k + 1) % (NET_QSIZE / 4) == 0 || i + net_nics >= burst);
        net_poll();
    }
    for (net_cur = 0; net_cur < net_nics; net_cur++)
        while (net_tx_reclaim())
            cpu_relax();
    net_cur = 0;
    if (net_nics > 1)
        kprintf("vapp-testguest: net: burst of %u frames of %u bytes sent over %u NICs\n", burst,
                frame, net_nics);
    else
        kprintf("vapp-testguest: net: burst of %u frames of %u bytes sent\n", burst, frame);
}

static void __attribute__((noreturn)) net_main(void)
{
    for (net_cur = 0; net_cur < net_nics; net_cur++)
        if (net_init())
            power_off(FAIL_DISK_SETUP);
    net_cur = 0;
    if (net.peer_ip && net.count)
        net_ping();
    if (net.burst)
        net_send_burst();
    kprintf("vapp-testguest: net: serving\n");
    /* Polls the GED's event register about every NET_WAIT_TSC / 4 cycles (each read is a VM
     * exit), so the power button still shuts the guest down. */
    u64 last = rdtsc();
    for (;;) {
        if (!net_poll())
            cpu_relax();
        if (!platform.ged_register || rdtsc() - last < NET_WAIT_TSC / 4)
            continue;
        last = rdtsc();
        if (mmio_read32(platform.ged_register) & GED_POWER_BUTTON) {
            kprintf("vapp-testguest: power button pressed, shutting down\n");
            power_off(0);
        }
    }
}

/* ---- busy modes: load for the host's resource scheduler to divide ---- */

/* mode=spin: every CPU spins forever; the boot CPU reports a count every 2^28 TSC cycles so
 * a host can see it run. CPU time is measured on the host, where the scheduler gives it. */
static void __attribute__((noreturn)) spin_forever(void)
{
    kprintf("vapp-testguest: spin: started\n");
    u64 next = rdtsc() + (1ull << 28), loops = 0;
    for (;;) {
        loops++;
        if (rdtsc() >= next) {
            kprintf("vapp-testguest: spin: %lu\n", loops);
            next = rdtsc() + (1ull << 28);
        }
    }
}

/* mode=diskio: one 4 KiB request at a time to disk 0 (reads, or writes with diskio_write=1)
 * over its first MiB, forever; prints the count every 256 requests. */
static void __attribute__((noreturn)) disk_busy(struct disk *d)
{
    static u64 block[4096 / 8];
    u32 type = cfg.diskio_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    u64 span = d->capacity < 2048 ? d->capacity : 2048;
    if (span < 8 || (type == VIRTIO_BLK_T_OUT && d->read_only)) {
        kprintf("vapp-testguest: diskio: disk too small or read-only\n");
        power_off(FAIL_ERROR_PATH);
    }
    kprintf("vapp-testguest: diskio: started (%s)\n", cfg.diskio_write ? "write" : "read");
    for (u64 k = 1;; k++) {
        u8 st = disk_request(d, type, ((k * 8) % span) & ~7ull, block, sizeof(block));
        if (st != VIRTIO_BLK_S_OK) {
            kprintf("vapp-testguest: diskio: request %lu failed, status %u\n", k, st);
            power_off(FAIL_DISK_IO);
        }
        if (k % 256 == 0)
            kprintf("vapp-testguest: diskio: %lu\n", k);
    }
}

/* mode=heartbeat: a VM that continues across restarts on other hosts. Record k (from 1) goes to
 * sector k % HB_SECTORS of disk 0 and holds, as little-endian words: HB_MAGIC, this boot's id,
 * k, the id of the boot whose last record this boot continued from (0: none), the first k of
 * this boot, and the xor of those five words with HB_CHECK (a torn sector fails it). At boot the
 * guest reads the ring and continues after its highest valid record, so a clean handover is a
 * boot whose first record follows its predecessor's last, and two boots writing at once show as
 * one k claimed by two boots. hv::test_guest::check_heartbeats judges a history of samples. */
#define HB_SECTORS 8
#define HB_MAGIC 0x6862656174726563UL /* "hbeatrec" */
#define HB_CHECK 0x9e3779b97f4a7c15UL

static u64 hb_sector[512 / 8];

static int heartbeat_valid(const u64 *w)
{
    return w[0] == HB_MAGIC && (w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4] ^ HB_CHECK) == w[5];
}

/* Returns the highest valid record's k and its boot id in *boot, or 0 for a blank ring. */
static u64 heartbeat_last(struct disk *d, u64 *boot)
{
    u64 best = 0;
    *boot = 0;
    for (u64 s = 0; s < HB_SECTORS; s++) {
        if (disk_request(d, VIRTIO_BLK_T_IN, s, hb_sector, 512) != VIRTIO_BLK_S_OK) {
            kprintf("vapp-testguest: heartbeat: reading sector %lu failed\n", s);
            power_off(FAIL_DISK_IO);
        }
        if (heartbeat_valid(hb_sector) && hb_sector[2] > best) {
            best = hb_sector[2];
            *boot = hb_sector[1];
        }
    }
    return best;
}

static u64 heartbeat_boot_id(void)
{
    if (cfg.boot_id)
        return cfg.boot_id;
    /* The TSC at boot differs between any two boots; mixing spreads it over the word. */
    u64 x = rdtsc() * HB_CHECK;
    x ^= x >> 29;
    x *= 0xbf58476d1ce4e5b9UL;
    x ^= x >> 32;
    return x ? x : 1;
}

static void __attribute__((noreturn)) write_heartbeat(struct disk *d)
{
    u64 prev;
    u64 first = heartbeat_last(d, &prev) + 1;
    u64 boot = heartbeat_boot_id();
    kprintf("vapp-testguest: heartbeat: boot %lx continues boot %lx at %lu\n", boot, prev, first);
    for (u64 k = first;; k++) {
        for (unsigned w = 6; w < 512 / 8; w++)
            hb_sector[w] = 0;
        hb_sector[0] = HB_MAGIC;
        hb_sector[1] = boot;
        hb_sector[2] = k;
        hb_sector[3] = prev;
        hb_sector[4] = first;
        hb_sector[5] = HB_MAGIC ^ boot ^ k ^ prev ^ first ^ HB_CHECK;
        u8 st = disk_request(d, VIRTIO_BLK_T_OUT, k % HB_SECTORS, hb_sector, 512);
        if (st == VIRTIO_BLK_S_OK && d->has_flush)
            st = disk_request(d, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
        if (st != VIRTIO_BLK_S_OK) {
            /* A fenced host's disk refuses writes: stay up without writing, as a guest whose
             * storage went away does, so the isolation response decides what happens to it. */
            kprintf("vapp-testguest: heartbeat: write %lu failed, status %u\n", k, st);
            wait_for_power_button(cpuid_apic_id(), FAIL_DISK_IO);
        }
        if (k % 256 == 0)
            kprintf("vapp-testguest: heartbeat: %lu\n", k);
    }
}

/* ---- the boot CPU ---- */

void bsp_main(u32 start_info_addr)
{
    const struct hvm_start_info *si = (const void *)(u64)start_info_addr;
    u32 fail = 0;

    serial_init();
    if (si->magic != HVM_START_MAGIC) {
        kprintf("vapp-testguest: bad PVH start_info magic 0x%x\n", si->magic);
        power_off(FAIL_BOOT_INFO);
    }
    const char *cmdline = si->cmdline_paddr ? (const char *)si->cmdline_paddr : "";
    parse_cmdline(cmdline);
    kprintf("vapp-testguest: booted, command line \"%s\"\n", cmdline);

    if (parse_acpi(si->rsdp_paddr))
        power_off(FAIL_BOOT_INFO);

    if (cfg.mode == MODE_FAULT) {
        kprintf("vapp-testguest: triple fault at rip=0x%lx\n", (u64)triple_fault_insn);
        triple_fault();
    }
    if (cfg.mode == MODE_RESET) {
        kprintf("vapp-testguest: reset through the ACPI reset register\n");
        gas_write8(&platform.reset_reg, platform.reset_value);
        halt_forever();
    }

    u32 bsp = cpuid_apic_id();
    kprintf("vapp-testguest: cpu 0 up (apic id %u)\n", bsp);
    unsigned up = start_secondary_cpus(bsp);
    kprintf("vapp-testguest: %u of %u cpus up\n", up, platform.ncpus);
    if (up != platform.ncpus)
        fail |= FAIL_CPUS;
    if (cfg.mode == MODE_BOOT)
        power_off(fail);
    if (cfg.mode == MODE_SPIN)
        spin_forever();

    net_parse_cmdline(cmdline);
    net_claim();
    kprintf("vapp-testguest: %u virtio-blk devices\n", cfg.ndisks);
    for (unsigned i = 0; i < cfg.ndisks; i++) {
        if (disk_init(&disks[i], i, cfg.disks[i].base)) {
            fail |= FAIL_DISK_SETUP;
            continue;
        }
        if (cfg.mode == MODE_READ) {
            fail |= read_benchmark(&disks[i], si);
            break;
        }
        if (cfg.mode == MODE_COUNTER || cfg.mode == MODE_HEARTBEAT)
            continue;
        if (cfg.mode == MODE_DISKIO)
            disk_busy(&disks[i]);
        fail |= test_disk(&disks[i], i);
    }
    if (cfg.mode == MODE_COUNTER && !fail && cfg.ndisks)
        write_counter(cfg.ndisks);
    if (cfg.mode == MODE_HEARTBEAT && !fail && cfg.ndisks)
        write_heartbeat(&disks[0]);
    if (net.present && !fail)
        net_main();
    if (cfg.mode == MODE_WAIT)
        wait_for_power_button(bsp, fail);
    power_off(fail);
}
