"""Post-training quantization as a function of the accumulator width (seed 000).

The search, per weighted layer in topological order (greedy):
  1. candidates: input widths bx = 2..7 (unsigned) or 2..8 (signed) for the layer's input tensor
     (fixed if an earlier layer already decided it);
  2. for each, the weights take the largest per-channel formats the accumulator allows (so the
     configuration fills the accumulator); a width is kept only if it is feasible and filling
     (one more input bit would cost some channel a weight bit, or the input is at its maximum);
  3. candidates are ranked on the calibration data by accuracy (labels given; ties broken by
     output error) or by output error against float, with earlier layers quantized as chosen and
     later layers still in float.
Tensors tied by format-preserving ops (maxpool, reshape, gather, concat, zero_insert) share one
format.

Two-stage accumulation (`acc2_bits`): the weights are chosen against the acc2_bits-wide bound,
then the tile length T of each layer is the largest whose every tile fits acc_bits by the exact
bound (`accumulator.choose_tile`), so `guaranteed` holds per tile and for the total. With a
minimum tile (`min_tile`), the weights are chosen so that every tile of min_tile terms fits
acc_bits by the exact bound (and the total acc2_bits): fewer widenings, finer weights than one
acc_bits stage; a layer with K <= min_tile stays one acc_bits stage (one tile would hold every
term: the one-stage kernels, depthwise included, are faster).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from codegen.core import lut, reference, simulate
from codegen.core.errors import InfeasibleAccumulatorError, QaccError, UnsupportedModelError
from codegen.core.formats import frac_for_range, round_half_up
from codegen.core.ir import (
    WEIGHTED_OPS,
    Graph,
    Node,
    QFormat,
    Requant,
    Tensor,
    TensorUnion,
    terms_per_output,
)
from codegen.core.progress import bar as progress_bar
from codegen.quant import distributed as ddp
from codegen.quant.accumulator import (
    MIN_BITS,
    LayerWeights,
    Policy,
    WeightQuant,
    choose_tile,
    quantized,
    weight_formats,
)
from codegen.quant.calibrate import Calibration, calibrate
from codegen.quant.rounding import DEFAULT_ROUNDING, layer_stats, refine

DEFAULT_SIGNED_BITS = 8
DEFAULT_UNSIGNED_BITS = 7
RANK_SAMPLES = 2000
MAX_ACC_BITS = 32
CLIPS = ("none", "mse", "search")
"""Activation clipping (`search(clip=)`): "none" keeps each layer input's range covering its
calibration maximum. The others also consider ranges 2, 4 and 8 times smaller (MAX_CLIP more
fractional bits at the same width: finer steps, the largest values saturate): "mse" gives each
candidate width the range of least squared quantization error of the layer's input on the
ranking samples (at one width the weights do not depend on the input's range, so this trades
rounding against saturation; no extra network runs); "search" ranks every (width, range)
candidate by the network's output like the widths (the ranges of one width are tried from the
widest, and the first that scores no better than the one before ends them)."""
DEFAULT_CLIP = "mse"
MAX_CLIP = 3


def check_clip(clip: str) -> str:
    if clip not in CLIPS:
        raise QaccError(f"unknown clip '{clip}'; choose one of {', '.join(CLIPS)}")
    return clip


# ----------------------------------------------------------------------------- tensor classes


SHARED_FORMAT_OPS = frozenset(
    {"maxpool2d", "adaptive_maxpool2d", "reshape", "gather", "concat", "zero_insert"}
)
"""Ops whose inputs and output share one format (every method: `tensor_classes`)."""


def tensor_classes(graph: Graph) -> TensorUnion:
    """Tensors that must share a format: maxpool, reshape, gather, concat and zero_insert tie
    inputs to output."""
    classes = TensorUnion(graph.tensors)
    for n in graph.nodes:
        if n.op in SHARED_FORMAT_OPS:
            for t in n.inputs:
                classes.union(t, n.output)
    return classes


@dataclass
class ClassInfo:
    signed: bool
    absmax: float

    def fmt(self, bits: int, clip: int = 0) -> QFormat:
        """The format of `bits` bits covering the calibration range, or with `clip` more
        fractional bits: a range 2^clip times smaller, larger values saturate."""
        return QFormat(bits, self.signed, frac_for_range(self.absmax, bits, self.signed) + clip)

    @property
    def max_bits(self) -> int:
        return DEFAULT_SIGNED_BITS if self.signed else DEFAULT_UNSIGNED_BITS


def is_nonneg(graph: Graph, t: str, graph_input: Callable[[str], bool]) -> bool:
    """Whether tensor `t` is >= 0 by construction (a clamp at >= 0, a nonnegative function, a
    product of such tensors, or a pool/concat/reshape/gather of them); `graph_input(t)` decides
    for the network input."""
    prod = graph.producer(t)
    if prod is None:
        return graph_input(t)
    if prod.attrs.get("clamp", (-math.inf, math.inf))[0] >= 0:
        return True
    if prod.op == "softmax" or (prod.op == "lut" and lut.FUNCTIONS[prod.attrs["function"]].nonneg):
        return True
    if prod.op == "mul" and prod.inputs[0] == prod.inputs[1]:  # a square
        return True
    if prod.op in ("mul", "resize_bilinear", *SHARED_FORMAT_OPS):  # bilinear: weights >= 0
        return all(is_nonneg(graph, i, graph_input) for i in prod.inputs)
    return False


def class_infos(graph: Graph, classes: TensorUnion, cal: Calibration) -> dict[str, ClassInfo]:
    infos: dict[str, ClassInfo] = {}
    for t in graph.tensors:
        c = classes.find(t)
        prod = graph.producer(t)
        if prod is None:
            nonneg = cal.tensor_min[t] >= 0
        elif prod.op in SHARED_FORMAT_OPS:
            nonneg = True  # decided by the members that produce values
        else:
            nonneg = prod.attrs.get("clamp", (-math.inf, math.inf))[0] >= 0
            if prod.op == "lut" and lut.FUNCTIONS[prod.attrs["function"]].nonneg:
                nonneg = True
            if prod.op in ("mul", "softmax", "resize_bilinear"):
                nonneg = is_nonneg(graph, t, lambda i: bool(cal.tensor_min[i] >= 0))
        absmax = cal.absmax(t)
        clamp_hi = prod.attrs.get("clamp", (0, math.inf))[1] if prod is not None else math.inf
        absmax = min(absmax, max(abs(clamp_hi), 0.0)) if math.isfinite(clamp_hi) else absmax
        old = infos.get(c)
        if old is None:
            infos[c] = ClassInfo(signed=not nonneg, absmax=absmax)
        else:
            infos[c] = ClassInfo(old.signed or not nonneg, max(old.absmax, absmax))
    return infos


# ----------------------------------------------------------------------------- search


@dataclass
class LayerChoice:
    input_bits: int
    candidates: list[dict[str, Any]] = field(default_factory=list)
    clip: int = 0  # fractional bits added to the input's calibrated format (activation clipping)


@dataclass
class PTQResult:
    graph: Graph
    calibration: Calibration
    choices: dict[str, LayerChoice]


def _score(
    outs: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: np.ndarray | None
) -> tuple[float, ...]:
    """(accuracy, -mse) with labels, else (-mse); under torchrun over every rank's samples (the
    sums are all-reduced: counts exactly, squared errors in float64). The mse is over every value
    of every output; the labels are the first output's classes."""
    sse = sum(float(np.sum((o - r) ** 2)) for o, r in zip(outs, refs, strict=True))
    out = outs[0]
    correct = 0.0
    if labels is not None:
        correct = float(np.sum(out.reshape(out.shape[0], -1).argmax(axis=1) == labels))
    sse, values, correct, samples = ddp.all_reduce(
        np.array([sse, sum(o.size for o in outs), correct, out.shape[0]], dtype=np.float64), "sum"
    )
    mse = float(sse / values)
    if labels is None:
        return (-mse,)
    return (float(correct / samples), -mse)


