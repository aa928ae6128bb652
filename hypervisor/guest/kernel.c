/*
 * Ring-0 part of the Tern test guest: command line, TSC and LAPIC timer calibration, IDT/TSS,
 * AP start-up, the HLT system call, error reporting. Everything else runs at CPL3
 * (workload.c). Ring-0 code is slow under PVM, so this file does as little as it can.
 */
#include "guest.h"
#include "disk.h"

#define MB_BOOT_MAGIC 0x2BADB002

struct config cfg;

/* ---------------------------------------------------------------- small helpers */
void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* COM1 without polling the line status: each port access is an exit, keep them few. */
static void serial_puts(const char *s)
{
    while (*s)
        outb(0x3f8, (u8)*s++);
}

static char *fmt_u64(char *out, u64 v)
{
    char tmp[21];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *out++ = tmp[--n];
    *out = 0;
    return out;
}

static char *append(char *out, const char *s)
{
    while (*s)
        *out++ = *s++;
    *out = 0;
    return out;
}

static void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* State 2 with a message in the status page and on the serial port, then stop this vCPU. */
static void fatal(const char *msg)
{
    volatile struct status *st = STATUS;
    int n = 0;
    while (msg[n] && n < 255) {
        st->message[n] = msg[n];
        n++;
    }
    st->message[n] = 0;
    st->state = STATE_ERROR;
    serial_puts("tern-guest: error: ");
    serial_puts(msg);
    serial_puts("\n");
    halt_forever();
}

/* ---------------------------------------------------------------- command line */
static char cmdline[512];

static int streq(const char *a, const char *b, int n)
{
    for (int i = 0; i < n; i++)
        if (a[i] != b[i] || !b[i])
            return 0;
    return b[n] == 0;
}

/* Decimal with an optional binary K/M/G suffix when `suffix` is set; 0 on success. */
static int parse_u64(const char *s, int n, int suffix, u64 *out)
{
    u64 v = 0, mul = 1;
    if (n > 0 && suffix) {
        switch (s[n - 1]) {
        case 'K': case 'k': mul = 1ULL << 10; n--; break;
        case 'M': case 'm': mul = 1ULL << 20; n--; break;
        case 'G': case 'g': mul = 1ULL << 30; n--; break;
        }
    }
    if (n <= 0 || n > 19)
        return -1;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (u64)(s[i] - '0');
    }
    if (v > (~0ULL) / mul)
        return -1;
    *out = v * mul;
    return 0;
}

static void bad_word(const char *what, const char *w, int n)
{
    static char msg[200];
    char *p = append(msg, what);
    for (int i = 0; i < n && p < msg + sizeof msg - 1; i++)
        *p++ = w[i];
    *p = 0;
    fatal(msg);
}

static u64 wss_bytes = 64ULL << 20;

/* content=random|compressible (ABI.md, "Page contents"). */
static void parse_content(const char *v, int vn, const char *w, int n)
{
    if (streq(v, "random", vn))
        cfg.content = CONTENT_RANDOM;
    else if (streq(v, "compressible", vn))
        cfg.content = CONTENT_COMPRESSIBLE;
    else
        bad_word("command line: bad content (random, compressible): ", w, n);
}

