"""THE number semantics: rounding ties, saturation, negative shifts, wrapping."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.core import formats as fm


def exact_requant(acc: int, mult: int, shift: int, zp: int, lo: int, hi: int) -> int:
    """Requantization from its definition, in exact rational arithmetic."""
    v = Fraction(acc * mult) / Fraction(2) ** shift
    r = math.floor(v + Fraction(1, 2))
    return max(lo, min(hi, r + zp))


@pytest.mark.parametrize(
    ("acc", "shift", "want"),
    [
        (3, 1, 2),  # 1.5 -> 2 (half up)
        (-3, 1, -1),  # -1.5 -> -1 (half up, not away from zero)
        (5, 2, 1),  # 1.25 -> 1
        (6, 2, 2),  # 1.5 -> 2
        (-6, 2, -1),  # -1.5 -> -1
        (-7, 2, -2),  # -1.75 -> -2
        (7, 0, 7),
        (7, -3, 56),  # negative shift: exact left shift
        (-7, -3, -56),
    ],
)
def test_round_shift_ties_and_negative_shifts(acc: int, shift: int, want: int) -> None:
    assert int(fm.round_shift(acc, shift)) == want


def test_requantize_saturates_to_limits() -> None:
    acc = np.array([-100000, -129, -128, 0, 127, 128, 100000])
    out = fm.requantize(acc, 1, 0, 0, -128, 127)
    assert out.tolist() == [-128, -128, -128, 0, 127, 127, 127]
    relu = fm.requantize(acc, 1, 0, 0, 0, 127)  # a fused ReLU is just lo = 0
    assert relu.tolist() == [0, 0, 0, 0, 127, 127, 127]


def test_requantize_per_channel_broadcast() -> None:
    acc = np.array([[10, 10, 10], [-10, -10, -10]])
    out = fm.requantize(acc, np.array([1, 3, 1]), np.array([2, 1, -1]), 0, -128, 127)
    assert out.tolist() == [[3, 15, 20], [-2, -15, -20]]


@settings(max_examples=400, deadline=None)
@given(
    acc=st.integers(-(2**31), 2**31 - 1),
    mult=st.integers(1, 2**15),
    shift=st.integers(-8, 40),
    zp=st.integers(-128, 127),
)
def test_requantize_matches_exact_definition(acc: int, mult: int, shift: int, zp: int) -> None:
    got = int(fm.requantize(np.array([acc]), mult, shift, zp, -128, 127)[0])
    assert got == exact_requant(acc, mult, shift, zp, -128, 127)


@settings(max_examples=200, deadline=None)
@given(
    accs=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=8),
    shifts=st.lists(st.integers(-5, 30), min_size=1, max_size=8),
)
def test_vector_and_scalar_shifts_agree(accs: list[int], shifts: list[int]) -> None:
    n = min(len(accs), len(shifts))
    a, s = np.array(accs[:n]), np.array(shifts[:n])
    vec = fm.round_shift(a, s)
    assert vec.tolist() == [int(fm.round_shift(x, y)) for x, y in zip(a, s, strict=True)]


def test_shift_range_is_enforced() -> None:
    with pytest.raises(ValueError):
        fm.round_shift(1, -fm.MAX_LEFT_SHIFT - 1)


@settings(max_examples=300, deadline=None)
@given(x=st.integers(-(2**40), 2**40), bits=st.integers(2, 32))
def test_wrap_is_twos_complement(x: int, bits: int) -> None:
    got = int(fm.wrap(np.array([x]), bits)[0])
    assert -(2 ** (bits - 1)) <= got < 2 ** (bits - 1)
    assert (got - x) % (2**bits) == 0


def test_wrap_is_associative_with_sums() -> None:
    rng = np.random.default_rng(0)
    terms = rng.integers(-(2**14), 2**14, size=(50, 300))
    for bits in (8, 12, 16):
        running = np.zeros(50, dtype=np.int64)
        for k in range(terms.shape[1]):  # wrap after every addition, like a C accumulator
            running = fm.wrap(running + terms[:, k], bits)
        assert np.array_equal(running, fm.wrap(terms.sum(axis=1), bits))


@settings(max_examples=300, deadline=None)
@given(x=st.floats(-1000, 1000, allow_nan=False), frac=st.integers(-4, 10))
def test_quantize_is_round_half_up_of_scaled_value(x: float, frac: int) -> None:
    q = int(fm.quantize(np.array([x]), frac, -(2**20), 2**20)[0])
    assert q == math.floor(Fraction(x) * Fraction(2) ** frac + Fraction(1, 2))


def test_quantize_ties_and_saturation() -> None:
    x = np.array([0.25, -0.25, 0.75, -0.75, 100.0, -100.0])
    assert fm.quantize(x, 1, -128, 127).tolist() == [1, 0, 2, -1, 127, -128]


def test_int_range_and_frac_for_range() -> None:
    assert fm.int_range(8, True) == (-128, 127)
    assert fm.int_range(8, True, symmetric=True) == (-127, 127)
    assert fm.int_range(7, False) == (0, 127)
    assert fm.frac_for_range(1.0, 7, False) == 6  # 127/64 >= 1 > 127/128
    assert fm.frac_for_range(0.9, 8, True) == 7  # 127/128 >= 0.9
    assert fm.frac_for_range(200.0, 8, True) == -1  # 127*2 >= 200
    assert fm.frac_for_range(0.0, 8, True) == 6
