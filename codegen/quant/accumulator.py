"""Accumulator bounds and the choice of weight formats under an accumulator width (seed 000).

For an output channel with integer weights q_k, integer bias b (in accumulator units) and inputs in
[xmin, xmax], the exact weight-aware bound of the sum is

    hi = b + sum_k max(q_k * xmin, q_k * xmax)      lo = b + sum_k min(q_k * xmin, q_k * xmax)

(for unsigned inputs: hi = b + xmax * sum_{q>0} q, lo = b - xmax * sum_{q<0} |q|). A layer is
`guaranteed` overflow-free at width A when -2^(A-1) <= lo and hi <= 2^(A-1) - 1 for every channel.
`profiled` replaces the bound by the observed maximum |sum| on calibration data times a margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from codegen.core.formats import IntArray, round_half_up
from codegen.core.formats import tile_bounds as tile_bounds  # the reference's tiles

Policy = Literal["guaranteed", "profiled"]
POLICIES: tuple[Policy, ...] = ("guaranteed", "profiled")

WEIGHT_BITS = 8
"""Weight container: int8, symmetric [-127, 127]."""

MIN_BITS = 2
"""A configuration is feasible only if inputs and weights keep at least this many bits."""

_FRAC_SEARCH = range(40, -41, -1)


def acc_limits(acc_bits: int) -> tuple[int, int]:
    return -(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1


def channel_bounds(
    q: npt.NDArray[np.int64], bias: IntArray, xmin: int, xmax: int
) -> tuple[IntArray, IntArray]:
    """Exact (lo, hi) of every channel's sum over all inputs in [xmin, xmax]; q is (O, K)."""
    q = q.reshape(q.shape[0], -1).astype(np.int64)
    a, b = q * xmin, q * xmax
    return bias + np.minimum(a, b).sum(axis=1), bias + np.maximum(a, b).sum(axis=1)


