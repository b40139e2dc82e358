"""Generated C on Cortex-M (QEMU) == the NumPy integer reference, exactly.

Every case of the host kernel table (tests/backend/test_codegen_host.py) is emitted in the target's
dialect — DSP (SMLAD) kernels on cortex-m4/m7, Helium (MVE) kernels on cortex-m55, the portable C
for kernels without a dialect version — and all cases of a target are linked into one runner
executable (one CMake project, built once per session); each case runs under qemu-system-arm
through files. A small network quantized with
codegen.quantize at 16- and 32-bit accumulators is compiled for each target and compared with the
model's integer reference. No tolerances anywhere; a missing toolchain or emulator fails (naming
the Debian package), it never skips.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from codegen.backend import layouts
from codegen.backend.emit import c_identifier, emit, write_files
from codegen.backend.lower import lower, tiles_cannot_wrap
from codegen.core import reference
from codegen.core.ir import Graph
from codegen.targets.build import ToolMissingError, resolve_target
from codegen.targets.compiled import run_testbench
from tests.backend.test_codegen_host import CASE_IDS, CASES
from tests.graphs import GraphBuilder, overflowed
from tests.shared_build import build_once, shared_dir

CORTEX_M = ("cortex-m4", "cortex-m7", "cortex-m55")
DIALECT_MARKERS = {"dsp": "__smlad(", "mve": "vmladavaq_s8("}
"""A call that only the dialect's own kernels contain (proof that they were used)."""

pytestmark = pytest.mark.qemu


RUNNER_C = """\
/* All kernel cases of one target in one executable: argv[1] names the case, argv[2] and argv[3]
   are the input and output files (samples of int8 values, as the generated test benches). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

%(includes)s

struct qacc_case {
    const char *name;
    int (*run)(const int8_t *, int8_t *);
    size_t in_size, out_size;
};

static const struct qacc_case cases[] = {
%(rows)s
};

int main(int argc, char **argv)
{
    const struct qacc_case *c = NULL;
    size_t i;
    FILE *fin;
    FILE *fout;
    int8_t *in;
    int8_t *out;
    int status = 0;

    for (i = 0; argc == 4 && i < sizeof cases / sizeof cases[0]; ++i) {
        if (strcmp(cases[i].name, argv[1]) == 0) {
            c = &cases[i];
        }
    }
    if (c == NULL) {
        fprintf(stderr, "usage: %%s CASE INPUT.bin OUTPUT.bin (unknown case)\\n", argv[0]);
        return 2;
    }
    fin = fopen(argv[2], "rb");
    fout = fopen(argv[3], "wb");
    in = (int8_t *)malloc(c->in_size);
    out = (int8_t *)malloc(c->out_size);
    if (fin == NULL || fout == NULL || in == NULL || out == NULL) {
        fprintf(stderr, "cannot open files or allocate buffers\\n");
        return 2;
    }
    while (fread(in, 1, c->in_size, fin) == c->in_size) {
        if (c->run(in, out) != 0 || fwrite(out, 1, c->out_size, fout) != c->out_size) {
            status = 1;
            break;
        }
    }
    free(in);
    free(out);
    fclose(fin);
    if (fclose(fout) != 0) {
        status = 1;
    }
    return status;
}
"""


def build_cases(target: str, root: Path) -> dict[str, str]:
    """Emit every case for `target` and link all of them into one runner executable (one CMake
    project, one link: a Cortex-M link step compiles the start-up code, so 50 test benches would
    cost 50 of those). Model symbols are prefixed with the model name, so they coexist.

    case id -> runner path, or "ERROR <log>" for a case whose graph or build failed."""
    t = resolve_target(target)
    summary: dict[str, str] = {}
    names: dict[str, str] = {}
    for c in CASES:
        try:
            g, _ = c.build()
        except Exception as e:  # a broken case fails its own test, not the others
            summary[c.id] = f"ERROR building the graph: {e!r}"
            continue
        name = c_identifier(c.id).lower()
        files = emit(g, c.id, t)
        write_files(files, root / name)
        names[c.id] = name
    includes = "\n".join(f'#include "{n}.h"' for n in names.values())
    rows = "\n".join(
        f'    {{"{n}", qacc_{n}_run, QACC_{n.upper()}_INPUT_SIZE, QACC_{n.upper()}_OUTPUT_SIZE}},'
        for n in names.values()
    )
    (root / "runner.c").write_text(RUNNER_C % {"includes": includes, "rows": rows})
    sources = " ".join(f"{n}/{n}.c {n}/{n}_weights.c" for n in names.values())
    dirs = " ".join(names.values())
    (root / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.13)\nproject(qacc_cortexm_cases C)\n"
        f"add_executable(runner runner.c {sources})\n"
        f"target_include_directories(runner PRIVATE {dirs})\n"
        "set_target_properties(runner PROPERTIES C_STANDARD 99 C_STANDARD_REQUIRED ON"
        " C_EXTENSIONS OFF)\n"
        "target_compile_options(runner PRIVATE -O2 -Wall -Wextra -Werror -pedantic)\n"
    )
    t.check()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise ToolMissingError("cmake is not installed; install the Debian package 'cmake'")
    defines = [f"-D{k}={v}" for k, v in t.cmake_defines.items()]
    if t.toolchain_file is not None:
        defines.append(f"-DCMAKE_TOOLCHAIN_FILE={Path(t.toolchain_file).resolve()}")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    bdir = root / "build"
    for cmd in (
        [cmake, "-S", str(root), "-B", str(bdir), *gen, *defines],
        [cmake, "--build", str(bdir), "-j", "2"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            log = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-60:])
            return {cid: f"ERROR {' '.join(cmd[:3])} failed:\n{log}" for cid in CASE_IDS}
    runner = str(bdir / "runner")
    for cid in names:
        summary[cid] = f"{runner} {names[cid]}"
    return summary


