"""The example's network: a small CNN for 1 x 16 x 16 images and 4 classes.

Its weights come from a fixed seed (no training: the example is about the build, not the
accuracy); replace `make_model` by a function that loads your trained weights.
"""

import torch
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 4),
    ).eval()
