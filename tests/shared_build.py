"""Build something once per test session and share it with every pytest-xdist worker.

The kernel-table tests link many generated models into one build per target (one CMake project,
one link); the first worker to need a target builds it under a lock file and writes a JSON
summary, the others read that summary.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

Summary = dict[str, str]
"""case id -> what the tests need (a test bench command line), or "ERROR <why>"."""


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared_dir(factory: pytest.TempPathFactory) -> Path:
    """A directory every xdist worker of this session sees (the workers' common parent)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(base: Path, key: str, build: Callable[[Path], Summary]) -> Summary:
    """`build(root)` into base/key the first time any worker asks, its summary ever after."""
    root = base / key
    done = root / "results.json"
    with locked(base / f"{key}.lock"):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            summary = build(root)
            root.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(summary))
    result: Summary = json.loads(done.read_text())
    return result
