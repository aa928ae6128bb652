/*
 * The disk workload, run at CPL3 by vCPU 0, and a polled virtio-mmio block driver (virtio 1.x,
 * one queue). The device serves a request during the exit of the QueueNotify write, so the
 * used ring is up to date when the write returns; the driver still polls it, bounded.
 *
 * On the device (ABI.md "Disk"): block 0 is a superblock with the last flushed generation,
 * blocks 1..T hold a u32 generation per data block, data blocks follow. Each flush cycle
 * writes `flush_every` requests of data stamped with the cycle's generation, flushes, writes
 * superblock + table, flushes again, then reads the cycle's data back and verifies it. At
 * boot the guest first verifies every block the previous boot's table names.
 */
#include "disk.h"

struct disk_config dcfg;

/* Guest-physical scratch space between the status page and the working set. */
#define Q_DESC 0x300000ULL
#define Q_AVAIL 0x301000ULL
#define Q_USED 0x302000ULL
#define REQ_HDR 0x303000ULL
#define REQ_STATUS 0x303100ULL
#define RBUF 0x400000ULL      /* 1 MiB read buffer */
#define WBUF 0x500000ULL      /* 1 MiB write buffer */
#define META 0x6ff000ULL      /* superblock page, then the table: disk blocks 0..T */
#define TABLE (META + 4096)
#define BUF_BLOCKS 256        /* 1 MiB */
#define QN 16

#define SB_MAGIC 0x4B5349444E524554ULL /* "TERNDISK" */
#define SB_VERSION 1

/* virtio-mmio registers and values (virtio 1.2, 4.2.2). */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEV_FEAT 0x010
#define R_DEV_FEAT_SEL 0x014
#define R_DRV_FEAT 0x020
#define R_DRV_FEAT_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_STATUS 0x070
#define R_DESC_LO 0x080
#define R_DESC_HI 0x084
#define R_AVAIL_LO 0x090
#define R_AVAIL_HI 0x094
#define R_USED_LO 0x0a0
#define R_USED_HI 0x0a4
#define R_CONFIG 0x100
#define F_BLK_FLUSH 9
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define D_NEXT 1
#define D_WRITE 2

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

static u64 t_blocks;   /* table blocks T */
static u64 nblocks;    /* data blocks */
static u32 *dgen;      /* generation per data block (TABLE) */
static u32 gen;        /* generation of the current cycle */
static u16 avail_idx;
static u64 next_write, interval, seq_pos, prng = 0x9e3779b97f4a7c15ULL;
static u64 cycle_n;    /* writes in this cycle */
static u64 cycle_first[256], cycle_count[256];

static void disk_fail(const char *msg)
{
    register u64 nr __asm__("rax") = SYS_FATAL;
    __asm__ volatile("int $0x80" : "+r"(nr) : "D"(msg) : "memory");
}

static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline u32 rd(u64 reg) { return *(volatile u32 *)(dcfg.mmio + reg); }
static inline void wr(u64 reg, u32 v) { *(volatile u32 *)(dcfg.mmio + reg) = v; }

/* One request: type, start sector, one data buffer (len 0 = none). 0 = OK, else the status
 * or 0xff when the device never completed it. */
static u32 request(u32 type, u64 sector, u64 buf, u32 len)
{
    volatile struct desc *d = (volatile struct desc *)Q_DESC;
    volatile u32 *hdr = (volatile u32 *)REQ_HDR;
    volatile u8 *status = (volatile u8 *)REQ_STATUS;
    hdr[0] = type;
    hdr[1] = 0;
    *(volatile u64 *)(REQ_HDR + 8) = sector;
    *status = 0xff;
    d[0].addr = REQ_HDR;
    d[0].len = 16;
    d[0].flags = D_NEXT;
    d[0].next = len ? 1 : 2;
    d[1].addr = buf;
    d[1].len = len;
    d[1].flags = D_NEXT | (type == T_IN ? D_WRITE : 0);
    d[1].next = 2;
    d[2].addr = REQ_STATUS;
    d[2].len = 1;
    d[2].flags = D_WRITE;
    d[2].next = 0;
    volatile u16 *avail = (volatile u16 *)Q_AVAIL;
    avail[2 + avail_idx % QN] = 0;
    barrier();
    avail_idx++;
    avail[1] = avail_idx;
    barrier();
    wr(R_QUEUE_NOTIFY, 0);
    volatile u16 *used_idx = (volatile u16 *)(Q_USED + 2);
    for (u64 spins = 0; *used_idx != avail_idx; spins++) {
        if (spins > 100000000ULL)
            return 0xff;
        __asm__ volatile("pause");
    }
    barrier();
    return *status;
}

