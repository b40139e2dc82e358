"""`qacc demo`: Fashion-MNIST end to end.

Trains (or reloads) the demo CNN, quantizes it at accumulator widths from 32 bits down to the
narrowest feasible one under both overflow policies, prints float and integer-reference accuracy
per width with the bits chosen, then generates C for the 16-bit model, builds it for the host and
checks that the C classifies the 10 000 test images exactly as the reference does.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import codegen
from codegen import datasets, models, train
from codegen.api import describe_bits
from codegen.errors import InfeasibleAccumulatorError

WIDTHS = (32, 24, 20, 16, 14, 12, 10, 9, 8)
CALIB = 2000


@dataclass
class Row:
    acc_bits: int
    policy: str
    accuracy: float | None
    bits: str
    overflow: int
    note: str = ""


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.reshape(len(labels), -1).argmax(axis=1) == labels))


def sweep(
    model: torch.nn.Module,
    calib: np.ndarray,
    calib_labels: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    widths: tuple[int, ...] = WIDTHS,
    policies: tuple[str, ...] = ("guaranteed", "profiled"),
) -> list[Row]:
    rows = []
    for policy in policies:
        for a in widths:
            try:
                qm = codegen.quantize(
                    model, calib, acc_bits=a, overflow=policy, labels=calib_labels
                )
            except InfeasibleAccumulatorError as e:
                rows.append(Row(a, policy, None, "", 0, str(e)))
                break  # narrower widths cannot fit either
            res = qm.run_reference(x_test)
            ovf = sum(v.events for v in res.overflow.values())
            rows.append(Row(a, policy, _accuracy(res.output, y_test), describe_bits(qm), ovf))
    return rows


def print_table(float_acc: float, rows: list[Row]) -> None:
    print(f"\nfloat accuracy: {100 * float_acc:.2f}%   (10 000 Fashion-MNIST test images)")
    print("bits: per weighted layer, input bits / weight bits\n")
    head = f"{'policy':<11} {'acc bits':>8} {'int acc %':>9} {'vs float':>8} {'overflows':>9}  bits"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.accuracy is None:
            print(f"{r.policy:<11} {r.acc_bits:>8} {'infeasible':>9}  ({r.note})")
            continue
        delta = 100 * (r.accuracy - float_acc)
        print(
            f"{r.policy:<11} {r.acc_bits:>8} {100 * r.accuracy:>9.2f} {delta:>+8.2f} "
            f"{r.overflow:>9}  {r.bits}"
        )


def main(model_name: str = "fashion_cnn", epochs: int = 4, out_dir: Path | None = None) -> int:
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x_train, y_train, x_test, y_test = datasets.fashion_mnist()
    net = models.ZOO[model_name]()
    print(f"qacc demo: {model_name} on Fashion-MNIST (training or reusing the cached checkpoint)")
    net = train.trained(model_name, net, x_train, y_train, epochs=epochs)
    float_acc = train.accuracy(net, x_test, y_test)
    idx = np.random.default_rng(0).choice(len(x_train), CALIB, replace=False)
    calib, calib_labels = x_train[idx], y_train[idx]
    rows = sweep(net, calib, calib_labels, x_test, y_test)
    print_table(float_acc, rows)

    print("\nGenerated C (host), 16-bit accumulators, guaranteed policy:")
    qm = codegen.quantize(net, calib, acc_bits=16, overflow="guaranteed", labels=calib_labels)
    with tempfile.TemporaryDirectory(prefix="qacc-demo-") as tmp:
        out = out_dir or Path(tmp) / model_name
        t_compile = time.time()
        compiled = codegen.compile(qm, target="host", out_dir=out)
        t_compile = time.time() - t_compile
        c_out = compiled.run_int(x_test)
        ref_out = qm.reference_int(x_test)
        same = bool(np.array_equal(c_out, ref_out))
        rep = compiled.report
        print(f"  C accuracy        {100 * _accuracy(c_out, y_test):.2f}%")
        print(f"  reference         {100 * _accuracy(ref_out, y_test):.2f}%")
        print(f"  bit-exact         {'yes' if same else 'NO'} (10 000 images)")
        mem = rep["memory"]
        print(
            f"  arena             {mem['arena_bytes']} B (lower bound {mem['arena_lower_bound']} B)"
        )
        print(f"  weights (flash)   {mem['flash_weight_bytes']} B")
        print(f"  generate + build  {t_compile:.1f} s")
    print(f"\ndone in {time.time() - t0:.0f} s")
    return 0 if same else 1
