"""Accuracy against accumulator width: post-training quantization vs adaptive training.

`qacc sweep` (and a section of `make demo`) quantizes one trained network at every width from 32
down to the narrowest feasible, with PTQ (guaranteed and profiled, power-of-two formats, 8-bit
containers) and with adaptive W4A4 quantization-aware training under the accumulator constraint
(guaranteed), and evaluates the integer reference on the test set. The result is the
`report["sweep"]` record the reports plot: {"float_accuracy", "rows": [{"method", "policy",
"acc_bits", "accuracy" (None = infeasible), ...}]}. Adaptive rows also give "per_epoch": the
test accuracy of the fake-quant network after every epoch ("fake_quant_test_accuracy", with the
epoch's mean "train_loss"), so the cost of fewer epochs is visible; their "accuracy" is the
exported integer network's (what the C code computes, bit for bit).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codegen import api
from codegen.api import describe_bits
from codegen.core.errors import InfeasibleAccumulatorError, QaccError
from codegen.quant.accumulator import POLICIES
from codegen.quant.adaptive import DEFAULT_DISTILL, DEFAULT_LR
from codegen.quant.equalize import DEFAULT_CLE, check_cle
from codegen.quant.ptq import DEFAULT_CLIP, check_clip
from codegen.quant.rounding import DEFAULT_ROUNDING, ROUNDINGS, check_rounding
from codegen.quant.training import accuracy as train_accuracy
from codegen.tools import brevitas_peer

WIDTHS = (32, 20, 16, 14, 12, 10)
CLIP_NOTE = (
    "Bits (in/w) per layer; ÷n: activation clipping made the layer's input range n times "
    "smaller than its calibration maximum (the larger values saturate)."
)
METHODS = ("ptq", "adaptive")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.reshape(len(labels), -1).argmax(axis=1) == labels))


def run(
    net: torch.nn.Module,
    calib: np.ndarray,
    calib_labels: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    widths: Sequence[int] = WIDTHS,
    methods: Sequence[str] = METHODS,
    epochs: int = 1,
    w_bits: int = 4,
    a_bits: int = 4,
    progress: bool = True,
    log: Any = print,
    keep: dict[tuple[str, str, int], api.QuantizedModel] | None = None,
    distill: bool = DEFAULT_DISTILL,
    rounding: Sequence[str] = (DEFAULT_ROUNDING,),
    clip: str = DEFAULT_CLIP,
    cle: str | None = None,
    brevitas: Sequence[str] = (),
    brevitas_bits: Sequence[Sequence[int]] = ((8, 8),),
    policies: Sequence[str] = POLICIES,
    check_c: int = 0,
) -> dict[str, Any]:
    """Every (method, policy, width) point, PTQ once per weight `rounding`; a width that does not
    fit ends its series. `keep`, if given, receives every quantized model by (method, policy,
    width) (PTQ: the last rounding's). `clip` (PTQ) and `cle` (PTQ and adaptive; None: each
    method's default) are options of `codegen.quantize`. `brevitas`: Brevitas AXE algorithms
    (gpfq, gptq) run as peers at every width on the same calibration images
    (`tools.brevitas_peer`), with each (weight, activation) pair of `brevitas_bits`, keeping the
    best per width; "a2q+": Brevitas's A2Q+ trained at `w_bits`/`a_bits` with the adaptive rows'
    images, epochs and optimiser. `policies`: PTQ's overflow policies. `check_c`: generate and
    build every qacc row's C for the host and compare its integer outputs with the reference's
    on the first that many test images (the row's "c_bit_exact")."""
    _check_policies(policies)
    check_clip(clip)
    check_cle(cle or DEFAULT_CLE)
    for m in methods:
        if m not in METHODS:
            raise QaccError(f"unknown sweep method '{m}'; choose from {', '.join(METHODS)}")
    brevitas_peer.check(brevitas, brevitas_bits)
    _check_something(methods, brevitas)
    if not rounding:
        raise QaccError(f"give at least one rounding: {', '.join(ROUNDINGS)}")
    for r in rounding:
        check_rounding(r)
    x_test, y_test = test
    float_acc = train_accuracy(net, x_test, y_test)
    rows: list[dict[str, Any]] = []
    series: list[tuple[str, str, str | None]] = []
    if "ptq" in methods:
        series += [("ptq", p, r) for p in policies for r in rounding]
    if "adaptive" in methods:
        series.append(("adaptive", "guaranteed", None))
    for method, policy, rnd in series:
        for a in sorted(widths, reverse=True):
            t0 = time.time()
            try:
                if method == "ptq":
                    assert rnd is not None
                    qm = api.quantize(
                        net, calib, acc_bits=a, overflow=policy, labels=calib_labels,
                        progress=progress, rounding=rnd, clip=clip, cle=cle,
                    )  # fmt: skip
                else:
                    qm = api.quantize(
                        net, calib, acc_bits=a, method="adaptive", w_bits=w_bits, a_bits=a_bits,
                        train=train, epochs=epochs, progress=progress, distill=distill, cle=cle,
                        on_epoch=lambda q: {"test_accuracy": train_accuracy(q, x_test, y_test)},
                    )  # fmt: skip
            except InfeasibleAccumulatorError as e:
                rows.append(_row(method, policy, a, None, note=str(e), rounding=rnd))
                log(f"  {method:<8} {policy:<10} {rnd or '':<7} {a:>2} bits: infeasible")
                break  # narrower widths cannot fit either
            if keep is not None:
                keep[(method, policy, a)] = qm
            res = qm.run_reference(x_test)
            acc = accuracy(res.output, y_test)
            row = _row(
                method,
                policy,
                a,
                acc,
                overflow_events=sum(v.events for v in res.overflow.values()),
                bits=describe_bits(qm),
                seconds=round(time.time() - t0, 1),
                rounding=rnd,
            )
            if method == "adaptive":
                sim = qm.simulate(x_test)
                assert isinstance(sim, np.ndarray)  # method 'adaptive': one output
                row["fake_quant_agreement"] = float(
                    np.mean(sim.reshape(len(y_test), -1).argmax(1) == res.output.argmax(1))
                )
                row["weight_bits"], row["activation_bits"] = w_bits, a_bits
                row["epochs"], row["distill"] = epochs, distill
                row["per_epoch"] = [
                    {
                        "epoch": int(h["epoch"]),
                        "train_loss": h["loss"],
                        "fake_quant_test_accuracy": h["test_accuracy"],
                    }
                    for h in qm.report["adaptive"]["history"]
                ]
            else:
                row["clip"], row["cle"] = clip, cle or DEFAULT_CLE
            if check_c:
                row["c_bit_exact"] = _c_bit_exact(qm, x_test[:check_c], res.output[:check_c])
            rows.append(row)
            log(
                f"  {method:<8} {policy:<10} {rnd or '':<7} {a:>2} bits: {100 * acc:6.2f}% "
                f"({100 * (acc - float_acc):+.2f} vs float), {row['overflow_events']} overflows"
                + (f", C bit-exact: {row['c_bit_exact']}" if check_c else "")
            )
    for alg in brevitas:
        for a in sorted(widths, reverse=True):
            if alg in brevitas_peer.QAT:  # trained as the adaptive rows are
                row = brevitas_peer.run_a2q(
                    net, calib, train, test, a, peer=alg, weight_bits=w_bits, act_bits=a_bits,
                    epochs=epochs, lr=DEFAULT_LR, distill=distill, progress=progress,
                )  # fmt: skip
            else:
                row = brevitas_peer.run(net, calib, test, a, algorithm=alg, bits=brevitas_bits)
            rows.append(row)
            log(
                f"  {row['method']:<8} {row['policy']:<10} {'':<7} {a:>2} bits: "
                f"{100 * row['accuracy']:6.2f}% ({100 * (row['accuracy'] - float_acc):+.2f} vs "
                f"float), bits (in/w) {_bits(row)}"
            )
    out = {"float_accuracy": float_acc, "test_samples": len(y_test), "rows": rows}
    if check_c:
        out["c_check_images"] = min(check_c, len(y_test))
    return out


def _c_bit_exact(qm: api.QuantizedModel, x: np.ndarray, reference_out: np.ndarray) -> bool:
    """Whether the generated C, built and run on the host, computes `reference_out` on `x`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        c_out = api.compile(qm, target="host", out_dir=tmp).run_int(x)
    return bool(np.array_equal(c_out, reference_out))


def _check_something(methods: Sequence[str], brevitas: Sequence[str]) -> None:
    if not methods and not brevitas:
        raise QaccError("nothing to sweep: give --methods and/or --brevitas")


def _check_policies(policies: Sequence[str]) -> None:
    if not policies or any(p not in POLICIES for p in policies):
        raise QaccError(
            f"sweep policies are one or more of {', '.join(POLICIES)}, got {', '.join(policies)}"
        )


def _row(
    method: str, policy: str, acc_bits: int, acc: float | None, **extra: Any
) -> dict[str, Any]:
    return {"method": method, "policy": policy, "acc_bits": acc_bits, "accuracy": acc, **extra}


def _bits(row: dict[str, Any]) -> str:
    """The row's bits (in/w); a peer that tried several says which."""
    tried = row.get("tried") or []
    if len(tried) < 2:
        return str(row.get("bits", ""))
    return f"{row['bits']} (best of {', '.join(t['bits'] for t in tried)})"


def table(sweep: dict[str, Any]) -> str:
    """The sweep as a markdown table."""
    fa = sweep["float_accuracy"]
    lines = [
        f"Float accuracy: {100 * fa:.2f}% on {sweep.get('test_samples', '?')} test images.",
        "",
        "| method | policy | acc bits | accuracy % | vs float | overflow events | bits (in/w) | "
        "rounding |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in sweep["rows"]:
        head = f"| {r['method']} | {r['policy']} | {r['acc_bits']} |"
        tail = f" {r.get('rounding') or ''} |"
        if r["accuracy"] is None:
            lines.append(f"{head} infeasible | | | |{tail}")
            continue
        lines.append(
            f"{head} {100 * r['accuracy']:.2f} | "
            f"{100 * (r['accuracy'] - fa):+.2f} | {r.get('overflow_events', '')} | "
            f"{_bits(r)} |{tail}"
        )
    checked = [r["c_bit_exact"] for r in sweep["rows"] if "c_bit_exact" in r]
    if checked:
        lines += [
            "",
            f"C on the host bit-exact with the integer reference on the first "
            f"{sweep.get('c_check_images', '?')} test images: {sum(checked)} of {len(checked)} "
            "qacc rows.",
        ]
    if any("÷" in str(r.get("bits", "")) for r in sweep["rows"]):
        lines += ["", CLIP_NOTE]
    lines += [line for note in brevitas_peer.notes(sweep["rows"]) for line in ("", note)]
    lines += epoch_table(sweep)
    return "\n".join(lines) + "\n"


def epoch_table(sweep: dict[str, Any]) -> list[str]:
    """Adaptive training per epoch: the fake-quant network's test accuracy after every epoch,
    then the exported integer network's (what runs in C, bit for bit), per width."""
    rows = [r for r in sweep["rows"] if r.get("per_epoch")]
    if not rows:
        return []
    fa = sweep["float_accuracy"]
    lines = [
        "",
        "Adaptive training per epoch: test accuracy of the fake-quant network after each epoch, "
        "and of the exported integer network (the C code's, bit for bit) after the last.",
        "",
        "| acc bits | after | network | train loss | accuracy % | vs float |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        for e in r["per_epoch"]:
            acc = e["fake_quant_test_accuracy"]
            lines.append(
                f"| {r['acc_bits']} | epoch {e['epoch']} | fake-quant | {e['train_loss']:.4f} | "
                f"{100 * acc:.2f} | {100 * (acc - fa):+.2f} |"
            )
        lines.append(
            f"| {r['acc_bits']} | epoch {r['per_epoch'][-1]['epoch']} | integer | | "
            f"{100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - fa):+.2f} |"
        )
    return lines


def write(sweep: dict[str, Any], out_dir: Path) -> list[Path]:
    """sweep.json, sweep.md and sweep.png (the plot of the reports) into out_dir."""
    from codegen.backend.report import plot_sweep

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sweep.json", out_dir / "sweep.md", out_dir / "sweep.png"]
    paths[0].write_text(json.dumps(sweep, indent=2) + "\n")
    paths[1].write_text("# Accuracy against accumulator width\n\n" + table(sweep))
    png = plot_sweep({"quantization": {"sweep": sweep}})
    assert png is not None
    paths[2].write_bytes(png)
    return paths


def main(
    model_name: str = "fashion_ds",
    out_dir: Path = Path("out/sweep"),
    widths: Sequence[int] = WIDTHS,
    methods: Sequence[str] = METHODS,
    epochs: int = 6,
    train_epochs: int = 4,
    calib_size: int = 2000,
    rounding: Sequence[str] = (DEFAULT_ROUNDING,),
    clip: str = DEFAULT_CLIP,
    cle: str | None = None,
    brevitas: Sequence[str] = (),
    brevitas_bits: Sequence[Sequence[int]] = ((8, 8),),
    policies: Sequence[str] = POLICIES,
    train_samples: int | None = None,
    test_samples: int | None = None,
    check_c: int = 0,
) -> int:
    """`qacc sweep`: Fashion-MNIST, the demo network, every width and method; writes the files.
    `train_samples`: train adaptive (and Brevitas A2Q+) on that many training images, a random
    subset (the float network still trains on all); `test_samples`: evaluate on the first that
    many test images; `check_c`: compare every qacc row's host C with the reference on the first
    that many test images."""
    from codegen.data import datasets, models, train

    for r in rounding:
        check_rounding(r)
    check_clip(clip)
    check_cle(cle or DEFAULT_CLE)
    _check_policies(policies)
    brevitas_peer.check(brevitas, brevitas_bits)  # before the data and the float training
    _check_something(methods, brevitas)
    t0 = time.time()
    x_train, y_train, x_test, y_test = datasets.fashion_mnist()
    net = train.trained(model_name, models.ZOO[model_name](), x_train, y_train, epochs=train_epochs)
    for n, what, pool in ((train_samples, "train", x_train), (test_samples, "test", x_test)):
        if n is not None and not 1 <= n <= len(pool):
            raise QaccError(f"--{what}-samples must be 1..{len(pool)}, got {n}")
    idx = np.random.default_rng(0).choice(len(x_train), calib_size, replace=False)
    sub = np.random.default_rng(1).permutation(len(x_train))[:train_samples]
    peers = [brevitas_peer.method_name(a) for a in brevitas]
    print(
        f"qacc sweep: {model_name}, widths {', '.join(map(str, widths))}, "
        f"{', '.join([*methods, *peers])}"
    )
    result = run(
        net,
        x_train[idx],
        y_train[idx],
        (x_train[sub], y_train[sub]),
        (x_test[:test_samples], y_test[:test_samples]),
        widths=widths,
        methods=methods,
        epochs=epochs,
        rounding=rounding,
        clip=clip,
        cle=cle,
        brevitas=brevitas,
        brevitas_bits=brevitas_bits,
        policies=policies,
        check_c=check_c,
    )
    paths = write(result, out_dir)
    print(table(result))
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.time() - t0:.0f} s")
    return 0
