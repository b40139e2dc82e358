"""One rank of the multi-process tests (tests/quant/test_distributed.py): run with torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 ddp_worker.py MODE OUT

MODE "qat": adaptive W4A4 QAT at 12 bits of a tiny CNN (the one of examples/distributed/qat.py)
on 1024 8x8 digits, global batch 128 (every rank the same calibration set, the training set
sharded by qacc). Every rank saves its integer graph's parameters and its trained float
parameters to OUT/rank<r>.npz; rank 0 compiles the graph for the host and writes
OUT/result.json (C == reference, bit for bit).
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
import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import codegen
from codegen.core import progress
from codegen.data import datasets
from codegen.quant import adaptive
from codegen.quant import distributed as ddp

# The example's network and integer-graph arrays (examples/distributed/qat.py), not copies of them.
EXAMPLE = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples/distributed/qat.py"))
graph_arrays = EXAMPLE["graph_arrays"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = ddp.rank(), ddp.world()
    xtr, ytr, _, _ = datasets.digits()
    model = EXAMPLE["model"]("tiny", None)  # seeded: the same on every rank
    arrays: dict[str, Any] = {}
    if mode == "qat":
        states: list[dict[str, torch.Tensor]] = []
        export = adaptive.export

        def spy(net: adaptive.QATNet) -> Any:  # the trained float parameters, as exported
            states.append({k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
            return export(net)

        adaptive.export = spy  # type: ignore[assignment]
        x, y = xtr[:1024], ytr[:1024]
        qm = codegen.quantize(  # the recipe the tolerance of the test's docstring was set on
            model, x[:256], acc_bits=12, method="adaptive", train=(x, y), epochs=1, device="cpu",
            lr=1e-3, init="float", distill=False,
        )  # fmt: skip
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
    arrays.update({f"g:{k}": v for k, v in graph_arrays(qm).items()})
    np.savez(out / f"rank{rank}.npz", **arrays)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
