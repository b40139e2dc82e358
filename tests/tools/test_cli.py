"""The qacc command line as a user runs it: in a subprocess, with real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MODEL_PY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 16, 5),
    ).eval()

def not_a_module():
    return 42

def broken():
    raise RuntimeError("checkpoint missing")

class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.a, self.b = nn.Linear(6 * 64, 5), nn.Linear(6 * 64, 3)

    def forward(self, x):
        h = self.body(x)
        return self.a(h), self.b(h)

def two():
    torch.manual_seed(0)
    return Two().eval()

def sequence():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(6, 4, 3),
    ).eval()
"""


def qacc(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does: a fresh interpreter, in `cwd`, with extra environment."""
    full = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "codegen.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=full,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "net.py").write_text(MODEL_PY)
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.random((48, 1, 8, 8), dtype=np.float32))
    np.save(d / "labels.npy", rng.integers(0, 5, 48))
    np.save(d / "x.npy", rng.random((20, 1, 8, 8), dtype=np.float32))
    return d


def test_compile_then_verify(work: Path) -> None:
    r = qacc(
        "compile",
        "net.py:make",
        "--calib",
        "calib.npy",
        "--labels",
        "labels.npy",
        "--acc-bits",
        "14",
        "--out",
        "out",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr
    out = work / "out"
    assert (out / "libsequential.a").is_file() and (out / "sequential.h").is_file()
    assert not list(work.glob(".out.*"))  # no staging directory left behind
    v = qacc("verify", "out", "--inputs", "x.npy", cwd=work)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "20 bit-exact, 0 differ" in v.stdout
    again = qacc("compile", "net.py:make", "--calib", "calib.npy", "--out", "out", cwd=work)
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr
    forced = qacc(
        "compile",
        "net.py:make",
        "--calib",
        "calib.npy",
        "--out",
        "out",
        "--force",
        "--overflow",
        "profiled",
        cwd=work,
    )
    assert forced.returncode == 0, forced.stderr


@pytest.mark.slow
def test_compile_then_verify_a_sequence_model(work: Path) -> None:
    """(N, C, L) inputs: verify feeds the test bench the IR's (N, 1, L, C) and compares the C's
    output with reference_int's (N, L, C)."""
    rng = np.random.default_rng(1)
    np.save(work / "calib1d.npy", rng.random((32, 2, 16), dtype=np.float32))
    np.save(work / "x1d.npy", rng.random((10, 2, 16), dtype=np.float32))
    r = qacc("compile", "net.py:sequence", "--calib", "calib1d.npy", "--out", "out1d", cwd=work)
    assert r.returncode == 0, r.stderr
    v = qacc("verify", "out1d", "--inputs", "x1d.npy", cwd=work)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "10 bit-exact, 0 differ" in v.stdout


def _adaptive_compile_and_verify(work: Path, model: str, labels: str, out: str) -> None:
    """Train W4A4 at a 12-bit accumulator for one epoch, compile, verify bit-exact."""
    r = qacc(
        "compile", model, "--calib", "calib.npy", "--method", "adaptive", "--acc-bits", "12",
        "--train-data", "calib.npy", "--train-labels", labels, "--train-epochs", "1",
        "--out", out, cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = (work / out / "report.json").read_text()
    assert '"method": "adaptive"' in report and '"adaptive"' in report
    v = qacc("verify", out, "--inputs", "x.npy", cwd=work)
    assert v.returncode == 0 and "20 bit-exact, 0 differ" in v.stdout, v.stdout + v.stderr


def test_compile_adaptive_then_verify(work: Path) -> None:
    """--method adaptive: trained W4A4 at a 12-bit accumulator, packed weights, bit-exact."""
    _adaptive_compile_and_verify(work, "net.py:make", "labels.npy", "out-adaptive")
    half = qacc(
        "compile", "net.py:make", "--calib", "calib.npy", "--method", "adaptive",
        "--train-data", "calib.npy", "--out", "out-x", cwd=work,
    )  # fmt: skip
    assert half.returncode == 2 and "--train-labels" in half.stderr
    assert len(half.stderr.strip().splitlines()) == 1
    # two outputs: one labels file per output, 'none' for one trained by distillation only
    _adaptive_compile_and_verify(work, "net.py:two", "labels.npy,none", "out-two")
    alone = qacc(
        "compile", "net.py:make", "--calib", "calib.npy", "--method", "adaptive",
        "--train-data", "calib.npy", "--train-labels", "none", "--out", "out-y", cwd=work,
    )  # fmt: skip
    assert alone.returncode == 2 and alone.stderr.strip().splitlines() == [
        "qacc: error: --train-labels 'none' is for one output of several; give a .npy"
    ]


@pytest.mark.slow
def test_compile_transform_then_verify(work: Path) -> None:
    """--method transform at 2 bits per weight, factored deployment, bit-exact."""
    r = qacc(
        "compile", "net.py:make", "--calib", "calib.npy", "--method", "transform",
        "--bits-per-weight", "2", "--transform-deploy", "factored", "--out", "out-transform",
        cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = (work / "out-transform" / "report.json").read_text()
    assert '"weight_bits_per_param"' in report
    v = qacc("verify", "out-transform", "--inputs", "x.npy", cwd=work)
    assert v.returncode == 0 and "20 bit-exact, 0 differ" in v.stdout, v.stdout + v.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.py:make"], "model file 'missing.py' does not exist"),
        (["net.py:nope"], "'net.py' has no callable 'nope'"),
        (["net.py:not_a_module"], "returned int, not a torch.nn.Module"),
        (
            ["net.py:broken"],
            "calling broken() in 'net.py' failed: RuntimeError: checkpoint missing",
        ),
        (["net.py"], "MODEL must be path/to/file.py:callable"),
        (["net.py:make", "--target", "pdp11"], "pdp11"),
        (["net.py:make", "--acc-bits", "40"], "outside 8..32"),
        (["net.py:make", "--labels", "calib.npy"], "labels"),
    ],
)
def test_compile_errors_are_one_line(work: Path, args: list[str], message: str) -> None:
    r = qacc("compile", *args[:1], "--calib", "calib.npy", *args[1:], "--out", "bad", cwd=work)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("qacc: error: ") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert not (work / "bad").exists() and not list(work.glob(".bad.*"))


def test_bad_calibration_file(work: Path) -> None:
    np.save(work / "ints.npy", np.zeros((4, 1, 8, 8), dtype=np.int32))
    (work / "text.npy").write_text("not numpy")
    for f, msg in (
        ("ints.npy", "float32"),
        ("text.npy", "not a .npy"),
        ("none.npy", "does not exist"),
    ):
        r = qacc("compile", "net.py:make", "--calib", f, "--out", "bad", cwd=work)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_help_and_version(work: Path) -> None:
    r = qacc("--version", cwd=work)
    assert r.returncode == 0 and r.stdout.startswith("qacc ")
    h = qacc("compile", "--help", cwd=work)
    assert h.returncode == 0
    for opt in ("--calib", "--labels", "--acc-bits", "--overflow", "--target", "--out", "--force"):
        assert opt in h.stdout
    assert "(default: 16)" in h.stdout and "(default: guaranteed)" in h.stdout


def test_internal_errors_are_one_line_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug in qacc itself: one line, exit 1; QACC_DEBUG=1 shows the traceback."""
    from codegen import cli
    from codegen.tools import demo

    def boom(*args: object) -> int:
        raise KeyError("scratch_elems")

    monkeypatch.setattr(demo, "main", boom)
    monkeypatch.delenv("QACC_DEBUG", raising=False)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qacc: internal error: KeyError")
    monkeypatch.setenv("QACC_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["demo"])