/* 0x-prefixed hexadecimal; 0 on success. */
static int parse_hex(const char *s, int n, u64 *out)
{
    u64 v = 0;
    if (n < 3 || n > 18 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X'))
        return -1;
    for (int i = 2; i < n; i++) {
        char c = s[i];
        u64 d = c >= '0' && c <= '9' ? (u64)(c - '0')
                : c >= 'a' && c <= 'f' ? (u64)(c - 'a' + 10)
                : c >= 'A' && c <= 'F' ? (u64)(c - 'A' + 10)
                : 16;
        if (d == 16)
            return -1;
        v = v << 4 | d;
    }
    *out = v;
    return 0;
}

/* virtio_mmio.device=<size>@<base>:<irq>, the form Linux reads; the first one is the disk. */
static void parse_virtio_mmio(const char *v, int vn, const char *w, int n)
{
    int at = -1, colon = -1;
    for (int i = 0; i < vn; i++) {
        if (v[i] == '@' && at < 0)
            at = i;
        if (v[i] == ':' && at >= 0)
            colon = i;
    }
    u64 size, base, irq;
    if (at < 1 || colon < at + 2 || parse_u64(v, at, 1, &size) ||
        parse_hex(v + at + 1, colon - at - 1, &base) ||
        parse_u64(v + colon + 1, vn - colon - 1, 0, &irq) || size < 0x200 ||
        base < 0xfc000000ULL || base + size > IDENTITY_MAP_END || (base & 0xfff) || irq > 255)
        bad_word("command line: bad virtio_mmio.device (4K@0xADDR:IRQ in the top 64M below 4G): ",
                 w, n);
    if (!dcfg.mmio) {
        dcfg.mmio = base;
        dcfg.irq = (u32)irq;
    }
}

/* The disk workload's keys (ABI.md "Command line"); 1 if `w` was one of them. */
static int parse_disk_key(const char *w, int eq, const char *v, int vn, int n)
{
    if (streq(w, "virtio_mmio.device", eq)) {
        parse_virtio_mmio(v, vn, w, n);
    } else if (streq(w, "disk", eq)) {
        if (parse_u64(v, vn, 1, &dcfg.bytes) || (dcfg.bytes & 4095) ||
            (dcfg.bytes && dcfg.bytes < (64ULL << 10)) || dcfg.bytes > DISK_MAX_BYTES)
            bad_word("command line: bad disk (0, or 64K..1G in 4K units): ", w, n);
    } else if (streq(w, "iops", eq)) {
        if (parse_u64(v, vn, 0, &dcfg.iops) || dcfg.iops > 1000000000ULL)
            bad_word("command line: bad iops (write requests/s, 0 = unlimited): ", w, n);
    } else if (streq(w, "dflush", eq)) {
        if (parse_u64(v, vn, 0, &dcfg.flush_every) || dcfg.flush_every < 1 ||
            dcfg.flush_every > 256)
            bad_word("command line: bad dflush (writes per flush, 1..256): ", w, n);
    } else if (streq(w, "dio", eq)) {
        if (streq(v, "random", vn))
            dcfg.mode = DISK_RANDOM;
        else if (streq(v, "seq", vn))
            dcfg.mode = DISK_SEQ;
        else
            bad_word("command line: bad dio (random, seq): ", w, n);
    } else {
        return 0;
    }
    return 1;
}

static void parse_cmdline(void)
{
    const char *p = cmdline;
    int first = 1;
    cfg.rate = 0;
    cfg.duty = 100;
    cfg.seed = 1;
    cfg.pattern = PATTERN_SEQ;
    cfg.content = CONTENT_RANDOM;
    dcfg.flush_every = 16;
    while (*p) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        const char *w = p;
        while (*p && *p != ' ' && *p != '\t')
            p++;
        int n = (int)(p - w), eq = -1;
        for (int i = 0; i < n; i++)
            if (w[i] == '=') {
                eq = i;
                break;
            }
        if (eq < 0) {
            /* Boot loaders (GRUB, QEMU) put the image path first. */
            if (first) {
                first = 0;
                continue;
            }
            bad_word("command line: expected key=value, got ", w, n);
        }
        first = 0;
        const char *v = w + eq + 1;
        int vn = n - eq - 1;
        if (streq(w, "wss", eq)) {
            if (parse_u64(v, vn, 1, &wss_bytes) || wss_bytes < 4096)
                bad_word("command line: bad wss (bytes with K/M/G, at least 4K): ", w, n);
        } else if (streq(w, "rate", eq)) {
            if (parse_u64(v, vn, 0, &cfg.rate) || cfg.rate > 1000000000ULL)
                bad_word("command line: bad rate (pages/s, 0 = unlimited): ", w, n);
        } else if (streq(w, "duty", eq)) {
            if (parse_u64(v, vn, 0, &cfg.duty) || cfg.duty < 1 || cfg.duty > 100)
                bad_word("command line: bad duty (1..100): ", w, n);
        } else if (streq(w, "seed", eq)) {
            if (parse_u64(v, vn, 0, &cfg.seed))
                bad_word("command line: bad seed: ", w, n);
        } else if (streq(w, "pattern", eq)) {
            if (streq(v, "seq", vn))
                cfg.pattern = PATTERN_SEQ;
            else if (streq(v, "random", vn))
                cfg.pattern = PATTERN_RANDOM;
            else if (streq(v, "hotcold", vn))
                cfg.pattern = PATTERN_HOTCOLD;
            else if (streq(v, "once", vn))
                cfg.pattern = PATTERN_ONCE;
            else
                bad_word("command line: bad pattern (seq, random, hotcold, once): ", w, n);
        } else if (streq(w, "content", eq)) {
            parse_content(v, vn, w, n);
        } else if (!parse_disk_key(w, eq, v, vn, n)) {
            bad_word("command line: unknown key in ", w, n);
        }
    }
    cfg.wss_pages = wss_bytes >> 12;
}

