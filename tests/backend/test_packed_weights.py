"""Packed sub-byte weights: attrs["weight_bits"] <= 4 stores two s4 (<= 2: four s2) per byte.

* pack_bits against hand-computed bytes; qacc.h's unpack helpers against the Python inverse at
  every start offset and length (host, cffi).
* One random integer graph per accumulator width (acc16, acc32) with every weighted kernel at 4
  and at 2 bits — conv 3x3 (NEON "rows" and "direct" modes), strided, pointwise 1x1 (strided
  too), depthwise, grouped (blocks of 4 and not), dilated (NEON im2col), dense — plus one layer
  declared at 6 bits (stored unpacked): generated C == codegen.core.reference bit for bit on the
  host, with ASan + UBSan, and under QEMU on cortex-a53, cortex-a72, cortex-a76 (SDOT), cortex-a7
  (ARMv7), cortex-m4 (DSP) and cortex-m55 (MVE).
* The flash figure: every packed array holds exactly ceil(n * bits / 8) bytes of the n values the
  unpacked build stores, report.json's flash_weight_bytes is the sum of the arrays of weights.c,
  and (portable C) equals the unpacked figure minus n + ceil(n * bits / 8) per packed layer.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from codegen.backend import layouts
from codegen.backend.emit import RUNTIME, emit
from codegen.core import reference
from codegen.core.ir import Graph
from codegen.targets.build import resolve_target
from codegen.targets.compiled import compile
from tests.graphs import GraphBuilder

CTYPE_BYTES = {"uint8_t": 1, "int8_t": 1, "int16_t": 2, "int32_t": 4, "int64_t": 8}
ARM_TARGETS = ["cortex-a53", "cortex-a72", "cortex-a76", "cortex-a7", "cortex-m4", "cortex-m55"]


# ----------------------------------------------------------------------------- packing itself


def test_pack_bits_layout() -> None:
    # s4: element 2i in the low nibble, 2i+1 in the high nibble; an odd count pads with 0
    assert layouts.pack_bits([1, -1, -8, 7, -3], 4) == (0xF1, 0x78, 0x0D)
    # s2: element 4i+j in bits 2j..2j+1
    assert layouts.pack_bits([1, -1, -2, 0, -1], 2) == (0b00_10_11_01, 0b11)
    rng = np.random.default_rng(0)
    for bits in (4, 2):
        v = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=101)
        packed = layouts.pack_bits(v.tolist(), bits)
        assert len(packed) == -(-101 * bits // 8)
        assert np.array_equal(layouts.unpack_bits(packed, bits, 101), v)
    with pytest.raises(ValueError, match="do not fit 4 bits"):
        layouts.pack_bits([8], 4)


def test_weight_storage_bits() -> None:
    b = GraphBuilder("wb", seed=1)
    x = b.input((4, 4, 3))
    for bits, stored in ((2, 2), (3, 4), (4, 4), (5, 0), (8, 0)):
        b.conv2d(x, 2, w_bits=bits, declare_bits=True)
        assert layouts.weight_storage_bits(b.nodes[-1]) == stored
    b.conv2d(x, 2)
    assert layouts.weight_storage_bits(b.nodes[-1]) == 0  # no attribute: int8
    b.conv2d(x, 2, w_bits=5)
    wrong = replace(b.nodes[-1], attrs={**b.nodes[-1].attrs, "weight_bits": 4})
    if int(np.abs(wrong.params["weight"]).max()) > 7:
        with pytest.raises(ValueError, match="do not fit the declared weight_bits = 4"):
            layouts.weight_storage_bits(wrong)


@pytest.fixture(scope="module")
def unpack_lib(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """qacc_unpack_s4 / _s2 / _s16 of qacc.h in a tiny shared library loaded with cffi."""
    import cffi

    d = tmp_path_factory.mktemp("unpack")
    src = d / "shim.c"
    src.write_text(
        '#include "qacc.h"\n'
        "void u8(const uint8_t *s, int32_t first, int32_t n, int bits, int8_t *out)\n"
        "{ if (bits == 4) qacc_unpack_s4(out, s, first, n);\n"
        "  else qacc_unpack_s2(out, s, first, n); }\n"
        "void u16(const uint8_t *s, int32_t first, int32_t n, int bits, int16_t *out)\n"
        "{ qacc_unpack_s16(out, s, first, n, bits); }\n"
    )
    so = d / "libshim.so"
    flags = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fPIC", "-shared"]
    san = ["-fsanitize=undefined", "-fno-sanitize-recover=all"]
    subprocess.run(
        ["cc", *flags, *san, "-I", str(RUNTIME), str(src), "-o", str(so)],
        check=True,
        capture_output=True,
    )
    ffi = cffi.FFI()
    ffi.cdef(
        "void u8(const uint8_t *, int32_t, int32_t, int, int8_t *);"
        "void u16(const uint8_t *, int32_t, int32_t, int, int16_t *);"
    )
    return ffi, ffi.dlopen(str(so))


@pytest.mark.parametrize("bits", [4, 2])
def test_qacc_unpack_equals_python(unpack_lib: Any, bits: int) -> None:
    ffi, lib = unpack_lib
    rng = np.random.default_rng(bits)
    v = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=300)
    v[:4] = [-(1 << (bits - 1)), (1 << (bits - 1)) - 1, -1, 0]  # the extremes
    packed = np.array(layouts.pack_bits(v.tolist(), bits), dtype=np.uint8)
    src = ffi.from_buffer("uint8_t[]", packed)
    for first in range(9):
        for n in (*range(0, 9), 31, 32, 33, 64, 65, 130, 300 - first):
            out8 = np.full(n + 1, 99, dtype=np.int8)
            out16 = np.full(n + 1, 99, dtype=np.int16)
            lib.u8(src, first, n, bits, ffi.from_buffer("int8_t[]", out8))
            lib.u16(src, first, n, bits, ffi.from_buffer("int16_t[]", out16))
            assert np.array_equal(out8[:n], v[first : first + n]), (first, n)
            assert np.array_equal(out16[:n], v[first : first + n]), (first, n)
            assert out8[n] == 99 and out16[n] == 99  # nothing written past n


# ----------------------------------------------------------------------------- graphs


def packed_graph(acc: int) -> tuple[Graph, np.ndarray]:
    """Every weighted kernel at 4 and 2 bits (weights drawn over the full signed range), the
    shapes chosen for each dialect's paths (see the module docstring)."""
    b = GraphBuilder(f"packed_acc{acc}", seed=acc, batch=3)

    def kw(bits: int) -> dict[str, Any]:
        return {"w_bits": bits, "declare_bits": True, "acc_bits": acc, "w_dist": "full"}

    x = b.input((12, 12, 6))
    t = b.conv2d(x, 16, padding=(1, 1, 1, 1), **kw(4))  # NEON rows (IC 6)
    t = b.conv2d(t, 16, padding=(1, 1, 1, 1), input_zero_point=3, **kw(2))  # direct, MVE full
    t = b.conv2d(t, 12, stride=(2, 2), padding=(1, 0, 1, 0), **kw(4))  # strided
    t = b.conv2d(t, 12, padding=(1, 1, 1, 1), groups=12, **kw(2))  # depthwise
    t = b.conv2d(t, 12, padding=(1, 1, 1, 1), groups=12, input_zero_point=-2, **kw(4))
    t = b.conv2d(t, 12, padding=(1, 1, 1, 1), groups=3, **kw(2))  # grouped, 4 per group
    t = b.conv2d(t, 6, padding=(1, 1, 1, 1), groups=2, **kw(4))  # grouped, 3 per group
    t = b.conv2d(t, 9, (2, 3), dilation=(1, 2), **kw(2))  # NEON im2col (IC 6, dilated)
    t = b.conv2d(t, 13, (1, 1), **kw(4))  # pointwise, OC % 4 == 1
    t = b.conv2d(t, 16, (1, 1), stride=(2, 2), **kw(2))  # pointwise strided, MVE tail (IC 13)
    t = b.dense(b.flatten(t), 21, **kw(4))
    t = b.dense(t, 7, **kw(2))
    b.dense(t, 5, w_bits=6, declare_bits=True, acc_bits=acc)  # declared 6 bits: int8 storage
    return b.result()


