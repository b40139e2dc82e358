"""ONNX input: every network of the test suite, exported with torch.onnx.export, gives the PyTorch
path's float graph, integer graph and integer outputs exactly.

Exports. "dynamo" is torch.onnx.export's default exporter with `optimize=False`; "torchscript" is
`dynamo=False` with `training=PRESERVE`. Both keep BatchNormalization as a node holding the
module's float32 statistics, so the ONNX frontend folds it in float64 exactly as the torch
frontend does, and the float parameters are *bit-identical*: both frontends widen the same float32
values to float64 and run the same folding code (codegen.frontend.builder). The exporters' own
BatchNorm folding (dynamo's default `optimize=True`, torchscript's eval mode) computes the folded
weights in float32 instead: those files give the same graph with parameters equal to float32
rounding only (test_exporter_folded_batchnorm), and so possibly integer weights one step apart.

Names: weighted layers get their torch.fx names (the module path, `features_0`); a functional
flatten/reshape/adaptive pool is named after the op ONNX records (`view`, `mean`), since the file
does not say which torch function made it (RENAMED).
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import codegen
from codegen import cli
from codegen.api import QuantizedModel
from codegen.core.errors import InvalidDataError, InvalidModelError, UnsupportedModelError
from codegen.core.ir import WEIGHTED_OPS, Graph
from codegen.data.models import FashionCNN, ResDWNet
from codegen.frontend.builder import adaptive_windows
from codegen.frontend.onnx_model import from_onnx
from codegen.frontend.torch_fx import from_torch
from tests.frontend.test_frontend import CASES, C, shape
from tests.frontend.test_real_networks import NETWORKS as REAL
from tests.frontend.test_real_networks import same_outputs
from tests.nets import Branchy, Plain, randomized


def _real(key: str) -> nn.Module:
    torch.manual_seed(0)
    return REAL[key][0]().eval()


def _case(key: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[key]().eval()


NOT_EXPORTED = {
    # torch 2.13 exports no adaptive max pool to a size that does not divide the input: the
    # dynamo exporter has no decomposition of it ("No decompositions registered"), the
    # torchscript one refuses it (its average pools are spelled out: NOT_TORCHSCRIPT)
    "adaptive_maxpool_any",
    # spelled out like adaptive_avgpool_up's (exported below); left out for test time
    "adaptive_avgpool_any",
    # ONNX AveragePool has no divisor: the exporters add a Mul by a constant
    "f_avgpool_divisor",
}

NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "branchy": (lambda: randomized(Branchy(), seed=3), (3, 8, 8)),
    "branchy_w8": (lambda: randomized(Branchy(cin=3, w=8, classes=5), seed=1), (3, 8, 8)),
    "plain": (lambda: randomized(Plain(), seed=1), (1, 8, 8)),
    "fashion_cnn": (lambda: randomized(FashionCNN(width=6), seed=0), (1, 28, 28)),
    "resdw": (lambda: randomized(ResDWNet(width=6), seed=0), (1, 12, 12)),
    "unet": (lambda: _real("unet"), (3, 8, 8)),
    "two_heads": (lambda: _real("two_heads"), (3, 8, 8)),
    **{f"frontend_{k}": (lambda k=k: _case(k), shape(k)) for k in CASES if k not in NOT_EXPORTED},
}
WHOLE = ["branchy", "branchy_w8", "plain", "fashion_cnn", "resdw", "unet", "two_heads"]
NOT_DYNAMO = {"frontend_seq_interpolate_linear"}
"""The dynamo exporter spells 1-D linear upsampling out as GatherND arithmetic, not Resize."""
NOT_TORCHSCRIPT = {"frontend_adaptive_avgpool_up"}
"""The torchscript exporter refuses adaptive pools to sizes that do not divide the input; the
dynamo exporter spells their windows out (Transpose of the batch axis, GatherND, Where, Add, Div,
ReduceMean), which the ONNX frontend reads back as the pool."""
RENAMED: dict[str, str | tuple[str, ...]] = {
    "flatten": "view",
    "reshape": "view",
    "adaptive_avg_pool2d": "mean",
    # x.size() items are numbered like the tensor items in torch.fx: ONNX has only the tensors
    "getitem": "getitem",
    "interpolate": ("upsample_nearest2d", "upsample_bilinear2d"),
    "view": "view",
    # the torchscript exporter runs 1-D pools as 2-D ones and records that name
    "max_pool1d": "max_pool2d",
    "avg_pool1d": "avg_pool2d",
}


def export(model: nn.Module, x: np.ndarray, path: Path, exporter: str, **kw: object) -> Path:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (torch.as_tensor(x),), str(path), **{"optimize": False, **kw})
        else:
            torch.onnx.export(
                model,
                (torch.as_tensor(x),),
                str(path),
                dynamo=False,
                input_names=["x"],
                **{"training": torch.onnx.TrainingMode.PRESERVE, **kw},
            )
    return path


class Exported:
    """Each network built once and exported once per exporter (the exports take most time)."""

    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, tuple[nn.Module, np.ndarray]] = {}
        self.files: dict[tuple[str, str], Path] = {}

    def model(self, key: str) -> tuple[nn.Module, np.ndarray]:
        if key not in self.models:
            make, chw = NETS[key]
            calib = np.random.default_rng(1).standard_normal((4, *chw)).astype(np.float32)
            self.models[key] = (make(), calib)
        return self.models[key]

    def file(self, key: str, exporter: str) -> Path:
        if (key, exporter) not in self.files:
            m, calib = self.model(key)
            self.files[key, exporter] = export(
                m, calib[:1], self.root / f"{key}_{exporter}.onnx", exporter
            )
        return self.files[key, exporter]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(tmp_path_factory.mktemp("onnx"))


def _same_name(torch_name: str, onnx_name: str) -> bool:
    base = re.sub(r"_\d+$", "", torch_name)
    renamed = RENAMED.get(base, ())
    return onnx_name == torch_name or re.sub(r"_\d+$", "", onnx_name) in (
        renamed if isinstance(renamed, tuple) else (renamed,)
    )


def assert_same_graph(want: Graph, got: Graph, *, exact: bool = True) -> None:
    """Same ops, attributes, shapes, formats, requantization and parameters (bit for bit when
    `exact`, else to float32 rounding); weighted layers named alike, other nodes alike but for
    RENAMED."""
    assert got.name == want.name
    assert len(got.nodes) == len(want.nodes), (
        [n.op for n in want.nodes],
        [n.op for n in got.nodes],
    )
    rename = {want.input: got.input}
    for a, b in zip(want.nodes, got.nodes, strict=True):
        ctx = f"node {a.name} / {b.name}"
        if a.op in WEIGHTED_OPS:
            assert b.name == a.name, ctx
        else:
            assert _same_name(a.name, b.name), ctx
        rename[a.output] = b.output
        assert b.op == a.op, ctx
        assert b.inputs == tuple(rename[t] for t in a.inputs), ctx
        assert dict(b.attrs) == dict(a.attrs), ctx
        assert b.params.keys() == a.params.keys(), ctx
        for k, wa in a.params.items():
            wb = b.params[k]
            assert wb.dtype == wa.dtype and wb.shape == wa.shape, ctx
            if exact:
                assert np.array_equal(wb, wa), f"{ctx} {k}"
            else:  # the exporter folded BN in float32: a few float32 ulps of the largest value
                scale = float(np.abs(wa).max()) or 1.0
                np.testing.assert_allclose(
                    wb, wa, rtol=0, atol=4 * np.finfo(np.float32).eps * scale
                )
        assert (a.requant is None) == (b.requant is None), ctx
        if a.requant is not None and b.requant is not None:
            ra, rb = a.requant, b.requant
            assert np.array_equal(ra.mult, rb.mult) and np.array_equal(ra.shift, rb.shift), ctx
            assert (ra.zero_point, ra.lo, ra.hi) == (rb.zero_point, rb.lo, rb.hi), ctx
    assert got.outputs == tuple(rename[t] for t in want.outputs)
    assert len(got.tensors) == len(want.tensors)
    for t, ta in want.tensors.items():
        tb = got.tensors[rename[t]]
        assert (tb.shape, tb.fmt) == (ta.shape, ta.fmt), t


def _slow_unless_whole(keys: list[str], exporter: str) -> list[object]:
    """The dynamo exports of the 33 one-op networks take ~1 s each: marked slow (still in CI)."""
    marks = [pytest.mark.slow] if exporter == "dynamo" else []
    return [
        pytest.param(k, exporter, id=f"{exporter}-{k}", marks=[] if k in WHOLE else marks)
        for k in keys
    ]


@pytest.mark.parametrize(
    ("key", "exporter"),
    _slow_unless_whole([k for k in NETS if k not in NOT_DYNAMO], "dynamo")
    + _slow_unless_whole([k for k in NETS if k not in NOT_TORCHSCRIPT], "torchscript"),
)
def test_float_graph_is_the_torch_one(exported: Exported, key: str, exporter: str) -> None:
    model, calib = exported.model(key)
    want = from_torch(model, calib)
    # torchscript files do not record the module's class: name the graph like the dynamo file
    got = from_onnx(
        exported.file(key, exporter), calib, None if exporter == "dynamo" else want.name
    )
    assert_same_graph(want, got)


def _quantize(model: nn.Module | Path, calib: np.ndarray, acc: int) -> QuantizedModel:
    """PTQ with nearest rounding: the frontends are the point, and nearest is the fastest."""
    return codegen.quantize(
        model if isinstance(model, nn.Module) else str(model), calib, acc_bits=acc, progress=False,
        rounding="nearest",
    )  # fmt: skip


@pytest.mark.parametrize("acc", [16, 32])
@pytest.mark.parametrize(
    "key",
    [
        *WHOLE,
        "frontend_upsample_bilinear",
        "frontend_zeropad_asymmetric",
        "frontend_hardtanh",
        "frontend_lut_modules",
        "frontend_lut_functions",
        "frontend_lut_functions_2",
        "frontend_stochastic_depth",
        "frontend_act_after_cat",
        "frontend_act_shared",
        "frontend_bn2d_preact",
        "frontend_mean_hw",
        "frontend_maxpool_ceil_pad",
        "frontend_adaptive_maxpool_2",
        "frontend_adaptive_avgpool_up",  # AlexNet's and VGG's pools: windows spelled out
        "frontend_seq_conv1d",
        "frontend_seq_out",
        "frontend_seq_flatten_linear",
        "frontend_vector_mlp",
        "frontend_mul_forms",
        "frontend_mul_vectors",
        "frontend_softmax_forms",
        "frontend_shuffle_unit",
        "frontend_split_views",
        "frontend_avgpool_ceil",
        "frontend_avgpool_exclude_pad",
        "frontend_conv_transpose_s2",
    ],
)
def test_integer_graph_and_outputs_are_the_torch_ones(
    exported: Exported, key: str, acc: int
) -> None:
    model, calib = exported.model(key)
    want = _quantize(model, calib, acc)
    got = _quantize(exported.file(key, "dynamo"), calib, acc)
    assert_same_graph(want.graph, got.graph)
    x = np.random.default_rng(2).standard_normal((4, *calib.shape[1:])).astype(np.float32)
    assert same_outputs(got.reference_int(x), want.reference_int(x))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_exporter_folded_batchnorm(tmp_path: Path, exported: Exported, exporter: str) -> None:
    """Default exports fold BatchNorm in float32 themselves: the same graph, float32 rounding."""
    model, calib = exported.model("fashion_cnn")
    kw: dict[str, object] = (
        {"optimize": True} if exporter == "dynamo" else {"training": torch.onnx.TrainingMode.EVAL}
    )
    path = export(model, calib[:1], tmp_path / "folded.onnx", exporter, **kw)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    want = from_torch(model, calib)
    assert_same_graph(want, from_onnx(path, calib, want.name), exact=False)


def test_path_object_and_name(exported: Exported) -> None:
    _, calib = exported.model("plain")
    path = exported.file("plain", "dynamo")
    assert codegen.api.float_graph(path, calib, None).name == "plain"  # the module's class
    assert codegen.api.float_graph(path, calib, "My Net").name == "my_net"
    with pytest.raises(InvalidModelError, match=r"not an \.onnx file"):
        codegen.quantize("plain.pt", calib, progress=False)


# ---------------------------------------------------------------------------- errors


def _opset_model(path: Path, src: Path, version: int) -> Path:
    m = onnx.load(str(src))
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version
    onnx.save(m, str(path))
    return path


def test_errors(tmp_path: Path, exported: Exported) -> None:
    _, calib = exported.model("plain")
    sig = export(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ELU()).eval(),
        calib[:1],
        tmp_path / "sig.onnx",
        "dynamo",
    )
    with pytest.raises(UnsupportedModelError, match=r"^unsupported ONNX op Elu at node '\w+'"):
        from_onnx(sig, calib)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(exported.file("plain", "dynamo").read_bytes()[:100])
    with pytest.raises(InvalidModelError, match="is not a"):
        from_onnx(broken, calib)
    old = _opset_model(tmp_path / "old.onnx", exported.file("plain", "dynamo"), 7)
    with pytest.raises(InvalidModelError, match="uses ONNX opset 7; qacc reads opsets 11 to"):
        from_onnx(old, calib)
    with pytest.raises(InvalidDataError, match=r"takes inputs of shape N x 1 x 8 x 8"):
        from_onnx(exported.file("plain", "dynamo"), np.zeros((1, 1, 9, 9), np.float32))
    with pytest.raises(InvalidModelError, match="does not exist"):
        from_onnx(tmp_path / "missing.onnx", calib)


# ---------------------------------------------------------------------------- CLI


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(("key", "lib"), [("plain", "libplain.a"), ("two_heads", "libtwoheads.a")])
def test_cli_compile_and_verify(
    tmp_path: Path, exported: Exported, capsys: pytest.CaptureFixture[str], key: str, lib: str
) -> None:
    """One output, and several (verify compares every output)."""
    _, calib = exported.model(key)
    np.save(tmp_path / "calib.npy", calib)
    x = np.random.default_rng(3).standard_normal((5, *calib.shape[1:])).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    path = exported.file(key, "dynamo")
    out = tmp_path / "out"
    rc, stdout, err = _main(
        [
            "compile",
            str(path),
            "--calib",
            str(tmp_path / "calib.npy"),
            "--target",
            "host",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert rc == 0, err
    assert lib in stdout
    rc, stdout, err = _main(["verify", str(out), "--inputs", str(tmp_path / "x.npy")], capsys)
    assert rc == 0, err
    assert "5 bit-exact, 0 differ" in stdout


def test_cli_errors_are_one_line(
    tmp_path: Path, exported: Exported, capsys: pytest.CaptureFixture[str]
) -> None:
    _, calib = exported.model("plain")
    np.save(tmp_path / "calib.npy", calib)
    sig = export(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ELU()).eval(),
        calib[:1],
        tmp_path / "sig.onnx",
        "dynamo",
    )
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf\x00\xff" * 10)
    old = _opset_model(tmp_path / "old.onnx", exported.file("plain", "dynamo"), 9)
    cases = [
        (sig, "unsupported ONNX op Elu at node"),
        (broken, "is not a"),
        (old, "uses ONNX opset 9"),
        (tmp_path / "missing.onnx", "ONNX file '.*missing.onnx' does not exist"),
    ]
    for path, message in cases:
        argv = ["compile", str(path), "--calib", str(tmp_path / "calib.npy")]
        rc, _, err = _main([*argv, "--out", str(tmp_path / "out")], capsys)
        assert rc == 2, err
        assert err.count("\n") == 1 and re.match(f"qacc: error: .*{message}", err), err
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- hand-made files


def _hand_model(path: Path) -> Path:
    """Forms no torch exporter writes: auto_pad SAME_LOWER/SAME_UPPER with stride 2, a Pad node,
    GlobalAveragePool, ReduceMean without keepdims, MatMul + Add (bias), Gemm with transB=0 and
    alpha/beta, Clip bounds from Constant nodes."""
    h = onnx.helper
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], auto_pad="SAME_LOWER", strides=[2, 2]),
        h.make_node("Relu", ["c1"], ["r1"]),
        h.make_node("Conv", ["r1", "w2"], ["c2"], auto_pad="SAME_UPPER", kernel_shape=[2, 2]),
        h.make_node("Constant", [], ["pads"], value_ints=[0, 0, 1, 0, 0, 0, 0, 2]),
        h.make_node("Pad", ["c2", "pads"], ["p2"], mode="constant"),
        h.make_node("Conv", ["p2", "w3", "b3"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        h.make_node(
            "AveragePool",
            ["c3"],
            ["a3"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
        ),
        h.make_node("GlobalAveragePool", ["c3"], ["g3"]),
        h.make_node("ReduceMean", ["a3", "axes"], ["m3"], keepdims=0),
        h.make_node("MatMul", ["m3", "wm"], ["mm"]),
        h.make_node("Add", ["bm", "mm"], ["fc1"]),
        h.make_node("Constant", [], ["lo"], value=onnx.numpy_helper.from_array(np.float32(-0.3))),
        h.make_node("Clip", ["fc1", "lo", ""], ["k1"]),
        h.make_node("Flatten", ["g3"], ["f3"]),
        h.make_node("Gemm", ["f3", "wg", "bg"], ["fc2"], alpha=0.5, beta=2.0),
        h.make_node("Add", ["k1", "fc2"], ["y"]),
    ]
    inits = [
        init("w1", 4, 3, 3, 3),
        init("b1", 4),
        init("w2", 5, 4, 2, 2),
        init("w3", 5, 5, 3, 3),
        init("b3", 5),
        onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        init("wm", 5, 6),
        init("bm", 6),
        init("wg", 5, 6),
        init("bg", 1, 6),
    ]
    graph = h.make_graph(
        nodes,
        "hand",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 8, 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 6])],
        inits,
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(path))
    return path


def test_hand_made_file_matches_onnx_semantics(tmp_path: Path) -> None:
    from onnx.reference import ReferenceEvaluator

    from codegen.core import simulate

    path = _hand_model(tmp_path / "hand.onnx")
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    g = from_onnx(path, x)
    assert g.name == "hand"
    assert [n.op for n in g.nodes] == [
        "conv2d", "conv2d", "conv2d", "avgpool2d", "global_avgpool", "global_avgpool", "reshape",
        "dense", "reshape", "dense", "add",
    ]  # fmt: skip
    assert g.nodes[0].attrs["padding"] == (1, 0, 1, 0)  # SAME_LOWER, 8 -> 4 at stride 2
    assert g.nodes[1].attrs["padding"] == (0, 1, 0, 1)  # SAME_UPPER, kernel 2
    assert g.nodes[2].attrs["padding"] == (2, 1, 1, 3)  # Pad (H +1 top, W +2 right) folded
    assert g.nodes[7].attrs["clamp"] == (-0.3, float("inf"))
    want = ReferenceEvaluator(str(path)).run(None, {"x": x})[0]
    got = simulate.nhwc_to_nchw(simulate.run(g, simulate.nchw_to_nhwc(x.astype(np.float64))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the reference runs float32


def test_hand_made_sequence_file_matches_onnx_semantics(tmp_path: Path) -> None:
    """1-D forms on a 3-D input: a standalone BatchNormalization (a depthwise conv) with a Relu
    fused into it, Conv with a 1-D kernel (SAME_UPPER, stride 2), MaxPool with ceil_mode=1,
    AveragePool, Dropout and Identity, ReduceMax over L; a Dropout in training mode refused."""
    from onnx.reference import ReferenceEvaluator

    from codegen.core import simulate

    h = onnx.helper
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, lo: float = -1.0) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(rng.uniform(lo, 1.0, shape).astype(np.float32), name)

    def save(nodes: list[onnx.NodeProto], name: str) -> Path:
        graph = h.make_graph(
            nodes,
            name,
            [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 19])],
            [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4, 1])],
            [init("w", 4, 3, 3), init("b", 4), init("g", 3), init("be", 3), init("m", 3),
             init("v", 3, lo=0.5), onnx.numpy_helper.from_array(np.array([2], np.int64), "ax"),
             onnx.numpy_helper.from_array(np.array(True), "train")],
        )  # fmt: skip
        path = tmp_path / f"{name}.onnx"
        onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(path))
        return path

    nodes = [
        h.make_node("BatchNormalization", ["x", "g", "be", "m", "v"], ["bn"]),
        h.make_node("Relu", ["bn"], ["r"]),
        h.make_node("Conv", ["r", "w", "b"], ["c"], auto_pad="SAME_UPPER", strides=[2]),
        h.make_node("MaxPool", ["c"], ["mp"], kernel_shape=[3], strides=[2], ceil_mode=1),
        h.make_node("Dropout", ["mp"], ["d"]),
        h.make_node("Identity", ["d"], ["i"]),
        h.make_node("AveragePool", ["i"], ["ap"], kernel_shape=[2], strides=[1]),
        h.make_node("ReduceMax", ["ap", "ax"], ["y"], keepdims=1),
    ]
    path = save(nodes, "seq")
    x = np.random.default_rng(1).standard_normal((3, 3, 19)).astype(np.float32)
    g = from_onnx(path, x)
    assert [n.op for n in g.nodes] == ["conv2d", "conv2d", "maxpool2d", "avgpool2d", "maxpool2d"]
    assert g.nodes[0].attrs["groups"] == 3 and g.tensors[g.input].shape == (1, 19, 3)
    assert g.nodes[0].attrs["clamp"] == (0.0, float("inf"))  # the Relu fuses into the BN conv
    assert g.nodes[1].attrs["padding"] == (0, 0, 1, 1)  # SAME_UPPER, 19 -> 10 at stride 2
    assert g.nodes[2].attrs["padding"] == (0, 0, 0, 1)  # ceil_mode: 10 -> 5, not 4
    assert g.output in g.sequences and g.tensors[g.output].shape == (1, 1, 4)
    want = ReferenceEvaluator(str(path)).run(None, {"x": x})[0]
    got = simulate.run(g, simulate.nchw_to_nhwc(x[:, :, None, :].astype(np.float64)))
    np.testing.assert_allclose(got[:, 0].transpose(0, 2, 1), want, rtol=1e-5, atol=1e-5)

    nodes[4] = h.make_node("Dropout", ["mp", "", "train"], ["d"])
    with pytest.raises(UnsupportedModelError, match="Dropout with training_mode=True at node"):
        from_onnx(save(nodes, "seq_train"), x)


@pytest.mark.parametrize("opset", [13, 20])
def test_activation_patterns_of_older_opsets(tmp_path: Path, opset: int) -> None:
    """Before opset 14 torch writes Hardswish as x * HardSigmoid(x), and SiLU is always
    x * Sigmoid(x): each is read back as one table node, the torch one."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(C, 5, 3), nn.Hardswish(), nn.SiLU(), nn.Hardsigmoid(), nn.LeakyReLU(0.3),
        nn.Sigmoid(), nn.Tanh(),
    ).eval()  # fmt: skip
    calib = np.random.default_rng(1).standard_normal((4, C, 8, 8)).astype(np.float32)
    path = export(model, calib[:1], tmp_path / "acts.onnx", "torchscript", opset_version=opset)
    want = from_torch(model, calib)
    assert_same_graph(want, from_onnx(path, calib, want.name))
    qm = _quantize(model, calib, 16)
    got = codegen.quantize(
        str(path), calib, acc_bits=16, progress=False, name=want.name, rounding="nearest"
    )
    assert_same_graph(qm.graph, got.graph)
    assert np.array_equal(got.reference_int(calib), qm.reference_int(calib))


