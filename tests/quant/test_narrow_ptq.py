"""Narrow-accumulator PTQ options: activation clipping and cross-layer equalization."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import codegen
from codegen import cli
from codegen.api import describe_bits, float_graph
from codegen.core import simulate
from codegen.core.errors import QaccError
from codegen.core.ir import WEIGHTED_OPS, Graph
from codegen.quant.equalize import (
    Chain,
    channel_max,
    equalize,
    input_channel,
    pairs,
    weight_ranges,
)


def _chain_net(seed: int = 0) -> nn.Module:
    """conv+BN+ReLU -> maxpool -> depthwise+ReLU -> pointwise+ReLU -> flatten -> linear, with
    output channels of very different scales (what equalization evens out)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),
        nn.Conv2d(6, 5, 1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 16, 4),
    )  # fmt: skip
    with torch.no_grad():
        for i in (0, 4, 6):
            conv = net[i]
            assert isinstance(conv, nn.Conv2d)
            s = torch.logspace(-1, 1, conv.out_channels)[torch.randperm(conv.out_channels)]
            conv.weight.mul_(s.view(-1, 1, 1, 1))
            conv.bias.mul_(s)
        net[1].running_mean.uniform_(-0.5, 0.5)
    return net.eval()


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2, 8, 8)).astype(np.float32)


def _float(g: Graph, x: np.ndarray) -> np.ndarray:
    return simulate.run(g, simulate.nchw_to_nhwc(x), dtype=torch.float64)


def _bounds(g: Graph, c: Chain, x_nhwc: np.ndarray) -> tuple[float, float]:
    """The channel bounds of c.second in real units, summed over its channels: Σ|w| · max|x| with
    the per-tensor input maximum the quantizer charges, and the tightest (every weight charged
    its own input channel's maximum), over the channels alive on x."""
    m = channel_max(g, x_nhwc, {c.first})[c.first]
    node = g.node(c.second)
    w = np.abs(node.params["weight"])
    ch = np.broadcast_to(input_channel(node, c.channels), w.shape)
    w = w * (m[ch] > 0)  # a channel dead on x keeps its scale: left out
    charged = (w * m.max()).reshape(w.shape[0], -1).sum(axis=1)
    tight = (w * m[ch]).reshape(w.shape[0], -1).sum(axis=1)
    return float(charged.sum()), float(tight.sum())


@pytest.mark.parametrize("cle", ["weights", "activations"])
def test_equalization_keeps_the_float_outputs(cle: str) -> None:
    fg = float_graph(_chain_net(), _images(4, 0), None)
    chains = [(c.first, c.second) for c in pairs(fg)]
    weighted = [n.name for n in fg.nodes if n.op in WEIGHTED_OPS]
    assert chains == list(itertools.pairwise(weighted))  # through pool and flatten
    eg = equalize(fg, cle, simulate.nchw_to_nhwc(_images(64, 1)))
    for name in weighted:
        assert not np.allclose(eg.node(name).params["weight"], fg.node(name).params["weight"])
    test = _images(32, 2)
    np.testing.assert_allclose(_float(eg, test), _float(fg, test), rtol=1e-9, atol=1e-12)


def test_equalization_lowers_the_bound() -> None:
    fg = float_graph(_chain_net(), _images(4, 0), None)
    x = simulate.nchw_to_nhwc(_images(256, 1))
    act = equalize(fg, "activations", x)
    nagel = equalize(fg, "weights", x)
    for c in pairs(fg):
        # the bound the quantizer charges, relative to the tightest one (free of units)
        charged, tight = _bounds(fg, c, x)
        assert charged > 1.2 * tight, c
        charged, tight = _bounds(act, c, x)
        assert math.isclose(charged, tight, rel_tol=1e-6), c
        # Nagel: both sides of the chain end with (nearly) the same weight range per channel
        r1, r2 = weight_ranges(nagel, c)
        np.testing.assert_allclose(r1, r2, rtol=0.05)


def _heavy_tailed(n: int, seed: int) -> np.ndarray:
    """Student-t inputs: mostly small, with rare large values."""
    return np.random.default_rng(seed).standard_t(2.5, (n, 24)).astype(np.float32)


def test_clipping_chooses_a_smaller_range_and_lowers_the_error() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 6)).eval()
    calib, test = _heavy_tailed(2000, 0), _heavy_tailed(2000, 1)
    want = net(torch.from_numpy(test)).detach().double().numpy()
    errs = {}
    for clip in ("none", "mse", "search"):
        qm = codegen.quantize(net, calib, acc_bits=12, progress=False, clip=clip)
        first = qm.report["layers"][0]
        assert first["bound_fits"]
        res = qm.run_reference(test)
        assert all(v.events == 0 for v in res.overflow.values())
        errs[clip] = float(np.mean((qm.dequantize_output(res.output) - want) ** 2))
        if clip != "none":
            assert first["input_clip"] > 0
            assert describe_bits(qm).startswith(
                f"{first['name']} {first['input_bits']}/{first['weight_bits']} "
                f"÷{2 ** first['input_clip']},"
            )
            fmt = qm.graph.tensors[qm.graph.input].fmt
            assert fmt is not None and fmt.qmax * fmt.scale < np.abs(calib).max()
    assert max(errs["mse"], errs["search"]) < 0.8 * errs["none"], errs


def test_options_compile_bit_exact_on_the_host(tmp_path: Path) -> None:
    net = _chain_net(1)
    calib, test = _images(64, 3), _images(16, 4)
    qm = codegen.quantize(net, calib, acc_bits=14, progress=False, clip="search", cle="activations")
    assert all(r.get("bound_fits", True) for r in qm.report["layers"])
    res = qm.run_reference(test)
    assert all(v.events == 0 for v in res.overflow.values())
    assert np.array_equal(qm.dequantize_output(res.output), qm.simulate(test))
    c = codegen.compile(qm, target="host", out_dir=tmp_path / "c", progress=False)
    assert np.array_equal(c.run_int(test), qm.reference_int(test))


def test_bad_option_values_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    net, x = _chain_net(), _images(8, 0)
    for kw, msg in [
        ({"clip": "max"}, "unknown clip 'max'; choose one of none, mse, search"),
        ({"cle": "yes"}, "unknown cle 'yes'; choose one of none, weights, activations"),
        ({"clip": "search", "method": "transform"}, "clip is an option of method 'ptq'"),
        ({"cle": "weights", "method": "transform"}, "cle is an option of methods 'ptq' and"),
    ]:
        with pytest.raises(QaccError, match=msg):
            codegen.quantize(net, x, acc_bits=16, progress=False, **kw)  # type: ignore[arg-type]
    # the CLI: one line and exit code 2 (compile: argparse's choices, sweep: codegen's check)
    assert cli.main(["sweep", "--cle", "both"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "qacc: error: unknown cle 'both'; choose one of none, weights, activations"
    ]
    with pytest.raises(SystemExit) as stop:
        cli.main(["compile", "m.py", "--calib", "c.npy", "--out", "o", "--clip", "max"])
    assert stop.value.code == 2
    assert "argument --clip: invalid choice: 'max'" in capsys.readouterr().err
