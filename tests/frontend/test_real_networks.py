"""Patterns of real networks (torchvision, pre-activation DenseNet/ResNet, MLPerf Tiny), normalised
by the frontends onto the existing ops and kernels, end to end: codegen.quantize (PTQ, 16-bit
guaranteed accumulators) -> codegen.compile -> the C output equals qm.reference_int bit for bit.

- eval-mode identities (Dropout family, F.dropout(training=False), Identity, contiguous(),
  StochasticDepth) removed;
- activations that fuse into nothing (on the input, after a concat or a standalone BatchNorm,
  on a value read twice) as `lut` tables (relu, clamp);
- a BatchNorm that follows no conv as a depthwise 1x1 conv with bias;
- mean over H and W as a global average pool (+ flatten);
- MaxPool ceil_mode (extra bottom/right padding), adaptive pools to sizes dividing the input;
- products (`mul`: squeeze-excitation's per-channel gate, two branches; a `scale` table for a
  constant factor) and a softmax classifier head;
- (N, F) vectors and (N, C, L) sequences (Conv1d, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d,
  BatchNorm1d) as images with H = 1; the API takes and gives the model's own rank;
- a U-Net (nearest upsampling: a max over one-pixel windows; bilinear: `resize_bilinear`, integer
  weights) and ShuffleNetV2's units (chunk and channel shuffle: `gather`; an adaptive pool to a
  size that does not divide the input);
- a convolutional autoencoder (ConvTranspose2d: `zero_insert` and a stride-1 conv2d);
- several outputs (a tuple, a list or a dict of tensors): the API gives a tuple in the model's
  order, the C writes one array per output.

The squeeze-excitation, ShuffleNet and U-Net patterns (tables, products, softmax, gathers,
adaptive pools, nearest and bilinear upsampling) also go through the other methods, adaptive
(learned formats: W4A4 at 12-bit and W8A8 at 16-bit accumulators, guaranteed) and transform,
bit-exact in C.

The ONNX exports of the same patterns are compared with these graphs in test_onnx.py (the CASES of
test_frontend.py); the QEMU tests run six of the networks on cortex-a53 (NEON) and cortex-m55
(MVE).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codegen
from codegen.api import QuantizedModel
from codegen.core.errors import InvalidDataError
from codegen.quant.ptq import tensor_classes
from tests.frontend.test_frontend import ShuffleUnit, StochasticDepth, _bn, channel_shuffle
from tests.targets.test_codegen_qemu import _require


class EvalIdentities(nn.Module):
    """torchvision-style blocks with everything that is the identity in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.drop2d = nn.Dropout2d(0.2)
        self.alpha = nn.AlphaDropout(0.1)
        self.ident = nn.Identity()
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.sd = StochasticDepth(0.2, "row")
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.drop2d(self.stem(x)))
        x = x + self.sd(self.alpha(self.block(x)))
        x = F.dropout(self.ident(x), 0.3, training=self.training).contiguous()
        return self.head(x.mean((2, 3)))


class ActivationsAnywhere(nn.Module):
    """ReLU6 on the input, ReLU after a concat, a clamp after a table, ReLU on a shared value."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(x)  # ReLU6 on the input: a table
        y = F.relu(torch.cat([self.a(x), x], dim=1))  # after a concat: a table
        z = torch.tanh(self.b(y)).clamp(min=-0.5)  # a clamp after a table fuses into it
        w = self.c(z)
        return F.relu(w) + w  # w is read twice: the ReLU is a table


class PreActDense(nn.Module):
    """Pre-activation DenseNet/ResNet: BN -> ReLU -> conv, standalone BNs, concat, ceil_mode max
    pool, adaptive pools, mean(keepdim) + flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = _bn(3)
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = _bn(6)
        self.c1 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn2 = _bn(10)
        self.c2 = nn.Conv2d(10, 8, 1)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.apool = nn.AdaptiveAvgPool2d((3, 3))
        self.mpool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c0(F.relu(self.bn0(x)))  # BN on the input: a depthwise 1x1 (+ fused ReLU)
        y = torch.cat([x, self.c1(F.relu(self.bn1(x)))], dim=1)  # a dense block
        y = self.c2(F.relu(self.bn2(y)))  # the transition
        y = self.pool(y)  # 12 x 12 -> 6 x 6 (ceil; 5 x 5 without)
        a = torch.mean(self.apool(y), dim=(2, 3), keepdim=True).flatten(1)
        m = self.mpool(y).flatten(1)
        return self.fc(torch.cat([a, m], dim=1))


