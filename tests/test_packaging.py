"""`pip install .` (a real wheel, not editable) works from any directory.

The wheel is built from a copy of the checkout (so the test never writes into the shared tree)
and installed into a fresh virtual environment in tmp_path. To avoid reinstalling torch, that
environment sees the project's .venv site-packages through a plain .pth line; the .pth files of
.venv are not processed there, so .venv's editable finder for `codegen` is not active and the
tests check that `codegen` really comes from the new environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from codegen.core.resources import SHIPPED

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

MODEL_PY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 16, 3),
    ).eval()
"""

# Files the wheel must carry (codegen/_data/<path>): one of each kind qacc reads at run time.
REQUIRED_IN_WHEEL = (
    "CMakeLists.txt",
    "templates/model.c.j2",
    "templates/model.h.j2",
    "templates/testbench.c.j2",
    "templates/CMakeLists.txt.j2",
    "templates/kernels/c/conv2d.c.j2",
    "templates/kernels/neon/conv2d.c.j2",
    "templates/kernels/dsp/conv2d.c.j2",
    "templates/kernels/mve/conv2d.c.j2",
    "runtime_c/qacc.h",
    "runtime_c/cortexm/startup.c",
    "runtime_c/cortexm/cortexm-sections.ld",
    "runtime_c/cortexm/mps2-an386.ld",
    "runtime_c/cortexm/qacc_cycles.c",
    "runtime_c/qemu_plugin/insn_count.c",
    "runtime_c/peers/xnnpack_conv.c",
    "runtime_c/peers/cmsis_nn_layers.c",
    "toolchains/cortex-m.cmake",
    "toolchains/aarch64-linux.cmake",
    "toolchains/armhf-linux.cmake",
    "scripts/build-plugin.sh",
)


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "out", ".*cache", ".hypothesis", "*.egg-info", "__pycache__"
        ),
    )
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        cwd=tmp,
    )
    (whl,) = (tmp / "dist").glob("qacc-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel installed; returns its bin/ directory."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=env_dir.parent)
    py = env_dir / "bin" / "python"
    out = _run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], cwd=env_dir)
    site = Path(out.strip())
    # The dependencies (torch, numpy, ...) from the project's environment, after the new site dir.
    (site / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        cwd=env_dir.parent,
    )
    return env_dir / "bin"


def test_wheel_ships_templates_runtime_toolchains_and_plugin_source(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in REQUIRED_IN_WHEEL if f"codegen/_data/{p}" not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    # the vendored CMSIS-NN (a benchmark peer; `qacc bench --cmsis-nn DIR`) stays in the checkout
    assert not any(n.startswith("codegen/_data/third_party/") for n in names)
    # every file of every shipped tree, not only the ones named above
    for rel in SHIPPED:
        path = REPO / rel
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            assert f"codegen/_data/{f.relative_to(REPO).as_posix()}" in names, f


def test_installed_qacc_compiles_and_verifies_from_any_directory(
    venv: Path, tmp_path: Path
) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv}{os.pathsep}{env['PATH']}"
    env["PYTHONWARNINGS"] = "ignore"

    where = _run([str(venv / "python"), "-c", "import codegen; print(codegen.__file__)"], work, env)
    assert Path(where.strip()).is_relative_to(venv.parent), f"codegen imported from {where}"
    data = _run(
        [
            str(venv / "python"),
            "-c",
            "from codegen.core.resources import data_root; print(data_root())",
        ],
        work,
        env,
    )
    assert Path(data.strip()).is_relative_to(venv.parent), data

    qacc = str(venv / "qacc")
    assert _run([qacc, "--version"], work, env).strip() == "qacc 0.1.0"
    assert "compile" in _run([qacc, "--help"], work, env)

    (work / "net.py").write_text(MODEL_PY)
    rng = np.random.default_rng(1)
    np.save(work / "calib.npy", rng.random((32, 1, 8, 8), dtype=np.float32))
    np.save(work / "x.npy", rng.random((8, 1, 8, 8), dtype=np.float32))
    out = _run(
        [
            qacc,
            "compile",
            "net.py:make",
            "--calib",
            "calib.npy",
            "--target",
            "host",
            "--out",
            "out",
        ],
        work,
        env,
    )
    assert "libsequential.a" in out
    assert (work / "out" / "libsequential.a").is_file()
    assert (work / "out" / "qacc.h").read_text() == (REPO / "runtime_c" / "qacc.h").read_text()
    verified = _run([qacc, "verify", "out", "--inputs", "x.npy"], work, env)
    assert "8 bit-exact, 0 differ" in verified
