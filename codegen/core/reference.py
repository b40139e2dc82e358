"""The NumPy integer reference: THE semantics of a quantized graph.

One function per kernel, named like the C kernels. Products are summed exactly (float64 BLAS is
exact for integer sums below 2^53, and int8 operands keep every sum far below that), converted to
int64, wrapped once to the layer's accumulator width, then requantized with
`codegen.core.formats.requantize`. Tensors are int64 arrays in NHWC with a leading batch axis.

A conv2d/dense node with attrs["acc_tile"] = T (two-stage accumulation, `codegen.core.ir`) sums
its K terms in tiles of T consecutive terms (the weight layout's order), wraps each tile sum to
acc_bits, and adds the wrapped tile sums to the bias in an acc2_bits-wide accumulator that wraps
once more (`two_stage`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from codegen.core import simulate
from codegen.core.formats import IntArray, quantize, requantize, round_half_up, saturate, wrap
from codegen.core.ir import Graph, Node, Requant

# Keep each im2col block (float64) under this many elements.
_BLOCK_ELEMENTS = 1 << 23


@dataclass
class OverflowStats:
    """Accumulator values whose exact sum left the accumulator, and the samples that had any."""

    events: int = 0
    samples: int = 0
    max_abs: int = 0
    tile_events: int = 0
    """Two-stage layers: tile sums that left the acc_bits-wide first stage (`events` counts the
    output values with any wrapped tile or a wrapped total)."""
    tile_max_abs: int = 0


@dataclass
class RunResult:
    output: IntArray
    """The (first) output; `outputs` holds every output of the graph in its order."""
    outputs: tuple[IntArray, ...] = ()
    tensors: dict[str, IntArray] = field(default_factory=dict)
    overflow: dict[str, OverflowStats] = field(default_factory=dict)


def _requant(acc: IntArray, rq: Requant | None) -> IntArray:
    assert rq is not None, "integer node without requantization parameters"
    return requantize(acc, rq.mult, rq.shift, rq.zero_point, rq.lo, rq.hi)


def _wrap_and_count(exact: IntArray, node: Node, stats: OverflowStats | None) -> IntArray:
    bits = int(node.attrs["acc_bits"])
    if exact.size == 0:
        return exact
    lo, hi = int(exact.min()), int(exact.max())
    if stats is not None:
        stats.max_abs = max(stats.max_abs, -lo, hi)
    if -(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1)):
        return exact  # nothing left the accumulator
    wrapped = wrap(exact, bits)
    if stats is not None:
        over = (wrapped != exact).reshape(exact.shape[0], -1)
        stats.events += int(over.sum())
        stats.samples += int(over.any(axis=1).sum())
    return wrapped


def patches(
    x: npt.NDArray[Any],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    pad_value: float,
) -> npt.NDArray[Any]:
    """Sliding windows of an NHWC batch: (N, OH, OW, kh, kw, C), a strided view (no copy)."""
    top, bottom, left, right = padding
    if any(padding):
        x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=pad_value)
    kh, kw = kernel
    dh, dw = dilation
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(1, 2))
    # win: (N, H', W', C, span_h, span_w) -> pick dilated taps, stride, move C last
    win = win[:, :: stride[0], :: stride[1], :, ::dh, ::dw]
    return np.moveaxis(win, 3, -1)


def _batches(n: int, per_sample: int) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(per_sample, 1))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def exact_dtype(weight: IntArray, x_absmax: int) -> type[np.floating[Any]]:
    """float32 when no partial sum can reach 2^24 (all float32 sums exact), else float64."""
    l1 = int(np.abs(weight.reshape(weight.shape[0], -1)).sum(axis=1).max(initial=0))
    return np.float32 if l1 * x_absmax < (1 << 24) else np.float64


def im2col(
    x: IntArray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    dtype: type[np.floating[Any]],
) -> npt.NDArray[Any]:
    """(N, OH, OW, kh, kw, C) patches of an NHWC batch, zero padded, as a contiguous array."""
    n, h, w, c = x.shape
    top, bottom, left, right = padding
    kh, kw = kernel
    (sh, sw), (dh, dw) = stride, dilation
    xp = np.zeros((n, h + top + bottom, w + left + right, c), dtype=dtype)
    xp[:, top : top + h, left : left + w, :] = x
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, oh, ow, kh, kw, c), dtype=dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = xp[
                :,
                i * dh : i * dh + (oh - 1) * sh + 1 : sh,
                j * dw : j * dw + (ow - 1) * sw + 1 : sw,
            ]
    return cols


def conv_sum(
    x: IntArray,
    weight: IntArray,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
) -> IntArray:
    """Exact sum_{taps} w * x of a grouped convolution with zero padding, NHWC in and out."""
    o, kh, kw, cg = weight.shape
    og = o // groups
    dt = exact_dtype(weight, int(np.abs(x).max(initial=0)))
    cols = im2col(x, (kh, kw), stride, padding, dilation, dt)
    n, oh, ow = cols.shape[:3]
    w = weight.astype(dt)
    if groups == 1:
        acc = cols.reshape(-1, kh * kw * cg) @ w.reshape(o, -1).T
    else:
        pg = cols.reshape(n, oh, ow, kh, kw, groups, cg)
        acc = np.einsum(
            "nhwijgc,goijc->nhwgo", pg, w.reshape(groups, og, kh, kw, cg), optimize=True
        )
    return acc.astype(np.int64).reshape(n, oh, ow, o)  # exact integers: the cast is lossless


def two_stage(
    cols: npt.NDArray[Any],
    weight: IntArray,
    bias: IntArray,
    node: Node,
    stats: OverflowStats | None,
    samples: int,
) -> IntArray:
    """The two-stage sum of (M, G, K) term rows against (G, Og, K) weights: (M, G * Og) values;
    the M rows belong to `samples` samples (for the overflow counts).

    Tiles of T = attrs["acc_tile"] consecutive terms (the last one may be shorter) are summed
    exactly and wrapped to acc_bits; the bias plus the wrapped tile sums is wrapped to acc2_bits.
    """
    tile, bits, bits2 = int(node.attrs["acc_tile"]), int(node.attrs["acc_bits"]), _acc2(node)
    m, _, k = cols.shape
    w = weight.astype(cols.dtype)
    total = np.broadcast_to(bias, (m, weight.shape[0] * weight.shape[1])).astype(np.int64)
    over = np.zeros(total.shape, dtype=bool)
    tmax = 0
    for k0 in range(0, k, tile):
        exact = np.einsum("mgk,gok->mgo", cols[:, :, k0 : k0 + tile], w[:, :, k0 : k0 + tile])
        exact = exact.astype(np.int64).reshape(m, -1)
        if exact.size:
            tmax = max(tmax, int(np.abs(exact).max()))
        wrapped = wrap(exact, bits)
        if stats is not None:
            tile_over = wrapped != exact
            stats.tile_events += int(tile_over.sum())
            over |= tile_over
        total = total + wrapped
    if stats is not None:
        stats.tile_max_abs = max(stats.tile_max_abs, tmax)
        if total.size:
            stats.max_abs = max(stats.max_abs, int(np.abs(total).max()))
    result = wrap(total, bits2)
    if stats is not None:
        over |= result != total
        stats.events += int(over.sum())
        stats.samples += int(over.reshape(samples, -1).any(axis=1).sum())
    return result


def _acc2(node: Node) -> int:
    return int(node.attrs.get("acc2_bits", 32))


def _two_stage_conv(x: IntArray, node: Node, stats: OverflowStats | None) -> IntArray:
    w = node.params["weight"]
    a = node.attrs
    o, kh, kw, cg = w.shape
    groups = int(a["groups"])
    dt = exact_dtype(w, int(np.abs(x).max(initial=0)))
    cols = im2col(x, (kh, kw), a["stride"], a["padding"], a["dilation"], dt)
    n, oh, ow = cols.shape[:3]
    # (M, G, K): each group's terms in the weight layout's order (kh, kw, I/groups)
    rows = cols.reshape(n * oh * ow, kh, kw, groups, cg).transpose(0, 3, 1, 2, 4)
    rows = rows.reshape(n * oh * ow, groups, kh * kw * cg)
    wg = w.reshape(groups, o // groups, kh * kw * cg)
    acc = two_stage(rows, wg, node.params["bias"], node, stats, n)
    return acc.reshape(n, oh, ow, o)


# ----------------------------------------------------------------------------- kernels


def conv2d(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    in_zp = int(node.attrs.get("input_zero_point", 0))
    w = node.params["weight"]
    a = node.attrs
    o, kh, kw, cg = w.shape
    sh, sw = a["stride"]
    per_sample = (x.shape[1] // sh + 1) * (x.shape[2] // sw + 1) * (kh * kw * cg * a["groups"] + o)
    parts = []
    for sl in _batches(x.shape[0], per_sample):
        xb = x[sl] - in_zp if in_zp else x[sl]
        if "acc_tile" in a:
            parts.append(_requant(_two_stage_conv(xb, node, stats), node.requant))
            continue
        exact = conv_sum(xb, w, a["stride"], a["padding"], a["dilation"], a["groups"])
        exact += node.params["bias"]
        parts.append(_requant(_wrap_and_count(exact, node, stats), node.requant))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def dense(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    in_zp = int(node.attrs.get("input_zero_point", 0))
    w = node.params["weight"]
    xs = x - in_zp
    dt = exact_dtype(w, int(np.abs(xs).max(initial=0)))
    if "acc_tile" in node.attrs:
        acc = two_stage(
            xs.astype(dt)[:, None, :], w[None], node.params["bias"], node, stats, xs.shape[0]
        )
        return _requant(acc, node.requant)
    exact = (xs.astype(dt) @ w.astype(dt).T).astype(np.int64) + node.params["bias"]
    return _requant(_wrap_and_count(exact, node, stats), node.requant)


def maxpool2d(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    rq = node.requant
    assert rq is not None
    pad = np.iinfo(np.int64).min
    p = patches(x, node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"], (1, 1), pad)
    return np.clip(p.max(axis=(3, 4)), rq.lo, rq.hi)


def avgpool2d(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    in_zp = int(node.attrs.get("input_zero_point", 0))
    p = patches(
        (x - in_zp).astype(np.float64),
        node.attrs["kernel"],
        node.attrs["stride"],
        node.attrs["padding"],
        (1, 1),
        0.0,
    )
    acc = np.rint(p.sum(axis=(3, 4))).astype(np.int64)
    return _requant(_wrap_and_count(acc, node, stats), node.requant)


def global_avgpool(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    in_zp = int(node.attrs.get("input_zero_point", 0))
    acc = (x - in_zp).sum(axis=(1, 2), keepdims=True)  # (N, 1, 1, C), as the IR shape says
    return _requant(_wrap_and_count(acc, node, stats), node.requant)


def add(a: IntArray, b: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    ma, mb = (int(v) for v in node.params["in_mult"])
    za, zb = (int(v) for v in node.attrs.get("input_zero_points", (0, 0)))
    acc = (a - za) * ma + (b - zb) * mb
    return _requant(_wrap_and_count(acc, node, stats), node.requant)


def mul(a: IntArray, b: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    """The exact product of the zero-point-corrected inputs, wrapped and requantized; `b` may
    hold one value per channel ((N, 1, 1, C) or (N, C)), broadcast over `a`'s pixels."""
    za, zb = (int(v) for v in node.attrs.get("input_zero_points", (0, 0)))
    if b.shape != a.shape:  # the same bytes, or a per-channel scale (N, C) -> (N, 1, .., 1, C)
        full = b[0].size == a[0].size
        b = b.reshape(a.shape if full else (b.shape[0],) + (1,) * (a.ndim - 2) + (a.shape[-1],))
    acc = (a - za) * (b - zb)
    return _requant(_wrap_and_count(acc, node, stats), node.requant)


