"""`qacc demo`: Fashion-MNIST end to end.

1. Trains (or reloads) the demo CNN; quantizes it post-training at accumulator widths from 32
   bits down to the narrowest feasible one under both overflow policies; prints float and
   integer-reference accuracy per width; generates C for the 16-bit model, builds it for the host
   and checks that the C classifies the 10 000 test images exactly as the reference does.
2. The same sweep on the depthwise-separable network built for narrow accumulators, plus
   adaptive W4A4 accumulator-aware training at 16 and 12 bits; both models go through C with
   packed 4-bit weights, checked bit for bit on the host (10 000 images) and under QEMU on
   cortex-a53 (NEON) and cortex-m55 (Helium) (QEMU_IMAGES images).
The sweeps (table, PNG, JSON) and the compiled models (with report.html) go to `build/demo/`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codegen import api
from codegen.data import datasets, models, train
from codegen.tools import sweep

WIDTHS = (32, 24, 20, 16, 14, 12, 10, 9, 8)
DS_WIDTHS = (32, 16, 14, 12, 10)
ADAPTIVE_MODEL = "fashion_ds"
ADAPTIVE_MODEL_EPOCHS = 6
ADAPTIVE_WIDTHS = (16, 12)
ADAPTIVE_EPOCHS = 6
"""Adaptive training epochs per accumulator width, with distillation from the float network
(`qacc sweep --qat-epochs` defaults to the same)."""
CALIB = 2000
OUT = Path("build/demo")
QEMU_TARGETS = ("cortex-a53", "cortex-m55")
QEMU_IMAGES = 500
"""Test images the adaptive models classify under QEMU (the host build runs all 10 000)."""


def compile_and_check(
    qm: api.QuantizedModel, out: Path, x_test: np.ndarray, y_test: np.ndarray
) -> bool:
    """Generate, build and run the C on the host; print accuracy, bit-exactness and memory."""
    t_compile = time.time()
    compiled = api.compile(qm, target="host", out_dir=out)
    t_compile = time.time() - t_compile
    c_out = compiled.run_int(x_test)
    ref_out = qm.reference_int(x_test)
    same = bool(np.array_equal(c_out, ref_out))
    mem = compiled.report["memory"]
    print(f"  C accuracy        {100 * sweep.accuracy(c_out, y_test):.2f}%")
    print(f"  reference         {100 * sweep.accuracy(ref_out, y_test):.2f}%")
    print(f"  bit-exact         {'yes' if same else 'NO'} ({len(y_test)} images)")
    print(f"  arena             {mem['arena_bytes']} B (lower bound {mem['arena_lower_bound']} B)")
    print(f"  weights (flash)   {mem['flash_weight_bytes']} B")
    print(f"  generate + build  {t_compile:.1f} s; report: {out / 'report.html'}")
    return same


def check_under_qemu(qm: api.QuantizedModel, out: Path, x: np.ndarray) -> bool:
    """Cross-compile for each QEMU_TARGETS core, run `x` under QEMU, compare with the reference."""
    ref = qm.reference_int(x)
    ok = True
    for target in QEMU_TARGETS:
        t0 = time.time()
        compiled = api.compile(qm, target=target, out_dir=out.with_name(f"{out.name}-{target}"))
        same = bool(np.array_equal(compiled.run_int(x), ref))
        ok &= same
        print(
            f"  {target:<17} bit-exact {'yes' if same else 'NO'} ({len(x)} images under QEMU, "
            f"{time.time() - t0:.0f} s)"
        )
    return ok


def main(model_name: str = "fashion_cnn", epochs: int = 4, out_dir: Path | None = None) -> int:
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = out_dir or OUT
    x_train, y_train, x_test, y_test = datasets.fashion_mnist()
    idx = np.random.default_rng(0).choice(len(x_train), CALIB, replace=False)
    calib, calib_labels = x_train[idx], y_train[idx]
    common: dict[str, Any] = {"train": (x_train, y_train), "test": (x_test, y_test)}

    print(f"qacc demo: {model_name} on Fashion-MNIST (training or reusing the cached checkpoint)")
    net = train.trained(model_name, models.ZOO[model_name](), x_train, y_train, epochs=epochs)
    print("\n1. Post-training quantization (power-of-two formats), per accumulator width:")
    ptq = sweep.run(net, calib, calib_labels, widths=WIDTHS, methods=("ptq",), **common)
    print()
    print(sweep.table(ptq))
    ok = True
    print("Generated C (host), PTQ, 16-bit accumulators, guaranteed policy:")
    qm = api.quantize(net, calib, acc_bits=16, overflow="guaranteed", labels=calib_labels)
    qm.report["sweep"] = ptq
    ok &= compile_and_check(qm, out / f"{model_name}-ptq16", x_test, y_test)

    print(
        f"\n2. Adaptive W4A4 + accumulator-aware training (guaranteed; {ADAPTIVE_EPOCHS} epochs "
        f"per width) on {ADAPTIVE_MODEL}, against PTQ on the same network:"
    )
    net2 = train.trained(
        ADAPTIVE_MODEL, models.ZOO[ADAPTIVE_MODEL](), x_train, y_train, epochs=ADAPTIVE_MODEL_EPOCHS
    )
    base = sweep.run(net2, calib, calib_labels, widths=DS_WIDTHS, methods=("ptq",), **common)
    trained_models: dict[tuple[str, str, int], api.QuantizedModel] = {}
    adaptive = sweep.run(
        net2,
        calib,
        calib_labels,
        widths=ADAPTIVE_WIDTHS,
        methods=("adaptive",),
        epochs=ADAPTIVE_EPOCHS,
        keep=trained_models,
        distill=True,
        **common,
    )
    result = {**base, "rows": base["rows"] + adaptive["rows"]}
    print()
    print(sweep.table(result))
    paths = sweep.write(result, out / f"{ADAPTIVE_MODEL}-sweep")
    print(f"sweep written to {', '.join(str(p) for p in paths)}")

    for a in ADAPTIVE_WIDTHS:
        print(f"\nGenerated C, adaptive W4A4, {a}-bit accumulators, guaranteed, packed weights:")
        qa = trained_models[("adaptive", "guaranteed", a)]
        qa.report["sweep"] = result
        where = out / f"{ADAPTIVE_MODEL}-adaptive{a}"
        ok &= compile_and_check(qa, where, x_test, y_test)
        ok &= check_under_qemu(qa, where, x_test[:QEMU_IMAGES])
    print(f"\ndone in {time.time() - t0:.0f} s")
    return 0 if ok else 1
