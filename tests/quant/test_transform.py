"""Transform quantization (codegen/quant/transform.py): the reverse water-filling allocation
against its closed form, the rate accounting, decorrelation, the transform-domain lowering
bit-exact through the generated C (host, and under QEMU on cortex-a53 and cortex-m55), and a short
retraining run end to end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import codegen
from codegen.core.errors import QaccError
from codegen.quant import transform as tq


def _closed_form(var: np.ndarray, w: np.ndarray, total: float) -> np.ndarray:
    """R_k = R_mean + 1/2 log2(var_k / geometric mean), the weighted geometric mean of var."""
    r_mean = total / w.sum()
    log_gm = float((w * np.log2(var)).sum() / w.sum())
    return r_mean + 0.5 * (np.log2(var) - log_gm)


@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [3, 1, 2, 5]])
def test_waterfill_matches_closed_form_without_clipping(weights: list[int]) -> None:
    var = np.array([4.0, 2.0, 1.0, 0.5])
    w = np.array(weights, dtype=np.float64)
    total = 3.0 * w.sum()
    want = _closed_form(var, w, total)
    assert (want > 0).all()  # no rate clips at this budget
    got, theta = tq.waterfill(var, w, total)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert math.isclose(float((w * got).sum()), total, rel_tol=1e-12)
    # every active component is distorted down to the water level theta
    np.testing.assert_allclose(var * np.exp2(-2 * got), theta, rtol=1e-9)


def test_waterfill_with_clipping() -> None:
    # all active would give the last component a negative rate: it is dropped; the others share
    # 3 bits: mean 1.5, geometric mean 4 -> 2.5 and 0.5 (theta = 0.5 > 1/64)
    got, theta = tq.waterfill(np.array([16.0, 1.0, 1 / 64]), np.ones(3), 3.0)
    np.testing.assert_allclose(got, [2.5, 0.5, 0.0], atol=1e-9)
    assert math.isclose(theta, 0.5, rel_tol=1e-9)
    # the cap: 2^20 would take 10.5 bits; capped at 8, the rest get 1.5 and 0.5 (theta 0.5)
    got, theta = tq.waterfill(np.array([2.0**20, 4.0, 1.0]), np.ones(3), 10.0, max_bits=8)
    np.testing.assert_allclose(got, [8.0, 1.5, 0.5], atol=1e-9)


def _options(rng: np.random.Generator) -> tuple[list[list[tq.Option]], list[int]]:
    ws = [rng.standard_normal((6, 20)) * rng.uniform(0.1, 2, (6, 1)) for _ in range(3)]
    return [[tq._option("identity", w, None)] for w in ws], [20, 20, 20]


def test_allocation_meets_budget_near_the_continuous_solution() -> None:
    options, ks = _options(np.random.default_rng(0))
    n = sum(len(o[0].var) * k for o, k in zip(options, ks, strict=True))
    for bpw in (1.0, 2.5, 4.0):
        picks = tq.allocate(options, ks, bpw * n)
        total = sum(
            sum(tq.layer_bits("identity", len(b), ks[li], b).values())
            for li, (_, b) in enumerate(picks)
        )
        assert total <= bpw * n
        assert total > bpw * n - 20 - tq.STEP_BITS  # no whole free bit left for any row
        var = np.concatenate([o[0].var for o in options])
        side = sum(sum(tq.side_bits("identity", 6, b).values()) for _, b in picks)
        cont, _ = tq.waterfill(var, np.full(var.size, 20.0), bpw * n - side, tq.MAX_BITS)
        got = np.concatenate([b for _, b in picks])
        assert np.abs(got - cont).max() <= 1.5  # rounding + fix-up stay near water-filling
        # more variance never gets fewer bits inside a layer (same K, same quantizer family)
        for opts, (_, b) in zip(options, picks, strict=True):
            order = np.argsort(opts[0].var)
            assert (np.diff(b[order]) >= -1).all()


def test_rate_accounting_by_hand() -> None:
    # transform layer: O=4, K=9, kept rows with 3 and 1 bits: 9*4 coefficient bits, U 4x2 at 8
    # bits, per kept row depth + exponent (12), per row of U an exponent (8), a 32-bit header
    assert tq.layer_bits("klt", 4, 9, np.array([3, 1])) == {
        "coefficients": 36,
        "transform": 64,
        "formats": 24 + 32,
        "header": 32,
    }
    # identity layer: every row a depth field, live rows an exponent
    assert (
        sum(tq.layer_bits("identity", 4, 9, np.array([2, 0, 1, 3])).values()) == 54 + 16 + 24 + 32
    )


class _LowRank(nn.Module):
    """conv 1->8, conv 8->12 (stride 2), dense -> 6; low-rank weights so the KLT pays."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, 6)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m, rank in ((self.c2, 3), (self.fc, 2)):
                o = m.weight.shape[0]
                a = torch.randn(o, rank, generator=g)
                b = torch.randn(rank, m.weight[0].numel(), generator=g) * 0.2
                m.weight.copy_((a @ b).reshape(m.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        return self.fc(torch.flatten(y, 1))


def _data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def factored() -> Any:
    return codegen.quantize(
        _LowRank().eval(),
        _data(64),
        method="transform",
        bits_per_weight=3.0,
        transform_deploy="factored",
        progress=False,
        name="tq",
    )


def test_klt_and_elt_decorrelate() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 3)) @ rng.standard_normal((3, 40)) + 0.1 * rng.standard_normal(
        (6, 40)
    )
    a = rng.standard_normal((40, 40))
    g = a @ a.T / 40
    for gm in (None, g):
        u, y, var = tq.decorrelate(w, gm)
        np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-10)
        np.testing.assert_allclose(u @ y, w, atol=1e-10)
        m = y @ (y.T if gm is None else gm @ y.T) / 40
        off = m - np.diag(np.diag(m))
        assert np.abs(off).max() < 1e-9 * np.abs(m).max()
        assert (np.diff(var) <= 1e-12).all()  # sorted by decreasing variance
        np.testing.assert_allclose(var, np.diag(m), rtol=1e-9)


