"""Accuracy of PTQ (`guaranteed`) per accumulator width, weight rounding and the narrow-accumulator
options (activation clipping, cross-layer equalization), on Fashion-MNIST.

    PYTHONPATH=. python scripts/ptq-options.py --model fashion_cnn --widths 14,12 \
        --rounding nearest,optq --options none/none,search/none,none/activations --test 10000
    PYTHONPATH=. python scripts/ptq-options.py --model resdw --epochs 1 --widths 32,16x32 \
        --tile 64 --rounding nearest --options mse/activations --test 10000

Calibration as `qacc sweep` draws it (2000 training images, seed 0); the first `--test` test
images; one line per point (accuracy of the integer network, drop against float, whether every
layer's guaranteed bound fits, input/weight bits per layer, seconds).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from codegen import api
from codegen.data import datasets, models, train
from codegen.quant.training import accuracy as float_accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fashion_cnn", choices=sorted(models.ZOO))
    p.add_argument("--epochs", type=int, default=4, help="float training epochs (as qacc sweep)")
    p.add_argument(
        "--widths", default="14,12", help="accumulator widths; AxB: two stages (A-bit tiles)"
    )
    p.add_argument("--rounding", default="nearest,optq")
    p.add_argument("--options", default="none/none", help="CLIP/CLE pairs separated by commas")
    p.add_argument("--tile", type=int, help="acc_tile of the AxB widths (default: the quantizer's)")
    p.add_argument("--test", type=int, default=2000, help="first N test images")
    args = p.parse_args()
    x_train, y_train, x_test, y_test = datasets.fashion_mnist()
    net = train.trained(args.model, models.ZOO[args.model](), x_train, y_train, args.epochs)
    idx = np.random.default_rng(0).choice(len(x_train), 2000, replace=False)
    xt, yt = x_test[: args.test], y_test[: args.test]
    fa = float_accuracy(net, xt, yt)
    print(f"{args.model}: float {100 * fa:.2f}% on {len(yt)} test images", flush=True)
    for w in args.widths.split(","):
        a, _, b = w.partition("x")
        if b and int(b) != api.ACC2_BITS:
            raise SystemExit(f"two-stage totals are {api.ACC2_BITS}-bit: {w}")
        stages: dict[str, int] = {"acc_bits": int(a)}
        if b:
            stages.update(acc_stages=2, **({"acc_tile": args.tile} if args.tile else {}))
        for rnd in args.rounding.split(","):
            for opt in args.options.split(","):
                clip, cle = opt.split("/")
                t0 = time.time()
                if "x" in w and rnd != "nearest":
                    continue  # two stages keep one budget per tile: nearest rounding only
                qm = api.quantize(
                    net, x_train[idx], **stages, labels=y_train[idx], progress=False,
                    rounding=rnd, clip=clip, cle=cle,
                )  # fmt: skip
                # the float64 fake-quant simulation equals the dequantized integer reference (PTQ:
                # tests/quant/test_narrow_ptq.py) and is much faster on the whole test set
                out = qm.simulate(xt)
                acc = float(np.mean(out.reshape(len(yt), -1).argmax(1) == yt))
                fits = all(r.get("bound_fits", True) for r in qm.report["layers"])
                print(
                    f"{args.model} {w} {rnd:<7} clip={clip:<6} cle={cle:<11} {100 * acc:6.2f}% "
                    f"({100 * (acc - fa):+.2f}) bound_fits={fits} {api.describe_bits(qm)} "
                    f"{time.time() - t0:.0f}s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
