"""Calibration: observe the float graph on sample inputs.

Under torchrun each rank calibrates on its own part of the calibration set and the ranges are
all-reduced (MIN / MAX: exact, so the formats are the same whatever the number of ranks, and a
calibration set larger than one machine's memory can be spread over several). The float logits
(`Calibration.output`) stay per rank: they belong to that rank's samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from codegen.core import simulate
from codegen.core.ir import WEIGHTED_OPS, Graph, Node
from codegen.core.progress import bar
from codegen.quant import distributed as ddp


@dataclass
class Calibration:
    """Ranges seen on the calibration data, per tensor and per weighted node's output channel."""

    tensor_min: dict[str, float] = field(default_factory=dict)
    tensor_max: dict[str, float] = field(default_factory=dict)
    preact_absmax: dict[str, np.ndarray] = field(default_factory=dict)  # per output channel
    output: np.ndarray = field(default_factory=lambda: np.empty(0))  # float logits
    outputs: tuple[np.ndarray, ...] = ()  # every float output (output is the first)

    def absmax(self, tensor: str) -> float:
        return max(abs(self.tensor_min[tensor]), abs(self.tensor_max[tensor]))


def calibrate(
    graph: Graph, x_nhwc: np.ndarray, progress: bool = True, device: torch.device | str = "cpu"
) -> Calibration:
    """Ranges of every tensor and per-channel pre-activation maxima, over all ranks."""
    cal = Calibration()

    def seen(name: str, v: torch.Tensor) -> None:
        lo, hi = float(v.min()), float(v.max())
        cal.tensor_min[name] = min(cal.tensor_min.get(name, lo), lo)
        cal.tensor_max[name] = max(cal.tensor_max.get(name, hi), hi)

    def observe(node: Node, xs: list[torch.Tensor], pre: torch.Tensor) -> None:
        if node is graph.nodes[0]:
            seen(graph.input, xs[0])
        lo, hi = node.attrs.get("clamp", (-np.inf, np.inf))
        seen(node.output, pre.clamp(lo, hi) if (lo, hi) != (-np.inf, np.inf) else pre)
        if node.op in WEIGHTED_OPS:
            m = (
                pre.abs()
                .transpose(0, 1)
                .reshape(pre.shape[1], -1)
                .amax(dim=1)
                .double()
                .cpu()
                .numpy()
            )
            old = cal.preact_absmax.get(node.name)
            cal.preact_absmax[node.name] = m if old is None else np.maximum(old, m)

    chunk = 512
    outs = [
        simulate.run_outputs(
            graph, x_nhwc[i : i + chunk], observe=observe, dtype=torch.float32, device=device
        )
        for i in bar(range(0, len(x_nhwc), chunk), "calibration", progress=progress, unit="batch")
    ]
    cal.outputs = tuple(np.concatenate(o, axis=0) for o in zip(*outs, strict=True))
    cal.output = cal.outputs[0]
    cal.tensor_min = ddp.all_reduce_dict(cal.tensor_min, "min")
    cal.tensor_max = ddp.all_reduce_dict(cal.tensor_max, "max")
    cal.preact_absmax = ddp.all_reduce_dict(cal.preact_absmax, "max")
    return cal
