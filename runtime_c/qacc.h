/*
 * qacc.h - the qacc C runtime: THE requantization and the accumulator helpers.
 *
 * This header mirrors codegen/core/formats.py line for line; the NumPy reference and the generated
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

/* Saturating instructions (SSAT / USAT: Armv7-M, Armv8-M Mainline, 32-bit Armv7-A and later). */
#if defined(__ARM_FEATURE_SAT) && !defined(__aarch64__)
#include <arm_acle.h>
#define QACC_HAVE_SSAT 1
#endif

/*
 * qacc_requantize in 32-bit arithmetic, for cores without cheap 64-bit shifts (Cortex-M4/M7).
 * Equal to qacc_requantize when |acc * mult| = P satisfies (codegen/backend/layouts.py
 * requant32_fits checks it per layer): shift > 0: P + 2^(shift-1) <= 2^31 - 1; shift <= 0:
 * shift > -31 and P * 2^-shift + 128 <= 2^31 - 1. No intermediate then leaves int32.
 */
static inline int8_t qacc_requantize32(int32_t acc, int32_t mult, int shift, int32_t zero_point,
                                       int32_t lo, int32_t hi)
{
    int32_t v = acc * mult;
    if (shift > 0) {
        v += (int32_t)1 << (shift - 1);
        v = v < 0 ? ~(~v >> shift) : v >> shift; /* floor division, no shift of a negative */
    } else {
        v *= (int32_t)1 << -shift;
    }
    v += zero_point;
#if defined(QACC_HAVE_SSAT)
    /* saturate(v, lo, hi) is saturate(SSAT(v, 8), lo, hi) since [lo, hi] lies inside the int8
       range: one instruction where [lo, hi] is the whole int8 range (SSAT #8) or [0, 127] (a
       ReLU: USAT #7); lo and hi are constants where this is inlined, so one branch remains */
    if (lo == -128 && hi == 127) {
        return (int8_t)__ssat(v, 8);
    }
    if (lo == 0 && hi == 127) {
        return (int8_t)__usat(v, 7);
    }
    v = __ssat(v, 8);
#endif
    return (int8_t)(v < lo ? lo : v > hi ? hi : v);
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

/* ------------------------------------------------------------------ division by a magic number */

/* Leading zero bits of x > 0 (one CLZ on ARM). */
static inline int qacc_clz32(uint32_t x)
{
#if defined(__GNUC__)
    return __builtin_clz(x);
#else
    int n = 0;
    while (!(x & 0x80000000u)) {
        x <<= 1;
        ++n;
    }
    return n;
#endif
}

/* The magic reciprocal m of a divisor d known only at run time, shared by many dividends n <
   2^bits (bits <= 30, d >= 2^(31 - bits)): with sh = bits - qacc_clz32(d) (>= 0),
   floor(n / d) = (uint32_t)(((uint64_t)n * m) >> 32) >> sh, a multiply-high and a shift
   (Granlund & Montgomery 1994; codegen/backend/layouts.py div_magic has the proof). m is
   ceil(2^(bits + 32) / v), v = d << clz(d) (top bit set): a 64 / 32-bit division with a
   quotient below 2^32, done in two 16-bit digits by two 32-bit divisions (Hacker's Delight,
   divlu), no 64-bit library call. Unsigned arithmetic wraps as intended (each remainder is
   below v). */
static inline uint32_t qacc_div_magic(uint32_t d, int bits)
{
    const uint32_t v = d << qacc_clz32(d);
    const uint32_t vh = v >> 16, vl = v & 0xFFFFu;
    const uint32_t u = (uint32_t)1 << bits; /* the dividend is u * 2^32, u < v */
    uint32_t q1, q0, r, rhat;

    q1 = u / vh; /* the high digit (<= 2^15: u <= 2^30, vh >= 2^15), at most 2 too large */
    rhat = u - q1 * vh;
    while (q1 * vl > (rhat << 16)) {
        --q1;
        rhat += vh;
        if (rhat > 0xFFFFu) {
            break;
        }
    }
    r = (u << 16) - q1 * v;
    q0 = r / vh; /* the low digit, at most 2 too large (and maybe 2^16 or more) */
    rhat = r - q0 * vh;
    while (q0 > 0xFFFFu || q0 * vl > (rhat << 16)) {
        --q0;
        rhat += vh;
        if (rhat > 0xFFFFu) {
            break;
        }
    }
    r = (r << 16) - q0 * v; /* the remainder of u * 2^32 / v */
    return (q1 << 16) + q0 + (r != 0u);
}

/* ------------------------------------------------------------------ packed sub-byte weights */

/*
 * Weights of at most 4 (2) bits are stored packed in flash (codegen/backend/layouts.py pack_bits):
 *   s4: two's complement nibbles, element 2i in bits 0..3 of byte i, element 2i+1 in bits 4..7;
 *   s2: two's complement bit pairs, element 4i+j in bits 2j..2j+1 of byte i.
 * Sign extension is (v ^ 2^(b-1)) - 2^(b-1) on the unsigned field v: no shift of a negative value.
 * On NEON and Helium (MVE) cores, whole bytes are unpacked 16 at a time: shift the field to the
 * top of each int8 lane, arithmetic shift right (a lane operation, defined for negative lanes),
 * and store the fields interleaved (VST2 / VST4) - the same values as the scalar code.
 */
#if defined(__ARM_FEATURE_MVE) && (__ARM_FEATURE_MVE & 1)
#include <arm_mve.h>
#define QACC_VECTOR_UNPACK 1
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#define QACC_VECTOR_UNPACK 1
#endif

/* Element i of an s4 array. */
static inline int8_t qacc_s4_at(const uint8_t *src, int32_t i)
{
    const unsigned v = ((unsigned)src[i >> 1] >> (4u * ((unsigned)i & 1u))) & 0xFu;
    return (int8_t)((int)(v ^ 0x8u) - 8);
}

/* Element i of an s2 array. */
static inline int8_t qacc_s2_at(const uint8_t *src, int32_t i)
{
    const unsigned v = ((unsigned)src[i >> 2] >> (2u * ((unsigned)i & 3u))) & 0x3u;
    return (int8_t)((int)(v ^ 0x2u) - 2);
}

/* dst[0..n) = elements first..first+n-1 of the s4 array src, as int8 (first, n >= 0). */
static inline void qacc_unpack_s4(int8_t *dst, const uint8_t *src, int32_t first, int32_t n)
{
    int32_t i = 0;
    if (n > 0 && (first & 1)) { /* an odd start: the high nibble of the first byte */
        dst[i++] = qacc_s4_at(src, first);
    }
#ifdef QACC_VECTOR_UNPACK
    for (; i + 32 <= n; i += 32) { /* 16 bytes: the low nibbles, the high nibbles, interleaved */
        const int8x16_t b = vreinterpretq_s8_u8(vld1q_u8(src + ((first + i) >> 1)));
        int8x16x2_t v;
        v.val[0] = vshrq_n_s8(vshlq_n_s8(b, 4), 4);
        v.val[1] = vshrq_n_s8(b, 4);
        vst2q_s8(dst + i, v);
    }
#endif
    for (; i + 2 <= n; i += 2) { /* whole bytes: low nibble, then high nibble */
        const unsigned b = src[(first + i) >> 1];
        dst[i] = (int8_t)((int)((b & 0xFu) ^ 0x8u) - 8);
        dst[i + 1] = (int8_t)((int)((b >> 4) ^ 0x8u) - 8);
    }
    if (i < n) {
        dst[i] = qacc_s4_at(src, first + i);
    }
}

/* dst[0..n) = elements first..first+n-1 of the s2 array src, as int8 (first, n >= 0). */
static inline void qacc_unpack_s2(int8_t *dst, const uint8_t *src, int32_t first, int32_t n)
{
    /* up to 3 fields before the first whole byte, up to 3 after the last (no loops: GCC's
       -Waggressive-loop-optimizations misjudges a tail loop's trip count once inlined) */
    const int32_t head = (int32_t)((4u - ((unsigned)first & 3u)) & 3u);
    const int32_t h = head < n ? head : n;
    int32_t i;
    if (h > 0) {
        dst[0] = qacc_s2_at(src, first);
    }
    if (h > 1) {
        dst[1] = qacc_s2_at(src, first + 1);
    }
    if (h > 2) {
        dst[2] = qacc_s2_at(src, first + 2);
    }
    i = h;
#ifdef QACC_VECTOR_UNPACK
    for (; i + 64 <= n; i += 64) { /* 16 bytes: fields 0, 1, 2, 3 of each, interleaved */
        const int8x16_t b = vreinterpretq_s8_u8(vld1q_u8(src + ((first + i) >> 2)));
        int8x16x4_t v;
        v.val[0] = vshrq_n_s8(vshlq_n_s8(b, 6), 6);
        v.val[1] = vshrq_n_s8(vshlq_n_s8(b, 4), 6);
        v.val[2] = vshrq_n_s8(vshlq_n_s8(b, 2), 6);
        v.val[3] = vshrq_n_s8(b, 6);
        vst4q_s8(dst + i, v);
    }
#endif
    for (; i + 4 <= n; i += 4) { /* whole bytes: four fields, lowest first */
        const unsigned b = src[(first + i) >> 2];
        dst[i] = (int8_t)((int)((b & 0x3u) ^ 0x2u) - 2);
        dst[i + 1] = (int8_t)((int)(((b >> 2) & 0x3u) ^ 0x2u) - 2);
        dst[i + 2] = (int8_t)((int)(((b >> 4) & 0x3u) ^ 0x2u) - 2);
        dst[i + 3] = (int8_t)((int)((b >> 6) ^ 0x2u) - 2);
    }
    if (i < n) {
        dst[i] = qacc_s2_at(src, first + i);
    }
    if (i + 1 < n) {
        dst[i + 1] = qacc_s2_at(src, first + i + 1);
    }
    if (i + 2 < n) {
        dst[i + 2] = qacc_s2_at(src, first + i + 2);
    }
}

/* The same for `bits` = 4 or 2, into int16 (the NEON GEMM's weight type), through int8 chunks
   of 64 on the stack. */
static inline void qacc_unpack_s16(int16_t *dst, const uint8_t *src, int32_t first, int32_t n,
                                   int bits)
{
    int8_t t[64];
    int32_t i, j;
    for (i = 0; i < n; i += 64) {
        const int32_t m = n - i < 64 ? n - i : 64;
        if (bits == 2) {
            qacc_unpack_s2(t, src, first + i, m);
        } else {
            qacc_unpack_s4(t, src, first + i, m);
        }
        for (j = 0; j < m; ++j) {
            dst[i + j] = t[j];
        }
    }
}

#endif /* QACC_H */
