/*
 * The workload, run at CPL3 on every vCPU (user-mode code runs natively under PVM).
 * vCPU c of n owns the working-set pages i with i % n == c. Each loop iteration writes one
 * page when the rate allows, then re-verifies one page of its own share, and spends the idle
 * part of each 10 ms duty period in HLT through int 0x80.
 */
#include "guest.h"
#include "disk.h"

#define FLUSH_EVERY 16

static void sys_sleep_until(u64 deadline)
{
    register u64 nr __asm__("rax") = SYS_SLEEP_UNTIL;
    __asm__ volatile("int $0x80" : "+r"(nr) : "D"(deadline) : "memory");
}

static void sys_fatal(const char *msg)
{
    register u64 nr __asm__("rax") = SYS_FATAL;
    __asm__ volatile("int $0x80" : "+r"(nr) : "D"(msg) : "memory");
}

static void max_update(volatile u64 *slot, u64 v)
{
    u64 cur = __atomic_load_n(slot, __ATOMIC_RELAXED);
    while (v > cur &&
           !__atomic_compare_exchange_n(slot, &cur, v, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

static inline u64 *page_addr(u64 i) { return (u64 *)(u64)(WSS_BASE + i * 4096); }

static inline u64 content_word(u64 i, u64 g, u64 w)
{
    return cfg.content == CONTENT_COMPRESSIBLE ? compressible_word(i, g, w) : page_word(i, g, w);
}

static void write_page(u64 i)
{
    u32 g = cfg.gen[i] + 1;
    if (!g)
        g = 1; /* generation 0 means "never written" */
    u64 *p = page_addr(i);
    for (u64 w = 0; w < 512; w++)
        p[w] = content_word(i, g, w);
    cfg.gen[i] = g;
}

/* 1 when page i holds what its generation says (or was never written). */
static int page_ok(u64 i)
{
    u32 g = cfg.gen[i];
    if (!g)
        return 1;
    const volatile u64 *p = page_addr(i);
    for (u64 w = 0; w < 512; w++)
        if (p[w] != content_word(i, g, w))
            return 0;
    return 1;
}

static inline u64 xorshift64(u64 *s)
{
    u64 x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

void user_main(u32 cpu)
{
    volatile struct status *st = STATUS;
    const u64 n = cfg.ncpus, total = cfg.wss_pages;
    const u64 mine = total > cpu ? (total - cpu + n - 1) / n : 0;
    const u64 tsc_hz = cfg.tsc_hz;
    const u64 period = tsc_hz / 100, busy = period * cfg.duty / 100;
    /* Ticks between two writes of this vCPU (its share of the total rate). */
    const u64 interval = cfg.rate ? tsc_hz * n / cfg.rate : 0;
    u64 hot = mine / 10;
    if (!hot)
        hot = 1;

    for (u64 j = 0; j < mine; j++)
        cfg.gen[j * n + cpu] = 0;
    __atomic_fetch_add(&st->vcpus, 1, __ATOMIC_RELAXED);
    if (!mine) {
        for (;;)
            sys_sleep_until(rdtsc() + period);
    }
    if (total > 0xffffffffULL)
        sys_fatal("working set too large");

    /* vCPU 0 also drives the disk workload; its I/O time is not counted as a stall. */
    const int disk = cpu == 0 && dcfg.bytes;
    if (disk)
        disk_init();

    u64 prng = splitmix64(cfg.seed ^ ((u64)cpu << 48));
    if (!prng)
        prng = 1;
    u64 seq = 0, verify = mine / 2;
    /* pattern=once: set after the last page of the share was written; only checks follow. */
    int written_once = 0;
    u64 now = rdtsc();
    u64 last = now, period_start = now, next_write = now;
    u64 local_max = 0;
    /* Counters are published every FLUSH_EVERY iterations (tens of microseconds) so vCPUs do
     * not bounce the status cache line on every page. */
    u64 n_iter = 0, n_written = 0, n_verified = 0;
#define FLUSH()                                                                  \
    do {                                                                         \
        __atomic_fetch_add(&st->heartbeat, n_iter, __ATOMIC_RELAXED);           \
        __atomic_fetch_add(&st->pages_written, n_written, __ATOMIC_RELAXED);    \
        __atomic_fetch_add(&st->pages_verified, n_verified, __ATOMIC_RELAXED);  \
        st->heartbeat_tsc = now;                                                 \
        n_iter = n_written = n_verified = 0;                                     \
    } while (0)

    for (;;) {
        now = rdtsc();
        u64 stall = now - last;
        if (stall > local_max) {
            local_max = stall;
            max_update(&st->max_stall_tsc, stall);
        }
        last = now;
        if (++n_iter >= FLUSH_EVERY)
            FLUSH();

        if (busy < period && now - period_start >= busy) {
            u64 deadline = period_start + period;
            FLUSH();
            sys_sleep_until(deadline);
            now = rdtsc();
            /* Only lateness past the wake-up time counts as a stall, not the intended HLT. */
            if (now > deadline && now - deadline > local_max) {
                local_max = now - deadline;
                max_update(&st->max_stall_tsc, local_max);
            }
            period_start = now - deadline >= period ? now : deadline;
            last = now;
            continue;
        }

        if (!written_once && (!interval || (long long)(now - next_write) >= 0)) {
            u64 j;
            switch (cfg.pattern) {
            case PATTERN_RANDOM:
                j = xorshift64(&prng) % mine;
                break;
            case PATTERN_HOTCOLD: {
                u64 r = xorshift64(&prng);
                /* 90 % to the first 10 % of the share, the rest to the other 90 %. */
                if ((r % 10) < 9 || mine <= hot)
                    j = (r >> 8) % hot;
                else
                    j = hot + (r >> 8) % (mine - hot);
                break;
            }
            default:
                j = seq++;
                if (seq == mine) {
                    seq = 0;
                    written_once = cfg.pattern == PATTERN_ONCE;
                }
            }
            write_page(j * n + cpu);
            n_written++;
            if (interval) {
                next_write += interval;
                /* After a long stall, do not burst to catch up more than 100 ms of writes. */
                if ((long long)(now - next_write) > (long long)(tsc_hz / 10))
                    next_write = now;
            }
        }

        if (disk && disk_step(now))
            last = rdtsc();

        u64 vi = verify * n + cpu;
        if (++verify == mine)
            verify = 0;
        if (!page_ok(vi)) {
            __atomic_fetch_add(&st->mismatches, 1, __ATOMIC_RELAXED);
            u64 none = ~0ULL;
            __atomic_compare_exchange_n(&st->first_mismatch, &none, vi, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED);
        }
        n_verified++;
    }
}
