"""Small random-weight networks shared by the tests (every op of the frontend appears)."""

from __future__ import annotations

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
