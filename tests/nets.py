"""Small random-weight networks shared by the tests (every op of the frontend appears)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Branchy(nn.Module):
    """conv+BN+ReLU, depthwise, residual add, concat, avgpool, maxpool, global pool, linear."""

    def __init__(self, cin: int = 3, w: int = 6, classes: int = 5):
        super().__init__()
        self.c1 = nn.Conv2d(cin, w, 3, padding=1)
        self.b1 = nn.BatchNorm2d(w)
        self.dw = nn.Conv2d(w, w, 3, padding=1, groups=w)
        self.pw = nn.Conv2d(w, w, 1)
        self.side = nn.Conv2d(w, 3, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(w + 3, 7, 3, padding="same")
        self.ap = nn.AvgPool2d(3, stride=1, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(y + self.pw(torch.relu(self.dw(y))))
        y = torch.cat([self.pool(y), torch.relu(self.side(y))], dim=1)
        y = self.ap(torch.relu(self.c2(y)))
        return self.fc(torch.flatten(self.gap(y), 1))


class Plain(nn.Module):
    def __init__(self, cin: int = 1, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 16, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


class DigitsCNN(nn.Module):
    """conv+BN+ReLU, conv+ReLU, max pool, linear: the scikit-learn digits (1x8x8, 10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = self.pool(torch.relu(self.c2(x)))
        return self.fc(x.flatten(1))


def trained_digits_cnn() -> tuple[nn.Module, tuple[Any, ...]]:
    """DigitsCNN trained 6 epochs on the digits (seeded), and the digits' (x_train, y_train,
    x_test, y_test)."""
    from codegen.data import datasets
    from codegen.quant import training

    data = datasets.digits()
    torch.manual_seed(0)
    net = DigitsCNN()
    training.fit(net, data[0], data[1], epochs=6, lr=5e-3, progress=False)
    return net, data