/* ---------------------------------------------------------------- TSC calibration */
/*
 * One 10 ms one-shot of PIT channel 2 (its output is bit 5 of port 0x61). Every port access
 * is bracketed by TSC reads: under a loaded host a poll can be delayed by milliseconds, so the
 * sample also returns how uncertain it is and the caller keeps the tightest one.
 */
static u64 pit_sample(u64 *uncertainty)
{
    outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));
    outb(0x43, 0xb0); /* channel 2, lo/hi byte, mode 0 */
    outb(0x42, 11932 & 0xff);
    u64 s0 = rdtsc();
    outb(0x42, 11932 >> 8); /* counting starts here */
    u64 s1 = rdtsc(), last_low = s1;
    for (u32 spins = 0;; spins++) {
        u64 before = rdtsc();
        u8 v = inb(0x61);
        u64 after = rdtsc();
        if (v & 0x20) {
            *uncertainty = (s1 - s0) + (after - last_low);
            return ((last_low + after) / 2 - (s0 + s1) / 2) / 10;
        }
        last_low = before;
        if (after - s1 > (1ULL << 32) || spins > 10000000)
            return 0; /* no PIT behind port 0x61 (about 1 s of TSC at most) */
    }
}

static u64 tsc_khz_from_pit(void)
{
    u64 best = 0, best_unc = ~0ULL;
    for (int i = 0; i < 5; i++) {
        u64 unc, khz = pit_sample(&unc);
        if (!khz)
            return 0;
        if (unc < best_unc) {
            best = khz;
            best_unc = unc;
        }
    }
    return (best > 100000 && best < 20000000) ? best : 0;
}

/* KVM's pvclock: the host's exact TSC-to-ns scale, when the KVM clocksource2 MSR exists. */
struct pvclock {
    u32 version, pad0;
    u64 tsc_timestamp, system_time;
    u32 tsc_to_system_mul;
    signed char tsc_shift;
    u8 flags, pad[2];
};
static struct pvclock pvclock __attribute__((aligned(64)));

static u64 tsc_khz_from_kvmclock(void)
{
    u32 a, b, c, d;
    cpuid(0x40000000, &a, &b, &c, &d);
    if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d || a < 0x40000001)
        return 0; /* not "KVMKVMKVM" */
    cpuid(0x40000001, &a, &b, &c, &d);
    if (!(a & (1 << 3)))
        return 0;
    wrmsr(0x4b564d01, (u64)&pvclock | 1);
    u64 t0 = rdtsc();
    while (!__atomic_load_n(&pvclock.tsc_to_system_mul, __ATOMIC_ACQUIRE) && rdtsc() - t0 < (1ULL << 32))
        __asm__ volatile("pause");
    u32 mul = pvclock.tsc_to_system_mul;
    int shift = pvclock.tsc_shift;
    wrmsr(0x4b564d01, 0); /* stop the host from writing guest memory */
    if (!mul)
        return 0;
    u64 khz = (1000000ULL << 32) / mul;
    return shift >= 0 ? khz >> shift : khz << -shift;
}

