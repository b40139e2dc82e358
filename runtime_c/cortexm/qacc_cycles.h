/*
 * Cycle counter for Cortex-M test binaries: DWT->CYCCNT where the core has it.
 *
 * qacc_cycles() returns the free-running 32-bit core cycle count (it wraps; subtract two readings
 * as uint32_t). It returns 0 when there is no usable counter: QEMU does not model the DWT (its PPB
 * reads as zero there), and some cores are built without CYCCNT. On QEMU, count instructions with
 * the TCG plugin instead (codegen/targets/qemu.py).
 */
#ifndef QACC_CYCLES_H
#define QACC_CYCLES_H

#include <stdint.h>

/* Enables the counter on the first call. Nonzero when the core counts cycles. */
int qacc_cycles_available(void);

/* Current cycle count, or 0 when qacc_cycles_available() is 0. */
uint32_t qacc_cycles(void);

#endif /* QACC_CYCLES_H */
