"""The CMSIS-NN peer of `qacc bench` on Cortex-M: harness, layer mapping, bench columns, CLI.

Needs arm-none-eabi-gcc with newlib, qemu-system-arm and the instruction-count plugin (all
installed by `make setup`); CMSIS-NN itself is vendored at third_party/CMSIS-NN.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from codegen import cli
from codegen.bench import cmsis_nn, networks, runner
from codegen.bench.peers import PeerError
from codegen.core.ir import macs
from codegen.frontend.torch_fx import from_torch

C = cmsis_nn


@pytest.mark.qemu
@pytest.mark.parametrize("target", ["cortex-m55", "cortex-m4"])
def test_harness_counts_every_layer_kind(target: str) -> None:
    # (smaller, larger) shape of each kind (the same layer on more pixels or channels); the
    # smaller one is given twice.
    pairs = {
        "conv": (
            C.conv_layer(8, 8, 8, 8, 3, 1, (1, 1, 1, 1)),
            C.conv_layer(16, 16, 8, 8, 3, 1, (1, 1, 1, 1)),
        ),
        "depthwise": (
            C.conv_layer(8, 8, 16, 16, 3, 1, (1, 1, 1, 1), groups=16),
            C.conv_layer(16, 16, 16, 16, 3, 1, (1, 1, 1, 1), groups=16),
        ),
        "dense": (C.dense_layer(64, 16), C.dense_layer(128, 32)),
        "maxpool": (
            C.pool_layer("maxpool", 8, 8, 8, (2, 2), (2, 2)),
            C.pool_layer("maxpool", 16, 16, 8, (2, 2), (2, 2)),
        ),
        "avgpool": (
            C.pool_layer("avgpool", 8, 8, 8, (2, 2), (2, 2)),
            C.pool_layer("avgpool", 16, 16, 8, (2, 2), (2, 2)),
        ),
        "add": (C.add_layer(256), C.add_layer(1024)),
        "mul": (C.mul_layer(256), C.mul_layer(1024)),
        "softmax": (C.softmax_layer(4, 10), C.softmax_layer(16, 10)),
        "concat": (C.concat_layer(16, (8, 5)), C.concat_layer(64, (8, 5))),
    }
    layers = [x for small, large in pairs.values() for x in (small, small, large)]
    # arm_convolve_s8 with 4 groups (on 8x8 and 16x16 pixels); depthwise with ch_mult 2
    grouped = [C.conv_layer(n, n, 8, 8, 3, 1, (1, 1, 1, 1), groups=4) for n in (8, 16)]
    mult2 = C.conv_layer(16, 16, 16, 32, 3, 1, (1, 1, 1, 1), groups=16)
    counts = C.instructions([*layers, *grouped, mult2], target)
    assert 0 < counts[-3] < counts[-2]  # more pixels, more instructions
    assert counts[-2] != counts[2]  # not the call of the same conv in one group (layers[2])
    assert counts[-1] > counts[5]  # more than ch_mult 1 on the same input (layers[5])
    counts = counts[:-3]
    for i, (kind, (small, large)) in enumerate(pairs.items()):
        a, b, c = counts[3 * i : 3 * i + 3]
        assert small.kind == large.kind == kind
        assert a == b > 0, kind  # deterministic: the same call counts the same
        assert c > a, kind  # more work, more instructions
        if small.macs:
            assert large.macs > small.macs
            assert 0.05 < a / small.macs < 50, (kind, a / small.macs)
    assert C.instructions(layers[:1], target) == counts[:1]  # and across runs


def test_layers_of_ds_cnn() -> None:
    net = networks.NETWORKS["ds_cnn"]
    calib = networks.calibration_data(net, samples=2)
    g = from_torch(networks.build("ds_cnn", calib), calib, "ds_cnn")
    layers = C.layers_of(g)
    assert [x.kind for x in layers.values()] == [
        "conv",
        *["depthwise", "conv"] * 4,
        "avgpool",
        "dense",
    ]
    for name, x in layers.items():
        assert x.macs == macs(g, g.node(name))
        if x.kind in ("conv", "depthwise"):
            # the output size the harness is given is the graph's
            assert x.params[-2:] == tuple(g.tensors[g.node(name).output].shape[:2])
    stem = next(iter(layers.values()))
    assert stem.params[8:10] == (4, 1)  # TF 'same': top 4, left 1 (bottom/right from the size)


def test_layers_of_mul_and_softmax() -> None:
    """A product of two tensors of one shape is arm_elementwise_mul_s8, a softmax over the
    channels of every pixel is arm_softmax_s8 with one row per pixel; a product by a
    per-channel gate (no s8 broadcast in CMSIS-NN) and table functions have no call."""
    from tests.graphs import GraphBuilder

    b = GraphBuilder("mul_softmax", seed=0, batch=1)
    x = b.input((4, 5, 6))
    y = b.mul(x, b.lut(x, "sigmoid"), name="same")
    y = b.mul(y, b.global_avgpool(y, name="pool"), name="gate")
    b.softmax(y, name="head")
    g, _ = b.result()
    layers = C.layers_of(g)
    assert set(layers) == {"same", "pool", "head"}
    assert layers["same"] == C.mul_layer(4 * 5 * 6)
    assert layers["head"] == C.softmax_layer(4 * 5, 6)
    assert layers["same"].function == "arm_elementwise_mul_s8"
    assert layers["head"].function == "arm_softmax_s8"


def test_layers_of_concat() -> None:
    """A channel concat is one arm_concatenation_s8_x call per input (its channels, the pixels);
    past MAX_CONCAT inputs the harness has no room: no call, and concat_layer refuses."""
    from tests.graphs import GraphBuilder

    b = GraphBuilder("cat", seed=0, batch=1)
    x = b.input((4, 5, 6))
    y = b.concat([x, b.maxpool2d(x, (1, 1), (1, 1))], name="two")
    b.concat([y] * 11, name="eleven")
    layers = C.layers_of(b.result()[0])
    assert layers["two"] == C.concat_layer(20, (6, 6)) and "eleven" not in layers
    assert layers["two"].function == "arm_concatenation_s8_x"
    with pytest.raises(PeerError, match="at most 10"):
        C.concat_layer(20, [12] * 11)


def test_grouped_conv_and_channel_multiplier_are_cmsis_nn_calls() -> None:
    """CMSIS-NN's arm_convolve_s8 runs any groups (groups = input_ch / kernel_ch): a grouped conv
    is that call, its groups the 13th field (the wrapper's 1x1 and 1xN kernels take no groups);
    a depthwise conv with channel multiplier M is arm_depthwise_conv_wrapper_s8 with ch_mult M.
    Groups that do not divide both channel counts have no call."""
    pad = (1, 1, 1, 1)
    grouped = C.conv_layer(8, 8, 16, 32, 3, 1, pad, groups=4)
    assert grouped.kind == "conv" and grouped.groups == 4
    assert grouped.function == "arm_convolve_s8"
    assert len(grouped.fields()) == C.FIELDS and grouped.fields()[-1] == 4
    assert grouped.macs == 8 * 8 * 32 * 9 * 4
    plain = C.conv_layer(8, 8, 16, 32, 3, 1, pad)
    assert plain.groups == 1 and plain.function == "arm_convolve_wrapper_s8"
    assert plain.fields()[-1] == 0 and plain.macs == 4 * grouped.macs
    mult = C.conv_layer(8, 8, 16, 32, 3, 1, pad, groups=16)
    assert mult.kind == "depthwise" and mult.params[3] == 2  # ch_mult
    assert mult.function == "arm_depthwise_conv_wrapper_s8" and mult.macs == 8 * 8 * 32 * 9
    for groups in (3, 0):
        with pytest.raises(PeerError, match="groups"):
            C.conv_layer(8, 8, 16, 16, 3, groups=groups)


def test_layers_of_grouped_and_multiplier_rows() -> None:
    """The bench rows gconv3x3 and dw3x3_m2 each have their CMSIS-NN call."""
    want = {"gconv3x3": ("conv", "arm_convolve_s8"),
            "dw3x3_m2": ("depthwise", "arm_depthwise_conv_wrapper_s8")}  # fmt: skip
    for net, (kind, function) in want.items():
        calib = networks.calibration_data(networks.LAYERS[net], samples=2)
        g = from_torch(networks.build(net, calib), calib, net)
        ((name, layer),) = C.layers_of(g).items()
        assert (layer.kind, layer.function) == (kind, function), net
        assert layer.macs == macs(g, g.node(name))


def test_bad_cmsis_nn_dir_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--targets", "cortex-m55", "--networks", "gap", "--cmsis-nn", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a CMSIS-NN source tree" in err
    assert C.check_tree() == C.DEFAULT_TREE.resolve()  # the vendored tree is one


def test_layer_group() -> None:
    assert runner.resolve_networks("layers") == list(networks.LAYER_GROUP)
    assert runner.resolve_networks("gap,layers")[0] == "gap"
    assert set(networks.LAYER_GROUP) == {"conv3x3", *networks.LAYERS}


@pytest.mark.qemu
@pytest.mark.slow
def test_bench_json_has_the_cmsis_nn_columns(tmp_path: Path) -> None:
    out = io.StringIO()
    path = tmp_path / "bench.json"
    res = runner.run_bench(
        ["cortex-m55"],
        (16, 32),
        ["gap"],
        json_path=path,
        out=out,
        log=None,
        calib_samples=4,
        progress=False,
        cmsis_nn=True,
    )
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))
    (peer,) = res["peers"]
    assert "error" not in peer, peer.get("error")
    assert peer["peer"] == "cmsis-nn" and peer["layers_covered"] == 1
    rows = {r["acc_bits"]: r for r in res["rows"]}
    ((name, layer),) = peer["layers"].items()
    assert layer["function"] == "arm_avgpool_s8"
    qacc = {w: {x["name"]: x for x in r["layers"]}[name]["instructions"] for w, r in rows.items()}
    assert layer["qacc_acc16"] == qacc[16] and layer["qacc_acc32"] == qacc[32]
    assert layer["qacc_best"] == min(qacc.values())
    assert layer["cmsis_nn_over_qacc_best"] == pytest.approx(
        layer["instructions"] / layer["qacc_best"], abs=1e-3
    )
    assert peer["instructions"] == layer["instructions"]
    assert peer["qacc_best_instructions"] == min(qacc.values())
    text = out.getvalue()
    assert "cmsis-nn" in text and "CMSIS-NN vs qacc" in text
    assert f"{layer['instructions']:,}" in text


# The Cortex-M layer table (issue 18): the op of the layer compared in each single-layer network.
TABLE_OPS = {
    "conv3x3_16": "conv2d",
    "conv3x3": "conv2d",
    "dw3x3": "conv2d",
    "pw1x1": "conv2d",
    "dense256": "dense",
    "maxpool": "maxpool2d",
    "avgpool": "avgpool2d",
    "gap": "global_avgpool",
    "add": "add",
    "mul": "mul",
    "softmax": "softmax",
    "concat": "concat",
    "gconv3x3": "conv2d",
    "dw3x3_m2": "conv2d",
}


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("target", ["cortex-m55", "cortex-m4"])
def test_qacc_not_behind_cmsis_nn(target: str) -> None:
    """Every layer of the table: qacc (at 32-bit accumulators, the width the peer uses) executes
    no more instructions than CMSIS-NN on the same shape (counts are deterministic; `make bench`
    prints the figures, cortex-m7 included)."""
    nets = tuple(TABLE_OPS)
    res = runner.run_bench(
        [target], (32,), list(nets), out=None, log=None, calib_samples=4, progress=False,
        cmsis_nn=True,
    )  # fmt: skip
    rows = {r["network"]: r for r in res["rows"]}
    peers = {p["network"]: p for p in res["peers"]}
    assert set(rows) == set(peers) == set(nets)
    for net in nets:
        row, peer = rows[net], peers[net]
        assert "error" not in row, (net, row.get("error"))
        assert "error" not in peer, (net, peer.get("error"))
        compared = [x for x in row["layers"] if x["op"] == TABLE_OPS[net]]
        assert compared, net
        for x in compared:
            cmsis = peer["layers"][x["name"]]["instructions"]
            assert x["instructions"] <= cmsis, (net, x["name"], x["instructions"], cmsis)