@dataclass(frozen=True)
class WeightQuant:
    """Integer weights of one layer and the formats they were chosen under."""

    q: IntArray  # (O, ...) integers in [-127, 127]
    frac: IntArray  # (O,) weight fractional lengths
    bias: IntArray  # (O,) bias in accumulator units, 2^-(input_frac + frac)
    input_frac: int
    bound_lo: IntArray  # (O,) the guaranteed bound of each channel's sum
    bound_hi: IntArray

    @property
    def bits(self) -> int:
        """Signed bits that the largest weight needs (the effective weight width)."""
        return int(np.abs(self.q).max(initial=0)).bit_length() + 1

    def dequantized(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        scale = np.exp2(-self.frac.astype(np.float64))
        w = self.q.astype(np.float64) * scale.reshape((-1,) + (1,) * (self.q.ndim - 1))
        b = self.bias.astype(np.float64) * np.exp2(
            -(self.frac + self.input_frac).astype(np.float64)
        )
        return w, b


def quantize_at(
    w: npt.NDArray[np.float64], b: npt.NDArray[np.float64], frac: IntArray, input_frac: int
) -> tuple[IntArray, IntArray]:
    """Round-to-nearest (half up) weights and bias at per-channel fractional lengths."""
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = round_half_up(w * np.exp2(frac.astype(np.float64)).reshape(shape))
    return q, _bias_at(b, frac, input_frac)


def _bias_at(b: npt.NDArray[np.float64], frac: IntArray | int, input_frac: int) -> IntArray:
    """The bias rounded (half up) in accumulator units 2^-(frac + input_frac)."""
    return round_half_up(b * np.exp2((np.asarray(frac) + input_frac).astype(np.float64)))


def _sum_bounds(
    bq: IntArray, pos: IntArray, neg: IntArray, xmin: int, xmax: int
) -> tuple[IntArray, IntArray]:
    """`channel_bounds` from each channel's sums of positive (pos) and negative (neg) integer
    weights: lo = b + xmin S+ + xmax S-, hi = b + xmax S+ + xmin S- (xmin <= xmax)."""
    return bq + (xmin * pos + xmax * neg), bq + (xmax * pos + xmin * neg)


class LayerWeights:
    """One layer's float weights (O, ...) and what the weight-format search reads of them,
    computed once for all the calls on that layer (`choose_weight_fracs`, `weight_formats` and
    `quantize_weights` take one in place of the array; the search tries many input formats
    per layer):

    - per channel, max |w| and the L1 norm (`_frac_ceilings`);
    - per fractional length f and channel, the nearest-rounded integers' largest magnitude and
      their sums of positive and of negative values, for the channels asked for: the exact
      bound of `channel_bounds` is lo = b + xmin S+ + xmax S-, hi = b + xmax S+ + xmin S-
      (xmin <= xmax), so no candidate rounds the whole matrix again to test a length;

    Every value is the one the plain computation gives (the same float products, the same
    rounding, exact integer sums)."""

    def __init__(self, w: npt.NDArray[np.float64]):
        self.w = np.asarray(w, dtype=np.float64)
        self.flat = self.w.reshape(self.w.shape[0], -1)
        mag = np.abs(self.flat)
        self.absmax = mag.max(axis=1, initial=0)
        self.l1 = mag.sum(axis=1)
        # f -> (rows done, max |q|, S+, S-), each (O,)
        self._sums: dict[int, tuple[npt.NDArray[np.bool_], IntArray, IntArray, IntArray]] = {}

    def at(self, f: int, rows: IntArray) -> tuple[IntArray, IntArray, IntArray]:
        """(max |q|, S+, S-) of channels `rows` of the weights rounded at fractional length f."""
        if f not in self._sums:
            o = self.flat.shape[0]
            ints = (np.zeros(o, dtype=np.int64) for _ in "mpn")
            self._sums[f] = (np.zeros(o, dtype=bool), next(ints), next(ints), next(ints))
        done, maxq, pos, neg = self._sums[f]
        todo = rows[~done[rows]]
        if len(todo):
            q = round_half_up(self.flat[todo] * np.exp2(float(f)))
            mag = np.abs(q)
            total, size = q.sum(axis=1), mag.sum(axis=1)
            maxq[todo] = mag.max(axis=1, initial=0)
            pos[todo], neg[todo] = (total + size) // 2, (total - size) // 2
            done[todo] = True
        return maxq[rows], pos[rows], neg[rows]

    def at_each(self, frac: IntArray) -> tuple[IntArray, IntArray, IntArray]:
        """`at` of every channel at its own length frac[channel]."""
        out = tuple(np.zeros(len(frac), dtype=np.int64) for _ in "mpn")
        for f in np.unique(frac):
            rows = np.flatnonzero(frac == f)
            for o, v in zip(out, self.at(int(f), rows), strict=True):
                o[rows] = v
        return out  # type: ignore[return-value]


def choose_weight_fracs(
    w: npt.NDArray[np.float64] | LayerWeights,
    b: npt.NDArray[np.float64],
    input_frac: int,
    xmin: int,
    xmax: int,
    acc_bits: int,
    policy: Policy = "guaranteed",
    observed_max: npt.NDArray[np.float64] | None = None,
    margin: float = 2.0,
    tile: tuple[int, int] | None = None,
) -> IntArray:
    """The largest per-channel weight fractional length that fits both int8 and the accumulator.

    `tile` = (T, acc2_bits): two stages; the whole sum (bias included) must fit acc2_bits and,
    by the exact bound, every tile of T terms must fit acc_bits.

    `guaranteed`: the exact bound of the rounded weights and bias fits A bits. `profiled`: the
    observed max |pre-activation| (real units) times `margin` fits A bits. Channels that fit at no
    length get the smallest one tried (they will be flagged infeasible by `feasible`).
    """
    layer = w if isinstance(w, LayerWeights) else LayerWeights(w)
    o = layer.flat.shape[0]
    acc_lo, acc_hi = acc_limits(acc_bits if tile is None else tile[1])
    tile_lo, tile_hi = acc_limits(acc_bits)
    qmax = (1 << (WEIGHT_BITS - 1)) - 1
    top = _frac_ceilings(layer, b, input_frac, xmin, xmax, acc_hi, policy, observed_max, margin)
    chosen = np.full(o, _FRAC_SEARCH[-1], dtype=np.int64)
    done = np.zeros(o, dtype=bool)
    for f in _FRAC_SEARCH:
        rows = np.flatnonzero(~done & (top >= f))  # the others cannot fit at f (or are done)
        if len(rows) == 0:
            continue
        maxq, pos, neg = layer.at(f, rows)
        bq = _bias_at(b[rows], f, input_frac)
        ok = maxq <= qmax
        if policy == "guaranteed":
            lo, hi = _sum_bounds(bq, pos, neg, xmin, xmax)
            ok &= (lo >= acc_lo) & (hi <= acc_hi)
        else:
            assert observed_max is not None, "profiled policy needs observed ranges"
            seen = observed_max[rows] if np.ndim(observed_max) else observed_max
            peak = seen * np.exp2(float(f + input_frac)) * margin
            ok &= (peak <= acc_hi) & (np.abs(bq) <= acc_hi)
        if tile is not None:
            q, _ = quantize_at(
                layer.flat[rows], b[rows], np.full(len(rows), f, dtype=np.int64), input_frac
            )
            tlo, thi = tile_bounds(q, xmin, xmax, tile[0])
            ok &= (tlo.min(axis=1) >= tile_lo) & (thi.max(axis=1) <= tile_hi)
        chosen[rows[ok]] = f
        done[rows[ok]] = True
        if done.all():
            break
    return chosen


def _frac_ceilings(
    layer: LayerWeights,
    b: npt.NDArray[np.float64],
    input_frac: int,
    xmin: int,
    xmax: int,
    acc_hi: int,
    policy: Policy,
    observed_max: npt.NDArray[np.float64] | None,
    margin: float,
) -> npt.NDArray[np.float64]:
    """Per channel of the layer, a fractional length above which `choose_weight_fracs`'s test
    fails for sure (inf where no bound applies), one above the estimate for float safety: int8
    (|round(x)| <= 127 needs |x| < 127.5), the bias (|round(b 2^(f + fi))| <= 2^(A-1)), and
    `guaranteed`: hi - lo = (xmax - xmin) sum |q| <= 2^A - 1 with sum |q| >= 2^f L1 - K / 2;
    `profiled`: the observed peak."""
    k = layer.flat.shape[1]
    with np.errstate(divide="ignore"):
        bounds = [
            np.log2(128.0 / layer.absmax),
            np.log2((acc_hi + 2.0) / np.abs(b)) - input_frac,
        ]
        if policy == "guaranteed" and xmax > xmin:
            bounds.append(np.log2(((2.0 * acc_hi + 1) / (xmax - xmin) + k / 2) / layer.l1))
        elif policy == "profiled" and observed_max is not None:
            peak = np.broadcast_to(np.asarray(observed_max, dtype=np.float64) * margin, b.shape)
            bounds.append(np.log2(acc_hi / peak) - input_frac)
    return np.floor(np.minimum.reduce(bounds)) + 1


def feasible(q: IntArray, w: npt.NDArray[np.float64]) -> bool:
    """Every channel with a nonzero float weight keeps at least one nonzero integer weight."""
    o = q.shape[0]
    return _kept(np.abs(q.reshape(o, -1)).max(axis=1), np.abs(w.reshape(o, -1)).max(axis=1))


def _kept(maxq: IntArray, absmax: npt.NDArray[np.float64]) -> bool:
    """`feasible` from each channel's largest integer and largest float weight magnitude."""
    return bool(np.all((maxq >= (1 << (MIN_BITS - 2))) | ~(absmax > 0)))


def weight_formats(
    w: npt.NDArray[np.float64] | LayerWeights,
    b: npt.NDArray[np.float64],
    input_frac: int,
    xmin: int,
    xmax: int,
    acc_bits: int,
    policy: Policy = "guaranteed",
    observed_max: npt.NDArray[np.float64] | None = None,
    margin: float = 2.0,
    tile: tuple[int, int] | None = None,
) -> IntArray | None:
    """The formats of `quantize_weights` (`choose_weight_fracs`), or None where its weights are
    not `feasible`; decided from `LayerWeights`' sums, without rounding the whole matrix."""
    layer = w if isinstance(w, LayerWeights) else LayerWeights(w)
    frac = choose_weight_fracs(
        layer, b, input_frac, xmin, xmax, acc_bits, policy, observed_max, margin, tile
    )
    maxq, _, _ = layer.at_each(frac)
    return frac if _kept(maxq, layer.absmax) else None


def quantize_weights(
    w: npt.NDArray[np.float64] | LayerWeights,
    b: npt.NDArray[np.float64],
    input_frac: int,
    xmin: int,
    xmax: int,
    acc_bits: int,
    policy: Policy = "guaranteed",
    observed_max: npt.NDArray[np.float64] | None = None,
    margin: float = 2.0,
    tile: tuple[int, int] | None = None,
) -> WeightQuant | None:
    """Round-to-nearest weights at the largest formats the accumulator allows, or None."""
    layer = w if isinstance(w, LayerWeights) else LayerWeights(w)
    frac = weight_formats(
        layer, b, input_frac, xmin, xmax, acc_bits, policy, observed_max, margin, tile
    )
    return None if frac is None else quantized(layer, b, frac, input_frac, xmin, xmax)


def quantized(
    layer: LayerWeights,
    b: npt.NDArray[np.float64],
    frac: IntArray,
    input_frac: int,
    xmin: int,
    xmax: int,
) -> WeightQuant:
    """The weights and bias of `quantize_at` at formats `frac`, with the bounds of
    `channel_bounds` (from `LayerWeights`' sums)."""
    _, pos, neg = layer.at_each(frac)
    q, bq = quantize_at(layer.w, b, frac, input_frac)
    lo, hi = _sum_bounds(bq, pos, neg, xmin, xmax)
    return WeightQuant(q, frac, bq, input_frac, lo, hi)


# ----------------------------------------------------------------------------- two stages


def tile_candidates(k: int) -> list[int]:
    """Tile lengths T the kernels implement, largest first: K itself (one tile), the multiples of
    8 below K (the NEON kernels widen every 8 terms), then 4, 2 and 1."""
    return [k, *range((k - 1) // 8 * 8, 7, -8), *(t for t in (4, 2, 1) if t < k)]


def choose_tile(q: IntArray, xmin: int, xmax: int, acc_bits: int) -> int | None:
    """The largest T of `tile_candidates` whose every tile of every channel fits acc_bits by the
    exact bound (the `guaranteed` policy per tile), or None when not even one product fits."""
    q = q.reshape(q.shape[0], -1)
    acc_lo, acc_hi = acc_limits(acc_bits)
    for t in tile_candidates(int(q.shape[1])):
        lo, hi = tile_bounds(q, xmin, xmax, t)
        if int(lo.min(initial=0)) >= acc_lo and int(hi.max(initial=0)) <= acc_hi:
            return t
    return None
