"""Where qacc's non-Python files are: C templates, the C runtime, CMake toolchain files.

One lookup for both layouts:

- a source checkout (or an editable install): the files are at the top of the repository,
  next to the ``codegen`` package (``templates/``, ``runtime_c/``, ``toolchains/``, ...);
- an installed wheel: ``setup.py`` copies the same trees, with the same relative layout, into the
  package as ``codegen/_data/`` (the toolchain files find ``../runtime_c`` from their own folder,
  so the layout must stay the same).

``data_path("templates")`` is the only way the rest of qacc names these files. Build products of
qacc's own helpers (the QEMU plugin, the benchmark peer) go under ``data_path("build")``: the
repository's ``build/`` in a checkout, ``codegen/_data/build/`` in a virtual environment.

This module imports nothing from qacc or third parties: ``setup.py`` loads it by path to learn
what to ship (``SHIPPED``).
"""

from __future__ import annotations

from pathlib import Path

SHIPPED: tuple[str, ...] = (
    "templates",
    "runtime_c",
    "toolchains",
    "CMakeLists.txt",
    "scripts/build-plugin.sh",
)
"""Paths (relative to the repository root) that the wheel carries under codegen/_data/."""

PACKAGE_DIR = Path(__file__).resolve().parent.parent
"""The ``codegen`` package (this file is ``codegen/core/resources.py``)."""
INSTALLED_DATA = PACKAGE_DIR / "_data"


def data_root() -> Path:
    """The directory that holds ``templates/``, ``runtime_c/``, ``toolchains/``, ..."""
    if INSTALLED_DATA.is_dir():
        return INSTALLED_DATA
    return PACKAGE_DIR.parent


def data_path(*parts: str) -> Path:
    """A file or directory shipped with qacc, e.g. ``data_path("runtime_c", "qacc.h")``."""
    return data_root().joinpath(*parts)
