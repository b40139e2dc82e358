/*
 * A firmware-style application around a qacc model: one inference on an input that is compiled
 * into flash, the class and the integer logits printed, the time taken in core cycles where the
 * core has a cycle counter.
 *
 * The model comes from `qacc compile ... --name net --target cortex-m4` (CMakeLists.txt adds its
 * output directory with add_subdirectory and links the static library `net`); its whole API is
 * net.h: qacc_net_run() and the QACC_NET_* size and format macros. No malloc: the model has one
 * static arena of QACC_NET_ARENA_BYTES bytes inside libnet.a, the output buffer is ours.
 *
 * printf goes over semihosting here (newlib's rdimon, set up by qacc's cortex-m toolchain file and
 * startup code, which is what QEMU shows); on a board, retarget _write() to your UART instead.
 */
#include <stdint.h>
#include <stdio.h>

#include "net.h"
#include "qacc_cycles.h"
#include "sample_input.h"

/* The embedded sample must have exactly the model's input size (a C99 compile-time check). */
typedef char qacc_example_input_size_check[(sizeof sample_input == QACC_NET_INPUT_SIZE) ? 1 : -1];

static int8_t logits[QACC_NET_OUTPUT_SIZE];

int main(void)
{
    uint32_t start;
    uint32_t cycles;
    int best = 0;
    int i;

    start = qacc_cycles();
    if (qacc_net_run(sample_input, logits) != 0) {
        printf("qacc_net_run failed\n");
        return 1;
    }
    cycles = qacc_cycles() - start; /* wraps: subtract as uint32_t */

    /* The first largest logit wins, as numpy.argmax on the reference's output. */
    for (i = 1; i < QACC_NET_OUTPUT_SIZE; ++i) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    printf("logits:");
    for (i = 0; i < QACC_NET_OUTPUT_SIZE; ++i) {
        printf(" %d", logits[i]);
    }
    printf("\nclass: %d\n", best);
    if (qacc_cycles_available()) {
        printf("cycles: %lu\n", (unsigned long)cycles);
    } else {
        printf("cycles: n/a (no DWT cycle counter on this core or emulator)\n");
    }
    return 0;
}