@pytest.fixture(scope="session")
def cortexm_builds(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, str]]:
    """target -> (case id -> test bench): each target is built once per session, on first use,
    and shared by the pytest-xdist workers through a lock file (workers build targets in
    parallel when their first tests are on different targets)."""
    base = shared_dir(tmp_path_factory)
    cache: dict[str, dict[str, str]] = {}

    def build(target: str, root: Path) -> dict[str, str]:
        try:
            return build_cases(target, root)
        except ToolMissingError as e:
            return {cid: f"ERROR {e}" for cid in CASE_IDS}

    def get(target: str) -> dict[str, str]:
        if target not in cache:
            cache[target] = build_once(
                base, f"qacc-cortexm-{target}", lambda root: build(target, root)
            )
        return cache[target]

    return get


@pytest.fixture(scope="module")
def graphs() -> dict[str, tuple[Graph, np.ndarray, np.ndarray]]:
    out = {}
    for c in CASES:
        with contextlib.suppress(Exception):  # reported by build_cases
            g, x = c.build()
            out[c.id] = (g, x, reference.run(g, x).output)
    return out


@pytest.mark.parametrize("target", CORTEX_M)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cortexm_equals_reference(
    target: str,
    case: Any,
    cortexm_builds: Callable[[str], dict[str, str]],
    graphs: dict[str, Any],
) -> None:
    tb = cortexm_builds(target)[case.id]
    if tb.startswith("ERROR "):
        pytest.fail(f"{target} build failed: {tb}")
    g, x, want = graphs[case.id]
    t = resolve_target(target)
    runner, name = tb.split(" ")

    def launch(exe: str, args: Sequence[str]) -> list[str]:
        return t.argv(exe, [name, *args])

    got = run_testbench(runner, x, g.tensors[g.input].shape, g.tensors[g.output].shape, launch)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("target", CORTEX_M)
def test_dialect_kernels_are_used(target: str, graphs: dict[str, Any]) -> None:
    """conv2d, pointwise and dense get the dialect's kernels at both container widths."""
    t = resolve_target(target)
    marker = DIALECT_MARKERS[t.dialect]
    for cid in (
        "conv2d_acc32-groups2",
        "conv2d_acc16-relu-clamp",
        "conv2d_pointwise_acc16-stride2-wrap-acc10",
        "conv2d_pointwise_acc32-c13to9",
        "dense_acc16-wrap-acc13",
        "dense_acc32-37to10",
    ):
        g = graphs[cid][0]
        files = emit(g, cid, t)
        src = files[f"{c_identifier(cid).lower()}.c"]
        assert marker in src, cid  # MVE: VMLADAVA at every width (acc16 wraps once at the end)
        assert "#else /* no " in src, cid  # the portable fallback is kept


def test_mve_pool_kernels_are_used(graphs: dict[str, Any]) -> None:
    """The Helium pools and add (vector max, int16- or int32-lane sums, the vector
    requantization, including the wrap to narrow accumulators) are used on cortex-m55, the
    portable fallback kept."""
    t = resolve_target("cortex-m55")
    for cid, markers in (
        ("maxpool2d-c21-k3s2-pad-clamp", ("vmaxq_s8(",)),
        ("avgpool2d_acc16-c19-zero-point-wrap-acc10", ("vldrbq_z_s32(", "vshlq_n_s32(")),
        ("global_avgpool_acc16-c27-zero-point-wrap-acc12", ("vldrbq_z_s16(", "vshlq_n_s32(")),
        ("global_avgpool_acc32-16x17x6-per-channel", ("vldrbq_z_s32(", "vld1q_s32(")),
        ("add_acc16-wrap-acc9", ("vmlaq_n_s32(", "vshlq_n_s32(")),
        ("add_acc16-unit-mult-zero-points-wrap-acc8", ("vaddq_s32(da, db)", "vshlq_n_s32(")),
    ):
        files = emit(graphs[cid][0], cid, t)
        src = files[f"{c_identifier(cid).lower()}.c"]
        assert all(m in src for m in markers), cid
        assert "#else /* no MVE" in src, cid


