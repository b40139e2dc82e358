"""Random integer graphs built directly from the IR (no frontend, no quantizer).

`GraphBuilder` adds nodes one at a time with random int8 weights and biases; the requantization
of each node is chosen from the node's actual accumulators on the sample batch (computed with the
reference), so outputs use the int8 range instead of saturating or collapsing to zero. The sample
batch is part of the result: tests run the generated C on it and compare with the reference.

Knobs for the cases that matter to the C: `x_dist="high"` and `w_dist="positive"` make exact sums
overflow narrow accumulators (the test checks that the reference saw wrap-around), `bias` pushes a
32-bit accumulator over the edge, `lo`/`hi` fold a clamp (ReLU, ReLU6) into the saturation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codegen.core import lut as luts
from codegen.core import reference
from codegen.core.formats import IntArray, wrap
from codegen.core.ir import Graph, Node, QFormat, Requant, Tensor, bilinear_taps, conv_out_size
from codegen.frontend.builder import adaptive_windows
from codegen.quant.ptq import _divide_by as divide_by

WIDE = Requant(np.array([1]), np.array([0]), 0, -(1 << 62), 1 << 62)
"""Identity requantization: returns the wrapped accumulator itself."""


def _fmt(lo: int, hi: int, zero_point: int = 0) -> QFormat:
    if lo >= 0 and hi <= 127 and zero_point == 0:
        return QFormat(7, False, 4)
    return QFormat(8, True, 4, zero_point)


@dataclass
class GraphBuilder:
    name: str
    seed: int = 0
    batch: int = 3
    nodes: list[Node] = field(default_factory=list)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, IntArray] = field(default_factory=dict)
    input_name: str = ""

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    # -- helpers

    def _tensor(self, shape: Sequence[int], fmt: QFormat, name: str | None = None) -> str:
        t = name or f"t{len(self.tensors)}"
        self.tensors[t] = Tensor(t, tuple(int(d) for d in shape), fmt)
        return t

    def _name(self, op: str, name: str | None) -> str:
        return name or f"{op}{len(self.nodes)}"

    def _ints(self, lo: int, hi: int, shape: Sequence[int], dist: str) -> IntArray:
        if dist == "high":  # near the top of the range: sums overflow narrow accumulators
            lo = max(lo, hi - max(1, (hi - lo) // 8))
        elif dist == "low":
            hi = min(hi, lo + max(1, (hi - lo) // 8))
        return self.rng.integers(lo, hi + 1, size=tuple(shape)).astype(np.int64)

    def _requant(
        self,
        acc: IntArray,
        per_channel: bool,
        lo: int,
        hi: int,
        zero_point: int,
        mult_bits: int,
    ) -> Requant:
        """mult/shift such that the largest |acc| of each channel maps near the int8 limit."""
        c = acc.shape[-1]
        amax = np.abs(acc).reshape(-1, c).max(axis=0) if acc.size else np.zeros(c, np.int64)
        if not per_channel:
            amax = amax.max(keepdims=True)
        n = amax.shape[0]
        mult = self.rng.integers(1 << (mult_bits - 1), 1 << mult_bits, size=n).astype(np.int64)
        shift = np.array(
            [
                min(62, max(-31, (int(a) * int(m)).bit_length() - 7))
                for a, m in zip(amax, mult, strict=True)
            ],
            dtype=np.int64,
        )
        return Requant(mult, shift, zero_point, lo, hi)

    def _add_node(self, node: Node) -> str:
        out = self.tensors[node.output]
        ins = [self.values[t] for t in node.inputs]
        y = reference.run_node(node, ins)
        assert y[0].size == out.size, (node.name, out.shape)
        self.values[node.output] = y.reshape((y.shape[0], *out.shape))  # as reference.run does
        self.nodes.append(node)
        return node.output

    def _finish(
        self,
        op: str,
        inputs: Sequence[str],
        out_shape: Sequence[int],
        attrs: dict[str, Any],
        params: dict[str, Any],
        *,
        name: str | None,
        lo: int,
        hi: int,
        zero_point: int,
        per_channel: bool,
        mult_bits: int,
    ) -> str:
        node_name = self._name(op, name)
        out = self._tensor(out_shape, _fmt(lo, hi, zero_point))
        probe = Node(node_name, op, tuple(inputs), out, attrs, params, WIDE)
        acc = reference.run_node(probe, [self.values[t] for t in inputs])
        rq = self._requant(acc, per_channel, lo, hi, zero_point, mult_bits)
        return self._add_node(Node(node_name, op, tuple(inputs), out, attrs, params, rq))

    # -- graph construction

    def input(
        self,
        shape: Sequence[int],
        *,
        lo: int = -128,
        hi: int = 127,
        dist: str = "uniform",
        name: str = "input",
    ) -> str:
        t = self._tensor(shape, _fmt(lo, hi), name)
        self.values[t] = self._ints(lo, hi, (self.batch, *shape), dist)
        self.input_name = t
        return t

    def conv2d(
        self,
        x: str,
        cout: int,
        kernel: tuple[int, int] = (3, 3),
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        *,
        acc_bits: int = 32,
        w_dist: str = "uniform",
        w_bits: int = 8,
        declare_bits: bool = False,
        bias: tuple[int, int] | None = None,
        input_zero_point: int = 0,
        lo: int = -128,
        hi: int = 127,
        zero_point: int = 0,
        per_channel: bool = True,
        mult_bits: int = 15,
        name: str | None = None,
        acc_tile: int | None = None,
    ) -> str:
        h, w, cin = self.tensors[x].shape
        wmax = (1 << (w_bits - 1)) - 1
        wlo = 0 if w_dist == "positive" else -wmax - (w_dist == "full")  # full: -2^(b-1) too
        weight = self._ints(wlo, wmax, (cout, kernel[0], kernel[1], cin // groups), w_dist)
        oh = conv_out_size(h, kernel[0], stride[0], padding[0], padding[1], dilation[0])
        ow = conv_out_size(w, kernel[1], stride[1], padding[2], padding[3], dilation[1])
        attrs: dict[str, Any] = {
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "groups": groups,
            "acc_bits": acc_bits,
        }
        if declare_bits:  # attrs["weight_bits"]: the weights are stored packed when <= 4
            attrs["weight_bits"] = w_bits
        if input_zero_point:
            attrs["input_zero_point"] = input_zero_point
        b = self._bias(cout, acc_bits, bias, attrs, acc_tile)
        return self._finish(
            "conv2d", [x], (oh, ow, cout), attrs, {"weight": weight, "bias": b},
            name=name, lo=lo, hi=hi, zero_point=zero_point, per_channel=per_channel,
            mult_bits=mult_bits,
        )  # fmt: skip

    def _bias(
        self,
        cout: int,
        acc_bits: int,
        bias: tuple[int, int] | None,
        attrs: dict[str, Any] | None = None,
        acc_tile: int | None = None,
    ) -> IntArray:
        """Random biases; with acc_tile, the node accumulates in two stages (the bias in the
        32-bit one)."""
        if bias is None:
            span = 1 << min(acc_bits - 2, 12)
            bias = (-span, span)
        if acc_tile is not None:
            assert attrs is not None
            attrs.update(acc_tile=acc_tile, acc2_bits=32)
            acc_bits = 32
        return wrap(self.rng.integers(bias[0], bias[1] + 1, size=cout), acc_bits)

    def dense(
        self,
        x: str,
        cout: int,
        *,
        acc_bits: int = 32,
        w_dist: str = "uniform",
        w_bits: int = 8,
        declare_bits: bool = False,
        bias: tuple[int, int] | None = None,
        input_zero_point: int = 0,
        lo: int = -128,
        hi: int = 127,
        per_channel: bool = True,
        mult_bits: int = 15,
        name: str | None = None,
        acc_tile: int | None = None,
    ) -> str:
        (cin,) = self.tensors[x].shape
        wmax = (1 << (w_bits - 1)) - 1
        wlo = 0 if w_dist == "positive" else -wmax - (w_dist == "full")  # full: -2^(b-1) too
        weight = self._ints(wlo, wmax, (cout, cin), w_dist)
        attrs: dict[str, Any] = {"acc_bits": acc_bits}
        if declare_bits:  # attrs["weight_bits"]: the weights are stored packed when <= 4
            attrs["weight_bits"] = w_bits
        if input_zero_point:
            attrs["input_zero_point"] = input_zero_point
        b = self._bias(cout, acc_bits, bias, attrs, acc_tile)
        return self._finish(
            "dense", [x], (cout,), attrs, {"weight": weight, "bias": b}, name=name, lo=lo, hi=hi,
            zero_point=0, per_channel=per_channel, mult_bits=mult_bits,
        )  # fmt: skip

    def maxpool2d(
        self,
        x: str,
        kernel: tuple[int, int] = (2, 2),
        stride: tuple[int, int] = (2, 2),
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        *,
        lo: int = -128,
        hi: int = 127,
        name: str | None = None,
    ) -> str:
        h, w, c = self.tensors[x].shape
        oh = conv_out_size(h, kernel[0], stride[0], padding[0], padding[1])
        ow = conv_out_size(w, kernel[1], stride[1], padding[2], padding[3])
        out = self._tensor((oh, ow, c), _fmt(lo, hi))
        attrs = {"kernel": kernel, "stride": stride, "padding": padding}
        rq = Requant(np.array([1]), np.array([0]), 0, lo, hi)
        return self._add_node(Node(self._name("maxpool2d", name), "maxpool2d", (x,), out, attrs,
                                   {}, rq))  # fmt: skip

    def avgpool2d(
        self,
        x: str,
        kernel: tuple[int, int] = (2, 2),
        stride: tuple[int, int] = (2, 2),
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        *,
        acc_bits: int = 16,
        input_zero_point: int = 0,
        lo: int = -128,
        hi: int = 127,
        per_channel: bool = False,
        name: str | None = None,
    ) -> str:
        h, w, c = self.tensors[x].shape
        oh = conv_out_size(h, kernel[0], stride[0], padding[0], padding[1])
        ow = conv_out_size(w, kernel[1], stride[1], padding[2], padding[3])
        attrs: dict[str, Any] = {
            "kernel": kernel, "stride": stride, "padding": padding, "acc_bits": acc_bits,
        }  # fmt: skip
        if input_zero_point:
            attrs["input_zero_point"] = input_zero_point
        return self._finish(
            "avgpool2d", [x], (oh, ow, c), attrs, {}, name=name, lo=lo, hi=hi, zero_point=0,
            per_channel=per_channel, mult_bits=12,
        )  # fmt: skip

    def global_avgpool(
        self,
        x: str,
        *,
        acc_bits: int = 16,
        input_zero_point: int = 0,
        lo: int = -128,
        hi: int = 127,
        per_channel: bool = False,
        name: str | None = None,
    ) -> str:
        c = self.tensors[x].shape[-1]
        attrs: dict[str, Any] = {"acc_bits": acc_bits}
        if input_zero_point:
            attrs["input_zero_point"] = input_zero_point
        return self._finish(
            "global_avgpool", [x], (c,), attrs, {}, name=name, lo=lo, hi=hi, zero_point=0,
            per_channel=per_channel, mult_bits=12,
        )  # fmt: skip

    def add(
        self,
        a: str,
        b: str,
        *,
        acc_bits: int = 16,
        in_mult: tuple[int, int] | None = None,
        input_zero_points: tuple[int, int] = (0, 0),
        lo: int = -128,
        hi: int = 127,
        per_channel: bool = False,
        name: str | None = None,
    ) -> str:
        shape = self.tensors[a].shape
        if in_mult is None:
            top = 1 << max(1, min(acc_bits - 9, 14))
            in_mult = (int(self.rng.integers(1, top)), int(self.rng.integers(1, top)))
        attrs: dict[str, Any] = {"acc_bits": acc_bits}
        if any(input_zero_points):
            attrs["input_zero_points"] = input_zero_points
        params = {"in_mult": np.array(in_mult, dtype=np.int64)}
        return self._finish(
            "add", [a, b], shape, attrs, params, name=name, lo=lo, hi=hi, zero_point=0,
            per_channel=per_channel, mult_bits=12,
        )  # fmt: skip

    def mul(
        self,
        a: str,
        b: str,
        *,
        acc_bits: int = 16,
        input_zero_points: tuple[int, int] = (0, 0),
        lo: int = -128,
        hi: int = 127,
        per_channel: bool = False,
        name: str | None = None,
    ) -> str:
        """a * b; `b` of `a`'s shape or one value per channel ((1, 1, C) or (C,))."""
        attrs: dict[str, Any] = {"acc_bits": acc_bits}
        if any(input_zero_points):
            attrs["input_zero_points"] = input_zero_points
        return self._finish(
            "mul", [a, b], self.tensors[a].shape, attrs, {}, name=name, lo=lo, hi=hi,
            zero_point=0, per_channel=per_channel, mult_bits=12,
        )  # fmt: skip

    def concat(
        self,
        xs: Sequence[str],
        *,
        input_zero_points: Sequence[int] | None = None,
        lo: int = -128,
        hi: int = 127,
        zero_point: int = 0,
        identity: Sequence[int] = (),
        mult_shift: Sequence[tuple[int, int]] = (),
        name: str | None = None,
    ) -> str:
        """Each input requantized by a random multiplier and shift (the first scaled up by a left
        shift), but the inputs at the indices `identity`: multiplier 1, no shift; `mult_shift`:
        every input's (multiplier, shift), given."""
        shapes = [self.tensors[x].shape for x in xs]
        out_shape = (*shapes[0][:-1], sum(s[-1] for s in shapes))
        out = self._tensor(out_shape, _fmt(lo, hi, zero_point))
        n = len(xs)
        mult = self.rng.integers(1, 256, size=n).astype(np.int64)
        shift = np.array([int(m).bit_length() - 1 for m in mult], dtype=np.int64)
        shift[0] = -1 if n > 1 else shift[0]  # one input scaled up by a left shift
        mult[0] = 1 if n > 1 else mult[0]
        mult[list(identity)], shift[list(identity)] = 1, 0
        if mult_shift:
            mult, shift = (np.array(v, dtype=np.int64) for v in zip(*mult_shift, strict=True))
        attrs: dict[str, Any] = {}
        if input_zero_points is not None:
            attrs["input_zero_points"] = tuple(input_zero_points)
        rq = Requant(mult, shift, zero_point, lo, hi)
        node = Node(self._name("concat", name), "concat", tuple(xs), out, attrs, {}, rq)
        return self._add_node(node)

    def lut(
        self,
        x: str,
        function: str,
        args: Sequence[float] = (),
        *,
        out: QFormat | None = None,
        lo: int | None = None,
        hi: int | None = None,
        name: str | None = None,
    ) -> str:
        """An element-wise function as its table from the input's format to `out` (default
        s8.5), computed by `codegen.core.lut.table`; `lo`/`hi` saturate like a fused clamp."""
        fin = self.tensors[x].fmt
        assert fin is not None
        fo = out or QFormat(8, True, 5)
        lo = fo.qmin if lo is None else lo
        hi = fo.qmax if hi is None else hi
        t = self._tensor(self.tensors[x].shape, fo)
        attrs = {"function": function, "args": tuple(float(a) for a in args)}
        params = {"table": luts.table(function, args, fin, fo, lo, hi)}
        rq = Requant(np.array([1]), np.array([0]), fo.zero_point, lo, hi)
        return self._add_node(Node(self._name("lut", name), "lut", (x,), t, attrs, params, rq))

    def softmax(
        self,
        x: str,
        *,
        out: QFormat | None = None,
        lo: int | None = None,
        hi: int | None = None,
        name: str | None = None,
    ) -> str:
        """Softmax over the channels, to `out` (default u7.7), with the exp table of the input's
        scale (`reference.softmax_table`)."""
        fin = self.tensors[x].fmt
        assert fin is not None
        fo = out or QFormat(7, False, 7)
        lo = fo.qmin if lo is None else lo
        hi = fo.qmax if hi is None else hi
        t = self._tensor(self.tensors[x].shape, fo)
        params = {"exp_table": reference.softmax_table(fin.scale)}
        rq = Requant(np.array([1]), np.array([0]), fo.zero_point, lo, hi)
        node = Node(self._name("softmax", name), "softmax", (x,), t, {"out_frac": fo.frac},
                    params, rq)  # fmt: skip
        return self._add_node(node)

    def adaptive_pool(
        self,
        x: str,
        out: tuple[int, int],
        *,
        kind: str = "avg",
        acc_bits: int = 16,
        input_zero_point: int = 0,
        lo: int = -128,
        hi: int = 127,
        windows: tuple[Any, Any] | None = None,
        name: str | None = None,
    ) -> str:
        """`adaptive_avgpool2d` / `adaptive_maxpool2d` over PyTorch's adaptive windows to `out`
        (or the given (rows, cols) windows); an average divides by each window's size with one
        mult/shift per output pixel, as the quantizer does (output in the input's format)."""
        h, w, c = self.tensors[x].shape
        rows, cols = windows or (adaptive_windows(h, out[0]), adaptive_windows(w, out[1]))
        attrs: dict[str, Any] = {"rows": tuple(rows), "cols": tuple(cols)}
        op = f"adaptive_{kind}pool2d"
        fmt = self.tensors[x].fmt
        assert fmt is not None
        t = self._tensor((len(rows), len(cols), c), _fmt(lo, hi) if kind == "avg" else fmt)
        if kind == "max":
            rq = Requant(np.array([1]), np.array([0]), fmt.zero_point, lo, hi)
            return self._add_node(Node(self._name(op, name), op, (x,), t, attrs, {}, rq))
        counts = [(r1 - r0) * (c1 - c0) for r0, r1 in rows for c0, c1 in cols]
        attrs.update(counts=tuple(counts), acc_bits=acc_bits)
        if input_zero_point:
            attrs["input_zero_point"] = input_zero_point
        divs = [divide_by(n, 4, 4) for n in counts]
        mult, shift = (np.array(v, dtype=np.int64) for v in zip(*divs, strict=True))
        rq = Requant(mult, shift, 0, lo, hi)
        return self._add_node(Node(self._name(op, name), op, (x,), t, attrs, {}, rq))

    def resize_bilinear(
        self,
        x: str,
        out: tuple[int, int],
        *,
        align_corners: bool = False,
        input_zero_point: int = 0,
        per_channel: bool = False,
        lo: int = -128,
        hi: int = 127,
        name: str | None = None,
    ) -> str:
        """`resize_bilinear` to `out` with PyTorch's taps and the quantizer's integer weights;
        one mult/shift (mult 1, as the quantizer's) or, `per_channel`, one 15-bit pair each."""
        h, w, c = self.tensors[x].shape
        bits = reference.RESIZE_WEIGHT_BITS
        attrs: dict[str, Any] = {"weight_bits": bits, "acc_bits": 32}
        for key, size, o in (("row", h, out[0]), ("col", w, out[1])):
            taps, lam = bilinear_taps(size, o, align_corners)
            attrs[f"{key}s"], attrs[f"{key}_lambda"] = taps, lam
            attrs[f"{key}_weight"] = tuple(int(v) for v in reference.resize_weights(lam, bits))
        if input_zero_point:
            attrs["input_zero_point"] = input_zero_point
        return self._finish("resize_bilinear", [x], (*out, c), attrs, {}, name=name, lo=lo, hi=hi,
                            zero_point=0, per_channel=per_channel,
                            mult_bits=15 if per_channel else 1)  # fmt: skip

    def gather(
        self,
        x: str,
        index: Sequence[int],
        *,
        lo: int | None = None,
        hi: int | None = None,
        name: str | None = None,
    ) -> str:
        """Channels picked by `index` (channel shuffle, chunk); `lo`/`hi` saturate like a clamp."""
        fmt = self.tensors[x].fmt
        assert fmt is not None
        out = self._tensor((*self.tensors[x].shape[:-1], len(index)), fmt)
        lo = fmt.qmin if lo is None else lo
        hi = fmt.qmax if hi is None else hi
        rq = Requant(np.array([1]), np.array([0]), fmt.zero_point, lo, hi)
        attrs = {"index": tuple(int(i) for i in index)}
        node = Node(self._name("gather", name), "gather", (x,), out, attrs, {}, rq)
        return self._add_node(node)

    def zero_insert(self, x: str, stride: tuple[int, int], *, name: str | None = None) -> str:
        """stride - 1 rows / columns of the zero point between the pixels (transposed convs)."""
        fmt = self.tensors[x].fmt
        assert fmt is not None
        h, w, c = self.tensors[x].shape
        out = self._tensor(((h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1, c), fmt)
        rq = Requant(np.array([1]), np.array([0]), fmt.zero_point, fmt.qmin, fmt.qmax)
        node = Node(self._name("zero_insert", name), "zero_insert", (x,), out,
                    {"stride": tuple(stride)}, {}, rq)  # fmt: skip
        return self._add_node(node)

    def reshape(self, x: str, shape: Sequence[int], *, name: str | None = None) -> str:
        fmt = self.tensors[x].fmt
        assert fmt is not None
        out = self._tensor(shape, fmt)
        node = Node(self._name("reshape", name), "reshape", (x,), out, {"shape": tuple(shape)})
        return self._add_node(node)

    def flatten(self, x: str) -> str:
        return self.reshape(x, (self.tensors[x].size,))

    def graph(self, output: str | None = None, extra: Sequence[str] = ()) -> Graph:
        """The graph with output `output` (default: the last node's) and the further outputs
        `extra`, in that order."""
        out = output or self.nodes[-1].output
        used = {self.input_name, out} | {t for n in self.nodes for t in (*n.inputs, n.output)}
        tensors = {k: v for k, v in self.tensors.items() if k in used}
        return Graph(
            self.name, tuple(self.nodes), tensors, self.input_name, out, extra_outputs=tuple(extra)
        )

    def result(
        self, output: str | None = None, extra: Sequence[str] = ()
    ) -> tuple[Graph, IntArray]:
        """The graph and its sample batch (quantized NHWC ints)."""
        return self.graph(output, extra), self.values[self.input_name]


def overflowed(graph: Graph, x: IntArray) -> dict[str, int]:
    """Accumulator values whose exact sum wrapped, per node (reference statistics)."""
    res = reference.run(graph, x)
    return {k: v.events for k, v in res.overflow.items() if v.events}
