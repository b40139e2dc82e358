"""The normalisation shared by the frontends (PyTorch, ONNX): framework ops to a float `ir.Graph`.

A frontend walks its graph in topological order and calls one `IRBuilder` method per op, with
plain values: float64 NumPy parameters in the framework's own layout (OIHW conv weights, (O, I)
dense weights), the output shape the framework computed (NCHW, without batch) and the name the
IR node gets. The builder does everything else the same way for every frontend, so a network
gives the same float graph whichever way it arrives:

- NCHW -> NHWC shapes and OHWI conv weights, zero biases for bias-less layers;
- BatchNorm folded into the directly preceding conv/dense in float64;
- ReLU/ReLU6/Hardtanh/clamp fused as a `clamp` attribute into the producer; one that cannot fuse
  (after a concat, on the input, on a value read twice) as a `lut` node (`relu`, `clamp`);
- a BatchNorm that does not follow a conv/dense (pre-activation networks) as a depthwise 1x1 conv
  with bias (y = x * s + b per channel);
- 1-D sequences (N, C, L) as images (N, C, 1, L): IR shape (1, L, C), listed in `Graph.sequences`;
- other element-wise activations (Hardswish, Sigmoid, ...) as one `lut` node each, named by
  `codegen.core.lut` (the quantizer turns it into a table), and so is a multiplication by a
  constant scalar (`scale`);
- a softmax over the channels as a `softmax` node;
- an element-wise product as a `mul` node; a per-channel scale (squeeze-excitation's gate,
  (N, C, 1, 1)) times a tensor is a `mul` whose second input is the scale;
- a transposed convolution (ConvTranspose1d/2d) as zeros inserted between the input pixels (a
  `zero_insert` node, for a stride > 1) and an ordinary stride-1 conv2d with the spatially flipped
  kernel, its input and output channels swapped per group, and padding dilation * (k - 1) - padding
  on each side (plus output_padding at the bottom/right);
- zero padding folded into the following conv (asymmetric padding kept); a ceil_mode max pool's
  last, partial windows as extra bottom/right padding;
- a mean or max over H and W (over L) as a global average pool or a max pool over the whole
  image (+ a flatten when the framework drops the reduced axes);
- flatten to (N, features) kept as a `reshape`, the following dense layer's columns permuted from
  (C, H, W) to the IR's (H, W, C) memory order;
- identities (Dropout, Identity, a folded BatchNorm, a fused activation) as aliases;
- views (view/reshape to any shape, transpose/permute, chunk/split: `view`, `permute`, `slice`)
  tracked as an index array per element until something reads them: a result that is the source
  again is an alias, one that picks whole channels (channel shuffle's view -> transpose -> view,
  a chunk of channels) is one `gather` node; anything else is refused.

`Reject` is raised for a configuration that cannot be lowered; the frontend adds the node's name
and its own vocabulary of supported ops to the user's one-line error.
"""

from __future__ import annotations

import builtins
import keyword
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codegen.core import lut
from codegen.core.errors import InvalidModelError, UnsupportedModelError
from codegen.core.ir import Graph, Node, Taps, Tensor

INF = math.inf
Pad4 = tuple[int, int, int, int]
"""(top, bottom, left, right)"""

CLAMP_OPS = ("conv2d", "dense", "add", "avgpool2d", "global_avgpool", "maxpool2d", "lut", "mul",
             "adaptive_avgpool2d", "adaptive_maxpool2d", "resize_bilinear")  # fmt: skip
"""Ops an activation fuses into (and that carry a `clamp` attribute in the float graph)."""


def normalization_refusal(what: str, node: str) -> UnsupportedModelError:
    """The one-line refusal of a layer/group/instance normalisation (`what`) at `node`, and why."""
    return UnsupportedModelError(
        f"{what} at node '{node}' is not supported: it normalises each sample by its own mean "
        "and variance, computed at run time (a per-sample mean, variance and reciprocal square "
        "root), which has no exact integer formulation with int8 inputs and outputs that is fast "
        "on these cores; use BatchNorm (it folds into the preceding convolution) instead"
    )


