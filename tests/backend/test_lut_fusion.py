"""Element-wise tables fused into the producing kernel's store step (`lower.fuse_luts`).

The C of the fused network is checked bit for bit against the (unfused) reference by the
`net-fused-luts` row of tests/backend/test_codegen_host.py, which the QEMU tables run on every
NEON and Cortex-M target (Helium keeps its tables standalone). Here: which luts fuse and which
must not, the memory plan, the report, and that every dialect's fused kernels really read the
table in their store step.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from codegen.backend.emit import c_identifier, emit
from codegen.backend.lower import DIALECTS, LUT_FUSION, lower
from codegen.backend.report import to_markdown
from codegen.core.ir import Graph
from codegen.targets.build import resolve_target
from tests.backend.test_codegen_host import _fused_luts
from tests.graphs import GraphBuilder


def _net() -> GraphBuilder:
    b = GraphBuilder("fused", seed=3)
    _fused_luts(b)
    return b


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_table_after_a_supporting_producer_is_fused(dialect: str) -> None:
    g, _ = _net().result()
    low = lower(g, dialect)
    luts = {n.name: n for n in g.nodes if n.op == "lut"}
    if not LUT_FUSION[dialect]:  # Helium: the standalone gather kernel is faster (lower.py)
        assert low.fused_luts == {} and low.graph is g
        return
    assert set(low.fused_luts) == set(luts)  # all nine
    for lut, producer in low.fused_luts.items():
        src = g.producer(luts[lut].inputs[0])
        assert src is not None and src.name == producer
        assert low.graph.node(producer).output == luts[lut].output  # writes the lut's tensor
        assert luts[lut].inputs[0] not in low.graph.tensors  # the intermediate is gone
        assert low.call(producer).template in LUT_FUSION[dialect]
    assert not any(n.op == "lut" for n in low.graph.nodes)
    unfused = lower(g, dialect, fuse=False)
    assert unfused.fused_luts == {} and unfused.graph is g
    assert sum(c.kernel == "lut" for c in unfused.calls) == len(luts)
    assert low.plan.arena_bytes <= unfused.plan.arena_bytes


def _not_fusable() -> tuple[Graph, Any, dict[str, str]]:
    """Tables that must stay kernels of their own (name -> why), and one that fuses."""
    b = GraphBuilder("nofuse", seed=4)
    x = b.input((6, 6, 4))
    c1 = b.conv2d(x, 8, (3, 3), padding=(1, 1, 1, 1), acc_bits=16, name="c1")
    two = b.lut(c1, "hardswish", name="two_consumers")
    t = b.add(two, c1, acc_bits=16, name="add1")  # c1 is read by the table and the add
    c2 = b.conv2d(t, 8, (1, 1), acc_bits=16, name="c2")  # an output of the graph too
    t = b.lut(c2, "silu", name="graph_output")
    t = b.lut(b.maxpool2d(t), "tanh", name="after_maxpool")  # maxpool has no requantization
    t = b.lut(t, "sigmoid", name="after_a_table")
    t = b.lut(b.concat([t, t]), "tanh", name="after_concat")
    t = b.lut(b.conv2d(t, 5, (1, 1), acc_bits=16, name="c3"), "hardswish", name="fuses")
    b.lut(b.input_name, "tanh", name="on_the_input")
    g, x = b.result(extra=(c2, t))
    why = {
        "two_consumers": "c1",
        "graph_output": "c2",
        "after_maxpool": "maxpool",
        "after_a_table": "lut",
        "after_concat": "concat",
        "on_the_input": "input",
    }
    return g, x, why


def test_tables_that_must_not_fuse_stay_kernels() -> None:
    """Only the table after c3 fuses (its output is a graph output: c3 then writes the caller's
    array, as the last table of `net-fused-luts` does in every target's C)."""
    g, _, why = _not_fusable()
    low = lower(g)
    assert low.fused_luts == {"fuses": "c3"}
    kept = {c.node.name for c in low.calls if c.kernel == "lut"}
    assert kept == set(why)
    assert low.plan.buffer_of(g.extra_outputs[1]).location == "output"


def test_fusion_frees_the_intermediate_tensor() -> None:
    """conv -> table as the graph output: unfused, the conv output lives in the arena until the
    table reads it; fused, the conv writes the caller's output array directly."""
    b = GraphBuilder("arena", seed=5)
    t = b.conv2d(b.input((9, 9, 3)), 16, (3, 3), padding=(1, 1, 1, 1), acc_bits=16)
    b.lut(b.conv2d(t, 24, (3, 3), padding=(1, 1, 1, 1), acc_bits=16), "hardswish")
    g, _ = b.result()
    fused, unfused = lower(g), lower(g, fuse=False)
    assert unfused.plan.arena_bytes == 9 * 9 * (16 + 24)  # conv1 and conv2 outputs both live
    assert fused.plan.arena_bytes == 9 * 9 * 16  # only conv1's output
    assert len(fused.plan.buffers) == len(unfused.plan.buffers) - 1


def test_report_names_the_fused_tables() -> None:
    g, _ = _net().result()
    files = emit(g, "fused")
    report = json.loads(files["report.json"])
    assert report["fused_luts"] == lower(g).fused_luts
    rows = {r["name"]: r for r in report["layers"]}
    assert {r["fused_lut"]: name for name, r in rows.items() if r["fused_lut"]} == (
        report["fused_luts"]
    )
    assert not set(report["fused_luts"]) & set(rows)  # the tables are no layers of their own
    md = to_markdown(report)
    assert "fused tables" in md
    assert all(f"+ table of {lut}" in md for lut in report["fused_luts"])


@pytest.mark.parametrize(
    ("target", "markers"),
    [
        ("host", ("_lut[(uint8_t)qacc_requantize(",)),
        ("cortex-a53", ("qacc_neon_lut8(qacc_neon_requant8",)),
        ("cortex-a7", ("qacc_neon_lut8(qacc_neon_requant8",)),
        ("cortex-m4", ("_lut[(uint8_t)qacc_requantize32(",)),
        ("cortex-m55", ("vldrbq_gather_offset_u8(",)),  # no fusion: the standalone gathers
    ],
)
def test_fused_kernels_read_the_table_in_their_store_step(
    target: str, markers: tuple[str, ...]
) -> None:
    g, _ = _net().result()
    files = emit(g, "fused", resolve_target(target)) if target != "host" else emit(g, "fused")
    src = files[f"{c_identifier('fused')}.c"]
    assert all(m in src for m in markers), target
    assert ("_lut[" in src or "qacc_neon_lut8(qacc" in src) == (target != "cortex-m55")
    if target == "host":  # portable C: every requantization of the network goes through a table
        assert src.count("qacc_requantize(") == src.count("_lut[(uint8_t)qacc_requantize(")
    if target == "cortex-a53":  # A64: TBL/TBX on the 256-byte table, and every NEON store reads it
        assert "vqtbl4_s8(" in src and "vqtbx4_s8(" in src
        stores = src.count("qacc_neon_store8(") - src.count("inline void qacc_neon_store8(")
        tables = src.count("qacc_neon_lut8(") - src.count("inline int8x8_t qacc_neon_lut8(")
        assert stores == tables > 0
