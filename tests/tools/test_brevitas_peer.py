"""Brevitas AXE and A2Q+ as peers in `qacc sweep`: constrained for real, sane accuracy, in the
table, and a one-line error when Brevitas is not installed."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from codegen.tools import brevitas_peer, sweep
from tests.nets import Branchy, randomized, trained_digits_cnn


@pytest.fixture(scope="module")
def digits_net() -> tuple[nn.Module, tuple[np.ndarray, ...]]:
    net, data = trained_digits_cnn()
    return net.eval(), data


def _worst_sums(layer: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the largest and smallest integer dot product over every input in the
    layer's input range (weights only, as AXE bounds them)."""
    w, (lo, hi) = layer["weights"], layer["in"]
    pos, neg = np.where(w > 0, w, 0).sum(-1), np.where(w < 0, w, 0).sum(-1)
    return hi * pos + lo * neg, lo * pos + hi * neg


@pytest.mark.slow
def test_axe_weights_fit_the_accumulator_and_keep_accuracy(digits_net) -> None:  # type: ignore[no-untyped-def]
    net, (x_train, _, x_test, y_test) = digits_net
    calib, acc_bits, bits = x_train[:256], 12, {"weight_bits": 4, "act_bits": 4}
    limit = 2 ** (acc_bits - 1) - 1
    float_acc = float(np.mean(net(torch.from_numpy(x_test)).argmax(1).numpy() == y_test))

    axe = brevitas_peer.quantize(net, calib, acc_bits, **bits)
    layers = brevitas_peer.layer_bounds(axe, x_test)
    assert [lay["name"].split(".")[-1] for lay in layers][-1] == "fc" and len(layers) == 3
    for lay in layers:
        assert lay["in"] == (0, 15), lay["in"]  # unsigned 4-bit inputs: images, ReLU outputs
        assert np.abs(lay["weights"]).max() <= 8  # 4-bit weights
        top, bottom = _worst_sums(lay)
        assert top.max() <= limit and bottom.min() >= -limit, lay["name"]

    # the recipe without a tight accumulator breaks that bound: AXE did the constraining (GPTQ
    # here, so that its AXE path, which needs quantized activations, runs too)
    loose = brevitas_peer.layer_bounds(
        brevitas_peer.quantize(net, calib, 32, algorithm="gptq", **bits), x_test
    )
    assert max(_worst_sums(lay)[0].max() for lay in loose) > limit

    acc = float(np.mean(brevitas_peer.predict(axe, x_test).argmax(1) == y_test))
    assert 0.5 < acc <= float_acc + 0.02, (acc, float_acc)


