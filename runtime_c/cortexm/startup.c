/*
 * Cortex-M startup for qacc test binaries (QEMU mps2-an386, mps2-an500, mps3-an547, and real
 * boards with the same memory map).
 *
 * The vector table sits at address 0 (section .vectors, placed first by cortexm-sections.ld).
 * Reset enables the FPU / MVE coprocessors (CP10 and CP11 in CPACR) before any floating-point or
 * vector instruction can run, then jumps to newlib's rdimon crt0 (_start), which zeroes .bss, asks
 * the semihosting host for heap and stack (SYS_HEAPINFO), fetches argv (SYS_GET_CMDLINE), runs the
 * constructors, calls main() and leaves through exit() -> semihosting SYS_EXIT.
 *
 * The linker script, not the host, decides where the stack and the heap are: QEMU answers
 * SYS_HEAPINFO with its largest directly mapped RAM, which on mps3-an547 is a 512 KiB TCM and not
 * the DDR that holds .data and .bss. crt0 calls the hook _stack_init (weak in crt0) right after it
 * loaded SP from that answer; ours moves SP to __stack (top of the DATA region) and sets newlib's
 * __heap_limit to the same address, so the heap grows from `end` up to the stack on every board.
 *
 * rdimon's crt0 does not copy .data: the linker scripts give .data LMA == VMA, so the ELF loader
 * (QEMU, or a debugger) puts initialised data straight where it is used.
 *
 * Any fault prints its name over semihosting and exits with a failure status, so a crashing test
 * fails at once instead of spinning until the emulator's time limit.
 *
 * The toolchain file compiles this file into every executable; it is C99 apart from __asm__ and
 * __attribute__, which GCC accepts under -pedantic.
 */
#include <stdint.h>

/* Provided by the linker script: top of the initial stack (crt0 moves SP again later). */
extern char __qacc_initial_sp[];

/* newlib / libgloss rdimon crt0 entry. */
extern void _start(void);

void qacc_reset_handler(void);
void _stack_init(void);
void qacc_nmi_handler(void);
void qacc_hardfault_handler(void);
void qacc_memmanage_handler(void);
void qacc_busfault_handler(void);
void qacc_usagefault_handler(void);
void qacc_securefault_handler(void);
void qacc_default_handler(void);

typedef void (*qacc_handler)(void);

/* The 16 architectural exception entries; external IRQs are not used by test binaries. */
struct qacc_vector_table {
    void *initial_sp;
    qacc_handler handlers[15];
};

__attribute__((section(".vectors"), used)) const struct qacc_vector_table qacc_vectors = {
    __qacc_initial_sp,
    {
        qacc_reset_handler,       /* 1  Reset */
        qacc_nmi_handler,         /* 2  NMI */
        qacc_hardfault_handler,   /* 3  HardFault */
        qacc_memmanage_handler,   /* 4  MemManage */
        qacc_busfault_handler,    /* 5  BusFault */
        qacc_usagefault_handler,  /* 6  UsageFault */
        qacc_securefault_handler, /* 7  SecureFault (ARMv8-M), reserved before */
        0,                        /* 8  reserved */
        0,                        /* 9  reserved */
        0,                        /* 10 reserved */
        qacc_default_handler,     /* 11 SVCall */
        qacc_default_handler,     /* 12 DebugMonitor */
        0,                        /* 13 reserved */
        qacc_default_handler,     /* 14 PendSV */
        qacc_default_handler,     /* 15 SysTick */
    },
};

#define QACC_CPACR (*(volatile uint32_t *)0xE000ED88u)
#define QACC_CPACR_CP10_CP11_FULL (0xFu << 20)

/* Semihosting (ARM compatible): operation in r0, parameter in r1, trap with BKPT 0xAB. */
#define QACC_SEMI_SYS_WRITE0 0x04u
#define QACC_SEMI_SYS_EXIT 0x18u
#define QACC_ADP_STOPPED_RUNTIME_ERROR_UNKNOWN 0x20023u

static uint32_t qacc_semihost(uint32_t op, const void *arg)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

__attribute__((noreturn)) static void qacc_fault(const char *message)
{
    (void)qacc_semihost(QACC_SEMI_SYS_WRITE0, message);
    for (;;) {
        /* On 32-bit targets SYS_EXIT takes the reason code itself in r1. */
        (void)qacc_semihost(QACC_SEMI_SYS_EXIT,
                            (const void *)(uintptr_t)QACC_ADP_STOPPED_RUNTIME_ERROR_UNKNOWN);
    }
}

__attribute__((noreturn)) void qacc_reset_handler(void)
{
#if defined(__ARM_FP) || defined(__ARM_FEATURE_MVE)
    /* Full access to CP10 and CP11 (FPU, and MVE on ARMv8.1-M) before any such instruction. */
    QACC_CPACR |= QACC_CPACR_CP10_CP11_FULL;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
#endif
    _start();
    qacc_fault("qacc: _start returned\n");
}

/* Called by rdimon crt0 with nothing on the stack yet; must not touch the stack itself. */
__attribute__((naked)) void _stack_init(void)
{
    __asm__ volatile("movw r0, #:lower16:__stack\n\t"
                     "movt r0, #:upper16:__stack\n\t"
                     "mov sp, r0\n\t"
                     "movw r1, #:lower16:__heap_limit\n\t"
                     "movt r1, #:upper16:__heap_limit\n\t"
                     "str r0, [r1]\n\t"
                     "bx lr\n\t");
}

void qacc_nmi_handler(void) { qacc_fault("qacc: NMI\n"); }
void qacc_hardfault_handler(void) { qacc_fault("qacc: HardFault\n"); }
void qacc_memmanage_handler(void) { qacc_fault("qacc: MemManage fault\n"); }
void qacc_busfault_handler(void) { qacc_fault("qacc: BusFault\n"); }
void qacc_usagefault_handler(void) { qacc_fault("qacc: UsageFault\n"); }
void qacc_securefault_handler(void) { qacc_fault("qacc: SecureFault\n"); }
void qacc_default_handler(void) { qacc_fault("qacc: unexpected exception\n"); }