def test_mve_kernels_of_the_new_ops_are_used(graphs: dict[str, Any]) -> None:
    """The Helium lut (VLDRB gather from the rotated table), mul (int32-lane products, the vector
    requantization, the wrap), gather (VLDRB gather with 8- or 16-bit offsets, or a slice copy),
    adaptive pools (vector max; int32-lane sums with the per-pixel requantization), bilinear
    resizing (four weighted int32x4 loads, the zero point taken out at once), zero insertion
    (predicated vector copies and fills), the add (whole vectors and one tail) and the im2col
    conv (few inputs per kernel row) are used on cortex-m55, the portable fallback kept (but
    for the im2col conv, whose weights are packed for Helium)."""
    t = resolve_target("cortex-m55")
    for cid, markers in (
        ("lut-hardswish", ("vldrbq_gather_offset_u8(", "vldrbq_gather_offset_z_u8(")),
        ("mul_acc16-flat-105-zero-points", ("vmulq_s32(", "P = 1, C = 105")),
        (
            "mul_acc16-broadcast-c13-zero-points-per-channel-wrap-acc11",
            ("vmulq_s32(", "vshlq_n_s32("),
        ),
        ("gather-channel-shuffle-c40", ("vldrbq_gather_offset_s8(", "vldrbq_gather_offset_z_s8(")),
        ("gather-vector-wide", ("vldrbq_gather_offset_s16(", "vldrbq_gather_offset_z_s16(")),
        ("gather-chunk-clamped", ("START = 5", "vminq_s8(")),
        ("adaptive_avgpool2d_acc16-ceil-windows-wrap", ("vmulq_n_s32(r", "[px]", "vshlq_n_s32(")),
        ("adaptive_maxpool2d-upsample-clamped", ("vmaxq_s8(",)),
        (
            "resize_bilinear_acc32-align-corners-zero-point-clamped",
            ("vmlaq_n_s32(r, ", "vsubq_n_s32(r, IZN)"),
        ),
        ("zero_insert-stride3x2", ("vstrbq_p_s8(", "vdupq_n_s8(")),
        ("add_acc16-residual", ("P = 1, C = 210", "vctp32q(TAIL)")),  # one flat row, a tail
        ("conv2d_acc16-wrap-acc8", ("int8_t col[ICP];", "wlstp.8")),  # im2col: 3 * 5 < 16
        ("conv2d_acc32-pixel-blocks-tail", ("PX = 3, XOFF = 8,",)),
        ("conv2d_acc16-pixel-blocks-stride1x2-wrap-acc14", ("PX = 2, XOFF = 64,",)),  # 2 * 64 > 127
        ("avgpool2d_acc16-whole-image-7x5x12", ("vldrbq_z_s16(",)),  # the global pool's lanes
    ):
        files = emit(graphs[cid][0], cid, t)
        src = files[f"{c_identifier(cid).lower()}.c"]
        assert all(m in src for m in markers), cid
        packed = "col[ICP]" in src  # no portable fallback: the weights are packed for Helium
        assert ("#else /* no MVE" in src) != packed and ("needs MVE" in src) == packed, cid


