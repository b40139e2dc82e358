"""Every supported op against torch's own float semantics, and the frontend's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codegen.core import simulate
from codegen.core.errors import InvalidModelError, UnsupportedModelError
from codegen.frontend.torch_fx import from_torch


def _bn(c: int, d: int = 2) -> nn.Module:
    bn = nn.BatchNorm2d(c) if d == 2 else nn.BatchNorm1d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class Lambda(nn.Module):
    def __init__(self, fn, **mods):  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fn(self, x)


def seq(*mods: nn.Module) -> nn.Module:
    return nn.Sequential(*mods)


C = 4
CASES = {
    "conv_stride_pad": lambda: seq(nn.Conv2d(C, 6, 3, stride=2, padding=1)),
    "conv_same_even_kernel": lambda: seq(nn.Conv2d(C, 5, 4, padding="same")),
    "conv_valid_nobias": lambda: seq(nn.Conv2d(C, 5, 3, padding="valid", bias=False)),
    "conv_dilation": lambda: seq(nn.Conv2d(C, 3, 3, padding=2, dilation=2)),
    "conv_groups": lambda: seq(nn.Conv2d(C, 6, 3, padding=1, groups=2)),
    "conv_depthwise": lambda: seq(nn.Conv2d(C, C, 3, padding=1, groups=C)),
    "conv_depthwise_multiplier": lambda: seq(nn.Conv2d(C, 2 * C, 3, groups=C)),
    "conv_pointwise": lambda: seq(nn.Conv2d(C, 7, 1)),
    "zeropad_asymmetric": lambda: seq(nn.ZeroPad2d((1, 0, 2, 1)), nn.Conv2d(C, 3, 3)),
    "f_pad_asymmetric": lambda: Lambda(
        lambda s, x: s.c(F.pad(x, (0, 1, 0, 1))), c=nn.Conv2d(C, 3, 2, stride=2)
    ),
    "bn2d_folded": lambda: seq(nn.Conv2d(C, 5, 3), _bn(5), nn.ReLU()),
    "bn1d_folded": lambda: seq(nn.Flatten(), nn.Linear(C * 64, 9), _bn(9, 1), nn.ReLU()),
    "relu6": lambda: seq(nn.Conv2d(C, 5, 3), nn.ReLU6()),
    "hardtanh": lambda: seq(nn.Conv2d(C, 5, 3), nn.Hardtanh(-0.5, 0.3)),
    "torch_clamp": lambda: Lambda(lambda s, x: torch.clamp(s.c(x), min=-0.2), c=nn.Conv2d(C, 3, 1)),
    "method_clamp_relu": lambda: Lambda(
        lambda s, x: s.c(x).clamp(0.0, 0.5).relu(), c=nn.Conv2d(C, 3, 1)
    ),
    "f_relu_relu6": lambda: Lambda(lambda s, x: F.relu6(F.relu(s.c(x))), c=nn.Conv2d(C, 3, 1)),
    "maxpool": lambda: seq(nn.Conv2d(C, 3, 1), nn.MaxPool2d(3, stride=2, padding=1)),
    "f_maxpool": lambda: Lambda(
        lambda s, x: F.max_pool2d(x, 2),
    ),
    "avgpool_pad": lambda: seq(nn.AvgPool2d(3, stride=1, padding=1)),
    "avgpool": lambda: seq(nn.Conv2d(C, 3, 1), nn.AvgPool2d(2)),
    "adaptive_avgpool": lambda: seq(nn.Conv2d(C, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    "f_adaptive_avgpool": lambda: Lambda(lambda s, x: F.adaptive_avg_pool2d(x, (1, 1))),
    "flatten_linear": lambda: seq(nn.Conv2d(C, 3, 3), nn.Flatten(), nn.Linear(3 * 36, 5)),
    "view_linear": lambda: Lambda(
        lambda s, x: s.fc(s.c(x).view(x.size(0), -1)),
        c=nn.Conv2d(C, 2, 3, stride=2),
        fc=nn.Linear(2 * 9, 4),
    ),
    "reshape_linear": lambda: Lambda(
        lambda s, x: s.fc(torch.reshape(x, (x.shape[0], -1))), fc=nn.Linear(C * 64, 4)
    ),
    "torch_flatten": lambda: Lambda(
        lambda s, x: s.fc(torch.flatten(x, 1)), fc=nn.Linear(C * 64, 3)
    ),
    "dropout_identity": lambda: seq(nn.Conv2d(C, 3, 1), nn.Dropout(0.5), nn.Identity(), nn.ReLU()),
    "residual_add": lambda: Lambda(
        lambda s, x: torch.relu(x + s.c(x)), c=nn.Conv2d(C, C, 3, padding=1)
    ),
    "torch_add": lambda: Lambda(
        lambda s, x: torch.add(s.a(x), s.b(x)),
        a=nn.Conv2d(C, 3, 1),
        b=nn.Conv2d(C, 3, 3, padding=1),
    ),
    "cat_dim1": lambda: Lambda(lambda s, x: torch.cat([s.a(x), x], dim=1), a=nn.Conv2d(C, 3, 1)),
    "cat_dim_neg3": lambda: Lambda(lambda s, x: torch.cat((x, s.a(x)), -3), a=nn.Conv2d(C, 2, 1)),
    # element-wise functions: one `lut` node each (modules, functions, tensor methods)
    "lut_modules": lambda: seq(
        nn.Conv2d(C, 6, 3),
        nn.Hardswish(),
        nn.Hardsigmoid(),
        nn.SiLU(),
        nn.Sigmoid(),
        nn.Tanh(),
        nn.LeakyReLU(0.2),
        nn.GELU(),
        nn.GELU(approximate="tanh"),
    ),
    "lut_functions": lambda: Lambda(
        lambda s, x: F.gelu(
            F.leaky_relu(torch.tanh(F.silu(torch.sigmoid(F.hardsigmoid(F.hardswish(x)))))),
            approximate="tanh",
        )
    ),
    "lut_functions_2": lambda: Lambda(
        lambda s, x: F.gelu(F.tanh(F.sigmoid(F.leaky_relu(x, negative_slope=0.3))))
    ),
    "lut_methods": lambda: Lambda(lambda s, x: x.sigmoid().tanh() + x.tanh().sigmoid()),
}
LUT_FUNCTIONS = {
    "lut_modules": [
        "hardswish",
        "hardsigmoid",
        "silu",
        "sigmoid",
        "tanh",
        "leaky_relu",
        "gelu",
        "gelu_tanh",
    ],
    "lut_functions": [
        "hardswish",
        "hardsigmoid",
        "sigmoid",
        "silu",
        "tanh",
        "leaky_relu",
        "gelu_tanh",
    ],
    "lut_functions_2": ["leaky_relu", "sigmoid", "tanh", "gelu"],
    "lut_methods": ["sigmoid", "tanh", "tanh", "sigmoid"],
}


@pytest.mark.parametrize("case", list(LUT_FUNCTIONS))
def test_activations_are_lut_nodes(case: str) -> None:
    g = from_torch(CASES[case]().eval(), np.zeros((1, C, 8, 8), np.float32))
    luts = [n for n in g.nodes if n.op == "lut"]
    assert [n.attrs["function"] for n in luts] == LUT_FUNCTIONS[case]
    slopes = [n.attrs["args"] for n in luts if n.attrs["function"] == "leaky_relu"]
    want = {"lut_modules": [(0.2,)], "lut_functions": [(0.01,)], "lut_functions_2": [(0.3,)]}
    assert slopes == want.get(case, [])
    assert all(n.attrs["args"] == () for n in luts if n.attrs["function"] != "leaky_relu")


def test_inplace_methods_are_lut_nodes() -> None:
    g = from_torch(
        Lambda(lambda s, x: s.c(x).sigmoid_().tanh_(), c=nn.Conv2d(C, 3, 1)),
        np.zeros((1, C, 8, 8), np.float32),
    )
    assert [n.attrs.get("function") for n in g.nodes] == [None, "sigmoid", "tanh"]


def test_clamp_after_lut_is_fused() -> None:
    g = from_torch(
        Lambda(lambda s, x: F.relu(torch.tanh(x))),
        np.zeros((1, C, 8, 8), np.float32),
    )
    assert [n.op for n in g.nodes] == ["lut"]
    assert g.nodes[0].attrs["clamp"] == (0.0, float("inf"))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_op_matches_torch(case: str) -> None:
    torch.manual_seed(0)
    model = CASES[case]().double().eval()
    x = np.random.default_rng(0).standard_normal((3, C, 8, 8))
    graph = from_torch(model, x.astype(np.float32))
    got = simulate.run(graph, simulate.nchw_to_nhwc(x))
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(simulate.nhwc_to_nchw(got), want, rtol=1e-9, atol=1e-9)


def test_graph_is_nhwc_with_fusions() -> None:
    model = CASES["bn2d_folded"]().eval()
    g = from_torch(model, np.zeros((1, C, 8, 8), np.float32))
    assert [n.op for n in g.nodes] == ["conv2d"]
    assert g.nodes[0].attrs["clamp"] == (0.0, float("inf"))
    assert g.nodes[0].params["weight"].shape == (5, 3, 3, C)  # OHWI
    assert g.tensors[g.input].shape == (8, 8, C) and g.tensors[g.output].shape == (6, 6, 5)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            Lambda(lambda s, x: torch.topk(x.flatten(1), 3).values),
            "unsupported op torch.topk at node 'topk'",
        ),
        (seq(nn.Conv2d(C, 3, 1), nn.ELU()), "unsupported op ELU (module '1') at node '_1'"),
        (Lambda(lambda s, x: x * 2), "at node 'mul'"),
        (seq(nn.Conv2d(C, 3, 1), nn.MaxPool2d(2, ceil_mode=True)), "MaxPool2d with ceil_mode=True"),
        (seq(nn.AdaptiveAvgPool2d(2)), "AdaptiveAvgPool2d to 2 (only to 1x1)"),
        (seq(nn.ReLU()), "activation that does not directly follow"),
        (Lambda(lambda s, x: torch.cat([x, x], dim=2)), "channel dimension"),
    ],
)
def test_unsupported_ops_are_named(model: nn.Module, message: str) -> None:
    with pytest.raises(
        UnsupportedModelError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        from_torch(model, np.zeros((1, C, 8, 8), np.float32))


def test_relu_not_fused_into_shared_tensor() -> None:
    m = Lambda(lambda s, x: torch.relu(y := s.c(x)) + y, c=nn.Conv2d(C, C, 1))
    with pytest.raises(UnsupportedModelError, match="activation that does not directly follow"):
        from_torch(m, np.zeros((1, C, 8, 8), np.float32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_name_the_tensor(bad: float) -> None:
    m = seq(nn.Conv2d(C, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        m[2].weight[0, 0, 0, 0] = bad
    with pytest.raises(InvalidModelError, match=r"tensor '2\.weight' holds NaN or Inf"):
        from_torch(m, np.zeros((1, C, 8, 8), np.float32))


def test_not_a_module() -> None:
    with pytest.raises(InvalidModelError, match=r"expected a torch\.nn\.Module"):
        from_torch(lambda x: x, np.zeros((1, C, 8, 8), np.float32))  # type: ignore[arg-type]
