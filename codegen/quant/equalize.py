"""Cross-layer equalization of a float graph (Nagel et al. 2019, "Data-Free Quantization").

A ReLU (or no activation), max pooling, average pooling and flattening are positively
homogeneous: f(x / s) = f(x) / s for s > 0. So output channel i of a conv2d/dense layer L1 can be
divided by s_i (its weights and bias) and every weight of the next weighted layer L2 that reads
channel i multiplied by s_i without changing the network's float outputs (up to float rounding).
`pairs` finds such (L1, L2) chains: L1's output reaches L2 and nothing else, through maxpool2d,
avgpool2d, global_avgpool or a reshape to a vector (channel i of an (H, W, C) tensor is element
k of the flat vector when k % C == i, NHWC order).

Two choices of s (`CLES`):

- "weights" (Nagel): s_i = sqrt(r1_i / r2_i) with r1_i the largest |weight| of L1's channel i and
  r2_i the largest |weight| of L2 reading channel i, which gives both the same range; repeated
  over the chains until it settles (a layer in two chains is rescaled by both).
- "activations": s_i = m_i / max_j m_j, m_i the largest value of channel i on the calibration
  data, so every channel of L2's input reaches the same maximum. The accumulator bound charges
  each weight the input format's maximum (Σ_k |w_k| · max|x|): after this scaling that maximum is
  every channel's own, the tightest bound, and the per-tensor input step suits every channel. The
  per-channel weight formats of L1 absorb its rescaled rows.

`equalize` is a pure function graph -> graph; `codegen.quantize(cle=...)` applies it before the
`ptq` search (the QuantizedModel's float graph is then the equalized one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch

from codegen.core import simulate
from codegen.core.errors import QaccError
from codegen.core.ir import WEIGHTED_OPS, Graph, Node
from codegen.quant import distributed as ddp

CLES = ("none", "weights", "activations")
DEFAULT_CLE = "activations"
ADAPTIVE_CLE = "activations"
"""method="adaptive"'s default (docs/adaptive.md)."""
SWEEPS = 20
"""Passes of the "weights" equalization over the chains."""
MIN_SCALE = 2.0**-16
"""Scales are kept in [MIN_SCALE, 1 / MIN_SCALE] (a nearly dead channel is not blown up)."""

_PASS_THROUGH = ("maxpool2d", "avgpool2d", "global_avgpool", "reshape")


def check_cle(cle: str) -> str:
    if cle not in CLES:
        raise QaccError(f"unknown cle '{cle}'; choose one of {', '.join(CLES)}")
    return cle


@dataclass(frozen=True)
class Chain:
    """L1 -> (homogeneous ops) -> L2; L2's input element k reads L1's channel k % channels."""

    first: str
    second: str
    channels: int


def _homogeneous(node: Node) -> bool:
    lo, hi = node.attrs.get("clamp", (-math.inf, math.inf))
    return (lo == 0 or lo == -math.inf) and hi == math.inf


def pairs(graph: Graph) -> list[Chain]:
    """Every chain L1 -> L2 that cross-layer equalization may rescale."""
    out = []
    for n in graph.nodes:
        if n.op not in WEIGHTED_OPS or not _homogeneous(n):
            continue
        channels = n.params["weight"].shape[0]
        t = n.output
        while True:
            users = graph.consumers(t)
            if t == graph.output or len(users) != 1:
                break
            (u,) = users
            if u.op in WEIGHTED_OPS:
                out.append(Chain(n.name, u.name, channels))
                break
            flat = u.op == "reshape" and len(graph.tensors[u.output].shape) == 1
            if u.op not in _PASS_THROUGH or (u.op == "reshape" and not flat):
                break
            if "clamp" in u.attrs and not _homogeneous(u):
                break
            t = u.output
    return out


