/* Shared declarations of the test guest's ring-0 stub (kernel.c) and CPL3 workload (workload.c). */
#ifndef TERN_GUEST_H
#define TERN_GUEST_H

#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define STATUS_MAGIC 0x544154534E524554ULL /* the bytes "TERNSTAT" */
#define STATUS_VERSION 1
#define STATE_BOOTING 0
#define STATE_RUNNING 1
#define STATE_ERROR 2

/* The status page at STATUS_ADDR; layout fixed by ABI.md. */
struct status {
    u64 magic;
    u32 version;
    u32 state;
    u64 pages_written;
    u64 pages_verified;
    u64 mismatches;
    u64 max_stall_tsc;
    u64 heartbeat;
    u64 heartbeat_tsc;
    u64 tsc_khz;
    u64 wss_pages;
    u64 first_mismatch;
    u32 vcpus;
    u32 reserved;
    /* The disk workload (ABI.md "Disk"), appended in ABI version 1. */
    u64 disk_written;        /* 4 KiB blocks written */
    u64 disk_verified;       /* blocks read back and verified (at boot and after flushes) */
    u64 disk_mismatches;
    u64 disk_io_errors;      /* requests the device failed */
    u64 disk_flushed_gen;    /* last generation whose blocks and table are flushed */
    u64 disk_boot_verified;  /* blocks of a previous boot verified at this boot */
    u64 disk_first_mismatch; /* data block index, ~0 if none */
    u64 disk_blocks;         /* data blocks the workload uses, 0 = no disk workload */
    u8 pad[0x100 - 0xa0];
    char message[256];
};

#define STATUS ((volatile struct status *)STATUS_ADDR)

enum pattern { PATTERN_SEQ, PATTERN_RANDOM, PATTERN_HOTCOLD, PATTERN_ONCE };
enum content { CONTENT_RANDOM, CONTENT_COMPRESSIBLE };

/* What the ring-0 stub hands to the workload (read-only once the workload runs). */
struct config {
    u64 wss_pages;
    u64 rate;       /* page writes per second over all vCPUs, 0 = unlimited */
    u64 duty;       /* busy percent, 1..100 */
    u64 seed;
    u64 tsc_hz;     /* calibrated, or an assumed 2 GHz when calibration failed */
    u32 pattern;
    u32 ncpus;
    u32 *gen;       /* generation per working-set page */
    u32 content;    /* enum content */
};

extern struct config cfg;

void user_main(u32 cpu);

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline u64 splitmix64(u64 x)
{
    u64 z = x + 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Word w of page i at generation g (ABI.md, "Page contents"). */
static inline u64 page_word(u64 i, u64 g, u64 w)
{
    return splitmix64((i << 32) ^ (g << 8) ^ w);
}

/* Word w of page i at generation g under content=compressible: every fourth word as
 * page_word, the other three the generation (ABI.md, "Page contents"). */
static inline u64 compressible_word(u64 i, u64 g, u64 w)
{
    return (w & 3) ? g : page_word(i, g, w);
}

#endif
