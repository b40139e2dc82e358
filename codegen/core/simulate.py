"""Float execution of an `ir.Graph` in PyTorch, with optional fake quantization.

Used for three things: running the float graph (calibration, frontend checks), ranking candidate
formats during the bit-width search (some nodes quantized, the rest float), and the float64
simulation of a fully quantized graph, which in `guaranteed` mode equals the integer reference
exactly (every product and partial sum of power-of-two values is exact in float64).

Fake quantization of a tensor with format f:
v -> clamp(floor(v * 2^frac + 0.5), qmin, qmax) * 2^-frac,
the float-side twin of `codegen.core.formats.requantize` (round half up, saturate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from codegen.core import lut
from codegen.core.ir import Graph, Node, QFormat

Observer = Callable[[Node, list[torch.Tensor], torch.Tensor], None]
Overrides = Mapping[str, Mapping[str, Any]]


def fake_quant(v: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    lo, hi = fmt.qmin - fmt.zero_point, fmt.qmax - fmt.zero_point
    if fmt.is_pow2:
        scale = 2.0**fmt.frac
        return v.mul(scale).add_(0.5).floor_().clamp_(lo, hi).div_(scale)
    return v.div(fmt.scale).add_(0.5).floor_().clamp_(lo, hi).mul_(fmt.scale)


def _param(node: Node, over: Mapping[str, Any], key: str, like: torch.Tensor) -> torch.Tensor:
    v = over.get(key, node.params[key])
    if isinstance(v, torch.Tensor):  # differentiable parameters (quantization-aware training)
        return v.to(like.device, like.dtype)
    return torch.as_tensor(np.asarray(v), dtype=like.dtype, device=like.device)


def eval_node(node: Node, xs: list[torch.Tensor], over: Mapping[str, Any]) -> torch.Tensor:
    """The node's output before its clamp (the pre-activation).

    Tensors here are torch-native NCHW (images) or (N, C); the channel axis is always 1. The IR's
    NHWC order matters only where memory order is visible: weights (OHWI) and flatten.
    """
    a = node.attrs
    x = xs[0]
    if node.op == "conv2d":
        w = _param(node, over, "weight", x).permute(0, 3, 1, 2)
        b = _param(node, over, "bias", x)
        top, bottom, left, right = a["padding"]
        conv = {"stride": a["stride"], "dilation": a["dilation"], "groups": a["groups"]}
        if top == bottom and left == right:  # the convolution pads itself: no padded copy
            return F.conv2d(x, w, b, padding=(top, left), **conv)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, **conv)
    if node.op == "dense":
        return F.linear(x, _param(node, over, "weight", x), _param(node, over, "bias", x))
    if node.op == "maxpool2d":
        top, bottom, left, right = a["padding"]
        if top == bottom and left == right:
            return F.max_pool2d(x, a["kernel"], a["stride"], padding=(top, left))
        # asymmetric (a ceil_mode pool's extra bottom/right): padding that never wins the max
        xp = F.pad(x, (left, right, top, bottom), value=-math.inf)
        return F.max_pool2d(xp, a["kernel"], a["stride"])
    if node.op == "avgpool2d":
        top, bottom, left, right = a["padding"]
        kh, kw = a["kernel"]
        s = F.avg_pool2d(x, a["kernel"], a["stride"], padding=(top, left), divisor_override=1)
        return s * float(over.get("scale", 1.0 / (kh * kw)))
    if node.op == "global_avgpool":
        n = x.shape[2] * x.shape[3]
        return x.sum(dim=(2, 3), keepdim=True) * float(over.get("scale", 1.0 / n))
    if node.op == "add":
        return xs[0] + xs[1]
    if node.op == "mul":  # a per-channel scale (N, C) or (N, C, 1, 1) broadcasts over H, W
        b = xs[1]
        if b.shape != x.shape:  # the same values ((N, C) and (N, C, 1, 1)), or a scale
            full = b[0].numel() == x[0].numel()
            b = b.reshape(x.shape if full else (b.shape[0], x.shape[1], *(1,) * (x.ndim - 2)))
        return x * b if "scale" not in over else x * b * float(over["scale"])
    if node.op == "concat":
        return torch.cat(xs, dim=1)
    if node.op == "softmax":
        if "exp_table" not in over:
            return torch.softmax(x, dim=1)
        # the integer graph's: its exp table at the distances of the (fake-quantized) input;
        # the output's fake quantization rounds e / s as the integer division does
        q = torch.round(x / float(over["in_scale"]))
        d = (q.amax(dim=1, keepdim=True) - q).long()
        e = _param(node, over, "exp_table", x)[d]
        return e / e.sum(dim=1, keepdim=True)
    if node.op == "lut":  # the real function; its table agrees (codegen.core.lut.table)
        return lut.apply(a["function"], a.get("args", ()), x)
    if node.op in ("adaptive_avgpool2d", "adaptive_maxpool2d"):  # windows per row and column
        reduce = torch.amax if node.op == "adaptive_maxpool2d" else torch.sum
        rows = [
            torch.stack([reduce(x[:, :, r0:r1, c0:c1], dim=(2, 3)) for c0, c1 in a["cols"]], -1)
            for r0, r1 in a["rows"]
        ]
        y = torch.stack(rows, -2)  # (N, C, OH, OW)
        if node.op == "adaptive_maxpool2d":
            return y
        default = 1.0 / np.asarray(a["counts"], dtype=np.float64)
        scale = np.asarray(over.get("scale", default), dtype=np.float64)
        return y * torch.as_tensor(scale.reshape(y.shape[2:]), dtype=y.dtype, device=y.device)
    if node.op == "resize_bilinear":  # rows then columns, each a blend of two input lines
        for axis, key in ((2, "row"), (3, "col")):
            taps = torch.as_tensor(np.asarray(a[f"{key}s"], dtype=np.int64), device=x.device)
            lam = np.asarray(over.get(f"{key}_lambda", a[f"{key}_lambda"]), dtype=np.float64)
            shape = [1, 1, 1, 1]
            shape[axis] = -1
            w1 = torch.as_tensor(lam, dtype=x.dtype, device=x.device).reshape(shape)
            x0, x1 = x.index_select(axis, taps[:, 0]), x.index_select(axis, taps[:, 1])
            x = x0 * (1 - w1) + x1 * w1
        return x
    if node.op == "gather":  # channels picked by index (channel axis 1)
        return x[:, list(a["index"])]
    if node.op == "zero_insert":  # zeros between the pixels (a transposed conv's stride)
        sh, sw = a["stride"]
        n, c, ih, iw = x.shape
        y = x.new_zeros((n, c, (ih - 1) * sh + 1, (iw - 1) * sw + 1))
        y[:, :, ::sh, ::sw] = x
        return y
    if node.op == "reshape":  # flatten in NHWC memory order
        src = x.permute(0, 2, 3, 1) if x.ndim == 4 else x
        return src.reshape(x.shape[0], *a["shape"])
    raise ValueError(f"unknown op {node.op}")


def run(
    graph: Graph,
    x_nhwc: np.ndarray | torch.Tensor,
    *,
    formats: Mapping[str, QFormat] | None = None,
    overrides: Overrides | None = None,
    dtype: torch.dtype = torch.float64,
    observe: Observer | None = None,
    batch: int = 2048,
    state: Mapping[str, torch.Tensor] | None = None,
    start: int = 0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Run the graph on a float NHWC batch; returns the (first) output (NHWC for images) as
    float64; `run_outputs` takes the same arguments and returns every output.

    `formats` fake-quantizes the tensors it names when they are produced (the input too);
    `overrides` replaces node parameters (weight, bias, scale) by their quantized values.
    `observe(node, inputs, pre_activation)` sees NCHW / (N, C) tensors (channel axis 1).
    `state` (from `prefix`) holds the tensors of nodes before index `start`, for a whole batch.
    `device` is where the batches are computed (the result is always a CPU NumPy array).
    """
    return run_outputs(
        graph, x_nhwc, formats=formats, overrides=overrides, dtype=dtype, observe=observe,
        batch=batch, state=state, start=start, device=device,
    )[0]  # fmt: skip