def test_axe_graph_quantizer_gives_qacc_formats() -> None:
    """Brevitas's graph quantizer as AXE uses it: images in [0, 1] get an unsigned input
    quantizer, `torch.relu` (here after a residual add) an unsigned QuantReLU, every layer an
    unsigned input, the logits 8 bits; Brevitas's own defaults differ on each."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas.graph.quantize import quantize as fx_quantize

    net = randomized(Branchy(cin=1))
    x = torch.from_numpy(np.random.default_rng(0).random((4, 1, 12, 12), dtype=np.float32))
    maps = brevitas_peer._axe_maps(4, 4)
    qmodel = brevitas_peer._graph_quantize(net, maps, 4, x, equalize_iters=1, merge_bn=True)
    plain = fx_quantize(preprocess_for_quantize(net), **maps).eval()

    def quantizers(m: nn.Module) -> tuple[Any, Any, list[Any]]:
        """The input's and the logits' quantizers, and the functions called in the graph."""
        nodes = list(m.graph.nodes)
        (first,) = next(n for n in nodes if n.op == "placeholder").users
        (last,) = next(n for n in nodes if n.op == "output").all_input_nodes
        calls = [n.target for n in nodes if n.op == "call_function"]
        return m.get_submodule(first.target), m.get_submodule(last.target), calls

    inp, out, calls = quantizers(qmodel)
    assert not inp.act_quant.is_signed and int(inp.act_quant.bit_width()) == 4
    assert out.act_quant.is_signed and int(out.act_quant.bit_width()) == 8
    assert torch.relu not in calls  # the five torch.relu: QuantReLU, unsigned, as nn.ReLU's are
    relus = [m for m in qmodel.modules() if isinstance(m, qnn.QuantReLU)]
    assert len(relus) == 5 and not any(r.act_quant.is_signed for r in relus)
    layers = brevitas_peer.layer_bounds(qmodel, x.numpy())
    assert len(layers) == 6 and all(lay["in"] == (0, 15) for lay in layers), layers
    inp, out, calls = quantizers(plain)  # without: a signed image, 4-bit logits, a signed ReLU
    assert inp.act_quant.is_signed and int(out.act_quant.bit_width()) == 4 and torch.relu in calls


def test_a2q_learning_rate_is_adaptive_default() -> None:
    import inspect

    from codegen.quant.adaptive import DEFAULT_LR

    assert inspect.signature(brevitas_peer.run_a2q).parameters["lr"].default == DEFAULT_LR


@pytest.mark.slow
def test_sweep_table_json_and_plot_have_the_brevitas_rows(digits_net, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    net, (x_train, y_train, x_test, y_test) = digits_net
    res = sweep.run(
        net,
        x_train[:256],
        y_train[:256],
        (x_train, y_train),
        (x_test, y_test),
        widths=(16,),
        methods=("ptq",),
        progress=False,
        log=lambda *_: None,
        brevitas=("gpfq",),
        brevitas_bits=((4, 4),),
        check_c=50,
    )
    assert [r["c_bit_exact"] for r in res["rows"] if not r.get("peer")] == [True, True]
    peer = [r for r in res["rows"] if r["method"] == "brevitas-axe-gpfq"]
    assert [r["acc_bits"] for r in peer] == [16] and peer[0]["bits"] == "4/4"
    assert 0.5 < peer[0]["accuracy"] <= 1.0
    paths = sweep.write(res, tmp_path)
    assert json.loads(paths[0].read_text())["rows"][-1]["method"] == "brevitas-axe-gpfq"
    md = paths[1].read_text()
    assert "| brevitas-axe-gpfq | fake-quant | 16 |" in md and "| ptq | guaranteed | 16 |" in md
    assert brevitas_peer.NOTE in md
    assert "bit-exact with the integer reference on the first 50 test images: 2 of 2" in md
    assert paths[2].read_bytes().startswith(b"\x89PNG")


def test_a2q_plus_training_keeps_every_channel_inside_its_budget(digits_net) -> None:  # type: ignore[no-untyped-def]
    net, (x_train, y_train, x_test, y_test) = digits_net
    acc_bits = 12
    limit = 2 ** (acc_bits - 1) - 1
    qmodel = brevitas_peer.a2q_model(net, x_train[:256], acc_bits)
    history = brevitas_peer.train_a2q(qmodel, net, (x_train, y_train), 1, lr=3e-3, distill=True)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    layers = brevitas_peer.layer_bounds(qmodel.eval(), x_test)
    assert len(layers) == 3
    used = []
    for lay in layers:
        assert lay["in"] == (0, 15), lay["in"]  # unsigned 4-bit inputs: images and ReLU outputs
        w = lay["weights"]
        assert np.abs(w).max() <= 7  # 4-bit narrow weights
        # A2Q+'s budget: zero-centred weights of L1 norm <= (2^P - 2) / (2^N - 1), so that each
        # sign holds at most half of it, and rounding toward zero keeps it
        half = (2**acc_bits - 2) / (2**4 - 1) / 2
        assert np.where(w > 0, w, 0).sum(-1).max() <= half
        assert -np.where(w < 0, w, 0).sum(-1).min() <= half
        top, bottom = _worst_sums(lay)  # what that means: no input can overflow
        assert top.max() <= limit and bottom.min() >= -limit, lay["name"]
        used.append(top.max() / limit)
    assert max(used) > 0.5  # the budget binds: 4-bit weights over 72 terms could reach 3.7x it
    acc = float(np.mean(brevitas_peer.predict(qmodel, x_test).argmax(1) == y_test))
    assert acc > 0.5, acc


def test_sweep_prints_the_a2q_plus_row(digits_net, tmp_path) -> None:  # type: ignore[no-untyped-def]
    net, (x_train, y_train, x_test, y_test) = digits_net
    res = sweep.run(
        net,
        x_train[:256],
        y_train[:256],
        (x_train[:256], y_train[:256]),
        (x_test, y_test),
        widths=(12,),
        methods=(),
        epochs=1,
        progress=False,
        log=lambda *_: None,
        brevitas=("a2q+",),
    )  # fmt: skip (two training steps: the bound and the accuracy are checked above)
    (row,) = res["rows"]
    assert (row["method"], row["acc_bits"], row["bits"], row["epochs"]) == (
        "brevitas-a2q+",
        12,
        "4/4",
        1,
    )
    assert [h["epoch"] for h in row["history"]] == [1]
    assert row["accuracy"] == row["history"][-1]["test_accuracy"]
    md = sweep.write(res, tmp_path)[1].read_text()
    assert "| brevitas-a2q+ | fake-quant | 12 |" in md
    assert brevitas_peer.QAT_NOTE in md and brevitas_peer.NOTE not in md


def test_several_bit_pairs_keep_the_best_per_width(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Brevitas itself is exercised above; here each pair's "model" predicts label `w` for every
    # image, so the pair whose w is the most common label is the most accurate
    monkeypatch.setattr(
        brevitas_peer, "quantize", lambda *_, weight_bits, act_bits, **__: weight_bits
    )
    monkeypatch.setattr(brevitas_peer, "predict", lambda w, x: np.eye(9)[np.full(len(x), w)])
    y = np.array([4, 4, 6, 8, 4, 6])
    row = brevitas_peer.run(
        nn.Identity(), y, (y, y), 12, algorithm="gptq", bits=((8, 8), (6, 5), (4, 3))
    )
    assert row["accuracy"] == np.mean(y == 4) and row["bits"] == "3/4"
    assert (row["weight_bits"], row["activation_bits"]) == (4, 3)
    assert [t["bits"] for t in row["tried"]] == ["8/8", "5/6", "3/4"]
    res = {"float_accuracy": 1.0, "rows": [row]}
    assert "| 3/4 (best of 8/8, 5/6, 3/4) |" in sweep.table(res)


def test_missing_brevitas_is_a_one_line_error(monkeypatch, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from codegen import cli

    for mod in ("brevitas", "brevitas_examples", "brevitas_examples.imagenet_classification.ptq"):
        monkeypatch.setitem(sys.modules, mod, None)  # what `import` sees when it is not installed
    with pytest.raises(brevitas_peer.PeerMissingError, match=r"pip install '\.\[peers\]'"):
        brevitas_peer.check(["gpfq"])
    assert cli.main(["sweep", "--brevitas", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qacc: error: the Brevitas peer needs brevitas")
    assert err[0].endswith("pip install '.[peers]'") and not (tmp_path / "s").exists()
    assert cli.main(["sweep", "--brevitas", "axe", "--out", str(tmp_path / "s")]) == 2
    assert "unknown Brevitas peer 'axe'" in capsys.readouterr().err
    assert cli.main(["sweep", "--brevitas", "--brevitas-bits", "4", "--out", str(tmp_path)]) == 2
    assert "WEIGHT,ACTIVATION bits" in capsys.readouterr().err
    args = ["sweep", "--brevitas", "--brevitas-bits", "8,8", "4,40", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    assert "each 2..16, got [4, 40]" in capsys.readouterr().err
    assert cli.main(["sweep", "--methods", "", "--out", str(tmp_path / "s")]) == 2
    assert "nothing to sweep" in capsys.readouterr().err and not (tmp_path / "s").exists()