def test_hand_made_activations_match_onnx_semantics(tmp_path: Path) -> None:
    """HardSigmoid with its own alpha/beta, LeakyRelu's default alpha, a Sigmoid that is not SiLU
    (its output is read twice); Mul other than x * Sigmoid(x) is a product (or a `scale` table
    by a scalar), by a constant tensor refused in one line; Softmax over the channels only."""
    from onnx.reference import ReferenceEvaluator

    from codegen.core import simulate

    h = onnx.helper

    def save(nodes: list[onnx.NodeProto], name: str) -> Path:
        graph = h.make_graph(
            nodes,
            name,
            [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 4, 4])],
            [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, 4, 4])],
        )
        path = tmp_path / f"{name}.onnx"
        onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 20)]), str(path))
        return path

    path = save(
        [
            h.make_node("HardSigmoid", ["x"], ["a"], alpha=0.3, beta=0.4),
            h.make_node("LeakyRelu", ["x"], ["b"]),
            h.make_node("Sigmoid", ["b"], ["s"]),
            h.make_node("Tanh", ["s"], ["t"]),
            h.make_node("Add", ["s", "t"], ["u"]),
            h.make_node("Gelu", ["u"], ["v"], approximate="tanh"),
            h.make_node("Add", ["a", "v"], ["y"]),
        ],
        "acts",
    )
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32) * 3
    g = from_onnx(path, x)
    luts = [(n.attrs["function"], n.attrs["args"]) for n in g.nodes if n.op == "lut"]
    assert luts == [
        ("hardsigmoid", (0.3, 0.4)),
        ("leaky_relu", (0.01,)),
        ("sigmoid", ()),
        ("tanh", ()),
        ("gelu_tanh", ()),
    ]
    want = ReferenceEvaluator(str(path)).run(None, {"x": x})[0]
    got = simulate.nhwc_to_nchw(simulate.run(g, simulate.nchw_to_nhwc(x.astype(np.float64))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return h.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value))

    mul = save(
        [
            h.make_node("Sigmoid", ["x"], ["s"]),
            h.make_node("Tanh", ["x"], ["t"]),
            h.make_node("Mul", ["t", "s"], ["m"]),
            const("k", np.array(0.3, np.float32)),
            h.make_node("Mul", ["k", "m"], ["y0"]),
            h.make_node("GlobalAveragePool", ["y0"], ["g"]),
            h.make_node("Mul", ["g", "y0"], ["y1"]),  # a per-channel scale, first
            h.make_node("Softmax", ["y1"], ["y"], axis=1),  # of every pixel
        ],
        "mul",
    )
    g = from_onnx(mul, x)
    assert [n.op for n in g.nodes] == [
        "lut",
        "lut",
        "mul",
        "lut",
        "global_avgpool",
        "mul",
        "softmax",
    ]
    assert g.nodes[3].attrs["args"] == (0.3,) and g.nodes[5].inputs[1] == g.nodes[4].output
    want = ReferenceEvaluator(str(mul)).run(None, {"x": x})[0]
    got = simulate.nhwc_to_nchw(simulate.run(g, simulate.nchw_to_nhwc(x.astype(np.float64))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    for nodes, message in [
        (
            [const("k", np.ones((3, 1, 1), np.float32)), h.make_node("Mul", ["x", "k"], ["y"])],
            r"Mul by a constant of shape \(3, 1, 1\) \(only a scalar\) at node 'y' \(Mul\)",
        ),
        ([h.make_node("Softmax", ["x"], ["y"])], r"softmax over dim -1 \(only over the channels"),
    ]:
        with pytest.raises(UnsupportedModelError, match=message):
            from_onnx(save(nodes, "refused"), x)


def test_hand_made_conv_transpose_matches_onnx_semantics(tmp_path: Path) -> None:
    """ConvTranspose with asymmetric pads, output_padding, group and dilations (forms torch does
    not export), 2-D and 1-D, against torch's transposed convolution cropped by the pads;
    output_shape and SAME pads refused."""
    import torch.nn.functional as F

    from codegen.core import simulate

    h = onnx.helper
    rng = np.random.default_rng(0)

    def save(name: str, x_shape: list[int], w: np.ndarray, b: np.ndarray, **attrs: object) -> Path:
        out = ["n", "c", "h", "w"][: len(x_shape) + 1]
        graph = h.make_graph(
            [h.make_node("ConvTranspose", ["x", "w", "b"], ["y"], group=2, **attrs)],
            name,
            [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", *x_shape])],
            [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out)],
            [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")],
        )
        path = tmp_path / f"{name}.onnx"
        onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(path))
        return path

    w2, w1 = (rng.uniform(-1, 1, s).astype(np.float32) for s in ((4, 3, 3, 2), (4, 2, 1, 4)))
    b2, b1 = rng.uniform(-1, 1, 6).astype(np.float32), rng.uniform(-1, 1, 4).astype(np.float32)
    cases = [  # (file, input shape, weight, bias, stride, dilation, output_padding, pads t b l r)
        (
            save("t2", [4, 5, 6], w2, b2, strides=[2, 3], pads=[1, 0, 0, 2],
                 output_padding=[1, 2], dilations=[1, 2]),
            (4, 5, 6), w2, b2, (2, 3), (1, 2), (1, 2), (1, 0, 0, 2),
        ),
        (
            save("t1", [4, 9], w1[:, :, 0], b1, strides=[3], pads=[2, 1], output_padding=[1]),
            (4, 1, 9), w1, b1, (1, 3), (1, 1), (0, 1), (0, 0, 2, 1),
        ),
    ]  # fmt: skip
    for path, x_shape, w, b, stride, dil, op, (t, bo, le, ri) in cases:
        x = np.random.default_rng(1).standard_normal((3, *x_shape))
        g = from_onnx(path, x.reshape(3, 4, -1) if x_shape[1] == 1 else x)
        assert [n.op for n in g.nodes] == ["zero_insert", "conv2d"]
        full = F.conv_transpose2d(
            torch.as_tensor(x), torch.as_tensor(w, dtype=torch.float64),
            torch.as_tensor(b, dtype=torch.float64), stride, 0, op, 2, dil,
        ).numpy()  # fmt: skip
        want = full[:, :, t : full.shape[2] - bo, le : full.shape[3] - ri]
        got = simulate.nhwc_to_nchw(simulate.run(g, simulate.nchw_to_nhwc(x)))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    x2 = np.zeros((1, 4, 5, 6), np.float32)
    conv = from_onnx(tmp_path / "t2.onnx", x2).nodes[1]
    # (k - 1) * dilation - pads, + output_padding at the end: H (2 - 1, 2 - 0 + 1), W (2 - 0,
    # 2 - 2 + 2)
    assert conv.attrs["padding"] == (1, 3, 2, 2)
    for name, attrs in (
        ("shape", {"output_shape": [10, 12]}),
        ("same", {"auto_pad": "SAME_UPPER"}),
    ):
        with pytest.raises(
            UnsupportedModelError, match=r"ConvTranspose with (output_shape|auto_pad)"
        ):
            from_onnx(save(name, [4, 5, 6], w2, b2, strides=[2, 2], **attrs), x2)


def _one_node_file(
    tmp_path: Path, name: str, nodes: list[onnx.NodeProto], shapes: tuple[list[int], list[int]]
) -> Path:
    h = onnx.helper
    graph = h.make_graph(
        nodes,
        name,
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shapes[0])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shapes[1])],
    )
    path = tmp_path / f"{name}.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 20)]), str(path))
    return path