class Reject(Exception):
    """A configuration the builder cannot lower; the message says what (without the node)."""


@dataclass
class RawNode:
    """A node under construction (mutable until the graph is frozen)."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)


def as_image(nchw: tuple[int, ...]) -> tuple[int, ...]:
    """A framework shape (no batch) as the builder records it: a sequence (C, L) is (C, 1, L)."""
    shape = tuple(int(d) for d in nchw)
    return (shape[0], 1, shape[1]) if len(shape) == 2 else shape


def ceil_extra(size: int, k: int, s: int, p0: int, p1: int, out: int) -> int:
    """Extra bottom/right padding that gives a ceil_mode max pool its last, partial window (the
    framework's `out`; its last window always starts inside the input or the first padding)."""
    return max(0, (out - 1) * s + k - (size + p0 + p1))


Windows = tuple[tuple[int, int], ...]
"""(start, end) of each output row (or column) in the input."""


def adaptive_windows(size: int, out: int) -> Windows:
    """PyTorch's adaptive pool windows: [floor(i * size / out), ceil((i + 1) * size / out))."""
    return tuple((i * size // out, -(-(i + 1) * size // out)) for i in range(out))


def pool_windows(
    size: int, k: int, s: int, p0: int, p1: int, out: int, include_pad: bool
) -> tuple[Windows, tuple[int, ...]]:
    """An average pool's windows clipped to the input and their divisors along one axis (as
    PyTorch computes them: the window clipped to the padded input when padding counts, to the
    input when it does not; ceil_mode's last window may be partial)."""
    windows, divisors = [], []
    for i in range(out):
        start = i * s - p0
        end = min(start + k, size + p1)
        lo, hi = max(start, 0), min(end, size)
        windows.append((lo, hi))
        divisors.append(end - start if include_pad else hi - lo)
    return tuple(windows), tuple(divisors)


def to_nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 3:
        c, h, w = shape
        return (h, w, c)
    return shape


def c_identifier(name: str) -> str:
    out = "".join(ch.lower() if ch.isalnum() else "_" for ch in name)
    return out if out and not out[0].isdigit() else f"m_{out}"


class IRBuilder:
    """Builds one float graph. `value` arguments are the frontend's names for tensors; the
    builder maps them to IR tensors (an identity op maps its value to its input's tensor)."""

    def __init__(self, name: str, batch: int = 1):
        self.name = name
        self.batch = batch
        self.raw: list[RawNode] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # IR tensor -> IR (NHWC) shape, no batch
        self.src_shapes: dict[str, tuple[int, ...]] = {}  # IR tensor -> NCHW shape, no batch
        self.alias: dict[str, str] = {}  # frontend value -> IR tensor
        self.pending_pad: dict[str, tuple[str, Pad4]] = {}  # zero padding awaiting its conv
        # views awaiting a reader: key -> (source IR tensor, index array, IR name, description)
        self.pending_view: dict[str, tuple[str, np.ndarray, str, str]] = {}
        self.viewed: dict[str, str] = {}  # a pending view's key -> the IR tensor it became
        self.sequences: set[str] = set()  # IR tensors that are (C, L) sequences in the framework
        self.input_name = ""
        self.output_names: list[str] = []  # the model's outputs, in its order

    # ------------------------------------------------------------------ tensors
    def knows(self, value: str) -> bool:
        return value in self.alias

    def tensor(self, value: str) -> str:
        """The IR tensor of a frontend value (which the frontend checked `knows`)."""
        src = self.alias[value]
        if src in self.pending_pad:
            raise Reject("zero padding not followed by a convolution")
        if src in self.pending_view:
            return self._materialize(src)
        return src

    def same(self, value: str, src_value: str) -> None:
        """`value` is `src_value` (Dropout, Identity, a no-op reshape...)."""
        src = self.alias[src_value]
        self.alias[value] = src if src in self.pending_view else self.tensor(src_value)

    def _record(self, tensor: str, nchw: tuple[int, ...]) -> None:
        shape = as_image(nchw)
        if len(nchw) == 2:  # a 1-D sequence (C, L): the image (C, 1, L)
            self.sequences.add(tensor)
        self.src_shapes[tensor] = shape
        self.shapes[tensor] = to_nhwc(shape)

    def framework_shape(self, tensor: str) -> tuple[int, ...]:
        """The shape (no batch) the framework gives an IR tensor: (C, L) for a sequence."""
        shape = self.src_shapes[tensor]
        return (shape[0], shape[2]) if tensor in self.sequences else shape

    def set_input(self, name: str, value: str, nchw: tuple[int, ...]) -> None:
        if self.input_name:
            raise Reject("a second model input")
        self.input_name = name
        self.alias[value] = name
        self._record(name, nchw)

    def set_output(self, value: str) -> None:
        """The next output of the model (called once per output, in the model's order)."""
        self.output_names.append(self.tensor(value))

    def emit(
        self, name: str, value: str, op: str, inputs: list[str], nchw: tuple[int, ...], **attrs: Any
    ) -> RawNode:
        r = RawNode(name, op, inputs, attrs)
        self.raw.append(r)
        self.alias[value] = name
        self._record(name, nchw)
        return r

    def producer(self, tensor: str) -> RawNode | None:
        for r in self.raw:
            if r.name == tensor:
                return r
        return None

    def _fusable(self, tensor: str, shared: bool, ops: tuple[str, ...]) -> RawNode | None:
        """The producer of `tensor` if something can be fused into it: one of `ops`, and neither
        the frontend (`shared`) nor an IR node already reads the value."""
        prod = self.producer(tensor)
        if prod is None or prod.op not in ops or shared:
            return None
        if any(tensor in r.inputs for r in self.raw):
            return None
        return prod

    # ------------------------------------------------------------------ weighted ops
    def conv(
        self,
        name: str,
        value: str,
        x_value: str,
        weight_oihw: np.ndarray,
        bias: np.ndarray | None,
        *,
        stride: tuple[int, int],
        padding: Pad4,
        dilation: tuple[int, int],
        groups: int,
        nchw: tuple[int, ...],
    ) -> None:
        extra: Pad4 = (0, 0, 0, 0)
        x = self.alias[x_value]
        if x in self.pending_pad:
            x, extra = self.pending_pad[x]
        elif x in self.pending_view:
            x = self.tensor(x_value)
        pad = (
            padding[0] + extra[0],
            padding[1] + extra[1],
            padding[2] + extra[2],
            padding[3] + extra[3],
        )
        w = weight_oihw.transpose(0, 2, 3, 1).copy()
        b = bias.copy() if bias is not None else np.zeros(w.shape[0], dtype=np.float64)
        r = self.emit(
            name,
            value,
            "conv2d",
            [x],
            nchw,
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=int(groups),
        )
        r.params = {"weight": w, "bias": b}

    def conv_transpose(
        self,
        name: str,
        value: str,
        x_value: str,
        weight_iohw: np.ndarray,
        bias: np.ndarray | None,
        *,
        stride: tuple[int, int],
        padding: Pad4,
        output_padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        nchw: tuple[int, ...],
    ) -> None:
        """A transposed convolution (weight (I, O/groups, kh, kw), the framework's layout;
        `padding` (top, bottom, left, right) is what it removes from the full output): a
        `zero_insert` node named `{name}_zeros` for a stride > 1, then a stride-1 conv2d `name`
        with the flipped kernel, which is equal because every output pixel sums the same
        products (the inserted zeros and the padding contribute nothing)."""
        cin, og, kh, kw = weight_iohw.shape
        if groups < 1 or cin % groups:
            raise Reject(f"transposed convolution of {cin} input channels in {groups} groups")
        ig = cin // groups
        w = weight_iohw.reshape(groups, ig, og, kh, kw).transpose(0, 2, 1, 3, 4)
        w = np.ascontiguousarray(w.reshape(groups * og, ig, kh, kw)[:, :, ::-1, ::-1])
        (dh, dw), (oph, opw) = dilation, output_padding
        full_h, full_w = dh * (kh - 1), dw * (kw - 1)
        top, bottom, left, right = padding
        pad = (full_h - top, full_h - bottom + oph, full_w - left, full_w - right + opw)
        if min(pad) < 0 or min(oph, opw) < 0:
            raise Reject(
                f"transposed convolution with padding {padding} (top, bottom, left, right) larger"
                f" than dilation * (kernel - 1) = ({full_h}, {full_w}), or a negative"
                " output_padding (a cropped output)"
            )
        if tuple(stride) != (1, 1):
            x = self.tensor(x_value)
            c, h, wd = self.src_shapes[x]
            sh, sw = stride
            dilated = (c, (h - 1) * sh + 1, (wd - 1) * sw + 1)
            seq = x in self.sequences
            x_value = f"zeros:{value}"  # never an IR tensor name: those are identifiers
            self.emit(f"{name}_zeros", x_value, "zero_insert", [x],
                      (c, dilated[2]) if seq else dilated, stride=(sh, sw))  # fmt: skip
        self.conv(name, value, x_value, w, bias, stride=(1, 1), padding=pad, dilation=dilation,
                  groups=groups, nchw=nchw)  # fmt: skip

    def dense(
        self,
        name: str,
        value: str,
        x_value: str,
        weight: np.ndarray,
        bias: np.ndarray | None,
        nchw: tuple[int, ...],
        title: str,
    ) -> None:
        x = self.tensor(x_value)
        if len(self.shapes[x]) != 1:
            raise Reject(f"{title} on a tensor that is not 2-D (flatten first)")
        w = weight.copy()
        # Columns follow the framework's flatten order (C, H, W); the IR flattens NHWC (H, W, C).
        chw = self._flattened_from(x)
        if chw is not None:
            c, h, wd = chw
            w = w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        b = bias.copy() if bias is not None else np.zeros(w.shape[0], dtype=np.float64)
        r = self.emit(name, value, "dense", [x], nchw)
        r.params = {"weight": np.ascontiguousarray(w), "bias": b}

    def _flattened_from(self, tensor: str) -> tuple[int, int, int] | None:
        r = self.producer(tensor)
        if r is not None and r.op == "reshape":
            src_shape = self.src_shapes[r.inputs[0]]
            if len(src_shape) == 3 and src_shape[1] * src_shape[2] > 1:
                return (src_shape[0], src_shape[1], src_shape[2])
        return None

    def batchnorm(
        self,
        value: str,
        x_value: str,
        *,
        mean: np.ndarray,
        var: np.ndarray,
        gamma: np.ndarray,
        beta: np.ndarray,
        eps: float,
        shared: bool,
        title: str,
        name: str | Callable[[], str],
    ) -> None:
        """Fold an inference BatchNorm into the conv/dense that directly precedes it; any other
        BatchNorm of an image or sequence is a depthwise 1x1 conv with bias named `name` (or
        `name()`: called only then)."""
        x = self.tensor(x_value)
        k = gamma / np.sqrt(var + eps)
        prod = self._fusable(x, shared, ("conv2d", "dense"))
        if prod is None or "clamp" in prod.attrs:
            if len(self.shapes[x]) != 3:
                raise Reject(f"{title} of features that does not directly follow a Linear")
            self.conv(
                name if isinstance(name, str) else name(),
                value,
                x_value,
                k.reshape(-1, 1, 1, 1),
                beta - mean * k,
                stride=(1, 1),
                padding=(0, 0, 0, 0),
                dilation=(1, 1),
                groups=int(k.shape[0]),
                nchw=self.framework_shape(x),
            )
            return
        w = prod.params["weight"]
        prod.params["weight"] = w * k.reshape((-1,) + (1,) * (w.ndim - 1))
        prod.params["bias"] = (prod.params["bias"] - mean) * k + beta
        self.alias[value] = x

    def bias_add(self, value: str, x_value: str, bias: np.ndarray, shared: bool) -> None:
        """Fold the addition of a per-channel constant into the preceding conv/dense's bias."""
        x = self.tensor(x_value)
        prod = self._fusable(x, shared, ("conv2d", "dense"))
        if prod is None or "clamp" in prod.attrs:
            raise Reject("addition of a constant that does not directly follow a conv/linear")
        prod.params["bias"] = prod.params["bias"] + bias
        self.alias[value] = x

    def clamp(
        self,
        value: str,
        x_value: str,
        lo: float,
        hi: float,
        shared: bool,
        name: str | Callable[[], str],
    ) -> None:
        """Fuse a clamp into its producer; else a `lut` node of `relu`/`clamp` named `name` (or
        `name()`: called only then)."""
        x = self.tensor(x_value)
        prod = self._fusable(x, shared, CLAMP_OPS)
        if prod is None:
            lo, hi = float(lo), float(hi)
            function, args = ("relu", ()) if (lo, hi) == (0.0, INF) else ("clamp", (lo, hi))
            r = self.emit(
                name if isinstance(name, str) else name(),
                value,
                "lut",
                [x],
                self.framework_shape(x),
                function=function,
                args=args,
            )
            r.attrs["clamp"] = (lo, hi)
            return
        old_lo, old_hi = prod.attrs.get("clamp", (-INF, INF))
        prod.attrs["clamp"] = (max(old_lo, float(lo)), min(old_hi, float(hi)))
        self.alias[value] = x

    # ------------------------------------------------------------------ other ops
    def pool(
        self,
        name: str,
        value: str,
        kind: str,
        x_value: str,
        *,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: Pad4,
        nchw: tuple[int, ...],
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor: int | None = None,
    ) -> None:
        """Max/average pooling (`nchw`: the framework's output shape); a `ceil_mode` max pool's
        last, partial windows as extra bottom/right padding (padding never wins the max); an
        average pool whose windows differ in size (ceil_mode, count_include_pad=False with
        padding, a divisor_override) as an `adaptive_avgpool2d` over its windows."""
        x = self.tensor(x_value)
        if kind == "avgpool2d":
            _, ih, iw = self.src_shapes[x]
            _, oh, ow = as_image(nchw)
            top, bottom, left, right = padding
            rows, rdiv = pool_windows(ih, kernel[0], stride[0], top, bottom, oh, count_include_pad)
            cols, cdiv = pool_windows(iw, kernel[1], stride[1], left, right, ow, count_include_pad)
            counts = tuple(divisor or r * c for r in rdiv for c in cdiv)
            if set(counts) != {kernel[0] * kernel[1]} or (divisor and any(padding)):
                self.windowed_pool(name, value, kind, x_value, rows, cols, counts, nchw)
                return
        if ceil_mode:
            _, ih, iw = self.src_shapes[x]
            _, oh, ow = as_image(nchw)
            top, bottom, left, right = padding
            padding = (
                top,
                bottom + ceil_extra(ih, kernel[0], stride[0], top, bottom, oh),
                left,
                right + ceil_extra(iw, kernel[1], stride[1], left, right, ow),
            )
        if kernel == (1, 1) and stride == (1, 1) and not any(padding):
            self.alias[value] = x  # a 1x1 window (an adaptive pool to the input's own size)
            return
        self.emit(name, value, kind, [x], nchw, kernel=kernel, stride=stride, padding=padding)

    def adaptive_pool(
        self, name: str, value: str, kind: str, x_value: str, nchw: tuple[int, ...]
    ) -> None:
        """An adaptive average / max pool to the framework's output size `nchw`, any size."""
        _, ih, iw = self.src_shapes[self.tensor(x_value)]
        _, oh, ow = as_image(nchw)
        rows, cols = adaptive_windows(ih, oh), adaptive_windows(iw, ow)
        counts = tuple((r1 - r0) * (c1 - c0) for r0, r1 in rows for c0, c1 in cols)
        self.windowed_pool(name, value, kind, x_value, rows, cols, counts, nchw)

    def upsample_nearest(
        self,
        name: str,
        value: str,
        x_value: str,
        rows: tuple[int, ...],
        cols: tuple[int, ...],
        nchw: tuple[int, ...],
    ) -> None:
        """Nearest-neighbour resizing (the input row and column of each output row and column):
        a max over one-pixel windows, so the adaptive max pool's kernel moves the data."""
        windows = (tuple((r, r + 1) for r in rows), tuple((c, c + 1) for c in cols))
        self.windowed_pool(name, value, "maxpool2d", x_value, *windows, (), nchw)

    def resize_bilinear(
        self, name: str, value: str, x_value: str, rows: Taps, cols: Taps, nchw: tuple[int, ...]
    ) -> None:
        """Bilinear resizing (Upsample / interpolate / Resize, (bi)linear): the two input rows
        and columns of each output row and column and their weights (`ir.bilinear_taps`)."""
        x = self.tensor(x_value)
        self.emit(name, value, "resize_bilinear", [x], nchw, rows=rows[0], row_lambda=rows[1],
                  cols=cols[0], col_lambda=cols[1])  # fmt: skip

    def windowed_pool(
        self,
        name: str,
        value: str,
        kind: str,
        x_value: str,
        rows: Windows,
        cols: Windows,
        counts: tuple[int, ...],
        nchw: tuple[int, ...],
    ) -> None:
        """Pooling over given windows (`counts`: the divisor of each output pixel, average)."""
        x = self.tensor(x_value)
        if kind == "maxpool2d":
            self.emit(name, value, "adaptive_maxpool2d", [x], nchw, rows=rows, cols=cols)
        else:
            self.emit(name, value, "adaptive_avgpool2d", [x], nchw, rows=rows, cols=cols,
                      counts=counts)  # fmt: skip

    def lut(
        self,
        name: str,
        value: str,
        x_value: str,
        function: str,
        args: tuple[float, ...],
        nchw: tuple[int, ...],
    ) -> None:
        """An element-wise function (`codegen.core.lut.FUNCTIONS`) as a `lut` node."""
        lut.check(function, args)
        x = self.tensor(x_value)
        self.emit(name, value, "lut", [x], nchw, function=function, args=tuple(map(float, args)))

    def global_avgpool(self, name: str, value: str, x_value: str, nchw: tuple[int, ...]) -> None:
        self.emit(name, value, "global_avgpool", [self.tensor(x_value)], nchw)

    def global_maxpool(self, name: str, value: str, x_value: str, nchw: tuple[int, ...]) -> None:
        """The max over H and W (over L for a sequence): a max pool whose window is the image."""
        _, h, w = self.src_shapes[self.tensor(x_value)]
        self.pool(name, value, "maxpool2d", x_value, kernel=(h, w), stride=(h, w),
                  padding=(0, 0, 0, 0), nchw=nchw)  # fmt: skip

    def reduce(
        self,
        name: str,
        value: str,
        kind: str,
        x_value: str,
        out: tuple[int, ...],
        flatten: str | None,
    ) -> None:
        """A mean (`kind` "avgpool2d") or max ("maxpool2d") over H and W (over L for a sequence)
        to the framework's `out` (with batch). With the reduced axes dropped, `flatten` names the
        reshape to (N, C) that follows the pool; None when the framework keeps them."""
        pool = self.global_avgpool if kind == "avgpool2d" else self.global_maxpool
        if flatten is None:
            pool(name, value, x_value, out[1:])
            return
        pooled = f"{value}:keepdims"
        spatial = len(self.framework_shape(self.tensor(x_value))) - 1
        pool(name, pooled, x_value, (*out[1:], *(1,) * spatial))
        self.reshape(flatten, value, pooled, out)

    def reshape(self, name: str, value: str, x_value: str, out: tuple[int, ...]) -> None:
        """A reshape to `out` (the full shape, with batch): only a flatten to (N, features)."""
        x = self.tensor(x_value)
        if len(out) != 2 or out[0] != self.batch:
            raise Reject(f"reshape to {out} (only flatten to (N, features) is supported)")
        if self.src_shapes[x] == tuple(out[1:]):
            self.alias[value] = x
            return
        self.emit(name, value, "reshape", [x], out[1:], shape=(out[1],))

    def view_as(self, value: str, x_value: str, nchw: tuple[int, ...]) -> None:
        """A reshape that keeps the builder's image shape: a sequence (C, L) seen as the image
        (C, 1, L) or back (ONNX Unsqueeze / Squeeze around a 1-D op)."""
        x = self.tensor(x_value)
        if as_image(nchw) != self.src_shapes[x]:
            raise Reject(f"reshape to {tuple(nchw)} (only flatten to (N, features) is supported)")
        if len(nchw) == 2:
            self.sequences.add(x)
        self.alias[value] = x

    # ------------------------------------------------------------------ views
    def _indices(self, value: str) -> tuple[str, np.ndarray]:
        """The IR tensor a value reads, and for each of the value's elements (framework order,
        no batch) the flat index of the element it reads in that tensor's framework order."""
        src = self.alias[value]
        if src in self.pending_view and src not in self.viewed:
            x, idx, _, _ = self.pending_view[src]
            return x, idx
        x = self.tensor(value)
        return x, np.arange(math.prod(self.src_shapes[x])).reshape(self.framework_shape(x))

    def _pend(self, name: str, value: str, x: str, idx: np.ndarray, what: str) -> None:
        key = f"view:{value}"  # never an IR tensor name: those are identifiers
        self.pending_view[key] = (x, idx, name, what)
        self.alias[value] = key

    def view(self, name: str, value: str, x_value: str, out: tuple[int, ...], what: str) -> None:
        """A view/reshape to `out` (the framework shape, no batch): `what` names the op."""
        x, idx = self._indices(x_value)
        if idx.size != math.prod(out):
            raise Reject(f"{what} to {tuple(out)} changes the number of elements")
        self._pend(name, value, x, idx.reshape(out), what)

    def permute(
        self, name: str, value: str, x_value: str, dims: tuple[int, ...], what: str
    ) -> None:
        """A transpose/permute of the axes after the batch axis (`dims` counts from 0 there)."""
        x, idx = self._indices(x_value)
        self._pend(name, value, x, idx.transpose(dims), what)

    def slice(
        self, name: str, value: str, x_value: str, axis: int, start: int, stop: int, what: str
    ) -> None:
        """Elements start..stop-1 along `axis` (counted after the batch axis): chunk, split."""
        x, idx = self._indices(x_value)
        self._pend(name, value, x, np.take(idx, np.arange(start, stop), axis=axis), what)

    def _materialize(self, key: str) -> str:
        """The IR tensor of a view that something reads: its source (an identity), or a `gather`
        of whole channels."""
        if key in self.viewed:
            return self.viewed[key]
        x, idx, name, what = self.pending_view[key]
        src = self.src_shapes[x]
        flat = np.arange(math.prod(src))
        if idx.shape == self.framework_shape(x) and np.array_equal(idx.reshape(-1), flat):
            self.viewed[key] = x
            return x
        shape = as_image(idx.shape)
        c, h, w = shape if len(shape) == 3 else (0, 0, 0)
        if len(shape) != 3 or len(src) != 3 or (h, w) != src[1:]:
            raise Reject(
                f"{what} at node '{name}' to {idx.shape}: only flatten, channel permutations "
                "(channel shuffle) and channel slices (chunk, split) are supported"
            )
        pix = idx.reshape(c, h * w)
        chan = pix[:, 0] // (h * w)
        if not np.array_equal(pix, chan[:, None] * (h * w) + flat[None, : h * w]):
            raise Reject(
                f"{what} at node '{name}' to {idx.shape}: only flatten, channel permutations "
                "(channel shuffle) and channel slices (chunk, split) are supported"
            )
        self.emit(name, key, "gather", [x], idx.shape, index=tuple(int(v) for v in chan))
        self.viewed[key] = name
        return name

    def add(self, name: str, value: str, a_value: str, b_value: str, nchw: tuple[int, ...]) -> None:
        xa, xb = self.tensor(a_value), self.tensor(b_value)
        if self.shapes[xa] != self.shapes[xb]:
            raise Reject("add with broadcasting")
        self.emit(name, value, "add", [xa, xb], nchw)

    def mul(self, name: str, value: str, a_value: str, b_value: str, nchw: tuple[int, ...]) -> None:
        """An element-wise product; a per-channel scale (N, C, 1, 1) or (N, C) times a tensor of
        C channels (squeeze-excitation, in either order) becomes the node's second input."""
        xa, xb = self.tensor(a_value), self.tensor(b_value)
        sa, sb = self.src_shapes[xa], self.src_shapes[xb]
        if sa != sb:
            if sa != as_image(nchw):
                xa, xb, sa, sb = xb, xa, sb, sa  # the scale second
            if math.prod(sb) != sb[0] or sa != as_image(nchw) or sb[0] != sa[0]:
                raise Reject("mul with broadcasting other than one value per channel (N, C, 1, 1)")
        self.emit(name, value, "mul", [xa, xb], nchw)

    def softmax(
        self, name: str, value: str, x_value: str, axis: int, nchw: tuple[int, ...]
    ) -> None:
        """Softmax over `axis` of the framework's shape (with batch): only the channel axis."""
        x = self.tensor(x_value)
        rank = 1 + len(self.framework_shape(x))
        if axis % rank != 1:
            raise Reject(f"softmax over dim {axis} (only over the channels, dim=1)")
        self.emit(name, value, "softmax", [x], nchw)

    def concat(self, name: str, value: str, x_values: list[str], nchw: tuple[int, ...]) -> None:
        """Concatenation of channels; of one value it is that value (DenseNet's `torch.cat` of
        a block's first features, which the ONNX exporters write as an Identity)."""
        if len(x_values) == 1:
            self.same(value, x_values[0])
            return
        self.emit(name, value, "concat", [self.tensor(v) for v in x_values], nchw)

    def zero_pad(self, value: str, x_value: str, pad: Pad4) -> None:
        """Zero padding (top, bottom, left, right), folded into the convolution that reads it."""
        if any(p < 0 for p in pad):
            raise Reject("padding other than non-negative zero padding of H and W")
        key = f"pad:{value}"  # never an IR tensor name: those are identifiers
        self.pending_pad[key] = (self.tensor(x_value), pad)
        self.alias[value] = key

    # ------------------------------------------------------------------ result
    def freeze(self) -> Graph:
        used = {t for r in self.raw for t in r.inputs} | set(self.output_names)
        nodes = []
        for r in self.raw:
            if r.name not in used:
                continue  # e.g. a branch whose value is never used
            attrs = dict(r.attrs)
            if r.op in CLAMP_OPS:
                attrs.setdefault("clamp", (-INF, INF))
            nodes.append(Node(r.name, r.op, tuple(r.inputs), r.name, attrs, dict(r.params)))
        live = {self.input_name} | {n.output for n in nodes}
        tensors = {t: Tensor(t, self.shapes[t]) for t in self.shapes if t in live}
        if self.input_name in self.output_names or not nodes:
            raise InvalidModelError("the model computes nothing from its input")
        seqs = frozenset(t for t in self.sequences if t in live)
        first, *more = self.output_names
        return Graph(self.name, tuple(nodes), tensors, self.input_name, first, seqs, tuple(more))


class Namespace:
    """Unique Python-identifier node names, made the way torch.fx names its nodes (so the ONNX
    export of a module gets the names its torch.fx trace gets)."""

    _name = re.compile(r"^([a-zA-Z_][0-9a-zA-Z_]*?)(?:_(\d+))?$")
    _illegal_chars = re.compile(r"[^0-9a-zA-Z_]+")
    _camel = re.compile(r"(?<=[a-z])([A-Z])")
    _illegal_names = frozenset(
        [*keyword.kwlist, *dir(builtins), "inf", "nan", "NoneType", "torch", "device"]
    )

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.count: dict[str, int] = {}

    def create(self, candidate: str) -> str:
        candidate = self._camel.sub(r"_\1", candidate).lower()
        match = self._name.match(candidate)
        if match is None:
            candidate = self._illegal_chars.sub("_", candidate) or "_unnamed"
            if candidate[0].isdigit():
                candidate = f"_{candidate}"
            match = self._name.match(candidate)
            assert match is not None
        base, suffix = match.group(1, 2)
        if suffix is None or candidate in self.used:
            num = self.count.get(base, 0)
            if candidate in self._illegal_names:
                num += 1
                candidate = f"{base}_{num}"
        else:
            num = int(suffix)
        while candidate in self.used:
            num += 1
            candidate = f"{base}_{num}"
        self.used.add(candidate)
        self.count[base] = num
        return candidate