static u64 calibrate_tsc_khz(void)
{
    u32 a, b, c, d;
    cpuid(0x40000000, &a, &b, &c, &d);
    if (a >= 0x40000010 && a < 0x40010000) {
        cpuid(0x40000010, &a, &b, &c, &d);
        if (a)
            return a;
    }
    u64 kvm_khz = tsc_khz_from_kvmclock();
    if (kvm_khz > 100000 && kvm_khz < 20000000)
        return kvm_khz;
    cpuid(0, &a, &b, &c, &d);
    u32 max_leaf = a;
    if (max_leaf >= 0x15) {
        cpuid(0x15, &a, &b, &c, &d);
        if (a && b && c)
            return (u64)c * b / a / 1000;
    }
    u64 khz = tsc_khz_from_pit();
    if (khz)
        return khz;
    if (max_leaf >= 0x16) {
        cpuid(0x16, &a, &b, &c, &d);
        if (a & 0xffff)
            return (u64)(a & 0xffff) * 1000;
    }
    return 0;
}

static void delay_tsc(u64 ticks)
{
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < ticks)
        __asm__ volatile("pause");
}

/* ---------------------------------------------------------------- LAPIC */
#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define LAPIC_MMIO 0xfee00000UL

static int x2apic;
static u64 lapic_khz;

static u32 lapic_read(u32 reg)
{
    if (x2apic)
        return (u32)rdmsr(0x800 + (reg >> 4));
    return *(volatile u32 *)(LAPIC_MMIO + reg);
}

static void lapic_write(u32 reg, u64 v)
{
    if (x2apic)
        wrmsr(0x800 + (reg >> 4), v);
    else
        *(volatile u32 *)(LAPIC_MMIO + reg) = (u32)v;
}

static void lapic_enable(void)
{
    if (x2apic)
        wrmsr(0x1b, rdmsr(0x1b) | (1 << 11) | (1 << 10));
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    lapic_write(LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
    lapic_write(LAPIC_LVT_TIMER, VEC_TIMER); /* one-shot */
}

/* LAPIC timer ticks per ms against the TSC; three 10 ms samples, the least disturbed wins. */
static void lapic_calibrate(void)
{
    u64 best_unc = ~0ULL;
    lapic_write(LAPIC_LVT_TIMER, VEC_TIMER | (1 << 16)); /* masked while measuring */
    for (int i = 0; i < 3; i++) {
        u64 t0 = rdtsc();
        lapic_write(LAPIC_TIMER_INIT, 0xffffffffu);
        u64 t1 = rdtsc();
        delay_tsc(cfg.tsc_hz / 100);
        u64 t2 = rdtsc();
        u32 cur = lapic_read(LAPIC_TIMER_CUR);
        u64 t3 = rdtsc();
        u64 unc = (t1 - t0) + (t3 - t2), elapsed = (t2 + t3) / 2 - (t0 + t1) / 2;
        if (unc < best_unc && elapsed) {
            best_unc = unc;
            lapic_khz = (0xffffffffu - (u64)cur) * (cfg.tsc_hz / 1000) / elapsed;
        }
    }
    lapic_write(LAPIC_TIMER_INIT, 0);
    lapic_write(LAPIC_LVT_TIMER, VEC_TIMER);
    if (!lapic_khz)
        fatal("LAPIC timer does not count");
}

static void lapic_icr(u32 v)
{
    if (x2apic) {
        wrmsr(0x830, v);
    } else {
        lapic_write(LAPIC_ICR_LO, v);
        while (lapic_read(LAPIC_ICR_LO) & (1 << 12))
            __asm__ volatile("pause");
    }
}

/* ---------------------------------------------------------------- IDT, TSS */
struct idt_entry {
    u16 off_lo, sel;
    u8 ist, attr;
    u16 off_mid;
    u32 off_hi, zero;
} __attribute__((packed));

struct tss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3, iomap_base;
} __attribute__((packed));

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

extern char isr_stubs[];
extern u64 gdt_tss[];
extern char kstacks[];
extern char ap_tramp[], ap_tramp_end[];
extern volatile u32 ap_next_id;
void enter_user(void (*rip)(u32), u64 rsp, u64 arg);