def _layer_formats(
    node: Node,
    fmt: QFormat,
    acc_bits: int,
    policy: Policy,
    cal: Calibration,
    margin: float,
    tile: tuple[int, int] | None = None,
    layer: LayerWeights | None = None,
) -> np.ndarray | None:
    """`weight_formats` (those of `quantize_weights`) for a layer's input format (`layer`: its
    weights' `LayerWeights`, kept by the caller across the formats it tries)."""
    return weight_formats(
        LayerWeights(node.params["weight"]) if layer is None else layer,
        node.params["bias"],
        fmt.frac,
        fmt.qmin - fmt.zero_point,
        fmt.qmax - fmt.zero_point,
        acc_bits,
        policy,
        cal.preact_absmax.get(node.name),
        margin,
        tile,
    )


def smallest_feasible_acc(
    node: Node, info: ClassInfo, policy: Policy, cal: Calibration, margin: float
) -> int | None:
    layer = LayerWeights(node.params["weight"])
    for a in range(8, 65):
        for bx in range(MIN_BITS, info.max_bits + 1):
            if _layer_formats(node, info.fmt(bx), a, policy, cal, margin, None, layer) is not None:
                return a
    return None


def _least_error_clips(
    cands: list[tuple[int, int]], x: torch.Tensor, info: ClassInfo
) -> list[tuple[int, int]]:
    """Of the (width, clip) candidates, per width the one whose format quantizes x (the float
    layer input on the ranking samples) with the least squared error."""
    best: dict[int, tuple[float, int]] = {}
    for bx, cb in cands:
        d = simulate.fake_quant(x, info.fmt(bx, cb)).sub_(x)  # in place: one temporary
        err = float(d.mul_(d).sum())
        if bx not in best or err < best[bx][0]:
            best[bx] = (err, cb)
    return [(bx, cb) for bx, (_, cb) in best.items()]


