"""PyTorch frontend: an eval-mode nn.Module, traced with torch.fx, to a float `ir.Graph` (NHWC).

Normalisation done here: BatchNorm folded into the preceding conv/linear, ReLU/ReLU6/Hardtanh/clamp
fused into the producer as a `clamp` attribute, Dropout/Identity removed, zero padding (ZeroPad2d,
F.pad) folded into the following conv, flatten/view/reshape to 2-D kept as a `reshape` with the
following Linear's columns permuted from CHW to HWC order.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from codegen.errors import InvalidDataError, InvalidModelError, UnsupportedModelError
from codegen.ir import Graph, Node, Tensor

INF = math.inf


@dataclass
class _Raw:
    """A node under construction (mutable until the graph is frozen)."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


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
        self.name = name
        self.example = example
        self.raw: list[_Raw] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # IR (NHWC) shapes, without batch
        self.torch_shapes: dict[str, tuple[int, ...]] = {}  # torch (NCHW) shapes, without batch
        self.alias: dict[str, str] = {}  # fx node name -> IR tensor name
        self.pending_pad: dict[str, tuple[str, tuple[int, int, int, int]]] = {}
        self.input_name = ""
        self.output_name = ""

    # ------------------------------------------------------------------ helpers
    def fail(self, node: torch.fx.Node, what: str | None = None) -> UnsupportedModelError:
        what = what or f"unsupported op {_describe_target(node, self.modules)}"
        return UnsupportedModelError(
            f"{what} at node '{node.name}'; supported: Conv2d, Linear, BatchNorm, ReLU/ReLU6/"
            "Hardtanh/clamp, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), flatten, add, cat(dim=1)"
        )

    def tensor_arg(self, node: torch.fx.Node, arg: Any) -> str:
        if not isinstance(arg, torch.fx.Node) or arg.name not in self.alias:
            raise self.fail(
                node, f"non-tensor operand {arg!r} of {_describe_target(node, self.modules)}"
            )
        src = self.alias[arg.name]
        if src in self.pending_pad:
            raise self.fail(node, "zero padding not followed by a convolution")
        return src

    def emit(self, node: torch.fx.Node, op: str, inputs: list[str], **attrs: Any) -> _Raw:
        r = _Raw(node.name, op, inputs, attrs)
        self.raw.append(r)
        self.alias[node.name] = node.name
        tshape = _shape(node)[1:]
        self.torch_shapes[node.name] = tshape
        self.shapes[node.name] = _to_nhwc(tshape)
        return r

    # ------------------------------------------------------------------ ops
    def conv(self, node: torch.fx.Node, m: nn.Conv2d) -> None:
        if m.padding_mode != "zeros":
            raise self.fail(node, f"Conv2d padding_mode='{m.padding_mode}'")
        src = node.args[0]
        assert isinstance(src, torch.fx.Node)
        extra = (0, 0, 0, 0)
        x = self.alias.get(src.name, "")
        if x in self.pending_pad:
            x, extra = self.pending_pad[x]
        else:
            x = self.tensor_arg(node, src)
        kh, kw = _pair(m.kernel_size)
        dh, dw = _pair(m.dilation)
        if isinstance(m.padding, str):
            if m.padding == "valid":
                pad = (0, 0, 0, 0)
            else:  # 'same' (stride 1): torch puts the odd pixel at the bottom/right
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            ph, pw = _pair(m.padding)
            pad = (ph, ph, pw, pw)
        pad = (pad[0] + extra[0], pad[1] + extra[1], pad[2] + extra[2], pad[3] + extra[3])
        w = m.weight.detach().double().numpy().transpose(0, 2, 3, 1).copy()
        b = (
            m.bias.detach().double().numpy().copy()
            if m.bias is not None
            else np.zeros(w.shape[0], dtype=np.float64)
        )
        r = self.emit(
            node,
            "conv2d",
            [x],
            stride=_pair(m.stride),
            padding=pad,
            dilation=(dh, dw),
            groups=int(m.groups),
        )
        r.params = {"weight": w, "bias": b}

    def linear(self, node: torch.fx.Node, m: nn.Linear) -> None:
        x = self.tensor_arg(node, node.args[0])
        if len(self.shapes[x]) != 1:
            raise self.fail(node, "Linear on a tensor that is not 2-D (flatten first)")
        w = m.weight.detach().double().numpy().copy()
        # Columns follow torch's flatten order (C, H, W); the IR flattens NHWC memory (H, W, C).
        chw = self._flattened_from(x)
        if chw is not None:
            c, h, wd = chw
            w = w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        b = (
            m.bias.detach().double().numpy().copy()
            if m.bias is not None
            else np.zeros(w.shape[0], dtype=np.float64)
        )
        r = self.emit(node, "dense", [x])
        r.params = {"weight": np.ascontiguousarray(w), "bias": b}

    def _flattened_from(self, tensor: str) -> tuple[int, int, int] | None:
        for r in self.raw:
            if r.name == tensor and r.op == "reshape":
                src_shape = self.torch_shapes[r.inputs[0]]
                if len(src_shape) == 3 and src_shape[1] * src_shape[2] > 1:
                    return (src_shape[0], src_shape[1], src_shape[2])
        return None

    def batchnorm(self, node: torch.fx.Node, m: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        x = self.tensor_arg(node, node.args[0])
        prod = self._producer(x)
        if prod is None or prod.op not in ("conv2d", "dense") or self._shared(node, x):
            raise self.fail(
                node, f"{type(m).__name__} that does not directly follow a Conv2d/Linear"
            )
        if m.running_mean is None or m.running_var is None:
            raise self.fail(node, f"{type(m).__name__} without running statistics")
        var = m.running_var.detach().double().numpy()
        mean = m.running_mean.detach().double().numpy()
        gamma = m.weight.detach().double().numpy() if m.weight is not None else np.ones_like(var)
        beta = m.bias.detach().double().numpy() if m.bias is not None else np.zeros_like(var)
        k = gamma / np.sqrt(var + m.eps)
        w = prod.params["weight"]
        prod.params["weight"] = w * k.reshape((-1,) + (1,) * (w.ndim - 1))
        prod.params["bias"] = (prod.params["bias"] - mean) * k + beta
        self.alias[node.name] = x

    def clamp(self, node: torch.fx.Node, lo: float, hi: float) -> None:
        x = self.tensor_arg(node, node.args[0])
        prod = self._producer(x)
        fusable = ("conv2d", "dense", "add", "avgpool2d", "global_avgpool", "maxpool2d")
        if prod is None or prod.op not in fusable or self._shared(node, x):
            raise self.fail(node, "activation that does not directly follow a conv/linear/add/pool")
        old_lo, old_hi = prod.attrs.get("clamp", (-INF, INF))
        prod.attrs["clamp"] = (max(old_lo, float(lo)), min(old_hi, float(hi)))
        self.alias[node.name] = x

    def _shared(self, node: torch.fx.Node, tensor: str) -> bool:
        """Whether the value `node` would fuse into is also read by another node."""
        src = node.args[0]
        assert isinstance(src, torch.fx.Node)
        return len(src.users) > 1 or any(tensor in r.inputs for r in self.raw)

    def _producer(self, tensor: str) -> _Raw | None:
        for r in self.raw:
            if r.name == tensor:
                return r
        return None

    def pool(self, node: torch.fx.Node, kind: str, k: Any, s: Any, p: Any, **kw: Any) -> None:
        x = self.tensor_arg(node, node.args[0])
        title = {"maxpool2d": "MaxPool2d", "avgpool2d": "AvgPool2d"}[kind]
        if kw.get("ceil_mode"):
            raise self.fail(node, f"{title} with ceil_mode=True")
        if kind == "maxpool2d" and _pair(kw.get("dilation", 1)) != (1, 1):
            raise self.fail(node, "MaxPool2d with dilation")
        if kind == "maxpool2d" and kw.get("return_indices"):
            raise self.fail(node, "MaxPool2d with return_indices=True")
        ph, pw = _pair(p)
        if kind == "avgpool2d" and (ph or pw) and not kw.get("count_include_pad", True):
            raise self.fail(node, "AvgPool2d with padding and count_include_pad=False")
        if kind == "avgpool2d" and kw.get("divisor_override") is not None:
            raise self.fail(node, "AvgPool2d with divisor_override")
        kk = _pair(k)
        self.emit(node, kind, [x], kernel=kk, stride=_pair(s if s else k), padding=(ph, ph, pw, pw))

    def adaptive_avg(self, node: torch.fx.Node, size: Any) -> None:
        x = self.tensor_arg(node, node.args[0])
        if _pair(size) != (1, 1):
            in_shape = self.torch_shapes[x]
            if len(in_shape) == 3 and tuple(in_shape[1:]) == _pair(size):
                self.alias[node.name] = x
                return
            raise self.fail(node, f"AdaptiveAvgPool2d to {size} (only to 1x1)")
        self.emit(node, "global_avgpool", [x])

    def reshape(self, node: torch.fx.Node) -> None:
        x = self.tensor_arg(node, node.args[0])
        out = _shape(node)
        if len(out) != 2 or out[0] != self.example.shape[0]:
            raise self.fail(node, f"reshape to {out} (only flatten to (N, features) is supported)")
        if tuple(self.torch_shapes[x]) == out[1:]:
            self.alias[node.name] = x
            return
        self.emit(node, "reshape", [x], shape=(out[1],))

    def add(self, node: torch.fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("alpha", 1) != 1:
            raise self.fail(node, "add with alpha != 1")
        xa, xb = self.tensor_arg(node, a), self.tensor_arg(node, b)
        if self.shapes[xa] != self.shapes[xb]:
            raise self.fail(node, "add with broadcasting")
        self.emit(node, "add", [xa, xb])

    def cat(self, node: torch.fx.Node) -> None:
        seq = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        if not isinstance(seq, (list, tuple)) or not isinstance(dim, int) or dim % rank != 1:
            raise self.fail(node, "torch.cat other than on the channel dimension (dim=1)")
        xs = [self.tensor_arg(node, t) for t in seq]
        self.emit(node, "concat", xs)

    def zero_pad(self, node: torch.fx.Node, pad: Any, value: float = 0.0) -> None:
        x = self.tensor_arg(node, node.args[0])
        pad = _pair(pad) * 2 if isinstance(pad, int) else tuple(int(p) for p in pad)
        if len(pad) != 4 or value != 0 or any(p < 0 for p in pad):
            raise self.fail(node, "padding other than non-negative zero padding of H and W")
        left, right, top, bottom = pad
        self.pending_pad[node.name] = (x, (top, bottom, left, right))
        self.alias[node.name] = node.name

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
            self.visit(node)
        return self.freeze()

    def visit(self, node: torch.fx.Node) -> None:
        if node.op == "placeholder":
            if self.input_name:
                raise self.fail(node, "a second model input")
            self.input_name = node.name
            self.alias[node.name] = node.name
            tshape = tuple(int(s) for s in node.meta["tensor_meta"].shape[1:])
            self.torch_shapes[node.name] = tshape
            self.shapes[node.name] = _to_nhwc(tshape)
            return
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, torch.fx.Node):
                raise self.fail(node, "a model output that is not a single tensor")
            self.output_name = self.tensor_arg(node, out)
            return
        if node.op == "get_attr":
            raise self.fail(node, f"use of parameter '{node.target}' outside a layer")
        if not isinstance(node.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata):
            # A non-tensor value (x.size(0), ...): only allowed as reshape arguments.
            if node.op == "call_method" and node.target == "size":
                return
            if node.op == "call_function" and node.target in (operator.getitem, getattr):
                return
            raise self.fail(node)
        if node.op == "call_module":
            self.visit_module(node, self.modules[str(node.target)])
        elif node.op in ("call_function", "call_method"):
            self.visit_function(node)
        else:  # pragma: no cover - fx has no other kinds
            raise self.fail(node)

    def visit_module(self, node: torch.fx.Node, m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            self.conv(node, m)
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
        elif isinstance(m, nn.MaxPool2d):
            self.pool(
                node,
                "maxpool2d",
                m.kernel_size,
                m.stride,
                m.padding,
                dilation=m.dilation,
                ceil_mode=m.ceil_mode,
                return_indices=m.return_indices,
            )
        elif isinstance(m, nn.AvgPool2d):
            self.pool(
                node,
                "avgpool2d",
                m.kernel_size,
                m.stride,
                m.padding,
                ceil_mode=m.ceil_mode,
                count_include_pad=m.count_include_pad,
                divisor_override=m.divisor_override,
            )
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self.adaptive_avg(node, m.output_size)
        elif isinstance(m, nn.Flatten):
            self.reshape(node)
        elif isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Identity)):
            self.alias[node.name] = self.tensor_arg(node, node.args[0])
        elif isinstance(m, nn.ZeroPad2d):
            self.zero_pad(node, m.padding)
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
        elif t in (operator.add, operator.iadd, torch.add) or method in ("add", "add_"):
            self.add(node)
        elif t is torch.cat or t is torch.concat:
            self.cat(node)
        elif t in (torch.flatten, torch.reshape) or method in ("flatten", "view", "reshape"):
            self.reshape(node)
        elif t is F.max_pool2d:
            self.pool(
                node,
                "maxpool2d",
                arg(1, "kernel_size", None),
                arg(2, "stride", None),
                arg(3, "padding", 0),
                dilation=arg(4, "dilation", 1),
                ceil_mode=arg(5, "ceil_mode", False),
                return_indices=arg(6, "return_indices", False),
            )
        elif t is F.avg_pool2d:
            self.pool(
                node,
                "avgpool2d",
                arg(1, "kernel_size", None),
                arg(2, "stride", None),
                arg(3, "padding", 0),
                ceil_mode=arg(4, "ceil_mode", False),
                count_include_pad=arg(5, "count_include_pad", True),
                divisor_override=arg(6, "divisor_override", None),
            )
        elif t is F.adaptive_avg_pool2d:
            self.adaptive_avg(node, arg(1, "output_size", None))
        elif t in (F.dropout, F.dropout2d):
            self.alias[node.name] = self.tensor_arg(node, args[0])
        elif t is F.pad:
            mode = arg(2, "mode", "constant")
            if mode != "constant":
                raise self.fail(node, f"F.pad mode='{mode}'")
            self.zero_pad(node, arg(1, "pad", None), float(arg(3, "value", 0.0) or 0.0))
        else:
            raise self.fail(node)

    def freeze(self) -> Graph:
        used = {t for r in self.raw for t in r.inputs} | {self.output_name}
        nodes = []
        for r in self.raw:
            if r.name not in used:
                continue  # e.g. a branch whose value is never used
            attrs = dict(r.attrs)
            if r.op in ("conv2d", "dense", "add", "avgpool2d", "global_avgpool", "maxpool2d"):
                attrs.setdefault("clamp", (-INF, INF))
            nodes.append(Node(r.name, r.op, tuple(r.inputs), r.name, attrs, dict(r.params)))
        live = {self.input_name} | {n.output for n in nodes}
        tensors = {t: Tensor(t, self.shapes[t]) for t in self.shapes if t in live}
        if self.output_name == self.input_name or not nodes:
            raise InvalidModelError("the model computes nothing from its input")
        return Graph(self.name, tuple(nodes), tensors, self.input_name, self.output_name)


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    """The full torch shape (with batch) that ShapeProp recorded for a tensor-valued node."""
    meta = node.meta.get("tensor_meta")
    assert meta is not None, f"no shape recorded for node '{node.name}'"
    return tuple(int(s) for s in meta.shape)


def _to_nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 3:
        c, h, w = shape
        return (h, w, c)
    return shape


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
    return _Converter(model, _c_identifier(name), example).convert()


def _c_identifier(name: str) -> str:
    out = "".join(ch.lower() if ch.isalnum() else "_" for ch in name)
    return out if out and not out[0].isdigit() else f"m_{out}"