def test_transform_report_and_rate(factored: Any) -> None:
    rep = factored.report
    t = rep["transform"]
    assert rep["weight_bits_per_param"] <= 3.0
    assert {lay["transform"] for lay in t["layers"]} >= {"klt"}
    total = 0
    for lay in t["layers"]:
        hist = {int(k): v for k, v in lay["bits_histogram"].items()}
        coef = lay["K"] * sum(b * c for b, c in hist.items())
        live = sum(c for b, c in hist.items() if b > 0)
        if lay["transform"] == "identity":
            side = lay["O"] * 4 + live * 8 + 32
        else:
            assert lay["r"] == live < lay["O"]  # low rank: rows dropped
            side = lay["O"] * lay["r"] * 8 + live * 12 + lay["O"] * 8 + 32
        total += coef + side
        for how in ("factored", "reconstructed"):
            if lay["transform"] != "identity":
                assert lay["flash_bytes"][how] > 0 and lay["macs"][how] > 0
    assert total == t["rate_bits"]["total"]
    assert math.isclose(rep["weight_bits_per_param"], total / t["float_weights"])
    assert t["float_weights"] == 8 * 9 + 12 * 72 + 6 * 192


def test_factored_lowering_is_bit_exact_on_host(factored: Any, tmp_path: Path) -> None:
    g = factored.graph
    coef = [n for n in g.nodes if n.name.endswith("_coef")]
    assert coef, "no layer was deployed in the transform domain"
    for n in coef:
        assert n.requant is not None and n.requant.lo < 0  # signed, no clamp
        assert not np.any(n.params["bias"])
        after = g.consumers(n.output)[0]
        if after.op == "conv2d":
            assert after.params["weight"].shape[1:3] == (1, 1)
        assert int(np.abs(after.params["weight"]).max()) <= 127
    x = _data(16, seed=5)
    c = codegen.compile(factored, target="host", out_dir=tmp_path / "tq")
    assert np.array_equal(c.run_int(x), factored.reference_int(x))
    # the float64 simulation of the same formats agrees with the integer reference
    ref = factored.reference(x)
    assert np.abs(factored.simulate(x) - ref).max() < 1e-9


