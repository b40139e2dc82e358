/*
 * Fixture for tests/targets/test_targets.py: a checksum computed in three phases, with qacc_mark()
 * between them so that the QEMU instruction-count plugin can measure each phase.
 * Phase 1 runs n iterations, phase 2 runs 2n, n = argv[1] (default 1000).
 * Prints "phase1 <hex> phase2 <hex> n <n>" and exits 0.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* The marker: its entry address is what the plugin watches. Must stay a real call. */
__attribute__((noinline)) void qacc_mark(int id);
__attribute__((noinline)) void qacc_mark(int id)
{
    __asm__ volatile("" : : "r"(id) : "memory");
}

static uint32_t checksum(uint32_t seed, long n)
{
    uint32_t x = seed;
    uint32_t h = 2166136261u;
    long i;

    for (i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        h ^= (x >> 7) + (h << 5) + (h >> 2);
        h *= 16777619u;
    }
    return h;
}

int main(int argc, char **argv)
{
    long n = 1000;
    uint32_t a;
    uint32_t b;

    if (argc > 1) {
        n = strtol(argv[1], NULL, 10);
    }
    if (n <= 0) {
        fprintf(stderr, "usage: phases [n > 0]\n");
        return 2;
    }
    qacc_mark(0);
    a = checksum(12345u, n);
    qacc_mark(1);
    b = checksum(a, 2 * n);
    qacc_mark(2);
    printf("phase1 %08" PRIx32 " phase2 %08" PRIx32 " n %ld\n", a, b, n);
    return 0;
}
