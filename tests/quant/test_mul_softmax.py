"""Products (`mul`) and softmax through the quantizer: their formats, accumulators and exactness.

- a product's accumulator holds one product of the zero-point-corrected inputs: its container is
  the one that product needs (16 bits for int8 x int8), and its requantization is one rounding
  shift, fa + fb - fo, under power-of-two formats;
- softmax's exp table and rounded division are integers: the float64 simulation of the quantized
  graph (QuantizedModel.simulate) equals the integer reference exactly, and the reference is within
  one output step of the real softmax of the quantized input;
- adaptive and transform quantize both ops (their requantization built as PTQ builds it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import codegen
from codegen.core import reference


class GatedHead(nn.Module):
    """A squeeze-excitation gate, a product of two branches, a scaled value, a softmax head."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 6, 3, padding=1)
        self.g = nn.Conv2d(6, 6, 1)
        self.d = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c(x))
        y = y * torch.sigmoid(self.g(y.mean((2, 3), keepdim=True)))
        y = torch.tanh(self.d(y)) * y * 1.5
        return torch.softmax(self.fc(y.mean((2, 3))) * 3, dim=1)


@pytest.fixture(scope="module")
def quantized() -> tuple[codegen.QuantizedModel, np.ndarray]:
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((48, 2, 8, 8)).astype(np.float32)
    qm = codegen.quantize(GatedHead().eval(), x, acc_bits=16, overflow="guaranteed", progress=False)
    return qm, x


def test_products_have_their_own_accumulator_and_shift(
    quantized: tuple[codegen.QuantizedModel, np.ndarray],
) -> None:
    qm, x = quantized
    g = qm.graph
    muls = [n for n in g.nodes if n.op == "mul"]
    assert len(muls) == 2
    for n in muls:
        fa, fb, fo = (g.tensors[t].fmt for t in (*n.inputs, n.output))
        assert fa is not None and fb is not None and fo is not None and n.requant is not None
        assert n.requant.shift.tolist() == [fa.frac + fb.frac - fo.frac]
        assert n.requant.mult.tolist() == [1]
        peak = max(-fa.qmin, fa.qmax) * max(-fb.qmin, fb.qmax)  # the largest |product|
        assert peak < 1 << (n.attrs["acc_bits"] - 1) and n.attrs["acc_bits"] == 16
    gate = g.tensors[muls[0].inputs[1]]
    assert gate.shape == (1, 1, 6) and gate.fmt is not None and not gate.fmt.signed
    assert all(v.events == 0 for v in qm.run_reference(x).overflow.values())


def test_float64_simulation_is_the_integer_reference(
    quantized: tuple[codegen.QuantizedModel, np.ndarray],
) -> None:
    qm, x = quantized
    want = qm.reference_int(x)
    assert len(np.unique(want)) > 5
    assert np.array_equal(qm.simulate(x), qm.dequantize_output(want))


def test_softmax_is_within_one_step_of_the_real_one(
    quantized: tuple[codegen.QuantizedModel, np.ndarray],
) -> None:
    qm, x = quantized
    g = qm.graph
    (sm,) = [n for n in g.nodes if n.op == "softmax"]
    fi, fo = g.tensors[sm.inputs[0]].fmt, g.tensors[sm.output].fmt
    assert fi is not None and fo is not None and not fo.signed
    assert sm.attrs["out_frac"] == fo.frac
    q_in = reference.run(g, qm.quantize_input(x), keep=True).tensors[sm.inputs[0]]
    real = torch.softmax(torch.as_tensor(q_in * fi.scale), dim=1).numpy()
    got = reference.softmax(q_in, sm)
    assert np.all(np.abs(got * fo.scale - real) <= fo.scale)
    assert np.array_equal(got, qm.reference_int(x))
    assert len(np.unique(got)) > 5


def test_softmax_table_is_exp_in_units_of_2_to_the_minus_15() -> None:
    t = reference.softmax_table(1 / 16)
    assert t[0] == 1 << 15 and np.all(np.diff(t) <= 0) and t[-1] == 0
    d = np.arange(256)
    assert np.all(np.abs(t - np.exp(-d / 16) * 2**15) <= 0.5)


@pytest.mark.parametrize(
    ("method", "opts"),
    [("adaptive", {"scale": "dyadic", "epochs": 0}), ("transform", {"acc_bits": 16})],
)
def test_other_methods_quantize_products_and_softmax(method: str, opts: dict[str, object]) -> None:
    """Adaptive's learned formats (zero points, dyadic steps) and transform's PTQ formats: a
    product's one requantization realises s_a * s_b / s_out, the softmax output is a power of
    two, and the float simulation of the integer graph agrees with the reference code for code."""
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((24, 2, 6, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 7, 24)
    qm = codegen.quantize(GatedHead().eval(), x, method=method, train=(x, y), progress=False,
                          **opts)  # type: ignore[arg-type]  # fmt: skip
    g = qm.graph
    muls = [n for n in g.nodes if n.op == "mul"]
    assert len(muls) == 2  # the gate and the product of two branches
    for n in muls:
        fa, fb, fo = (g.tensors[t].fmt for t in (*n.inputs, n.output))
        assert fa is not None and fb is not None and fo is not None and n.requant is not None
        realised = float(n.requant.mult[0]) * 2.0 ** -float(n.requant.shift[0])
        assert realised == pytest.approx(fa.scale * fb.scale / fo.scale, rel=2**-14)
    out = g.tensors[g.output].fmt
    assert out is not None and out.is_pow2
    codes = np.rint(qm.simulate(x) / out.scale) + out.zero_point
    assert np.mean(codes == qm.reference_int(x)) >= 0.95
