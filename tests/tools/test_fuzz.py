"""Differential fuzzing (codegen/tools/fuzz.py): generated C == the NumPy reference, bit for bit.

* host: a bounded number of random integer graphs and quantized torch models per run, built in one
  CMake project with -Werror (and a second batch with ASan + UBSan), each test bench compared with
  reference.run by np.array_equal;
* every QEMU target: a few cases each (marked `qemu`);
* guaranteed overflow policy under attack: per output channel, the input that drives the exact
  sum to its bound (maximum input where the weight is positive, minimum where negative); the
  reference sees no overflow, the sum equals the bound computed in Python, and the C output equals
  the requantized exact (unwrapped) sum.
The cases are a function of their seeds: set QACC_FUZZ_SEED to explore others (default 0). The
long campaign is `make fuzz N=10000` (scripts/fuzz.py).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import codegen
from codegen.backend import layouts
from codegen.backend.emit import emit, write_files
from codegen.backend.lower import lower
from codegen.core import reference
from codegen.core.errors import InfeasibleAccumulatorError
from codegen.core.formats import requantize
from codegen.quant.accumulator import acc_limits, channel_bounds
from codegen.targets.build import BuildResult, BuildTarget, build_many
from codegen.targets.compiled import run_testbench
from codegen.targets.table import TargetError, check_tools, get_target
from codegen.tools import fuzz

SEED = int(os.environ.get("QACC_FUZZ_SEED", "0"))
QEMU_TARGETS = [
    "cortex-a53", "cortex-a72", "cortex-a76", "cortex-a7", "cortex-m4", "cortex-m7", "cortex-m55",
]  # fmt: skip
"""Every ARM target, a few cases each (the long campaign takes --target)."""
QEMU_CASES = 5


def _seeds(offset: int, n: int) -> range:
    base = SEED * 1_000_000_000 + offset
    return range(base, base + n)


def _assert_clean(stats: fuzz.FuzzStats, what: str) -> None:
    detail = "\n".join(stats.failures[:10])
    assert stats.ok, f"{what} (QACC_FUZZ_SEED={SEED}): {stats.summary()}\n{detail}"


# ----------------------------------------------------------------------------- the generators


def test_generators_are_deterministic_and_cover_the_kernels() -> None:
    g1, x1 = fuzz.random_graph(17)
    g2, x2 = fuzz.random_graph(17)
    assert np.array_equal(x1, x2) and emit(g1) == emit(g2)
    kernels: Counter[str] = Counter()
    widths: set[int] = set()
    attrs: Counter[str] = Counter()
    several = 0
    fused: Counter[str] = Counter()
    cortexm: Counter[str] = Counter()
    for seed in range(300):
        g, x = fuzz.random_graph(seed)
        assert x.shape == (4, *g.tensors[g.input].shape)
        several += len(g.outputs) > 1
        calls = lower(g).calls
        kernels.update(c.kernel for c in calls)
        for d in ("dsp", "mve"):  # the Cortex-M grouped-conv and channel-multiplier kernels
            paths = (str(layouts.path(c, d, layouts.A64)) for c in lower(g, d).calls)
            tails = ("-".join([d, *p.split("-")[-2:]]) for p in paths)  # e.g. dsp-w16-grouped
            cortexm.update(t for t in tails if t.endswith(("-grouped", "-chmult")))
        fused.update(c.template for c in calls if c.lut is not None)  # a table in the store
        for n in g.nodes:
            widths.add(n.attrs.get("acc_bits", 0))
            a = n.attrs
            attrs.update(
                k
                for k, hit in (
                    ("stride", max(a.get("stride", (1, 1))) > 1),
                    ("dilation", max(a.get("dilation", (1, 1))) > 1),
                    ("padding", any(a.get("padding", ()))),
                    ("groups", a.get("groups", 1) > 1),
                    ("input_zero_point", "input_zero_point" in a or "input_zero_points" in a),
                    ("requant_zero_point", n.requant is not None and n.requant.zero_point != 0),
                )
                if hit
            )
    for k in (
        "conv2d_acc16", "conv2d_acc32", "conv2d_pointwise_acc16", "conv2d_pointwise_acc32",
        "conv2d_depthwise_acc16", "conv2d_depthwise_acc32", "dense_acc16", "dense_acc32",
        "maxpool2d", "avgpool2d_acc16", "avgpool2d_acc32", "global_avgpool_acc16",
        "global_avgpool_acc32", "add_acc16", "add_acc32", "concat", "lut", "mul_acc16",
        "mul_acc32", "softmax", "gather", "adaptive_avgpool2d_acc16", "adaptive_avgpool2d_acc32",
        "adaptive_maxpool2d", "resize_bilinear_acc16", "resize_bilinear_acc32", "conv2d_acc16x32",
        "conv2d_acc32x32", "dense_acc16x32", "dense_acc32x32", "zero_insert",
    ):  # fmt: skip
        assert kernels[k] > 0, (k, kernels)
    assert set(range(8, 33)) <= widths
    for k in ("dsp-w16-grouped", "dsp-smlad-grouped", "mve-im2col-grouped", "dsp-smlabb-chmult",
              "mve-lanes16-chmult", "mve-lanes32-chmult"):  # fmt: skip
        assert cortexm[k] > 0, (k, cortexm)
    for t in ("conv2d", "conv2d_pointwise", "conv2d_depthwise", "dense", "add", "avgpool2d"):
        assert fused[t] > 0, (t, fused)  # tables fused into their producer run in the campaigns
    assert several > 30  # graphs with intermediate (or repeated) tensors as further outputs
    assert min(attrs.values()) > 10 and len(attrs) == 6, attrs
    models = [fuzz.random_model(s) for s in range(40)]
    shuffles = sum("Shuffle" in str(m[0]) for m in models)
    assert shuffles > 3  # chunk + channel shuffle models (gather nodes after quantization)
    pools = sum(
        any(
            isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and m.output_size != 1
            for m in model.modules()
        )
        for model, *_ in models
    )
    assert pools > 3  # adaptive pools to any size
    resizes = sum(
        any(isinstance(m, nn.Upsample) and m.mode == "bilinear" for m in model.modules())
        for model, *_ in models
    )
    assert resizes > 3  # bilinear upsampling
    policies = Counter(m[4] for m in models)
    assert policies["guaranteed"] > 5 and policies["profiled"] > 5
    layers = Counter(type(m).__name__ for model, *_ in models for m in model.modules())
    assert layers["SqueezeExcitation"] > 3 and layers["Softmax"] > 3, layers
    assert layers["ConvTranspose2d"] > 3, layers


# ----------------------------------------------------------------------------- host


def test_fuzz_host(tmp_path: Path) -> None:
    """Random graphs and quantized models, -O2 -Werror, one CMake project."""
    stats = fuzz.run_cases(_seeds(0, 24), BuildTarget("host", c_flags=("-O2",)), tmp_path)
    _assert_clean(stats, "host")
    assert stats.cases + stats.infeasible == 24 and stats.wrapped > 0


def test_fuzz_host_asan_ubsan(tmp_path: Path) -> None:
    """Other random cases built with ASan + UBSan (-fno-sanitize-recover: any report fails)."""
    tgt = BuildTarget("host", c_flags=("-O1",))
    stats = fuzz.run_cases(_seeds(500, 16), tgt, tmp_path, sanitize=True)
    _assert_clean(stats, "host, ASan + UBSan")
    assert stats.cases + stats.infeasible == 16


@settings(max_examples=3, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(seeds=st.lists(st.integers(0, 2**40), min_size=6, max_size=6, unique=True))
def test_property_generated_c_equals_reference(seeds: list[int]) -> None:
    """Hypothesis draws the cases: random layer configurations, graphs and quantized models, a
    new sample in every CI run, each batch built in one CMake project and compared with the
    reference bit for bit. A failure prints the seeds; `fuzz.run_cases([seed])` replays one."""
    stats = fuzz.run_cases(seeds, BuildTarget("host", c_flags=("-O2",)))
    _assert_clean(stats, f"hypothesis seeds {seeds}")


# ----------------------------------------------------------------------------- QEMU


@pytest.mark.qemu
@pytest.mark.parametrize("target", QEMU_TARGETS)
def test_fuzz_qemu(target: str, tmp_path: Path) -> None:
    try:
        check_tools(get_target(target))
    except TargetError as e:
        pytest.fail(str(e))
    i = QEMU_TARGETS.index(target)
    stats = fuzz.run_cases(_seeds(1000 + 100 * i, QEMU_CASES), target, tmp_path)
    _assert_clean(stats, target)
    assert stats.cases + stats.infeasible == QEMU_CASES


# ----------------------------------------------------------------------------- adversarial


def _adversarial_models(rng: np.random.Generator) -> list[tuple[str, nn.Module, np.ndarray]]:
    """(name, model, calibration data): dense and conv layers with random sizes and scales."""
    out = []
    for i in range(6):
        torch.manual_seed(int(rng.integers(0, 2**31)))
        signed = bool(i % 2)
        if i < 3:
            k, o = int(rng.integers(4, 200)), int(rng.integers(1, 7))
            model: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(k, o))
            shape: tuple[int, ...] = (16, k, 1, 1)
        else:
            cin, o, kk = int(rng.integers(1, 6)), int(rng.integers(1, 7)), int(rng.integers(1, 4))
            model = nn.Sequential(nn.Conv2d(cin, o, kk))
            shape = (16, cin, kk, kk)  # input size == kernel size: one output position
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(float(rng.uniform(0.1, 20.0)))
        x = rng.standard_normal(shape) if signed else rng.random(shape)
        out.append((f"adv{i}", model.eval(), x.astype(np.float32)))
    return out


def test_guaranteed_adversarial_inputs_through_the_c(tmp_path: Path) -> None:
    rng = np.random.default_rng([SEED, 0xADE])
    cases = []
    infeasible = 0
    for name, model, calib in _adversarial_models(rng):
        acc = int(rng.integers(8, 33))
        try:
            qm = codegen.quantize(
                model, calib, acc_bits=acc, overflow="guaranteed", progress=False, name=name
            )
        except InfeasibleAccumulatorError:
            infeasible += 1
            continue
        g = qm.graph
        node = next(n for n in g.nodes if n.op in ("dense", "conv2d"))
        fin = g.tensors[node.inputs[0]].fmt
        assert fin is not None
        q = node.params["weight"]  # (O, I) or (O, kh, kw, cin): the NHWC input layout
        o = q.shape[0]
        # sample 2c drives channel c to its maximum, sample 2c + 1 to its minimum
        xs = np.stack(
            [np.where(q[c] * s > 0, fin.qmax, fin.qmin) for c in range(o) for s in (1, -1)]
        ).reshape((2 * o, *g.tensors[g.input].shape))
        exact = xs.reshape(2 * o, -1) @ q.reshape(o, -1).T + node.params["bias"]
        lo, hi = channel_bounds(q, node.params["bias"], fin.qmin, fin.qmax)
        assert np.array_equal(exact[0::2].diagonal(), hi), name  # the bound is reached
        assert np.array_equal(exact[1::2].diagonal(), lo), name
        a_lo, a_hi = acc_limits(int(node.attrs["acc_bits"]))
        assert a_lo <= int(exact.min()) and int(exact.max()) <= a_hi, name
        res = reference.run(g, xs)
        assert all(v.events == 0 for v in res.overflow.values()), (name, res.overflow)
        rq = node.requant
        assert rq is not None
        from_exact = requantize(exact, rq.mult, rq.shift, rq.zero_point, rq.lo, rq.hi)
        assert np.array_equal(res.output.reshape(2 * o, -1), from_exact), name
        d = tmp_path / "models" / name
        write_files(emit(g, name), d)
        cases.append((d, g, xs, from_exact))
    assert len(cases) >= 3, f"only {len(cases)} of 6 widths were feasible"
    results = build_many([d for d, *_ in cases], tmp_path / "build", sanitize=False)
    for d, g, xs, want in cases:
        r = results[d.resolve()]
        assert isinstance(r, BuildResult) and r.testbench is not None, r
        got = run_testbench(r.testbench, xs, g.tensors[g.input].shape, g.tensors[g.output].shape)
        assert np.array_equal(got.reshape(want.shape), want), d.name
    shutil.rmtree(tmp_path / "build", ignore_errors=True)
