/* The test guest's disk workload (disk.c) and its virtio-blk driver: polled, at CPL3. */
#ifndef TERN_GUEST_DISK_H
#define TERN_GUEST_DISK_H

#include "guest.h"

enum disk_mode { DISK_RANDOM, DISK_SEQ };

/* From the command line (kernel.c); bytes == 0 means no disk workload. */
struct disk_config {
    u64 mmio;        /* first virtio_mmio.device= base, 0 if none */
    u32 irq;
    u32 mode;        /* enum disk_mode */
    u64 bytes;       /* disk= : bytes of the device the workload uses (layout in ABI.md) */
    u64 iops;        /* write requests per second, 0 = as fast as possible */
    u64 flush_every; /* writes per flush cycle */
};

extern struct disk_config dcfg;

/* Largest disk= the workload takes: its generation table must fit 1 MiB of guest RAM. */
#define DISK_MAX_BYTES (1ULL << 30)

/* vCPU 0 at CPL3: probe the device, verify what the previous boot flushed. */
void disk_init(void);
/* vCPU 0 at CPL3, from the workload loop: one write request when due (and the flush cycle
 * when it is complete). Returns 1 if it did I/O (the time spent is not a stall). */
int disk_step(u64 now);

/* Word w of data block b at generation g (ABI.md, "Disk contents"). */
#define DISK_SALT 0x4449534b00000000ULL
static inline u64 disk_word(u64 b, u64 g, u64 w)
{
    return splitmix64((b << 32) ^ (g << 8) ^ w ^ DISK_SALT);
}

#endif
