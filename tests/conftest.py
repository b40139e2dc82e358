"""Settings for the whole test session."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op torch thread per pytest-xdist worker. `make test` runs one worker per core;
    with torch's default of one thread per core each, the workers oversubscribe the cores and
    torch-heavy tests run several times slower (torchvision's mobilenet_v2 in
    tests/frontend/test_zoo.py: 197 s instead of 17 s under `-n 2` on 2 cores)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