@dataclass
class _Candidates:
    """The (input width, clip) candidates of one layer; their weight formats are computed when
    first asked for (`formats_of`: cached over the whole search), their nearest-rounded weights
    (`weights_of`) only for the candidates that are ranked."""

    formats_of: Callable[[Node, QFormat, int, tuple[int, int] | None], np.ndarray | None]
    weights_of: Callable[[Node, QFormat, int, tuple[int, int] | None], WeightQuant | None]
    node: Node
    info: ClassInfo
    acc_bits: int
    tile: tuple[int, int] | None
    later: list[tuple[Node, int]]  # later layers reading the same tensor, their widths
    widths: list[int]
    quants: dict[tuple[int, int], WeightQuant | None] = field(default_factory=dict)

    def quant(self, bx: int, cb: int) -> WeightQuant | None:
        if (bx, cb) not in self.quants:
            fmt = self.info.fmt(bx, cb)
            self.quants[bx, cb] = self.weights_of(self.node, fmt, self.acc_bits, self.tile)
        return self.quants[bx, cb]

    def formats(self, bx: int, cb: int) -> np.ndarray | None:
        return self.formats_of(self.node, self.info.fmt(bx, cb), self.acc_bits, self.tile)

    def passes(self, bx: int, cb: int) -> bool:
        """Feasible and filling (one more input bit would cost some channel a weight bit)."""
        frac = self.formats(bx, cb)
        if frac is None:
            return False
        single = len(self.widths) == 1 or bx >= self.info.max_bits
        return single or _fills(frac, self.formats(bx + 1, cb))

    def fits(self, bx: int, cb: int) -> bool:
        fmt = self.info.fmt(bx, cb)
        return all(self.formats_of(m, fmt, a, None) is not None for m, a in self.later)

    def select(self, clips: Sequence[int]) -> list[tuple[int, int]]:
        """The feasible, filling candidates; only those that fit the later layers if any does."""
        cands = [(bx, cb) for bx in self.widths for cb in clips if self.passes(bx, cb)]
        return [key for key in cands if self.fits(*key)] or cands


def _advances(graph: Graph, classes: TensorUnion, cls: str, index: int, known: bool) -> bool:
    """Whether the prefix state before node `index`, computed with class `cls` still in float
    (unless `known`: decided by an earlier layer), becomes the one with `cls` decided by
    quantizing its tensors: no node before `index` reads a tensor of `cls` except the
    format-preserving ops, which commute with the quantization (their outputs are in `cls` too)."""
    return known or not any(
        n.op not in SHARED_FORMAT_OPS and any(classes.find(t) == cls for t in n.inputs)
        for n in graph.nodes[:index]
    )


def _fills(a: np.ndarray, b: np.ndarray | None) -> bool:
    """A configuration (its weight formats `a`) fills the accumulator unless one more input bit
    (formats `b`, None if infeasible) costs no weight bit."""
    return b is None or bool(np.any(b < a))


