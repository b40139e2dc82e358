"""PyTorch frontend: an eval-mode nn.Module, traced with torch.fx, to a float `ir.Graph` (NHWC).

This module reads torch: modules and functions, their arguments, the shapes ShapeProp records. The
normalisation (BatchNorm folded into the preceding conv/linear, or a depthwise 1x1 conv when it
follows none; ReLU/ReLU6/Hardtanh/clamp fused into the producer as a `clamp` attribute, or a `lut`
table when they fuse into nothing; Dropout/Identity/contiguous/eval StochasticDepth removed; zero
padding (ZeroPad2d, F.pad) folded into the following conv; flatten/view/reshape to 2-D kept as a
`reshape` with the following Linear's columns permuted from CHW to HWC order; 1-D sequences as
images with H = 1; a ceil_mode max pool's partial windows as extra bottom/right padding; mean over
H and W as a global average pool; products, including squeeze-excitation's per-channel scale)
is `builder.IRBuilder`'s, shared with the ONNX frontend. Adaptive
pools are mapped here: to 1 (average) as a global average pool, to other sizes dividing the input
as ordinary pools (kernel = stride = input / output).
"""

from __future__ import annotations

import contextlib
import io
import operator
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from codegen.core.errors import InvalidDataError, InvalidModelError, UnsupportedModelError
from codegen.core.ir import Graph, bilinear_taps
from codegen.frontend.builder import INF, IRBuilder, Reject, c_identifier, normalization_refusal


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _pair_float(v: Any) -> tuple[float, float]:
    if isinstance(v, (int, float)):
        return (float(v), float(v))
    a, b = v
    return (float(a), float(b))


def _one(v: Any) -> int:
    """A 1-D size argument (int or a 1-tuple)."""
    if isinstance(v, int):
        return v
    (a,) = v
    return int(a)


_DROPOUT_FUNCTIONS = (
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
)


_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.RMSNorm)
_NORM_FUNCTIONS = (F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm, torch.layer_norm)
"""Normalisations by per-sample statistics: refused with the reason (`normalization_refusal`)."""


_SHAPE_ARITHMETIC = (
    operator.getitem,
    getattr,
    operator.floordiv,
    operator.mul,
    operator.add,
    operator.sub,
)
"""Functions of non-tensor values (x.size() arithmetic): evaluated at trace time, used only as
the arguments of a view, whose shape ShapeProp records."""


def _describe_target(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} (module '{node.target}')"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        t = node.target
        mod = getattr(t, "__module__", "") or ""
        name = getattr(t, "__name__", str(t))
        if mod.startswith("torch._C") or mod == "torch":
            mod = "torch"
        elif mod.startswith("torch.nn.functional"):
            mod = "torch.nn.functional"
        elif mod == "_operator":
            mod = "operator"
        return f"{mod}.{name}" if mod else name
    return f"{node.op} {node.target}"