def test_softmax_kernels_are_used(graphs: dict[str, Any]) -> None:
    """The Helium softmax (VMAXV, VLDRH gathers, VADDVA, the division by the magic reciprocal:
    VMULH.U32) and the DSP one (SSUB8 + SEL maximum, USUB8 distances, UDIV, the saturation one
    USAT / SSAT where the limits are such a range, else 32-bit compares on the sides that can
    bind) are used where they apply, the portable kernel for 33-bit dividends (Helium) or a
    64-bit division (DSP); report.json names the path. The rows above check them equal to the
    reference."""
    rows = (
        ("cortex-m55", "softmax-1000-classes-flat-exp", ("vmaxvq_s8(", "vmulhq_u32("), "vmulh"),
        ("cortex-m55", "softmax-pixels-c33-flat-exp-zero-point-clamped", ("vmaxvq_p_s8(",
         "vstrbq_p_s32(y + c", "vaddq_n_s32(r, ZP)", "vminq_s32(", "vmaxq_s32("), "vmulh"),
        ("cortex-m55", "softmax-classifier", ("vldrhq_gather_shifted_offset_z_u16(",), "vmulh"),
        ("cortex-m55", "softmax-out-frac16-wide-division", ("uint64_t twice",), None),
        ("cortex-m4", "softmax-1000-classes-flat-exp", ("__usub8(", "__ssat(r, 8)"), "usub8"),
        ("cortex-m7", "softmax-classifier", ("qacc_dsp_max8(", "__usat(r, 7)"), "usub8"),
        ("cortex-m4", "softmax-pixels-c33-flat-exp-zero-point-clamped",
         ("r = r > HI ? HI : r;", "r = r < LO ? LO : r;"), "usub8"),
        ("cortex-m7", "softmax-out-frac16-wide-division", ("uint64_t twice",), None),
    )  # fmt: skip
    for target, cid, markers, path in rows:
        t = resolve_target(target)
        files = emit(graphs[cid][0], cid, t)
        src = files[f"{c_identifier(cid).lower()}.c"]
        assert all(m in src for m in markers), (target, cid)
        assert ("vmulhq_u32(" in src or "__usub8(" in src) == (path is not None), (target, cid)
        layer = json.loads(files["report.json"])["layers"][-1]
        assert layer["op"] == "softmax" and str(layer["path"]).startswith(str(path)), (target, cid)


@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m7"])
def test_dsp_kernels_of_resize_and_zero_insert_are_used(
    target: str, graphs: dict[str, Any]
) -> None:
    """The DSP bilinear resizing (vertical blends of 2 channels per MUL/MLA in 16-bit lanes, into
    the scratch buffer; horizontal halfword MACs; the channel tail from the inputs; the portable
    kernel for fewer than 4 channels) and zero insertion (word copies and fills, 16 values per
    step) are used on cortex-m4/m7, the portable fallback kept; the rows above check them equal
    to the reference, with and without a channel tail, an input zero point, per-channel
    requantization and an output zero point."""
    t = resolve_target(target)
    for cid, markers in (
        ("resize_bilinear_acc32-up2-half-pixel", ("__smlatt(", "c = FULL; c < C")),
        ("resize_bilinear_acc32-down-per-channel", ("qacc_dsp_uxtb16_ror8(", "__smlabb(")),
        ("resize_bilinear_acc32-align-corners-zero-point-clamped", ("FULL = 4,", "IZN = -")),
        ("zero_insert-stride3x2", ("qacc_dsp_store4(dst + 12, z)", "0x00000000u")),
        ("net-conv-transpose-zero-point", ("qacc_dsp_load4(src))", "0xF7F7F7F7u")),
    ):
        src = emit(graphs[cid][0], cid, t)[f"{c_identifier(cid).lower()}.c"]
        assert all(m in src for m in markers), (target, cid)
        assert "#else /* no DSP extension" in src, (target, cid)
    b = GraphBuilder("rgb", batch=1)  # 3 channels: no whole word
    b.resize_bilinear(b.input((4, 4, 3)), (8, 8))
    assert "__ARM_FEATURE_DSP" not in emit(b.graph(), "rgb", t)["rgb.c"], target


def test_dsp_concat_copies_or_requantizes_in_32_bits(graphs: dict[str, Any]) -> None:
    """On cortex-m4/m7 the concat copies an input already in the output format by words,
    requantizes one with multiplier 1, no zero point and a small shift 4 values per word
    (SHADD8 / QADD8) and the others with qacc_requantize32 (exact for int8 inputs) or, for a
    left shift beyond int32, qacc_requantize; the rows above check it equal to the reference."""
    for target in ("cortex-m4", "cortex-m7"):
        t = resolve_target(target)
        for cid, copies, words, rq64 in (
            ("concat-two-branches", 1, 1, False),  # (1, -1): one saturating doubling
            ("concat-three-inputs-zero-points", 0, 0, False),
            ("concat-copy-and-8-bit-lanes", 1, 1, False),  # (1, 1): one halving
            ("concat-lanes-8-16-32-scalar-clamped", 0, 1, True),  # ZP, LO, HI words
        ):
            src = emit(graphs[cid][0], cid, t)[f"{c_identifier(cid).lower()}.c"]
            start = src.index("DSP extension: each input")
            kernel = src[start : src.index("#else /* no DSP extension", start)]
            assert kernel.count(", copied */") == copies, (target, cid)
            assert kernel.count(", 4 per word */") == words, (target, cid)
            assert "qacc_requantize32(" in kernel, cid
            assert ("qacc_requantize(" in kernel) == rq64, cid
        src = emit(graphs["concat-lanes-8-16-32-scalar-clamped"][0], "c", t)["c.c"]
        assert all(m in src for m in ("__shadd8(v, (int8x4_t)0x02020202u)", "__shadd8(v, 0)"))
        assert all(m in src for m in ("0x05050505u", "qacc_dsp_min8((uint32_t)v, 0x6E6E6E6Eu)"))
        src = emit(graphs["concat-two-branches"][0], "c", t)["c.c"]
        assert "v = __qadd8(v, v);" in src, target


