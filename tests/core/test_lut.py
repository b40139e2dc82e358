"""The lookup tables of element-wise functions (codegen.core.lut) against the float functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codegen.core import lut
from codegen.core.formats import round_half_up
from codegen.core.ir import QFormat


def _erf_gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _tanh_gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# the functions written out in plain Python, independent of torch
PLAIN = {
    ("hardswish", ()): lambda x: x * min(max(x + 3.0, 0.0), 6.0) / 6.0,
    ("hardsigmoid", ()): lambda x: min(max(x + 3.0, 0.0), 6.0) / 6.0,
    ("hardsigmoid", (0.2, 0.5)): lambda x: min(max(0.2 * x + 0.5, 0.0), 1.0),
    ("silu", ()): lambda x: x / (1.0 + math.exp(-x)),
    ("sigmoid", ()): lambda x: 1.0 / (1.0 + math.exp(-x)),
    ("tanh", ()): math.tanh,
    ("leaky_relu", (0.1,)): lambda x: x if x >= 0 else 0.1 * x,
    ("gelu", ()): _erf_gelu,
    ("gelu_tanh", ()): _tanh_gelu,
    ("relu", ()): lambda x: max(x, 0.0),
    ("clamp", (0.0, 6.0)): lambda x: min(max(x, 0.0), 6.0),
    ("clamp", (-0.5, math.inf)): lambda x: max(x, -0.5),
}
FORMATS = [
    (QFormat(8, True, 5), QFormat(8, True, 5)),
    (QFormat(7, False, 4), QFormat(7, False, 7)),
    (QFormat(8, True, 3, zero_point=-9), QFormat(8, True, 6, zero_point=11)),
    (QFormat(8, True, 4, step=0.071), QFormat(8, True, 5, step=0.0137)),
]


@pytest.mark.parametrize(
    ("fin", "fout"), FORMATS, ids=[f"{a.describe()}-{b.describe()}" for a, b in FORMATS]
)
@pytest.mark.parametrize("key", list(PLAIN), ids=[f"{k[0]}{list(k[1])}" for k in PLAIN])
def test_table_is_the_rounded_float_function(
    key: tuple[str, tuple[float, ...]], fin: QFormat, fout: QFormat
) -> None:
    function, args = key
    table = lut.table(function, args, fin, fout)
    assert table.shape == (256,) and table.dtype == np.int64
    for q in range(-128, 128):
        y = PLAIN[key]((q - fin.zero_point) * fin.scale) / fout.scale
        exact = min(max(math.floor(y + 0.5) + fout.zero_point, fout.qmin), fout.qmax)
        got = int(table[q + 128])
        if abs(y - math.floor(y) - 0.5) > 1e-9:  # away from a tie, any correct libm agrees
            assert got == exact, (q, y)
        else:
            assert abs(got - exact) <= 1, (q, y)


def test_table_rounds_half_up_and_saturates_to_limits() -> None:
    fin, fout = QFormat(8, True, 2), QFormat(8, True, 2)
    # leaky_relu(-0.25 * 0.5 ...): q = -3 -> x = -0.75 -> 0.5 * x = -0.375 -> -1.5 units -> -1
    t = lut.table("leaky_relu", (0.5,), fin, fout)
    assert t[-3 + 128] == -1 and t[3 + 128] == 3  # ties go toward +inf, like round_half_up
    assert t[127 + 128] == 127 and t[-128 + 128] == -64
    clamped = lut.table("leaky_relu", (0.5,), fin, fout, lo=-10, hi=20)
    assert clamped.min() == -10 and clamped.max() == 20
    assert np.array_equal(clamped, np.clip(t, -10, 20))


def test_table_equals_the_fake_quantized_float_function() -> None:
    """What the float simulation computes (simulate.fake_quant of f on the input grid)."""
    from codegen.core import simulate

    for fin, fout in FORMATS:
        x = (torch.arange(-128, 128, dtype=torch.float64) - fin.zero_point) * fin.scale
        for function, args in PLAIN:
            y = simulate.fake_quant(lut.apply(function, args, x), fout).numpy()
            q = round_half_up(y / fout.scale) + fout.zero_point
            assert np.array_equal(q, lut.table(function, args, fin, fout)), function


def test_relu_and_clamp_tables_are_exact_rescalings() -> None:
    """A lone ReLU/clamp is exact: with the same format in and out the table is the clamp of
    the input itself."""
    f = QFormat(8, True, 4)
    q = np.arange(-128, 128)
    assert np.array_equal(lut.table("relu", (), f, f), np.maximum(q, 0))
    assert np.array_equal(lut.table("clamp", (-1.0, 2.5), f, f), np.clip(q, -16, 40))
    with pytest.raises(ValueError, match="takes"):
        lut.check("clamp", (0.0,))


def test_unknown_function_and_wrong_arguments() -> None:
    with pytest.raises(ValueError, match="unknown lut function 'elu'"):
        lut.table("elu", (), QFormat(8, True, 4), QFormat(8, True, 4))
    with pytest.raises(ValueError, match="takes"):
        lut.check("leaky_relu", ())
