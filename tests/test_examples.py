"""examples/cortex-m4-firmware: built from a fresh `qacc compile` output and run under QEMU.

The steps are the ones of the example's README: make_data.py, `qacc compile --target cortex-m4
--name net`, embed_input.py, CMake with qacc's cortex-m toolchain file, `cmake --build --target
run` (qemu-system-arm through the toolchain's CMAKE_CROSSCOMPILING_EMULATOR). The printed logits
must be the NumPy reference's for that input, bit for bit, and the printed class its argmax.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codegen.core.resources import data_path
from codegen.targets.build import resolve_target

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cortex-m4-firmware"
pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _run(argv: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_cortex_m4_firmware_example_prints_the_reference_class(tmp_path: Path) -> None:
    resolve_target("cortex-m4").check()  # a missing toolchain or QEMU fails naming the package
    cmake = shutil.which("cmake")
    assert cmake, "cmake is not installed: apt-get install cmake (or run make setup)"
    src = tmp_path / "example"
    shutil.copytree(EXAMPLE, src)  # as a user would: a copy of the example, built in place
    build = src / "build"
    py = sys.executable

    _run([py, "make_data.py", "build"], src)
    _run(
        [
            py,
            "-m",
            "codegen.cli",
            "compile",
            "net.py:make_model",
            "--calib",
            "build/calib.npy",
            "--acc-bits",
            "16",
            "--target",
            "cortex-m4",
            "--name",
            "net",
            "--out",
            "build/net",
        ],
        src,
    )
    _run([py, "embed_input.py", "build/net", "build/sample.npy", "build/sample_input.h"], src)
    _run(
        [
            cmake,
            "-S",
            ".",
            "-B",
            "build/fw",
            f"-DCMAKE_TOOLCHAIN_FILE={data_path('toolchains', 'cortex-m.cmake')}",
            "-DQACC_CPU=cortex-m4",
            "-DQACC_MODEL_DIR=build/net",
            "-DQACC_SAMPLE_HEADER=build/sample_input.h",
        ],
        src,
    )
    _run([cmake, "--build", "build/fw"], src)
    assert (build / "fw" / "firmware").is_file()
    out = _run([cmake, "--build", "build/fw", "--target", "run"], src)

    with open(build / "net" / "model.qacc", "rb") as f:
        qm = pickle.load(f)["qm"]
    want = qm.reference_int(np.load(build / "sample.npy")).reshape(-1)
    logits = re.search(r"^logits:((?: -?\d+)+)$", out, re.M)
    cls = re.search(r"^class: (\d+)$", out, re.M)
    assert logits and cls, out
    assert [int(v) for v in logits.group(1).split()] == want.tolist()
    assert int(cls.group(1)) == int(np.argmax(want))