@pytest.fixture(scope="module")
def graphs() -> dict[int, tuple[Graph, np.ndarray, np.ndarray]]:
    out = {}
    for acc in (16, 32):
        g, x = packed_graph(acc)
        out[acc] = (g, x, reference.run(g, x).output)
    return out


def _unpacked(g: Graph) -> Graph:
    nodes = tuple(
        replace(n, attrs={k: v for k, v in n.attrs.items() if k != "weight_bits"}) for n in g.nodes
    )
    return replace(g, nodes=nodes)


def _arrays(files: dict[str, str], name: str) -> dict[str, tuple[str, int]]:
    """symbol -> (C type, length), from the weights header."""
    decls = re.findall(r"extern const (\w+) (\w+)\[(\d+)\];", files[f"{name}_weights.h"])
    return {sym: (ct, int(n)) for ct, sym, n in decls}


def _paths(files: dict[str, str]) -> dict[str, str | None]:
    """layer -> its accumulation path (report.json)."""
    return {r["name"]: r["path"] for r in json.loads(files["report.json"])["layers"]}


def _layer_bits(g: Graph, sym: str) -> int:
    """The storage bits of the layer whose array `sym` is."""
    return layouts.weight_storage_bits(next(n for n in g.nodes if f"_{n.name}_" in sym))


