"""Differential fuzzing: random graphs and models, generated C == the NumPy reference, bit for bit.

Two kinds of cases, each a pure function of an integer seed (so a failure is replayed by its seed):

* **integer graphs** (`random_graph`): built directly from the IR with random shapes, strides,
  padding, dilation, groups, weight bits (declared in attrs["weight_bits"] half of the time, so
  weights of <= 4 bits are stored packed), accumulator widths 8..32, input/output zero points,
  clamps, requantization multipliers up to 33 bits, add and concat branches, element-wise
  function tables (`lut`), products (`mul`: a squeeze-excitation gate, a square, two branches),
  softmax, channel gathers (`gather`), zeros between the pixels (`zero_insert`, a transposed
  convolution's stride), adaptive pools to any size
  (`adaptive_avgpool2d`/`_maxpool2d`), bilinear resizing (`resize_bilinear`: random sizes,
  weight bits and accumulators) and two-stage accumulation (random tile length and
  second-stage width; `two_stage`), further outputs (intermediate or repeated tensors, in a
  fifth of the graphs), each kind from its own random stream. Weights and inputs
  are often drawn near the top of their range so that narrow accumulators wrap (the wrapped sum is
  the contract, so that is fine and tested).
* **quantized torch models** (`random_model`): small random nn.Modules (conv/BN/ReLU/ReLU6,
  Hardswish/SiLU/Sigmoid/Tanh/LeakyReLU, depthwise, ConvTranspose2d, pools, adaptive pools to
  any size, bilinear upsampling (nn.Upsample to any size, either align_corners), residual add,
  concat, chunk + channel shuffle, flatten, squeeze-excitation, linear, a softmax head)
  through `codegen.quantize` with a random accumulator width 8..32 and overflow policy (and, for
  a quarter of the models below 32 bits, `acc_stages=2`).
  `InfeasibleAccumulatorError` is a valid answer (counted as `infeasible`); any other exception
  is a failure.

`run_campaign` builds many cases in one CMake project (`build.build_many`, -Werror, optionally
ASan + UBSan) and runs each test bench on its sample inputs through the target's runner (QEMU for
ARM targets); every output must equal `reference.run` exactly (np.array_equal).

    python scripts/fuzz.py -n 10000            # or: make fuzz N=10000
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codegen.backend.emit import emit, write_files
from codegen.core import lut, reference
from codegen.core.errors import InfeasibleAccumulatorError
from codegen.core.formats import IntArray, wrap
from codegen.core.ir import Graph, Node, QFormat, Requant, Tensor, bilinear_taps, conv_out_size
from codegen.quant.ptq import _divide_by
from codegen.targets.build import BuildResult, BuildTarget, Target, build_many, resolve_target
from codegen.targets.compiled import run_testbench_outputs

# ----------------------------------------------------------------------------- integer graphs

_WIDE = Requant(np.array([1]), np.array([0]), 0, -(1 << 62), 1 << 62)
"""Identity requantization: the probe returns the wrapped accumulator itself."""


def _fmt(lo: int, hi: int, zero_point: int = 0) -> QFormat:
    if lo >= 0 and hi <= 127 and zero_point == 0:
        return QFormat(7, False, 4)
    return QFormat(8, True, 4, zero_point)


class _Builder:
    """A minimal random-graph builder (adapted from tests/graphs.py): each node's requantization
    is chosen from its actual accumulators on the sample batch, so outputs use the int8 range."""

    def __init__(self, name: str, rng: np.random.Generator, batch: int):
        self.name = name
        self.rng = rng
        self.batch = batch
        self.nodes: list[Node] = []
        self.tensors: dict[str, Tensor] = {}
        self.values: dict[str, IntArray] = {}
        self.input_name = ""
        self.two_rng: np.random.Generator | None = None

    def two_stage(self, attrs: dict[str, Any], params: dict[str, Any], k: int) -> None:
        """A quarter of the conv/dense layers below 32 bits accumulate in two stages: a random
        tile length (kernel-friendly or not, beyond K too) and second-stage width; the bias is
        redrawn for the second stage."""
        r = self.two_rng
        acc = int(attrs["acc_bits"])
        if r is None or acc >= 32 or r.random() >= 0.25:
            return
        tile = int(r.choice([1, 2, 3, 4, 5, 8, 16, 24, 32, int(r.integers(1, k + 4)), k]))
        acc2 = 32 if r.random() < 0.6 else int(r.integers(acc + 1, 33))
        attrs.update(acc_tile=max(1, tile), acc2_bits=acc2)
        top = (1 << (acc2 - 1)) - 1
        lo = top - 3000 if r.random() < 0.15 else -(1 << min(acc2 - 2, int(r.integers(2, 20))))
        params["bias"] = wrap(
            r.integers(lo, top + 1 if lo > 0 else -lo + 1, len(params["bias"])), acc2
        )

    def _tensor(self, shape: Sequence[int], fmt: QFormat, name: str | None = None) -> str:
        t = name or f"t{len(self.tensors)}"
        self.tensors[t] = Tensor(t, tuple(int(d) for d in shape), fmt)
        return t

    def _ints(self, lo: int, hi: int, shape: Sequence[int], dist: str) -> IntArray:
        if dist == "high":
            lo = max(lo, hi - max(1, (hi - lo) // 8))
        elif dist == "low":
            hi = min(hi, lo + max(1, (hi - lo) // 8))
        return self.rng.integers(lo, hi + 1, size=tuple(shape)).astype(np.int64)

    def _requant(
        self, acc: IntArray, per_channel: bool, lo: int, hi: int, zp: int, mult_bits: int
    ) -> Requant:
        c = acc.shape[-1]
        amax = np.abs(acc).reshape(-1, c).max(axis=0) if acc.size else np.zeros(c, np.int64)
        if not per_channel:
            amax = amax.max(keepdims=True)
        mult = self.rng.integers(1 << (mult_bits - 1), 1 << mult_bits, size=amax.shape[0])
        # aim the largest accumulator at the int8 limit, give or take a bit (some saturation)
        jitter = self.rng.integers(-1, 2, size=amax.shape[0])
        shift = [
            min(62, max(-31, (int(a) * int(m)).bit_length() - 7 + int(j)))
            for a, m, j in zip(amax, mult, jitter, strict=True)
        ]
        return Requant(mult.astype(np.int64), np.array(shift, dtype=np.int64), zp, lo, hi)

    def _add(self, node: Node) -> str:
        out = self.tensors[node.output]
        y = reference.run_node(node, [self.values[t] for t in node.inputs])
        self.values[node.output] = y.reshape((y.shape[0], *out.shape))
        self.nodes.append(node)
        return node.output

    def _clamp(self) -> tuple[int, int, int]:
        """(lo, hi, zero_point) of an output: full int8, ReLU, ReLU6-like, or a zero point."""
        r = self.rng.random()
        if r < 0.45:
            return -128, 127, 0
        if r < 0.7:
            return 0, 127, 0
        if r < 0.85:
            return 0, int(self.rng.integers(1, 128)), 0
        zp = int(self.rng.integers(-20, 21))
        return int(self.rng.integers(-128, zp + 1)), 127, zp

    def finish(
        self, op: str, inputs: Sequence[str], shape: Sequence[int], attrs: dict[str, Any],
        params: dict[str, Any], per_channel: bool, mult_bits: int,
    ) -> str:  # fmt: skip
        name = f"{op}{len(self.nodes)}"
        lo, hi, zp = self._clamp()
        out = self._tensor(shape, _fmt(lo, hi, zp))
        probe = Node(name, op, tuple(inputs), out, attrs, params, _WIDE)
        acc = reference.run_node(probe, [self.values[t] for t in inputs])
        rq = self._requant(acc, per_channel, lo, hi, zp, mult_bits)
        return self._add(Node(name, op, tuple(inputs), out, attrs, params, rq))

    def in_zp(self, x: str) -> int:
        """A random input zero point for unsigned inputs (the kernels subtract it)."""
        fmt = self.tensors[x].fmt
        if fmt is not None and not fmt.signed and self.rng.random() < 0.3:
            return int(self.rng.integers(1, 100))
        return 0

    def bias(self, cout: int, acc_bits: int) -> IntArray:
        r = self.rng.random()
        if r < 0.15:  # at the top of the accumulator: wraps
            lo, hi = (1 << (acc_bits - 1)) - 3000, (1 << (acc_bits - 1)) - 1
        elif r < 0.25:
            return np.zeros(cout, dtype=np.int64)
        else:
            span = 1 << min(acc_bits - 2, int(self.rng.integers(2, 14)))
            lo, hi = -span, span
        return wrap(self.rng.integers(lo, hi + 1, size=cout), acc_bits)

    def graph(self, extra: tuple[str, ...] = ()) -> tuple[Graph, IntArray]:
        """The graph, its output the last node's, then the further outputs `extra`."""
        out = self.nodes[-1].output
        used = {self.input_name, out} | {t for n in self.nodes for t in (*n.inputs, n.output)}
        tensors = {k: v for k, v in self.tensors.items() if k in used}
        g = Graph(self.name, tuple(self.nodes), tensors, self.input_name, out, extra_outputs=extra)
        return g, self.values[self.input_name]


