"""Adaptive quantization (LSQ+ steps and offsets, A2Q+ accumulator constraint, INT4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import codegen
from codegen.core.errors import QaccError
from codegen.core.formats import requantize
from codegen.quant import adaptive
from codegen.quant.accumulator import channel_bounds
from tests.nets import trained_digits_cnn

# ----------------------------------------------------------------------------- quantizer gradients


def test_round_and_trunc_ste_forward_values_and_identity_gradient() -> None:
    v = torch.tensor([-2.5, -1.5, -0.5, 0.49, 0.5, 1.7], requires_grad=True)
    r = adaptive.round_ste(v)
    assert r.tolist() == [-2.0, -1.0, 0.0, 0.0, 1.0, 2.0]  # half up, like formats.requantize
    r.sum().backward()
    assert v.grad is not None and v.grad.tolist() == [1.0] * 6
    t = adaptive.trunc_ste(torch.tensor([-1.9, -0.2, 0.7, 2.99]))
    assert t.tolist() == [-1.0, -0.0, 0.0, 2.0]


def _act(bits: int = 4, step: float = 0.25, zp: int = 0, numel: int = 1) -> adaptive.ActQuant:
    return adaptive.ActQuant(bits, pow2=False, step=step, zero_point=zp, numel=numel)


def test_lsq_plus_step_and_offset_gradients_by_hand() -> None:
    """LSQ+: with v = (x - beta) / s, d/ds = round(v) - v inside and the code limit (n or p)
    outside; d/dbeta = 0 inside, 1 outside. The parameter is log2(s): d/dlog2(s) = s ln2 d/ds."""
    q = _act(bits=4, step=0.25, zp=2)  # codes 0..15, value (code - 2) * 0.25 in [-0.5, 3.25]
    g = q.g  # LSQ gradient scale 1 / sqrt(N * Qp)
    assert g == pytest.approx(1 / math.sqrt(15))
    cases = [  # x, expected value, d/ds (before the scale g), d/dbeta
        (0.30, 0.25, round(1.2) - 1.2, 0.0),  # inside: round(v) - v
        (1.13, 1.25, math.floor(4.52 + 0.5) - 4.52, 0.0),
        (9.00, 3.25, 15, 1.0),  # above: the code limit p = 15, offset gradient 1
        (-3.0, -0.5, 0, 1.0),  # below: the code limit n = 0
    ]
    for x, value, ds, dbeta in cases:
        q.zero_grad()
        y = q(torch.tensor(x))
        assert float(y.detach()) == pytest.approx(value)
        y.backward()
        assert q.s_param.grad is not None and q.beta.grad is not None
        assert float(q.s_param.grad) == pytest.approx(ds * g * 0.25 * math.log(2), abs=1e-6), x
        assert float(q.beta.grad) == pytest.approx(dbeta, abs=1e-6), x


def test_lsq_input_gradient_passes_inside_and_stops_outside() -> None:
    q = _act(bits=4, step=0.5, zp=0)
    x = torch.tensor([0.2, 3.0, 7.4, 9.0, -1.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("qmin,qmax", [(0, 15), (-8, 7)])
def test_fused_fake_quant_matches_the_composed_expression(qmin: int, qmax: int) -> None:
    """The one-node fake quantizer has the values and the gradients (x, step, offset) of the
    composition of round_ste and clamp it replaces."""
    gen = torch.Generator().manual_seed(qmax)
    x = (torch.randn(6, 5, 7, 7, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    s = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(-0.6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 5, 7, 7, dtype=torch.float64, generator=gen)

    def composed(x, s, zp, qmin, qmax):  # type: ignore[no-untyped-def]
        return (torch.clamp(adaptive.round_ste(x / s) + zp, qmin, qmax) - zp) * s

    results = []
    for f in (composed, adaptive.fake_quant):
        for t in (x, s, beta):
            t.grad = None
        zp = torch.clamp(adaptive.round_ste(-beta / s), qmin, qmax)
        y = f(x, s, zp, qmin, qmax)
        (y * weights).sum().backward()
        assert x.grad is not None and s.grad is not None and beta.grad is not None
        results.append((y.detach(), x.grad.clone(), s.grad.clone(), beta.grad.clone()))
    (y0, gx0, gs0, gb0), (y1, gx1, gs1, gb1) = results
    assert torch.equal(y0, y1)
    codes = y1 / s.detach()
    assert torch.allclose(codes, codes.round(), atol=1e-9)  # values on the grid
    assert torch.allclose(gx0, gx1, atol=1e-12) and gx1.abs().sum() > 0
    assert float(gs1) == pytest.approx(float(gs0), abs=1e-9) and float(gs1) != 0
    assert float(gb1) == pytest.approx(float(gb0), abs=1e-9) and float(gb1) != 0


def test_pow2_step_is_rounded_in_the_log_domain() -> None:
    q = adaptive.ActQuant(4, pow2=True, step=0.3, zero_point=0, numel=1)
    assert float(q.step().detach()) == 0.25  # 2^round(log2 0.3) = 2^-2
    fmt = q.export()
    assert fmt.is_pow2 and fmt.frac == 2 and fmt.scale == 0.25


def test_projection_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    sw = torch.tensor([0.05, 0.08, 0.2], dtype=torch.float64)
    bias = torch.tensor([10.0, -30.0, 0.0], dtype=torch.float64)
    xlo, xhi = torch.tensor(0.0, dtype=torch.float64), torch.tensor(15.0, dtype=torch.float64)

    def f(w: torch.Tensor) -> torch.Tensor:
        return adaptive.project(w, sw, bias, xlo, xhi, room=511.0)

    assert torch.autograd.gradcheck(f, (w,))
    xlo2 = torch.tensor(-8.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda w: adaptive.project(w, sw, bias, xlo2, xhi - 8, room=255.0), (w,)
    )


def test_zeros_move_gives_a_zero_weight_its_gradient_and_changes_nothing_else() -> None:
    """relu's gradient at exactly 0 is 0: a zero weight would never move (init="optq" starts
    with many); `zeros_move` gives it the identity's gradient inside the budget, and the same
    projected values and gradients everywhere else."""
    torch.manual_seed(1)
    w0 = torch.randn(4, 20, dtype=torch.float64)
    w0[:, ::3] = 0.0
    sw = torch.tensor([0.05, 0.08, 0.2, 0.1], dtype=torch.float64)
    bias = torch.tensor([10.0, -30.0, 0.0, 5.0], dtype=torch.float64)
    xlo, xhi = torch.tensor(0.0, dtype=torch.float64), torch.tensor(15.0, dtype=torch.float64)
    out, grads = [], []
    for zeros_move in (False, True):
        w = w0.clone().requires_grad_(True)
        p = adaptive.project(w, sw, bias, xlo, xhi, 5000.0, zeros_move)  # no channel binds
        p.sum().backward()
        assert w.grad is not None
        out.append(p.detach())
        grads.append(w.grad)
    zero = w0 == 0
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], w0)
    assert torch.equal(grads[0][~zero], grads[1][~zero])
    assert bool((grads[0][zero] == 0).all()) and bool((grads[1][zero] == 1).all())


def _l1_projection_by_bisection(v: np.ndarray, cap: float) -> np.ndarray:
    """Euclidean projection of v >= 0 onto {sum <= cap}: relu(v - t), t found by bisection on
    the sum (an algorithm independent of the sorting one under test)."""
    if v.sum() <= cap:
        return v
    lo, hi = 0.0, float(v.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > cap else (lo, mid)
    return np.maximum(v - hi, 0)


def test_l1_ball_is_the_euclidean_projection_and_is_sparse() -> None:
    rng = np.random.default_rng(3)
    v = np.abs(rng.normal(0, 1, (5, 400)))
    cap = np.array([1000.0, 50.0, 5.0, 0.5, 0.0])
    got = adaptive._l1_ball(torch.as_tensor(v), torch.as_tensor(cap)).numpy()
    for c in range(5):
        want = _l1_projection_by_bisection(v[c], cap[c])
        assert np.allclose(got[c], want, atol=1e-9)
        assert got[c].sum() <= cap[c] + 1e-9
    assert (got[2] > 0).sum() < 40  # a small budget keeps few weights, not many tiny ones


@pytest.mark.parametrize("xlo,xhi", [(0, 15), (0, 255), (-3, 12), (-128, 127)])
def test_projection_then_truncation_fits_the_exact_bound(xlo: int, xhi: int) -> None:
    rng = np.random.default_rng(xhi)
    for acc_bits in (10, 12, 16):
        room = (1 << (acc_bits - 1)) - 2
        w = torch.as_tensor(rng.normal(0, 1, (16, 72)))
        sw = torch.as_tensor(rng.uniform(0.05, 0.3, 16))
        bias = torch.as_tensor(rng.uniform(-room / 2, room / 2, 16))
        p = adaptive.project(w, sw, bias, torch.tensor(float(xlo)), torch.tensor(float(xhi)), room)
        q = torch.clamp(torch.trunc(p / sw[:, None]), -7, 7).numpy().astype(np.int64)
        b = np.floor(bias.numpy() + 0.5).astype(np.int64)
        lo, hi = channel_bounds(q, b, xlo, xhi)
        lim = 1 << (acc_bits - 1)
        assert hi.max() <= lim - 1 and lo.min() >= -lim


@pytest.mark.parametrize("acc_bits", [12, 16])
def test_weights_round_to_nearest_unless_the_bound_binds(acc_bits: int) -> None:
    """rounding="a2q" (A2Q's rule): channels whose nearest-rounded integers fit the exact bound
    keep them; the others are rounded toward zero and fit too."""
    from codegen.core.ir import Node

    rng = np.random.default_rng(acc_bits)
    w = rng.normal(0, 1, (12, 128)).astype(np.float32)
    w[:6, 8:] = 0.0  # 8 terms of up to 7 x 15: inside the bound at either width
    node = Node("fc", "dense", ("x",), "y", {}, {"weight": w, "bias": np.zeros(12, np.float32)})
    a2q = adaptive.Recipe(rounding="a2q", integer_budget=False)
    wq = adaptive.WeightQuant(node, bits=4, acc_bits=acc_bits, pow2=False, r=a2q)
    act = _act(bits=4, step=0.1, zp=0)  # unsigned codes 0..15
    with torch.no_grad():
        lay = wq.forward(act)
        u = adaptive.project(wq.w, lay.w_step, lay.bias, torch.tensor(0.0), torch.tensor(15.0),
                             wq.limit - 1.0) / lay.w_step[:, None]  # fmt: skip
    q = lay.q.numpy().astype(np.int64)
    nearest = np.clip(np.floor(u.numpy() + 0.5), -7, 7)
    toward_zero = np.clip(np.trunc(u.numpy()), -7, 7)
    lo, hi = channel_bounds(q, lay.bias.numpy().astype(np.int64), 0, 15)
    assert hi.max() <= 2 ** (acc_bits - 1) - 1 and lo.min() >= -(2 ** (acc_bits - 1))
    near_rows = [c for c in range(12) if np.array_equal(q[c], nearest[c])]
    zero_rows = [c for c in range(12) if np.array_equal(q[c], toward_zero[c])]
    assert set(range(6)) <= set(near_rows)  # unconstrained channels: nearest
    assert set(near_rows) | set(zero_rows) == set(range(12))
    if acc_bits == 12:  # 128 terms of up to 7 x 15 do not fit 12 bits: some channels bind
        assert set(zero_rows) - set(near_rows)


@pytest.mark.parametrize("xlo,xhi", [(0, 15), (0, 255), (-3, 12), (-8, 7)])
def test_fit_rounding_moves_the_fewest_cheapest_weights_toward_zero(xlo: int, xhi: int) -> None:
    """rounding="fit": every channel fits the exact bound; only weights that rounded away from
    zero move, by one step; with unsigned inputs each sign moves no more weights than its side
    of the bound needs, the ones closest to a half first; far fewer than A2Q's whole channels."""
    rng = np.random.default_rng(xhi - xlo)
    moved = whole_channels = 0
    for acc_bits in (10, 12, 16):
        room = (1 << (acc_bits - 1)) - 2
        lim = room + 1
        w = torch.as_tensor(rng.normal(0, 1, (16, 100)))
        sw = torch.as_tensor(rng.uniform(0.02, 0.3, 16))
        bias = torch.as_tensor(np.floor(rng.uniform(-room / 2, room / 2, 16) + 0.5))
        p = adaptive.project(w, sw, bias, torch.tensor(float(xlo)), torch.tensor(float(xhi)), room)
        u = p / sw[:, None]
        tz, nr = torch.clamp(torch.trunc(u), -7, 7), torch.clamp(torch.floor(u + 0.5), -7, 7)
        flip = adaptive._fewest_toward_zero(u, nr, tz, bias, float(xlo), float(xhi), float(lim))
        q = torch.where(flip, tz, nr).numpy().astype(np.int64)
        b = bias.numpy().astype(np.int64)
        lo, hi = channel_bounds(q, b, xlo, xhi)
        assert hi.max() <= lim and lo.min() >= -lim - 1
        assert not (flip & (nr == tz)).any()  # only weights that rounded away from zero
        lo0, hi0 = channel_bounds(nr.numpy().astype(np.int64), b, xlo, xhi)
        over = (hi0 > lim) | (lo0 < -lim - 1)
        assert not flip[torch.as_tensor(~over)].any()  # channels that fit keep nearest
        moved += int(flip.sum())
        whole_channels += int((nr != tz)[torch.as_tensor(over)].sum())
        if xlo == 0:
            frac = (u.abs() - tz.abs()).numpy()
            for c in np.flatnonzero(over):
                for sign in (1, -1):
                    f = flip[c].numpy() & (np.sign(nr[c].numpy()) == sign)
                    if not f.any():
                        continue
                    back = q[c].copy()
                    j = np.flatnonzero(f)[frac[c][f].argmax()]  # the costliest move undone
                    back[j] = nr[c, j]
                    lo1, hi1 = channel_bounds(back[None], b[c : c + 1], xlo, xhi)
                    assert hi1[0] > lim or lo1[0] < -lim - 1  # one fewer does not fit
                    rest = (nr[c].numpy() != tz[c].numpy()) & ~flip[c].numpy()
                    rest &= np.sign(nr[c].numpy()) == sign
                    assert frac[c][rest].min(initial=1.0) >= frac[c][f].max()  # cheapest first
    assert 0 < moved < whole_channels / 3


def test_pruned_grad_lets_weights_below_the_threshold_learn() -> None:
    """pruned_grad: the projection's forward values are unchanged, and a weight it sets to 0
    gets the loss' gradient (straight through) instead of none."""
    v = torch.tensor([[3.0, 2.0, 0.5, 0.2]], requires_grad=True)
    cap = torch.tensor([3.0])
    plain = adaptive._l1_ball(v, cap)
    (plain * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert v.grad is not None
    assert v.grad[0, 2:].tolist() == [0.0, 0.0]
    g_plain, v.grad = v.grad.clone(), None
    ste = adaptive._l1_ball(v, cap, pruned_grad=True)
    assert torch.equal(ste, plain)
    (ste * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert v.grad is not None
    assert v.grad[0, 2:].tolist() == [3.0, 4.0]
    assert torch.equal(v.grad[0, :2], g_plain[0, :2])  # kept weights: the same gradient


def test_integer_budget_projection_spends_the_budget_on_the_rounded_integers() -> None:
    """integer_budget: the L1 radius is the one at which the projected weights, rounded to
    nearest, use the integer budget: never above it, at most one unit below it here (with
    the float radius a channel of many small weights can round to nothing at all), and a channel
    inside its budget is kept as it is."""
    rng = np.random.default_rng(3)
    v = torch.as_tensor(rng.uniform(0, 0.1, (5, 3136)))
    sw = torch.as_tensor([0.02, 0.03, 0.05, 0.01, 1.0])
    budget = torch.as_tensor([136.0, 136.0, 60.0, 300.0, 1e6])
    cap = budget * sw
    used = {}
    for integer in (False, True):
        c = cap * adaptive._rounded_cap(v, cap, sw, 7) if integer else cap
        p = adaptive._l1_ball(v, c)
        q = torch.clamp(torch.floor(p / sw[:, None] + 0.5), 0, 7)
        used[integer] = q.sum(1)
        if integer:
            assert torch.equal(p[4], v[4])  # inside the budget: untouched
    assert (used[True][:4] <= budget[:4]).all() and (used[True][:4] >= budget[:4] - 1).all()
    assert used[False][2] == 0  # the float radius: every kept weight below half a step
    inside = used[False][:4] <= budget[:4]  # where the float radius's integers fit at all
    assert (used[True][:4][inside] > used[False][:4][inside]).all()


def test_dyadic_multipliers() -> None:
    m = np.array([1e-4, 0.0123, 0.5, 0.99, 3.7])
    mult, shift = adaptive.dyadic(m)
    assert np.all((mult >= 1 << 14) & (mult <= 1 << 15))
    assert np.allclose(mult * np.exp2(-shift.astype(float)), m, rtol=2.0**-14)
    # THE requantization with these parameters is rounding of acc * m, up to the multiplier error
    acc = np.arange(-5000, 5000, 37)
    for mi, si, mm in zip(mult, shift, m, strict=True):
        got = requantize(acc, mi, si, 0, -(1 << 20), 1 << 20)
        assert np.all(np.abs(got - np.floor(acc * mm + 0.5)) <= 1)


def test_weight_step_init_minimises_error() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (4, 50)).astype(np.float32)
    s = adaptive.init_weight_steps(w, 7, pow2=False)
    for c in range(4):
        err = ((np.clip(np.trunc(w[c] / s[c]), -7, 7) * s[c] - w[c]) ** 2).sum()
        for other in (s[c] * 0.8, s[c] * 1.25, np.abs(w[c]).max() / 7):
            worse = ((np.clip(np.trunc(w[c] / other), -7, 7) * other - w[c]) ** 2).sum()
            assert err <= worse + 1e-9


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits_net() -> tuple[nn.Module, tuple[np.ndarray, ...]]:
    net, data = trained_digits_cnn()
    return net, data


def _adaptive(net: nn.Module, data: tuple[np.ndarray, ...], **kw: object) -> codegen.QuantizedModel:
    x_train, y_train = data[0], data[1]
    opts: dict[str, object] = {"acc_bits": 12, "epochs": 2, "progress": False}
    opts.update(kw)
    return codegen.quantize(net, x_train[:300], method="adaptive", train=(x_train, y_train), **opts)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["dyadic", "pow2"])
def test_short_training_run_end_to_end(digits_net, scale: str) -> None:  # type: ignore[no-untyped-def]
    from codegen.quant import training

    net, (x_train, y_train, x_test, y_test) = digits_net
    float_acc = training.accuracy(net, x_test, y_test)
    qm = _adaptive(net, (x_train, y_train), scale=scale, acc_bits=12)
    g = qm.graph
    weighted = [n for n in g.nodes if n.op in ("conv2d", "dense")]
    # INT4 weights everywhere, 4-bit input and hidden activations, 8-bit logits
    for n in weighted:
        assert n.attrs["weight_bits"] == 4 and np.abs(n.params["weight"]).max() <= 7
    assert g.tensors[g.nodes[0].output].fmt.bits == 4  # type: ignore[union-attr]
    assert g.tensors[g.input].fmt.bits == 4  # type: ignore[union-attr]
    assert g.tensors[g.output].fmt.bits == 8  # type: ignore[union-attr]
    # the accumulator constraint holds after training: every channel's exact bound fits
    for n in weighted:
        fi = g.tensors[n.inputs[0]].fmt
        assert fi is not None
        lo, hi = channel_bounds(
            n.params["weight"], n.params["bias"], fi.qmin - fi.zero_point, fi.qmax - fi.zero_point
        )
        assert hi.max() <= 2**11 - 1 and lo.min() >= -(2**11), n.name
        row = qm.report["adaptive"]["constraint"][n.name]
        assert row["fits"] and row["l1_max"] <= row["a2q_plus_l1_cap"]
    assert qm.report["adaptive"]["bound_fixups"] == 0
    res = qm.run_reference(x_test)
    assert all(v.events == 0 for v in res.overflow.values())
    # dyadic scales: real multipliers; pow2: shift-only requantization
    mults = np.concatenate([np.ravel(n.requant.mult) for n in weighted])  # type: ignore[union-attr]
    assert (scale == "pow2") == bool(np.all(mults == 1))
    # the integer model is accurate and agrees with the fake-quant network
    acc = float(np.mean(res.output.argmax(1) == y_test))
    assert acc >= float_acc - (0.05 if scale == "dyadic" else 0.1), (acc, float_acc)
    # training and simulation go through the realised multipliers: the same predictions
    assert qm.report["adaptive"]["fake_vs_integer_agreement_calib"] >= 0.999
    sim = qm.simulate(x_test)
    assert np.mean(sim.argmax(1) == res.output.argmax(1)) >= 0.999
    codes = np.rint(sim / g.tensors[g.output].fmt.scale) + g.tensors[g.output].fmt.zero_point  # type: ignore[union-attr]
    assert np.mean(codes == res.output) >= 0.999  # the logits themselves, code for code
    assert len(qm.report["adaptive"]["history"]) == 2


@pytest.mark.slow
def test_adaptive_model_is_bit_exact_in_c_on_the_host(digits_net, tmp_path) -> None:  # type: ignore[no-untyped-def]
    net, (x_train, y_train, x_test, _) = digits_net
    qm = _adaptive(net, (x_train, y_train), epochs=1, a_bits={"default": 4, "c2": 3})
    c = codegen.compile(qm, target="host", out_dir=tmp_path / "m", sanitize=True)
    assert np.array_equal(c.run_int(x_test[:200]), qm.reference_int(x_test[:200]))
    assert qm.graph.tensors[qm.graph.node("c2").output].fmt.bits == 3  # type: ignore[union-attr]
    # the header gives the dyadic input scale exactly (FRAC would only be its nearest 2^-n)
    header = (tmp_path / "m" / "digitscnn.h").read_text()
    fmt = qm.graph.tensors[qm.graph.input].fmt
    assert fmt is not None and not fmt.is_pow2
    assert f"_INPUT_SCALE {fmt.scale!r} " in header


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.parametrize("target", ["cortex-a53", "cortex-m55"])
@pytest.mark.parametrize("kind", ["tiny", "separable"])
def test_adaptive_model_is_bit_exact_under_qemu(
    digits_net, tmp_path, target: str, kind: str
) -> None:  # type: ignore[no-untyped-def]
    """The demo's two architectures (plain convs + dense; depthwise-separable + global pool),
    W4A4 with packed weights at a 12-bit accumulator, on the NEON and the MVE kernels."""
    from codegen.data.models import FashionDSCNN

    net, (x_train, y_train, x_test, _) = digits_net
    if kind == "separable":
        torch.manual_seed(0)
        net = FashionDSCNN(width=8).eval()
    qm = _adaptive(net, (x_train, y_train), epochs=1)
    assert any(n.op == "conv2d" and n.attrs["groups"] > 1 for n in qm.graph.nodes) == (
        kind == "separable"
    )
    c = codegen.compile(qm, target=target, out_dir=tmp_path / target)
    weights_c = next((tmp_path / target).glob("*_weights.c")).read_text()
    assert "packed" in weights_c  # 4-bit weights are stored two per byte
    assert np.array_equal(c.run_int(x_test[:64]), qm.reference_int(x_test[:64]))


def test_bad_options_are_one_line_errors(digits_net) -> None:  # type: ignore[no-untyped-def]
    net, (x_train, y_train, *_) = digits_net
    with pytest.raises(QaccError, match="needs train="):
        codegen.quantize(net, x_train[:50], method="adaptive")
    with pytest.raises(QaccError, match=r"2\.\.8"):
        _adaptive(net, (x_train[:50], y_train[:50]), w_bits=1, epochs=0)
    with pytest.raises(QaccError, match="unknown scale"):
        _adaptive(net, (x_train[:50], y_train[:50]), scale="log", epochs=0)
    with pytest.raises(QaccError, match="unknown layers"):
        _adaptive(net, (x_train[:50], y_train[:50]), a_bits={"nope": 4}, epochs=0)
    with pytest.raises(QaccError, match="guaranteed"):
        _adaptive(net, (x_train[:50], y_train[:50]), overflow="profiled", epochs=0)
    with pytest.raises(QaccError, match="unknown adaptive init 'zero'"):
        _adaptive(net, (x_train[:50], y_train[:50]), init="zero", epochs=0)


def test_projected_init_starts_inside_the_budget_where_the_float_one_projects(digits_net) -> None:  # type: ignore[no-untyped-def]
    """A2Q+'s init stores the projected weights, which the forward pass projects again: the
    projection is idempotent, so before training both inits quantize to the same integers; the
    latent weights of the projected init already lie inside the budget, the float ones not."""
    net, (x_train, *_) = digits_net
    g = codegen.api.float_graph(net, x_train[:300], None)
    bits = adaptive.resolve_bits(g, 4, 4)
    acc = {n.name: 12 for n in g.nodes}
    nets = {
        i: adaptive.QATNet(g, x_train[:300], *bits, acc, pow2=False, init=i) for i in adaptive.INITS
    }
    outside = dict.fromkeys(adaptive.INITS, 0.0)
    for n in g.nodes:
        if n.op not in ("conv2d", "dense"):
            continue
        q = {}
        for init, qnet in nets.items():
            wq, act = qnet.layer(n.name), qnet.act(n.inputs[0])
            with torch.no_grad():
                moved = float((wq._projected(act)[0] - wq.w).abs().max())
                q[init] = wq.forward(act)
            outside[init] = max(outside[init], moved)
        assert torch.equal(q["float"].q, q["projected"].q), n.name
        assert torch.equal(q["float"].bias, q["projected"].bias), n.name
        # OPTQ's latent weights are its integers times the steps: the forward pass keeps them
        shape = (-1,) + (1,) * (q["optq"].q.ndim - 1)
        latent = nets["optq"].layer(n.name).w
        assert torch.allclose(q["optq"].q * q["optq"].w_step.reshape(shape), latent, rtol=1e-6)
        assert not torch.equal(q["optq"].q, q["projected"].q), n.name
    assert max(outside["projected"], outside["optq"]) < 1e-5 < outside["float"]


def test_optq_init_is_inside_the_budget_and_bit_exact_in_c(digits_net, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """init="optq" exports OPTQ's integer network untrained (epochs=0): every channel's exact
    bound fits, the fake-quant network predicts as the integer one, and the C matches it."""
    net, (x_train, y_train, x_test, _) = digits_net
    qm = _adaptive(net, (x_train[:50], y_train[:50]), init="optq", epochs=0)
    rep = qm.report["adaptive"]
    assert rep["init"] == "optq" and rep["bound_fixups"] == 0
    assert all(row["fits"] for row in rep["constraint"].values())
    assert rep["fake_vs_integer_agreement_calib"] >= 0.99
    c = codegen.compile(qm, target="host", out_dir=tmp_path / "m", sanitize=True)
    assert np.array_equal(c.run_int(x_test[:100]), qm.reference_int(x_test[:100]))


def test_on_epoch_figures_join_the_history(digits_net) -> None:  # type: ignore[no-untyped-def]
    net, (x_train, y_train, x_test, y_test) = digits_net
    preds: list[np.ndarray] = []

    def after_epoch(q: nn.Module) -> dict[str, float]:
        assert not q.training
        with torch.no_grad():
            preds.append(q(torch.as_tensor(x_test)).argmax(1).numpy())
        return {"test_accuracy": float(np.mean(preds[-1] == y_test))}

    qm = _adaptive(net, (x_train[:128], y_train[:128]), epochs=2, on_epoch=after_epoch)
    hist = qm.report["adaptive"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert [h["test_accuracy"] for h in hist] == [float(np.mean(p == y_test)) for p in preds]
    # after the last epoch the callback saw the network that was exported
    assert np.mean(qm.reference_int(x_test).argmax(1) == preds[-1]) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["dyadic", "pow2"])
def test_every_op_through_adaptive_is_bit_exact_in_c(tmp_path, scale: str) -> None:  # type: ignore[no-untyped-def]
    """Residual add, concat, depthwise, avg/max/global pooling: trained, exported, compiled."""
    from tests.nets import Branchy

    torch.manual_seed(0)
    net = Branchy().eval()
    rng = np.random.default_rng(0)
    x = rng.random((96, 3, 12, 12), dtype=np.float32)
    y = rng.integers(0, 5, 96)
    qm = codegen.quantize(
        net, x[:32], method="adaptive", train=(x, y), epochs=1, acc_bits=14, scale=scale,
        progress=False,
    )  # fmt: skip
    ops = {n.op for n in qm.graph.nodes}
    assert {"add", "concat", "avgpool2d", "global_avgpool", "maxpool2d"} <= ops
    ref = qm.reference_int(x)
    assert np.mean(qm.simulate(x).argmax(1) == ref.argmax(1)) >= 0.95
    c = codegen.compile(qm, target="host", out_dir=tmp_path / "m", sanitize=True)
    assert np.array_equal(c.run_int(x), ref)


@pytest.mark.slow
def test_sweep_ptq_against_adaptive_writes_table_plot_and_json(digits_net, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from codegen.tools import sweep

    net, (x_train, y_train, x_test, y_test) = digits_net
    res = sweep.run(
        net,
        x_train[:300],
        y_train[:300],
        (x_train, y_train),
        (x_test, y_test),
        widths=(16, 12),
        epochs=1,
        progress=False,
        log=lambda *_: None,
    )
    series = {(r["method"], r["policy"]) for r in res["rows"]}
    assert series == {("ptq", "guaranteed"), ("ptq", "profiled"), ("adaptive", "guaranteed")}
    assert sorted({r["acc_bits"] for r in res["rows"]}) == [12, 16]
    for r in res["rows"]:
        if r["method"] == "adaptive":
            assert r["overflow_events"] == 0 and r["fake_quant_agreement"] >= 0.99
            assert 0.5 < r["accuracy"] <= 1.0
            # per epoch: the fake-quant network's test accuracy; after the last epoch it is the
            # exported network, whose predictions the integer ones match but for 1 %
            assert [e["epoch"] for e in r["per_epoch"]] == [1]
            assert abs(r["per_epoch"][-1]["fake_quant_test_accuracy"] - r["accuracy"]) <= 0.01
    paths = sweep.write(res, tmp_path)
    assert [p.name for p in paths] == ["sweep.json", "sweep.md", "sweep.png"]
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(res))
    md = paths[1].read_text()
    assert "| adaptive | guaranteed | 12 |" in md
    assert "| 12 | epoch 1 | fake-quant |" in md and "| 12 | epoch 1 | integer | |" in md
    assert paths[2].read_bytes().startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- the recipe


def test_warmup_cosine_rises_linearly_then_follows_the_cosine() -> None:
    from codegen.quant.training import warmup_cosine

    steps = 200
    f = [warmup_cosine(steps, 0.1)(s) for s in range(steps)]
    assert np.allclose(f[:20], np.arange(1, 21) / 20)  # linear up to the full rate
    tail = np.array(f[20:])
    assert tail[0] == 1.0 and np.all(np.diff(tail) < 0) and tail[-1] < 1e-3
    # after the warm-up, CosineAnnealingLR's closed form over the remaining steps
    assert np.allclose(tail, 0.5 * (1 + np.cos(np.pi * np.arange(180) / 180)))


def test_groups_at_one_rate_train_exactly_as_plain_adam() -> None:
    """The recipe's parameter groups (all at `lr`, no decay) and a kd_weight of 0.5 are the
    old loop step for step: the defaults leave the training unchanged."""
    from codegen.quant.training import fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    y = rng.integers(0, 3, 256)
    teacher = nn.Linear(6, 3)
    states = []
    for groups in (False, True):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        g = None
        if groups:
            ps = list(m.parameters())
            g = [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 1e-2, "weight_decay": 0}]
        fit(m, x, y, epochs=2, batch=32, lr=1e-2, schedule="cosine", progress=False,
            teacher=lambda xb: teacher(xb).detach(), groups=g, kd_weight=0.5)  # fmt: skip
        states.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*states, strict=True))


