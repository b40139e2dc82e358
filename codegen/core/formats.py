"""THE number semantics of qacc: quantization, wrapping and requantization.

Every integer that the NumPy reference or the generated C computes is defined here. The C runtime
(`runtime_c/qacc.h`) mirrors `requantize` line for line; any other rounding rule is a named mode in
both places, never an accident of one kernel.

Conventions
-----------
* A value `q` of a tensor in format `QFormat(bits, signed, frac, zero_point)` means
  `real = (q - zero_point) * 2**-frac` (power-of-two scale) or `(q - zero_point) * scale` (dyadic).
* Containers are 8-bit: signed formats hold [-2^(b-1), 2^(b-1)-1]; unsigned formats hold
  [0, 2^b - 1] with b <= 7 so that every activation fits an int8 lane. Weights are symmetric,
  [-(2^(b-1)-1), 2^(b-1)-1], so no product pair of -128 * -128 exists.
* Accumulation wraps modulo 2^A (two's complement). The reference sums exactly in int64 and wraps
  once; the order of summation does not matter.
* Requantization: v = acc * mult; v = round_shift(v, shift) (round half up: add 2^(s-1), then an
  arithmetic shift; a negative shift is an exact left shift); v += zero_point; saturate to [lo, hi].
"""

from __future__ import annotations

import math
from typing import Final, cast

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]

ROUNDING_MODE: Final = "half_up"
"""The only rounding mode: round half up (toward +inf on ties), as `floor(x + 0.5)`."""

MAX_LEFT_SHIFT: Final = 31
"""The most a requantization may shift left; keeps |acc * mult << s| inside int64."""


def wrap(x: npt.ArrayLike, bits: int) -> IntArray:
    """Reduce exact integers modulo 2^bits into the signed range [-2^(bits-1), 2^(bits-1)-1]."""
    if not 1 <= bits <= 63:
        raise ValueError(f"wrap width must be 1..63 bits, got {bits}")
    a = np.asarray(x, dtype=np.int64)
    half = np.int64(1) << np.int64(bits - 1)
    mask = (np.int64(1) << np.int64(bits)) - 1
    return ((a + half) & mask) - half


def round_shift(x: npt.ArrayLike, shift: npt.ArrayLike) -> IntArray:
    """Divide by 2^shift rounding half up; a shift <= 0 multiplies by 2^-shift exactly.

    `shift` may be a scalar or broadcast against `x` (per-channel shifts on the last axis).
    Computed as ((x << left) + half) >> right, where one of left/right is 0 per channel and
    half = 2^(right-1) (0 when right is 0); numpy's >> on int64 is an arithmetic (floor) shift.
    """
    a = np.asarray(x, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64)
    if s.size and (s.min() < -MAX_LEFT_SHIFT or s.max() > 62):
        raise ValueError(f"shift out of range [-{MAX_LEFT_SHIFT}, 62]")
    if s.size == 1 or bool(np.all(s == s.flat[0])):
        s0 = int(s.flat[0])
        if s0 > 0:
            return (a + (1 << (s0 - 1))) >> s0
        return a * (1 << -s0)  # exact left shift (numpy int64 arithmetic)
    right = np.maximum(s, 0)
    left = np.maximum(-s, 0)
    half = np.left_shift(np.ones_like(right), right) >> 1
    return cast(IntArray, ((a << left) + half) >> right)  # numpy's stubs lose the dtype


def saturate(x: npt.ArrayLike, lo: npt.ArrayLike, hi: npt.ArrayLike) -> IntArray:
    return np.clip(np.asarray(x, dtype=np.int64), lo, hi)


def requantize(
    acc: npt.ArrayLike,
    mult: npt.ArrayLike,
    shift: npt.ArrayLike,
    zero_point: int,
    lo: int,
    hi: int,
) -> IntArray:
    """THE requantization: saturate(round_shift(acc * mult, shift) + zero_point, lo, hi).

    `acc` is the (already wrapped) accumulator; `mult` and `shift` broadcast against it (per output
    channel on the last axis). Mirrored by `qacc_requantize` in runtime_c/qacc.h.
    """
    v = np.asarray(acc, dtype=np.int64)
    m = np.asarray(mult, dtype=np.int64)
    if not bool(np.all(m == 1)):
        v = v * m
    v = round_shift(v, shift)
    if zero_point:
        v = v + zero_point
    return saturate(v, lo, hi)


def round_half_up(x: npt.ArrayLike) -> IntArray:
    """Round reals to integers, ties toward +inf: the float-side twin of `round_shift`."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def quantize(x: npt.ArrayLike, frac: int, lo: int, hi: int, zero_point: int = 0) -> IntArray:
    """Real values to integers of a power-of-two format: saturate(round(x * 2^frac) + zp)."""
    scaled = np.asarray(x, dtype=np.float64) * math.ldexp(1.0, frac)
    return saturate(round_half_up(scaled) + zero_point, lo, hi)


def dequantize(
    q: npt.ArrayLike, frac: npt.ArrayLike, zero_point: int = 0
) -> npt.NDArray[np.float64]:
    f = np.asarray(frac, dtype=np.float64)
    return (np.asarray(q, dtype=np.float64) - zero_point) * np.exp2(-f)


def int_range(bits: int, signed: bool, symmetric: bool = False) -> tuple[int, int]:
    """The integer range of a format: signed two's complement, symmetric signed, or unsigned."""
    if signed:
        hi = (1 << (bits - 1)) - 1
        return (-hi if symmetric else -hi - 1), hi
    return 0, (1 << bits) - 1


def frac_for_range(max_abs: float, bits: int, signed: bool) -> int:
    """The largest fractional length whose format still represents `max_abs` without saturating.

    Power-of-two formats: the representable maximum is (2^(bits-1)-1) * 2^-frac for signed and
    (2^bits - 1) * 2^-frac for unsigned. A zero range gets the frac of a unit range.
    """
    _, hi = int_range(bits, signed)
    if not math.isfinite(max_abs):
        raise ValueError("range must be finite")
    if max_abs <= 0:
        max_abs = 1.0
    return math.floor(math.log2(hi / max_abs))


def bits_for_values(q: npt.ArrayLike) -> int:
    """Signed bits needed to hold the integers `q` in a symmetric format (at least 1)."""
    m = int(np.max(np.abs(np.asarray(q, dtype=np.int64)), initial=0))
    return m.bit_length() + 1


def tile_bounds(q: IntArray, xmin: int, xmax: int, tile: int) -> tuple[IntArray, IntArray]:
    """Exact (lo, hi) of every tile sum of every channel, (O, ceil(K / T)); q is (O, K). The bias
    belongs to the second stage, not to a tile."""
    q = q.reshape(q.shape[0], -1).astype(np.int64)
    o, k = q.shape
    a, b = q * xmin, q * xmax
    pad = -k % tile
    lo = np.pad(np.minimum(a, b), ((0, 0), (0, pad))).reshape(o, -1, tile).sum(axis=2)
    hi = np.pad(np.maximum(a, b), ((0, 0), (0, pad))).reshape(o, -1, tile).sum(axis=2)
    return lo, hi