def search(
    graph: Graph,
    x_nhwc: np.ndarray,
    labels: np.ndarray | None,
    acc_bits: Mapping[str, int],
    policy: Policy,
    margin: float = 2.0,
    progress: bool = True,
    device: torch.device | str = "cpu",
    rounding: str = DEFAULT_ROUNDING,
    bias_correction: bool = True,
    acc2_bits: int | None = None,
    min_tile: int | None = None,
    clip: str = DEFAULT_CLIP,
) -> PTQResult:
    """`clip` ("none", "search": `CLIPS`) chooses each layer input's range with its width.
    `rounding` ("nearest", "optq", "gpfq": `codegen.quant.rounding`) turns the weights of
    every candidate into error-corrected ones, fed the already-quantized prefix's outputs.

    Under torchrun the ranges are all-reduced (`calibrate`) and the candidates are ranked on
    the first RANK_SAMPLES samples of every rank, their scores summed over the ranks
    (`_score`): every rank builds the same graph."""
    cal = calibrate(graph, x_nhwc, progress, device)
    classes = tensor_classes(graph)
    infos = class_infos(graph, classes, cal)
    rank_x = x_nhwc[:RANK_SAMPLES]
    rank_ref = [o[:RANK_SAMPLES] for o in cal.outputs]
    rank_labels = labels[:RANK_SAMPLES] if labels is not None else None

    decided: dict[str, int] = {}
    clipped: dict[str, int] = {}  # extra fractional bits of a class (activation clipping)
    clips = range(1) if check_clip(clip) == "none" else range(MAX_CLIP + 1)
    weights: dict[str, WeightQuant] = {}
    choices: dict[str, LayerChoice] = {}

    def formats(extra: Mapping[str, tuple[int, int]] = {}) -> dict[str, QFormat]:
        chosen = {c: (b, clipped.get(c, 0)) for c, b in decided.items()} | dict(extra)
        return {
            t: infos[classes.find(t)].fmt(*chosen[classes.find(t)])
            for t in graph.tensors
            if classes.find(t) in chosen
        }

    real: dict[str, tuple[WeightQuant, dict[str, Any]]] = {}  # dequantized, once per layer

    def overrides(extra: Mapping[str, WeightQuant] = {}) -> dict[str, dict[str, Any]]:
        out = {}
        for name, wq in {**weights, **extra}.items():
            if name not in real or real[name][0] is not wq:
                w, b = wq.dequantized()
                real[name] = (wq, {"weight": w, "bias": b})
            out[name] = real[name][1]
        return out

    cache: dict[tuple[str, QFormat, int, tuple[int, int] | None], np.ndarray | None] = {}
    layers: dict[str, LayerWeights] = {}  # of the layers not decided yet

    def layer_of(node: Node) -> LayerWeights:
        if node.name in weights:  # decided (asked again by a later layer's `fits`)
            return LayerWeights(node.params["weight"])
        if node.name not in layers:
            layers[node.name] = LayerWeights(node.params["weight"])
        return layers[node.name]

    def formats_of(
        node: Node, fmt: QFormat, a: int, tile: tuple[int, int] | None = None
    ) -> np.ndarray | None:
        """`_layer_formats`, each (layer, format, width, tile) computed once."""
        key = (node.name, fmt, a, tile)
        if key not in cache:
            cache[key] = _layer_formats(node, fmt, a, policy, cal, margin, tile, layer_of(node))
        return cache[key]

    def weights_of(
        node: Node, fmt: QFormat, a: int, tile: tuple[int, int] | None = None
    ) -> WeightQuant | None:
        """`quantize_weights` of a layer for an input format (from `formats_of`)."""
        frac = formats_of(node, fmt, a, tile)
        if frac is None:
            return None
        xmin, xmax = fmt.qmin - fmt.zero_point, fmt.qmax - fmt.zero_point
        return quantized(layer_of(node), node.params["bias"], frac, fmt.frac, xmin, xmax)

    weighted = [n for n in graph.nodes if n.op in WEIGHTED_OPS]
    qstate: tuple[int, dict[str, torch.Tensor]] | None = None  # (node index, prefix state)
    fprev: tuple[int, dict[str, torch.Tensor]] | None = None  # the same in float
    single: set[str] = set()  # layers that stay one-stage (K <= min_tile)
    bar = progress_bar(weighted, "bit-width search", progress=progress, unit="layer")
    for node in bar:
        cls = classes.find(node.inputs[0])
        info = infos[cls]
        a = acc_bits[node.name] if acc2_bits is None else acc2_bits  # the bound the weights meet
        tile = None
        if acc2_bits is not None and min_tile is not None:  # and every tile of min_tile terms
            a = acc_bits[node.name]
            if terms_per_output(node) <= min_tile:
                single.add(node.name)  # one tile holds every term: one acc_bits stage instead
            else:
                tile = (min_tile, acc2_bits)
        if cls in decided:
            widths, cl = [decided[cls]], [clipped.get(cls, 0)]
        else:
            widths, cl = list(range(MIN_BITS, info.max_bits + 1)), list(clips)
        # a format this layer decides for later layers reading the same tensor must fit them too
        later = [
            (m, acc_bits[m.name])
            for m in weighted
            if m is not node and classes.find(m.inputs[0]) == cls
        ]
        found = _Candidates(formats_of, weights_of, node, info, a, tile, later, widths)
        quants = found.quants
        cands = found.select(cl)
        if not cands:
            need = smallest_feasible_acc(node, info, policy, cal, margin)
            hint = (
                f"the smallest width that fits is {need} bits"
                if need is not None
                else "no width up to 64 bits fits (check the weights)"
            )
            raise InfeasibleAccumulatorError(
                f"layer '{node.name}' does not fit a {a}-bit accumulator with inputs and weights "
                f"of at least {MIN_BITS} bits ({policy} policy); {hint}: use --acc-bits {need}"
                if need is not None
                else f"layer '{node.name}' cannot be quantized: {hint}"
            )
        scored: list[tuple[tuple[float, ...], int, int]] = []
        bits: dict[tuple[int, int], int] = {}  # of the ranked candidates' weights
        index = graph.nodes.index(node)
        # the prefix's outputs (with the formats and weights chosen so far), advanced from the
        # previous layer's where that is exact (`_advances`)
        if qstate is None:
            state = simulate.prefix(
                graph, rank_x, index, formats=formats(), overrides=overrides(), dtype=torch.float32
            )
        else:
            state = simulate.advance(
                graph, qstate[1], qstate[0], index, formats=formats(), overrides=overrides()
            )
        if clip == "mse" and cls not in decided:  # per width, the clip of least input error
            cands = _least_error_clips(cands, state[node.inputs[0]], info)
        if rounding != "nearest":  # the float network's, advanced from the previous layer's
            fstate = (
                simulate.prefix(graph, rank_x, index, dtype=torch.float32)
                if fprev is None
                else simulate.advance(graph, fprev[1], fprev[0], index)
            )
            fprev = (index, fstate)
        worse: set[int] = set()  # widths whose output got worse at a larger clip: stop there
        for key in cands:
            if key[0] in worse:
                continue
            fmts = formats({cls: key})
            # the class being decided was kept in float by `prefix`: quantize it now
            st = {
                t: simulate.fake_quant(v, fmts[t]) if classes.find(t) == cls else v
                for t, v in state.items()
            }
            wq = found.quant(*key)
            assert wq is not None
            if rounding != "nearest":
                fi = fmts[node.inputs[0]]
                stats = layer_stats(
                    node, st[node.inputs[0]], fstate[node.inputs[0]], rounding == "gpfq"
                )
                wq = quants[key] = refine(
                    node, wq, stats, rounding, fi.qmin - fi.zero_point, fi.qmax - fi.zero_point,
                    a, policy, bias_correction,
                )  # fmt: skip
            out = simulate.run_outputs(
                graph,
                rank_x,
                formats=fmts,
                overrides=overrides({node.name: wq}),
                dtype=torch.float32,
                state=st,
                start=index,
            )
            # ties: the wider input, then the smaller clip (the range that saturates less)
            score = _score(out, rank_ref, rank_labels)
            if scored and scored[-1][1] == key[0] and scored[-1][0] >= score:
                worse.add(key[0])
            scored.append((score, key[0], -key[1]))
            bits[key] = wq.bits
            # only the best candidate's weights are kept (a big layer's are large)
            for _, bx, nc in scored[:-1] if max(scored) == scored[-1] else scored[-1:]:
                quants[bx, -nc] = None
        _, best, neg_clip = max(scored)
        decided[cls], clipped[cls] = best, -neg_clip
        qstate = None
        if _advances(graph, classes, cls, index, len(widths) == 1):
            fmts = formats()
            qstate = (
                index,
                {
                    t: simulate.fake_quant(v, fmts[t]) if classes.find(t) == cls else v
                    for t, v in state.items()
                },
            )
        weights[node.name] = quants[best, -neg_clip]  # type: ignore[assignment]
        layers.pop(node.name, None)  # decided: free the other candidates' weights
        choices[node.name] = LayerChoice(
            best,
            [
                {
                    "input_bits": bx,
                    "clip": -nc,
                    "weight_bits": bits[bx, -nc],
                    "score": list(s),
                }
                for s, bx, nc in scored
            ],
            -neg_clip,
        )
    bar.close()

    for t in graph.tensors:
        c = classes.find(t)
        decided.setdefault(c, infos[c].max_bits)
    fmts = formats()
    two = {k: v for k, v in weights.items() if k not in single}
    tiles = {} if acc2_bits is None else layer_tiles(graph, fmts, two, acc_bits)
    integer = build_integer_graph(graph, fmts, weights, acc_bits, tiles, acc2_bits or 32)
    return PTQResult(integer, cal, choices)


