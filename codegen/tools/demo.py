"""`qacc demo` (what `make demo` runs): the whole story on one screen in a few minutes.

Starting from the float networks shipped with qacc (codegen/data/checkpoints/, made by
scripts/train-checkpoints.py), on Fashion-MNIST:

1. float accuracy of FashionDSCNN, the depthwise-separable network built for narrow accumulators;
2. post-training quantization at 32, 16, 14 and 12-bit accumulators, policy `guaranteed` (no
   input can overflow): accuracy drop against float and overflow count per width;
3. SHORT fine-tunes that fit the time budget (one pass over a subset of the training set):
   adaptive W4A4 accumulator-aware training at 12 bits (half the weight and activation bits of
   PTQ's W8A8; 6 full epochs: `--full`), and transform quantization at 2 bits
   per weight (on FashionCNN: FashionDSCNN has too few weights per layer to code at 2 bits);
4. the generated C of the adaptive model (packed 4-bit weights) bit-exact against the NumPy
   integer reference on the host (every test image) and under QEMU on cortex-a53 and cortex-m55;
5. instructions per inference on cortex-a53 at 16 against 32-bit accumulators (the speedup),
   with the flash (weights) and RAM (arena) bytes;
6. a summary table and the paths of report.html, the static library and its header.

Independent chunks of the long evaluations (the integer reference and the C test benches over
the 10 000 test images) run two at a time: the machines this is made for have 2 cores.
Accuracies are those of the generated C (bit-exact with the reference), on all test images.

`qacc demo --full` (`make paper`) is the full-length run: the accuracy sweep over every width on
both networks, 6-epoch adaptive training at 16 and 12 bits, QEMU on QEMU_IMAGES images.
Everything goes to `build/demo/`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from codegen import api
from codegen.core.errors import QaccError
from codegen.core.progress import bar
from codegen.data import datasets, models, train
from codegen.targets.compiled import Compiled, run_testbench
from codegen.tools import sweep

OUT = Path("build/demo")
CALIB = 2000
"""Calibration images of the full run."""
QEMU_TARGETS = ("cortex-a53", "cortex-m55")

# ----------------------------------------------------------------------------- the short demo

STORY_MODEL = "fashion_ds"
"""The network of the short demo: built for narrow accumulators, so PTQ at 12 bits loses a lot
and accumulator-aware training wins it back."""
STORY_EPOCHS = train.RECIPES[STORY_MODEL]["epochs"]
"""Float training epochs (the shipped checkpoint's recipe, so nothing is trained)."""
TRANSFORM_MODEL = "fashion_cnn"
TRANSFORM_EPOCHS = train.RECIPES[TRANSFORM_MODEL]["epochs"]
SHORT_CALIB = 500
"""Calibration images of the short demo (the quantizers also run the reference on them)."""
PTQ_WIDTHS = (32, 16, 14, 12)
FINETUNE_ACC_BITS = 12
FINETUNE_SAMPLES = 12000
"""Training images of the adaptive fine-tune (one pass, distilled from the float network)."""
TRANSFORM_BITS = 2.0
TRANSFORM_ACC_BITS = 16
TRANSFORM_SAMPLES = 60000
"""Training images of the transform retraining (one pass; a whole epoch takes ~15 s)."""
FINETUNE_EPOCHS = 1
SHORT_QEMU_IMAGES = {"cortex-a53": 500, "cortex-m55": 50}
"""Test images run under QEMU per target (cortex-m55 under qemu-system-arm is slow)."""
COUNT_TARGET = "cortex-a53"
COUNT_WIDTHS = (32, 16)
WORKERS = 2
"""Chunks of the long evaluations run at the same time (threads: NumPy and the test bench
processes run outside the GIL)."""
CHUNK = 1000

T = TypeVar("T")


class DemoSetupError(QaccError):
    """A tool the demo needs (cross compiler, QEMU, the instruction-count plugin) is missing."""


def preflight(targets: Sequence[str], count: bool) -> None:
    """Fail in the first second, with one line naming what to install, rather than minutes in."""
    from codegen.targets import qemu
    from codegen.targets.build import resolve_target

    for t in targets:
        try:
            resolve_target(t).check()
        except QaccError:
            raise
        except Exception as e:  # TargetError & co.: still one line
            raise DemoSetupError(str(e)) from None
    if count:
        try:
            qemu.plugin_path()
        except qemu.EmulatorError as e:
            raise DemoSetupError(str(e)) from None


def chunked(fn: Callable[[np.ndarray], T], x: np.ndarray, desc: str, chunk: int = CHUNK) -> list[T]:
    """fn over consecutive chunks of x, WORKERS at a time, results in order, with a bar."""
    parts = [x[i : i + chunk] for i in range(0, len(x), chunk)]
    results: list[T] = []
    with ThreadPoolExecutor(WORKERS) as pool, bar(desc=desc, total=len(x), unit="image") as b:
        for part, fut in zip(parts, [pool.submit(fn, p) for p in parts], strict=True):
            results.append(fut.result())
            b.update(len(part))
    return results


def c_outputs(c: Compiled, qm: api.QuantizedModel, x: np.ndarray, desc: str) -> np.ndarray:
    """The generated C's integer outputs on x: its test bench (under QEMU for ARM targets), on
    chunks of x in parallel processes."""
    xq = qm.quantize_input(x)
    chunk = max(1, -(-len(x) // (2 * WORKERS)))  # a few chunks: the bar moves

    def run(part: np.ndarray) -> np.ndarray:
        assert c.testbench is not None
        return run_testbench(
            c.testbench, part, c.input_shape, c.output_shape, c.target.argv, progress=False
        )

    return np.concatenate(chunked(run, xq, desc, chunk))


def reference_outputs(qm: api.QuantizedModel, x: np.ndarray, desc: str) -> tuple[np.ndarray, int]:
    """The integer reference on x (in parallel chunks) and its overflow events (all layers)."""
    runs = chunked(qm.run_reference, x, desc)
    events = sum(v.events for r in runs for v in r.overflow.values())
    return np.concatenate([r.output for r in runs]), events


@dataclass
class Row:
    """One line of the summary table."""

    model: str
    acc_bits: str
    accuracy: float
    float_accuracy: float
    overflows: int | None = None
    flash: int | None = None
    arena: int | None = None
    instructions: int | None = None
    bit_exact: str = ""


def _pct(acc: float, ref: float | None = None) -> str:
    s = f"{100 * acc:.2f}%"
    return s if ref is None else f"{s} ({100 * (acc - ref):+.2f} pt vs float)"


def _network(name: str, epochs: int, x: np.ndarray, y: np.ndarray) -> tuple[torch.nn.Module, str]:
    """The float network and where it came from (shipped checkpoint, cache or training)."""
    model = models.ZOO[name]()
    if train.shipped(name, model, epochs, len(x)) is not None:
        info = train.checkpoint_info(name)
        where = (
            f"shipped checkpoint codegen/data/checkpoints/{info['file']} ({info['parameters']:,} "
            f"parameters, {info['epochs']} epochs)"
        )
        return model, where
    t0 = time.time()
    net = train.trained(name, model, x, y, epochs=epochs)
    return net, f"trained or reloaded from the cache ({epochs} epochs, {time.time() - t0:.0f} s)"


def _memory(c: Compiled, row: Row) -> None:
    """The flash (weights) and arena bytes of build `c` into `row`."""
    mem = c.report["memory"]
    row.flash, row.arena = int(mem["flash_weight_bytes"]), int(mem["arena_bytes"])


def _count(c: Compiled, row: Row, label: str, x: np.ndarray) -> int:
    """Instructions of one inference (x[:1]) of build `c` under QEMU, with its flash and arena
    bytes, into `row` and one line; returns the instructions."""
    row.instructions = n = int(c.count_instructions(x[:1])["total"])
    _memory(c, row)
    print(
        f"   {label + ':':<31}{n:>10,} instructions, weights {row.flash:,} B, arena {row.arena:,} B"
    )
    return n


def _weights(net: torch.nn.Module) -> int:
    """Weights of the conv and dense layers (what bits per weight count)."""
    return sum(int(p.numel()) for k, p in net.state_dict().items() if k.endswith("weight") and
               p.dim() > 1)  # fmt: skip


def short(out: Path) -> int:
    t0 = time.time()
    preflight(QEMU_TARGETS, count=True)
    x_train, y_train, x_test, y_test = datasets.fashion_mnist()
    n_test = len(y_test)
    idx = np.random.default_rng(0).choice(len(x_train), SHORT_CALIB, replace=False)
    calib, calib_labels = x_train[idx], y_train[idx]

    net, where = _network(STORY_MODEL, STORY_EPOCHS, x_train, y_train)
    name = type(net).__name__
    print(f"qacc demo: {name} on Fashion-MNIST, from float to bit-exact C on ARM")
    print(f"   float network: {where}")
    float_acc = train.accuracy(net, x_test, y_test, batch=128)  # faster depthwise convs
    print(f"\n1. Float accuracy: {_pct(float_acc)} on {n_test} test images")

    print(
        "\n2. Post-training quantization (8-bit weights and activations, power-of-two formats),\n"
        "   policy guaranteed (no input can overflow the accumulator), per accumulator width\n"
        f"   (accuracy: the generated C on the host, {n_test} test images; overflows: integer\n"
        f"   reference on the {SHORT_CALIB} calibration images):"
    )
    rows: list[Row] = [Row(f"{name} float", "-", float_acc, float_acc)]
    ptq: dict[int, api.QuantizedModel] = {}
    ptq_rows: dict[int, Row] = {}
    for a in PTQ_WIDTHS:
        t = time.time()
        qm = api.quantize(net, calib, acc_bits=a, overflow="guaranteed", labels=calib_labels)
        c = api.compile(qm, target="host", out_dir=out / f"{STORY_MODEL}-ptq{a}-host")
        acc = sweep.accuracy(c_outputs(c, qm, x_test, f"PTQ {a}-bit C on the host"), y_test)
        events = int(qm.report["calibration_overflow_events"])
        ptq[a] = qm
        ptq_rows[a] = Row(f"{name} PTQ W8A8", str(a), acc, float_acc, events)
        rows.append(ptq_rows[a])
        print(
            f"   PTQ {a:>2}-bit accumulators: {_pct(acc, float_acc)}, {events} overflows "
            f"({time.time() - t:.0f} s)"
        )

    a = FINETUNE_ACC_BITS
    print(f"\n3. Short fine-tunes that fit the demo's budget ({FINETUNE_EPOCHS} pass each):")
    t = time.time()
    sub = np.random.default_rng(1).permutation(len(x_train))[:FINETUNE_SAMPLES]
    qa = api.quantize(
        net, calib, method="adaptive", w_bits=4, a_bits=4, acc_bits=a, overflow="guaranteed",
        train=(x_train[sub], y_train[sub]), epochs=FINETUNE_EPOCHS, distill=True,
    )  # fmt: skip
    t_train = time.time() - t
    ref_a, events_a = reference_outputs(qa, x_test, f"adaptive {a}-bit integer reference")
    acc_a = sweep.accuracy(ref_a, y_test)
    row_a = Row(f"{name} adaptive W4A4", str(a), acc_a, float_acc, events_a)
    rows.append(row_a)
    print(
        f"   adaptive W4A4, {a}-bit accumulators (learned steps and offsets, A2Q+ bound, "
        f"distilled\n   from float; {len(sub)} training images, {t_train:.0f} s): "
        f"{_pct(acc_a, float_acc)}, {events_a} overflows\n   on the {n_test} test images "
        f"(integer reference); PTQ at {a} bits: "
        f"{100 * (ptq_rows[a].accuracy - float_acc):+.2f} pt; the default\n"
        "   2 full epochs reach about -0.8 pt (docs/adaptive.md)"
    )

    t = time.time()
    net_t, _ = _network(TRANSFORM_MODEL, TRANSFORM_EPOCHS, x_train, y_train)
    name_t = type(net_t).__name__
    float_t = train.accuracy(net_t, x_test, y_test, batch=128)
    sub_t = np.random.default_rng(2).permutation(len(x_train))[:TRANSFORM_SAMPLES]
    qt = api.quantize(
        net_t, calib, method="transform", bits_per_weight=TRANSFORM_BITS,
        acc_bits=TRANSFORM_ACC_BITS, overflow="guaranteed", labels=calib_labels,
        train=(x_train[sub_t], y_train[sub_t]), epochs=FINETUNE_EPOCHS,
    )  # fmt: skip
    c_t = api.compile(qt, target="host", out_dir=out / f"{TRANSFORM_MODEL}-transform")
    acc_t = sweep.accuracy(c_outputs(c_t, qt, x_test, "transform C on the host"), y_test)
    events_t = int(qt.report["calibration_overflow_events"])
    bpw = float(qt.report["weight_bits_per_param"])
    n_weights = _weights(net_t)
    row_t = Row(f"{name_t} transform", str(TRANSFORM_ACC_BITS), acc_t, float_t, events_t)
    _memory(c_t, row_t)
    rows += [Row(f"{name_t} float", "-", float_t, float_t), row_t]
    print(
        f"   transform quantization (KLT + bit allocation), {TRANSFORM_BITS:g} bits/weight, "
        f"{TRANSFORM_ACC_BITS}-bit accumulators,\n"
        f"   on {name_t} ({n_weights:,} weights; the {_weights(net):,} of {name} are too few "
        f"to code at {TRANSFORM_BITS:g} bits),\n"
        f"   float {_pct(float_t)}; retrained on {len(sub_t)} training images "
        f"({time.time() - t:.0f} s): {_pct(acc_t, float_t)},\n"
        f"   {events_t} overflows; coded at {bpw:.3f} bits/weight (side information included), "
        f"stored\n   packed in {row_t.flash:,} B of flash (float32: "
        f"{4 * n_weights:,} B)"
    )

    print(
        f"\n4. Generated C, adaptive W4A4 at {a}-bit accumulators (packed 4-bit weights), "
        "against\n   the NumPy integer reference:"
    )
    t = time.time()
    dest = out / f"{STORY_MODEL}-adaptive{a}"
    host = api.compile(qa, target="host", out_dir=dest)
    c_out = c_outputs(host, qa, x_test, "adaptive C on the host")
    ok = bool(np.array_equal(c_out, ref_a))
    print(
        f"   host         bit-exact {'yes' if ok else 'NO'} ({n_test} images; C accuracy "
        f"{_pct(sweep.accuracy(c_out, y_test))}; {time.time() - t:.0f} s)"
    )
    same, compiled_a = check_under_qemu(qa, dest, x_test, ref_a, SHORT_QEMU_IMAGES, "   ", 12)
    ok &= same
    row_a.bit_exact = (
        f"host {n_test}, " + ", ".join(f"{tg} {SHORT_QEMU_IMAGES[tg]}" for tg in QEMU_TARGETS)
        if ok
        else "NO"
    )

    print(
        f"\n5. Instructions per inference on {COUNT_TARGET} (NEON; one image under QEMU, "
        "instruction-count\n   plugin), flash (weights) and RAM (arena):"
    )
    counts: dict[int, int] = {}
    for w in COUNT_WIDTHS:
        c = api.compile(ptq[w], target=COUNT_TARGET, out_dir=out / f"{STORY_MODEL}-ptq{w}")
        counts[w] = _count(c, ptq_rows[w], f"PTQ W8A8, {w}-bit accumulators", x_test)
    _count(compiled_a[COUNT_TARGET], row_a, f"adaptive W4A4, {a}-bit", x_test)
    lo, hi = min(COUNT_WIDTHS), max(COUNT_WIDTHS)
    print(
        f"   speedup of {lo}-bit over {hi}-bit accumulators: {counts[hi] / counts[lo]:.2f}x "
        "fewer instructions"
    )

    print(
        f"\n6. Summary (accuracy: the generated C, {n_test} test images; weights, arena, "
        f"instructions:\n   {COUNT_TARGET} builds; the transform model's: its host build)\n"
    )
    print(summary_table(rows))
    print(f"\nThe adaptive W4A4 {a}-bit model for the host (the other builds are next to it):")
    print(f"   report  {host.out_dir / 'report.html'}")
    print(f"   library {host.static_lib}")
    print(f"   header  {host.header}")
    print(
        f"\ndone in {time.time() - t0:.0f} s. The full-length run (6-epoch adaptive training, "
        "width sweeps on two\nnetworks, QEMU on 500 images): qacc demo --full (make paper)"
    )
    return 0 if ok else 1


def summary_table(rows: list[Row]) -> str:
    head = (
        "| model | acc bits | accuracy | vs float | overflows | weights B | arena B "
        "| instructions | C bit-exact (images) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def opt(v: int | None) -> str:
        return "" if v is None else f"{v:,}"

    for r in rows:
        vs = "" if r.acc_bits == "-" else f"{100 * (r.accuracy - r.float_accuracy):+.2f}"
        lines.append(
            f"| {r.model} | {r.acc_bits} | {100 * r.accuracy:.2f}% | {vs} | {opt(r.overflows)} "
            f"| {opt(r.flash)} | {opt(r.arena)} | {opt(r.instructions)} | {r.bit_exact} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the full demo

WIDTHS = (32, 24, 20, 16, 14, 12, 10, 9, 8)
DS_WIDTHS = (32, 16, 14, 12, 10)
ADAPTIVE_MODEL = "fashion_ds"
ADAPTIVE_MODEL_EPOCHS = 6
ADAPTIVE_WIDTHS = (16, 12)
ADAPTIVE_EPOCHS = 6
"""Adaptive training epochs per accumulator width, with distillation from the float network
(`qacc sweep --qat-epochs` defaults to the same)."""
QEMU_IMAGES = 500
"""Test images the adaptive models classify under QEMU in the full run (the host runs all)."""


def compile_and_check(
    qm: api.QuantizedModel, out: Path, x_test: np.ndarray, y_test: np.ndarray
) -> bool:
    """Generate, build and run the C on the host; print accuracy, bit-exactness and memory."""
    t_compile = time.time()
    compiled = api.compile(qm, target="host", out_dir=out)
    t_compile = time.time() - t_compile
    c_out = compiled.run_int(x_test)
    ref_out = qm.reference_int(x_test)
    assert isinstance(ref_out, np.ndarray)  # the demo networks are classifiers: one output
    same = bool(np.array_equal(c_out, ref_out))
    mem = compiled.report["memory"]
    print(f"  C accuracy        {100 * sweep.accuracy(c_out, y_test):.2f}%")
    print(f"  reference         {100 * sweep.accuracy(ref_out, y_test):.2f}%")
    print(f"  bit-exact         {'yes' if same else 'NO'} ({len(y_test)} images)")
    print(f"  arena             {mem['arena_bytes']} B (lower bound {mem['arena_lower_bound']} B)")
    print(f"  weights (flash)   {mem['flash_weight_bytes']} B")
    print(f"  generate + build  {t_compile:.1f} s; report: {out / 'report.html'}")
    return same


def check_under_qemu(
    qm: api.QuantizedModel,
    out: Path,
    x: np.ndarray,
    ref: np.ndarray,
    images: Mapping[str, int],
    indent: str = "  ",
    width: int = 17,
) -> tuple[bool, dict[str, Compiled]]:
    """Cross-compile for each QEMU_TARGETS core (into <out>-<target>), run the first
    images[target] inputs of `x` under QEMU and compare with `ref` (the reference's outputs on
    `x`), one line per target. Returns whether all were bit-exact, and the builds."""
    ok = True
    builds: dict[str, Compiled] = {}
    for target in QEMU_TARGETS:
        t0 = time.time()
        n = images[target]
        c = api.compile(qm, target=target, out_dir=out.with_name(f"{out.name}-{target}"))
        builds[target] = c
        same = bool(np.array_equal(c_outputs(c, qm, x[:n], f"{target} QEMU"), ref[:n]))
        ok &= same
        print(
            f"{indent}{target:<{width}} bit-exact {'yes' if same else 'NO'} ({n} images under "
            f"QEMU; {time.time() - t0:.0f} s)"
        )
    return ok, builds


def full(model_name: str = "fashion_cnn", epochs: int = 4, out_dir: Path | None = None) -> int:
    """The full-length demo (`qacc demo --full`, `make paper`)."""
    t0 = time.time()
    preflight(QEMU_TARGETS, count=False)
    out = out_dir or OUT
    x_train, y_train, x_test, y_test = datasets.fashion_mnist()
    idx = np.random.default_rng(0).choice(len(x_train), CALIB, replace=False)
    calib, calib_labels = x_train[idx], y_train[idx]
    common: dict[str, Any] = {"train": (x_train, y_train), "test": (x_test, y_test)}

    print(f"qacc demo --full: {model_name} on Fashion-MNIST")
    net, where = _network(model_name, epochs, x_train, y_train)
    print(f"  float network: {where}")
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
    net2, where2 = _network(ADAPTIVE_MODEL, ADAPTIVE_MODEL_EPOCHS, x_train, y_train)
    print(f"  float network: {where2}")
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
        dest = out / f"{ADAPTIVE_MODEL}-adaptive{a}"
        ok &= compile_and_check(qa, dest, x_test, y_test)
        x = x_test[:QEMU_IMAGES]
        want = qa.reference_int(x)
        assert isinstance(want, np.ndarray)  # the demo networks are classifiers: one output
        same, _ = check_under_qemu(qa, dest, x, want, dict.fromkeys(QEMU_TARGETS, len(x)))
        ok &= same
    print(f"\ndone in {time.time() - t0:.0f} s")
    return 0 if ok else 1


def main(
    full_run: bool = False,
    model_name: str | None = None,
    epochs: int | None = None,
    out_dir: Path | None = None,
) -> int:
    """`qacc demo`: the short demo, or with `full_run` the full-length one (`model_name` and
    `epochs` choose its first network)."""
    if not full_run:
        if model_name is not None or epochs is not None:
            raise QaccError(
                "--model and --epochs choose the first network of the full run; add --full"
            )
        return short(out_dir or OUT)
    return full(model_name or "fashion_cnn", 4 if epochs is None else epochs, out_dir)
