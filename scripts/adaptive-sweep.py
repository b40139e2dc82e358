"""Sweep the options of adaptive W4A4 training over the zoo networks; print a Markdown table.

Every combination of the grid runs `codegen.quantize(method="adaptive", overflow="guaranteed")`
on each network and accumulator width, evaluates the fake-quant network on the test images after
every epoch (the `on_epoch` callback) and the exported integer network (the NumPy reference, which
the C kernels match bit for bit) at the end. `--train-frac` trains on a random share of the
training set (exploration: a quarter epoch per "epoch"); `--test` limits the test images.

    PYTHONPATH=. nice -n 10 python scripts/adaptive-sweep.py --nets fashion_cnn,resdw,fashion_ds \
        --acc 12 --epochs 2 --train-frac 0.25 --test 2000 --lr 1e-3,3e-3 --init float,projected \
        --distill 0,1 --json out/adaptive-sweep.json

`--opts` runs one recipe (quantize's `adaptive=` options) per occurrence, e.g.
`--opts kd_weight=1,warmup=0.05 --opts batch=64`; `--seed` sets the training seed (the batch
order). The results behind the defaults are in docs/adaptive.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import codegen
from codegen.data import datasets, models, train
from codegen.quant.training import accuracy

FLOAT_EPOCHS = {"resdw": 1}
"""Networks without a shipped checkpoint: float epochs (trained once, then cached)."""


def network(name: str, x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    if name in train.checkpoint_info():
        return train.pretrained(name)
    torch.manual_seed(0)  # a network trained here starts from the same weights on every run
    return train.trained(name, models.ZOO[name](), x, y, epochs=FLOAT_EPOCHS.get(name, 4))


def one(
    net: torch.nn.Module,
    data: tuple[np.ndarray, ...],
    acc_bits: int,
    epochs: int,
    options: dict[str, Any],
    check_c: int = 0,
    bits: tuple[Any, Any] = (4, 4),
) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te, calib = data
    t0 = time.time()
    qm = codegen.quantize(
        net, calib, acc_bits=acc_bits, method="adaptive", w_bits=bits[0], a_bits=bits[1],
        overflow="guaranteed", train=(x_tr, y_tr), epochs=epochs, progress=False,
        on_epoch=lambda q: {"test_accuracy": accuracy(q, x_te, y_te)}, **options,
    )  # fmt: skip
    out = qm.run_reference(x_te).output
    hist = qm.report["adaptive"]["history"]
    c_equal = None
    if check_c:  # the C on the host computes the integer network, logit for logit
        with tempfile.TemporaryDirectory() as tmp:
            c = codegen.compile(qm, target="host", out_dir=tmp)
            c_equal = bool(
                np.array_equal(c.run_int(x_te[:check_c]), qm.reference_int(x_te[:check_c]))
            )
    return {
        "fake_quant_per_epoch": [h["test_accuracy"] for h in hist],
        "integer": float(np.mean(out.reshape(len(y_te), -1).argmax(1) == y_te)),
        "c_equals_reference": c_equal,
        "seconds": round(time.time() - t0, 1),
    }


def recipe_of(text: str) -> dict[str, Any]:
    """'batch=64,zeros_move=true,rounding=fit' -> {"batch": 64, "zeros_move": True,
    "rounding": "fit"} (quantize's adaptive=)."""
    out: dict[str, Any] = {}
    for pair in filter(None, text.split(",")):
        key, value = pair.split("=")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:  # a name, e.g. rounding=fit
                out[key] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nets", default="fashion_cnn,resdw,fashion_ds")
    p.add_argument("--acc", default="12", help="accumulator widths (commas)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-frac", type=float, default=1.0)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--lr", default="1e-3")
    p.add_argument("--init", default="float")
    p.add_argument("--distill", default="0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cle", default=None, help="cross-layer equalization first (quantize's cle)")
    p.add_argument("--seed", type=int, default=0, help="the training seed (quantize's seed)")
    p.add_argument(
        "--check-c", type=int, default=0, help="compare the host C with the reference on N images"
    )
    p.add_argument(
        "--opts",
        action="append",
        default=None,
        help="one recipe (quantize's adaptive=): name=value pairs joined by commas, e.g. "
        "batch=64,scale_lr=3; repeat for a grid",
    )
    p.add_argument(
        "--bits",
        default="4,4",
        help="w_bits,a_bits as ints, or JSON objects by layer name joined by ';', e.g. "
        '\'4;{"default": 4, "input": 8}\'',
    )
    p.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sep = ";" if ";" in a.bits else ","
    bits = tuple(json.loads(v) for v in a.bits.split(sep))
    x_train, y_train, x_test, y_test = datasets.fashion_mnist()
    rng = np.random.default_rng(0)
    calib = x_train[rng.choice(len(x_train), 2000, replace=False)]
    sub = rng.permutation(len(x_train))[: int(a.train_frac * len(x_train))]
    x_te, y_te = x_test[: a.test], y_test[: a.test]
    grid = list(
        itertools.product(
            [float(v) for v in a.lr.split(",")],
            a.init.split(","),
            [bool(int(v)) for v in a.distill.split(",")],
            [recipe_of(o) for o in a.opts or [""]],
        )
    )
    print(
        f"W4A4 guaranteed, {a.epochs} epochs of {len(sub)} training images, {len(y_te)} test "
        "images; fake-quant test accuracy after each epoch, integer network at the end\n"
    )
    print("| network | acc bits | lr | init | distill | float % | fake-quant % per epoch | "
          "integer % | vs float | s | options |")  # fmt: skip
    print("|---|---:|---:|---|---|---:|---|---:|---:|---:|---|")
    for name in a.nets.split(","):
        net = network(name, x_train, y_train)
        fl = accuracy(net, x_te, y_te)
        data = (x_train[sub], y_train[sub], x_te, y_te, calib)
        for acc_bits in [int(v) for v in a.acc.split(",")]:
            for lr, init, distill, rec in grid:
                opts = {"lr": lr, "init": init, "distill": distill, "seed": a.seed, "adaptive": rec,
                        "cle": a.cle}  # fmt: skip
                r = one(net, data, acc_bits, a.epochs, opts, a.check_c, bits)
                check = r["c_equals_reference"]
                shown = "" if a.bits == "4,4" else f" bits {a.bits}"
                per = " / ".join(f"{100 * v:.2f}" for v in r["fake_quant_per_epoch"])
                print(
                    f"| {name} | {acc_bits} | {lr:g} | {init} | {'on' if distill else 'off'} | "
                    f"{100 * fl:.2f} | {per} | {100 * r['integer']:.2f} | "
                    f"{100 * (r['integer'] - fl):+.2f} | {r['seconds']:.0f} | {rec or ''}{shown} |"
                    + ("" if check is None else f" C == reference: {check} |"),
                    flush=True,
                )
                if a.json:
                    row = {"network": name, "acc_bits": acc_bits, "float": fl, **opts, **r,
                           "bits": bits, "epochs": a.epochs, "train": len(sub),
                           "test": len(y_te)}  # fmt: skip
                    with Path(a.json).open("a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