@pytest.mark.parametrize("deploy", ["reconstructed", "auto"])
def test_other_deployments_bit_exact(deploy: str, tmp_path: Path) -> None:
    qm = codegen.quantize(
        _LowRank().eval(),
        _data(64),
        method="transform",
        transform="elt",
        bits_per_weight=2.0,
        transform_deploy=deploy,
        progress=False,
        name="tq",
    )
    if deploy == "reconstructed":
        assert not any(n.name.endswith("_coef") for n in qm.graph.nodes)
    x = _data(8, seed=6)
    c = codegen.compile(qm, target="host", out_dir=tmp_path / "tq")
    assert np.array_equal(c.run_int(x), qm.reference_int(x))


@pytest.mark.qemu
@pytest.mark.parametrize("target", ["cortex-a53", "cortex-m55"])
def test_factored_lowering_under_qemu(factored: Any, target: str, tmp_path: Path) -> None:
    x = _data(6, seed=7)
    c = codegen.compile(factored, target=target, out_dir=tmp_path / target)
    assert np.array_equal(c.run_int(x), factored.reference_int(x))


def test_retraining_end_to_end(tmp_path: Path) -> None:
    model = _LowRank().eval()
    x = _data(256, seed=8)
    with torch.no_grad():
        y = model(torch.as_tensor(x)).argmax(1).numpy()
    kw: dict[str, Any] = dict(method="transform", bits_per_weight=1.5, progress=False, name="tq")
    base = codegen.quantize(model, x[:64], **kw)
    qm = codegen.quantize(model, x[:64], train=(x, y), epochs=1, **kw)
    hist = qm.report["transform"]["retraining"]
    assert len(hist) == 1 and math.isfinite(hist[0]["loss"])
    assert qm.report["weight_bits_per_param"] == base.report["weight_bits_per_param"]
    moved = [
        not np.array_equal(a.params["weight"], b.params["weight"])
        for a, b in zip(qm.graph.nodes, base.graph.nodes, strict=True)
        if "weight" in a.params
    ]
    assert any(moved)  # training changed some integer weights, at the same bit depths
    c = codegen.compile(qm, target="host", out_dir=tmp_path / "rt")
    assert np.array_equal(c.run_int(x[:8]), qm.reference_int(x[:8]))


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"transform": "dct"}, "unknown transform"),
        ({"transform_deploy": "both"}, "unknown transform_deploy"),
        ({"bits_per_weight": 0.0}, "bits_per_weight"),
        ({"bits_per_weight": 0.01}, "side information"),
    ],
)
def test_user_errors(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(QaccError, match=msg):
        codegen.quantize(_LowRank().eval(), _data(8), method="transform", progress=False, **kw)


def test_rate_table_plot_and_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from codegen import cli
    from codegen.tools import rate

    rows = [
        {"method": m, "retrained": t, "target_bits_per_weight": b, "bits_per_weight": b - 0.01,
         "accuracy": 0.5 + 0.05 * b + 0.01 * t}
        for m in ("uniform", "klt") for t in (False, True) for b in (1.0, 2.0)
    ]  # fmt: skip
    res = {"network": "net", "float_accuracy": 0.9, "epochs": 1, "train_samples": 10,
           "test_samples": 5, "rows": rows}  # fmt: skip
    md = rate.markdown(res)
    assert "| 2 | 60.00 (1.990) | 61.00 (1.990) | 60.00 (1.990) | 61.00 (1.990) |" in md
    rate.plot(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["rate", "--transforms", "dct"]) == 2
    assert "klt and/or elt" in capsys.readouterr().err