class _Converter:
    def __init__(self, model: nn.Module, name: str, example: torch.Tensor):
        self.model = model
        self.example = example
        self.b = IRBuilder(name, batch=int(example.shape[0]))
        self.splits: dict[str, tuple[str, int, list[tuple[int, int]]]] = {}  # chunk/split
        # the model's float type: PyTorch computes bilinear source coordinates in it
        self.float_type = np.float64 if example.dtype == torch.float64 else np.float32

    # ------------------------------------------------------------------ helpers
    def fail(self, node: torch.fx.Node, what: str | None = None) -> UnsupportedModelError:
        what = what or f"unsupported op {_describe_target(node, self.modules)}"
        return UnsupportedModelError(
            f"{what} at node '{node.name}'; supported: Conv1d/2d, ConvTranspose1d/2d, Linear, "
            "BatchNorm1d/2d, ReLU/ReLU6/Hardtanh/clamp, Hardswish/Hardsigmoid/SiLU/Sigmoid/Tanh/"
            "LeakyReLU/GELU, "
            "MaxPool1d/2d, AvgPool1d/2d, AdaptiveAvg/MaxPool, "
            "mean(H, W), flatten, add, mul (same shape, per-channel scale, constant), "
            "Softmax(dim=1), cat(dim=1), Dropout, Identity, contiguous, StochasticDepth, "
            "channel shuffle (view/transpose), chunk/split of channels, "
            "Upsample (nearest, bilinear, linear)"
        )

    def value(self, node: torch.fx.Node, arg: Any) -> str:
        """The builder's name of a tensor operand (the fx node's name)."""
        if not isinstance(arg, torch.fx.Node) or not self.b.knows(arg.name):
            raise self.fail(
                node, f"non-tensor operand {arg!r} of {_describe_target(node, self.modules)}"
            )
        return arg.name

    def batched(self, node: torch.fx.Node, d: int) -> None:
        """A d-D conv/pool reads N x C x (d sizes): torch also runs it on one unbatched sample,
        which is data of the wrong rank here (N x C x L given to a 2-D network)."""
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and len(_shape(src)) != d + 2:
            dims = " x ".join(map(str, self.example.shape[1:]))
            what = _describe_target(node, self.modules)
            raise InvalidDataError(
                f"the model does not accept inputs of shape N x {dims} ({what} takes "
                f"N x C x {'L' if d == 1 else 'H x W'}); give data of the shape it was trained on"
            )

    @staticmethod
    def shared(node: torch.fx.Node) -> bool:
        """Whether the operand `node` would fuse into is also read by another node."""
        src = node.args[0]
        assert isinstance(src, torch.fx.Node)
        return len(src.users) > 1

    # ------------------------------------------------------------------ ops
    def conv(self, node: torch.fx.Node, m: nn.Conv1d | nn.Conv2d) -> None:
        if m.padding_mode != "zeros":
            raise self.fail(node, f"{type(m).__name__} padding_mode='{m.padding_mode}'")
        self.batched(node, 1 if isinstance(m, nn.Conv1d) else 2)
        weight = m.weight.detach().double().numpy()
        if isinstance(m, nn.Conv1d):  # a sequence is the image (C, 1, L)
            kh, kw = 1, _one(m.kernel_size)
            dh, dw = 1, _one(m.dilation)
            stride = (1, _one(m.stride))
            weight = weight[:, :, None, :]
        else:
            kh, kw = _pair(m.kernel_size)
            dh, dw = _pair(m.dilation)
            stride = _pair(m.stride)
        if isinstance(m.padding, str):
            if m.padding == "valid":
                pad = (0, 0, 0, 0)
            else:  # 'same' (stride 1): torch puts the odd pixel at the bottom/right
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            ph, pw = (0, _one(m.padding)) if isinstance(m, nn.Conv1d) else _pair(m.padding)
            pad = (ph, ph, pw, pw)
        self.b.conv(
            node.name,
            node.name,
            self.value(node, node.args[0]),
            weight,
            m.bias.detach().double().numpy() if m.bias is not None else None,
            stride=stride,
            padding=pad,
            dilation=(dh, dw),
            groups=int(m.groups),
            nchw=_shape(node)[1:],
        )

    def conv_transpose(
        self, node: torch.fx.Node, m: nn.ConvTranspose1d | nn.ConvTranspose2d
    ) -> None:
        """A transposed convolution; its output_padding is read from the output shape torch
        computed (so a call with output_size= is covered too)."""
        if m.padding_mode != "zeros":
            raise self.fail(node, f"{type(m).__name__} padding_mode='{m.padding_mode}'")
        one_d = isinstance(m, nn.ConvTranspose1d)
        self.batched(node, 1 if one_d else 2)
        weight = m.weight.detach().double().numpy()
        if one_d:  # a sequence is the image (C, 1, L)
            weight = weight[:, :, None, :]
            pairs = [(d, _one(v)) for d, v in ((1, m.stride), (0, m.padding), (1, m.dilation))]
        else:
            pairs = [_pair(v) for v in (m.stride, m.padding, m.dilation)]
        (sh, sw), (ph, pw), (dh, dw) = pairs
        kh, kw = int(weight.shape[2]), int(weight.shape[3])
        src = _shape(node.args[0])  # type: ignore[arg-type]
        out = _shape(node)
        ih, iw, oh, ow = (1, src[2], 1, out[2]) if one_d else (*src[2:], *out[2:])
        extra = [
            o - ((i - 1) * s - 2 * p + d * (k - 1) + 1)
            for o, i, s, p, d, k in ((oh, ih, sh, ph, dh, kh), (ow, iw, sw, pw, dw, kw))
        ]
        self.b.conv_transpose(
            node.name,
            node.name,
            self.value(node, node.args[0]),
            weight,
            m.bias.detach().double().numpy() if m.bias is not None else None,
            stride=(sh, sw),
            padding=(ph, ph, pw, pw),
            output_padding=(extra[0], extra[1]),
            dilation=(dh, dw),
            groups=int(m.groups),
            nchw=out[1:],
        )

    def linear(self, node: torch.fx.Node, m: nn.Linear) -> None:
        self.b.dense(
            node.name,
            node.name,
            self.value(node, node.args[0]),
            m.weight.detach().double().numpy(),
            m.bias.detach().double().numpy() if m.bias is not None else None,
            _shape(node)[1:],
            "Linear",
        )

    def batchnorm(self, node: torch.fx.Node, m: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        if m.running_mean is None or m.running_var is None:
            raise self.fail(node, f"{type(m).__name__} without running statistics")
        var = m.running_var.detach().double().numpy()
        mean = m.running_mean.detach().double().numpy()
        gamma = m.weight.detach().double().numpy() if m.weight is not None else np.ones_like(var)
        beta = m.bias.detach().double().numpy() if m.bias is not None else np.zeros_like(var)
        self.b.batchnorm(
            node.name,
            self.value(node, node.args[0]),
            mean=mean,
            var=var,
            gamma=gamma,
            beta=beta,
            eps=m.eps,
            shared=self.shared(node),
            title=type(m).__name__,
            name=node.name,
        )

    def clamp(self, node: torch.fx.Node, lo: float, hi: float) -> None:
        x = self.value(node, node.args[0])
        self.b.clamp(node.name, x, lo, hi, self.shared(node), node.name)

    def lut(self, node: torch.fx.Node, function: str, *args: Any) -> None:
        x = self.value(node, node.args[0])
        if function == "gelu" and args:  # GELU's `approximate`
            if args[0] not in ("none", "tanh"):
                raise self.fail(node, f"GELU with approximate={args[0]!r}")
            function, args = ("gelu_tanh" if args[0] == "tanh" else "gelu"), ()
        if any(isinstance(a, torch.fx.Node) for a in args):
            raise self.fail(node, f"{_describe_target(node, self.modules)} with tensor arguments")
        self.b.lut(node.name, node.name, x, function, tuple(float(a) for a in args),
                   _shape(node)[1:])  # fmt: skip

    def pool(
        self, node: torch.fx.Node, kind: str, k: Any, s: Any, p: Any, d: int = 2, **kw: Any
    ) -> None:
        """Max/average pooling, 2-D or (`d` = 1) 1-D over a sequence (the image (C, 1, L))."""
        x = self.value(node, node.args[0])
        self.batched(node, d)
        title = {"maxpool2d": "MaxPool", "avgpool2d": "AvgPool"}[kind] + f"{d}d"

        def pair(v: Any) -> tuple[int, int]:
            return (1, _one(v)) if d == 1 else _pair(v)

        if kind == "maxpool2d" and pair(kw.get("dilation", 1)) != (1, 1):
            raise self.fail(node, f"{title} with dilation")
        if kind == "maxpool2d" and kw.get("return_indices"):
            raise self.fail(node, f"{title} with return_indices=True")
        ph, pw = (0, _one(p)) if d == 1 else _pair(p)
        self.b.pool(
            node.name,
            node.name,
            kind,
            x,
            kernel=pair(k),
            stride=pair(s if s else k),
            padding=(ph, ph, pw, pw),
            nchw=_shape(node)[1:],
            ceil_mode=bool(kw.get("ceil_mode")),
            count_include_pad=bool(kw.get("count_include_pad", True)),
            divisor=kw.get("divisor_override"),
        )

    def adaptive(self, node: torch.fx.Node, kind: str, size: Any, d: int = 2) -> None:
        """An adaptive pool: to a size that divides the input, a pool with kernel = stride =
        input / output (a global average pool for 1x1, nothing for the input's own size); to
        any other size, a pool over PyTorch's windows (`adaptive_avgpool2d` / `_maxpool2d`)."""
        x = self.value(node, node.args[0])
        self.batched(node, d)
        _, ih, iw = self.b.src_shapes[self.b.tensor(x)]
        if d == 1:
            out = (1, iw if size is None else _one(size))
        else:
            sh, sw = (size, size) if not isinstance(size, (list, tuple)) else size
            out = (ih if sh is None else int(sh), iw if sw is None else int(sw))
        if out == (ih, iw):
            self.b.same(node.name, x)
            return
        if ih % out[0] or iw % out[1]:  # windows of different sizes
            self.b.adaptive_pool(node.name, node.name, kind, x, _shape(node)[1:])
            return
        kernel = (ih // out[0], iw // out[1])
        if out == (1, 1) and kind == "avgpool2d":
            self.b.global_avgpool(node.name, node.name, x, _shape(node)[1:])
            return
        self.b.pool(node.name, node.name, kind, x, kernel=kernel, stride=kernel,
                    padding=(0, 0, 0, 0), nchw=_shape(node)[1:])  # fmt: skip

    def interpolate(
        self, node: torch.fx.Node, mode: str, scale: Any, recompute: Any, corners: Any = None
    ) -> None:
        """Upsample / F.interpolate. Mode 'nearest': PyTorch's source index of each output row
        and column, floor(i * s) in float32 (s = 1 / scale_factor, or in / out); 'bilinear' (and
        'linear' over a sequence): its two source rows and columns and their weights
        (`ir.bilinear_taps`)."""
        what = _describe_target(node, self.modules)
        rank = {"nearest": 4, "bilinear": 4, "linear": 3}.get(mode)
        if rank is None:
            raise self.fail(node, f"{what} with mode={mode!r}")
        x = self.value(node, node.args[0])
        src = _shape(node.args[0])  # type: ignore[arg-type]
        out = _shape(node)
        if len(src) != rank:
            shape = "N x C x H x W" if rank == 4 else "N x C x L"
            raise self.fail(node, f"{what} (mode {mode!r}) of a tensor that is not {shape}")
        if scale is None or recompute:
            scales: list[float | None] = [None, None]
        elif rank == 3:
            scales = [None, float(scale if isinstance(scale, (int, float)) else _one(scale))]
        else:
            scales = list(_pair_float(scale))
        if mode != "nearest":
            sizes = (
                [(1, 1), (src[2], out[2])]
                if rank == 3
                else list(zip(src[2:], out[2:], strict=True))
            )
            taps = [
                bilinear_taps(size, o, bool(corners), sf, self.float_type)
                for (size, o), sf in zip(sizes, scales, strict=True)
            ]
            self.b.resize_bilinear(node.name, node.name, x, taps[0], taps[1], out[1:])
            return
        idx = []
        for size, o, sf in zip(src[2:], out[2:], scales, strict=True):
            step = np.float32(1.0 / sf) if sf else np.float32(size) / np.float32(o)
            i = np.floor(np.arange(o, dtype=np.float32) * step).astype(np.int64)
            idx.append(tuple(int(v) for v in np.minimum(i, size - 1)))
        self.b.upsample_nearest(node.name, node.name, x, idx[0], idx[1], out[1:])

    def mean(self, node: torch.fx.Node, dims: Any, keepdim: bool) -> None:
        """x.mean over H and W (over L for a sequence): a global average pool (+ flatten)."""
        x = self.value(node, node.args[0])
        rank = len(_shape(node.args[0]))  # type: ignore[arg-type]
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        spatial = [2, 3] if rank == 4 else [2]
        if rank not in (3, 4) or sorted(int(v) % rank for v in dims) != spatial:
            raise self.fail(node, "mean other than over H and W (dims (2, 3))")
        flatten = None if keepdim else f"{node.name}_flatten"
        self.b.reduce(node.name, node.name, "avgpool2d", x, _shape(node), flatten)

    def reshape(self, node: torch.fx.Node) -> None:
        x = self.value(node, node.args[0])
        out = _shape(node)
        if out[0] != self.b.batch:
            raise self.fail(node, f"{_describe_target(node, self.modules)} of the batch axis")
        if len(out) == 2:  # a flatten (of a view read as a channel permutation)
            self.b.reshape(node.name, node.name, x, out)
        else:  # any other shape: a view, resolved when read (channel shuffle)
            self.b.view(node.name, node.name, x, out[1:], _describe_target(node, self.modules))

    def permute(self, node: torch.fx.Node, dims: list[int]) -> None:
        """transpose/permute of the axes after the batch axis (a channel shuffle's transpose)."""
        rank = len(_shape(node))
        dims = [int(d) % rank for d in dims]
        if dims[0] != 0:
            raise self.fail(node, f"{_describe_target(node, self.modules)} of the batch axis")
        x = self.value(node, node.args[0])
        what = _describe_target(node, self.modules)
        self.b.permute(node.name, node.name, x, tuple(d - 1 for d in dims[1:]), what)

    def split(self, node: torch.fx.Node, dim: Any) -> None:
        """chunk/split: a tuple of slices, each taken by a getitem (see `item`)."""
        metas = node.meta.get("tensor_meta")
        x = node.args[0]
        if not isinstance(metas, (list, tuple)) or not isinstance(x, torch.fx.Node):
            raise self.fail(node)
        rank = len(_shape(x))
        axis = int(dim) % rank
        if axis == 0:
            raise self.fail(node, f"{_describe_target(node, self.modules)} of the batch axis")
        bounds, start = [], 0
        for m in metas:
            bounds.append((start, start + int(m.shape[axis])))
            start += int(m.shape[axis])
        self.splits[node.name] = (self.value(node, x), axis - 1, bounds)

    def item(self, node: torch.fx.Node) -> None:
        """One piece of a chunk/split."""
        src, i = node.args[0], node.args[1]
        if (
            not isinstance(src, torch.fx.Node)
            or src.name not in self.splits
            or not isinstance(i, int)
        ):
            raise self.fail(node)
        x, axis, bounds = self.splits[src.name]
        what = _describe_target(src, self.modules)
        self.b.slice(node.name, node.name, x, axis, *bounds[i], what)

    def add(self, node: torch.fx.Node) -> None:
        if node.kwargs.get("alpha", 1) != 1:
            raise self.fail(node, "add with alpha != 1")
        a, b = (self.value(node, t) for t in node.args[:2])
        self.b.add(node.name, node.name, a, b, _shape(node)[1:])

    def mul(self, node: torch.fx.Node) -> None:
        """A product of two tensors (one may be a per-channel scale), or by a constant scalar."""
        a = node.args[0]
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
            self.b.mul(node.name, node.name, self.value(node, a), self.value(node, b),
                       _shape(node)[1:])  # fmt: skip
            return
        x, c = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise self.fail(node, f"{_describe_target(node, self.modules)} by {c!r}")
        self.b.lut(node.name, node.name, self.value(node, x), "scale", (float(c),),
                   _shape(node)[1:])  # fmt: skip

    def softmax(self, node: torch.fx.Node, dim: Any) -> None:
        if not isinstance(dim, int):
            raise self.fail(node, f"{_describe_target(node, self.modules)} without an int dim")
        x = self.value(node, node.args[0])
        try:
            self.b.softmax(node.name, node.name, x, dim, _shape(node)[1:])
        except Reject as e:
            raise self.fail(node, f"{_describe_target(node, self.modules)}: {e}") from None

    def cat(self, node: torch.fx.Node) -> None:
        seq = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        if not isinstance(seq, (list, tuple)) or not isinstance(dim, int) or dim % rank != 1:
            raise self.fail(node, "torch.cat other than on the channel dimension (dim=1)")
        xs = [self.value(node, t) for t in seq]
        self.b.concat(node.name, node.name, xs, _shape(node)[1:])

    def zero_pad(self, node: torch.fx.Node, pad: Any, value: float = 0.0) -> None:
        x = self.value(node, node.args[0])
        pad = _pair(pad) * 2 if isinstance(pad, int) else tuple(int(p) for p in pad)
        if len(pad) != 4 or value != 0:
            raise self.fail(node, "padding other than non-negative zero padding of H and W")
        left, right, top, bottom = pad
        self.b.zero_pad(node.name, x, (top, bottom, left, right))

    # ------------------------------------------------------------------ driver
    def convert(self) -> Graph:
        try:
            gm = torch.fx.symbolic_trace(self.model)
        except Exception as e:  # fx raises many kinds; the user needs one line
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UnsupportedModelError(
                f"torch.fx could not trace the model ({msg}); avoid data-dependent control flow"
            ) from None
        self.modules = dict(gm.named_modules())
        try:
            # ShapeProp prints a traceback of the failing node itself: keep it from the user
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(gm).propagate(self.example)
        except Exception as e:  # the model rejected an input of this shape
            cause = e.__cause__ or e
            msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            raise InvalidDataError(
                f"the model does not accept inputs of shape N x "
                f"{' x '.join(map(str, self.example.shape[1:]))} ({msg}); give data of the shape "
                "it was trained on"
            ) from None
        for node in gm.graph.nodes:
            try:
                self.visit(node)
            except Reject as e:
                raise self.fail(node, str(e)) from None
        return self.b.freeze()

    def visit(self, node: torch.fx.Node) -> None:
        if node.op == "placeholder":
            shape = tuple(int(s) for s in node.meta["tensor_meta"].shape[1:])
            self.b.set_input(node.name, node.name, shape)
            return
        if node.op == "output":
            out = node.args[0]  # a tensor, or several: a tuple / list, or a dict in key order
            outs = list(out.values()) if isinstance(out, dict) else out
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            if not outs or not all(isinstance(o, torch.fx.Node) for o in outs):
                raise self.fail(
                    node, "a model output that is not a tensor, or a tuple, list or dict of tensors"
                )
            for o in outs:
                self.b.set_output(self.value(node, o))
            return
        if node.op == "get_attr":
            # a normalisation module traced through (torchvision's LayerNorm2d) reads its
            # parameters here: name the normalisation instead
            path = str(node.target).rpartition(".")[0]
            owner = dict(self.model.named_modules()).get(path)  # the model's, not the trace's
            norm = next((u for u in node.users if u.target in _NORM_FUNCTIONS), node)
            if norm is not node or isinstance(owner, _NORM_MODULES):
                what = _describe_target(norm, self.modules)
                if isinstance(owner, _NORM_MODULES):
                    what = f"{type(owner).__name__} (module '{path}': {what})"
                raise normalization_refusal(what, norm.name)
            raise self.fail(node, f"use of parameter '{node.target}' outside a layer")
        if not isinstance(node.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata):
            # A non-tensor value (x.size(0), ...): only allowed as reshape arguments.
            if node.op == "call_method" and node.target == "size":
                return
            if node.op == "call_function" and node.target in _SHAPE_ARITHMETIC:
                return
            if node.target in (torch.chunk, torch.split) or node.target in ("chunk", "split"):
                dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
                self.split(node, dim)
                return
            raise self.fail(node)
        if node.op == "call_module":
            self.visit_module(node, self.modules[str(node.target)])
        elif node.op in ("call_function", "call_method"):
            self.visit_function(node)
        else:  # pragma: no cover - fx has no other kinds
            raise self.fail(node)

    def visit_module(self, node: torch.fx.Node, m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Conv1d)):
            self.conv(node, m)
        elif isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose1d)):
            self.conv_transpose(node, m)
        elif isinstance(m, nn.Linear):
            self.linear(node, m)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            self.batchnorm(node, m)
        elif isinstance(m, nn.ReLU):
            self.clamp(node, 0.0, INF)
        elif isinstance(m, nn.ReLU6):
            self.clamp(node, 0.0, 6.0)
        elif isinstance(m, nn.Hardtanh):
            self.clamp(node, m.min_val, m.max_val)
        elif isinstance(m, nn.Hardswish):
            self.lut(node, "hardswish")
        elif isinstance(m, nn.Hardsigmoid):
            self.lut(node, "hardsigmoid")
        elif isinstance(m, nn.SiLU):
            self.lut(node, "silu")
        elif isinstance(m, nn.Sigmoid):
            self.lut(node, "sigmoid")
        elif isinstance(m, nn.Tanh):
            self.lut(node, "tanh")
        elif isinstance(m, nn.LeakyReLU):
            self.lut(node, "leaky_relu", m.negative_slope)
        elif isinstance(m, nn.GELU):
            self.lut(node, "gelu", m.approximate)
        elif isinstance(m, nn.Softmax):
            self.softmax(node, m.dim)
        elif isinstance(m, (nn.MaxPool2d, nn.MaxPool1d)):
            self.pool(
                node,
                "maxpool2d",
                m.kernel_size,
                m.stride,
                m.padding,
                2 if isinstance(m, nn.MaxPool2d) else 1,
                dilation=m.dilation,
                ceil_mode=m.ceil_mode,
                return_indices=m.return_indices,
            )
        elif isinstance(m, (nn.AvgPool2d, nn.AvgPool1d)):
            self.pool(
                node,
                "avgpool2d",
                m.kernel_size,
                m.stride,
                m.padding,
                2 if isinstance(m, nn.AvgPool2d) else 1,
                ceil_mode=m.ceil_mode,
                count_include_pad=m.count_include_pad,
                divisor_override=getattr(m, "divisor_override", None),
            )
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)):
            self.adaptive(node, "avgpool2d", m.output_size, 2 if "2d" in type(m).__name__ else 1)
        elif isinstance(m, (nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool1d)):
            if m.return_indices:
                raise self.fail(node, f"{type(m).__name__} with return_indices=True")
            self.adaptive(node, "maxpool2d", m.output_size, 2 if "2d" in type(m).__name__ else 1)
        elif isinstance(m, nn.Upsample):
            self.interpolate(
                node, m.mode, m.scale_factor, m.recompute_scale_factor, m.align_corners
            )
        elif isinstance(m, nn.Flatten):
            self.reshape(node)
        elif isinstance(m, (nn.modules.dropout._DropoutNd, nn.Identity)) or (
            type(m).__name__ == "StochasticDepth" and not m.training
        ):  # eval-mode identities (torchvision's StochasticDepth by name: it may be absent)
            self.b.same(node.name, self.value(node, node.args[0]))
        elif isinstance(m, nn.ZeroPad2d):
            self.zero_pad(node, m.padding)
        elif isinstance(m, _NORM_MODULES):
            raise normalization_refusal(_describe_target(node, self.modules), node.name)
        else:
            raise self.fail(node)

    def visit_function(self, node: torch.fx.Node) -> None:
        t = node.target
        args, kw = node.args, node.kwargs

        def arg(i: int, key: str, default: Any) -> Any:
            return args[i] if len(args) > i else kw.get(key, default)

        method = t if node.op == "call_method" else None
        if t in (F.relu, torch.relu) or method in ("relu", "relu_"):
            self.clamp(node, 0.0, INF)
        elif t is F.relu6:
            self.clamp(node, 0.0, 6.0)
        elif t is F.hardtanh:
            self.clamp(node, arg(1, "min_val", -1.0), arg(2, "max_val", 1.0))
        elif t is torch.clamp or method in ("clamp", "clamp_", "clip"):
            lo, hi = arg(1, "min", None), arg(2, "max", None)
            if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
                raise self.fail(node, "clamp with tensor bounds")
            self.clamp(node, -INF if lo is None else lo, INF if hi is None else hi)
        elif t is F.hardswish:
            self.lut(node, "hardswish")
        elif t is F.hardsigmoid:
            self.lut(node, "hardsigmoid")
        elif t is F.silu:
            self.lut(node, "silu")
        elif t in (torch.sigmoid, F.sigmoid) or method in ("sigmoid", "sigmoid_"):
            self.lut(node, "sigmoid")
        elif t in (torch.tanh, F.tanh) or method in ("tanh", "tanh_"):
            self.lut(node, "tanh")
        elif t is F.leaky_relu:
            self.lut(node, "leaky_relu", arg(1, "negative_slope", 0.01))
        elif t is F.gelu:
            self.lut(node, "gelu", kw.get("approximate", "none"))
        elif t in (operator.add, operator.iadd, torch.add) or method in ("add", "add_"):
            self.add(node)
        elif t in (operator.mul, operator.imul, torch.mul) or method in ("mul", "mul_"):
            self.mul(node)
        elif t in (F.softmax, torch.softmax) or method == "softmax":
            if arg(3 if t is F.softmax else 2, "dtype", None) is not None:
                raise self.fail(node, "softmax with a dtype")
            self.softmax(node, arg(1, "dim", None))
        elif t is torch.cat or t is torch.concat:
            self.cat(node)
        elif t in (torch.flatten, torch.reshape) or method in ("flatten", "view", "reshape"):
            self.reshape(node)
        elif t in (F.max_pool2d, F.max_pool1d):
            self.pool(
                node,
                "maxpool2d",
                arg(1, "kernel_size", None),
                arg(2, "stride", None),
                arg(3, "padding", 0),
                2 if t is F.max_pool2d else 1,
                dilation=arg(4, "dilation", 1),
                ceil_mode=arg(5, "ceil_mode", False),
                return_indices=arg(6, "return_indices", False),
            )
        elif t in (F.avg_pool2d, F.avg_pool1d):
            # F.avg_pool1d has no divisor_override
            extra = (
                {"divisor_override": arg(6, "divisor_override", None)} if t is F.avg_pool2d else {}
            )
            self.pool(
                node,
                "avgpool2d",
                arg(1, "kernel_size", None),
                arg(2, "stride", None),
                arg(3, "padding", 0),
                2 if t is F.avg_pool2d else 1,
                ceil_mode=arg(4, "ceil_mode", False),
                count_include_pad=arg(5, "count_include_pad", True),
                **extra,
            )
        elif t in (F.adaptive_avg_pool2d, F.adaptive_avg_pool1d):
            d = 2 if t is F.adaptive_avg_pool2d else 1
            self.adaptive(node, "avgpool2d", arg(1, "output_size", None), d)
        elif t in (F.adaptive_max_pool2d, F.adaptive_max_pool1d):
            if arg(2, "return_indices", False):
                raise self.fail(node, "adaptive max pooling with return_indices=True")
            d = 2 if t is F.adaptive_max_pool2d else 1
            self.adaptive(node, "maxpool2d", arg(1, "output_size", None), d)
        elif t is F.interpolate:
            if arg(6, "antialias", False):
                raise self.fail(node, "F.interpolate with antialias=True")
            self.interpolate(node, arg(3, "mode", "nearest"), arg(2, "scale_factor", None),
                             arg(5, "recompute_scale_factor", None),
                             arg(4, "align_corners", None))  # fmt: skip
        elif t is torch.mean or method == "mean":
            if arg(3, "dtype", None) is not None:
                raise self.fail(node, "mean with a dtype")
            self.mean(node, arg(1, "dim", None), bool(arg(2, "keepdim", False)))
        elif t in _DROPOUT_FUNCTIONS:
            alpha = t in (F.alpha_dropout, F.feature_alpha_dropout)
            training = arg(2, "training", not alpha)  # torch's defaults
            if training:
                raise self.fail(node, f"{_describe_target(node, self.modules)} with training=True")
            self.b.same(node.name, self.value(node, args[0]))
        elif getattr(t, "__name__", None) == "stochastic_depth":  # torchvision.ops, by name
            if arg(3, "training", True):
                raise self.fail(node, "stochastic_depth with training=True")
            self.b.same(node.name, self.value(node, args[0]))
        elif t is operator.getitem:
            self.item(node)
        elif t is torch.transpose or method in ("transpose", "swapaxes", "swapdims"):
            rank = len(_shape(node))
            d0, d1 = int(arg(1, "dim0", 0)) % rank, int(arg(2, "dim1", 1)) % rank
            dims = list(range(rank))
            dims[d0], dims[d1] = d1, d0
            self.permute(node, dims)
        elif t is torch.permute or method == "permute":
            order: Any = arg(1, "dims", None)
            if isinstance(order, int):  # x.permute(0, 2, 3, 1)
                order = args[1:]
            self.permute(node, [int(d) for d in order])
        elif method == "contiguous":
            self.b.same(node.name, self.value(node, args[0]))
        elif t in _NORM_FUNCTIONS:
            raise normalization_refusal(_describe_target(node, self.modules), node.name)
        elif t is F.pad:
            mode = arg(2, "mode", "constant")
            if mode != "constant":
                raise self.fail(node, f"F.pad mode='{mode}'")
            self.zero_pad(node, arg(1, "pad", None), float(arg(3, "value", 0.0) or 0.0))
        else:
            raise self.fail(node)


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    """The full torch shape (with batch) that ShapeProp recorded for a tensor-valued node."""
    meta = node.meta.get("tensor_meta")
    assert meta is not None, f"no shape recorded for node '{node.name}'"
    return tuple(int(s) for s in meta.shape)


def check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidModelError(
                f"tensor '{name}' holds NaN or Inf; retrain or fix the checkpoint before quantizing"
            )


def from_torch(model: nn.Module, example_nchw: np.ndarray, name: str | None = None) -> Graph:
    """Trace `model` (put in eval mode) on an example batch and return the float graph."""
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = model.eval()
    check_finite(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    example = torch.as_tensor(np.ascontiguousarray(example_nchw[:1]), dtype=dtype)
    name = name or type(model).__name__
    return _Converter(model, c_identifier(name), example).convert()
