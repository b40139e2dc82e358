/* DWT cycle counter (ARMv7-M / ARMv8-M Debug: DEMCR, DWT_CTRL, DWT_CYCCNT). See qacc_cycles.h. */
#include "qacc_cycles.h"

#define QACC_DEMCR (*(volatile uint32_t *)0xE000EDFCu)
#define QACC_DWT_CTRL (*(volatile uint32_t *)0xE0001000u)
#define QACC_DWT_CYCCNT (*(volatile uint32_t *)0xE0001004u)

#define QACC_DEMCR_TRCENA (1u << 24)
#define QACC_DWT_CTRL_NOCYCCNT (1u << 25)
#define QACC_DWT_CTRL_CYCCNTENA (1u << 0)

static int qacc_cycles_state = -1; /* -1 not probed yet, 0 absent, 1 counting */

int qacc_cycles_available(void)
{
    if (qacc_cycles_state < 0) {
        QACC_DEMCR |= QACC_DEMCR_TRCENA;
        if ((QACC_DWT_CTRL & QACC_DWT_CTRL_NOCYCCNT) != 0u) {
            qacc_cycles_state = 0;
        } else {
            QACC_DWT_CYCCNT = 0u;
            QACC_DWT_CTRL |= QACC_DWT_CTRL_CYCCNTENA;
            /* A real DWT reads the enable bit back; QEMU's unmodelled DWT reads as zero. */
            qacc_cycles_state = (QACC_DWT_CTRL & QACC_DWT_CTRL_CYCCNTENA) != 0u ? 1 : 0;
        }
    }
    return qacc_cycles_state;
}

uint32_t qacc_cycles(void)
{
    return qacc_cycles_available() ? QACC_DWT_CYCCNT : 0u;
}
