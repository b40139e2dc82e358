"""Time the NumPy integer reference on the 10 000 Fashion-MNIST test images (issue 2's figure).

A ~22 M-MAC CNN with random weights, quantized for 16-bit accumulators; prints wall and CPU time.
Run: .venv/bin/python scripts/reference-speed.py
"""

import os
import time

import numpy as np
import torch
from torch import nn

import codegen
from codegen.data import datasets

torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * 49, 10),
).eval()  # fmt: skip
x_train, _, x_test, _ = datasets.fashion_mnist()
qm = codegen.quantize(net, x_train[:500], acc_bits=16, progress=False)
xq = qm.quantize_input(x_test)
t0, c0 = time.time(), os.times()
out = codegen.core.reference.run(qm.graph, xq).output
t1, c1 = time.time(), os.times()
mmacs = qm.report["macs"] / 1e6
print(
    f"reference: {len(x_test)} images x {mmacs:.1f} M MACs in {t1 - t0:.1f} s wall "
    f"({c1.user - c0.user:.1f} s user, {c1.system - c0.system:.1f} s sys; load average "
    f"{os.getloadavg()[0]:.1f}); output {out.shape}, checksum {int(np.abs(out).sum())}"
)