def test_dsp_dense_widened_with_a_tail(graphs: dict[str, Any]) -> None:
    """On cortex-m4/m7 a dense layer whose outputs are not a multiple of 4 keeps the pre-widened
    int16 weights (path -smlad-w16): the last 1..3 outputs are one narrower block (the rows above
    check it equal, with an input zero point folded into the bias and with wraps)."""
    for target in ("cortex-m4", "cortex-m7"):
        t = resolve_target(target)
        for cid, node_name, full, tail in (
            ("dense_acc32-wrap-acc32-bias", "dense0", 4, 1),
            ("dense_acc32-input-zero-point-relu", "dense0", 4, 2),
            ("net-every-acc-width-8-to-32", "acc16", 0, 3),  # 16-bit container, wraps
        ):
            g = graphs[cid][0]
            call = lower(g, t.dialect, t.align).call(node_name)
            assert str(layouts.path(call, t.dialect, t.neon)).endswith("-smlad-w16"), cid
            src = emit(g, cid, t)[f"{c_identifier(cid).lower()}.c"]
            assert f"oc = {full}; /* the last {tail} outputs */" in src, cid


GROUPED_PATHS = {
    "dsp": {
        "conv2d_acc32-groups4-c32-k3-same-mult4": "acc32-smlad-w16-grouped",
        "conv2d_acc16-groups2-c12to8-wrap-acc12": "acc16-smlad-grouped",  # 6 inputs per group
        "conv2d_acc16-groups2-c16to8-dilation2-zp": "acc16-smlad-w16-grouped",
        "conv2d_depthwise_acc32-c19-mult2-same": "acc32-smlabb-chmult",
        "conv2d_depthwise_acc16-c20-mult3-wrap-acc12-zp": "acc16-smlabb-chmult",
        "conv2d_depthwise_acc32-c16-mult2-stride2-mult1": "acc32-smlabb-chmult",
        "conv2d_depthwise_acc16-c8-mult4-mult1": "acc16-smlabb-chmult",
        "conv2d_depthwise_acc32-multiplier2": "acc32-smlabb-chmult",
    },
    "mve": {
        "conv2d_acc32-groups4-c32-k3-same-mult4": "acc32-vmladava-im2col-grouped",
        "conv2d_acc16-groups2-c12to8-wrap-acc12": "acc16-vmladava-im2col-grouped",
        "conv2d_acc16-groups2-c16to8-dilation2-zp": "acc16-vmladava-im2col-grouped",
        "conv2d_acc32-groups2": "acc32-vmladava-grouped",  # 2 outputs per group: no blocks of 4
        "conv2d_depthwise_acc32-c19-mult2-same": "acc32-lanes32-chmult",
        "conv2d_depthwise_acc16-c20-mult3-wrap-acc12-zp": "acc16-lanes16-chmult",
        "conv2d_depthwise_acc32-c16-mult2-stride2-mult1": "acc32-lanes32-chmult",
        "conv2d_depthwise_acc16-c8-mult4-mult1": "acc16-lanes16-chmult",
        "conv2d_depthwise_acc32-multiplier2": "acc32-lanes32-chmult",
    },
}


@pytest.mark.parametrize("target", CORTEX_M)
def test_grouped_and_multiplier_kernels_are_used(target: str, graphs: dict[str, Any]) -> None:
    """Grouped convs and depthwise layers with a channel multiplier run the dialect's kernels
    (the rows above check them equal): on DSP the int16-weight kernel with one run per tap of a
    group's inputs (4k inputs and outputs per group), on Helium an im2col of one group's taps
    and the weight stream of its output channels; the depthwise kernels one pass per multiplier
    index m (Helium: VSTRB scatters to every M-th output when the requantization is on lanes).
    The report's path says which."""
    t = resolve_target(target)
    for cid, want in GROUPED_PATHS[t.dialect].items():
        g = graphs[cid][0]
        (call,) = lower(g, t.dialect, t.align).calls
        assert layouts.path(call, t.dialect, t.neon) == want, cid
        src = emit(g, cid, t)[f"{c_identifier(cid).lower()}.c"]
        if "chmult" in want:
            assert "for (m = 0; m < M; ++m" in src, cid
        elif "im2col" in want:
            assert "for (g = 0; g < " in src and "wlstp.8" in src, cid
        elif "w16" in want:
            assert "one run of the group's ICG inputs per tap" in src, cid
        else:
            assert DIALECT_MARKERS[t.dialect] in src, cid


