#!/usr/bin/env python3
"""Train the float checkpoints that ship in codegen/data/checkpoints/ (what `qacc demo` starts
from), deterministically: seeded initialisation and training order, a fixed number of torch
threads (another torch version, thread count or CPU can still change the last bits).

    .venv/bin/python scripts/train-checkpoints.py                 # every network of RECIPES
    .venv/bin/python scripts/train-checkpoints.py fashion_ds      # one of them

Writes <name>.pt (float32 state_dict) and updates checkpoints.json (recipe, float test accuracy
on the 10 000 Fashion-MNIST test images, training time, torch version, sha256 of the file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

from codegen.data import datasets, models, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=sorted(train.RECIPES), help="networks to train")
    p.add_argument("--out", default=str(train.CHECKPOINT_DIR), help="checkpoint directory")
    p.add_argument("--threads", type=int, default=2, help="torch threads (part of the recipe)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in train.RECIPES]
    if unknown:
        p.error(f"no recipe for {unknown}; choose from {sorted(train.RECIPES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = datasets.fashion_mnist()
    index = train.checkpoint_info(directory=out)
    for name in args.names:
        recipe = train.RECIPES[name]
        torch.manual_seed(recipe["seed"])
        model = models.ZOO[name]()
        t0 = time.time()
        train.fit(model, x_train, y_train, epochs=recipe["epochs"], seed=recipe["seed"])
        seconds = time.time() - t0
        acc = train.accuracy(model, x_test, y_test)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        path = out / f"{name}.pt"
        torch.save(state, path)
        index[name] = {
            "file": path.name,
            "architecture": type(model).__name__,
            "kwargs": {},
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": recipe["epochs"],
            "seed": recipe["seed"],
            "train_samples": len(x_train),
            "optimizer": "Adam, one-cycle, lr 2e-3, batch 128 (codegen.quant.training.fit)",
            "float_test_accuracy": acc,
            "test_samples": len(x_test),
            "training_seconds": round(seconds, 1),
            "torch": torch.__version__,
            "threads": args.threads,
            "machine": platform.machine(),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "made_by": f"scripts/train-checkpoints.py {name}",
        }
        print(
            f"{name}: {100 * acc:.2f}% float test accuracy, {path.stat().st_size} bytes, "
            f"trained in {seconds:.0f} s",
            flush=True,
        )
        (out / "checkpoints.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
