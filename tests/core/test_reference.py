"""The NumPy integer reference against brute-force loops written from the definitions."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from codegen.core import reference
from codegen.core.formats import requantize, wrap
from codegen.core.ir import Node, Requant, bilinear_taps


def brute_conv(x, w, bias, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
    n, h, wd, _ = x.shape
    o, kh, kw, cg = w.shape
    top, bottom, left, right = padding
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    og = o // groups
    out = np.zeros((n, oh, ow, o), dtype=object)
    for b, i, j, oc in itertools.product(range(n), range(oh), range(ow), range(o)):
        g = oc // og
        s = int(bias[oc])
        for a, bb, ci in itertools.product(range(kh), range(kw), range(cg)):
            y = i * stride[0] - top + a * dilation[0]
            xx = j * stride[1] - left + bb * dilation[1]
            if 0 <= y < h and 0 <= xx < wd:
                s += int(x[b, y, xx, g * cg + ci]) * int(w[oc, a, bb, ci])
        out[b, i, j, oc] = s
    return out.astype(np.int64)


CONV_CASES = {
    "3x3_pad1": dict(cin=3, cout=5, k=(3, 3), stride=(1, 1), pad=(1, 1, 1, 1), dil=(1, 1), g=1),
    "stride2_asym": dict(cin=4, cout=3, k=(3, 2), stride=(2, 2), pad=(0, 1, 1, 0), dil=(1, 1), g=1),
    "dilated": dict(cin=2, cout=2, k=(3, 3), stride=(1, 1), pad=(2, 2, 2, 2), dil=(2, 2), g=1),
    "groups": dict(cin=6, cout=4, k=(3, 3), stride=(1, 2), pad=(1, 1, 1, 1), dil=(1, 1), g=2),
    "depthwise": dict(cin=5, cout=5, k=(3, 3), stride=(1, 1), pad=(1, 1, 1, 1), dil=(1, 1), g=5),
    "pointwise": dict(cin=7, cout=3, k=(1, 1), stride=(1, 1), pad=(0, 0, 0, 0), dil=(1, 1), g=1),
}


@pytest.mark.parametrize("acc_bits", [8, 12, 16, 32])
@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv2d_matches_brute_force(case: str, acc_bits: int) -> None:
    p = CONV_CASES[case]
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.integers(-128, 128, size=(2, 7, 6, p["cin"]))
    w = rng.integers(-127, 128, size=(p["cout"], *p["k"], p["cin"] // p["g"]))
    bias = rng.integers(-3000, 3000, size=p["cout"])
    shift = rng.integers(-2, 9, size=p["cout"])
    node = Node(
        "c",
        "conv2d",
        ("x",),
        "y",
        {
            "stride": p["stride"],
            "padding": p["pad"],
            "dilation": p["dil"],
            "groups": p["g"],
            "acc_bits": acc_bits,
        },
        {"weight": w, "bias": bias},
        Requant(np.ones(p["cout"], dtype=np.int64), shift, 0, -100, 120),
    )
    stats = reference.OverflowStats()
    got = reference.conv2d(x, node, stats)
    exact = brute_conv(x, w, bias, p["stride"], p["pad"], p["dil"], p["g"])
    want = requantize(wrap(exact, acc_bits), 1, shift, 0, -100, 120)
    assert np.array_equal(got, want)
    assert stats.events == int((wrap(exact, acc_bits) != exact).sum())
    assert stats.max_abs == int(np.abs(exact).max())
    if acc_bits == 8:
        assert stats.events > 0  # the narrow case really wraps


def test_dense_wraps_and_counts_overflow_samples() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 128, size=(20, 40))
    w = rng.integers(-127, 128, size=(6, 40))
    bias = rng.integers(-50, 50, size=6)
    node = Node(
        "d",
        "dense",
        ("x",),
        "y",
        {"acc_bits": 14},
        {"weight": w, "bias": bias},
        Requant(np.ones(6, dtype=np.int64), np.full(6, 7), 0, -128, 127),
    )
    stats = reference.OverflowStats()
    got = reference.dense(x, node, stats)
    exact = x @ w.T + bias
    assert np.array_equal(got, requantize(wrap(exact, 14), 1, 7, 0, -128, 127))
    over = wrap(exact, 14) != exact
    assert stats.events == int(over.sum()) and stats.samples == int(over.any(axis=1).sum())


def test_pools_add_concat_reshape() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 128, size=(2, 5, 7, 3))
    one = np.ones(1, dtype=np.int64)
    mp = Node(
        "m",
        "maxpool2d",
        ("x",),
        "y",
        {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1, 1, 1)},
        {},
        Requant(one, 0 * one, 0, 0, 100),
    )
    got = reference.maxpool2d(x, mp)
    for b, i, j, c in itertools.product(range(2), range(3), range(4), range(3)):
        win = x[b, max(0, 2 * i - 1) : 2 * i + 2, max(0, 2 * j - 1) : 2 * j + 2, c]
        assert got[b, i, j, c] == min(100, win.max())
    ap = Node(
        "a",
        "avgpool2d",
        ("x",),
        "y",
        {"kernel": (2, 2), "stride": (1, 1), "padding": (0, 0, 0, 0), "acc_bits": 16},
        {},
        Requant(one * 3, one * 4, 0, 0, 127),
    )
    got = reference.avgpool2d(x, ap)
    s = x[:, :-1, :-1] + x[:, 1:, :-1] + x[:, :-1, 1:] + x[:, 1:, 1:]
    assert np.array_equal(got, requantize(s, 3, 4, 0, 0, 127))
    gp = Node(
        "g",
        "global_avgpool",
        ("x",),
        "y",
        {"acc_bits": 16},
        {},
        Requant(one * 9, one * 8, 0, -128, 127),
    )
    assert np.array_equal(
        reference.global_avgpool(x, gp),
        requantize(x.sum(axis=(1, 2), keepdims=True), 9, 8, 0, -128, 127),
    )
    ad = Node(
        "s",
        "add",
        ("a", "b"),
        "y",
        {"acc_bits": 16},
        {"in_mult": np.array([1, 4])},
        Requant(one, one * 2, 0, -128, 127),
    )
    y = rng.integers(-128, 128, size=x.shape)
    assert np.array_equal(reference.add(x, y, ad), requantize(x + 4 * y, 1, 2, 0, -128, 127))
    cc = Node(
        "c",
        "concat",
        ("a", "b"),
        "y",
        {},
        {},
        Requant(np.array([1, 1]), np.array([0, -1]), 0, -128, 127),
    )
    assert np.array_equal(
        reference.concat(x, y, node=cc), np.concatenate([x, np.clip(2 * y, -128, 127)], axis=-1)
    )
    rs = Node("r", "reshape", ("x",), "y", {"shape": (105,)})
    assert np.array_equal(reference.reshape(x, rs), x.reshape(2, 105))


def test_batching_does_not_change_results() -> None:
    from codegen.core.formats import quantize  # noqa: F401
    from codegen.core.ir import Graph, Tensor

    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, size=(4, 3, 3, 2))
    node = Node(
        "c",
        "conv2d",
        ("x",),
        "y",
        {
            "stride": (1, 1),
            "padding": (1, 1, 1, 1),
            "dilation": (1, 1),
            "groups": 1,
            "acc_bits": 10,
        },
        {"weight": w, "bias": np.zeros(4, dtype=np.int64)},
        Requant(np.ones(4, dtype=np.int64), np.full(4, 3), 0, -128, 127),
    )
    g = Graph("t", (node,), {"x": Tensor("x", (5, 5, 2)), "y": Tensor("y", (5, 5, 4))}, "x", "y")
    x = rng.integers(-128, 128, size=(37, 5, 5, 2))
    a, b = reference.run(g, x, batch=1000), reference.run(g, x, batch=4)
    assert np.array_equal(a.output, b.output)
    assert a.overflow["c"].events == b.overflow["c"].events > 0


def test_lut_is_the_table_at_input_plus_128() -> None:
    table = np.arange(256, dtype=np.int64)[::-1] - 128  # out = -1 - q
    node = Node("act", "lut", ("x",), "y", {"function": "tanh", "args": ()}, {"table": table})
    x = np.array([[[[-128, -1, 0, 127]]]], dtype=np.int64)
    assert np.array_equal(reference.run_node(node, [x]), -1 - x)
    assert reference.KERNELS["lut"] is reference.lut


def test_zero_insert_puts_the_zero_point_between_the_pixels() -> None:
    x = np.random.default_rng(0).integers(-128, 128, (2, 3, 4, 5))
    rq = Requant(np.array([1]), np.array([0]), -9, -128, 127)
    y = reference.zero_insert(x, Node("z", "zero_insert", ("x",), "y", {"stride": (3, 2)}, {}, rq))
    assert y.shape == (2, 7, 7, 5)
    assert np.array_equal(y[:, ::3, ::2], x)
    inserted = np.ones(y.shape, dtype=bool)
    inserted[:, ::3, ::2] = False
    assert np.all(y[inserted] == -9) and inserted.sum() == y.size - x.size


def _tap_matrix(taps: tuple[tuple[tuple[int, int], ...], tuple[float, ...]], size: int) -> Any:
    """(out, size): the weight of every input row in every output row."""
    rows, lam = taps
    m = np.zeros((len(rows), size))
    for i, ((a, b), w1) in enumerate(zip(rows, lam, strict=True)):
        m[i, a] += 1.0 - w1
        m[i, b] += w1
    return m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("size", "out", "corners", "scale"),
    [(4, 8, False, 2.0), (4, 8, True, None), (7, 3, False, None), (5, 11, False, None),
     (5, 11, True, None), (6, 10, False, 1.7), (9, 1, False, None), (1, 4, True, None)],
)  # fmt: skip
def test_bilinear_taps_are_pytorchs(
    size: int, out: int, corners: bool, scale: float | None, dtype: Any
) -> None:
    """The taps read back as a weight matrix equal PyTorch's bilinear resizing of one-hot rows."""
    import torch
    import torch.nn.functional as F

    taps = bilinear_taps(size, out, corners, scale, dtype)
    eye = torch.eye(size, dtype=torch.float32 if dtype is np.float32 else torch.float64)
    kw: dict[str, Any] = {"scale_factor": (1.0, scale)} if scale else {"size": (1, out)}
    want = F.interpolate(eye.reshape(size, 1, 1, size), mode="bilinear", align_corners=corners,
                         **kw)  # fmt: skip
    np.testing.assert_allclose(_tap_matrix(taps, size), want.reshape(size, out).T.numpy(),
                               rtol=0, atol=1e-15 if dtype is np.float64 else 2.0**-22)  # fmt: skip