SOFTMAX_ONE_BITS = 15
"""The softmax exp table is in units of 2^-15: exp(0) = 1 is 2^15 (it fits a uint16_t)."""


def softmax_table(in_scale: float) -> IntArray:
    """exp(-d * in_scale) in units of 2^-SOFTMAX_ONE_BITS for every distance d = 0..255 (round
    half up): the softmax's whole use of exp, computed once when the graph is quantized."""
    d = np.arange(256, dtype=np.float64)
    return round_half_up(np.exp(-d * in_scale) * (1 << SOFTMAX_ONE_BITS))


def softmax(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    """Softmax over the last (channel) axis: e = exp_table[max - x], s = sum(e) (exact, in 2^-15
    units: s <= C * 2^15), out = saturate(round_half_up(e * 2^out_frac / s) + zero_point, lo, hi)
    with the rounding done exactly in integers: floor((e * 2^(out_frac + 1) + s) / (2 s)).

    Integer with a LUT exp, not a float or polynomial exp: an int8 input has only 256 distances to
    its maximum, so a table makes exp exact for it, and a table read, a sum and an integer division
    have one result on every core (the C equals this by construction, without floating point)."""
    rq = node.requant
    assert rq is not None
    table = np.asarray(node.params["exp_table"], dtype=np.int64)
    e = table[x.max(axis=-1, keepdims=True) - x]
    s = e.sum(axis=-1, keepdims=True)  # >= 2^15: the maximum's own term
    q = ((e << (int(node.attrs["out_frac"]) + 1)) + s) // (2 * s)
    return saturate(q + rq.zero_point, rq.lo, rq.hi)


def concat(*xs: IntArray, node: Node) -> IntArray:
    """Each input rescaled to the output format: requant.mult/shift are indexed by input."""
    rq = node.requant
    assert rq is not None
    zps = node.attrs.get("input_zero_points", (0,) * len(xs))
    parts = [
        requantize(x - int(zp), rq.mult[i], rq.shift[i], rq.zero_point, rq.lo, rq.hi)
        for i, (x, zp) in enumerate(zip(xs, zps, strict=True))
    ]
    return np.concatenate(parts, axis=-1)


def lut(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    """The table lookup: out = table[x + 128] (the table holds the saturated outputs)."""
    t = np.asarray(node.params["table"], dtype=np.int64)
    assert t.shape == (256,), f"lut table of shape {t.shape}"
    return t[x + 128]


def window_sums(x: IntArray, rows: Any, cols: Any) -> IntArray:
    """Exact sums of an NHWC batch over windows [r0, r1) x [c0, c1) (one per output row and
    column), from the integral image: (N, len(rows), len(cols), C)."""
    n, h, w, c = x.shape
    s = np.zeros((n, h + 1, w + 1, c), dtype=np.int64)
    s[:, 1:, 1:] = x.astype(np.int64).cumsum(axis=1).cumsum(axis=2)
    r0, r1 = (np.array([r[i] for r in rows], dtype=np.intp) for i in (0, 1))
    c0, c1 = (np.array([q[i] for q in cols], dtype=np.intp) for i in (0, 1))
    return s[:, r1][:, :, c1] - s[:, r0][:, :, c1] - s[:, r1][:, :, c0] + s[:, r0][:, :, c0]


def adaptive_avgpool2d(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    """Sums over the windows; the requantization (one mult/shift per output pixel) divides."""
    in_zp = int(node.attrs.get("input_zero_point", 0))
    rows, cols = node.attrs["rows"], node.attrs["cols"]
    acc = _wrap_and_count(window_sums(x - in_zp, rows, cols), node, stats)
    rq = node.requant
    assert rq is not None
    per_pixel = (1, len(rows), len(cols), 1)
    m, s = (np.broadcast_to(v, (len(rows) * len(cols),)).reshape(per_pixel)
            for v in (rq.mult, rq.shift))  # fmt: skip
    return requantize(acc, m, s, rq.zero_point, rq.lo, rq.hi)


def adaptive_maxpool2d(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    rq = node.requant
    assert rq is not None
    rows, cols = node.attrs["rows"], node.attrs["cols"]
    out = np.empty((x.shape[0], len(rows), len(cols), x.shape[3]), dtype=np.int64)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, i, j] = x[:, r0:r1, c0:c1].max(axis=(1, 2))
    return np.clip(out, rq.lo, rq.hi)


RESIZE_WEIGHT_BITS = 8
"""Bilinear resizing's weights are integers in units of 2^-8: the two weights of one output row
(column) sum to exactly 2^8, so the four weights of one output pixel sum to 2^16."""


def resize_weights(lambdas: Any, bits: int = RESIZE_WEIGHT_BITS) -> IntArray:
    """The integer weight of the second input row (column) of each output row (column): the real
    weight lambda1 (PyTorch's, in [0, 1]) rounded half up to `bits` fractional bits; the first's
    is 2^bits minus it."""
    return round_half_up(np.asarray(lambdas, dtype=np.float64) * (1 << bits))


def resize_bilinear(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    """Bilinear resizing with integer weights: output pixel (i, j) of channel c is

        acc = sum over a, b in {0, 1} of wr[i][a] * wc[j][b] * (x[rows[i][a], cols[j][b], c] - zp)

    with wr[i] = (2^B - row_weight[i], row_weight[i]) (B = attrs weight_bits, likewise wc), exact
    (|acc| <= 2^(2B) * max|x - zp|: the weights are nonnegative and sum to 2^(2B)), then THE
    requantization (one mult/shift for the op; it divides by 2^(2B))."""
    in_zp = int(node.attrs.get("input_zero_point", 0))
    one = 1 << int(node.attrs["weight_bits"])
    rows, cols = np.asarray(node.attrs["rows"]), np.asarray(node.attrs["cols"])
    wr1 = np.asarray(node.attrs["row_weight"], dtype=np.int64)[None, :, None, None]
    wc1 = np.asarray(node.attrs["col_weight"], dtype=np.int64)[None, None, :, None]
    d = x.astype(np.int64) - in_zp
    vert = (one - wr1) * d[:, rows[:, 0]] + wr1 * d[:, rows[:, 1]]  # (N, OH, W, C)
    acc = (one - wc1) * vert[:, :, cols[:, 0]] + wc1 * vert[:, :, cols[:, 1]]
    return _requant(_wrap_and_count(acc, node, stats), node.requant)


def gather(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    """Channels picked by index (channel shuffle, chunk, split): out[..., j] = x[..., index[j]]."""
    rq = node.requant
    assert rq is not None
    return np.clip(x[..., list(node.attrs["index"])], rq.lo, rq.hi)


def zero_insert(x: IntArray, node: Node, stats: OverflowStats | None = None) -> IntArray:
    """sh - 1 rows and sw - 1 columns of the zero point (real 0) between the input's pixels: input
    pixel (y, x) is output pixel (y * sh, x * sw)."""
    rq = node.requant
    assert rq is not None
    sh, sw = node.attrs["stride"]
    n, h, w, c = x.shape
    out = np.full((n, (h - 1) * sh + 1, (w - 1) * sw + 1, c), rq.zero_point, dtype=np.int64)
    out[:, ::sh, ::sw] = x
    return out


def reshape(x: IntArray, node: Node) -> IntArray:
    return x.reshape((x.shape[0], *node.attrs["shape"]))


KERNELS: dict[str, Callable[..., IntArray]] = {
    "conv2d": conv2d,
    "dense": dense,
    "maxpool2d": maxpool2d,
    "avgpool2d": avgpool2d,
    "global_avgpool": global_avgpool,
    "add": add,
    "mul": mul,
    "lut": lut,
    "softmax": softmax,
    "gather": gather,
    "adaptive_avgpool2d": adaptive_avgpool2d,
    "adaptive_maxpool2d": adaptive_maxpool2d,
    "zero_insert": zero_insert,
    "resize_bilinear": resize_bilinear,
}


def run_node(node: Node, inputs: list[IntArray], stats: OverflowStats | None = None) -> IntArray:
    if node.op == "concat":
        return concat(*inputs, node=node)
    if node.op == "reshape":
        return reshape(inputs[0], node)
    return KERNELS[node.op](*inputs, node, stats)


def run(graph: Graph, x: IntArray, keep: bool = False, batch: int = 128) -> RunResult:
    """Execute an integer graph on an NHWC int batch (already in the input format).

    Samples are processed in chunks of `batch` (results do not depend on it). With `keep`, every
    intermediate tensor is returned too.
    """
    x = np.asarray(x, dtype=np.int64)
    result = RunResult(output=np.empty(0, dtype=np.int64))
    stats = {n.name: OverflowStats() for n in graph.nodes if "acc_bits" in n.attrs}
    outs: list[list[IntArray]] = [[] for _ in graph.outputs]
    kept: dict[str, list[IntArray]] = {}
    remaining0 = {t: len(graph.consumers(t)) for t in graph.tensors}
    for i in range(0, max(x.shape[0], 1), batch):
        env: dict[str, IntArray] = {graph.input: x[i : i + batch]}
        remaining = dict(remaining0)
        for node in graph.nodes:
            out = run_node(node, [env[t] for t in node.inputs], stats.get(node.name))
            # the IR's declared shape is authoritative ((1, 1, C) and (C,) are the same bytes)
            env[node.output] = out.reshape((out.shape[0], *graph.tensors[node.output].shape))
            if not keep:
                for t in set(node.inputs):
                    remaining[t] -= 1
                    if remaining[t] == 0 and t not in graph.outputs:
                        del env[t]
        for k, t in enumerate(graph.outputs):
            outs[k].append(env[t])
        for t, v in env.items() if keep else ():
            kept.setdefault(t, []).append(v)
    result.outputs = tuple(np.concatenate(o, axis=0) for o in outs)
    result.output = result.outputs[0]
    result.overflow = stats
    result.tensors = {t: np.concatenate(v, axis=0) for t, v in kept.items()}
    return result


def quantize_images(x: np.ndarray, graph: Graph) -> IntArray:
    """Float NCHW inputs to the integer graph's input format, NHWC."""
    fmt = graph.tensors[graph.input].fmt
    assert fmt is not None
    return quantize(simulate.nchw_to_nhwc(x) / fmt.scale, 0, fmt.qmin, fmt.qmax, fmt.zero_point)
