"""Accumulator-aware QAT (adaptive W4A4) under torchrun: one process per GPU, or per CPU core.

    torchrun --standalone --nproc-per-node 2 examples/distributed/qat.py --out out/qat
    torchrun --standalone --nproc-per-node 8 examples/distributed/qat.py --device cuda ...

qacc sees that torch.distributed is initialised: training runs through DistributedDataParallel
on data sharded by a DistributedSampler, every rank ends with the same integer graph, and only
rank 0 prints. This script also writes only on rank 0 (the compiled C and its check); with
--save-params every rank saves its integer graph's parameters (to compare the ranks).
See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import codegen


class Tiny(nn.Module):
    """A small CNN for 8x8 digits: conv, conv, global average pool, dense."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


def data(name: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training images, labels, and test images (the same on every rank)."""
    from codegen.data import datasets

    xtr, ytr, xte, _ = datasets.digits() if name == "digits" else datasets.fashion_mnist()
    return xtr[:n], ytr[:n], xte[:256]


def model(name: str, checkpoint: Path | None) -> nn.Module:
    """The float network (seeded: the same on every rank), with a trained state_dict if given."""
    torch.manual_seed(0)
    if name == "tiny":
        net: nn.Module = Tiny()
    else:
        from codegen.data import models

        net = models.FashionDSCNN()
    if checkpoint is not None:
        net.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return net.eval()


def graph_arrays(qm: codegen.QuantizedModel) -> dict[str, np.ndarray]:
    """The integer graph as named arrays (to compare ranks, or runs, bit for bit): every node's
    parameters, requantization and float weight steps, every tensor's format."""
    arrays: dict[str, np.ndarray] = {}
    for n in qm.graph.nodes:
        for k, v in n.params.items():
            arrays[f"{n.name}.{k}"] = np.asarray(v)
        if n.requant is not None:
            arrays[f"{n.name}.mult"] = np.asarray(n.requant.mult)
            arrays[f"{n.name}.shift"] = np.asarray(n.requant.shift)
        if "weight_scale" in n.attrs:
            arrays[f"{n.name}.weight_scale"] = np.asarray(n.attrs["weight_scale"])
    for t, v in qm.graph.tensors.items():
        if v.fmt is not None:
            arrays[f"{t}.format"] = np.array([v.fmt.bits, v.fmt.frac, v.fmt.zero_point])
            arrays[f"{t}.format_scale"] = np.array(v.fmt.scale, dtype=np.float64)
    return arrays


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "dscnn"], default="dscnn")
    ap.add_argument("--data", choices=["digits", "fashion"], default="fashion")
    ap.add_argument("--images", type=int, default=10_000, help="training images")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--acc-bits", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", type=Path, help="the float network's trained state_dict")
    ap.add_argument("--dataset", action="store_true", help="pass a torch Dataset, not arrays")
    ap.add_argument("--out", type=Path, help="rank 0 compiles here and checks the C")
    ap.add_argument("--save-params", type=Path, help="every rank saves <path>.rank<r>.npz")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    distributed = "RANK" in os.environ  # started by torchrun
    if distributed:
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if distributed else 0

    x, y, x_test = data(args.data, args.images)
    train = TensorDataset(torch.as_tensor(x), torch.as_tensor(y)) if args.dataset else (x, y)
    start = time.perf_counter()
    qm = codegen.quantize(
        model(args.model, args.checkpoint),
        x[:1000],  # calibration: the same samples on every rank here (they could be shards)
        acc_bits=args.acc_bits,
        method="adaptive",
        w_bits=4,
        a_bits=4,
        train=train,
        epochs=args.epochs,
        device=args.device,  # progress bars and log lines: qacc shows them on rank 0 only
    )
    seconds = time.perf_counter() - start
    if args.save_params is not None:
        path = args.save_params.with_name(f"{args.save_params.name}.rank{rank}.npz")
        np.savez(path, **graph_arrays(qm))
    if rank == 0:
        summary = {
            "world_size": dist.get_world_size() if distributed else 1,
            "quantize_seconds": round(seconds, 2),
            "history": qm.report["adaptive"]["history"],
        }
        if args.out is not None:
            c = codegen.compile(qm, target="host", out_dir=args.out)
            exact = bool(np.array_equal(c.run_int(x_test), qm.reference_int(x_test)))
            summary["c_bit_exact"] = exact
        print(json.dumps(summary))
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