def test_resize_bilinear_is_the_separable_integer_blend() -> None:
    """The reference's sum is Wr (x - zp) Wc^T with the integer weight matrices (exact), within
    2^-8 per axis of the real blend, and requantizes with THE requantization."""
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, size=(2, 5, 6, 3))
    bits, zp = reference.RESIZE_WEIGHT_BITS, -3
    attrs: dict[str, Any] = {"weight_bits": bits, "acc_bits": 32, "input_zero_point": zp}
    mats, ints = [], []
    for key, size, o in (("row", 5, 9), ("col", 6, 4)):
        taps = bilinear_taps(size, o, False)
        w1 = reference.resize_weights(taps[1], bits)
        attrs.update({f"{key}s": taps[0], f"{key}_lambda": taps[1], f"{key}_weight": tuple(w1)})
        mats.append(_tap_matrix(taps, size))
        ints.append(np.rint(_tap_matrix((taps[0], tuple(w1 / 2.0**bits)), size) * 2**bits))
    wide = Requant(np.array([1]), np.array([0]), 0, -(1 << 40), 1 << 40)
    acc = reference.resize_bilinear(x, Node("r", "resize_bilinear", ("x",), "y", attrs, {}, wide))
    exact = np.einsum("ih,nhwc,jw->nijc", ints[0], x - zp, ints[1]).astype(np.int64)
    assert np.array_equal(acc, exact)
    real = np.einsum("ih,nhwc,jw->nijc", mats[0], x - zp, mats[1])
    assert np.abs(acc / 2.0 ** (2 * bits) - real).max() <= 2 * 2.0 ** -(bits + 1) * 256
    rq = Requant(np.array([3]), np.array([2 * bits + 1]), 4, -100, 90)
    got = reference.resize_bilinear(x, Node("r", "resize_bilinear", ("x",), "y", attrs, {}, rq))
    assert np.array_equal(got, requantize(exact, 3, 2 * bits + 1, 4, -100, 90))
