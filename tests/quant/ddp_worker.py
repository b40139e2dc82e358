"""One rank of the multi-process tests (tests/quant/test_distributed.py): run with torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 ddp_worker.py MODE OUT

MODE "qat": adaptive W4A4 QAT at 12 bits of a tiny CNN on 1024 8x8 digits, global batch 128
(every rank the same calibration set, the training set sharded by qacc). Every rank saves its
integer graph's parameters and its trained float parameters to OUT/rank<r>.npz; rank 0
compiles the graph for the host and writes OUT/result.json (C == reference, bit for bit).
MODE "ptq": PTQ at 12 bits; rank r calibrates on its contiguous share of 600 images (with
labels) and saves the integer graph to OUT/rank<r>.npz.
MODE "transform": ELT at 2 bits per weight, retrained one epoch; saves like "ptq".
Without torchrun (no RANK in the environment) the same runs in one process, without
torch.distributed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import codegen
from codegen.core import progress
from codegen.data import datasets
from codegen.quant import adaptive


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


def graph_arrays(qm: codegen.QuantizedModel) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for n in qm.graph.nodes:
        for k, v in n.params.items():
            out[f"g:{n.name}.{k}"] = np.asarray(v)
        if n.requant is not None:
            out[f"g:{n.name}.mult"] = np.asarray(n.requant.mult)
            out[f"g:{n.name}.shift"] = np.asarray(n.requant.shift)
        if "weight_scale" in n.attrs:
            out[f"g:{n.name}.weight_scale"] = np.asarray(n.attrs["weight_scale"])
    for t, v in qm.graph.tensors.items():
        if v.fmt is not None:
            out[f"g:{t}.format"] = np.array([v.fmt.bits, v.fmt.frac, v.fmt.zero_point, v.fmt.scale])
    return out


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    xtr, ytr, _, _ = datasets.digits()
    torch.manual_seed(0)
    model = Tiny().eval()
    arrays: dict[str, Any] = {}
    if mode == "qat":
        states: list[dict[str, torch.Tensor]] = []
        export = adaptive.export

        def spy(net: adaptive.QATNet) -> Any:  # the trained float parameters, as exported
            states.append({k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
            return export(net)

        adaptive.export = spy  # type: ignore[assignment]
        x, y = xtr[:1024], ytr[:1024]
        qm = codegen.quantize(
            model, x[:256], acc_bits=12, method="adaptive", train=(x, y), epochs=1, device="cpu"
        )
        arrays.update({f"f:{k}": v.numpy() for k, v in states[0].items()})
        real, sys.stderr = sys.stderr, _Tty()
        try:
            arrays["bars"] = np.array([progress.enabled(True)])
        finally:
            sys.stderr = real
        if rank == 0:
            c = codegen.compile(qm, target="host", out_dir=out / "c")
            xt = xtr[1024:1280]
            result = {
                "c_bit_exact": bool(np.array_equal(c.run_int(xt), qm.reference_int(xt))),
                "history": qm.report["adaptive"]["history"],
                "agreement": qm.report["adaptive"]["fake_vs_integer_agreement_calib"],
            }
            (out / "result.json").write_text(json.dumps(result))
    else:
        calib, labels = xtr[:600], ytr[:600]
        share = len(calib) // world
        mine = slice(rank * share, (rank + 1) * share)
        if mode == "ptq":
            qm = codegen.quantize(
                model, calib[mine], acc_bits=12, labels=labels[mine], progress=False
            )
        else:
            qm = codegen.quantize(
                model, calib[mine], method="transform", transform="elt", bits_per_weight=2.0,
                train=(xtr[:512], ytr[:512]), epochs=1, progress=False,
            )  # fmt: skip
    arrays.update(graph_arrays(qm))
    np.savez(out / f"rank{rank}.npz", **arrays)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
