"""The networks `qacc bench` counts: the demo CNN, TinyML shapes, and one 3x3 conv layer.

Random weights are enough for instruction counts (the generated kernels do not branch on values).
BatchNorm running statistics are set from the calibration data itself (one pass in training mode
with a cumulative average), so every folded layer sees normalised activations, as after training.

- ``resnet8``: MLPerf Tiny image classification, CIFAR-10 ResNet with 16/32/64 filters (3 stages,
  one residual block each, 1x1 stride-2 projection shortcuts), 32x32x3, 10 classes.
- ``ds_cnn``: MLPerf Tiny keyword spotting DS-CNN (small): 49x10x1 MFCCs, conv 10x4 stride 2 with
  64 filters, four depthwise-separable blocks, average pool, 12 classes.
- ``mobilenet_v1``: MobileNetV1 alpha 0.25 at 96x96x3 (MLPerf Tiny visual wake words), 2 classes.
- ``allcnn_c``: All-CNN-C (Springenberg et al. 2015), 32x32x3: 96/192 channels, stride-2 convs
  instead of pools, 1x1 convs, global average pool; 10 classes.
- ``conv3x3``: a single 3x3 conv, 32x32x32 -> 32, padding 1 (9.44 M MACs).
- ``demo``: the demo network (codegen.data.models.FashionCNN), 28x28x1.

Single layers (``LAYERS``, selected with ``--networks layers`` or by name, not part of ``all``): the
layer shapes of the Cortex-M comparison with CMSIS-NN (conv3x3 16x16x16->16 and the 32-channel
``conv3x3`` above, depthwise 3x3 and pointwise 1x1 on DS-CNN's 25x5x64, dense 256->64, 2x2 max and
average pooling on 32x32x16, global average pooling on 8x8x64, a residual add and an element-wise
mul on 16x16x32, a softmax over the 32 channels of 8x8 pixels, the channel concat of two 1x1
conv branches on 16x16x32, a grouped 3x3 conv 16x16x32->32 with 4 groups (ResNeXt / RegNet
blocks) and a depthwise 3x3 with channel multiplier 2 on 25x5x32->64).

TensorFlow's 'same' padding with stride 2 pads one pixel more at the bottom/right than at the
top/left; it is written here as nn.ZeroPad2d before a conv with padding 0, as Keras does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from codegen.data import models


def _same_s2(k: int) -> tuple[int, int, int, int]:
    """ZeroPad2d (left, right, top, bottom) of TF 'same' padding, stride 2, even input."""
    total = max(k - 2, 0)
    return (total // 2, total - total // 2, total // 2, total - total // 2)


def conv_bn(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """Conv (TF 'same' padding) + BatchNorm + activation."""
    layers: list[nn.Module] = []
    if stride == 1:
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
    else:
        layers.append(nn.ZeroPad2d(_same_s2(k)))
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=0, groups=groups, bias=False)
    layers += [conv, nn.BatchNorm2d(cout), act()]
    return nn.Sequential(*layers)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride)
        self.b = nn.Sequential(
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        )
        self.short: nn.Module
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.short = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(self.a(x)) + self.short(x))


class ResNet8(nn.Module):
    """MLPerf Tiny ResNet-8 for CIFAR-10 (32x32x3)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.s1 = _ResBlock(16, 16, 1)
        self.s2 = _ResBlock(16, 32, 2)
        self.s3 = _ResBlock(32, 64, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.s3(self.s2(self.s1(self.stem(x)))))