static u32 io(u32 type, u64 disk_block, u64 buf, u64 blocks)
{
    u32 s = request(type, disk_block * 8, buf, (u32)(blocks * 4096));
    if (s)
        __atomic_fetch_add(&STATUS->disk_io_errors, 1, __ATOMIC_RELAXED);
    return s;
}

static void fill_block(u64 *p, u64 b, u64 g)
{
    u64 x = 0;
    p[0] = b;
    p[1] = g;
    for (u64 w = 2; w < 511; w++)
        p[w] = disk_word(b, g, w);
    for (u64 w = 0; w < 511; w++)
        x ^= p[w];
    p[511] = splitmix64(x);
}

/* 1 when p holds data block b at generation g (exactly, or at least g when `at_least`). */
static int block_ok(const volatile u64 *p, u64 b, u64 g, int at_least)
{
    u64 x = 0, pg = p[1];
    if (p[0] != b || (at_least ? pg < g : pg != g))
        return 0;
    for (u64 w = 2; w < 511; w++)
        if (p[w] != disk_word(b, pg, w))
            return 0;
    for (u64 w = 0; w < 511; w++)
        x ^= p[w];
    return p[511] == splitmix64(x);
}

static void mismatch(u64 b)
{
    volatile struct status *st = STATUS;
    __atomic_fetch_add(&st->disk_mismatches, 1, __ATOMIC_RELAXED);
    u64 none = ~0ULL;
    __atomic_compare_exchange_n(&st->disk_first_mismatch, &none, b, 0, __ATOMIC_RELAXED,
                                __ATOMIC_RELAXED);
}

static u64 sb_sum(const volatile u64 *sb)
{
    return splitmix64(sb[0] ^ (sb[1] << 8) ^ (sb[2] << 16) ^ sb[3]);
}

/* Reads data blocks [first, first + n) (n <= BUF_BLOCKS) and verifies each against dgen. */
static void verify_range(u64 first, u64 n, int at_least, volatile u64 *counter)
{
    if (io(T_IN, 1 + t_blocks + first, RBUF, n))
        return;
    for (u64 k = 0; k < n; k++) {
        u64 b = first + k;
        if (!dgen[b])
            continue;
        if (block_ok((const volatile u64 *)(RBUF + k * 4096), b, dgen[b], at_least))
            __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
        else
            mismatch(b);
    }
}

static void probe(void)
{
    if (!dcfg.mmio)
        disk_fail("disk workload: no virtio_mmio.device on the command line");
    if (rd(R_MAGIC) != 0x74726976 || rd(R_VERSION) != 2 || rd(R_DEVICE_ID) != 2)
        disk_fail("disk workload: the first virtio-mmio device is not a virtio 1.x block device");
    wr(R_STATUS, 0);
    wr(R_STATUS, 1);
    wr(R_STATUS, 1 | 2);
    wr(R_DEV_FEAT_SEL, 0);
    u32 f0 = rd(R_DEV_FEAT);
    wr(R_DEV_FEAT_SEL, 1);
    u32 f1 = rd(R_DEV_FEAT);
    if (!(f0 & (1u << F_BLK_FLUSH)) || !(f1 & 1))
        disk_fail("disk workload: the block device offers no FLUSH or no VERSION_1");
    wr(R_DRV_FEAT_SEL, 0);
    wr(R_DRV_FEAT, 1u << F_BLK_FLUSH);
    wr(R_DRV_FEAT_SEL, 1);
    wr(R_DRV_FEAT, 1);
    wr(R_STATUS, 1 | 2 | 8);
    if (!(rd(R_STATUS) & 8))
        disk_fail("disk workload: the block device refused our features");
    wr(R_QUEUE_SEL, 0);
    if (rd(R_QUEUE_NUM_MAX) < QN)
        disk_fail("disk workload: queue too small");
    wr(R_QUEUE_NUM, QN);
    wr(R_DESC_LO, (u32)Q_DESC);
    wr(R_DESC_HI, 0);
    wr(R_AVAIL_LO, (u32)Q_AVAIL);
    wr(R_AVAIL_HI, 0);
    wr(R_USED_LO, (u32)Q_USED);
    wr(R_USED_HI, 0);
    ((volatile u16 *)Q_AVAIL)[1] = 0;
    ((volatile u16 *)Q_USED)[1] = 0;
    wr(R_QUEUE_READY, 1);
    if (rd(R_QUEUE_READY) != 1)
        disk_fail("disk workload: the block device refused the queue");
    wr(R_STATUS, 1 | 2 | 8 | 4);
    u64 cap = (u64)rd(R_CONFIG) | ((u64)rd(R_CONFIG + 4) << 32);
    if (cap * 512 < dcfg.bytes)
        disk_fail("disk workload: disk= is larger than the block device");
}