def run_outputs(
    graph: Graph,
    x_nhwc: np.ndarray | torch.Tensor,
    *,
    formats: Mapping[str, QFormat] | None = None,
    overrides: Overrides | None = None,
    dtype: torch.dtype = torch.float64,
    observe: Observer | None = None,
    batch: int = 2048,
    state: Mapping[str, torch.Tensor] | None = None,
    start: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, ...]:
    """`run`, returning every output of the graph in its order."""
    if state is not None:
        return _finish(graph, dict(state), start, formats or {}, overrides or {}, observe)
    formats = formats or {}
    overrides = overrides or {}
    if isinstance(x_nhwc, torch.Tensor):
        x_all = x_nhwc.to(dtype=dtype)
    else:
        x_all = torch.as_tensor(np.asarray(x_nhwc), dtype=dtype)
    if x_all.ndim == 4:
        x_all = x_all.permute(0, 3, 1, 2)
    outs = []
    with torch.no_grad():
        for i in range(0, x_all.shape[0], batch):
            xb = x_all[i : i + batch].to(device).contiguous()
            env: dict[str, torch.Tensor] = {graph.input: xb}
            if graph.input in formats:
                env[graph.input] = fake_quant(env[graph.input], formats[graph.input])
            outs.append(_finish(graph, env, 0, formats, overrides, observe))
    return tuple(np.concatenate(o, axis=0) for o in zip(*outs, strict=True))


