"""`qacc rate`: the rate-accuracy curve of transform quantization on Fashion-MNIST.

For each target rate (bits per weight), the demo CNN (codegen.data.models.FashionCNN, trained and
cached by codegen.data.train.trained) is coded by transform quantization (KLT and/or ELT) and by the
uniform per-channel baseline (every weight of a layer at the same bit depth, MSE-optimal
power-of-two step per output channel), without and with retraining; the accuracy is that of the
integer reference (the semantics of the generated C) on the 10 000 test images. Writes
rate_accuracy.png, rate_accuracy.md and rate_accuracy.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from codegen.core.errors import QaccError

CALIB = 2000


def _parse(text: str, conv: type, what: str) -> list[Any]:
    try:
        return [conv(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QaccError(f"--{what} takes values separated by commas, got '{text}'") from None


def sweep(
    rates: list[float],
    transforms: list[str],
    epochs: int,
    train_samples: int,
    progress: bool = True,
) -> dict[str, Any]:
    from codegen import api
    from codegen.data import datasets, models, train

    x_train, y_train, x_test, y_test = datasets.fashion_mnist()
    net = train.trained("fashion_cnn", models.FashionCNN(), x_train, y_train, epochs=4)
    float_acc = train.accuracy(net, x_test, y_test)
    idx = np.random.default_rng(0).choice(len(x_train), CALIB, replace=False)
    calib = x_train[idx]
    sub = np.random.default_rng(1).permutation(len(x_train))[:train_samples]
    tr = (x_train[sub], y_train[sub])
    rows = []
    for method in ["uniform", *transforms]:
        for retrain in (False, True) if epochs > 0 else (False,):
            for rate in rates:
                t0 = time.time()
                qm = api.quantize(
                    net,
                    calib,
                    method="transform",
                    transform=method,
                    bits_per_weight=rate,
                    train=tr if retrain else None,
                    epochs=epochs,
                    progress=progress,
                )
                ref = qm.reference(x_test)
                assert isinstance(ref, np.ndarray)  # method 'transform': one output
                acc = float(np.mean(ref.argmax(axis=1) == y_test))
                t = qm.report["transform"]
                row = {
                    "method": method,
                    "retrained": retrain,
                    "target_bits_per_weight": rate,
                    "bits_per_weight": qm.report["weight_bits_per_param"],
                    "accuracy": acc,
                    "layers": {
                        lay["name"]: f"{lay['transform']} r={lay['r']}/{lay['O']} {lay['deploy']}"
                        for lay in t["layers"]
                    },
                    "seconds": round(time.time() - t0, 1),
                }
                rows.append(row)
                if progress:
                    print(
                        f"  {method:<8} {'retrained' if retrain else 'post-training':<13} "
                        f"{row['bits_per_weight']:.3f} bits/weight: {100 * acc:.2f}%",
                        flush=True,
                    )
    return {
        "network": "FashionCNN",
        "float_accuracy": float_acc,
        "epochs": epochs,
        "train_samples": train_samples,
        "calibration_samples": CALIB,
        "test_samples": len(y_test),
        "rows": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    rates = sorted({r["target_bits_per_weight"] for r in res["rows"]})
    series = list(dict.fromkeys((r["method"], r["retrained"]) for r in res["rows"]))
    head = "| bits/weight | " + " | ".join(f"{m} {'retrained' if t else 'PTQ'}" for m, t in series)
    lines = [
        f"Rate-accuracy, {res['network']} on Fashion-MNIST ({res['test_samples']} test images, "
        f"integer reference); float {100 * res['float_accuracy']:.2f}%. Retraining: "
        f"{res['epochs']} epoch(s) on {res['train_samples']} training images. Cells: accuracy % "
        "(true bits per weight, side information included).",
        "",
        head + " |",
        "|" + "---|" * (len(series) + 1),
    ]
    for rate in rates:
        cells = []
        for m, t in series:
            hit = [
                r
                for r in res["rows"]
                if (r["method"], r["retrained"], r["target_bits_per_weight"]) == (m, t, rate)
            ]
            cells.append(
                f"{100 * hit[0]['accuracy']:.2f} ({hit[0]['bits_per_weight']:.3f})" if hit else ""
            )
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = list(dict.fromkeys((r["method"], r["retrained"]) for r in res["rows"]))
    for m, t in series:
        pts = sorted(
            (r["bits_per_weight"], 100 * r["accuracy"])
            for r in res["rows"]
            if (r["method"], r["retrained"]) == (m, t)
        )
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            linestyle="-" if t else "--",
            label=f"{m} {'retrained' if t else 'post-training'}",
        )
    ax.axhline(100 * res["float_accuracy"], color="gray", linewidth=1, label="float")
    ax.set_xlabel("bits per weight (all side information included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{res['network']} on Fashion-MNIST: transform vs uniform quantization")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_cli(rates: str, transforms: str, epochs: int, train_samples: int, out: str) -> int:
    from codegen.quant.transform import TRANSFORMS

    r = _parse(rates, float, "rates")
    ts = _parse(transforms, str, "transforms")
    bad = [t for t in ts if t not in TRANSFORMS or t == "uniform"]
    if bad or not r:
        raise QaccError(f"--transforms takes klt and/or elt, --rates numbers; got {transforms}")
    if epochs < 0 or train_samples < 1:
        raise QaccError("--epochs must be >= 0 and --train-samples >= 1")
    res = sweep(r, ts, epochs, train_samples)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "rate_accuracy.json").write_text(json.dumps(res, indent=2) + "\n")
    (d / "rate_accuracy.md").write_text(markdown(res))
    plot(res, d / "rate_accuracy.png")
    print(markdown(res))
    print(f"qacc rate: wrote {d}/rate_accuracy.png, .md and .json")
    return 0