@pytest.mark.parametrize(
    ("coords", "scales", "out"),
    [
        ("half_pixel", [1, 1, 2, 2], [1, 3, 10, 12]),
        ("half_pixel", [1, 1, 0.6, 1.5], [1, 3, 3, 9]),
        ("align_corners", None, [1, 3, 7, 4]),
        ("pytorch_half_pixel", None, [1, 3, 1, 11]),
    ],
)
def test_hand_made_resize_linear_matches_onnx_semantics(
    tmp_path: Path, coords: str, scales: list[float] | None, out: list[int]
) -> None:
    """Resize, mode linear, in the coordinate modes the exporters write (and pytorch_half_pixel's
    one-row output) against ONNX's own reference: PyTorch's clamped coordinates are ONNX's edge
    values."""
    from onnx.reference import ReferenceEvaluator

    from codegen.core import simulate

    h = onnx.helper
    s, z = np.array(scales or [], np.float32), np.array([], np.float32)
    sizes = [] if scales else [h.make_node("Constant", [], ["sizes"], value_ints=out)]
    node = h.make_node(
        "Resize", ["x", "roi", "scales", *([] if scales else ["sizes"])], ["y"], mode="linear",
        coordinate_transformation_mode=coords,
    )  # fmt: skip
    consts = [
        h.make_node("Constant", [], [k], value=onnx.numpy_helper.from_array(v))
        for k, v in (("roi", z), ("scales", s))
    ]
    path = _one_node_file(tmp_path, "resize", [*consts, *sizes, node], ([1, 3, 5, 6], out))
    x = np.random.default_rng(3).standard_normal((1, 3, 5, 6)).astype(np.float32)
    g = from_onnx(path, x)
    assert [n.op for n in g.nodes] == ["resize_bilinear"]
    want = ReferenceEvaluator(str(path)).run(None, {"x": x})[0]
    got = simulate.nhwc_to_nchw(simulate.run(g, simulate.nchw_to_nhwc(x.astype(np.float64))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_transposes_of_the_batch_axis_are_refused_unless_they_pool(tmp_path: Path) -> None:
    """Values moved across the batch axis are read back only as the means of windows (the
    dynamo exporter's adaptive average pool); a real transpose of the batch axis is refused."""
    h = onnx.helper
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 5)).astype(np.float32)
    swap = [
        h.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2, 3], name="swap"),
        h.make_node("Relu", ["t"], ["y"]),
    ]
    path = _one_node_file(tmp_path, "swap", swap, ([1, 3, 4, 5], [3, 1, 4, 5]))
    with pytest.raises(UnsupportedModelError) as e:
        from_onnx(path, x)
    message = str(e.value)
    assert "moved across the batch axis at node 'swap' (Transpose)" in message
    assert "\n" not in message
    # rows picked back to front, the batch axis moved and back: 1x1 windows, in that order
    rows = onnx.numpy_helper.from_array(np.array([3, 2, 1, 0], np.int64))
    flip = [
        h.make_node("Constant", [], ["rows"], value=rows),
        h.make_node("Transpose", ["x"], ["t"], perm=[2, 3, 0, 1]),
        h.make_node("Gather", ["t", "rows"], ["g"], axis=0),
        h.make_node("Transpose", ["g"], ["y"], perm=[2, 3, 0, 1]),
    ]
    g = from_onnx(_one_node_file(tmp_path, "flip", flip, ([1, 3, 4, 5], [1, 3, 4, 5])), x)
    assert [n.op for n in g.nodes] == ["adaptive_avgpool2d"]
    assert g.nodes[0].attrs["rows"] == ((3, 4), (2, 3), (1, 2), (0, 1))
    # AlexNet's pool (windows of one size, 1 x 1, that repeat: 2 x 2 -> 4 x 6), as dynamo
    # spells it: the windows' pixels gathered into axes of their own, then their mean
    rows, cols = adaptive_windows(2, 4), adaptive_windows(2, 6)
    ih, iw = (np.array([r0 for r0, _ in rows])[:, None, None, None],
              np.array([c0 for c0, _ in cols])[:, None])  # fmt: skip
    at = np.stack(np.broadcast_arrays(ih, iw), axis=-1)  # (4, 1, 6, 1, 2)
    axes = onnx.numpy_helper.from_array(np.array([3, 5], np.int64))
    pool = [
        h.make_node("Constant", [], ["at"], value=onnx.numpy_helper.from_array(at)),
        h.make_node("Constant", [], ["axes"], value=axes),
        h.make_node("Transpose", ["x"], ["t"], perm=[2, 3, 0, 1]),
        h.make_node("GatherND", ["t", "at"], ["g"]),
        h.make_node("Transpose", ["g"], ["v"], perm=[4, 5, 0, 1, 2, 3]),
        h.make_node("ReduceMean", ["v", "axes"], ["y"], keepdims=0),
    ]
    x = x[:, :, :2, :2].copy()
    g = from_onnx(_one_node_file(tmp_path, "pool", pool, ([1, 3, 2, 2], [1, 3, 4, 6])), x)
    assert [n.op for n in g.nodes] == ["adaptive_avgpool2d"]
    assert (g.nodes[0].attrs["rows"], g.nodes[0].attrs["cols"]) == (rows, cols)
    assert g.nodes[0].attrs["counts"] == (1,) * 24


def test_normalisations_are_refused_saying_why(tmp_path: Path) -> None:
    """LayerNormalization, and the ReduceMean / Sub of a decomposed one: one line, the node, why."""
    h = onnx.helper
    scale = onnx.numpy_helper.from_array(np.ones(4, np.float32))
    ln = [
        h.make_node("Constant", [], ["s"], value=scale),
        h.make_node("LayerNormalization", ["x", "s"], ["y"], axis=1),
    ]
    axes = onnx.numpy_helper.from_array(np.array([1], np.int64))
    decomposed = [
        h.make_node("Constant", [], ["axes"], value=axes),
        h.make_node("ReduceMean", ["x", "axes"], ["m"], name="mean"),
        h.make_node("Sub", ["x", "m"], ["y"]),
    ]
    x = np.zeros((1, 4), np.float32)
    for nodes, what in ((ln, "LayerNormalization at node 'y'"), (decomposed, "at node 'mean'")):
        path = _one_node_file(tmp_path, "norm", nodes, ([1, 4], [1, 4]))
        with pytest.raises(UnsupportedModelError) as e:
            from_onnx(path, x)
        message = str(e.value)
        assert what in message and "\n" not in message
        assert "per-sample mean, variance and reciprocal square root" in message
