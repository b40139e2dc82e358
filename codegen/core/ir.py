"""The intermediate representation shared by every stage: plain, frozen data.

One `Graph` type serves both the float graph (what the frontend produces: float weights, no
formats) and the integer graph (what `quantize` produces: integer weights, a `QFormat` on every
tensor, a `Requant` on every node that rescales). Layout is NHWC; tensor shapes exclude the batch
dimension: (H, W, C) for images, (C,) for vectors, (1, L, C) for 1-D sequences (`Graph.sequences`).

Ops and their attributes (the integer kernels share these names with the reference functions,
the C templates and the test ids):

  conv2d          stride (sh, sw), padding (top, bottom, left, right), dilation (dh, dw), groups;
                  params weight (O, kh, kw, I/groups), bias (O,)
  dense           params weight (O, I), bias (O,)
  maxpool2d       kernel (kh, kw), stride, padding
  avgpool2d       kernel, stride, padding (count_include_pad semantics: divisor kh*kw)
  global_avgpool  mean over H and W
  add             two inputs, elementwise
  mul             two inputs, elementwise product; the second may be one value per channel
                  ((1, 1, C) or (C,)) broadcast over the first's pixels (squeeze-excitation)
  concat          inputs concatenated on the channel axis
  softmax         softmax over the channel axis, per pixel (classifier heads: (C,) or (1, 1, C));
                  integer graphs carry params exp_table (256 entries, 2^15 exp(-d * scale_in),
                  indexed by the distance d to the pixel's maximum) and attrs out_frac
  reshape         the NHWC memory order is kept; only the shape changes (flatten to (C,))
  lut             an element-wise function (attrs function, args: `codegen.core.lut`; also a
                  ReLU/clamp that fuses into no producer, with its bounds as `clamp`); integer
                  graphs carry its 256-entry int8 table, params table (indexed by q_in + 128)
  adaptive_avgpool2d  windows given per output row and column: rows, cols ((start, end) in input
                  coordinates, clipped to the input) and counts (the divisor of each output pixel,
                  row-major): adaptive pools to any size, ceil_mode / count_include_pad=False
                  average pools; integer graphs requantize per output pixel (requant.mult/shift
                  have one value per pixel, realising 1 / count)
  adaptive_maxpool2d  the max over the same windows (rows, cols)
  resize_bilinear  bilinear resizing (Upsample / interpolate / Resize, mode (bi)linear): attrs
                  rows, cols ((i0, i1): the two input rows (columns) each output row (column)
                  reads, PyTorch's source coordinate clamped to the input) and row_lambda,
                  col_lambda (the real weight of i1, in [0, 1]); integer graphs add weight_bits B
                  and row_weight, col_weight (the integer weight of i1; i0's is 2^B minus it),
                  accumulate the 4 products exactly and requantize once (reference.resize_bilinear)
  gather          channels picked by index (attrs index: the input channel of each output
                  channel): channel shuffle, chunk/split, any channel permutation or slice
  zero_insert     stride (sh, sw): sh - 1 rows and sw - 1 columns of zeros inserted between the
                  input's rows and columns, (H, W, C) -> ((H - 1) sh + 1, (W - 1) sw + 1, C); the
                  zeros are real 0 (the format's zero point, requant.zero_point; the format is the
                  input's). A transposed convolution is a zero_insert and a stride-1 conv2d

Float graphs carry `clamp` = (lo, hi) reals (fused ReLU, ReLU6, Hardtanh) in attrs. Integer graphs
fold the clamp into `requant.lo`/`requant.hi` and carry `acc_bits` in attrs.

Two-stage accumulation (conv2d, dense): attrs `acc_tile` = T (1 <= T) and `acc2_bits` (acc_bits <
acc2_bits <= 32, default 32). The K = terms_per_output terms of an output are taken in the weight
layout's order (conv2d: (kh, kw, I/groups) flattened, the input channel fastest; dense: I) and
summed in tiles of T consecutive terms (the last tile may be shorter); each tile sum wraps to
acc_bits, and the bias plus the wrapped tile sums wraps to acc2_bits, which is what is
requantized. The bias is added in the second (wide) stage. Without `acc_tile` the node sums in one
stage (bias included) of acc_bits. With T >= K and a zero bias, two stages equal one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from codegen.core.formats import int_range

WEIGHTED_OPS = frozenset({"conv2d", "dense"})
OPS = frozenset(
    {
        "conv2d",
        "dense",
        "maxpool2d",
        "avgpool2d",
        "global_avgpool",
        "add",
        "mul",
        "concat",
        "softmax",
        "reshape",
        "lut",
        "gather",
        "adaptive_avgpool2d",
        "adaptive_maxpool2d",
        "zero_insert",
        "resize_bilinear",
    }
)


@dataclass(frozen=True)
class QFormat:
    """An integer format: real = (q - zero_point) * scale, q in [qmin, qmax].

    The scale is 2^-frac (power of two) unless `step` is given (a dyadic format: any positive
    real step; `frac` then only names the nearest power of two, for display)."""

    bits: int
    signed: bool
    frac: int
    zero_point: int = 0
    step: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8 or (not self.signed and self.bits > 7):
            raise ValueError(f"activation format must fit int8 (unsigned <= 7 bits): {self}")

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed)[1]

    @property
    def scale(self) -> float:
        return self.step if self.step is not None else math.ldexp(1.0, -self.frac)

    @property
    def is_pow2(self) -> bool:
        return self.step is None

    def describe(self) -> str:
        kind = "s" if self.signed else "u"
        if self.step is not None:
            return f"{kind}{self.bits}*{self.step:.4g}"
        return f"{kind}{self.bits}.{self.frac}"


@dataclass(frozen=True)
class Requant:
    """Parameters of THE requantization (codegen.core.formats.requantize), per output channel."""

    mult: npt.NDArray[np.int64]
    shift: npt.NDArray[np.int64]
    zero_point: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    fmt: QFormat | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)
    requant: Requant | None = None


@dataclass(frozen=True)
class Graph:
    """Nodes in topological order; one input tensor and one or more output tensors.

    `output` is the first (or only) output; `extra_outputs` the others of a model with several
    outputs, in the model's order (`outputs` gives them all). An output may also feed other nodes,
    and two outputs may be the same tensor."""

    name: str
    nodes: tuple[Node, ...]
    tensors: Mapping[str, Tensor]
    input: str
    output: str
    sequences: frozenset[str] = frozenset()
    """Tensors that are 1-D sequences in the framework ((N, C, L), Conv1d and friends): their IR
    shape is the image (1, L, C) (H = 1); the API shows them to users as (N, C, L) floats and
    (N, L, C) integers."""
    extra_outputs: tuple[str, ...] = ()

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output tensor in the model's order (the first is `output`)."""
        return (self.output, *self.extra_outputs)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def producer(self, tensor: str) -> Node | None:
        for n in self.nodes:
            if n.output == tensor:
                return n
        return None

    def consumers(self, tensor: str) -> list[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    @property
    def is_quantized(self) -> bool:
        return all(t.fmt is not None for t in self.tensors.values())

    def with_nodes(self, nodes: tuple[Node, ...], tensors: Mapping[str, Tensor]) -> Graph:
        return replace(self, nodes=nodes, tensors=dict(tensors))

    def user_shape(self, tensor: str) -> tuple[int, ...]:
        """A tensor's shape (without batch) as the API and the generated C's callers hold its
        integers: the IR's, but (L, C) for a 1-D sequence (the IR's (1, L, C), the same bytes)."""
        shape = tuple(self.tensors[tensor].shape)
        return shape[1:] if tensor in self.sequences else shape


class TensorUnion:
    """Union-find over tensor names. The representative of a set is its first tensor in `order`
    (e.g. the earliest produced); tensors not in `order` rank last."""

    def __init__(self, tensors: Iterable[str], order: Mapping[str, int] | None = None):
        self.parent: dict[str, str] = {t: t for t in tensors}
        self.order = order or {}

    def find(self, t: str) -> str:
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        last = len(self.order)
        first = self.order.get(ra, last) <= self.order.get(rb, last)
        keep, drop = (ra, rb) if first else (rb, ra)
        self.parent[drop] = keep
        return keep

    def members(self, rep: str) -> list[str]:
        return [t for t in self.parent if self.find(t) == rep]


def conv_out_size(size: int, k: int, stride: int, pad0: int, pad1: int, dilation: int = 1) -> int:
    return (size + pad0 + pad1 - dilation * (k - 1) - 1) // stride + 1


def macs(graph: Graph, node: Node) -> int:
    """Multiply-accumulates of one inference of a weighted node (0 for other ops)."""
    out = graph.tensors[node.output]
    if node.op == "conv2d":
        _, kh, kw, cin_g = node.params["weight"].shape
        return out.size * kh * kw * cin_g
    if node.op == "dense":
        return int(node.params["weight"].size)
    return 0


def acc_tile(node: Node) -> int | None:
    """T of a two-stage node (attrs["acc_tile"]), None for a one-stage one."""
    t = node.attrs.get("acc_tile")
    return None if t is None else int(t)


def terms_per_output(node: Node) -> int:
    """K: the number of products summed into one accumulator."""
    w = node.params["weight"]
    return int(np.prod(w.shape[1:]))


Taps = tuple[tuple[tuple[int, int], ...], tuple[float, ...]]
"""((i0, i1) of each output row or column, the real weight of i1)."""


def bilinear_taps(
    size: int,
    out: int,
    align_corners: bool,
    scale: float | None = None,
    dtype: type[np.floating[Any]] = np.float32,
) -> Taps:
    """PyTorch's (bi)linear source rows (or columns) along one axis and the weight of the second
    (`upsample_bilinear2d`, in `dtype` like its CPU kernel: float32 for a float32 model): the
    source coordinate is i * (size - 1) / (out - 1) with `align_corners`, else (i + 0.5) * r - 0.5
    clamped at 0, with r = 1 / `scale` (a given scale factor) or size / out; i0 = floor,
    i1 = i0 + 1 but at the last row, and lambda1 = coordinate - i0 (the input's own size: each
    row itself)."""
    if size == out:
        return tuple((i, i) for i in range(out)), (0.0,) * out
    zero, one, half = dtype(0.0), dtype(1.0), dtype(0.5)
    dst = np.arange(out, dtype=dtype)
    if align_corners:
        ratio = dtype(size - 1) / dtype(out - 1) if out > 1 else zero
        src = ratio * dst
    else:
        ratio = dtype(1.0 / scale) if scale else dtype(size) / dtype(out)
        src = np.maximum(ratio * (dst + half) - half, zero)
    i0 = src.astype(np.int64)  # src >= 0: truncation is floor
    i1 = i0 + (i0 < size - 1)
    lam = np.clip(src - i0.astype(dtype), zero, one)
    rows = tuple((int(a), int(b)) for a, b in zip(i0, i1, strict=True))
    return rows, tuple(float(v) for v in lam)