def layer_tiles(
    graph: Graph,
    fmts: Mapping[str, QFormat],
    weights: Mapping[str, WeightQuant],
    acc_bits: Mapping[str, int],
) -> dict[str, int]:
    """T of every weighted layer: the largest tile that fits acc_bits by the exact bound."""
    tiles = {}
    for name, wq in weights.items():
        fi = fmts[graph.node(name).inputs[0]]
        t = choose_tile(wq.q, fi.qmin - fi.zero_point, fi.qmax - fi.zero_point, acc_bits[name])
        if t is None:
            raise InfeasibleAccumulatorError(
                f"layer '{name}': not even one product fits a {acc_bits[name]}-bit first stage;"
                " use --acc-bits 16 or more"
            )
        tiles[name] = t
    return tiles


# ----------------------------------------------------------------------------- integer graph


def clamp_limits(clamp: tuple[float, float], fmt: QFormat) -> tuple[int, int]:
    """Saturation limits of a fused clamp in the output format (round half up, like the data)."""
    lo, hi = clamp
    qlo, qhi = fmt.qmin, fmt.qmax
    if lo != -math.inf:
        qlo = max(qlo, fmt.zero_point + int(round_half_up(lo / fmt.scale)))
    if hi != math.inf:
        qhi = min(qhi, fmt.zero_point + int(round_half_up(hi / fmt.scale)))
    return qlo, max(qlo, qhi)


