"""Wheel build: ship the C templates, C runtime, toolchain files and plugin source inside `codegen`.

Everything else is declared in pyproject.toml. The list of shipped paths lives in
codegen/core/resources.py (``SHIPPED``), which also finds them again at run time; it is loaded
here by path so that building needs none of qacc's dependencies.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _shipped() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location(
        "_qacc_resources", HERE / "codegen/core/resources.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.SHIPPED)


class BuildPyWithData(build_py):
    """build_py, then copy the shipped trees to <build_lib>/codegen/_data (not for editable
    installs: those read the files in the checkout)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "codegen" / "_data"
        shutil.rmtree(dest, ignore_errors=True)  # nothing stale from an earlier build
        for rel in _shipped():
            src = HERE / rel
            out = dest / rel
            if src.is_dir():
                shutil.copytree(
                    src,
                    out,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "*.so"),
                )
            elif src.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)
            else:
                raise FileNotFoundError(f"qacc packaging: {src} is missing")


setup(cmdclass={"build_py": BuildPyWithData})