def input_channel(node: Node, channels: int) -> npt.NDArray[np.int64]:
    """The L1 channel each weight of `node` reads, shaped to broadcast against its weight."""
    w = node.params["weight"]
    if node.op == "dense":
        return (np.arange(w.shape[1]) % channels)[None, :]
    o, per_group = w.shape[0], w.shape[3]
    groups = node.attrs.get("groups", 1)
    idx = (np.arange(o) // (o // groups))[:, None] * per_group + np.arange(per_group)[None, :]
    return idx[:, None, None, :]


def rescale(graph: Graph, chain: Chain, s: npt.NDArray[np.float64]) -> Graph:
    """Channel i of chain.first divided by s[i], the weights of chain.second reading it times
    s[i]: the same float function."""
    a, b = graph.node(chain.first), graph.node(chain.second)
    shape = (-1,) + (1,) * (a.params["weight"].ndim - 1)
    pa = dict(a.params)
    pa["weight"] = a.params["weight"] / s.reshape(shape)
    pa["bias"] = a.params["bias"] / s
    pb = dict(b.params)
    pb["weight"] = b.params["weight"] * s[input_channel(b, chain.channels)]
    new = {a.name: replace(a, params=pa), b.name: replace(b, params=pb)}
    return graph.with_nodes(tuple(new.get(n.name, n) for n in graph.nodes), graph.tensors)


def weight_ranges(graph: Graph, chain: Chain) -> tuple[np.ndarray, np.ndarray]:
    """(r1, r2): the largest |weight| of each channel of chain.first and read by chain.second."""
    a, b = graph.node(chain.first), graph.node(chain.second)
    r1 = np.abs(a.params["weight"]).reshape(chain.channels, -1).max(axis=1)
    wb = np.abs(b.params["weight"])
    idx = np.broadcast_to(input_channel(b, chain.channels), wb.shape)
    r2 = np.zeros(chain.channels)
    np.maximum.at(r2, idx.ravel(), wb.ravel())
    return r1, r2


def channel_max(graph: Graph, x_nhwc: np.ndarray, names: set[str]) -> dict[str, np.ndarray]:
    """The largest |output| of every channel of the named nodes on x (activation applied)."""
    seen: dict[str, np.ndarray] = {}

    def observe(node: Node, xs: list[torch.Tensor], pre: torch.Tensor) -> None:
        if node.name not in names:
            return
        lo, hi = node.attrs.get("clamp", (-math.inf, math.inf))
        v = pre.clamp(lo, hi).abs().transpose(0, 1).reshape(pre.shape[1], -1).amax(dim=1)
        m = v.double().cpu().numpy()
        seen[node.name] = np.maximum(seen[node.name], m) if node.name in seen else m

    for i in range(0, len(x_nhwc), 512):
        simulate.run(graph, x_nhwc[i : i + 512], observe=observe, dtype=torch.float32)
    return ddp.all_reduce_dict(seen, "max")


def _safe(s: np.ndarray) -> np.ndarray:
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return np.clip(s, MIN_SCALE, 1.0 / MIN_SCALE)


def equalize(graph: Graph, cle: str, x_nhwc: np.ndarray | None = None) -> Graph:
    """The graph with every chain of `pairs` equalized ("weights", or "activations" on the
    calibration inputs x_nhwc); "none" returns the graph."""
    if check_cle(cle) == "none":
        return graph
    chains = pairs(graph)
    if cle == "activations":
        if x_nhwc is None:
            raise QaccError("cle='activations' needs calibration inputs")
        m = channel_max(graph, x_nhwc, {c.first for c in chains})
        for c in chains:  # the chains rescale different axes: one pass, in any order
            with np.errstate(divide="ignore", invalid="ignore"):
                s = m[c.first] / m[c.first].max(initial=0.0)
            graph = rescale(graph, c, _safe(s))
        return graph
    for _ in range(SWEEPS):
        for c in chains:
            r1, r2 = weight_ranges(graph, c)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.sqrt(r1 / r2)
            graph = rescale(graph, c, _safe(s))
    return graph