class SqueezeExcitation(nn.Module):
    """MobileNetV3 / EfficientNet blocks: squeeze-excitation (a per-channel gate from the pooled
    features times the features, `mul`), a product of two branches, a scaled residual (a
    `scale` table) and a softmax classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se1 = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1),
            nn.Hardsigmoid(),
        )  # fmt: skip
        self.se2 = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 2, 1), nn.SiLU(), nn.Conv2d(2, 8, 1),
            nn.Sigmoid(),
        )  # fmt: skip
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.stem(x))
        y = F.hardswish(self.dw(x))
        y = self.se1(y) * y  # the gate first, as torchvision writes it
        x = x + 0.5 * y
        z = F.silu(self.a(x)) * torch.tanh(self.b(x))
        z = z.mul(self.se2(z))
        return F.softmax(self.head(z.mean((2, 3))), dim=1)


class UNet(nn.Module):
    """A small U-Net: encoder (conv, max pool), decoder (x2 upsampling: nearest as a module,
    bilinear as F.interpolate), skip concatenations, a per-pixel head."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU())
        self.e2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(12, 12, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.d1 = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1), nn.ReLU())
        self.d2 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(a)
        d = self.d1(torch.cat((self.up(self.mid(b)), b), 1))
        up = F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(self.d2(torch.cat((up, a), 1)))


class ShuffleNetUnit(nn.Module):
    """ShuffleNetV2's units: stride 2 (two branches, cat, shuffle), stride 1 (chunk, one
    branch, cat, shuffle), an adaptive pool that upsamples (VGG/AlexNet at small sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.Conv2d(8, 8, 1))
        self.right = nn.Sequential(
            nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1, groups=8)
        )
        self.unit = ShuffleUnit(16)
        self.pool = nn.AdaptiveAvgPool2d((5, 3))
        self.fc = nn.Linear(16 * 15, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = channel_shuffle(torch.cat((self.left(x), self.right(x)), 1), 2)
        return self.fc(torch.flatten(self.pool(self.unit(x)), 1))


def fc_autoencoder(features: int = 640) -> nn.Module:
    """MLPerf Tiny's anomaly-detection autoencoder, narrowed: Linear/BatchNorm1d/ReLU on (N, F)."""
    layers: list[nn.Module] = []
    widths = [features, 128, 8, 128]
    for i, o in itertools.pairwise(widths):
        layers += [nn.Linear(i, o), _bn(o, 1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, features))


def conv1d_classifier() -> nn.Module:
    """A keyword-spotting-like 1-D CNN on (N, C, L)."""
    return nn.Sequential(
        _bn(6, 1),  # standalone: a depthwise 1x1 conv
        nn.Conv1d(6, 12, 5, stride=2, padding=2),
        _bn(12, 1),
        nn.ReLU(),
        nn.MaxPool1d(3, stride=2, ceil_mode=True),
        nn.Conv1d(12, 12, 3, padding=1, groups=12),
        nn.ReLU(),
        nn.AvgPool1d(2),
        nn.Conv1d(12, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(16, 4),
    )


def conv1d_sequence_out() -> nn.Module:
    """A sequence in, a sequence out (N, C, L): the API's outputs keep the rank."""
    return nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1),
        nn.ReLU(),
        _bn(8, 1),  # after the ReLU: standalone
        nn.ReLU6(),  # fuses into the BN's conv
        nn.Conv1d(8, 5, 3, padding=1),
        nn.MaxPool1d(2),
    )


def conv_autoencoder() -> nn.Module:
    """A convolutional autoencoder on 16x16 images: stride-2 Conv2d down, ConvTranspose2d up
    (zeros inserted between the pixels, then a stride-1 conv with the flipped kernel)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),  # 16 -> 8
        _bn(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),  # 8 -> 4
        nn.ReLU(),
        nn.ConvTranspose2d(12, 8, 3, stride=2, padding=1, output_padding=1),  # 4 -> 8
        _bn(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 1, 2, stride=2),  # 8 -> 16
    )


class TwoHeads(nn.Module):
    """Several outputs: a shared trunk, a classifier head (a vector) and a second head that is an
    intermediate feature map the trunk reads on (it must survive the later layers' arena reuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.relu(self.stem(x))
        y = F.relu(self.body(features)) + features
        return self.fc(y.mean((2, 3))), features


NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "eval_identities": (EvalIdentities, (3, 8, 8)),
    "activations_anywhere": (ActivationsAnywhere, (3, 8, 8)),
    "preact_dense": (PreActDense, (3, 12, 12)),
    "fc_autoencoder": (fc_autoencoder, (640,)),
    "conv1d_classifier": (conv1d_classifier, (6, 49)),
    "conv1d_sequence_out": (conv1d_sequence_out, (4, 20)),
    "squeeze_excitation": (SqueezeExcitation, (3, 12, 12)),
    "unet": (UNet, (3, 8, 8)),
    "shufflenet_unit": (ShuffleNetUnit, (3, 8, 8)),
    "conv_autoencoder": (conv_autoencoder, (1, 16, 16)),
    "two_heads": (TwoHeads, (3, 8, 8)),
}


