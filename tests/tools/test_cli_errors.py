"""Bad input to `qacc compile` / `qacc verify`, as a user meets it: in a subprocess.

Each error must be one line `qacc: error: ...` on stderr saying what is wrong and what to do, exit
code 2, no traceback, and no output directory (nor staging directory) left behind. Missing tools are
simulated with a PATH that hides them; a hanging emulator with a fake `qemu-aarch64` that sleeps
and a short $QACC_EMULATOR_TIMEOUT. Also: two compiles in different directories, with different
hash seeds, write byte-identical sources and report.json.
(tests/tools/test_cli.py covers the model-file, target-name, labels and --force errors.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from codegen.targets.table import get_target
from tests.tools.test_cli import qacc

MODEL_PY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5),
    ).eval()

def elu():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ELU()).eval()

def nan_weight():
    m = make()
    with torch.no_grad():
        m[0].weight[1, 0, 0, 0] = float("nan")
    return m

def inf_bias():
    m = make()
    with torch.no_grad():
        m[4].bias[2] = float("inf")
    return m

def wide():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2048, 4)).eval()
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli_errors")
    (d / "net.py").write_text(MODEL_PY)
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.random((16, 1, 8, 8), dtype=np.float32))
    np.save(d / "x.npy", rng.random((3, 1, 8, 8), dtype=np.float32))
    np.save(d / "wide.npy", rng.random((8, 2048, 1, 1), dtype=np.float32))
    np.save(d / "calib3d.npy", rng.random((16, 8, 8), dtype=np.float32))
    np.save(d / "channels3.npy", rng.random((16, 3, 8, 8), dtype=np.float32))
    np.save(d / "small.npy", rng.random((16, 1, 5, 5), dtype=np.float32))
    np.save(d / "empty.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    for name, bad in (("nan", np.nan), ("inf", -np.inf)):
        x = rng.random((16, 1, 8, 8), dtype=np.float32)
        x[5, 0, 3, 4] = bad
        np.save(d / f"{name}.npy", x)
    np.save(d / "float_labels.npy", rng.random(16))
    return d


def assert_user_error(r: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, the error is the one `qacc: error:` line, last on stderr; no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    # tqdm progress bars (carriage returns) may precede the error on stderr
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("qacc: error: "), r.stderr
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    return lines[-1]


def assert_nothing_left(work: Path, out: str = "bad") -> None:
    assert not (work / out).exists()
    assert not list(work.glob(f".{out}.*")), "a staging directory was left behind"


@pytest.mark.parametrize(
    ("model", "calib", "extra", "fragments"),
    [
        pytest.param(
            "elu", "calib.npy", [], ["unsupported op ELU", "node '", "supported:"],
            id="unsupported-op",
        ),
        pytest.param(
            "nan_weight", "calib.npy", [], ["tensor '0.weight'", "NaN or Inf", "checkpoint"],
            id="nan-weight",
        ),
        pytest.param(
            "inf_bias", "calib.npy", [], ["tensor '4.bias'", "NaN or Inf"], id="inf-bias"
        ),
        pytest.param(
            "wide", "wide.npy", ["--acc-bits", "8"],
            ["layer '", "8-bit accumulator", "smallest width that fits is", "--acc-bits"],
            id="infeasible-acc-width",
        ),
        pytest.param(
            "make", "calib3d.npy", [], ["inputs of shape N x 8 x 8", "trained on"], id="calib-3d"
        ),
        pytest.param(
            "make", "channels3.npy", [], ["inputs of shape N x 3 x 8 x 8", "trained on"],
            id="calib-channels",
        ),
        pytest.param(
            "make", "small.npy", [], ["inputs of shape N x 1 x 5 x 5"], id="calib-spatial-size"
        ),
        pytest.param("make", "empty.npy", [], ["empty", "at least one sample"], id="calib-empty"),
        pytest.param("make", "nan.npy", [], ["NaN or Inf"], id="calib-nan"),
        pytest.param("make", "inf.npy", [], ["NaN or Inf"], id="calib-inf"),
        pytest.param(
            "make", "calib.npy", ["--labels", "float_labels.npy"], ["labels must be integers"],
            id="labels-float",
        ),
    ],
)  # fmt: skip
def test_compile_error(
    work: Path, model: str, calib: str, extra: list[str], fragments: list[str]
) -> None:
    r = qacc("compile", f"net.py:{model}", "--calib", calib, *extra, "--out", "bad", cwd=work)
    assert_user_error(r, *fragments)
    assert_nothing_left(work)


# ----------------------------------------------------------------------------- missing tools

HOST_TOOLS = ("cmake", "cc", "gcc", "ninja", "ar", "ld", "as")


def _tool_bin(tmp: Path, tools: list[str], packages: dict[str, str]) -> Path:
    """A directory of symlinks to the real `tools` (a PATH that has nothing else)."""
    b = tmp / "bin"
    b.mkdir(exist_ok=True)
    for t in tools:
        real = shutil.which(t)
        if real is None:
            if t in packages:
                pytest.fail(f"{t} is not installed: apt-get install {packages[t]}")
            continue  # optional host tools (ninja)
        (b / t).symlink_to(real)
    return b


@pytest.mark.parametrize(
    ("target", "hide"),
    [
        ("cortex-a53", "compiler"),
        ("cortex-a53", "emulator"),
        ("cortex-m4", "emulator"),
    ],
)
def test_missing_tool_names_the_package(work: Path, tmp_path: Path, target: str, hide: str) -> None:
    t = get_target(target)
    tools = {
        t.compiler: t.compiler_package,
        t.nm: t.nm_package,
        **({t.emulator: t.emulator_package} if t.emulator and t.emulator_package else {}),
    }
    hidden = t.compiler if hide == "compiler" else t.emulator
    assert hidden is not None
    package = tools.pop(hidden)
    b = _tool_bin(tmp_path, [*HOST_TOOLS, *tools], {"cmake": "cmake", **tools})
    r = qacc("compile", "net.py:make", "--calib", "calib.npy", "--target", target, "--out", "bad",
             cwd=work, env={"PATH": str(b)})  # fmt: skip
    assert_user_error(r, target, hidden, f"apt-get install {package}")
    assert_nothing_left(work)


@pytest.fixture(scope="module")
def a53_out(work: Path) -> Path:
    """A model compiled for cortex-a53 (real cross compiler)."""
    t = get_target("cortex-a53")
    for tool, pkg in ((t.compiler, t.compiler_package), ("cmake", "cmake")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: apt-get install {pkg}")
    r = qacc("compile", "net.py:make", "--calib", "calib.npy", "--target", "cortex-a53",
             "--out", "a53", cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return work / "a53"


@pytest.mark.qemu
def test_hanging_emulator_is_killed_with_a_clear_message(
    work: Path, a53_out: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    q = fake / "qemu-aarch64"
    q.write_text("#!/bin/sh\nexec sleep 600\n")
    q.chmod(0o755)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "QACC_EMULATOR_TIMEOUT": "3"}
    t0 = time.monotonic()
    r = qacc("verify", "a53", "--inputs", "x.npy", cwd=work, env=env)
    assert time.monotonic() - t0 < 60
    assert_user_error(r, "qemu-aarch64", "within 3 s", "killed", "QACC_EMULATOR_TIMEOUT")
    bad = qacc("verify", "a53", "--inputs", "x.npy", cwd=work,
               env={**env, "QACC_EMULATOR_TIMEOUT": "soon"})  # fmt: skip
    assert_user_error(bad, "QACC_EMULATOR_TIMEOUT='soon'", "positive number of seconds")


@pytest.mark.qemu
def test_verify_without_the_emulator_names_the_package(
    work: Path, a53_out: Path, tmp_path: Path
) -> None:
    t = get_target("cortex-a53")
    b = _tool_bin(tmp_path, [*HOST_TOOLS, t.compiler, t.nm], {t.compiler: t.compiler_package})
    r = qacc("verify", "a53", "--inputs", "x.npy", cwd=work, env={"PATH": str(b)})
    assert_user_error(r, "qemu-aarch64", "apt-get install qemu-user")
    ok = qacc("verify", "a53", "--inputs", "x.npy", cwd=work)  # the real emulator: bit-exact
    assert ok.returncode == 0 and "3 bit-exact, 0 differ" in ok.stdout, ok.stdout + ok.stderr


# ----------------------------------------------------------------------------- determinism


def test_compile_is_byte_identical_across_processes(work: Path, tmp_path: Path) -> None:
    """Same inputs, different working directories and hash seeds: identical generated files."""
    runs = []
    for i, seed in enumerate(("1", "2")):
        d = tmp_path / (f"run{i}" + "/nested" * i)
        d.mkdir(parents=True)
        for f in ("net.py", "calib.npy"):
            shutil.copy(work / f, d / f)
        r = qacc("compile", "net.py:make", "--calib", "calib.npy", "--acc-bits", "12",
                 "--out", "out", cwd=d, env={"PYTHONHASHSEED": seed})  # fmt: skip
        assert r.returncode == 0, r.stderr
        runs.append(d / "out")

    def sources(out: Path) -> dict[str, bytes]:
        return {
            p.name: p.read_bytes()
            for p in out.iterdir()
            if p.is_file() and p.suffix in (".c", ".h", ".json", ".txt")
        }

    a, b = sources(runs[0]), sources(runs[1])
    assert {"sequential.c", "sequential.h", "CMakeLists.txt", "report.json"} <= set(a)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs between runs"
        for d in (tmp_path, work):
            assert str(d).encode() not in a[name], f"{name} holds an absolute path"


def test_api_run_timeout_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_testbench kills a run past $QACC_EMULATOR_TIMEOUT and raises RunTimeoutError."""
    from codegen.core.errors import QaccError
    from codegen.targets.compiled import RunTimeoutError, run_testbench, run_timeout

    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 600\n")
    hang.chmod(0o755)
    monkeypatch.setenv("QACC_EMULATOR_TIMEOUT", "0.5")
    assert run_timeout() == 0.5
    t0 = time.monotonic()
    with pytest.raises(RunTimeoutError, match=r"within 0\.5 s .*QACC_EMULATOR_TIMEOUT"):
        run_testbench(hang, np.zeros((1, 4), dtype=np.int64), (4,), (4,))
    assert time.monotonic() - t0 < 30
    assert issubclass(RunTimeoutError, QaccError)
    monkeypatch.setenv("QACC_EMULATOR_TIMEOUT", "-3")
    with pytest.raises(QaccError, match="positive number of seconds"):
        run_timeout()
    monkeypatch.delenv("QACC_EMULATOR_TIMEOUT")
    assert run_timeout() == 600.0
