"""All-or-nothing output directories: write to a sibling temporary directory, rename at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from codegen.core.errors import QaccError


@contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh directory next to `out`; on success it becomes `out`, on failure it vanishes.

    An existing `out` is refused unless `force`, checked before any work starts.
    """
    if out.exists() and not force:
        raise QaccError(f"output directory '{out}' exists; choose another --out or pass --force")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise QaccError(f"the parent directory of '{out}' does not exist; create it first")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".qacc-tmp", dir=parent))
    work = staging / out.name
    try:
        yield work
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        work.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