def outputs(value: Any) -> tuple[Any, ...]:
    """A model's output(s) as a tuple: the API gives a tuple for several outputs, else one."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def same_outputs(got: Any, want: Any) -> bool:
    """Every output equal, bit for bit (one array, or a tuple of them)."""
    a, b = outputs(got), outputs(want)
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def _build(key: str) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    make, shape = NETWORKS[key]
    torch.manual_seed(0)
    model = make().eval()
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((32, *shape)).astype(np.float32)
    x = rng.standard_normal((6, *shape)).astype(np.float32)
    return model, calib, x


def _quantize(key: str) -> tuple[nn.Module, QuantizedModel, np.ndarray]:
    model, calib, x = _build(key)
    qm = codegen.quantize(  # nearest: the frontend and the C are the point, and it is fastest
        model, calib, acc_bits=16, overflow="guaranteed", progress=False, name=key,
        rounding="nearest",
    )  # fmt: skip
    return model, qm, x


@pytest.mark.parametrize("key", list(NETWORKS))
def test_network_is_bit_exact_on_the_host(key: str, tmp_path: Path) -> None:
    model, qm, x = _quantize(key)
    with torch.no_grad():
        want_float = tuple(y.numpy() for y in outputs(model(torch.as_tensor(x))))
    # the API speaks the model's own rank: floats like torch, ints in the C's memory order (a
    # tuple in the model's order for several outputs, like the model's own)
    assert len(qm.graph.outputs) == len(want_float)
    ref, flt = outputs(qm.reference(x)), outputs(qm.float_output(x))
    assert [v.shape for v in ref] == [v.shape for v in flt] == [v.shape for v in want_float]
    for got_float, wf in zip(flt, want_float, strict=True):
        np.testing.assert_allclose(got_float, wf, rtol=1e-4, atol=1e-4)
    assert qm.quantize_input(x).ndim == x.ndim
    want = outputs(qm.reference_int(x))
    assert [v.ndim for v in want] == [v.ndim for v in want_float]
    assert same_outputs(qm.dequantize_output(qm.reference_int(x)), qm.reference(x))
    assert all(r["bound_fits"] for r in qm.report["layers"] if "bound_fits" in r)
    c = codegen.compile(qm, target="host", out_dir=tmp_path / key)
    assert same_outputs(c.run_int(x), want)
    one = c.run_int_q(qm.quantize_input(x[:1])[0])  # one sample
    assert same_outputs(one, tuple(v[0] for v in want))
    assert all(len(np.unique(v)) > 3 for v in want)  # not a constant output


def test_sequence_layouts() -> None:
    """(N, C, L) floats in and out, (N, L, C) ints: the IR's (N, 1, L, C) images without H."""
    _, qm, x = _quantize("conv1d_sequence_out")
    g = qm.graph
    assert g.tensors[g.input].shape == (1, 20, 4) and g.input in g.sequences
    assert g.tensors[g.output].shape == (1, 10, 5) and g.output in g.sequences
    xq = qm.quantize_input(x)
    assert xq.shape == (6, 20, 4)
    fmt = g.tensors[g.input].fmt
    assert fmt is not None
    manual = np.clip(np.floor(x.transpose(0, 2, 1) / fmt.scale + 0.5), fmt.qmin, fmt.qmax)
    assert np.array_equal(xq, manual)
    y = qm.reference_int(x)
    assert y.shape == (6, 10, 5)
    assert np.array_equal(qm.dequantize_output(y), qm.reference(x))
    assert qm.reference(x).shape == (6, 5, 10)
    with pytest.raises(InvalidDataError, match=r"the model takes N x 4 x 20"):
        qm.reference_int(x[:, :, None, :])