@pytest.mark.parametrize("target", CORTEX_M)
def test_two_stages_without_tile_wraps_run_one_stage(target: str, graphs: dict[str, Any]) -> None:
    """A two-stage layer runs the dialect's 32-bit kernel exactly when the exact bound proves
    that no tile can wrap (then its sum is the one-stage sum wrapped to acc2_bits); a layer
    whose tiles can wrap (the `-wrap` rows do, on their inputs) keeps the portable two stages.
    The report's path says which."""
    t = resolve_target(target)
    marker = DIALECT_MARKERS[t.dialect]
    for cid in (c for c in CASE_IDS if "acc16x32" in c):
        g = graphs[cid][0]
        node = next(n for n in g.nodes if "acc_tile" in n.attrs)
        call = lower(g, t.dialect, t.align).call(node.name)
        free = tiles_cannot_wrap(g, node)
        assert free == ("tiles-exact" in cid), cid
        assert (call.exact_tile is not None, call.acc_tile is None) == (free, free), cid
        want = "acc16x32-as-acc32-" if free else "acc16x32-portable"
        assert str(layouts.path(call, t.dialect, t.neon)).startswith(want), cid
        src = emit(g, cid, t)[f"{c_identifier(cid).lower()}.c"]
        assert (marker in src) == free, cid


def test_dsp_global_avgpool_sums_int16_pairs() -> None:
    """On cortex-m4/m7 the global average pool sums 4 channels per word with SXTAB16 (two int16
    halves) when HW * 128 <= 2^15 (the rows above check it equal, with a channel tail and a
    wrap), also for an average pool whose window is the whole image; a larger image keeps the
    portable kernel. Both requantize in 32 bits (the bound of
    HW inputs, or of the wrapped accumulator, allows it)."""
    for target in ("cortex-m4", "cortex-m7"):
        t = resolve_target(target)
        for cid, dsp in (
            ("global_avgpool_acc16-c27-zero-point-wrap-acc12", True),
            ("avgpool2d_acc16-whole-image-7x5x12", True),  # its one window: the whole image
            ("global_avgpool_acc32-16x17x6-per-channel", False),
        ):
            g = next(c for c in CASES if c.id == cid).build()[0]
            src = emit(g, cid, t)[f"{c_identifier(cid).lower()}.c"]
            assert ("qacc_dsp_sxtab16_ror8(s13, w)" in src) == dsp, (target, cid)
            assert "qacc_requantize32(" in src, (target, cid)  # the bounds allow it


def test_dsp_mul_multiplies_halfword_pairs(graphs: dict[str, Any]) -> None:
    """On cortex-m4/m7 the mul splits 4 elements per word into int16 lanes (SXTB16, the zero
    points by SSUB16) and multiplies them by SMULBB / SMULTT, exact in int32; one flat row for
    two tensors of one shape with one multiplier, rows of channels otherwise (broadcast,
    per-channel); the wrap left out where no product reaches 2^(A-1); qacc_requantize32, which
    the inputs' ranges make equal to THE requantization, also when the product wraps. The rows
    above check it equal to the reference."""
    for target in ("cortex-m4", "cortex-m7"):
        t = resolve_target(target)
        for cid, markers in (
            ("mul_acc16-same-shape", ("P = 1, C = 120,", "nothing wraps")),
            (
                "mul_acc16-flat-105-zero-points",
                ("FULL = 104,", "__ssub16(qacc_dsp_sxtb16_ror8(wb), ZZB)"),
            ),
            ("mul_acc16-wrap-acc12", ("qacc_wrap16((uint16_t)(uint32_t)s3, ACC_BITS)",)),
            (
                "mul_acc16-broadcast-c13-zero-points-per-channel-wrap-acc11",
                ("P = 12, C = 13,", "BP = 0,", "c + 3]", "for (; c < C; ++c)"),
            ),
        ):
            src = emit(graphs[cid][0], cid, t)[f"{c_identifier(cid).lower()}.c"]
            assert all(m in src for m in (*markers, "qacc_dsp_multt(a13, b13)")), (target, cid)
            assert "qacc_requantize32(" in src, (target, cid)
            assert "#else /* no DSP extension" in src, (target, cid)