void disk_init(void)
{
    volatile struct status *st = STATUS;
    probe();
    u64 total = dcfg.bytes / 4096;
    t_blocks = (total + 1023) / 1025; /* each table block covers 1024 data blocks */
    nblocks = total - 1 - t_blocks;
    dgen = (u32 *)TABLE;
    volatile u64 *sb = (volatile u64 *)META;
    /* Boot check: the previous boot's superblock and table name what it flushed. */
    if (io(T_IN, 0, META, 1 + t_blocks))
        disk_fail("disk workload: cannot read the superblock and table");
    if (sb[0] == SB_MAGIC && sb[1] == SB_VERSION && sb[2] == nblocks && sb[4] == sb_sum(sb)) {
        gen = (u32)sb[3];
        st->disk_flushed_gen = gen;
        for (u64 b = 0; b < nblocks; b += BUF_BLOCKS) {
            u64 n = nblocks - b < BUF_BLOCKS ? nblocks - b : BUF_BLOCKS;
            int any = 0;
            for (u64 k = 0; k < n; k++)
                any |= dgen[b + k] != 0;
            if (any)
                verify_range(b, n, 1, &st->disk_boot_verified);
        }
    } else {
        if (sb[0] == SB_MAGIC)
            mismatch(~0ULL - 1); /* a superblock we wrote, but torn or from another layout */
        for (u64 i = 0; i < t_blocks * 1024; i++)
            dgen[i] = 0;
        gen = 0;
    }
    __atomic_fetch_add(&st->disk_verified, st->disk_boot_verified, __ATOMIC_RELAXED);
    gen++;
    st->disk_blocks = nblocks;
    prng ^= rdtsc();
    if (!prng)
        prng = 1;
    interval = dcfg.iops ? cfg.tsc_hz / dcfg.iops : 0;
    next_write = rdtsc();
}

static u64 xorshift(void)
{
    prng ^= prng << 13;
    prng ^= prng >> 7;
    prng ^= prng << 17;
    return prng;
}

/* Flush, persist superblock + table, flush, verify the cycle's writes. */
static void end_cycle(void)
{
    volatile struct status *st = STATUS;
    volatile u64 *sb = (volatile u64 *)META;
    u64 n = cycle_n;
    cycle_n = 0;
    if (io(T_FLUSH, 0, 0, 0))
        return; /* counted as an I/O error; the next cycle flushes again */
    sb[0] = SB_MAGIC;
    sb[1] = SB_VERSION;
    sb[2] = nblocks;
    sb[3] = gen;
    sb[4] = sb_sum(sb);
    if (io(T_OUT, 0, META, 1 + t_blocks) || io(T_FLUSH, 0, 0, 0))
        return;
    st->disk_flushed_gen = gen;
    for (u64 i = 0; i < n; i++)
        verify_range(cycle_first[i], cycle_count[i], 0, &st->disk_verified);
    gen++;
    if (!gen)
        gen = 1;
}

int disk_step(u64 now)
{
    if (interval && (long long)(now - next_write) < 0)
        return 0;
    u64 first, n;
    if (dcfg.mode == DISK_SEQ) {
        first = seq_pos;
        n = nblocks - first < BUF_BLOCKS ? nblocks - first : BUF_BLOCKS;
        seq_pos = first + n >= nblocks ? 0 : first + n;
    } else {
        first = xorshift() % nblocks;
        n = 1;
    }
    for (u64 k = 0; k < n; k++)
        fill_block((u64 *)(WBUF + k * 4096), first + k, gen);
    if (!io(T_OUT, 1 + t_blocks + first, WBUF, n)) {
        for (u64 k = 0; k < n; k++)
            dgen[first + k] = gen;
        __atomic_fetch_add(&STATUS->disk_written, n, __ATOMIC_RELAXED);
        cycle_first[cycle_n] = first;
        cycle_count[cycle_n] = n;
        cycle_n++;
    }
    if (cycle_n >= dcfg.flush_every)
        end_cycle();
    if (interval) {
        next_write += interval;
        if ((long long)(now - next_write) > (long long)(cfg.tsc_hz / 10))
            next_write = now;
    }
    return 1;
}
