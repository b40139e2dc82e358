/*
 * Fixture for tests/targets/test_targets.py (Cortex-M only): the DWT cycle counter helper links in
 * through the toolchain file. QEMU does not model the DWT, so it must report "no counter" and 0.
 * Prints "available <0|1> cycles <n>" and exits 0.
 */
#include <stdio.h>

#include "qacc_cycles.h"

int main(void)
{
    int available = qacc_cycles_available();
    unsigned long cycles = (unsigned long)qacc_cycles();
    printf("available %d cycles %lu\n", available, cycles);
    return 0;
}