static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct tss tss[MAX_CPUS] __attribute__((aligned(16)));
static u8 ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(4096)));
static volatile u32 go;

static void idt_build(void)
{
    for (int v = 0; v < 256; v++) {
        u64 a = (u64)(isr_stubs + 16 * v);
        idt[v].off_lo = (u16)a;
        idt[v].sel = SEL_KCODE64;
        idt[v].ist = 0;
        idt[v].attr = v == VEC_SYSCALL ? 0xee : 0x8e; /* int 0x80 allowed from CPL3 */
        idt[v].off_mid = (u16)(a >> 16);
        idt[v].off_hi = (u32)(a >> 32);
        idt[v].zero = 0;
    }
}

/* Per-CPU TSS (ring-0 stack for traps from CPL3) and IDT. */
static void cpu_tables(u32 cpu)
{
    struct tss *t = &tss[cpu];
    u64 base = (u64)t, limit = sizeof(*t) - 1;
    t->rsp0 = (u64)(kstacks + (u64)(cpu + 1) * KSTACK_SIZE);
    t->iomap_base = sizeof(*t);
    gdt_tss[2 * cpu] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
                       (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt_tss[2 * cpu + 1] = base >> 32;
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
    __asm__ volatile("ltr %w0" ::"r"(SEL_TSS0 + 16 * cpu));
}

static void exception(struct frame *f)
{
    static char msg[128];
    char *p = append(msg, "CPU exception ");
    p = fmt_u64(p, f->vector);
    p = append(p, " error ");
    p = fmt_u64(p, f->error);
    p = append(p, " at rip ");
    p = fmt_u64(p, f->rip);
    p = append(p, (f->cs & 3) ? " (CPL3)" : " (CPL0)");
    fatal(msg);
}

/* int 0x80 from the workload. */
static void syscall(struct frame *f)
{
    if (f->rax == SYS_SLEEP_UNTIL) {
        u64 now = rdtsc(), deadline = f->rdi;
        if (deadline <= now)
            return;
        u64 count = (deadline - now) * lapic_khz / (cfg.tsc_hz / 1000);
        if (count < 1)
            count = 1;
        if (count > 0xffffffffu)
            count = 0xffffffffu;
        lapic_write(LAPIC_TIMER_INIT, count);
        __asm__ volatile("sti; hlt; cli");
    } else if (f->rax == SYS_FATAL) {
        fatal((const char *)f->rdi);
    }
}

void isr(struct frame *f)
{
    if (f->vector == VEC_SYSCALL) {
        syscall(f);
    } else if (f->vector == 6 && (f->cs & 3) == 3 && *(const u16 *)f->rip == (0x80 << 8 | 0xcd)) {
        /* PVM turns `int $0x80` at CPL3 into #UD at the instruction: same call, then skip it. */
        syscall(f);
        f->rip += 2;
    }
    else if (f->vector == VEC_SPURIOUS || f->vector == 15 || (f->vector >= 32 && f->vector < 48))
        return; /* spurious LAPIC or masked-PIC interrupts */
    else if (f->vector < 32)
        exception(f);
    else
        lapic_write(LAPIC_EOI, 0);
}

/* ---------------------------------------------------------------- start-up */
static u64 ustack_top(u32 cpu) { return (u64)&ustacks[cpu][USTACK_SIZE]; }

/* INIT-SIPI-SIPI to all other CPUs, then wait until no more check in. */
static u32 start_aps(void)
{
    memcpy((void *)AP_TRAMPOLINE_ADDR, ap_tramp, (unsigned long)(ap_tramp_end - ap_tramp));
    u64 ms = cfg.tsc_hz / 1000;
    lapic_icr(0x000c4500); /* INIT, assert, all excluding self */
    delay_tsc(10 * ms);
    lapic_icr(0x000c4600 | (AP_TRAMPOLINE_ADDR >> 12)); /* SIPI */
    delay_tsc(ms / 5);
    lapic_icr(0x000c4600 | (AP_TRAMPOLINE_ADDR >> 12));
    /* CPUID.1 EBX[23:16] with HTT is the logical CPU count when the host sets it exactly (Tern
     * does); stop as soon as that many checked in. Otherwise (QEMU with one core per socket
     * reports 1) wait until none has arrived for a while. */
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    u32 expect = ((d >> 28) & 1) ? (b >> 16) & 0xff : 0;
    u64 quiet = (expect > 1 ? 300 : 100) * ms;
    u32 seen = ap_next_id;
    u64 start = rdtsc(), last_change = start;
    for (;;) {
        u64 now = rdtsc();
        u32 cur = ap_next_id;
        if (cur != seen) {
            seen = cur;
            last_change = now;
        }
        if ((expect > 1 && cur >= expect) || now - last_change > quiet || now - start > 3000 * ms)
            break;
        __asm__ volatile("pause");
    }
    u32 n = ap_next_id; /* APs that take an id from now on halt */
    return n > MAX_CPUS ? MAX_CPUS : n;
}

struct mbi {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

void kmain(u32 magic, u32 mbi_addr)
{
    const struct mbi *mbi = (const struct mbi *)(u64)mbi_addr;
    u64 ram_top = 0;
    serial_puts("tern-guest: long mode\n");
    /* Copy what we need from the MBI first: loaders may put it where the status page goes. */
    if (magic == MB_BOOT_MAGIC) {
        if (mbi->flags & (1 << 2)) {
            const char *s = (const char *)(u64)mbi->cmdline;
            unsigned i = 0;
            while (s[i] && i < sizeof cmdline - 1) {
                cmdline[i] = s[i];
                i++;
            }
            cmdline[i] = 0;
        }
        if (mbi->flags & 1)
            ram_top = 0x100000 + (u64)mbi->mem_upper * 1024;
    }
    volatile struct status *st = STATUS;
    memset((void *)st, 0, 4096);
    st->magic = STATUS_MAGIC;
    st->version = STATUS_VERSION;
    st->state = STATE_BOOTING;
    st->first_mismatch = ~0ULL;
    st->disk_first_mismatch = ~0ULL;
    if (magic != MB_BOOT_MAGIC)
        fatal("not started by a multiboot loader (bad EAX)");
    if (!ram_top)
        fatal("the multiboot info gives no memory size");

    parse_cmdline();
    u64 gen_bytes = (cfg.wss_pages * 4 + 4095) & ~4095ULL;
    u64 end = WSS_BASE + cfg.wss_pages * 4096 + gen_bytes;
    if (end > ram_top || end > IDENTITY_MAP_END)
        fatal("working set does not fit in RAM (needs 16M + wss + wss/1024 below 4G)");
    cfg.gen = (u32 *)(u64)(WSS_BASE + cfg.wss_pages * 4096);
    st->wss_pages = cfg.wss_pages;

    /* Mask the legacy PIC: only the LAPIC interrupts us. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);

    u64 khz = calibrate_tsc_khz();
    st->tsc_khz = khz;
    cfg.tsc_hz = (khz ? khz : 2000000) * 1000;

    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    x2apic = (c >> 21) & 1;
    idt_build();
    cpu_tables(0);
    lapic_enable();
    lapic_calibrate();

    cfg.ncpus = start_aps();
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);

    static char line[256];
    char *p = append(line, "tern-guest: cmdline \"");
    p = append(p, cmdline);
    p = append(p, "\" cpus=");
    p = fmt_u64(p, cfg.ncpus);
    p = append(p, " tsc_khz=");
    p = fmt_u64(p, khz);
    p = append(p, x2apic ? " x2apic" : " xapic");
    p = append(p, " lapic_khz=");
    p = fmt_u64(p, lapic_khz);
    p = append(p, "\ntern-guest: running\n");
    serial_puts(line);
    st->state = STATE_RUNNING;
    enter_user(user_main, ustack_top(0), 0);
}

void ap_main(u32 id)
{
    cpu_tables(id);
    lapic_enable();
    while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
        __asm__ volatile("pause");
    if (id >= cfg.ncpus)
        halt_forever();
    enter_user(user_main, ustack_top(id), id);
}
