"""Accumulator-aware error-correcting rounding (OPTQ, GPFQ): the bound, the error, the C."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import codegen
from codegen.core import simulate
from codegen.core.errors import QaccError
from codegen.core.ir import WEIGHTED_OPS, Node, QFormat
from codegen.quant.accumulator import WeightQuant, acc_limits, channel_bounds, quantize_weights
from codegen.quant.rounding import layer_stats, patches, refine
from tests.nets import Branchy, randomized


def _layer(kind: str, rng: np.random.Generator) -> tuple[Node, torch.Tensor]:
    """A random dense, conv or depthwise conv layer and float NCHW / (N, K) inputs for it."""
    if kind == "dense":
        k, o = int(rng.integers(8, 120)), int(rng.integers(1, 12))
        w = rng.standard_normal((o, k)) * rng.uniform(0.05, 2.0, (o, 1))
        x = rng.standard_normal((64, 6)) @ rng.standard_normal((6, k))  # correlated inputs
        node = Node("d", "dense", ("x",), "y", {}, {"weight": w, "bias": rng.standard_normal(o)})
        return node, torch.from_numpy(x)
    c = int(rng.integers(2, 9))
    groups = c if kind == "depthwise" else 1
    o = c if kind == "depthwise" else int(rng.integers(1, 10))
    w = rng.standard_normal((o, 3, 3, c // groups)) * rng.uniform(0.1, 1.0, (o, 1, 1, 1))
    attrs = {"padding": (1, 1, 1, 1), "stride": (1, 1), "dilation": (1, 1), "groups": groups}
    node = Node("c", "conv2d", ("x",), "y", attrs, {"weight": w, "bias": rng.standard_normal(o)})
    return node, torch.from_numpy(rng.standard_normal((16, c, 6, 6)))


def _narrowest(node: Node, fmt: QFormat) -> tuple[int, WeightQuant]:
    w = node.params["weight"]
    for a in range(8, 33):
        wq = quantize_weights(w.reshape(w.shape[0], -1), node.params["bias"], fmt.frac,
                              fmt.qmin, fmt.qmax, a)  # fmt: skip
        if wq is not None:
            return a, wq
    raise AssertionError("no width fits")


@pytest.mark.parametrize("kind", ["dense", "conv", "depthwise"])
@pytest.mark.parametrize("rounding", ["optq", "gpfq"])
def test_bound_holds_at_the_narrowest_widths(kind: str, rounding: str) -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        node, x = _layer(kind, rng)
        signed = bool(seed % 2)
        x = x if signed else x.abs()
        fmt = QFormat(int(rng.integers(3, 9 if signed else 8)), signed, int(rng.integers(1, 5)))
        xq = simulate.fake_quant(x, fmt)
        stats = layer_stats(node, xq, x, max_rows=512, seed=seed)
        a0, _ = _narrowest(node, fmt)
        for a in (a0, a0 + 1, a0 + 3):
            w = node.params["weight"]
            wq = quantize_weights(w.reshape(w.shape[0], -1), node.params["bias"], fmt.frac,
                                  fmt.qmin, fmt.qmax, a)  # fmt: skip
            assert wq is not None
            got = refine(node, wq, stats, rounding, fmt.qmin, fmt.qmax, a, "guaranteed")
            lo, hi = channel_bounds(got.q, got.bias, fmt.qmin, fmt.qmax)
            acc_lo, acc_hi = acc_limits(a)
            assert lo.min() >= acc_lo and hi.max() <= acc_hi, (seed, a)
            assert np.abs(got.q).max() <= 127
            assert np.array_equal(lo, got.bound_lo) and np.array_equal(hi, got.bound_hi)
            assert np.all((got.frac == wq.frac) | (got.frac == wq.frac + 1))


def test_error_feedback_beats_nearest_on_the_layer_output() -> None:
    rng = np.random.default_rng(7)
    k, o = 96, 16
    mix = rng.standard_normal((8, k))
    x = torch.from_numpy(np.abs(rng.standard_normal((512, 8)) @ mix))
    w = rng.standard_normal((o, k)) * 0.3
    node = Node("d", "dense", ("x",), "y", {}, {"weight": w, "bias": np.zeros(o)})
    fmt = QFormat(6, False, 2)
    xq = simulate.fake_quant(x, fmt)
    a = _narrowest(node, fmt)[0] + 2
    near = quantize_weights(w, np.zeros(o), fmt.frac, fmt.qmin, fmt.qmax, a)
    assert near is not None
    stats = layer_stats(node, xq, x)

    def err(wq: WeightQuant, target: torch.Tensor) -> float:
        wd = torch.from_numpy(wq.dequantized()[0])
        return float(((target - xq @ wd.T) ** 2).mean())

    exact_q, exact_f = xq @ torch.from_numpy(w).T, x @ torch.from_numpy(w).T
    for rounding, target in (("optq", exact_q), ("gpfq", exact_f)):
        got = refine(node, near, stats, rounding, fmt.qmin, fmt.qmax, a, "guaranteed", False)
        assert err(got, target) < 0.8 * err(near, target), rounding


def test_quantize_with_each_rounding_is_exact_and_in_bounds() -> None:
    model = randomized(Branchy(), seed=2)
    rng = np.random.default_rng(0)
    x = rng.random((48, 3, 12, 12), dtype=np.float32)
    test = rng.random((64, 3, 12, 12), dtype=np.float32) * 1.5
    for rounding in ("optq", "gpfq"):
        qm = codegen.quantize(model, x, acc_bits=14, progress=False, rounding=rounding)
        for row in qm.report["layers"]:
            assert row.get("bound_fits", True), (rounding, row["name"])
        res = qm.run_reference(test)
        assert all(v.events == 0 for v in res.overflow.values())
        assert np.array_equal(qm.dequantize_output(res.output), qm.simulate(test))
    assert sum(n.op in WEIGHTED_OPS for n in qm.graph.nodes) > 2
    with pytest.raises(QaccError, match="unknown rounding 'round'"):
        codegen.quantize(model, x, acc_bits=14, progress=False, rounding="round")


MODEL_PY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 5),
    ).eval()
"""