@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m7"])
def test_dsp_adaptive_pools_take_words(target: str, graphs: dict[str, Any]) -> None:
    """On cortex-m4/m7 the adaptive pools take 4 channels per word over their given windows:
    the maximum by SSUB8 + SEL (the clamp likewise), the average by SXTAB16 int16 sums
    requantized per output pixel (the wrap left out where no sum reaches 2^(A-1)); windows of
    one size unrolled at constant offsets, others looped; the channels past the last whole word
    one at a time; fewer than 4 channels keep the portable kernel. The rows above check them
    equal to the reference."""
    t = resolve_target(target)
    for cid, markers in (
        ("adaptive_avgpool2d_acc16-down-zero-point", ("n = 12; /* taps of every", "x + c + 88)")),
        (
            "adaptive_avgpool2d_acc16-ceil-windows-wrap",
            ("ix < ix1 - ix0;", "wrapped to ACC_BITS", "[px], ", "c = FULL; c < C"),
        ),
        ("adaptive_maxpool2d-down", ("qacc_dsp_load4(x + (iy * IW + ix) * C + c))", "FULL = 4,")),
        ("adaptive_maxpool2d-upsample-clamped", ("qacc_dsp_min8(v, 0x46464646u)", "0xFBFBFBFBu")),
    ):
        src = emit(graphs[cid][0], cid, t)[f"{c_identifier(cid).lower()}.c"]
        assert all(m in src for m in markers), (target, cid)
        assert "#else /* no DSP extension" in src, (target, cid)
    src = emit(graphs["adaptive_avgpool2d_acc32-wide"][0], "w", t)["w.c"]
    assert "__ARM_FEATURE_DSP" not in src, target  # 3 channels: no whole word


def test_mve_concat_copies_or_requantizes_in_lanes(graphs: dict[str, Any]) -> None:
    """On cortex-m55 the concat copies an input already in the output format 16 values per
    vector and requantizes the others in the narrowest lanes that hold them exactly (8, 16 or 32
    bits), one value at a time where none does; the rows above check it equal to the reference."""
    t = resolve_target("cortex-m55")
    for cid, kinds in (
        ("concat-two-branches", ("16-bit lanes", "copied")),
        ("concat-copy-and-8-bit-lanes", ("copied", "8-bit lanes")),
        (
            "concat-lanes-8-16-32-scalar-clamped",
            ("8-bit lanes", "32-bit lanes", "16-bit lanes", ""),
        ),
    ):
        src = emit(graphs[cid][0], cid, t)[f"{c_identifier(cid).lower()}.c"]
        start = src.index("Helium: each input")
        kernel = src[start : src.index("#else /* no MVE", start)]
        got = tuple(m or "" for m in re.findall(r"zero point -?\d+(?:, (.*?))? \*/", kernel))
        assert got == kinds, cid
        assert ("qacc_requantize(" in kernel) == ("" in kinds), cid


@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m7"])
def test_dsp_pool_add_lut_gather_kernels_are_used(target: str, graphs: dict[str, Any]) -> None:
    """On cortex-m4/m7 the max pool takes 4 channels per SSUB8 + SEL (windows inside the image
    unrolled, the clamp likewise), the average pool 4 channels per SXTAB16 pair (the wrap left
    out where no sum reaches 2^(A-1)), the residual add two halfword MACs per element from SXTB16
    lanes (without the wrap where no sum reaches 2^(A-1); a 32-bit container with a multiplier
    beyond int16 keeps the portable kernel), the table lookup 4 values per word and the gather
    unrolled word and byte moves per pixel (the portable kernel under a clamp or past
    DSP_GATHER_MOVES). The rows above check them equal to the reference."""
    t = resolve_target(target)
    for cid, markers in (
        ("maxpool2d-k2s2-odd", ("qacc_dsp_load4(in + xo + c + 50)", "for (c = FULL; c < C")),
        (
            "maxpool2d-c21-k3s2-pad-clamp",
            ("qacc_dsp_min8(v, 0x64646464u)", "(v, 0xCECECECEu); /* LO"),
        ),
        ("avgpool2d_acc16-k3s1-pad1", ("s02 = __sxtab16(s02, (int8x4_t)w);", "no wrap")),
        ("avgpool2d_acc16-c19-zero-point-wrap-acc10", ("Y0 = 1, Y1 = 3,", "wrapped to ACC_BITS")),
        (
            "add_acc16-residual",
            ("__smlatt(b02, M,", "nothing wraps", "y[c + 3] = qacc_requantize32(s3,"),
        ),
        ("add_acc16-mult-beyond-int16-zero-point-wrap", ("0x00039C40u", "qacc_wrap16((uint16_t)")),
    ):
        src = emit(graphs[cid][0], cid, t)[f"{c_identifier(cid).lower()}.c"]
        assert all(m in src for m in markers), (target, cid)
        assert "#else /* no DSP extension" in src, (target, cid)
    src = emit(graphs["add_acc32-wrap-acc32"][0], "w", t)["w.c"]
    assert "__smlabb(" not in src, target  # in_mult 2^24: beyond int16 in a 32-bit container
    for cid, markers in (  # the table lookup: 4 values per word; the gather: unrolled moves
        ("lut-tanh-vector", ("y3 = t[w >> 24];", "FULL = 36")),
        ("gather-split-runs-words-and-bytes", ("qacc_dsp_load4(x + 7)", "y[18] = x[25];")),
        ("gather-channel-shuffle", ("8 runs", "y[7] = x[7];")),
    ):
        src = emit(graphs[cid][0], cid, t)[f"{c_identifier(cid).lower()}.c"]
        assert all(m in src for m in markers), (target, cid)
        assert "#else /* no DSP extension" in src, (target, cid)
    for cid in ("gather-chunk-clamped", "gather-vector-wide"):  # a clamp; 150 moves per pixel
        src = emit(graphs[cid][0], cid, t)[f"{c_identifier(cid).lower()}.c"]
        assert "qacc_dsp_load4(" not in src, (target, cid)