MULT_BITS = 15
"""Dyadic requantization multipliers lie in [2^(MULT_BITS-1), 2^MULT_BITS]."""


def dyadic(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer multipliers in [2^(MULT_BITS-1), 2^MULT_BITS] and shifts with m ~ mult * 2^-shift."""
    m = np.asarray(m, dtype=np.float64)
    shift = (MULT_BITS - 1) - np.floor(np.log2(m)).astype(np.int64)
    mult = round_half_up(m * np.exp2(shift.astype(np.float64)))
    return mult.astype(np.int64), shift


def _container_bits(max_abs: int) -> int:
    need = int(max_abs).bit_length() + 1
    if need > MAX_ACC_BITS:
        raise InfeasibleAccumulatorError(f"an internal sum needs {need} bits (more than 32)")
    return 16 if need <= 16 else 32


def _divide_by(n: int, fi: int, fo: int) -> tuple[int, int]:
    """Multiplier and shift realising x * 2^(fo - fi) / n with a 15-bit multiplier."""
    if n & (n - 1) == 0:
        return 1, n.bit_length() - 1 + fi - fo
    s = 0
    while round(2.0 ** (s + 1 + fo - fi) / n) < (1 << 15):
        s += 1
    return int(round_half_up(2.0 ** (s + fo - fi) / n)), s


def _divide(n: int, fi: QFormat, fo: QFormat) -> tuple[int, int]:
    """Multiplier and shift taking a sum of n values in format fi to their mean in format fo:
    `_divide_by` between power-of-two formats, `dyadic` otherwise."""
    if fi.is_pow2 and fo.is_pow2:
        return _divide_by(n, fi.frac, fo.frac)
    mult, shift = dyadic(np.array([fi.scale / (n * fo.scale)]))
    return int(mult[0]), int(shift[0])


def _span(f: QFormat) -> int:
    """The largest |q - zero_point| of a format."""
    return max(f.qmax - f.zero_point, f.zero_point - f.qmin)


def format_node(
    n: Node, fins: list[QFormat], fo: QFormat, lo: int, hi: int
) -> tuple[dict[str, Any], dict[str, np.ndarray], Requant]:
    """Attributes to add, parameters and requantization of an unweighted node that changes no
    format class (lut, mul, softmax, resize, adaptive pools, gather, maxpool, reshape) in the
    integer graph, for any formats (power-of-two or dyadic, zero points): every method builds these
    nodes here. Power-of-two formats give shift-only requantizations (mul: fa + fb - fo)."""
    one = np.ones(1, dtype=np.int64)
    attrs: dict[str, Any] = {}
    params: dict[str, np.ndarray] = {}
    if n.op == "adaptive_avgpool2d":  # one divisor per output pixel
        divs = [_divide(int(c), fins[0], fo) for c in n.attrs["counts"]]
        pm, ps = (np.array(v, dtype=np.int64) for v in zip(*divs, strict=True))
        rq = Requant(pm, ps, fo.zero_point, lo, hi)
        area = max(r1 - r0 for r0, r1 in n.attrs["rows"]) * max(
            c1 - c0 for c0, c1 in n.attrs["cols"]
        )
        if fins[0].zero_point:
            attrs["input_zero_point"] = fins[0].zero_point
        attrs["acc_bits"] = _container_bits(area * _span(fins[0]))
    elif n.op == "mul":  # one exact product, requantized once
        zps = tuple(f.zero_point for f in fins)
        if any(zps):
            attrs["input_zero_points"] = zps
        if all(f.is_pow2 for f in (*fins, fo)):  # a shift: fa + fb - fo
            mult, shift = one, one * (fins[0].frac + fins[1].frac - fo.frac)
        else:
            mult, shift = dyadic(np.array([fins[0].scale * fins[1].scale / fo.scale]))
        rq = Requant(mult, shift, fo.zero_point, lo, hi)
        attrs["acc_bits"] = _container_bits(_span(fins[0]) * _span(fins[1]))
    elif n.op == "resize_bilinear":  # 4 exact products by integer weights, requantized once
        bits = reference.RESIZE_WEIGHT_BITS
        for axis in ("row", "col"):
            w = reference.resize_weights(n.attrs[f"{axis}_lambda"], bits)
            attrs[f"{axis}_weight"] = tuple(int(v) for v in w)
        attrs["weight_bits"] = bits
        if fins[0].zero_point:
            attrs["input_zero_point"] = fins[0].zero_point
        if fins[0].is_pow2 and fo.is_pow2:  # the weights' 2^(2 bits) and the formats: a shift
            mult, shift = one, one * (2 * bits + fins[0].frac - fo.frac)
        else:
            mult, shift = dyadic(np.array([fins[0].scale / fo.scale]))
            shift = shift + 2 * bits
        rq = Requant(mult, shift, fo.zero_point, lo, hi)
        # the weights are >= 0 and sum to 2^(2 bits): |acc| <= 2^(2 bits) * max|x - zp|
        attrs["acc_bits"] = _container_bits(_span(fins[0]) << (2 * bits))
    elif n.op == "softmax":  # an exp table and an exact rounded division (reference.softmax)
        if not fo.is_pow2 or fo.frac < 0:
            raise UnsupportedModelError(f"softmax '{n.name}' needs a power-of-two output")
        params = {"exp_table": reference.softmax_table(fins[0].scale)}
        attrs["out_frac"] = fo.frac
        rq = Requant(one, 0 * one, fo.zero_point, lo, hi)
    elif n.op == "lut":  # the function is the table; nothing accumulates
        table = lut.table(n.attrs["function"], n.attrs.get("args", ()), fins[0], fo, lo, hi)
        params = {"table": table}
        rq = Requant(one, 0 * one, fo.zero_point, lo, hi)
    elif n.op in ("maxpool2d", "adaptive_maxpool2d", "reshape", "gather", "zero_insert"):
        rq = Requant(one, 0 * one, fo.zero_point, lo, hi)  # the format is the input's
    else:
        raise ValueError(f"format_node does not build {n.op} nodes")
    return attrs, params, rq


def build_integer_graph(
    graph: Graph,
    fmts: Mapping[str, QFormat],
    weights: Mapping[str, WeightQuant],
    acc_bits: Mapping[str, int],
    tiles: Mapping[str, int] = {},
    acc2_bits: int = 32,
) -> Graph:
    """The integer graph; a layer in `tiles` accumulates in two stages (attrs acc_tile, acc2_bits:
    codegen.core.ir)."""
    tensors = {t: Tensor(t, v.shape, fmts[t]) for t, v in graph.tensors.items()}
    nodes = []
    for n in graph.nodes:
        fo = fmts[n.output]
        fins = [fmts[t] for t in n.inputs]
        lo, hi = clamp_limits(n.attrs.get("clamp", (-math.inf, math.inf)), fo)
        attrs = dict(n.attrs)
        params: dict[str, np.ndarray] = {}
        one = np.ones(1, dtype=np.int64)
        if n.op in WEIGHTED_OPS:
            wq = weights[n.name]
            shift = wq.frac + fins[0].frac - fo.frac
            params = {"weight": wq.q.astype(np.int64), "bias": wq.bias.astype(np.int64)}
            rq = Requant(np.ones_like(shift), shift, fo.zero_point, lo, hi)
            attrs["acc_bits"] = acc_bits[n.name]
            if n.name in tiles:
                attrs["acc_tile"] = int(tiles[n.name])
                attrs["acc2_bits"] = int(acc2_bits)
            attrs["weight_frac"] = tuple(int(f) for f in wq.frac)
        elif n.op in ("avgpool2d", "global_avgpool"):
            count = (
                n.attrs["kernel"][0] * n.attrs["kernel"][1]
                if n.op == "avgpool2d"
                else graph.tensors[n.inputs[0]].shape[0] * graph.tensors[n.inputs[0]].shape[1]
            )
            m, s = _divide_by(count, fins[0].frac, fo.frac)
            rq = Requant(one * m, one * s, fo.zero_point, lo, hi)
            attrs["acc_bits"] = _container_bits(count * max(-fins[0].qmin, fins[0].qmax))
        elif n.op == "add":
            fm = max(f.frac for f in fins)
            mult = [1 << (fm - f.frac) for f in fins]
            params = {"in_mult": np.array(mult, dtype=np.int64)}
            rq = Requant(one, one * (fm - fo.frac), fo.zero_point, lo, hi)
            peak = sum(m * max(-f.qmin, f.qmax) for m, f in zip(mult, fins, strict=True))
            attrs["acc_bits"] = _container_bits(peak)
        elif n.op == "concat":
            k = len(n.inputs)
            shifts = np.array([f.frac - fo.frac for f in fins], dtype=np.int64)
            rq = Requant(np.ones(k, dtype=np.int64), shifts, fo.zero_point, lo, hi)
        else:  # lut, mul, softmax, resize, adaptive pools, gather, maxpool2d, reshape
            more, params, rq = format_node(n, fins, fo, lo, hi)
            attrs.update(more)
        nodes.append(Node(n.name, n.op, n.inputs, n.output, attrs, params, rq))
    return graph.with_nodes(tuple(nodes), tensors)


def fakequant_overrides(graph: Graph) -> dict[str, dict[str, Any]]:
    """Real-valued parameters of an integer graph, for the float64 simulation (simulate.run)."""
    out: dict[str, dict[str, Any]] = {}
    for n in graph.nodes:
        fi = graph.tensors[n.inputs[0]].fmt
        fo = graph.tensors[n.output].fmt
        assert fi is not None and fo is not None and n.requant is not None
        if n.op in WEIGHTED_OPS and "weight_scale" in n.attrs:  # learned (dyadic) weight steps
            q = n.params["weight"].astype(np.float64)
            # the step the integer requantization realises: its multiplier times out / in
            realised = n.requant.mult * np.exp2(-n.requant.shift.astype(np.float64))
            sw = np.broadcast_to(realised * fo.scale / fi.scale, (q.shape[0],))
            w = q * sw.reshape((-1,) + (1,) * (q.ndim - 1))
            out[n.name] = {"weight": w, "bias": n.params["bias"] * fi.scale * sw}
        elif n.op in WEIGHTED_OPS:
            wf = np.asarray(n.attrs["weight_frac"], dtype=np.int64)
            wq = WeightQuant(n.params["weight"], wf, n.params["bias"], fi.frac, wf, wf)
            w, b = wq.dequantized()
            out[n.name] = {"weight": w, "bias": b}
        elif n.op in ("avgpool2d", "global_avgpool"):
            m, s = int(n.requant.mult[0]), int(n.requant.shift[0])
            out[n.name] = {"scale": m * 2.0**-s * fo.scale / fi.scale}
        elif n.op == "softmax":  # the integer exp table, at the input's scale
            out[n.name] = {"exp_table": n.params["exp_table"], "in_scale": fi.scale}
        elif n.op == "adaptive_avgpool2d":  # the realised 1 / count of each output pixel
            realised = n.requant.mult * np.exp2(-n.requant.shift.astype(np.float64))
            out[n.name] = {"scale": realised * fo.scale / fi.scale}
        elif n.op == "mul" and np.any(n.requant.mult != 1):  # a dyadic product's multiplier
            fb = graph.tensors[n.inputs[1]].fmt
            assert fb is not None
            realised = n.requant.mult * np.exp2(-n.requant.shift.astype(np.float64))
            out[n.name] = {"scale": float(realised[0]) * fo.scale / (fi.scale * fb.scale)}
        elif n.op == "resize_bilinear":  # the integer weights' real values
            one = 2.0 ** int(n.attrs["weight_bits"])
            out[n.name] = {f"{k}_lambda": np.asarray(n.attrs[f"{k}_weight"]) / one
                           for k in ("row", "col")}  # fmt: skip
    return out
