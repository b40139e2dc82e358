"""Two-stage PTQ (`acc_stages=2`): the 32-bit network, a tile length per layer that no input can
overflow, reported; nonsense combinations refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

import codegen
from codegen.api import describe_bits
from codegen.core.errors import QaccError
from codegen.core.ir import WEIGHTED_OPS, terms_per_output
from codegen.quant.accumulator import tile_bounds, tile_candidates
from tests.nets import Branchy, randomized
from tests.quant.test_quantize import images


def test_two_stage_is_the_32_bit_network_with_guaranteed_tiles() -> None:
    model = randomized(Branchy(), seed=4)
    x = images(48, 3, 12, seed=1)
    qm32 = codegen.quantize(model, x, acc_bits=32, progress=False, rounding="nearest")
    qm2 = codegen.quantize(model, x, acc_bits=16, acc_stages=2, progress=False)
    test = images(100, 3, 12, seed=2) * 1.5
    res = qm2.run_reference(test)
    assert all(v.events == 0 and v.tile_events == 0 for v in res.overflow.values())
    # the weights meet the 32-bit bound and nothing wraps: the 32-bit network, bit for bit
    assert np.array_equal(res.output, qm32.reference_int(test))
    rows = {r["name"]: r for r in qm2.report["layers"] if "acc_tile" in r}
    weighted = [n for n in qm2.graph.nodes if n.op in WEIGHTED_OPS]
    assert set(rows) == {n.name for n in weighted}
    for n in weighted:
        t, k = int(n.attrs["acc_tile"]), terms_per_output(n)
        fi = qm2.graph.tensors[n.inputs[0]].fmt
        assert fi is not None and rows[n.name]["tile_bound_fits"]
        assert n.attrs["acc2_bits"] == 32 and rows[n.name]["acc_tile"] == t
        # T is the largest kernel-friendly tile whose exact bound fits 16 bits
        for c in (c for c in tile_candidates(k) if c >= t):
            lo, hi = tile_bounds(n.params["weight"], fi.qmin, fi.qmax, c)
            assert (hi.max() <= 32767 and lo.min() >= -32768) == (c == t), (n.name, c, t)
    assert "T=" in describe_bits(qm2)


def test_minimum_tile_constrains_the_weights_per_tile() -> None:
    """acc_tile=16: every tile of min(16, K) terms fits 16 bits by the exact bound, so T >= it,
    and no input in the input formats can overflow a tile or the total."""
    model = randomized(Branchy(), seed=4)
    x = images(48, 3, 12, seed=1)
    qm = codegen.quantize(model, x, acc_bits=16, acc_stages=2, acc_tile=16, progress=False)
    res = qm.run_reference(images(100, 3, 12, seed=2) * 1.5)
    assert all(v.events == 0 for v in res.overflow.values())
    for n in (n for n in qm.graph.nodes if n.op in WEIGHTED_OPS):
        fi = qm.graph.tensors[n.inputs[0]].fmt
        assert fi is not None
        if terms_per_output(n) <= 16:  # one tile would hold every term: one 16-bit stage
            assert "acc_tile" not in n.attrs and n.attrs["acc_bits"] == 16
            continue
        assert int(n.attrs["acc_tile"]) >= 16
        lo, hi = tile_bounds(n.params["weight"], fi.qmin, fi.qmax, 16)
        assert hi.max() <= 32767 and lo.min() >= -32768


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"acc_stages": 3}, "acc_stages must be 1 or 2"),
        ({"acc_stages": 2, "acc_bits": 32}, "needs acc_bits below 32"),
        ({"acc_stages": 2, "method": "transform"}, "method 'ptq' only"),
        ({"acc_tile": 8}, "give acc_stages=2 too"),
        ({"acc_stages": 2, "acc_tile": 12}, "1, 2, 4 or a multiple of 8"),
        ({"acc_stages": 2, "rounding": "optq"}, "with acc_stages=2 use rounding='nearest'"),
    ],
)
def test_two_stage_refuses_nonsense(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(QaccError, match=message) as e:
        codegen.quantize(randomized(Branchy(), seed=1), images(8, 3, 12), progress=False,
                         **kwargs)  # type: ignore[arg-type]  # fmt: skip
    assert "\n" not in str(e.value)


def test_the_default_rounding_is_optq_and_nearest_with_two_stages() -> None:
    model, x = randomized(Branchy(), seed=1), images(8, 3, 12)
    one = codegen.quantize(model, x, acc_bits=16, progress=False)
    two = codegen.quantize(model, x, acc_bits=16, progress=False, acc_stages=2)
    assert (one.report["rounding"], two.report["rounding"]) == ("optq", "nearest")
