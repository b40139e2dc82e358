/*
 * Fixture for tests/targets/test_targets.py: an int8 dot product through the core's vector dot-product
 * instruction — MVE VMLADAVA.S8 on Cortex-M55 (Helium), NEON SDOT on Cortex-A76 (dotprod) — and
 * the same sum in scalar C. Prints "<path> <vector result> <scalar result>" and exits 0 when
 * they agree.
 */
#include <stdint.h>
#include <stdio.h>

#if defined(__ARM_FEATURE_MVE) && (__ARM_FEATURE_MVE & 1)
#include <arm_mve.h>
#define PATH "mve"
#elif defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define PATH "sdot"
#else
#error "dot_s8.c needs MVE (Cortex-M55) or the dot-product extension (Cortex-A76)"
#endif

#define N 64 /* a multiple of 16 */

static int8_t a[N];
static int8_t b[N];

static int32_t dot_vector(const int8_t *x, const int8_t *y, int n)
{
    int i;
#if defined(__ARM_FEATURE_MVE)
    int32_t acc = 0;
    for (i = 0; i < n; i += 16) {
        acc = vmladavaq_s8(acc, vld1q_s8(x + i), vld1q_s8(y + i));
    }
    return acc;
#else
    int32x4_t acc = vdupq_n_s32(0);
    for (i = 0; i < n; i += 16) {
        acc = vdotq_s32(acc, vld1q_s8(x + i), vld1q_s8(y + i));
    }
    return vaddvq_s32(acc);
#endif
}

static int32_t dot_scalar(const int8_t *x, const int8_t *y, int n)
{
    int32_t acc = 0;
    int i;
    for (i = 0; i < n; i++) {
        acc += (int32_t)x[i] * (int32_t)y[i];
    }
    return acc;
}

int main(void)
{
    int i;
    int32_t v;
    int32_t s;

    for (i = 0; i < N; i++) {
        a[i] = (int8_t)((int)((unsigned)(i * 37 + 11) % 256u) - 128);
        b[i] = (int8_t)((int)((unsigned)(i * 91 + 5) % 256u) - 128);
    }
    v = dot_vector(a, b, N);
    s = dot_scalar(a, b, N);
    printf("%s %ld %ld\n", PATH, (long)v, (long)s);
    return v == s ? 0 : 1;
}