class DSCNN(nn.Module):
    """MLPerf Tiny DS-CNN (small) for keyword spotting: 49x10x1 MFCCs, 12 classes."""

    def __init__(self, classes: int = 12, filters: int = 64):
        super().__init__()
        f = filters
        # 'same' with stride 2: out 25x5; TF pads H by 4 (top) + 5 (bottom), W by 1 + 1.
        self.stem = nn.Sequential(
            nn.ZeroPad2d((1, 1, 4, 5)),
            nn.Conv2d(1, f, (10, 4), stride=2, bias=False),
            nn.BatchNorm2d(f),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        for _ in range(4):
            blocks += [conv_bn(f, f, 3, groups=f), conv_bn(f, f, 1)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AvgPool2d((25, 5)), nn.Flatten(), nn.Linear(f, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class MobileNetV1(nn.Module):
    """MobileNetV1 (alpha 0.25) at 96x96x3, as in MLPerf Tiny visual wake words (2 classes)."""

    # (output channels at alpha 1, stride) of the 13 depthwise-separable blocks
    BLOCKS = (
        (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
        (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
    )  # fmt: skip

    def __init__(self, classes: int = 2, alpha: float = 0.25):
        super().__init__()
        c = int(32 * alpha)
        layers: list[nn.Module] = [conv_bn(3, c, 3, 2, act=nn.ReLU6)]
        for out, stride in self.BLOCKS:
            o = int(out * alpha)
            layers += [
                conv_bn(c, c, 3, stride, groups=c, act=nn.ReLU6),
                conv_bn(c, o, 1, act=nn.ReLU6),
            ]
            c = o
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class AllCNNC(nn.Module):
    """All-CNN-C for CIFAR-10 (32x32x3); BatchNorm after each conv (folded away)."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def c(cin: int, cout: int, k: int, stride: int = 1, pad: int = 1) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            *c(3, 96, 3), *c(96, 96, 3), *c(96, 96, 3, 2),
            *c(96, 192, 3), *c(192, 192, 3), *c(192, 192, 3, 2),
            *c(192, 192, 3, pad=0), *c(192, 192, 1, pad=0), *c(192, classes, 1, pad=0),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SingleConv(nn.Module):
    """One 3x3 conv layer, 32 -> 32 channels, padding 1 (with BatchNorm + ReLU folded in)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.conv = conv_bn(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        return y


class MaxPool(nn.Module):
    """A 2x2 stride-2 max pool (one layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.max_pool2d(x, 2)


class AvgPool(nn.Module):
    """A 2x2 stride-2 average pool (one layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 2)


class GlobalAvgPool(nn.Module):
    """A global average pool (one layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 1)


class Residual(nn.Module):
    """A 1x1 conv and the residual add of its input (the add is the layer of interest)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


class Branches(nn.Module):
    """Two 1x1 conv branches and the channel concat of their outputs (the concat is the layer of
    interest)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.a = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.b = nn.Conv2d(channels, channels // 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)


class Product(nn.Module):
    """A 1x1 conv and the element-wise product with its input (the mul is the layer of
    interest)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * x


class Softmax(nn.Module):
    """A softmax over the channels of every pixel (one layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=1)


class Dense(nn.Module):
    """One fully connected layer on a flattened 256-vector."""

    def __init__(self, cin: int = 256, cout: int = 64):
        super().__init__()
        self.fc = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.fc(torch.flatten(x, 1))
        return y


@dataclass(frozen=True)
class BenchNet:
    """A benchmark network: constructor, input shape (C, H, W) and a one-line description."""

    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    description: str


NETWORKS: dict[str, BenchNet] = {
    n.name: n
    for n in (
        BenchNet("conv3x3", SingleConv, (32, 32, 32), "single 3x3 conv 32x32x32->32, pad 1"),
        BenchNet("demo", models.FashionCNN, (1, 28, 28), "demo CNN (Fashion-MNIST), 28x28x1"),
        BenchNet("resnet8", ResNet8, (3, 32, 32), "MLPerf Tiny ResNet-8, 32x32x3"),
        BenchNet("ds_cnn", DSCNN, (1, 49, 10), "MLPerf Tiny DS-CNN small (KWS), 49x10x1"),
        BenchNet("mobilenet_v1", MobileNetV1, (3, 96, 96), "MobileNetV1-0.25 (VWW), 96x96x3"),
        BenchNet("allcnn_c", AllCNNC, (3, 32, 32), "All-CNN-C, 32x32x3"),
    )
}


LAYERS: dict[str, BenchNet] = {
    n.name: n
    for n in (
        BenchNet(
            "conv3x3_16", lambda: SingleConv(16), (16, 16, 16), "3x3 conv 16x16x16->16, pad 1"
        ),
        BenchNet(
            "dw3x3", lambda: conv_bn(64, 64, 3, groups=64), (64, 25, 5), "depthwise 3x3, 25x5x64"
        ),
        BenchNet("pw1x1", lambda: conv_bn(64, 64, 1), (64, 25, 5), "pointwise 1x1, 25x5x64->64"),
        BenchNet("dense256", Dense, (256, 1, 1), "dense 256->64"),
        BenchNet("maxpool", MaxPool, (16, 32, 32), "max pool 2x2 stride 2, 32x32x16"),
        BenchNet("avgpool", AvgPool, (16, 32, 32), "average pool 2x2 stride 2, 32x32x16"),
        BenchNet("gap", GlobalAvgPool, (64, 8, 8), "global average pool, 8x8x64"),
        BenchNet("add", Residual, (32, 16, 16), "1x1 conv + residual add, 16x16x32"),
        BenchNet("mul", Product, (32, 16, 16), "1x1 conv + element-wise mul, 16x16x32"),
        BenchNet("softmax", Softmax, (32, 8, 8), "softmax over 32 channels, 8x8 pixels"),
        BenchNet("concat", Branches, (32, 16, 16), "two 1x1 convs + channel concat, 16x16x32"),
        BenchNet(
            "gconv3x3",
            lambda: conv_bn(32, 32, 3, groups=4),
            (32, 16, 16),
            "grouped 3x3 conv 16x16x32->32, 4 groups, pad 1",
        ),
        BenchNet(
            "dw3x3_m2",
            lambda: conv_bn(32, 64, 3, groups=32),
            (32, 25, 5),
            "depthwise 3x3, channel multiplier 2, 25x5x32->64",
        ),
    )
}
"""Single layers, compared with CMSIS-NN on Cortex-M; "layers" names them all with conv3x3."""

LAYER_GROUP = ("conv3x3_16", "conv3x3", *(n for n in LAYERS if n != "conv3x3_16"))


def get(name: str) -> BenchNet:
    """A network of NETWORKS or a single layer of LAYERS."""
    return NETWORKS[name] if name in NETWORKS else LAYERS[name]


def calibration_data(net: BenchNet, samples: int = 16, seed: int = 0) -> np.ndarray:
    """Random calibration images in [0, 1], N x C x H x W float32."""
    rng = np.random.default_rng(seed)
    return rng.random((samples, *net.input_shape), dtype=np.float32)


def build(name: str, calib: np.ndarray, seed: int = 0) -> nn.Module:
    """The network `name` with seeded random weights and BatchNorm statistics taken from `calib`;
    returned in eval mode."""
    net = get(name)
    torch.manual_seed(seed)
    model = net.make()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the pass below
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(calib))
    return model.eval()


__all__ = [
    "DSCNN",
    "LAYERS",
    "LAYER_GROUP",
    "NETWORKS",
    "AllCNNC",
    "BenchNet",
    "MobileNetV1",
    "ResNet8",
    "SingleConv",
    "build",
    "calibration_data",
    "conv_bn",
    "get",
]