def _acc(rng: np.random.Generator) -> int:
    """Accumulator widths 8..32, with the container edges (16/17, 32) more often."""
    if rng.random() < 0.3:
        return int(rng.choice([8, 15, 16, 17, 31, 32]))
    return int(rng.integers(8, 33))


def _mult_bits(rng: np.random.Generator) -> int:
    return int(rng.choice([1, 8, 12, 15, 16, 24, 31, 33]))


def _conv(b: _Builder, x: str, cout: int | None = None, same: bool = False) -> str:
    rng = b.rng
    h, w, cin = b.tensors[x].shape
    groups = 1
    r = rng.random()
    if r < 0.25:
        groups = cin  # depthwise (multiplier 1 or 2)
    elif r < 0.4:
        divs = [g for g in range(2, cin) if cin % g == 0]  # grouped, not depthwise
        groups = int(rng.choice(divs)) if divs else 1
    if cout is None:
        if groups == cin:
            cout = groups * int(rng.integers(1, 3))
        elif groups > 1 and rng.random() < 0.5:  # whole blocks of 4 outputs per group
            cout = groups * 4 * int(rng.integers(1, 3))  # (the Cortex-M grouped kernels)
        else:
            cout = int(rng.integers(1, 13))
    if cout % groups:
        cout = groups * max(1, cout // groups)
    if same:
        kh = kw = int(rng.choice([1, 3]))
        stride, dil = (1, 1), (1, 1)
        pad: tuple[int, ...] = (kh // 2,) * 4
    else:
        kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        dil = (1, 1) if rng.random() < 0.7 else (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        pad = tuple(int(v) for v in rng.integers(0, 3, 4)) if rng.random() < 0.6 else (0, 0, 0, 0)
        if rng.random() < 0.3:
            kh = kw = 1
            pad = (0, 0, 0, 0)
    oh = conv_out_size(h, kh, stride[0], pad[0], pad[1], dil[0])
    ow = conv_out_size(w, kw, stride[1], pad[2], pad[3], dil[1])
    if oh < 1 or ow < 1:  # the window does not fit: fall back to a same-size 1x1
        kh = kw = 1
        stride, dil, pad = (1, 1), (1, 1), (0, 0, 0, 0)
        oh, ow = h, w
    acc = _acc(rng)
    w_bits = int(rng.integers(2, 9))
    wmax = (1 << (w_bits - 1)) - 1
    positive = rng.random() < 0.25
    dist = "high" if positive else str(rng.choice(["uniform", "uniform", "low"]))
    weight = b._ints(0 if positive else -wmax, wmax, (cout, kh, kw, cin // groups), dist)
    attrs: dict[str, Any] = {
        "stride": stride, "padding": pad, "dilation": dil, "groups": groups, "acc_bits": acc,
    }  # fmt: skip
    if rng.random() < 0.5:  # declared: stored packed (layouts.pack_bits) when w_bits <= 4
        attrs["weight_bits"] = w_bits
    zp = b.in_zp(x)
    if zp:
        attrs["input_zero_point"] = zp
    params = {"weight": weight, "bias": b.bias(cout, acc)}
    b.two_stage(attrs, params, kh * kw * (cin // groups))
    return b.finish(
        "conv2d", [x], (oh, ow, cout), attrs, params, bool(rng.random() < 0.7), _mult_bits(rng)
    )


def _dense(b: _Builder, x: str, cout: int | None = None) -> str:
    rng = b.rng
    (cin,) = b.tensors[x].shape
    cout = cout or int(rng.integers(1, 17))
    acc = _acc(rng)
    positive = rng.random() < 0.25
    w_bits = int(rng.choice([2, 3, 4, 8, 8, 8]))
    wmax = (1 << (w_bits - 1)) - 1
    weight = b._ints(0 if positive else -wmax, wmax, (cout, cin), "high" if positive else "uniform")
    attrs: dict[str, Any] = {"acc_bits": acc}
    if w_bits < 8 or rng.random() < 0.2:  # declared: stored packed when w_bits <= 4
        attrs["weight_bits"] = w_bits
    zp = b.in_zp(x)
    if zp:
        attrs["input_zero_point"] = zp
    params = {"weight": weight, "bias": b.bias(cout, acc)}
    b.two_stage(attrs, params, cin)
    return b.finish("dense", [x], (cout,), attrs, params, bool(rng.random() < 0.7), _mult_bits(rng))


def _pool(b: _Builder, x: str, op: str) -> str:
    rng = b.rng
    h, w, c = b.tensors[x].shape
    kh, kw = int(rng.integers(1, min(h, 4) + 1)), int(rng.integers(1, min(w, 4) + 1))
    stride = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    pad = (
        tuple(int(rng.integers(0, k)) for k in (kh, kh, kw, kw)) if rng.random() < 0.4 else (0,) * 4
    )
    oh = conv_out_size(h, kh, stride[0], pad[0], pad[1])
    ow = conv_out_size(w, kw, stride[1], pad[2], pad[3])
    attrs: dict[str, Any] = {"kernel": (kh, kw), "stride": stride, "padding": pad}
    if op == "maxpool2d":
        lo, hi, _ = b._clamp()
        out = b._tensor((oh, ow, c), _fmt(lo, hi))
        rq = Requant(np.array([1]), np.array([0]), 0, lo, hi)
        return b._add(Node(f"maxpool2d{len(b.nodes)}", op, (x,), out, attrs, {}, rq))
    attrs["acc_bits"] = _acc(rng)
    zp = b.in_zp(x)
    if zp:
        attrs["input_zero_point"] = zp
    return b.finish(op, [x], (oh, ow, c), attrs, {}, bool(rng.random() < 0.3), 12)


def _gap(b: _Builder, x: str) -> str:
    c = b.tensors[x].shape[-1]
    attrs: dict[str, Any] = {"acc_bits": _acc(b.rng)}
    zp = b.in_zp(x)
    if zp:
        attrs["input_zero_point"] = zp
    return b.finish("global_avgpool", [x], (c,), attrs, {}, bool(b.rng.random() < 0.3), 12)


def _add_op(b: _Builder, a: str, c: str) -> str:
    acc = _acc(b.rng)
    top = 1 << max(1, min(acc - 9, 14))
    in_mult = np.array([int(b.rng.integers(1, top)), int(b.rng.integers(1, top))], np.int64)
    attrs: dict[str, Any] = {"acc_bits": acc}
    zps = (b.in_zp(a), b.in_zp(c))
    if any(zps):
        attrs["input_zero_points"] = zps
    shape = b.tensors[a].shape
    params = {"in_mult": in_mult}
    return b.finish("add", [a, c], shape, attrs, params, bool(b.rng.random() < 0.3), 12)


def _concat(b: _Builder, xs: Sequence[str]) -> str:
    shapes = [b.tensors[x].shape for x in xs]
    out_shape = (*shapes[0][:-1], sum(s[-1] for s in shapes))
    lo, hi, zp = b._clamp()
    out = b._tensor(out_shape, _fmt(lo, hi, zp))
    n = len(xs)
    mult = b.rng.integers(1, 256, size=n).astype(np.int64)
    shift = np.array([int(m).bit_length() - 1 + int(b.rng.integers(-1, 2)) for m in mult])
    zps = tuple(b.in_zp(x) for x in xs)
    attrs: dict[str, Any] = {"input_zero_points": zps} if any(zps) else {}
    rq = Requant(mult, shift.astype(np.int64), zp, lo, hi)
    return b._add(Node(f"concat{len(b.nodes)}", "concat", tuple(xs), out, attrs, {}, rq))


def _flatten(b: _Builder, x: str) -> str:
    fmt = b.tensors[x].fmt
    assert fmt is not None
    out = b._tensor((b.tensors[x].size,), fmt)
    node = Node(f"reshape{len(b.nodes)}", "reshape", (x,), out, {"shape": (b.tensors[x].size,)})
    return b._add(node)


def _lut(b: _Builder, x: str, rng: np.random.Generator) -> str:
    """An element-wise function table, from the input's format to a random one."""
    fin = b.tensors[x].fmt
    assert fin is not None
    function = str(rng.choice(sorted(lut.FUNCTIONS)))
    args = {
        "leaky_relu": (float(rng.choice([0.01, 0.1, 0.3])),),
        "clamp": (-0.5, 1.0),  # ReLU6/Hardtanh/clamp that fuse into nothing
        "scale": (float(rng.choice([-1.5, 0.3, 2.0])),),  # x * a constant
    }.get(function, ())
    if rng.random() < 0.5:
        fo = QFormat(8, True, int(rng.integers(2, 8)), int(rng.integers(-20, 21)))
    else:
        fo = QFormat(7, False, int(rng.integers(3, 8)))
    table = lut.table(function, args, fin, fo)
    out = b._tensor(b.tensors[x].shape, fo)
    rq = Requant(np.ones(1, np.int64), np.zeros(1, np.int64), fo.zero_point, fo.qmin, fo.qmax)
    attrs = {"function": function, "args": args}
    return b._add(Node(f"lut{len(b.nodes)}", "lut", (x,), out, attrs, {"table": table}, rq))


def _mul(b: _Builder, x: str, rng: np.random.Generator) -> str:
    """x times a per-channel gate computed from x (squeeze-excitation: pooled, dense, as (C,) or
    (1, 1, C)), or times a tensor of its shape (x itself, or a same-size layer of x). The draws
    come from `rng` (its own stream: the graph's other layers do not depend on them)."""
    saved, b.rng = b.rng, rng
    try:
        shape = b.tensors[x].shape
        if len(shape) == 3 and rng.random() < 0.6:
            gate = _dense(b, _gap(b, x), shape[-1])
            if rng.random() < 0.5:  # the gate as the image (1, 1, C)
                fmt = b.tensors[gate].fmt
                assert fmt is not None
                out = b._tensor((1, 1, shape[-1]), fmt)
                attrs: dict[str, Any] = {"shape": (1, 1, shape[-1])}
                gate = b._add(Node(f"reshape{len(b.nodes)}", "reshape", (gate,), out, attrs))
        elif rng.random() < 0.3:
            gate = x  # a square
        else:
            gate = _conv(b, x, shape[-1], same=True) if len(shape) == 3 else _dense(b, x, shape[0])
        attrs = {"acc_bits": _acc(rng)}
        zps = (b.in_zp(x), b.in_zp(gate))
        if any(zps):
            attrs["input_zero_points"] = zps
        return b.finish("mul", [x, gate], shape, attrs, {}, bool(rng.random() < 0.3), 12)
    finally:
        b.rng = saved


def _softmax(b: _Builder, x: str, rng: np.random.Generator) -> str:
    """A softmax over the channels (of a vector or of every pixel) to a random output format."""
    fin = b.tensors[x].fmt
    assert fin is not None
    if rng.random() < 0.5:
        fo = QFormat(7, False, int(rng.integers(4, 8)))
    else:
        fo = QFormat(8, True, int(rng.integers(5, 9)), int(rng.integers(-100, 1)))
    out = b._tensor(b.tensors[x].shape, fo)
    rq = Requant(np.ones(1, np.int64), np.zeros(1, np.int64), fo.zero_point, fo.qmin, fo.qmax)
    params = {"exp_table": reference.softmax_table(fin.scale)}
    node = Node(f"softmax{len(b.nodes)}", "softmax", (x,), out, {"out_frac": fo.frac}, params, rq)
    return b._add(node)


def _gather(b: _Builder, x: str, rng: np.random.Generator) -> str:
    """Channels picked by index: a permutation (channel shuffle) or a slice (chunk, split)."""
    fmt = b.tensors[x].fmt
    assert fmt is not None
    shape = b.tensors[x].shape
    c = shape[-1]
    if rng.random() < 0.5:
        index = [int(i) for i in rng.permutation(c)]
    else:
        start = int(rng.integers(0, c))
        index = list(range(start, int(rng.integers(start + 1, c + 1))))
    out = b._tensor((*shape[:-1], len(index)), fmt)
    lo, hi = (fmt.qmin, fmt.qmax) if rng.random() < 0.7 else (max(fmt.qmin, -3), 60)
    rq = Requant(np.ones(1, np.int64), np.zeros(1, np.int64), fmt.zero_point, lo, hi)
    attrs = {"index": tuple(index)}
    return b._add(Node(f"gather{len(b.nodes)}", "gather", (x,), out, attrs, {}, rq))


def _adaptive(b: _Builder, x: str, rng: np.random.Generator) -> str:
    """An adaptive average or max pool to a random size (smaller, larger or not dividing)."""
    h, w, c = b.tensors[x].shape
    oh, ow = int(rng.integers(1, h + 3)), int(rng.integers(1, w + 3))
    rows = tuple((i * h // oh, -(-(i + 1) * h // oh)) for i in range(oh))
    cols = tuple((j * w // ow, -(-(j + 1) * w // ow)) for j in range(ow))
    attrs: dict[str, Any] = {"rows": rows, "cols": cols}
    if rng.random() < 0.4:
        fmt = b.tensors[x].fmt
        assert fmt is not None
        out = b._tensor((oh, ow, c), fmt)
        one, zero = np.ones(1, np.int64), np.zeros(1, np.int64)
        rq = Requant(one, zero, fmt.zero_point, fmt.qmin, fmt.qmax)
        return b._add(Node(f"apool{len(b.nodes)}", "adaptive_maxpool2d", (x,), out, attrs, {}, rq))
    counts = [(r1 - r0) * (c1 - c0) for r0, r1 in rows for c0, c1 in cols]
    attrs.update(counts=tuple(counts), acc_bits=int(rng.integers(8, 33)))
    fin = b.tensors[x].fmt
    assert fin is not None
    if fin.zero_point:
        attrs["input_zero_point"] = fin.zero_point
    lo, hi, out_zp = [(-128, 127, 0), (0, 127, 0), (-100, 127, -7)][int(rng.integers(0, 3))]
    out = b._tensor((oh, ow, c), _fmt(lo, hi, out_zp))
    fo = int(rng.integers(2, 6))
    divs = [_divide_by(n, 4, fo) for n in counts]
    mult, shift = (np.array(v, dtype=np.int64) for v in zip(*divs, strict=True))
    rq = Requant(mult, shift, out_zp, lo, hi)
    return b._add(Node(f"apool{len(b.nodes)}", "adaptive_avgpool2d", (x,), out, attrs, {}, rq))


def _zero_insert(b: _Builder, x: str, rng: np.random.Generator) -> str:
    """Zeros (the input format's zero point) between the pixels: a transposed convolution's
    stride (the main stream's next layer is often the conv2d that completes it)."""
    fmt = b.tensors[x].fmt
    assert fmt is not None
    h, w, c = b.tensors[x].shape
    sh, sw = (int(v) for v in rng.integers(1, 4, 2))
    out = b._tensor(((h - 1) * sh + 1, (w - 1) * sw + 1, c), fmt)
    rq = Requant(np.ones(1, np.int64), np.zeros(1, np.int64), fmt.zero_point, fmt.qmin, fmt.qmax)
    attrs = {"stride": (sh, sw)}
    return b._add(Node(f"zeros{len(b.nodes)}", "zero_insert", (x,), out, attrs, {}, rq))


def _resize(b: _Builder, x: str, rng: np.random.Generator) -> str:
    """Bilinear resizing to a random size (PyTorch's taps, either align_corners) with random
    weight bits 0..8 and the narrowest accumulator its exact bound allows, or wider."""
    h, w, c = b.tensors[x].shape
    oh, ow = int(rng.integers(1, 2 * h + 3)), int(rng.integers(1, 2 * w + 3))
    corners = bool(rng.random() < 0.5)
    bits = int(rng.integers(0, 9))
    attrs: dict[str, Any] = {"weight_bits": bits}
    for key, size, o in (("row", h, oh), ("col", w, ow)):
        taps, lam = bilinear_taps(size, o, corners)
        attrs[f"{key}s"], attrs[f"{key}_lambda"] = taps, lam
        attrs[f"{key}_weight"] = tuple(int(v) for v in reference.resize_weights(lam, bits))
    fin = b.tensors[x].fmt
    assert fin is not None
    if fin.zero_point:
        attrs["input_zero_point"] = fin.zero_point
    span = max(fin.qmax - fin.zero_point, fin.zero_point - fin.qmin)
    attrs["acc_bits"] = int(rng.integers((span << (2 * bits)).bit_length() + 1, 33))
    return b.finish("resize_bilinear", [x], (oh, ow, c), attrs, {}, bool(rng.random() < 0.3),
                    _mult_bits(rng))  # fmt: skip


def random_graph(seed: int, batch: int = 4) -> tuple[Graph, IntArray]:
    """A random integer graph of 1..6 layers and its sample batch (quantized NHWC ints); some
    layers are followed by an element-wise table (drawn from their own stream, so a seed's other
    layers do not depend on them)."""
    rng = np.random.default_rng([0x51ACC, seed])
    lut_rng = np.random.default_rng([0x51ACC, seed, 1])
    mul_rng = np.random.default_rng([0x51ACC, seed, 2])  # products and softmax
    gather_rng = np.random.default_rng([0x51ACC, seed, 3])
    pool_rng = np.random.default_rng([0x51ACC, seed, 4])
    b = _Builder(f"g{seed}", rng, batch)
    b.two_rng = np.random.default_rng([0x51ACC, seed, 5])
    zeros_rng = np.random.default_rng([0x51ACC, seed, 6])  # transposed convolutions' zeros
    resize_rng = np.random.default_rng([0x51ACC, seed, 8])  # bilinear resizing
    lo, hi = (0, 127) if rng.random() < 0.35 else (-128, 127)
    dist = str(rng.choice(["uniform", "uniform", "high", "low"]))
    if rng.random() < 0.2:
        shape: tuple[int, ...] = (int(rng.integers(1, 48)),)
    else:
        shape = (int(rng.integers(1, 10)), int(rng.integers(1, 10)), int(rng.integers(1, 9)))
    b.input_name = b._tensor(shape, _fmt(lo, hi), "input")
    b.values["input"] = b._ints(lo, hi, (batch, *shape), dist)
    t = "input"
    for _ in range(int(rng.integers(1, 7))):
        shp = b.tensors[t].shape
        r = rng.random()
        if len(shp) == 1:
            if r < 0.6:
                t = _dense(b, t)
            elif r < 0.8:
                t = _concat(b, [_dense(b, t), _dense(b, t)])
            else:
                t = _add_op(b, t, _dense(b, t, shp[0]))
            if lut_rng.random() < 0.2:
                t = _lut(b, t, lut_rng)
            if mul_rng.random() < 0.15:
                t = _mul(b, t, mul_rng)
            if gather_rng.random() < 0.15:
                t = _gather(b, t, gather_rng)
            continue
        if zeros_rng.random() < 0.1:
            t = _zero_insert(b, t, zeros_rng)
        if r < 0.35:
            t = _conv(b, t)
        elif r < 0.45:
            t = _pool(b, t, "maxpool2d")
        elif r < 0.55:
            t = _pool(b, t, "avgpool2d")
        elif r < 0.65:  # residual: x + conv(x) (same shape)
            t = _add_op(b, t, _conv(b, t, shp[-1], same=True))
        elif r < 0.75:  # branches concatenated on channels (same spatial size)
            branches = [_conv(b, t, same=True) for _ in range(int(rng.integers(1, 3)))]
            if rng.random() < 0.5:
                branches.append(t)
            t = _concat(b, branches)
        elif r < 0.85:
            t = _gap(b, t)
        else:
            t = _flatten(b, t)
        if lut_rng.random() < 0.2:
            t = _lut(b, t, lut_rng)
        if mul_rng.random() < 0.2 and len(b.tensors[t].shape) == 3:
            t = _mul(b, t, mul_rng)
        if gather_rng.random() < 0.15:
            t = _gather(b, t, gather_rng)
        if len(b.tensors[t].shape) == 3 and pool_rng.random() < 0.12:
            t = _adaptive(b, t, pool_rng)
        if len(b.tensors[t].shape) == 3 and resize_rng.random() < 0.1:
            t = _resize(b, t, resize_rng)
    if not b.nodes:
        t = _flatten(b, t)
    if mul_rng.random() < 0.2:
        t = _softmax(b, t, mul_rng)
    out_rng = np.random.default_rng([0x51ACC, seed, 7])  # several outputs, in a fifth of graphs
    produced = [n.output for n in b.nodes]
    several = out_rng.random() < 0.2
    extra = out_rng.choice(produced, int(out_rng.integers(1, 3))) if several else ()
    return b.graph(tuple(str(o) for o in extra))


# ----------------------------------------------------------------------------- torch models


def random_model(seed: int) -> tuple[Any, np.ndarray, np.ndarray, int, str]:
    """(nn.Module, calibration inputs, test inputs, acc_bits, overflow policy), all from `seed`."""
    import torch
    from torch import nn

    rng = np.random.default_rng([0x70C4, seed])
    lut_rng = np.random.default_rng([0x70C4, seed, 1])  # its own stream: other draws unchanged
    mul_rng = np.random.default_rng([0x70C4, seed, 2])  # squeeze-excitation, softmax head
    torch.manual_seed(int(rng.integers(0, 2**31)))
    cin = int(rng.integers(1, 5))
    size = int(rng.integers(4, 11))

    def act() -> nn.Module:
        m = [nn.ReLU(), nn.ReLU6(), nn.Identity()][int(rng.integers(0, 3))]
        if lut_rng.random() < 0.25:  # a table activation instead
            luts = [nn.Hardswish(), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU(0.1)]
            return luts[int(lut_rng.integers(0, len(luts)))]
        return m

    class Residual(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c if rng.random() < 0.3 else 1)
            self.act = act()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x + self.conv(x))

    class SqueezeExcitation(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            mid = int(mul_rng.integers(1, c + 1))
            self.down, self.up = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)
            self.gate = [nn.Sigmoid(), nn.Hardsigmoid()][int(mul_rng.integers(0, 2))]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gate(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))

    def squeeze_excitation(c: int) -> nn.Module:
        """Its weights from their own torch stream: the other layers' do not change."""
        with torch.random.fork_rng():
            torch.manual_seed(int(mul_rng.integers(0, 2**31)))
            return SqueezeExcitation(c)

    class Concat(nn.Module):
        def __init__(self, c: int, a: int, b: int):
            super().__init__()
            self.a = nn.Conv2d(c, a, 1)
            self.b = nn.Conv2d(c, b, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)

    class Shuffle(nn.Module):  # ShuffleNetV2: chunk, one half through a ReLU, cat, shuffle
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.size()
            a, b = x.chunk(2, dim=1)
            y = torch.cat((b, torch.relu(a)), dim=1).view(n, 2, c // 2, h, w)
            return torch.transpose(y, 1, 2).contiguous().view(n, c, h, w)

    shuffle_rng = np.random.default_rng([0x70C4, seed, 3])
    up_rng = np.random.default_rng([0x70C4, seed, 4])  # transposed convolutions

    def conv_transpose(c: int, h: int) -> tuple[nn.Module, int, int]:
        """A ConvTranspose2d (its weights from their own torch stream), its channels and size."""
        k, s, d = (int(v) for v in (up_rng.integers(1, 4), up_rng.integers(1, 3),
                                    up_rng.choice([1, 1, 2])))  # fmt: skip
        p = int(up_rng.integers(0, d * (k - 1) + 1))
        op = int(up_rng.integers(0, max(s, d)))
        if (h - 1) * s - 2 * p + d * (k - 1) + op + 1 < 1:
            p = 0  # the padding would crop everything
        g = c if c > 1 and up_rng.random() < 0.25 else 1
        cout = g * int(up_rng.integers(1, 3)) if g > 1 else int(up_rng.integers(1, 7))
        with torch.random.fork_rng():
            torch.manual_seed(int(up_rng.integers(0, 2**31)))
            m = nn.ConvTranspose2d(c, cout, k, s, p, op, groups=g, dilation=d)
        return m, cout, (h - 1) * s - 2 * p + d * (k - 1) + op + 1

    resize_rng = np.random.default_rng([0x70C4, seed, 5])  # bilinear resizing
    layers: list[nn.Module] = []
    c, h = cin, size
    for _ in range(int(rng.integers(1, 4))):
        if up_rng.random() < 0.15 and h <= 10:
            up, c, h = conv_transpose(c, h)
            layers += [up, nn.ReLU()] if up_rng.random() < 0.5 else [up]
        if c % 2 == 0 and shuffle_rng.random() < 0.2:
            layers.append(Shuffle())
        if shuffle_rng.random() < 0.15:  # windows of different sizes (any output size)
            h = int(shuffle_rng.integers(1, h + 3))
            pool = nn.AdaptiveAvgPool2d if shuffle_rng.random() < 0.6 else nn.AdaptiveMaxPool2d
            layers.append(pool(h))
        if resize_rng.random() < 0.12:
            h = int(resize_rng.integers(1, 2 * h + 2))
            corners = bool(resize_rng.random() < 0.5)
            layers.append(nn.Upsample(size=h, mode="bilinear", align_corners=corners))
        r = rng.random()
        if r < 0.45:
            k = int(rng.integers(1, min(h, 3) + 1))
            s = int(rng.integers(1, 3))
            p = int(rng.integers(0, k // 2 + 1))
            cout = int(rng.integers(1, 9))
            g = c if (cout % c == 0 and rng.random() < 0.3) else 1
            layers.append(nn.Conv2d(c, cout, k, stride=s, padding=p, groups=g))
            if rng.random() < 0.4:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(act())
            c, h = cout, (h + 2 * p - k) // s + 1
            if mul_rng.random() < 0.25:
                layers.append(squeeze_excitation(c))
        elif r < 0.6 and h >= 2:
            layers.append(nn.MaxPool2d(2) if rng.random() < 0.5 else nn.AvgPool2d(2))
            h = h // 2
        elif r < 0.8:
            layers.append(Residual(c))
        else:
            a, bb = int(rng.integers(1, 5)), int(rng.integers(1, 5))
            layers.append(Concat(c, a, bb))
            c = a + bb
    if rng.random() < 0.5:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        feat = c
    else:
        layers.append(nn.Flatten())
        feat = c * h * h
    layers.append(nn.Linear(feat, int(rng.integers(1, 8))))
    if mul_rng.random() < 0.2:
        layers.append(nn.Softmax(dim=1))
    model = nn.Sequential(*layers).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
                m.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
    signed = bool(rng.random() < 0.5)
    n = int(rng.integers(8, 25))

    def data(k: int, scale: float) -> np.ndarray:
        x = (
            rng.standard_normal((k, cin, size, size))
            if signed
            else rng.random((k, cin, size, size))
        )
        return (x * scale).astype(np.float32)

    calib = data(n, 1.0)
    test = np.concatenate([calib[:2], data(3, 1.0), data(2, 3.0)])  # beyond the calibrated range
    policy = "guaranteed" if rng.random() < 0.6 else "profiled"
    return model, calib, test, _acc(rng), policy


# ----------------------------------------------------------------------------- the campaign


@dataclass
class Case:
    """One fuzz case ready to build: an integer graph and its quantized sample inputs."""

    id: str
    graph: Graph
    x: IntArray
    kind: str  # "graph" or "model"


@dataclass
class FuzzStats:
    cases: int = 0
    """Cases whose C ran and was compared with the reference."""
    mismatches: int = 0
    infeasible: int = 0
    """Torch models for which codegen.quantize answered InfeasibleAccumulatorError (valid)."""
    wrapped: int = 0
    """Compared cases in which the reference saw the accumulator wrap (narrow widths at work)."""
    errors: int = 0
    """Cases that failed to generate, build or run (each is a bug, listed in `failures`)."""
    by_kind: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: FuzzStats) -> None:
        self.cases += other.cases
        self.mismatches += other.mismatches
        self.infeasible += other.infeasible
        self.wrapped += other.wrapped
        self.errors += other.errors
        for k, v in other.by_kind.items():
            self.by_kind[k] = self.by_kind.get(k, 0) + v
        self.failures += other.failures

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.errors == 0

    def summary(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.by_kind.items()))
        return (
            f"fuzz: {self.cases} cases run ({kinds}), {self.mismatches} mismatches, "
            f"{self.errors} errors, {self.infeasible} infeasible (valid refusals), "
            f"{self.wrapped} with accumulator wrap-around, {self.seconds:.0f} s"
        )


def make_case(seed: int, model_share: float = 0.25) -> Case | None:
    """The case of `seed`: a torch model with probability `model_share`, else an integer graph.

    Returns None when api.quantize refuses the accumulator width (InfeasibleAccumulatorError).
    """
    rng = np.random.default_rng([0xCA5E, seed])
    if rng.random() < model_share:
        from codegen import api

        model, calib, test, acc, policy = random_model(seed)
        two = acc < 32 and np.random.default_rng([0xCA5E, seed, 2]).random() < 0.25
        try:
            qm = api.quantize(
                model, calib, acc_bits=acc, overflow=policy, progress=False, name=f"m{seed}",
                acc_stages=2 if two else 1,
            )  # fmt: skip
        except InfeasibleAccumulatorError:
            return None
        return Case(f"m{seed}", qm.graph, qm.quantize_input(test), "model")
    g, x = random_graph(seed)
    return Case(f"g{seed}", g, x, "graph")


def run_cases(
    seeds: Sequence[int],
    target: str | Target = "host",
    workdir: Path | None = None,
    *,
    sanitize: bool = False,
    model_share: float = 0.25,
    jobs: int | None = None,
) -> FuzzStats:
    """Generate the cases of `seeds`, build them in one CMake project for `target`, run each test
    bench and compare with the reference exactly. Nothing raises for a bad case: it is counted."""
    stats = FuzzStats()
    t0 = time.monotonic()
    tgt = resolve_target(target)
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="qacc-fuzz-")) if workdir is None else Path(workdir)
    try:
        cases: dict[Path, Case] = {}
        for seed in seeds:
            try:
                case = make_case(seed, model_share)
            except Exception as e:
                stats.errors += 1
                stats.failures.append(f"seed {seed}: generating the case failed: {_one_line(e)}")
                continue
            if case is None:
                stats.infeasible += 1
                continue
            try:
                d = root / "models" / case.id
                write_files(emit(case.graph, case.id, tgt), d)
                cases[d] = case
            except Exception as e:
                stats.errors += 1
                stats.failures.append(f"{case.id}: emit failed: {_one_line(e)}")
        if cases:
            results = build_many(
                list(cases), root / "build", tgt, sanitize=sanitize, testbench=True, jobs=jobs
            )
            for d, case in cases.items():
                _check(case, results[d.resolve()], tgt, stats)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    stats.seconds = time.monotonic() - t0
    return stats


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0] if text else type(e).__name__


def _check(case: Case, res: BuildResult | Exception, tgt: Target, stats: FuzzStats) -> None:
    if not isinstance(res, BuildResult) or res.testbench is None:
        stats.errors += 1
        stats.failures.append(f"{case.id}: build failed: {str(res)[-2000:]}")
        return
    g = case.graph
    try:
        ref = reference.run(g, case.x)
        gots = run_testbench_outputs(
            res.testbench, case.x, g.tensors[g.input].shape,
            [g.tensors[t].shape for t in g.outputs], tgt.argv, timeout=300,
        )  # fmt: skip
    except Exception as e:
        stats.errors += 1
        stats.failures.append(f"{case.id}: run failed: {_one_line(e)}\n{traceback.format_exc()}")
        return
    stats.cases += 1
    stats.by_kind[case.kind] = stats.by_kind.get(case.kind, 0) + 1
    if any(v.events for v in ref.overflow.values()):
        stats.wrapped += 1
    if not all(np.array_equal(a, b) for a, b in zip(gots, ref.outputs, strict=True)):
        stats.mismatches += 1
        bad = sum(int(np.sum(a != b)) for a, b in zip(gots, ref.outputs, strict=True))
        total = sum(v.size for v in ref.outputs)
        stats.failures.append(
            f"{case.id}: MISMATCH on {tgt.name}: {bad} of {total} values differ "
            f"(outputs {list(g.outputs)}, ops {[n.op for n in g.nodes]},"
            f" acc {[n.attrs.get('acc_bits') for n in g.nodes]},"
            f" tiles {[n.attrs.get('acc_tile') for n in g.nodes]})"
        )


def run_campaign(
    n: int,
    seed: int = 0,
    target: str | Target = "host",
    *,
    per_project: int = 60,
    sanitize_every: int = 4,
    model_share: float = 0.25,
    jobs: int | None = None,
    log: Callable[[str], None] | None = print,
) -> FuzzStats:
    """`n` cases from seeds seed*10^9 + 0..n-1, `per_project` per CMake project. Every
    `sanitize_every`-th project on the host is built with ASan + UBSan (0: never); the others
    alternate -O1 and -O2."""
    total = FuzzStats()
    t0 = time.monotonic()
    base = seed * 1_000_000_000
    n_projects = math.ceil(n / per_project)
    for p in range(n_projects):
        seeds = range(base + p * per_project, base + min(n, (p + 1) * per_project))
        tgt: str | Target = target
        sanitize = False
        if target == "host":
            sanitize = bool(sanitize_every) and p % sanitize_every == sanitize_every - 1
            tgt = BuildTarget("host", c_flags=("-O1",) if sanitize or p % 2 else ("-O2",))
        stats = run_cases(seeds, tgt, sanitize=sanitize, model_share=model_share, jobs=jobs)
        total.merge(stats)
        total.seconds = time.monotonic() - t0
        if log is not None:
            for f in stats.failures:
                log(f"  {f}")
            log(f"[{p + 1}/{n_projects}{' asan+ubsan' if sanitize else ''}] {total.summary()}")
    return total