class DictHeads(nn.Module):
    """A dict of outputs (taken in key order), one of them twice, one read on by the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = F.relu(self.conv(x))
        return {"features": f, "logits": self.fc(f.mean((2, 3))), "again": f}


def test_dict_and_repeated_outputs() -> None:
    torch.manual_seed(0)
    model = DictHeads().eval()
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((16, 3, 6, 6)).astype(np.float32)
    x = calib[:3]
    qm = codegen.quantize(model, calib, progress=False)
    assert qm.graph.outputs == ("conv", "fc", "conv")
    with torch.no_grad():
        want = tuple(v.numpy() for v in model(torch.as_tensor(x)).values())
    got = qm.reference(x)
    assert isinstance(got, tuple) and [v.shape for v in got] == [v.shape for v in want]
    ints = qm.reference_int(x)
    assert np.array_equal(ints[0], ints[2]) and ints[1].shape == (3, 3)
    with pytest.raises(InvalidDataError, match=r"takes a tuple of 3 arrays, one per output"):
        qm.dequantize_output(ints[0])


def test_calibration_of_the_wrong_rank_is_one_line() -> None:
    with pytest.raises(InvalidDataError, match=r"N x C x H x W \(images\), N x C x L"):
        codegen.quantize(fc_autoencoder(), np.zeros((4, 1, 1, 1, 640), np.float32))


@pytest.mark.qemu
@pytest.mark.parametrize("target", ["cortex-a53", "cortex-m55"])
@pytest.mark.parametrize(
    "key",
    [
        *("preact_dense", "conv1d_classifier", "activations_anywhere"),
        *("preact_dense", "conv1d_classifier", "squeeze_excitation"),
        *("unet", "conv_autoencoder", "two_heads"),
    ],
)
def test_network_is_bit_exact_under_qemu(key: str, target: str, tmp_path: Path) -> None:
    """The new lowerings (tables for lone activations, depthwise 1x1 for standalone BatchNorm,
    padded ceil_mode max pools, adaptive pools, 1-D ops as H = 1 images, products and softmax,
    transposed convolutions) on the NEON and MVE dialects."""
    _require(target)
    _, qm, x = _quantize(key)
    c = codegen.compile(qm, target=target, out_dir=tmp_path / target)
    assert same_outputs(c.run_int(x), qm.reference_int(x))


METHODS: dict[str, dict[str, object]] = {
    "adaptive W4A4 acc12 dyadic": {"method": "adaptive", "acc_bits": 12, "scale": "dyadic"},
    "adaptive W8A8 acc16 pow2": {
        "method": "adaptive",
        "acc_bits": 16,
        "w_bits": 8,
        "a_bits": 8,
        "scale": "pow2",
    },
    "transform": {"method": "transform", "acc_bits": 16, "transform": "elt"},
}
NEW_OPS = {
    "squeeze_excitation": {"lut", "mul", "softmax"},
    "shufflenet_unit": {"gather", "adaptive_avgpool2d"},
    "unet": {"adaptive_maxpool2d", "resize_bilinear"},  # nearest and bilinear upsampling
}


@functools.cache
def _other_method(key: str, how: str) -> tuple[QuantizedModel, np.ndarray]:
    """The network (a U-Net with a classifier head: the training loss is a classifier's) under
    method `how`, trained for one epoch on its 32 calibration samples."""
    model, calib, x = _build(key)
    if key == "unet":
        model = nn.Sequential(model, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with torch.no_grad():
        classes = model(torch.as_tensor(calib[:1])).shape[1]
    y = np.random.default_rng(2).integers(0, classes, len(calib))
    opts = dict(METHODS[how])
    qm = codegen.quantize(model, calib, train=(calib, y), epochs=1, progress=False, name=key,
                          **opts)  # type: ignore[arg-type]  # fmt: skip
    return qm, x


@pytest.mark.parametrize(
    ("key", "how"),
    [
        ("squeeze_excitation", "adaptive W4A4 acc12 dyadic"),
        ("shufflenet_unit", "adaptive W8A8 acc16 pow2"),
        ("unet", "adaptive W4A4 acc12 dyadic"),
        *((key, "transform") for key in NEW_OPS),
    ],
)
def test_other_methods_quantize_the_new_ops_bit_exact(key: str, how: str, tmp_path: Path) -> None:
    """Adaptive (learned formats with zero points, dyadic or power-of-two scales) and transform
    build the new ops as PTQ does; the C equals the integer reference."""
    qm, x = _other_method(key, how)
    g = qm.graph
    assert NEW_OPS[key] <= {n.op for n in g.nodes}
    if METHODS[how]["method"] == "adaptive":
        opts = METHODS[how]
        classes = tensor_classes(g)
        hidden = [v.fmt for t, v in g.tensors.items() if classes.find(t) != classes.find(g.output)]
        assert {f.bits for f in hidden if f is not None} == {opts.get("a_bits", 4)}
        assert {f.is_pow2 for f in hidden if f is not None} == {opts["scale"] == "pow2"}
        # the fake-quant network the training ran predicts as the integer graph does
        assert qm.report["adaptive"]["fake_vs_integer_agreement_calib"] >= 0.95
        sim, ref = qm.simulate(x), qm.reference(x)
        assert np.mean(sim.argmax(1) == ref.argmax(1)) >= 0.8
    want = qm.reference_int(x)
    assert len(np.unique(want)) > 1
    c = codegen.compile(qm, target="host", out_dir=tmp_path / key)
    assert np.array_equal(c.run_int(x), want)


def test_adaptive_w4a4_squeeze_excitation_is_guaranteed() -> None:
    """SiLU/Sigmoid/Hardswish tables, products and a softmax between 4-bit layers at a 12-bit
    accumulator: every channel's exact bound fits, and no input overflows."""
    qm, x = _other_method("squeeze_excitation", "adaptive W4A4 acc12 dyadic")
    g = qm.graph
    weighted = [r for r in qm.report["layers"] if "bound_fits" in r]
    assert weighted and all(r["bound_fits"] and r["acc_bits"] == 12 for r in weighted)
    assert all(r["fits"] for r in qm.report["adaptive"]["constraint"].values())
    assert qm.report["adaptive"]["bound_fixups"] == 0
    for n in g.nodes:
        if n.op in ("conv2d", "dense"):
            assert np.abs(n.params["weight"]).max() <= 7  # INT4
    test = np.concatenate([x, 3 * np.random.default_rng(5).standard_normal(x.shape)])
    res = qm.run_reference(test.astype(np.float32))
    assert all(v.events == 0 for v in res.overflow.values())
    # the product and table formats are the learned ones: a softmax divides into 2^-frac
    soft = next(n for n in g.nodes if n.op == "softmax")
    assert g.tensors[soft.output].fmt.is_pow2  # type: ignore[union-attr]
    for n in g.nodes:
        if n.op == "mul":  # one requantization realising s_a * s_b / s_out
            fa, fb, fo = (g.tensors[t].fmt for t in (*n.inputs, n.output))
            assert fa is not None and fb is not None and fo is not None and n.requant is not None
            realised = float(n.requant.mult[0]) * 2.0 ** -float(n.requant.shift[0])
            assert realised == pytest.approx(fa.scale * fb.scale / fo.scale, rel=2**-14)


def test_training_a_per_pixel_output_is_refused_in_one_line() -> None:
    model, calib, _ = _build("unet")
    y = np.zeros(len(calib), dtype=np.int64)
    with pytest.raises(codegen.QaccError) as e:
        codegen.quantize(model, calib, method="adaptive", train=(calib, y), progress=False)
    assert "not N x classes" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["adaptive", "transform"])
def test_other_methods_quantize_transposed_convolutions(method: str) -> None:
    """`zero_insert` keeps its input's format (its zeros are that format's zero point, 8 under
    `adaptive` here) under the methods that train: the float64 simulation of their formats
    equals the integer reference exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1),
        nn.Flatten(),
        nn.Linear(3 * 8 * 8, 3),
    ).eval()
    x = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 32)
    qm = codegen.quantize(
        model, x, method=method, train=(x, y), epochs=1, acc_bits=32, progress=False, name="ct"
    )
    g = qm.graph
    conv, zeros = g.nodes[:2]
    assert zeros.op == "zero_insert" and g.nodes[2].op == "conv2d"
    fmt = g.tensors[zeros.output].fmt
    assert fmt == g.tensors[conv.output].fmt and fmt is not None and zeros.requant is not None
    assert zeros.requant.zero_point == fmt.zero_point
    assert g.nodes[2].attrs.get("input_zero_point", 0) == fmt.zero_point
    assert np.array_equal(qm.simulate(x), qm.reference(x))
