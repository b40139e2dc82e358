"""Element-wise activations end to end: torch -> PTQ (tables) -> C on the host == the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import codegen
from codegen.core.ir import QFormat


class Activations(nn.Module):
    """A small CNN with one of each table activation, some right after a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.act1 = nn.Hardswish()
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)
        self.leaky = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.c1(x))
        y = nn.functional.silu(self.c2(y))
        y = torch.tanh(self.c3(y)) + y.sigmoid()
        y = torch.flatten(self.pool(y), 1)
        return self.leaky(self.fc(y))


@pytest.fixture(scope="module")
def quantized() -> tuple[codegen.QuantizedModel, np.ndarray]:
    torch.manual_seed(0)
    model = Activations().eval()
    x = np.random.default_rng(0).standard_normal((48, 2, 8, 8)).astype(np.float32)
    qm = codegen.quantize(model, x, acc_bits=16, overflow="guaranteed", progress=False)
    return qm, x


def test_activations_are_tables_and_formats_fit(
    quantized: tuple[codegen.QuantizedModel, np.ndarray],
) -> None:
    qm, _ = quantized
    g = qm.graph
    luts = {n.attrs["function"]: n for n in g.nodes if n.op == "lut"}
    assert sorted(luts) == ["hardswish", "leaky_relu", "sigmoid", "silu", "tanh"]
    for n in luts.values():
        assert n.params["table"].shape == (256,) and "acc_bits" not in n.attrs
        fmt = g.tensors[n.output].fmt
        assert isinstance(fmt, QFormat) and fmt.is_pow2
    assert not g.tensors[luts["sigmoid"].output].fmt.signed  # type: ignore[union-attr]
    rows = {r["name"]: r for r in qm.report["layers"]}
    assert all("acc_bits" not in rows[n.name] for n in luts.values())


def test_reference_equals_float64_simulation(
    quantized: tuple[codegen.QuantizedModel, np.ndarray],
) -> None:
    qm, _ = quantized
    test = np.random.default_rng(1).standard_normal((64, 2, 8, 8)).astype(np.float32) * 1.5
    res = qm.run_reference(test)
    assert all(v.events == 0 for v in res.overflow.values())
    assert np.array_equal(qm.dequantize_output(res.output), qm.simulate(test))


def test_host_c_equals_reference(
    quantized: tuple[codegen.QuantizedModel, np.ndarray], tmp_path: Path
) -> None:
    qm, x = quantized
    c = codegen.compile(qm, target="host", out_dir=tmp_path / "acts")
    test = np.concatenate([x, np.random.default_rng(2).standard_normal(x.shape) * 3])
    test = test.astype(np.float32)
    assert np.array_equal(c.run_int(test), qm.reference_int(test))
    kernels = {layer["kernel"] for layer in c.report["layers"]}
    assert "lut" in kernels  # the sigmoid of a table's output stays a kernel of its own
    # the four tables after c1, c2, c3 and fc run in their producers' store step
    assert sorted(c.report["fused_luts"].values()) == sorted(["c1", "c2", "c3", "fc"])


@pytest.mark.parametrize("method", ["adaptive", "transform"])
def test_other_methods_build_the_table_of_their_formats(method: str) -> None:
    """Adaptive (a learned zero point and step) and transform: the table holds the sigmoid of
    every input code, rounded half up into the output format."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 16, 2))
    x = np.random.default_rng(0).standard_normal((16, 1, 6, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 2, 16)
    qm = codegen.quantize(model.eval(), x, method=method, train=(x, y), epochs=0, progress=False)
    g = qm.graph
    node = next(n for n in g.nodes if n.op == "lut")
    fi, fo = g.tensors[node.inputs[0]].fmt, g.tensors[node.output].fmt
    assert fi is not None and fo is not None
    assert (fi.zero_point != 0 or not fi.is_pow2) == (method == "adaptive")
    q = np.arange(fi.qmin, fi.qmax + 1)
    real = 1.0 / (1.0 + np.exp(-(q - fi.zero_point) * fi.scale))
    want = np.clip(np.floor(real / fo.scale + 0.5) + fo.zero_point, fo.qmin, fo.qmax)
    assert np.array_equal(node.params["table"][q + 128], want)
