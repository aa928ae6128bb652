/* Constants shared by the assembly entry and the C code of the test guest (see ABI.md). */
#ifndef TERN_GUEST_LAYOUT_H
#define TERN_GUEST_LAYOUT_H

#define MAX_CPUS 16
#define KSTACK_SIZE 8192
#define USTACK_SIZE 16384

#define SEL_KCODE64 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA (0x18 | 3)
#define SEL_UCODE64 (0x20 | 3)
#define SEL_KCODE32 0x28
#define SEL_TSS0 0x30

#define CR0_PE 0x1
#define CR0_MP 0x2
#define CR0_EM 0x4
#define CR0_NW 0x20000000
#define CR0_CD 0x40000000
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define CR4_OSFXSR 0x200
#define CR4_OSXMMEXCPT 0x400

#define AP_TRAMPOLINE_ADDR 0x8000
#define STATUS_ADDR 0x200000
#define WSS_BASE 0x1000000
#define IDENTITY_MAP_END 0x100000000ULL

#define VEC_TIMER 0x40
#define VEC_SYSCALL 0x80
#define VEC_SPURIOUS 0xff

#define SYS_SLEEP_UNTIL 0 /* rdi = TSC deadline */
#define SYS_FATAL 1       /* rdi = message */

#endif
