"""Two-stage accumulation in the reference: tiles of T terms wrap to acc_bits, their sum (plus the
bias) wraps to acc2_bits (codegen.core.ir). Relations to the one-stage paths, a hand-made wrapping
case, and the term order against a direct loop over the weight layout."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from codegen.core import reference
from codegen.core.formats import wrap
from codegen.core.ir import Node
from codegen.quant.accumulator import choose_tile, tile_bounds, tile_candidates
from tests.graphs import WIDE, GraphBuilder


def _acc(node: Node, x: np.ndarray) -> tuple[np.ndarray, reference.OverflowStats]:
    """The wrapped accumulator of a node (identity requantization) and its overflow counts."""
    stats = reference.OverflowStats()
    out = reference.run_node(replace(node, requant=WIDE), [x], stats)
    return out, stats


def _conv_node(
    acc_bits: int = 16, tile: int | None = None, **kw: object
) -> tuple[Node, np.ndarray]:
    b = GraphBuilder("two", seed=3, batch=4)
    x = b.input((6, 5, 8), dist=str(kw.pop("dist", "uniform")))
    b.conv2d(x, 8, acc_bits=acc_bits, acc_tile=tile, **kw)  # type: ignore[arg-type]
    g, xs = b.result()
    return g.nodes[0], xs


def test_tile_of_k_with_zero_bias_is_the_one_stage_path() -> None:
    node, x = _conv_node(12, w_dist="positive", dist="high", padding=(1, 1, 1, 1))
    k = 3 * 3 * 8
    one = replace(node, params={**node.params, "bias": 0 * node.params["bias"]})
    one = replace(one, attrs={a: v for a, v in one.attrs.items() if a not in ("acc_tile",)})
    two = replace(one, attrs={**one.attrs, "acc_tile": k, "acc2_bits": 32})
    a1, s1 = _acc(one, x)
    a2, s2 = _acc(two, x)
    assert s1.events > 0  # the case really wraps
    assert np.array_equal(a1, a2)
    assert s2.tile_events == s1.events


def test_tile_of_one_is_the_32_bit_path_when_products_fit() -> None:
    node, x = _conv_node(16, tile=1, padding=(1, 0, 2, 1), groups=2)
    wide = replace(node, attrs={**node.attrs, "acc_bits": 32})
    wide = replace(wide, attrs={a: v for a, v in wide.attrs.items() if a != "acc_tile"})
    a1, s1 = _acc(node, x)
    a32, _ = _acc(wide, x)
    assert s1.events == 0 and np.array_equal(a1, a32)


def test_hand_made_wrapping_case() -> None:
    x = np.full((1, 4), 127, dtype=np.int64)
    w = np.full((1, 4), 100, dtype=np.int64)
    node = Node("d", "dense", ("x",), "y", {"acc_bits": 16, "acc_tile": 2, "acc2_bits": 32},
                {"weight": w, "bias": np.array([7])}, WIDE)  # fmt: skip
    acc, st = _acc(node, x)
    assert acc.tolist() == [[7 + 2 * 25400]] and st.events == 0  # two tiles of 25400 fit int16
    acc, st = _acc(replace(node, attrs={**node.attrs, "acc_tile": 4}), x)
    assert acc.tolist() == [[7 + 50800 - 65536]]  # one tile of 50800 wraps to -14736
    assert (st.tile_events, st.events, st.samples) == (1, 1, 1)
    acc, st = _acc(replace(node, attrs={**node.attrs, "acc_tile": 3, "acc2_bits": 17}), x)
    # tiles 38100 -> -27436 and 12700; total -14729 fits 17 bits
    assert acc.tolist() == [[7 + wrap(38100, 16) + 12700]] and st.tile_events == 1


@pytest.mark.parametrize("tile", [1, 5, 8, 13, 100])
def test_term_order_is_the_weight_layout(tile: int) -> None:
    """A direct loop: terms (kh, kw, I/groups) in order, padding taps are zero terms."""
    node, x = _conv_node(10, tile=tile, w_dist="positive", dist="high", padding=(1, 1, 0, 2),
                         groups=2, stride=(2, 1))  # fmt: skip
    got, stats = _acc(node, x)
    w, bias = node.params["weight"], node.params["bias"]
    o, kh, kw, cg = w.shape
    xp = np.pad(x, ((0, 0), (1, 1), (0, 2), (0, 0)))
    want = np.zeros_like(got)
    for n in range(x.shape[0]):
        for oy in range(got.shape[1]):
            for ox in range(got.shape[2]):
                for oc in range(o):
                    g = oc // (o // 2)
                    win = xp[n, 2 * oy : 2 * oy + kh, ox : ox + kw, g * cg : (g + 1) * cg]
                    terms = (win * w[oc]).reshape(-1)
                    tiles = [
                        wrap(int(terms[i : i + tile].sum()), 10) for i in range(0, terms.size, tile)
                    ]
                    want[n, oy, ox, oc] = wrap(int(bias[oc]) + sum(tiles), 32)
    assert np.array_equal(got, want)
    assert stats.tile_events > 0 and 0 < stats.samples <= x.shape[0]  # the case wraps


def test_choose_tile_is_the_largest_candidate_that_fits() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(6, 75))
    assert tile_candidates(75) == [75, 72, 64, 56, 48, 40, 32, 24, 16, 8, 4, 2, 1]
    t = choose_tile(q, 0, 127, 16)
    assert t is not None and t in tile_candidates(75)
    lo, hi = tile_bounds(q, 0, 127, t)
    assert hi.max() <= 32767 and lo.min() >= -32768
    bigger = [c for c in tile_candidates(75) if c > t]
    for c in bigger:
        lo, hi = tile_bounds(q, 0, 127, c)
        assert hi.max() > 32767 or lo.min() < -32768
    assert choose_tile(q, -128, 127, 8) is None  # not even one product fits 8 bits
