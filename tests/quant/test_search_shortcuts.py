"""The PTQ search's shortcuts change no result: the weight formats skip only the fractional
lengths that cannot fit, and each layer's prefix state is advanced from the previous layer's
instead of recomputed from the network input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import codegen
from codegen.api import float_graph
from codegen.core import simulate
from codegen.core.ir import QFormat
from codegen.quant import ptq
from codegen.quant.accumulator import (
    _FRAC_SEARCH,
    WEIGHT_BITS,
    LayerWeights,
    WeightQuant,
    acc_limits,
    channel_bounds,
    choose_weight_fracs,
    feasible,
    quantize_at,
    quantize_weights,
    tile_bounds,
)
from tests.nets import Branchy, randomized


def _exhaustive(
    w: np.ndarray,
    b: np.ndarray,
    input_frac: int,
    xmin: int,
    xmax: int,
    acc_bits: int,
    policy: str,
    observed: np.ndarray | None,
    tile: tuple[int, int] | None,
) -> np.ndarray:
    """Every fractional length tried, largest first: the definition the search must equal."""
    o = w.shape[0]
    acc_lo, acc_hi = acc_limits(acc_bits if tile is None else tile[1])
    chosen = np.full(o, _FRAC_SEARCH[-1], dtype=np.int64)
    done = np.zeros(o, dtype=bool)
    for f in _FRAC_SEARCH:
        q, bq = quantize_at(w, b, np.full(o, f, dtype=np.int64), input_frac)
        ok = np.abs(q).max(axis=1) <= (1 << (WEIGHT_BITS - 1)) - 1
        if policy == "guaranteed":
            lo, hi = channel_bounds(q, bq, xmin, xmax)
            ok &= (lo >= acc_lo) & (hi <= acc_hi)
        else:
            assert observed is not None
            ok &= (observed * 2.0 ** (f + input_frac) * 2.0 <= acc_hi) & (np.abs(bq) <= acc_hi)
        if tile is not None:
            tlo, thi = tile_bounds(q, xmin, xmax, tile[0])
            t_lo, t_hi = acc_limits(acc_bits)
            ok &= (tlo.min(axis=1) >= t_lo) & (thi.max(axis=1) <= t_hi)
        chosen[ok & ~done] = f
        done |= ok
    return chosen


@pytest.mark.parametrize("policy", ["guaranteed", "profiled"])
@pytest.mark.parametrize("tile", [None, (8, 16)])
def test_weight_formats_equal_the_exhaustive_search(policy: str, tile: Any) -> None:
    rng = np.random.default_rng(0)
    o, k = 48, 40
    w = rng.normal(size=(o, k)) * np.exp2(rng.uniform(-12, 6, size=(o, 1)))
    b = rng.normal(size=o) * np.exp2(rng.uniform(-8, 8, size=o))
    w[0], w[1], b[1] = 0.0, 0.0, 0.0  # a dead channel with a bias, one with neither
    w[2, 1:], b[3] = 0.0, 1e4  # one weight; a bias that alone nearly fills the accumulator
    observed = np.abs(w).sum(axis=1) * 3.0 + np.abs(b)
    layer = LayerWeights(w.reshape(o, 4, 1, 10))  # its sums reused by every call below
    for acc_bits, input_frac, (xmin, xmax) in [
        (16, 4, (0, 127)),
        (12, -2, (-8, 7)),
        (20, 9, (0, 3)),
        (16, 6, (0, 127)),  # the first's weights again (the same formats), another bias scale
    ]:
        if tile is not None and acc_bits >= tile[1]:
            continue
        args = (w, b, input_frac, xmin, xmax, acc_bits, policy)
        want = _exhaustive(*args, observed, tile)
        got = choose_weight_fracs(*args, observed, 2.0, tile)  # type: ignore[arg-type]
        assert np.array_equal(got, want), (acc_bits, np.flatnonzero(got != want))
        rest = (b, input_frac, xmin, xmax, acc_bits, policy, observed, 2.0, tile)
        assert np.array_equal(choose_weight_fracs(layer, *rest), want)  # type: ignore[arg-type]
        # quantize_weights: its definition, from the plain arrays
        wq = quantize_weights(layer, *rest)  # type: ignore[arg-type]
        q, bq = quantize_at(w, b, want, input_frac)
        assert (wq is not None) == feasible(q, w)
        if wq is not None:
            lo, hi = channel_bounds(q, bq, xmin, xmax)
            assert np.array_equal(wq.q, q.reshape(o, 4, 1, 10)) and np.array_equal(wq.bias, bq)
            assert np.array_equal(wq.bound_lo, lo) and np.array_equal(wq.bound_hi, hi)
            assert np.array_equal(wq.frac, want) and wq.input_frac == input_frac


def test_advance_equals_prefix() -> None:
    images = np.random.default_rng(0).random((8, 3, 12, 12), dtype=np.float32)
    graph = float_graph(randomized(Branchy(), seed=1), images, None)
    x = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    fmts = {graph.nodes[0].output: QFormat(6, False, 3)}
    state = simulate.prefix(graph, x, 2, formats=fmts)
    for stop in (2, 4, len(graph.nodes) - 1):
        want = simulate.prefix(graph, x, stop, formats=fmts)
        got = simulate.advance(graph, state, 2, stop, formats=fmts)
        assert got.keys() == want.keys() and all(torch.equal(got[t], want[t]) for t in want)


def test_search_with_advanced_states_equals_search_from_the_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = randomized(Branchy(), seed=2)
    x = np.random.default_rng(0).random((32, 3, 12, 12), dtype=np.float32)
    calls = {"advances": 0}
    real = ptq._advances

    def counted(*args: Any) -> bool:
        calls["advances"] += 1
        return real(*args)

    monkeypatch.setattr(ptq, "_advances", counted)
    fast = codegen.quantize(model, x, acc_bits=13, progress=False, rounding="optq")
    assert calls["advances"] > 0
    monkeypatch.setattr(ptq, "_advances", lambda *_: False)  # every state from the input
    slow = codegen.quantize(model, x, acc_bits=13, progress=False, rounding="optq")
    for a, b in zip(fast.graph.nodes, slow.graph.nodes, strict=True):
        assert a.attrs == b.attrs and a.params.keys() == b.params.keys(), a.name
        assert all(np.array_equal(a.params[p], b.params[p]) for p in a.params), a.name
    assert all(fast.graph.tensors[t].fmt == slow.graph.tensors[t].fmt for t in fast.graph.tensors)


def test_search_equals_the_search_with_plain_weight_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search reads each layer's formats and bounds from `LayerWeights`' cached sums; with
    every candidate rounded whole and tested by the definitions instead (every fractional length,
    `quantize_at`, `feasible`, `channel_bounds`), it chooses the same formats and weights."""
    model = randomized(Branchy(), seed=2)
    x = np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32)
    kw: dict[str, Any] = {"acc_bits": 13, "progress": False, "clip": "none"}
    fast = codegen.quantize(model, x, rounding="nearest", **kw)
    calls = []

    def formats(
        layer: LayerWeights, b: np.ndarray, fi: int, xmin: int, xmax: int, a: int, *rest: Any
    ) -> np.ndarray | None:
        w = layer.w.reshape(len(b), -1)
        observed, margin, tile = rest[1:]
        assert margin == 2.0 and tile is None
        frac = _exhaustive(w, b, fi, xmin, xmax, a, rest[0], observed, tile)
        calls.append(frac)
        return frac if feasible(quantize_at(w, b, frac, fi)[0], w) else None

    def quantized(
        layer: LayerWeights, b: np.ndarray, frac: np.ndarray, fi: int, xmin: int, xmax: int
    ) -> WeightQuant:
        q, bq = quantize_at(layer.w, b, frac, fi)
        return WeightQuant(q, frac, bq, fi, *channel_bounds(q, bq, xmin, xmax))

    monkeypatch.setattr(ptq, "weight_formats", formats)
    monkeypatch.setattr(ptq, "quantized", quantized)
    slow = codegen.quantize(model, x, rounding="nearest", **kw)
    for a, b in zip(fast.graph.nodes, slow.graph.nodes, strict=True):
        assert a.attrs == b.attrs and a.params.keys() == b.params.keys(), a.name
        assert all(np.array_equal(a.params[p], b.params[p]) for p in a.params), a.name
    assert all(fast.graph.tensors[t].fmt == slow.graph.tensors[t].fmt for t in fast.graph.tensors)
    assert fast.report["layers"] == slow.report["layers"] and len(calls) > 20