def test_ema_ends_with_the_moving_average_of_the_steps() -> None:
    """With `ema`, training is step for step the plain one, and the model ends with the
    exponential moving average of the parameters after every step (the start included);
    `on_epoch` sees the average, and the next epoch goes on from the live weights."""
    from codegen.quant.training import fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype(np.float32)
    y = rng.integers(0, 3, 128)
    decay = 0.8

    def flat(m: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    def run(ema: float) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
        """The model, its parameters before every step (and the start), and at every epoch's end
        as on_epoch sees them."""
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        trail, seen = [flat(m)], []

        def snap(done: float) -> None:  # before every step but the first: the last step's
            if done > 0:
                trail.append(flat(m))

        def epoch_end() -> dict[str, float]:
            seen.append(flat(m))
            return {}

        fit(m, x, y, epochs=2, batch=32, lr=1e-2, schedule="cosine", progress=False,
            on_step=snap, ema=ema, on_epoch=epoch_end)  # fmt: skip
        return m, trail, seen

    plain, trail, _ = run(0.0)
    trail.append(flat(plain))
    averaged, trail_ema, seen = run(decay)
    assert all(torch.equal(a, b) for a, b in zip(trail, trail_ema, strict=False))  # same path
    want = trail[0].clone()
    for k, p in enumerate(trail[1:], start=1):
        want = want + (p - want) * (1 - decay)
        if k == 4:  # the end of the first epoch (4 batches)
            assert torch.allclose(seen[0], want, atol=1e-6)
    got = flat(averaged)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(seen[1], want, atol=1e-6)
    assert not torch.allclose(got, trail[-1], atol=1e-3)  # the average is not the last step


def test_recipe_groups_and_budget_ramp(digits_net) -> None:  # type: ignore[no-untyped-def]
    """Every parameter is in exactly one group at its rate; the budget ramp starts
    2^budget_bits wider and is exact from `budget_ramp` of the steps on."""
    net, (x_train, *_) = digits_net
    g = codegen.api.float_graph(net, x_train[:100], None)
    acc = {n.name: 12 for n in g.nodes}
    qnet = adaptive.QATNet(g, x_train[:100], *adaptive.resolve_bits(g, 4, 4), acc, pow2=False)
    opts = {"scale_lr": 3.0, "head_lr": 2.0, "weight_decay": 1e-4}
    r = adaptive.recipe({**opts, "budget_bits": 2, "budget_ramp": 0.5})
    groups = adaptive.param_groups(qnet, 1e-3, r)
    ids = [id(p) for gr in groups for p in gr["params"]]
    assert sorted(ids) == sorted(id(p) for p in qnet.parameters())
    rate = {id(p): (gr["lr"], gr["weight_decay"]) for gr in groups for p in gr["params"]}
    head = [n.name for n in g.nodes if n.op in ("conv2d", "dense")][-1]
    for name, wq in qnet.layers.items():
        assert rate[id(wq.w)] == (2e-3 if name == head else 1e-3, 1e-4)
        assert rate[id(wq.b)] == (1e-3, 0.0) and rate[id(wq.s_param)] == (3e-3, 0.0)
    ramp = adaptive.budget_schedule(qnet, r)
    assert ramp is not None
    layers = list(qnet.layers.values())
    for done, factor in ((0.0, 4.0), (0.25, 2.0), (0.5, 1.0), (0.9, 1.0)):
        ramp(done)
        assert all(q.limit == q.exact_limit * factor for q in layers), done
    assert adaptive.budget_schedule(qnet, adaptive.recipe({})) is None


def test_recipe_options_are_checked(digits_net) -> None:  # type: ignore[no-untyped-def]
    net, (x_train, *_) = digits_net
    with pytest.raises(QaccError, match="unknown adaptive options"):
        adaptive.recipe({"batch_size": 64})
    for bad in ({"batch": 0}, {"batch": 64.0}, {"warmup": 1.0}, {"kd_weight": 2.0},
                {"head_lr": 0.0}, {"weight_decay": -1.0}, {"budget_ramp": 2.0},
                {"ema": 1.0}, {"ema": -0.1}):  # fmt: skip
        with pytest.raises(QaccError, match="adaptive option"):
            adaptive.recipe(bad)
    with pytest.raises(QaccError, match="take numbers"):
        adaptive.recipe({"batch": "64"})
    with pytest.raises(QaccError, match="not 'ptq'"):
        codegen.quantize(net, x_train[:50], method="ptq", adaptive={"batch": 64})
