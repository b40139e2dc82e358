/*
 * qacc.h - the qacc C runtime: THE requantization and the accumulator helpers.
 *
 * This header mirrors codegen/quant/formats.py line for line; the NumPy reference and the generated
 * C therefore compute the same integers. It is portable C99:
 *   - accumulators are unsigned containers (uint16_t for A <= 16, uint32_t for A <= 32) that wrap
 *     modulo 2^16 / 2^32; qacc_wrap16/qacc_wrap32 then reduce to A bits and sign-extend, exactly
 *     like formats.wrap; no signed overflow is ever relied upon;
 *   - 64-bit intermediates wrap like NumPy int64 (unsigned arithmetic, portable conversion back);
 *   - no right shift of a negative value and no left shift of a negative value is performed:
 *     floor division by 2^s is written with the bitwise complement (~(~x >> s)), which is exact
 *     for the two's complement int64_t that C99 guarantees.
 */
#ifndef QACC_H
#define QACC_H

#include <stdint.h>

#define QACC_RUNTIME_VERSION 1

/* ------------------------------------------------------------------ 64-bit wrapping arithmetic */

/* uint64_t -> int64_t modulo 2^64 without implementation-defined conversion. */
static inline int64_t qacc_u2s64(uint64_t u)
{
    return u <= (uint64_t)INT64_MAX ? (int64_t)u : -(int64_t)(~u) - 1;
}

/* x + y modulo 2^64 (NumPy int64 addition). */
static inline int64_t qacc_add64(int64_t x, int64_t y)
{
    return qacc_u2s64((uint64_t)x + (uint64_t)y);
}

/* x * y modulo 2^64 (NumPy int64 multiplication). */
static inline int64_t qacc_mul64(int64_t x, int64_t y)
{
    return qacc_u2s64((uint64_t)x * (uint64_t)y);
}

/* x << s modulo 2^64, 0 <= s <= 63, for any sign of x (NumPy int64 left shift). */
static inline int64_t qacc_shl64(int64_t x, int s)
{
    return qacc_u2s64((uint64_t)x << s);
}

/* floor(x / 2^s), 0 <= s <= 63: an arithmetic right shift that never shifts a negative value. */
static inline int64_t qacc_asr64(int64_t x, int s)
{
    return x < 0 ? ~(~x >> s) : x >> s;
}

/* ------------------------------------------------------------------ formats.py, line for line */

/* formats.wrap for a 16-bit container: ((a + half) & mask) - half, 1 <= bits <= 16. */
static inline int32_t qacc_wrap16(uint16_t acc, int bits)
{
    const uint32_t half = (uint32_t)1 << (bits - 1);
    const uint32_t mask = ((uint32_t)1 << bits) - 1u;
    return (int32_t)((acc + half) & mask) - (int32_t)half;
}

/* formats.wrap for a 32-bit container: ((a + half) & mask) - half, 1 <= bits <= 32. */
static inline int32_t qacc_wrap32(uint32_t acc, int bits)
{
    const uint32_t half = (uint32_t)1 << (bits - 1);
    const uint32_t mask = bits >= 32 ? UINT32_MAX : ((uint32_t)1 << bits) - 1u;
    return (int32_t)((int64_t)((acc + half) & mask) - (int64_t)half);
}

/* formats.round_shift: divide by 2^shift rounding half up; shift <= 0 multiplies by 2^-shift. */
static inline int64_t qacc_round_shift(int64_t x, int shift)
{
    if (shift > 0) {
        const int64_t half = (int64_t)1 << (shift - 1); /* half = 1 << (right - 1) */
        return qacc_asr64(qacc_add64(x, half), shift);  /* (a + half) >> right */
    }
    return qacc_shl64(x, -shift); /* a << left */
}

/* formats.saturate: np.clip(x, lo, hi) == min(max(x, lo), hi). */
static inline int64_t qacc_saturate(int64_t x, int32_t lo, int32_t hi)
{
    int64_t v = x < lo ? (int64_t)lo : x;
    v = v > hi ? (int64_t)hi : v;
    return v;
}

/*
 * formats.requantize: saturate(round_shift(acc * mult, shift) + zero_point, lo, hi).
 * `acc` is the already wrapped accumulator; [lo, hi] lies inside the int8 container.
 */
static inline int8_t qacc_requantize(int64_t acc, int64_t mult, int shift, int32_t zero_point,
                                     int32_t lo, int32_t hi)
{
    int64_t v = qacc_mul64(acc, mult);                      /* v = acc * mult */
    v = qacc_round_shift(v, shift);                         /* v = round_shift(v, shift) */
    return (int8_t)qacc_saturate(qacc_add64(v, zero_point), lo, hi); /* saturate(v + zp) */
}

/* ------------------------------------------------------------------ accumulator containers */

/* Products and sums in the container, modulo 2^16 / 2^32 (no promotion to signed int overflow). */
static inline uint16_t qacc_mul_u16(uint16_t a, uint16_t b)
{
    return (uint16_t)((uint32_t)a * (uint32_t)b);
}

static inline uint32_t qacc_mul_u32(uint32_t a, uint32_t b)
{
    return (uint32_t)(a * b);
}

#endif /* QACC_H */