def _finish(
    graph: Graph,
    env: dict[str, torch.Tensor],
    start: int,
    formats: Mapping[str, QFormat],
    overrides: Overrides,
    observe: Observer | None,
    stop: int | None = None,
) -> tuple[np.ndarray, ...]:
    """Evaluate nodes start..stop-1 over `env` (updated in place); the graph outputs as NHWC."""
    with torch.no_grad():
        for node in graph.nodes[start:stop]:
            xs = [env[t] for t in node.inputs]
            pre = eval_node(node, xs, overrides.get(node.name, {}))
            if observe is not None:
                observe(node, xs, pre)
            lo, hi = node.attrs.get("clamp", (-np.inf, np.inf))
            y = pre if (lo, hi) == (-np.inf, np.inf) else pre.clamp(lo, hi)
            fmt = formats.get(node.output)
            env[node.output] = fake_quant(y, fmt) if fmt is not None else y
    if stop is not None:
        return ()
    outs = (env[t] for t in graph.outputs)
    return tuple((y.permute(0, 2, 3, 1) if y.ndim == 4 else y).double().cpu().numpy() for y in outs)


def prefix(
    graph: Graph,
    x_nhwc: np.ndarray,
    stop: int,
    *,
    formats: Mapping[str, QFormat] | None = None,
    overrides: Overrides | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Tensors produced before node `stop` that later nodes read (one batch), for `run(state=)`.

    Tensors without a format in `formats` are kept in float: fake-quantizing them later with a
    format chosen then is the same as having quantized them when produced (fake quantization
    commutes with maxpool, concat and reshape, and is idempotent).
    """
    formats = formats or {}
    x = torch.as_tensor(np.asarray(x_nhwc), dtype=dtype)
    env = {graph.input: (x.permute(0, 3, 1, 2) if x.ndim == 4 else x).contiguous()}
    if graph.input in formats:
        env[graph.input] = fake_quant(env[graph.input], formats[graph.input])
    _finish(graph, env, 0, formats, overrides or {}, None, stop)
    needed = {t for n in graph.nodes[stop:] for t in n.inputs} | set(graph.outputs)
    return {t: v for t, v in env.items() if t in needed}


def advance(
    graph: Graph,
    state: Mapping[str, torch.Tensor],
    start: int,
    stop: int,
    *,
    formats: Mapping[str, QFormat] | None = None,
    overrides: Overrides | None = None,
) -> dict[str, torch.Tensor]:
    """`prefix`'s state at `stop` from its state at `start` (nodes start..stop-1 evaluated), the
    same tensors as `prefix(stop)` when nodes before `start` saw the same formats and weights."""
    env = dict(state)
    _finish(graph, env, start, formats or {}, overrides or {}, None, stop)
    needed = {t for n in graph.nodes[stop:] for t in n.inputs} | set(graph.outputs)
    return {t: v for t, v in env.items() if t in needed}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x
