"""Small CNNs used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


class FashionCNN(nn.Module):
    """The demo network: three conv layers and a classifier, about 2 M MACs at 28x28x1."""

    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(1, w),
            nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w * 49, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResDWNet(nn.Module):
    """A network with a residual add, depthwise-separable layers and global average pooling."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn(1, w), nn.MaxPool2d(2))
        self.dw = nn.Sequential(*_conv_bn(w, w, groups=w))
        self.pw = nn.Sequential(nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w))
        self.down = nn.Sequential(*_conv_bn(w, 2 * w, stride=2))
        self.dw2 = nn.Sequential(*_conv_bn(2 * w, 2 * w, groups=2 * w))
        self.pw2 = nn.Sequential(*_conv_bn(2 * w, 4 * w, k=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.pw(self.dw(x)))
        x = self.down(x)
        x = self.pw2(self.dw2(x))
        return self.head(x)


class FashionDSCNN(nn.Module):
    """Depthwise-separable CNN for narrow accumulators: every layer sums few terms (K <= 128).

    The accumulator bound of a channel grows with its number of terms K, so at 12 bits a 3x3
    conv over 32 channels (K = 288) must keep most of its 4-bit weights at zero, while a
    depthwise 3x3 (K = 9) or a pointwise over 64 channels is hardly constrained. Global average
    pooling keeps the classifier at K = 128 instead of a flattened 3136.
    """

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        w = width

        def separable(cin: int, cout: int) -> list[nn.Module]:
            return [*_conv_bn(cin, cin, groups=cin), *_conv_bn(cin, cout, k=1)]

        self.features = nn.Sequential(
            *_conv_bn(1, w),
            *separable(w, 2 * w),
            nn.MaxPool2d(2),
            *separable(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *separable(2 * w, 4 * w),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ZOO = {"fashion_cnn": FashionCNN, "fashion_ds": FashionDSCNN, "resdw": ResDWNet}
