"""Every supported op against torch's own float semantics, and the frontend's errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codegen.api import to_ir_input
from codegen.core import reference, simulate
from codegen.core.errors import InvalidModelError, UnsupportedModelError
from codegen.core.ir import Graph, Node, Requant
from codegen.frontend.builder import IRBuilder
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


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """A stand-in for torchvision.ops.stochastic_depth (torchvision imports only through
    tests/zoo.py's workaround): the frontend recognises it by its name, as torch.fx records the
    wrapped function."""
    if not training or p == 0.0:
        return x
    size = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * noise / (1.0 - p)


def _mul_forms(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Spellings of a product: same shape, a per-channel scale on either side, and by constants
    (which become `scale` tables); in-place forms: test_inplace_products."""
    z = torch.mul(s.a(x), s.b(x))
    z = z.mul(torch.sigmoid(s.g(s.p(z))))  # squeeze-excitation: x * gate(x), (N, C, 1, 1)
    w = s.c(x) * 2.5 * z
    w = F.hardsigmoid(s.g(s.p(w))) * w  # the scale first
    return 0.5 * w


torch.fx.wrap("stochastic_depth")  # as torchvision does: a leaf call in the traced graph


class StochasticDepth(nn.Module):
    """A stand-in for torchvision.ops.StochasticDepth (matched by class name)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.mode, self.training)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: traced through, it reads its parameters itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle, shape arithmetic included."""
    batchsize, num_channels, height, width = x.size()
    x = x.view(batchsize, groups, num_channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: chunk, a branch on one half, cat, channel shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(c // 2, c // 2, 1), nn.ReLU(), nn.Conv2d(c // 2, c // 2, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


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
    # DenseNet's first dense layer: the cat of one value (the features so far), BN-ReLU-conv,
    # and the next layer's cat of the features and the new ones
    "cat_single": lambda: Lambda(
        lambda s, x: (lambda f: torch.cat([f, s.c(s.r(s.bn(torch.cat([f], 1))))], 1))(s.p(x)),
        p=nn.MaxPool2d(2),
        bn=_bn(C),
        r=nn.ReLU(),
        c=nn.Conv2d(C, 3, 1),
    ),
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
    # eval-mode identities, removed
    "dropouts": lambda: seq(
        nn.Conv2d(C, 3, 1), nn.Dropout2d(0.3), nn.AlphaDropout(0.2), nn.Identity(), nn.ReLU()
    ),
    "f_dropout_contiguous": lambda: Lambda(
        lambda s, x: F.relu(F.dropout(s.c(x), 0.3, training=s.training).contiguous()),
        c=nn.Conv2d(C, 3, 1),
    ),
    "stochastic_depth": lambda: Lambda(
        lambda s, x: x + s.sd(s.c(x)),
        c=nn.Conv2d(C, C, 3, padding=1),
        sd=StochasticDepth(0.2, "row"),
    ),
    # products: `mul` (same shape, or a per-channel scale), or a `scale` table for a constant
    "mul_forms": lambda: Lambda(
        _mul_forms,
        a=nn.Conv2d(C, 3, 1),
        b=nn.Conv2d(C, 3, 3, padding=1),
        c=nn.Conv2d(C, 3, 1),
        p=nn.AdaptiveAvgPool2d(1),
        g=nn.Conv2d(3, 3, 1),
    ),
    "mul_vectors": lambda: Lambda(lambda s, x: (y := s.fc(x)) * y.relu(), fc=nn.Linear(24, 6)),
    # softmax over the channels: of every pixel, of a vector (module, function, method)
    "softmax_forms": lambda: Lambda(
        lambda s, x: torch.softmax(s.fc(s.sm(F.softmax(s.c(x), 1).softmax(-3)).mean((2, 3))), -1),
        c=nn.Conv2d(C, 4, 1),
        sm=nn.Softmax(dim=1),
        fc=nn.Linear(4, 5),
    ),
    # activations that fuse into nothing: `lut` nodes (relu, clamp)
    "act_on_input": lambda: seq(nn.ReLU6(), nn.Conv2d(C, 3, 1)),
    "act_after_cat": lambda: Lambda(
        lambda s, x: s.r(torch.cat([s.a(x), x], dim=1)), a=nn.Conv2d(C, 3, 1), r=nn.ReLU()
    ),
    "act_after_act": lambda: seq(nn.Hardtanh(-0.5, 0.75), nn.ReLU(), nn.Conv2d(C, 2, 1)),
    "act_shared": lambda: Lambda(lambda s, x: F.relu(y := s.c(x)) + y, c=nn.Conv2d(C, C, 1)),
    # BatchNorm that follows no conv: a depthwise 1x1 conv with bias
    "bn2d_standalone": lambda: seq(_bn(C), nn.Conv2d(C, 3, 3, padding=1)),
    "bn2d_preact": lambda: Lambda(
        lambda s, x: x + s.c(s.r(s.bn(x))), bn=_bn(C), r=nn.ReLU(), c=nn.Conv2d(C, C, 3, padding=1)
    ),
    # mean over H and W: a global average pool (+ flatten)
    "mean_hw": lambda: Lambda(
        lambda s, x: s.fc(s.c(x).mean((2, 3))), c=nn.Conv2d(C, 3, 1), fc=nn.Linear(3, 2)
    ),
    "mean_neg_keepdim": lambda: Lambda(
        lambda s, x: torch.mean(s.c(x), dim=[-2, -1], keepdim=True), c=nn.Conv2d(C, 3, 1)
    ),
    # pools
    "maxpool_ceil": lambda: seq(nn.Conv2d(C, 3, 1), nn.MaxPool2d(3, stride=2, ceil_mode=True)),
    "maxpool_ceil_pad": lambda: seq(nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)),
    "adaptive_avgpool_2": lambda: seq(nn.Conv2d(C, 3, 1), nn.AdaptiveAvgPool2d((2, 4))),
    "adaptive_avgpool_same": lambda: seq(nn.Conv2d(C, 3, 1), nn.AdaptiveAvgPool2d(8)),
    "adaptive_maxpool_1": lambda: seq(nn.Conv2d(C, 3, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten()),
    "adaptive_maxpool_2": lambda: seq(nn.Conv2d(C, 3, 1), nn.AdaptiveMaxPool2d(2)),
    # inputs of other ranks: sequences (N, C, L) and vectors (N, F)
    "seq_conv1d": lambda: seq(
        nn.Conv1d(C, 5, 3, stride=2, padding=1),
        _bn(5, 1),
        nn.ReLU(),
        nn.MaxPool1d(2, ceil_mode=True),
        nn.AvgPool1d(2),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    ),
    "seq_out": lambda: seq(_bn(C, 1), nn.ReLU(), nn.Conv1d(C, 4, 3, padding=1), nn.MaxPool1d(3)),
    "seq_flatten_linear": lambda: seq(
        nn.Conv1d(C, 3, 3, dilation=2), nn.Dropout1d(0.2), nn.Flatten(), nn.Linear(3 * 8, 4)
    ),
    "vector_mlp": lambda: seq(
        nn.Linear(24, 16), _bn(16, 1), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 24)
    ),
    "seq_f_pools": lambda: Lambda(
        lambda s, x: F.avg_pool1d(F.max_pool1d(s.c(x), 3, 1, 1, ceil_mode=True), 2),
        c=nn.Conv1d(C, 4, 3),
    ),
    "channel_shuffle": lambda: Lambda(
        lambda s, x: channel_shuffle(s.c(x), 3), c=nn.Conv2d(C, 6, 1)
    ),
    "shuffle_unit": lambda: seq(
        nn.Conv2d(C, 6, 1), ShuffleUnit(6), nn.Flatten(), nn.Linear(384, 3)
    ),
    "split_views": lambda: Lambda(
        lambda s, x: torch.cat(
            (
                (t := torch.split(s.c(x), [2, 3], 1))[1].relu(),
                t[0].reshape(x.size(0), 1, 2, 64).transpose(1, 2).reshape(x.size(0), 2, 8, 8),
            ),
            1,
        ),
        c=nn.Conv2d(C, 5, 1),
    ),
    "adaptive_avgpool_up": lambda: seq(nn.Conv2d(C, 3, 3, stride=3), nn.AdaptiveAvgPool2d((7, 5))),
    "adaptive_avgpool_any": lambda: seq(nn.Conv2d(C, 3, 1), nn.AdaptiveAvgPool2d((3, 5))),
    "adaptive_maxpool_any": lambda: seq(nn.AdaptiveMaxPool2d((3, 6)), nn.Conv2d(C, 3, 1)),
    "avgpool_ceil": lambda: seq(nn.Conv2d(C, 3, 1), nn.AvgPool2d(3, 2, 1, ceil_mode=True)),
    "avgpool_exclude_pad": lambda: seq(nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
    "f_avgpool_divisor": lambda: Lambda(
        lambda s, x: F.avg_pool2d(s.c(x), 2, divisor_override=3), c=nn.Conv2d(C, 3, 1)
    ),
    # transposed convolutions: zeros inserted between the pixels, then a stride-1 conv2d
    "conv_transpose_s2": lambda: Lambda(
        lambda s, x: s.dw((y := F.relu(s.bn(s.up(x)))) + s.s1(y), output_size=(33, 32)),
        up=nn.ConvTranspose2d(C, 3, 3, stride=2, padding=1, output_padding=1),  # 8 -> 16
        bn=_bn(3),
        s1=nn.ConvTranspose2d(3, 3, 3, padding=1),  # stride 1: no zeros to insert
        dw=nn.ConvTranspose2d(3, 3, 2, stride=2, groups=3),  # depthwise, 16 -> 33 x 32
    ),
    "conv_transpose_s3_groups": lambda: seq(
        nn.ConvTranspose2d(
            C,
            6,
            (3, 2),
            stride=(3, 2),
            padding=(2, 1),
            output_padding=(1, 0),
            groups=2,
            dilation=(2, 1),
            bias=False,
        )
    ),
    "seq_conv_transpose1d": lambda: seq(
        nn.ConvTranspose1d(C, 3, 4, stride=2, padding=1), nn.ReLU(), nn.Conv1d(3, 2, 3)
    ),
    "f_avgpool_pad": lambda: Lambda(
        lambda s, x: F.avg_pool2d(s.c(x), 3, 2, 1), c=nn.Conv2d(C, 3, 1)
    ),
    # bilinear resizing (integer weights once quantized): modules, F.interpolate, 1-D linear
    "upsample_bilinear": lambda: seq(
        nn.Conv2d(C, 3, 1),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.ReLU(),
        nn.UpsamplingBilinear2d(size=(5, 11)),  # align_corners=True
    ),
    "f_interpolate": lambda: Lambda(
        lambda s, x: F.interpolate(
            F.interpolate(
                F.interpolate(s.c(x), scale_factor=2),  # nearest
                scale_factor=(0.75, 1.5),
                mode="bilinear",
                align_corners=False,
            ),
            size=(5, 13),
            mode="bilinear",
            align_corners=True,
        ),
        c=nn.Conv2d(C, 3, 1),
    ),
    "seq_interpolate_linear": lambda: Lambda(
        lambda s, x: F.interpolate(s.c(x), scale_factor=2.5, mode="linear"),
        c=nn.Conv1d(C, 3, 3),
    ),
}
SHAPES = {
    "seq_interpolate_linear": (C, 9),
    "seq_f_pools": (C, 13),
    "seq_conv1d": (C, 17),
    "seq_out": (C, 12),
    "seq_flatten_linear": (C, 12),
    "seq_conv_transpose1d": (C, 12),
    "vector_mlp": (24,),
    "mul_vectors": (24,),
}
"""Input shapes (without batch) of the cases that do not take C x 8 x 8 images."""


def shape(case: str) -> tuple[int, ...]:
    return SHAPES.get(case, (C, 8, 8))


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
    x = np.random.default_rng(0).standard_normal((3, *shape(case)))
    graph = from_torch(model, x.astype(np.float32))
    got = simulate.run(graph, simulate.nchw_to_nhwc(to_ir_input(x, graph)))
    if graph.output in graph.sequences:  # (N, 1, L, C) -> (N, C, L)
        got = got[:, 0].transpose(0, 2, 1)
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(simulate.nhwc_to_nchw(got), want, rtol=1e-9, atol=1e-9)


NEW_OPS = {  # the ops each normalised pattern becomes
    "dropouts": ["conv2d"],
    "f_dropout_contiguous": ["conv2d"],
    "stochastic_depth": ["conv2d", "add"],
    "act_on_input": ["lut", "conv2d"],
    "act_after_cat": ["conv2d", "concat", "lut"],
    "cat_single": ["maxpool2d", "conv2d", "conv2d", "concat"],  # the BN: a depthwise conv
    "act_after_act": ["lut", "conv2d"],
    "act_shared": ["conv2d", "lut", "add"],
    "bn2d_standalone": ["conv2d", "conv2d"],
    "bn2d_preact": ["conv2d", "conv2d", "add"],
    "mean_hw": ["conv2d", "global_avgpool", "reshape", "dense"],
    "mean_neg_keepdim": ["conv2d", "global_avgpool"],
    "maxpool_ceil": ["conv2d", "maxpool2d"],
    "maxpool_ceil_pad": ["maxpool2d"],
    "adaptive_avgpool_2": ["conv2d", "avgpool2d"],
    "adaptive_avgpool_same": ["conv2d"],
    "adaptive_maxpool_1": ["conv2d", "maxpool2d", "reshape"],
    "adaptive_maxpool_2": ["conv2d", "maxpool2d"],
    "seq_conv1d": ["conv2d", "maxpool2d", "avgpool2d", "global_avgpool", "reshape", "dense"],
    "seq_out": ["conv2d", "conv2d", "maxpool2d"],
    "seq_flatten_linear": ["conv2d", "reshape", "dense"],  # columns permuted from (C, L) to (L, C)
    "vector_mlp": ["dense", "dense"],
    "mul_forms": [
        *("conv2d", "conv2d", "mul"),
        *("global_avgpool", "conv2d", "lut", "mul"),
        *("conv2d", "lut", "mul"),
        *("global_avgpool", "conv2d", "lut", "mul", "lut"),
    ],
    "mul_vectors": ["dense", "lut", "mul"],
    "softmax_forms": [
        *("conv2d", "softmax", "softmax", "softmax"),
        *("global_avgpool", "reshape", "dense", "softmax"),
    ],
    "channel_shuffle": ["conv2d", "gather"],
    "shuffle_unit": [
        *("conv2d", "gather", "conv2d", "conv2d", "gather", "concat", "gather", "reshape"),
        "dense",
    ],
    "split_views": ["conv2d", "gather", "lut", "gather", "concat"],
    "adaptive_avgpool_up": ["conv2d", "adaptive_avgpool2d"],
    "adaptive_avgpool_any": ["conv2d", "adaptive_avgpool2d"],
    "adaptive_maxpool_any": ["adaptive_maxpool2d", "conv2d"],
    "avgpool_ceil": ["conv2d", "adaptive_avgpool2d"],
    "avgpool_exclude_pad": ["adaptive_avgpool2d"],
    "f_avgpool_divisor": ["conv2d", "adaptive_avgpool2d"],
    "conv_transpose_s2": ["zero_insert", "conv2d", "conv2d", "add", "zero_insert", "conv2d"],
    "seq_conv_transpose1d": ["zero_insert", "conv2d", "conv2d"],
    "upsample_bilinear": ["conv2d", "resize_bilinear", "resize_bilinear"],
    "f_interpolate": ["conv2d", "adaptive_maxpool2d", "resize_bilinear", "resize_bilinear"],
    "seq_interpolate_linear": ["conv2d", "resize_bilinear"],
}


def test_inplace_products() -> None:
    def forward(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = s.c(x)
        w *= 2.5
        return w.mul_(torch.sigmoid(w))  # fx records the call, not the mutation: its result

    model = Lambda(forward, c=nn.Conv2d(C, 3, 1)).double().eval()
    x = np.random.default_rng(0).standard_normal((2, C, 8, 8))
    g = from_torch(model, x.astype(np.float32))
    assert [(n.name, n.op) for n in g.nodes] == [
        ("c", "conv2d"), ("mul", "lut"), ("sigmoid", "lut"), ("mul_", "mul")
    ]  # fmt: skip
    got = simulate.nhwc_to_nchw(simulate.run(g, simulate.nchw_to_nhwc(x)))
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_products_keep_the_scale_second() -> None:
    g = from_torch(CASES["mul_forms"]().eval(), np.zeros((1, C, 8, 8), np.float32))
    muls = [n for n in g.nodes if n.op == "mul"]
    assert [g.tensors[n.inputs[1]].shape for n in muls] == [
        (8, 8, 3),
        (1, 1, 3),
        (8, 8, 3),
        (1, 1, 3),
    ]
    assert all(g.tensors[n.inputs[0]].shape == (8, 8, 3) for n in muls)
    scales = [n.attrs["args"] for n in g.nodes if n.attrs.get("function") == "scale"]
    assert scales == [(2.5,), (0.5,)]


@pytest.mark.parametrize("case", list(NEW_OPS))
def test_patterns_are_normalised(case: str) -> None:
    g = from_torch(CASES[case]().eval(), np.zeros((1, *shape(case)), np.float32))
    assert [n.op for n in g.nodes] == NEW_OPS[case]


def test_normalised_attributes() -> None:
    def graph(case: str) -> Graph:
        return from_torch(CASES[case]().eval(), np.zeros((1, *shape(case)), np.float32))

    g = graph("act_on_input")  # ReLU6 on the input: a table, its bounds as a clamp
    assert g.nodes[0].attrs["function"] == "clamp" and g.nodes[0].attrs["args"] == (0.0, 6.0)
    assert g.nodes[0].attrs["clamp"] == (0.0, 6.0)
    g = graph("act_after_act")  # the ReLU after the Hardtanh table fuses into it
    assert g.nodes[0].attrs["clamp"] == (0.0, 0.75)
    g = graph("act_shared")  # y is read twice: the ReLU is a table, not fused into the conv
    assert g.nodes[0].attrs["clamp"] == (-float("inf"), float("inf"))
    g = graph("act_after_cat")
    assert g.nodes[-1].attrs["function"] == "relu" and g.nodes[-1].attrs["args"] == ()
    bn = graph("bn2d_standalone").nodes[0]  # depthwise 1x1 with bias
    assert bn.attrs["groups"] == C and bn.params["weight"].shape == (C, 1, 1, 1)
    assert bn.name == "_0"
    pool = graph("maxpool_ceil").nodes[1]  # 8 -> ceil(5 / 2) + 1 = 4: one extra bottom/right row
    assert pool.attrs["padding"] == (0, 1, 0, 1)
    pool = graph("maxpool_ceil_pad").nodes[0]  # 8 + 2 -> ceil(7 / 2) + 1 = 5
    assert pool.attrs["padding"] == (1, 2, 1, 2)
    pool = graph("adaptive_avgpool_2").nodes[1]
    assert pool.attrs["kernel"] == pool.attrs["stride"] == (4, 2)
    pool = graph("adaptive_maxpool_1").nodes[1]
    assert pool.attrs["kernel"] == pool.attrs["stride"] == (8, 8)
    g = graph("seq_conv1d")
    assert g.tensors[g.input].shape == (1, 17, C) and g.input in g.sequences
    assert g.nodes[0].params["weight"].shape == (5, 1, 3, C)
    assert g.nodes[0].attrs["stride"] == (1, 2) and g.nodes[0].attrs["padding"] == (0, 0, 1, 1)
    assert g.output not in g.sequences and g.tensors[g.output].shape == (3,)
    g = graph("seq_out")
    assert g.output in g.sequences and g.tensors[g.output].shape == (1, 4, 4)
    g = graph("vector_mlp")
    assert g.tensors[g.input].shape == (24,) and not g.sequences
    g = graph("conv_transpose_s3_groups")
    zeros, conv = g.nodes
    assert zeros.attrs["stride"] == (3, 2) and g.tensors[zeros.output].shape == (22, 15, C)
    # padding dilation * (k - 1) - padding, plus output_padding at the bottom/right
    assert conv.attrs["padding"] == (2, 3, 0, 0) and conv.attrs["stride"] == (1, 1)
    assert conv.attrs["dilation"] == (2, 1) and conv.params["weight"].shape == (6, 3, 2, C // 2)
    g = graph("seq_conv_transpose1d")  # L 12 -> 23 zero-inserted -> 24
    assert [g.tensors[n.output].shape for n in g.nodes] == [(1, 23, C), (1, 24, 3), (1, 22, 2)]
    assert g.sequences == {g.input, *(n.output for n in g.nodes)}


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
        (
            Lambda(lambda s, x: x * s.p(x), p=nn.MaxPool2d((1, 8))),
            "mul with broadcasting other than one value per channel (N, C, 1, 1) at node 'mul'",
        ),
        (Lambda(lambda s, x: x * True), "operator.mul by True at node 'mul'"),
        (Lambda(lambda s, x: F.softmax(x, dim=2)), "softmax over dim 2 (only over the channels"),
        (Lambda(lambda s, x: x.softmax(1, torch.float64)), "softmax with a dtype"),
        (Lambda(lambda s, x: F.dropout(x, 0.5)), "dropout with training=True"),
        (Lambda(lambda s, x: stochastic_depth(x, 0.5, "row")), "stochastic_depth with training"),
        (Lambda(lambda s, x: x.mean(1)), "mean other than over H and W"),
        (seq(nn.Flatten(), _bn(C * 64, 1)), "BatchNorm1d of features that does not directly"),
        (Lambda(lambda s, x: torch.cat([x, x], dim=2)), "channel dimension"),
        (
            Lambda(lambda s, x: s.c(x.permute(0, 2, 3, 1)), c=nn.Conv2d(8, 3, 1)),
            "Tensor.permute at node 'permute' to (8, 8, 4): only flatten, channel permutations",
        ),
        (Lambda(lambda s, x: x.transpose(0, 1)), "Tensor.transpose of the batch axis"),
        (Lambda(lambda s, x: x.chunk(2, 0)[0]), "Tensor.chunk of the batch axis"),
        (Lambda(lambda s, x: x.view(2, -1, 8, 8)[0]), "Tensor.view of the batch axis"),
        (Lambda(lambda s, x: x[:, 1:3]), "unsupported op operator.getitem at node 'getitem'"),
        (
            seq(nn.ConvTranspose2d(C, 3, 1, stride=2, padding=1)),
            "transposed convolution with padding (1, 1, 1, 1) (top, bottom, left, right) larger",
        ),
        # normalisations by per-sample statistics: refused saying why
        (
            seq(nn.Conv2d(C, 3, 1), nn.Flatten(), nn.LayerNorm(192)),
            "LayerNorm (module '2') at node '_2' is not supported: it normalises each sample by "
            "its own mean and variance, computed at run time (a per-sample mean, variance and "
            "reciprocal square root)",
        ),
        (
            Lambda(lambda s, x: F.layer_norm(x, (8, 8))),
            "torch.nn.functional.layer_norm at node 'layer_norm' is not supported: it normalises",
        ),
        (
            Lambda(lambda s, x: s.ln(x), ln=LayerNorm2d(C)),
            "LayerNorm2d (module 'ln': torch.nn.functional.layer_norm) at node 'layer_norm' is "
            "not supported: it normalises",
        ),
        (seq(nn.GroupNorm(2, C)), "GroupNorm (module '0') at node '_0' is not supported"),
    ],
)
def test_unsupported_ops_are_named(model: nn.Module, message: str) -> None:
    with pytest.raises(
        UnsupportedModelError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        from_torch(model, np.zeros((1, C, 8, 8), np.float32))


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


@pytest.mark.parametrize(
    ("stride", "pad", "out_pad", "dil", "groups"),
    [((2, 2), (1, 1, 1, 1), (1, 1), (1, 1), 1), ((3, 1), (0, 2, 1, 0), (2, 0), (1, 2), 2)],
)
def test_zero_insert_and_conv_are_the_transposed_conv(stride, pad, out_pad, dil, groups):  # type: ignore[no-untyped-def]
    """The builder's lowering in integers: zero_insert (the zero point between the pixels) and
    the stride-1 conv2d equal the transposed convolution's definition (each input pixel scatters
    its products to stride-spaced outputs, then the padding is cropped), input zero point
    included."""
    rng = np.random.default_rng(3)
    cin, og, (kh, kw), (h, w), zp = 4, 3, (3, 2), (4, 5), -7
    wt = rng.integers(-127, 128, (cin, og, kh, kw))
    x = rng.integers(-128, 128, (2, h, w, cin))
    b = IRBuilder("t")
    b.set_input("x", "x", (cin, h, w))
    oh = (h - 1) * stride[0] + dil[0] * (kh - 1) + 1 - pad[0] - pad[1] + out_pad[0]
    ow = (w - 1) * stride[1] + dil[1] * (kw - 1) + 1 - pad[2] - pad[3] + out_pad[1]
    b.conv_transpose("ct", "y", "x", wt.astype(np.float64), None, stride=stride, padding=pad,
                     output_padding=out_pad, dilation=dil, groups=groups,
                     nchw=(og * groups, oh, ow))  # fmt: skip
    b.set_output("y")
    g: Graph = b.freeze()
    rq = Requant(np.array([1]), np.array([0]), zp, -(1 << 40), 1 << 40)
    env = {"x": x}
    for n in g.nodes:
        attrs = {**n.attrs, "acc_bits": 32, "input_zero_point": zp}
        params = {k: v.astype(np.int64) for k, v in n.params.items()}
        node = Node(n.name, n.op, n.inputs, n.output, attrs, params, rq)
        env[n.output] = reference.run_node(node, [env[t] for t in n.inputs])
    full = np.zeros((2, (h - 1) * stride[0] + dil[0] * (kh - 1) + 1 + out_pad[0],
                     (w - 1) * stride[1] + dil[1] * (kw - 1) + 1 + out_pad[1], og * groups),
                    dtype=np.int64)  # fmt: skip
    ig = cin // groups
    for i, j, c, a, bb, o in itertools.product(
        range(h), range(w), range(cin), range(kh), range(kw), range(og)
    ):
        full[:, i * stride[0] + a * dil[0], j * stride[1] + bb * dil[1], (c // ig) * og + o] += (
            x[:, i, j, c] - zp
        ) * wt[c, o, a, bb]
    want = full[:, pad[0] : pad[0] + oh, pad[2] : pad[2] + ow] + zp
    assert [n.op for n in g.nodes] == ["zero_insert", "conv2d"]
    assert np.array_equal(env["ct"], want)
