"""The test bench's timing mode, what a user runs on a real board (`--bench N`)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import codegen
from codegen.targets.build import resolve_target
from tests.nets import Plain, randomized


@pytest.fixture(scope="module")
def qm():  # type: ignore[no-untyped-def]
    calib = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    return codegen.quantize(randomized(Plain(), 0), calib, acc_bits=16, progress=False)


@pytest.mark.parametrize(
    ("target", "unit"),
    [
        ("host", r"(cycles \(perf_event cycle counter\)|ns \(clock_gettime)"),
        pytest.param("cortex-a53", r"(cycles|ns) \(", marks=pytest.mark.qemu),
        pytest.param("cortex-m4", r"cycles \(DWT cycle counter absent", marks=pytest.mark.qemu),
    ],
)
def test_bench_mode_prints_time_per_inference(qm, tmp_path: Path, target: str, unit: str) -> None:  # type: ignore[no-untyped-def]
    c = codegen.compile(qm, target=target, out_dir=tmp_path / "m")
    assert c.testbench is not None
    sample = tmp_path / "x.bin"
    sample.write_bytes(
        qm.quantize_input(np.zeros((1, 1, 8, 8), np.float32)).astype(np.int8).tobytes()
    )
    args = ["--bench", "7", str(sample)]
    launcher = getattr(resolve_target(target), "launcher", None)
    argv = launcher(str(c.testbench), args) if launcher else [str(c.testbench), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{c.name}: 7 inferences, ")
    assert re.search(r"inferences, \d+ " + unit, r.stdout), r.stdout