# ----------------------------------------------------------------------------- a quantized network


@pytest.fixture(scope="module")
def quantized_nets() -> dict[int, Any]:
    import codegen
    from tests.nets import Branchy, randomized

    x = np.random.default_rng(0).standard_normal((16, 3, 10, 10)).astype(np.float32)
    return {
        acc: codegen.quantize(randomized(Branchy(), seed=1), x, acc_bits=acc, progress=False,
                              name=f"branchy acc{acc}")
        for acc in (16, 32)
    }  # fmt: skip


@pytest.mark.parametrize("target", CORTEX_M)
@pytest.mark.parametrize("acc", [16, 32])
def test_quantized_network(
    target: str, acc: int, quantized_nets: dict[int, Any], tmp_path: Path
) -> None:
    import codegen

    qm = quantized_nets[acc]
    x = np.random.default_rng(1).standard_normal((3, 3, 10, 10)).astype(np.float32)
    c = codegen.compile(qm, target=target, out_dir=tmp_path / "net")
    assert np.array_equal(c.run_int(x), qm.reference_int(x))


# ----------------------------------------------------------------------------- acc16 vs acc32


def _table_graph(kind: str, acc: int) -> tuple[Graph, np.ndarray]:
    """Layers of the Cortex-M benchmark table (issue 18's shapes) at `acc` bits, with weights
    small enough that no sum reaches 2^15 (what the guaranteed quantizer produces for a 16-bit
    accumulator): the acc16 and acc32 graphs differ only in their accumulator width."""

    b = GraphBuilder(f"table_{kind}_acc{acc}", seed=3, batch=1)
    if kind == "dw_pw":  # depthwise 3x3, 25x5x64, then pointwise 64 -> 64
        x = b.input((25, 5, 64))
        y = b.conv2d(x, 64, (3, 3), padding=(1,) * 4, groups=64, acc_bits=acc, w_bits=5,
                     mult_bits=1, name="depthwise")  # fmt: skip
        b.conv2d(y, 64, (1, 1), acc_bits=acc, w_bits=3, mult_bits=1, name="pointwise")
    elif kind == "conv":  # conv3x3 16x16x16 -> 16
        b.conv2d(b.input((16, 16, 16)), 16, (3, 3), padding=(1,) * 4, acc_bits=acc, w_bits=2,
                 mult_bits=1, name="conv3x3")  # fmt: skip
    else:  # dense 256 -> 64
        b.dense(b.input((256,)), 64, acc_bits=acc, w_bits=2, bias=(-100, 100), mult_bits=1,
                name="dense")  # fmt: skip
    g, x = b.result()
    return g, x


@pytest.mark.parametrize("kind", ["dw_pw", "conv", "dense"])
def test_m55_acc16_no_slower_than_acc32(kind: str, tmp_path: Path) -> None:
    """On cortex-m55 a 16-bit accumulator takes the 32-bit datapath (VMLADAVA, int32 lanes; the
    depthwise kernel sums in int16 lanes) and wraps once at the end, so per layer it executes no
    more instructions than the same layer at 32 bits (counts are deterministic)."""
    import codegen

    counts = {}
    for acc in (16, 32):
        g, x = _table_graph(kind, acc)
        assert not overflowed(g, x)  # the acc16 layers never wrap: the bound is what matters
        c = codegen.compile(g, target="cortex-m55", out_dir=tmp_path / f"acc{acc}", progress=False)
        assert np.array_equal(c.run_int_q(x), reference.run(g, x).output)
        counts[acc] = c.count_instructions(x)["layers"]
    assert counts[16].keys() == counts[32].keys()
    for layer, n16 in counts[16].items():
        assert n16 <= counts[32][layer], (layer, n16, counts[32][layer])
