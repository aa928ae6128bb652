/*
 * Ring-0 entry of the Tern test guest: multiboot v1 header, 32-bit entry, straight to PAE +
 * long mode (no 32-bit paging: PVM does not support it), AP trampoline, interrupt stubs and
 * the drop to CPL3. Kept short: ring-0 code runs slowly under PVM.
 */
#include "layout.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS ((1 << 1) | (1 << 16)) /* memory info, address fields valid (a.out kludge) */

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header    /* header_addr */
    .long _load_start  /* load_addr */
    .long _load_end    /* load_end_addr */
    .long _bss_end     /* bss_end_addr */
    .long mb_entry     /* entry_addr */

/* ---------------------------------------------------------------- BSP 32-bit entry */
    .text
    .code32
    .globl mb_entry
mb_entry:
    cli
    cld
    mov %eax, %edi              /* multiboot magic, checked in C */
    mov %ebx, %esi              /* MBI address */
    lgdt gdtr
    ljmp $SEL_KCODE32, $1f
1:  mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $(kstacks + KSTACK_SIZE), %esp  /* multiboot gives no stack */
    call enter_long_mode32
    ljmp $SEL_KCODE64, $bsp_long

/* PAE, CR3, EFER.LME, paging on. Page tables are static data (no loop in slow ring 0). */
enter_long_mode32:
    mov %cr4, %eax
    or $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $~(CR0_EM | CR0_CD | CR0_NW), %eax
    or $(CR0_PG | CR0_PE | CR0_MP), %eax
    mov %eax, %cr0
    ret

    .code64
bsp_long:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    lea kstacks + KSTACK_SIZE(%rip), %rsp
    /* edi = magic, esi = MBI, zero-extended already */
    call kmain
2:  cli
    hlt
    jmp 2b

/* ---------------------------------------------------------------- AP start-up
 * The SIPI vector points at a copy of ap_tramp in low memory (AP_TRAMPOLINE_ADDR); it runs in
 * real mode with CS = vector << 8, IP = 0. It loads the GDT with a pointer held inside the
 * copy, enables protection and far-jumps to 32-bit code in the image.
 */
    .code16
    .globl ap_tramp, ap_tramp_end
ap_tramp:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_gdtr - ap_tramp)
    mov %cr0, %eax
    or $CR0_PE, %eax
    mov %eax, %cr0
    ljmpl $SEL_KCODE32, $ap_prot
    .align 8
ap_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

    .code32
ap_prot:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    /* A tiny shared stack for the call below: APs enter one at a time (ap_lock). */
1:  mov $1, %eax
    xchg %eax, ap_lock
    test %eax, %eax
    jz 2f
    pause
    jmp 1b
2:  mov $ap_boot_stack_top, %esp
    call enter_long_mode32
    ljmp $SEL_KCODE64, $ap_long

    .code64
ap_long:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $1, %edi
    lock xadd %edi, ap_next_id(%rip)   /* edi = this AP's id (1, 2, ...) */
    cmp $MAX_CPUS, %edi
    jae 3f
    mov %edi, %eax
    inc %eax
    imul $KSTACK_SIZE, %eax
    lea kstacks(%rip), %rsp
    add %rax, %rsp
    movl $0, ap_lock(%rip)             /* boot stack free for the next AP */
    call ap_main
3:  movl $0, ap_lock(%rip)
4:  cli
    hlt
    jmp 4b

/* ---------------------------------------------------------------- CPL3 entry
 * enter_user(rip, rsp, arg): iretq to CPL3 with interrupts enabled.
 */
    .globl enter_user
enter_user:
    mov %rdx, %r8
    pushq $SEL_UDATA
    pushq %rsi
    pushq $0x202
    pushq $SEL_UCODE64
    pushq %rdi
    mov $SEL_UDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %r8, %rdi
    iretq

/* ---------------------------------------------------------------- interrupts
 * 256 stubs of 16 bytes each; those for exceptions without an error code push a zero so the
 * frame is uniform. isr_common saves the GPRs and calls isr(frame).
 */
    .align 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .align 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call isr
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

/* ---------------------------------------------------------------- static data */
    .data
    .align 16
    .globl gdt
gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00af9a000000ffff        /* 0x08 kernel code 64 */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cff2000000ffff        /* 0x18 user data (DPL3) */
    .quad 0x00affa000000ffff        /* 0x20 user code 64 (DPL3) */
    .quad 0x00cf9a000000ffff        /* 0x28 kernel code 32 */
    .globl gdt_tss
gdt_tss:
    .fill MAX_CPUS * 2, 8, 0        /* 0x30 + 16 * cpu: TSS descriptors, filled in C */
gdt_end:

gdtr:
    .word gdt_end - gdt - 1
    .long gdt

    .align 4
ap_lock:
    .long 0
    .globl ap_next_id
ap_next_id:
    .long 1

/* Identity map of the first 4 GiB with 2 MiB pages, user-accessible (the workload runs at
 * CPL3 on the same map); the top 64 MiB (LAPIC, IOAPIC) uncached. */
    .align 4096
    .globl pml4
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + 7
    .quad pd + 0x1000 + 7
    .quad pd + 0x2000 + 7
    .quad pd + 0x3000 + 7
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .if i >= 2016
    .quad (i << 21) | 0x9f          /* P RW U PWT PCD PS */
    .else
    .quad (i << 21) | 0x87          /* P RW U PS */
    .endif
    .set i, i + 1
    .endr

    .bss
    .align 4096
    .globl kstacks
kstacks:
    .skip MAX_CPUS * KSTACK_SIZE
ap_boot_stack:
    .skip 256
ap_boot_stack_top:

    .section .note.GNU-stack, "", @progbits
