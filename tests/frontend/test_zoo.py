"""torchvision's classification zoo as a test of the frontend's coverage.

Every model is torchvision 0.28.0's own definition (tests/zoo.py imports it), built with
num_classes=10 and its own random initialisation (no pretrained weights), BatchNorm running
statistics set from forward passes in train mode on BN_IMAGES random images (cumulative
average), then eval mode. Inputs are 1 x 3 x 64 x 64 images in [0, 1].

- ACCEPTED models go end to end: codegen.quantize (PTQ, 16-bit accumulators, `guaranteed`,
  nearest rounding) -> codegen.compile (host) -> the C output equals qm.reference_int bit for
  bit.
- REFUSED models must fail with that one-line codegen.QaccError. When the frontier moves (a model
  is accepted, or fails differently), this turns red: move the model to ACCEPTED / update it.

HEAVY models are accepted too (bit-exact where measured), but too slow for `make test` (the
project has no marker deselected by default), so they are not run here. Measured once by hand
(one model at a time, one torch thread, 16 calibration images): resnet50 (333.7 M MACs)
quantize 102 s + compile 45 s; densenet121 (232.1 M MACs, of which 0.86 M are its standalone
BatchNorms as depthwise 1x1 convs) quantize 87 s + compile 26 s. Measured the same way on a
loaded machine (2 cores shared with other jobs): shufflenet_v2_x1_0 (11.8 M MACs) quantize 34 s
+ compile 35 s; the squeeze-excitation networks (their gates are `mul` nodes)
mobilenet_v3_large (20.1 M MACs) quantize 54 s + compile 85 s, efficientnet_b0 (32.0 M MACs)
quantize 129 s + compile 81 s, regnet_y_400mf (33.4 M MACs) quantize 113 s + compile 97 s.
vgg11, vgg11_bn and alexnet: at 64 x 64 their features are 2 x 2 (VGG) or 1 x 1 (AlexNet) and
the adaptive pool upsamples to 7 x 7 / 6 x 6 (an `adaptive_avgpool2d`; the dynamo exporter spells
it out as index arithmetic, which the ONNX frontend reads back as the same node); their float
graphs equal torch (max |difference| 1e-7, 2e-6, 9e-9), and their classifiers hold 129 M and 58 M
weights. `scripts/zoo.py --onnx --models NAME` on a loaded machine (2 cores, load ~10):
alexnet (94.1 M MACs) quantize 264 s (its ONNX file 313 s) + compile 1130 s (mostly the C
compiler on the 57 MB of weights); vgg11 (730.6 M MACs) quantize 907 s (its ONNX file 183 s) +
compile 1343 s (129 MB of weights); both C == reference and ONNX == torch. docs/zoo.md has the
table of the other HEAVY models through both frontends.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import codegen
from tests.frontend.test_onnx import export
from tests.zoo import torchvision_models

SIZE = 64
CLASSES = 10
BN_IMAGES = 32
CALIB_IMAGES = 16
TEST_IMAGES = 2

KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
}

# Seconds of each test under `pytest -n 2` on 2 cores (the whole file: about 2 minutes;
# PTQ's default activation clipping doubled the search: resnet18, googlenet and regnet_x_400mf,
# 70-160 s each, moved to HEAVY).
ACCEPTED: dict[str, tuple[str, ...]] = {
    "squeezenet1_1": (),  # 9 s
    "squeezenet1_0": (),  # 9 s
    "mnasnet0_5": ("slow",),  # 16 s
    "shufflenet_v2_x0_5": ("slow",),  # 30 s alone, 141 s on a loaded machine (gather nodes)
    "mobilenet_v2": ("slow",),  # 21 s
    "mobilenet_v3_small": ("slow",),  # 48 s + 21 s for its ONNX export read back (ONNX below)
}
"""name -> pytest marks."""

ONNX: tuple[str, ...] = ("mobilenet_v3_small",)
"""ACCEPTED models also exported with torch.onnx.export (BatchNorm kept as nodes) and read back by
the ONNX frontend: the same integer graph and the same integers."""

REFUSED: dict[str, str] = {
    # the stem's LayerNorm2d (traced through: F.layer_norm on channels-last features)
    "convnext_tiny": "LayerNorm2d (module 'features.0.1': torch.nn.functional.layer_norm) at "
    "node 'layer_norm' is not supported: it normalises each sample by its own mean and variance, "
    "computed at run time (a per-sample mean, variance and reciprocal square root)",
}
"""name -> the substring of the one-line QaccError it is refused with today."""

HEAVY: tuple[str, ...] = (
    *("resnet50", "densenet121", "shufflenet_v2_x1_0", "vgg11", "vgg11_bn", "alexnet"),
    *("mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf"),
    *("resnet18", "googlenet", "regnet_x_400mf"),
)
"""Accepted, too slow for `make test` (figures in the module docstring; bit-exact where
measured)."""


def build(name: str) -> nn.Module:
    """torchvision's `name` with random weights and BatchNorm statistics from calibration."""
    tvm = torchvision_models()
    torch.manual_seed(0)
    model: nn.Module = getattr(tvm, name)(weights=None, num_classes=CLASSES, **KWARGS.get(name, {}))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        images = torch.as_tensor(data(BN_IMAGES, seed=2))
        with torch.no_grad():
            for batch in images.split(16):
                model(batch)
    return model.eval()


