"""The demo network (codegen.data.models.FashionCNN) bit-exact on every target, both
accumulator paths.

Random weights and inputs are enough for bit-exactness; `make demo` checks the trained network on
the host over the 10 000 Fashion-MNIST test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import codegen
from codegen.data import models
from codegen.targets.table import TARGETS

CROSS = [t for t in TARGETS if t != "host"]


@pytest.fixture(scope="module")
def quantized() -> dict[int, codegen.QuantizedModel]:
    torch.manual_seed(0)
    net = models.FashionCNN().eval()
    calib = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
    return {a: codegen.quantize(net, calib, acc_bits=a, progress=False) for a in (16, 32)}


@pytest.mark.qemu
@pytest.mark.parametrize("target", CROSS)
def test_demo_network_bit_exact(
    quantized: dict[int, codegen.QuantizedModel], target: str, tmp_path: Path
) -> None:
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    for acc, qm in quantized.items():
        c = codegen.compile(qm, target=target, out_dir=tmp_path / f"acc{acc}")
        assert np.array_equal(c.run_int(x), qm.reference_int(x)), (target, acc)
        paths = {row["name"]: row.get("path") for row in c.report["layers"]}
        assert paths["features_0"].startswith(f"acc{acc}"), paths  # the report names the path