@pytest.mark.parametrize("acc", [16, 32])
@pytest.mark.parametrize(
    "target", ["host", "cortex-m4", "cortex-m55", "cortex-a53", "cortex-a76", "cortex-a7"]
)
def test_flash_counts_packed_bytes(
    acc: int, target: str, graphs: dict[int, Any], tmp_path: Path
) -> None:
    g = graphs[acc][0]
    t = resolve_target(target)
    files = emit(g, target=t)
    plain = emit(_unpacked(g), target=t)
    name = g.name
    got, want = _arrays(files, name), _arrays(plain, name)
    packed = {s for s, (ct, _) in got.items() if ct == "uint8_t"}
    weighted = {n.name for n in g.nodes if n.op in ("conv2d", "dense")}
    assert len(packed) == len(weighted) - 1  # every layer but the 6-bit one
    # a layer whose unpacked twin takes another kernel (a Cortex-M kernel with its own weight
    # layout, which packed weights do not use: report.json's "path" differs) has other arrays
    path, plain_path = _paths(files), _paths(plain)
    same = [n for n in path if path[n] == plain_path[n]]
    if t.dialect == "c":
        assert len(same) == len(path)
    got_same = {s: v for s, v in got.items() if any(f"_{n}_" in s for n in same)}
    want_same = {s: v for s, v in want.items() if any(f"_{n}_" in s for n in same)}
    assert got_same.keys() == want_same.keys()
    for sym, (ct, n) in got_same.items():
        if sym in packed:
            bits = _layer_bits(g, sym)
            assert bits in (2, 4)
            assert n == -(-want[sym][1] * bits // 8), sym
        else:
            assert (ct, n) == want[sym], sym
    flash = json.loads(files["report.json"])["memory"]["flash_weight_bytes"]
    assert flash == sum(CTYPE_BYTES[ct] * n for ct, n in got.values())
    assert f"{name}: {flash} bytes, read-only (flash)" in files[f"{name}_weights.c"]
    assert f"_WEIGHT_BYTES {flash}\n" in files[f"{name}.h"]
    plain_flash = json.loads(plain["report.json"])["memory"]["flash_weight_bytes"]
    if t.dialect == "c":  # independent of the layouts: the int8 weights, n -> ceil(n * b / 8)
        saved = sum(
            n.params["weight"].size - -(-n.params["weight"].size * bits // 8)
            for n in g.nodes
            if (bits := layouts.weight_storage_bits(n))
        )
        assert flash == plain_flash - saved
    assert flash < plain_flash


def test_inconsistent_weight_bits_fail_loudly(graphs: dict[int, Any]) -> None:
    g = graphs[16][0]
    first = g.nodes[0]
    bad = replace(first, attrs={**first.attrs, "weight_bits": 2})  # its weights reach -8..7
    with pytest.raises(ValueError, match="do not fit the declared weight_bits = 2"):
        emit(replace(g, nodes=(bad, *g.nodes[1:])))


# ----------------------------------------------------------------------------- bit-exact runs


@pytest.mark.parametrize("acc", [16, 32])
def test_host_equals_reference(acc: int, graphs: dict[int, Any], tmp_path: Path) -> None:
    g, x, want = graphs[acc]
    c = compile(g, out_dir=tmp_path / "host", testbench=False)
    assert np.array_equal(c.run_int_q(x), want)
    src = (tmp_path / "host" / f"{g.name}.c").read_text()
    assert "qacc_unpack_s4(" in src and "qacc_unpack_s2(" in src


@pytest.mark.slow
@pytest.mark.parametrize("acc", [16, 32])
def test_sanitized_equals_reference(acc: int, graphs: dict[int, Any], tmp_path: Path) -> None:
    g, x, want = graphs[acc]
    c = compile(g, out_dir=tmp_path / "san", sanitize=True)
    assert np.array_equal(c.run_int_q(x), want)


@pytest.mark.qemu
@pytest.mark.parametrize("acc", [16, 32])
@pytest.mark.parametrize("target", ARM_TARGETS)
def test_arm_equals_reference(
    target: str, acc: int, graphs: dict[int, Any], tmp_path: Path
) -> None:
    g, x, want = graphs[acc]
    c = compile(g, target=target, out_dir=tmp_path / target)
    assert np.array_equal(c.run_int_q(x), want)
    src = (tmp_path / target / f"{g.name}.c").read_text()
    assert "qacc_unpack_s" in src
    if c.target.dialect == "neon":  # the NEON kernels themselves unpack (not the C fallback)
        assert "qacc_unpack_s16(wu," in src or "(wu, qacc_" in src
        assert "vld1_s8(wu + " in src or "vmovl_s8(vld1_s8(wu + " in src