def data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)


def conv_linear_macs(model: nn.Module) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers on one image, counted by torch."""
    total = 0

    def count(m: nn.Module, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out.numel() * m.in_channels // m.groups * kh * kw
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_hook(count) for m in layers]
    with torch.no_grad():
        model(torch.as_tensor(data(1, seed=3)))
    for h in hooks:
        h.remove()
    return total


def quantize(name: str, model: nn.Module | Path | None = None) -> codegen.QuantizedModel:
    return codegen.quantize(
        build(name) if model is None else model if isinstance(model, nn.Module) else str(model),
        data(CALIB_IMAGES, seed=0),
        acc_bits=16,
        overflow="guaranteed",
        progress=False,
        name=name,
        rounding="nearest",  # the frontend's coverage is the point, not the weight rounding
    )


def _params(table: dict[str, Any], marks: Callable[[str], tuple[str, ...]]) -> list[Any]:
    return [
        pytest.param(name, marks=[getattr(pytest.mark, m) for m in marks(name)], id=name)
        for name in table
    ]


@pytest.mark.parametrize("name", _params(ACCEPTED, lambda n: ACCEPTED[n]))
def test_zoo_model_is_bit_exact_on_the_host(name: str, tmp_path: Path) -> None:
    model = build(name)
    qm = quantize(name, model)
    assert all(r["bound_fits"] for r in qm.report["layers"] if "bound_fits" in r)
    # no standalone BatchNorm in these: every MAC is a Conv2d's or a Linear's
    assert qm.report["macs"] == conv_linear_macs(model)
    x = data(TEST_IMAGES, seed=1)
    c = codegen.compile(qm, target="host", out_dir=tmp_path / name)
    assert c.report["macs"] == qm.report["macs"]
    want = qm.reference_int(x)
    assert want.shape == (TEST_IMAGES, CLASSES)
    assert len(np.unique(want)) > 3  # not a constant output
    assert np.array_equal(c.run_int(x), want)
    if name in ONNX:  # the same model through torch.onnx.export and the ONNX frontend
        path = export(model, data(1, seed=0), tmp_path / f"{name}.onnx", "torchscript")
        qo = quantize(name, path)
        assert [n.op for n in qo.graph.nodes] == [n.op for n in qm.graph.nodes]
        for a, b in zip(qm.graph.nodes, qo.graph.nodes, strict=True):
            assert a.params.keys() == b.params.keys(), a.name
            assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params), a.name
        assert np.array_equal(qo.reference_int(x), want)


@pytest.mark.parametrize("name", _params(REFUSED, lambda n: ()))
def test_zoo_model_is_refused_in_one_line(name: str) -> None:
    with pytest.raises(codegen.QaccError) as e:
        quantize(name)
    message = str(e.value)
    assert "\n" not in message
    assert REFUSED[name] in message


def test_the_zoo_is_classified_once_and_the_import_workaround_is_undone() -> None:
    register_fake = torch.library.register_fake
    tvm = torchvision_models()
    assert torch.library.register_fake is register_fake
    names = [*ACCEPTED, *REFUSED, *HEAVY]
    assert len(names) == len(set(names)) and set(ONNX) <= set(ACCEPTED)
    assert set(names) <= set(tvm.list_models(module=tvm))
