"""Generated C on Cortex-M (QEMU) == the NumPy integer reference, exactly.

Every case of the host kernel table (tests/test_codegen_host.py) is emitted in the target's
dialect — DSP (SMLAD) kernels on cortex-m4/m7, Helium (MVE) kernels on cortex-m55, the portable C
for kernels without a dialect version — into one CMake project per target, built once, and each
test bench runs under qemu-system-arm through files. A small network quantized with
codegen.quantize at 16- and 32-bit accumulators is compiled for each target and compared with the
model's integer reference. No tolerances anywhere; a missing toolchain or emulator fails (naming
the Debian package), it never skips.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from codegen import reference
from codegen.build import BuildResult, ToolMissingError, build_many, resolve_target
from codegen.compiled import run_testbench
from codegen.emit import c_identifier, emit, write_files
from codegen.ir import Graph
from tests.test_codegen_host import CASE_IDS, CASES

CORTEX_M = ("cortex-m4", "cortex-m7", "cortex-m55")
DIALECT_MARKERS = {"dsp": "__smlad(", "mve": "vmladavaq_s8("}
"""A call that only the dialect's own kernels contain (proof that they were used)."""

pytestmark = pytest.mark.qemu


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _shared_dir(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_cases(target: str, root: Path) -> dict[str, str]:
    """Emit every case for `target` into one CMake project and build it once.

    case id -> test bench path, or "ERROR <log>" for a case whose build failed."""
    t = resolve_target(target)
    dirs: dict[str, Path] = {}
    summary: dict[str, str] = {}
    for c in CASES:
        try:
            g, _ = c.build()
        except Exception as e:  # a broken case fails its own test, not the others
            summary[c.id] = f"ERROR building the graph: {e!r}"
            continue
        d = root / "models" / c_identifier(c.id)
        write_files(emit(g, c.id, dialect=t.dialect, align=t.align, target=t.name), d)
        dirs[c.id] = d
    results = build_many(list(dirs.values()), root / "build", t, testbench=True)
    for cid, r in zip(dirs, results.values(), strict=True):
        summary[cid] = str(r.testbench) if isinstance(r, BuildResult) else f"ERROR {r}"
    return summary


@pytest.fixture(scope="session")
def cortexm_builds(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, str]]:
    """target -> (case id -> test bench): each target is built once per session, on first use,
    and shared by the pytest-xdist workers through a lock file (workers build targets in
    parallel when their first tests are on different targets)."""
    base = _shared_dir(tmp_path_factory)
    cache: dict[str, dict[str, str]] = {}

    def get(target: str) -> dict[str, str]:
        if target not in cache:
            root = base / f"qacc-cortexm-{target}"
            done = root / "results.json"
            with _locked(base / f"qacc-cortexm-{target}.lock"):
                if not done.exists():
                    shutil.rmtree(root, ignore_errors=True)
                    try:
                        summary = build_cases(target, root)
                    except ToolMissingError as e:
                        summary = {cid: f"ERROR {e}" for cid in CASE_IDS}
                    root.mkdir(parents=True, exist_ok=True)
                    done.write_text(json.dumps(summary))
            cache[target] = json.loads(done.read_text())
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
    got = run_testbench(tb, x, g.tensors[g.input].shape, g.tensors[g.output].shape, t.argv)
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
        files = emit(g, cid, dialect=t.dialect, target=t.name)
        src = files[f"{c_identifier(cid).lower()}.c"]
        if t.dialect == "mve" and "_acc16" in cid:
            assert "vmullbq_int_s8(" in src, cid
        else:
            assert marker in src, cid
        assert "#else /* no " in src, cid  # the portable fallback is kept


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