def _qacc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter, importing this checkout's codegen."""
    env = {**os.environ, "PYTHONPATH": str(Path(codegen.__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "codegen.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip


def test_cli_rounding_compiles_bit_exact_and_refuses_bad_values(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(MODEL_PY)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.random((48, 1, 8, 8), dtype=np.float32))
    np.save(tmp_path / "x.npy", rng.random((20, 1, 8, 8), dtype=np.float32))
    common = ("compile", "net.py:make", "--calib", "calib.npy", "--acc-bits", "12")
    r = _qacc(*common, "--rounding", "gpfq", "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    v = _qacc("verify", "out", "--inputs", "x.npy", cwd=tmp_path)
    assert v.returncode == 0 and "20 bit-exact, 0 differ" in v.stdout, v.stdout + v.stderr
    bad = _qacc(*common, "--rounding", "round", "--out", "bad", cwd=tmp_path)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: argument --rounding: invalid choice" in lines[-1], bad.stderr
    sweep = _qacc("sweep", "--rounding", "optq,round", cwd=tmp_path)
    assert sweep.returncode == 2 and "Traceback" not in sweep.stderr
    assert sweep.stderr.strip().splitlines() == ["qacc: error: unknown rounding 'round'; "
                                                 "choose one of nearest, optq, gpfq"]  # fmt: skip


@pytest.mark.parametrize(
    ("groups", "stride", "padding"),
    [(1, (1, 1), (1, 1, 1, 1)), (4, (2, 2), (0, 1, 0, 1)), (2, (1, 2), (1, 0, 2, 1))],
)
def test_patches_times_weights_is_the_convolution(
    groups: int, stride: tuple[int, int], padding: tuple[int, int, int, int]
) -> None:
    rng = np.random.default_rng(groups)
    c, o = 4, 4 * groups
    w = rng.standard_normal((o, 3, 3, c // groups))
    x = torch.from_numpy(rng.standard_normal((3, c, 7, 6)))
    attrs = {"padding": padding, "stride": stride, "dilation": (1, 1), "groups": groups}
    node = Node("c", "conv2d", ("x",), "y", attrs, {"weight": w, "bias": np.zeros(o)})
    got = patches(node, x) @ torch.from_numpy(w.reshape(groups, o // groups, -1)).transpose(1, 2)
    top, bottom, left, right = padding
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (left, right, top, bottom)),
        torch.from_numpy(w).permute(0, 3, 1, 2),
        stride=stride,
        groups=groups,
    )
    ref = ref.permute(0, 2, 3, 1).reshape(-1, groups, o // groups).permute(1, 0, 2)
    assert torch.allclose(got, ref)
