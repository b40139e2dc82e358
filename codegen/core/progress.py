"""Progress bars: one convention for every long step (calibration, search, training, builds, runs).

Bars are tqdm bars on stderr. They show only when the caller asked for progress (the
`progress=True` arguments of the API) *and* stderr is a terminal, so test logs, CI logs and
redirected output stay clean. Two shapes:

    for item in bar(items, "calibration", progress=progress, unit="batch"): ...

    with ticker("cortex-m4 test bench", progress=progress, total=n, poll=count_done):
        subprocess.run(...)   # a blocking call; the bar redraws in the background
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

TICK_SECONDS = 0.5
"""How often `ticker` redraws its bar (and polls its progress function)."""


def enabled(progress: bool = True) -> bool:
    """Whether a bar would show: progress was asked for, stderr is a terminal, and this process
    is rank 0 when torch.distributed is initialised (under torchrun only rank 0 prints)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(progress and isatty is not None and isatty() and _main_rank())


def _main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def bar(
    iterable: Iterable[T] | None = None,
    desc: str = "",
    *,
    progress: bool = True,
    total: float | None = None,
    unit: str = "it",
    leave: bool = False,
    **kwargs: Any,
) -> tqdm[T]:
    """A tqdm bar on stderr, disabled unless `enabled(progress)`; same arguments as tqdm."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        file=sys.stderr,
        disable=not enabled(progress),
        dynamic_ncols=True,
        **kwargs,
    )


@contextmanager
def ticker(
    desc: str,
    *,
    progress: bool = True,
    total: int | None = None,
    unit: str = "it",
    poll: Callable[[], int] | None = None,
    bar_format: str | None = None,
) -> Iterator[tqdm[Any]]:
    """A bar that stays alive around a blocking call (a build, an emulator run).

    A background thread redraws it every TICK_SECONDS (elapsed time keeps moving) and, with
    `poll`, sets its count to poll() (clamped to `total`; errors while polling are ignored: the
    thing polled may not exist yet). When disabled, no thread is started. The bar is also yielded,
    so the caller can update it itself. Without `total` or `poll`, the bar shows the elapsed time
    only (unless `bar_format` says otherwise).
    """
    if bar_format is None and total is None and poll is None:
        bar_format = "{desc}: {elapsed}"
    b: tqdm[Any] = bar(desc=desc, progress=progress, total=total, unit=unit, bar_format=bar_format)
    if b.disable:
        try:
            yield b
        finally:
            b.close()
        return
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(TICK_SECONDS):
            if poll is not None:
                try:
                    n = int(poll())
                except (OSError, ValueError):
                    n = b.n
                b.n = min(n, total) if total is not None else n
            b.refresh()

    thread = threading.Thread(target=tick, name=f"qacc-progress-{desc}", daemon=True)
    thread.start()
    try:
        yield b
    finally:
        stop.set()
        thread.join()
        b.close()


__all__ = ["bar", "enabled", "ticker"]
