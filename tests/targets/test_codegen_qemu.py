"""Generated NEON code under QEMU == the NumPy integer reference, exactly, on A-profile targets.

* The kernel case table of tests/backend/test_codegen_host.py, per target: all cases linked into one
  runner executable (one CMake project, one link), each case run once under QEMU.
* A quantized torch network (tests/nets.py) through codegen.quantize + codegen.compile.
* The 8-lane NEON requantization against formats.requantize on extreme multipliers and shifts.
* Instruction counts (deterministic, QEMU plugin): acc16 executes fewer instructions than acc32
  for the same conv layer on cortex-a53; per-layer counts add up to the total.
A missing cross compiler or QEMU fails, naming the Debian package (CI installs everything).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from codegen.backend.emit import emit
from codegen.core import reference
from codegen.core.ir import Requant
from codegen.targets.build import resolve_target
from codegen.targets.compiled import compile, run_testbench
from codegen.targets.table import TargetError, check_tools, get_target
from tests.backend.test_codegen_host import CASE_IDS, CASES
from tests.graphs import GraphBuilder
from tests.shared_build import build_once, shared_dir
from tests.targets.test_codegen_cortexm import build_cases

pytestmark = pytest.mark.qemu

NEON_TARGETS = ["cortex-a53", "cortex-a72", "cortex-a76", "cortex-a7"]


def _require(target: str) -> None:
    try:
        check_tools(get_target(target))
    except TargetError as e:
        pytest.fail(str(e))
    if shutil.which("cmake") is None:
        pytest.fail("cmake is not installed: apt-get install cmake")


@pytest.fixture(scope="session")
def case_builds(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, str]]:
    """target -> {case id: "runner case" or "ERROR ..."}: every case of a target is linked into
    ONE runner executable (one CMake project, one link; see
    tests/targets/test_codegen_cortexm.py), built once per session and shared by the pytest-xdist
    workers through a lock file."""
    base = shared_dir(tmp_path_factory)
    cache: dict[str, dict[str, str]] = {}

    def get(target: str) -> dict[str, str]:
        _require(target)
        if target not in cache:
            cache[target] = build_once(
                base, f"qacc-neon-{target}", lambda root: build_cases(target, root)
            )
        return cache[target]

    return get


@pytest.fixture(scope="module")
def case_graphs() -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
    """case id -> (graph, inputs, reference outputs), computed once for all targets."""
    out = {}
    for c in CASES:
        g, x = c.build()
        out[c.id] = (g, x, reference.run(g, x).output)
    return out


@pytest.mark.parametrize("target", NEON_TARGETS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_neon_case_equals_reference(
    case: Any, target: str, case_builds: Any, case_graphs: dict[str, Any]
) -> None:
    tb = case_builds(target)[case.id]
    if tb.startswith("ERROR"):
        pytest.fail(tb)
    g, x, want = case_graphs[case.id]
    t = resolve_target(target)
    runner, name = tb.split(" ")

    def launch(exe: str, args: Sequence[str]) -> list[str]:
        return t.argv(exe, [name, *args])

    got = run_testbench(runner, x, g.tensors[g.input].shape, g.tensors[g.output].shape, launch)
    assert np.array_equal(got, want)


def test_neon_kernels_are_chosen(tmp_path: Path) -> None:
    """The NEON templates (not the portable fallback) implement conv, depthwise and dense."""
    b = GraphBuilder("choice", seed=2)
    x = b.input((6, 6, 8))
    t = b.conv2d(x, 16, padding=(1, 1, 1, 1), acc_bits=16)
    t = b.conv2d(t, 16, padding=(1, 1, 1, 1), groups=16, acc_bits=20)
    b.dense(b.flatten(b.conv2d(t, 4, (1, 1), acc_bits=24)), 5, acc_bits=14)
    g, _ = b.result()
    for target, sdot in (
        ("cortex-a53", False), ("cortex-a76", True), ("cortex-a55", True), ("cortex-a7", False)
    ):  # fmt: skip
        files = emit(g, "choice", resolve_target(target))
        src = files["choice.c"]
        assert ("QACC_MLA16(a0_0," in src) != sdot  # dotprod: SDOT for the acc16 layers too
        assert ("vdotq_laneq_s32" in src) == sdot
        assert "vmlaq_s16(a, xv, wv)" not in src  # the depthwise layer is acc32 (20 bits)
        # int32 lanes: products of two taps (int16), 16 channels per pass on A64
        a32 = target == "cortex-a7"
        assert ("QACC_WIDEN16(pv, al, ah)" if a32 else "QACC_WIDEN16(p0, a0l, a0h)") in src
        paths = [layer["path"] for layer in json.loads(files["report.json"])["layers"]]
        if sdot:
            assert paths == ["acc16-sdot", "acc32", "acc32-sdot", "acc16-sdot"]
        else:
            assert paths == ["acc16", "acc32", "acc32", "acc16"]


@pytest.mark.parametrize("target", ["cortex-a53", "cortex-a7"])
def test_neon_requantize_equals_formats(target: str, tmp_path: Path) -> None:
    """qacc_neon_requant8 (vector) == formats.requantize on extreme per-channel parameters."""
    _require(target)
    rng = np.random.default_rng(7)
    b = GraphBuilder("rq", seed=7, batch=16)
    x = b.input((40,))
    b.dense(x, 64, acc_bits=32, bias=(-(1 << 30), 1 << 30))
    g, xs = b.result()
    node = g.nodes[0]
    mult = rng.integers(-(1 << 31) + 1, 1 << 31, size=64)
    mult[:4] = [(1 << 31) - 1, -(1 << 31) + 1, 1, -1]
    # most channels: accumulators (~2^30, from the bias) scaled to the int8 range; 8 extremes
    bits = np.array([int(abs(int(m))).bit_length() for m in mult])
    shift = np.minimum(62, 23 + bits - rng.integers(0, 3, size=64))
    shift[:8] = [62, -31, 0, 1, 31, 32, -1, 45]
    rq = Requant(mult.astype(np.int64), shift.astype(np.int64), -3, -100, 110)
    g2 = replace(g, nodes=(replace(node, requant=rq),))
    want = reference.run(g2, xs).output
    c = compile(g2, target=target, out_dir=tmp_path / "rq")
    src = (tmp_path / "rq" / "rq.c").read_text()
    assert "qacc_neon_requant8(" in src
    assert np.array_equal(c.run_int_q(xs), want)
    assert len(np.unique(want)) > 20  # not everything saturated


def test_quantized_network_on_every_neon_target(tmp_path: Path) -> None:
    """codegen.quantize(torch net) -> compile for each A-profile target -> run_int == reference."""
    import codegen
    from tests.nets import Branchy, randomized

    model = randomized(Branchy(cin=3, w=8, classes=5), seed=1)
    x = np.random.default_rng(1).standard_normal((4, 3, 10, 10)).astype(np.float32)
    qm = codegen.quantize(model, x, acc_bits={"default": 16, "c2": 24}, progress=False, name="br")
    want = qm.reference_int(x)
    for target in NEON_TARGETS:
        _require(target)
        c = codegen.compile(qm, target=target, out_dir=tmp_path / target)
        assert np.array_equal(c.run_int(x), want), target
        paths = {layer["name"]: layer["path"] for layer in c.report["layers"]}
        assert any(p.startswith("acc16") for p in paths.values() if p)


@pytest.mark.parametrize("target", ["cortex-a53", "cortex-a7"])
def test_neon_shift_only_requantize_equals_formats(target: str, tmp_path: Path) -> None:
    """qacc_neon_requant8_16s (every multiplier 1: one saturating rounding shift of the int16
    lanes) == formats.requantize, right shifts and saturating left shifts, in the conv and
    depthwise kernels."""
    _require(target)
    b = GraphBuilder("rqs", seed=11, batch=4)
    x = b.input((6, 5, 16), lo=-20, hi=20)
    t = b.conv2d(x, 16, padding=(1,) * 4, acc_bits=16, name="conv")
    b.conv2d(t, 16, padding=(1,) * 4, groups=16, acc_bits=16, name="dw")
    g, xs = b.result()
    shift = np.array([-15, -8, -3, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15], dtype=np.int64)
    nodes = tuple(
        replace(n, requant=Requant(np.ones(16, dtype=np.int64), np.roll(shift, i), 2, -120, 100))
        for i, n in enumerate(g.nodes)
    )
    g2 = replace(g, nodes=nodes)
    want = reference.run(g2, xs).output
    c = compile(g2, target=target, out_dir=tmp_path / "rqs")
    src = (tmp_path / "rqs" / "rqs.c").read_text()
    assert src.count("qacc_neon_requant8_16s(a") >= 2  # both kernels take it
    assert np.array_equal(c.run_int_q(xs), want)
    assert len(np.unique(want)) > 20  # not everything saturated


@pytest.mark.parametrize("target", ["cortex-a53", "cortex-a7"])
def test_neon_maxpool_vector_channels(target: str, tmp_path: Path) -> None:
    """The NEON maxpool2d on 16-, 8- and 1-channel steps (27 = 16 + 8 + 3 channels): windows
    inside the image, clipped by padding, entirely in the padding; clamps inside int8."""
    _require(target)
    b = GraphBuilder("mp", seed=11, batch=3)
    x = b.input((10, 11, 27))
    t = b.maxpool2d(x, (2, 2), (2, 2))
    t = b.maxpool2d(t, (3, 3), (2, 2), (1, 1, 1, 1), lo=-20, hi=90)
    t = b.maxpool2d(t, (3, 2), (1, 1), (1, 1, 0, 1))
    b.maxpool2d(t, (2, 2), (2, 2), (0, 2, 1, 0), lo=-100)
    g, xs = b.result()
    c = compile(g, target=target, out_dir=tmp_path / "mp")
    assert "vmaxq_s8(" in (tmp_path / "mp" / "mp.c").read_text()
    assert np.array_equal(c.run_int_q(xs), reference.run(g, xs).output)


@pytest.mark.parametrize("target", NEON_TARGETS)
def test_neon_depthwise_interior_and_border(target: str, tmp_path: Path) -> None:
    """The NEON depthwise kernel (input copied once, padded with the input zero point, which is
    folded into the bias; int8 x int8 SMLAL into int16 lanes for acc16; A64: 16 channels per
    pass): border pixels, the last C % 8 channels (27 = 3 x 8 + 3), strides, dilation, asymmetric
    padding, input zero points, wrapping widths and 9-bit weights (acc16 with int16 weights)."""
    _require(target)
    b = GraphBuilder("dw", seed=13, batch=2)
    x = b.input((11, 10, 27), lo=0, hi=127)
    t = b.conv2d(x, 27, padding=(1, 1, 1, 1), groups=27, input_zero_point=50, acc_bits=16)
    t = b.conv2d(t, 27, (3, 3), (2, 2), (1, 2, 0, 2), (2, 2), groups=27, zero_point=-3)
    t = b.conv2d(t, 27, padding=(1, 1, 1, 1), groups=27, acc_bits=11, w_dist="positive")
    t = b.conv2d(t, 27, (3, 3), (1, 2), (2, 1, 1, 1), groups=27, acc_bits=16, w_bits=9)
    b.conv2d(t, 27, (2, 3), padding=(1, 0, 1, 1), groups=27, input_zero_point=-7, acc_bits=20)
    g, xs = b.result()
    c = compile(g, target=target, out_dir=tmp_path / "dw")
    src = (tmp_path / "dw" / "dw.c").read_text()
    aarch64 = get_target(target).family.startswith("aarch64")
    assert ("QACC_DW_MLAL8(" if aarch64 else "vmlal_s8(") in src and "ibias" in src
    assert np.array_equal(c.run_int_q(xs), reference.run(g, xs).output)


def _conv_graph(acc_bits: int) -> Any:
    b = GraphBuilder(f"conv_acc{acc_bits}", seed=3, batch=1)
    x = b.input((12, 12, 16), lo=-8, hi=8)
    b.conv2d(x, 16, padding=(1, 1, 1, 1), acc_bits=acc_bits, name="conv")
    return b.result()


def test_acc16_executes_fewer_instructions_than_acc32_on_a53(tmp_path: Path) -> None:
    """The deterministic instruction-count comparison: the same conv layer, 16- vs 32-bit."""
    _require("cortex-a53")
    counts = {}
    for acc in (16, 32):
        g, xs = _conv_graph(acc)
        c = compile(g, target="cortex-a53", out_dir=tmp_path / f"acc{acc}")
        assert np.array_equal(c.run_int_q(xs), reference.run(g, xs).output)
        n = c.count_instructions(xs)
        assert set(n["layers"]) == {"conv"}
        assert 0 < n["layers"]["conv"] <= n["total"]
        assert n == c.count_instructions(xs)  # deterministic
        counts[acc] = n["layers"]["conv"]
        assert c.report["layers"][0]["path"] == f"acc{acc}"
    assert counts[16] < counts[32], counts


def test_count_instructions_per_layer(tmp_path: Path) -> None:
    b = GraphBuilder("two", seed=4, batch=2)
    x = b.input((8, 8, 8))
    t = b.conv2d(x, 8, padding=(1, 1, 1, 1), acc_bits=16, name="c1")
    t = b.maxpool2d(t, name="pool")
    b.conv2d(t, 8, padding=(1, 1, 1, 1), acc_bits=24, name="c2")
    g, xs = b.result()
    c = compile(g, target="cortex-a72", out_dir=tmp_path / "two")
    n = c.count_instructions(xs)  # a batch: the first sample is counted
    assert list(n["layers"]) == ["c1", "pool", "c2"]
    assert sum(n["layers"].values()) == n["total"]
    assert all(v > 0 for v in n["layers"].values())
    with pytest.raises(Exception, match="QEMU"):
        compile(g, target="host", out_dir=tmp_path / "host").count_instructions(xs)


def test_two_stage_executes_fewer_instructions_than_acc32_on_a53(tmp_path: Path) -> None:
    """Two stages on a 3x3 conv: one tile of K terms runs at the acc16 kernel's speed, >= 1.7x
    fewer instructions than acc32; tiles of 32 terms pay one widening per tile, still fewer."""
    _require("cortex-a53")
    counts: dict[str, int] = {}
    k = 3 * 3 * 32
    for label, acc, tile in (("acc32", 32, None), ("T=K", 16, k), ("T=32", 16, 32)):
        b = GraphBuilder(f"conv_{acc}_{tile}", seed=3, batch=1)
        x = b.input((12, 12, 32), lo=-8, hi=8)
        b.conv2d(x, 32, padding=(1, 1, 1, 1), acc_bits=acc, name="conv", acc_tile=tile)
        g, xs = b.result()
        c = compile(g, target="cortex-a53", out_dir=tmp_path / f"t{tile}")
        assert np.array_equal(c.run_int_q(xs), reference.run(g, xs).output)
        assert c.report["layers"][0]["path"] == ("acc32" if tile is None else "acc16x32")
        counts[label] = c.count_instructions(xs)["layers"]["conv"]
    assert 1.7 * counts["T=K"] <= counts["acc32"], counts
    assert counts["T=K"] < counts["T=32"] < counts["acc32"], counts


def test_cortex_a55_equals_reference(tmp_path: Path) -> None:
    """cortex-a55 (dotprod, in-order; QEMU runs it as the a76's ISA): one network through its
    SDOT, depthwise, dense and two-stage kernels, bit-exact, wrap-around included."""
    _require("cortex-a55")
    b = GraphBuilder("a55", seed=5, batch=2)
    x = b.input((7, 7, 16), dist="high")
    t = b.conv2d(x, 16, padding=(1,) * 4, acc_bits=14, w_dist="positive", name="sdot_wrap")
    t = b.conv2d(t, 16, padding=(1,) * 4, groups=16, acc_bits=20, name="depthwise")
    t = b.conv2d(t, 16, padding=(1,) * 4, acc_bits=16, acc_tile=16, name="two_stage")
    b.dense(b.flatten(t), 10, acc_bits=24, name="fc")
    g, xs = b.result()
    assert reference.run(g, xs).overflow["sdot_wrap"].events > 0
    c = compile(g, target="cortex-a55", out_dir=tmp_path / "a55")
    assert np.array_equal(c.run_int_q(xs), reference.run(g, xs).output)
    paths = [layer["path"] for layer in c.report["layers"]]
    assert paths == ["acc16-sdot", "acc32", "acc16x32", "acc32-sdot"]
