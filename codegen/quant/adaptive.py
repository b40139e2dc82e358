"""Adaptive quantization: learned step sizes and offsets with accumulator-aware training.

Quantization-aware training of the float IR (BN already folded) with fake quantization:

* every activation tensor class (tensors that share a format, `ptq.tensor_classes`) has an LSQ+
  quantizer (Bhalgat et al. 2020): code q = clamp(round(x / s) + zp, qmin, qmax), value
  (q - zp) * s, with a learnable step s and offset beta realised as the integer zero point
  zp = round(-beta / s) (so that real 0 is exact and zero padding stays exact). Gradients are the
  straight-through ones of LSQ+: for s, round(v) - v inside the range and the clip limit outside;
  for beta, 0 inside and 1 outside; the step gradient is scaled by 1 / sqrt(N * Qp) (LSQ).
* every weighted layer has learnable per-output-channel weight steps and symmetric codes
  [-(2^(b-1) - 1), 2^(b-1) - 1], rounded to nearest; in a channel whose nearest-rounded
  integers would break the accumulator bound, the fewest, cheapest weights round toward zero
  instead (`Recipe.rounding="fit"`; "a2q" rounds that whole channel toward zero, as A2Q).
  Rounding toward zero can never raise a channel's sum above the bound its projected float
  weights satisfy, so a fitting choice always exists.
* the accumulator constraint (A2Q / A2Q+, Colbert et al.): before quantization each channel's
  positive and negative weight mass (in integer units) is brought inside the exact weight-aware
  bound, bias included, for every input the format allows. With inputs at their zero point's
  end of the range (unsigned activations after ReLU) the two signs are projected separately
  onto L1 balls, which is A2Q+'s doubling of the L1 budget of zero-centred weights, with the
  radius at which the rounded integers use the budget (`Recipe.integer_budget`); otherwise one
  common factor caps the bound. The bias (in accumulator units) is kept within half the range.
* scales are `pow2` (steps learned in the log2 domain and rounded: shift-only requantization) or
  `dyadic` (any step; the requantization multiplier is a 15-bit integer and a shift).

The other ops train through their float functions between fake quantizers (a `lut` through its
real function, `mul`, `softmax`, the pools and `gather` as torch computes them; a softmax output
keeps a power-of-two step, as its integer division needs), and export builds them exactly as PTQ
does for the learned formats (`ptq.format_node`: the tables, the product's requantization, the
per-pixel divisors); tensors PTQ ties to one format (`ptq.tensor_classes`) share one quantizer.

The trained network is exported as an ordinary integer graph (codegen/core/ir.py): weights and
biases are the integers the training forward pass used, activations carry their zero points
(`input_zero_point` / `Requant.zero_point`), and the exact channel bounds are verified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codegen.core import simulate
from codegen.core.errors import QaccError
from codegen.core.formats import int_range, round_half_up
from codegen.core.ir import WEIGHTED_OPS, Graph, Node, QFormat, Requant, Tensor
from codegen.quant import distributed as ddp
from codegen.quant.accumulator import channel_bounds
from codegen.quant.ptq import (
    SHARED_FORMAT_OPS,
    clamp_limits,
    dyadic,
    format_node,
    is_nonneg,
    tensor_classes,
)
from codegen.quant.rounding import columns, layer_stats, optq_factor
from codegen.quant.training import BATCH, KD_WEIGHT, TEMPERATURE, Outputs, TrainData, fit

SCALES = ("dyadic", "pow2")
INITS = ("float", "projected", "optq")
"""Where training starts: the float weights, their projection onto the accumulator budget, or
the accumulator-aware OPTQ rounding of them (`WeightQuant.start_optq`)."""
DEFAULT_INIT = "projected"
ROUNDINGS = ("a2q", "fit")
DEFAULT_LR = 2e-3
DEFAULT_DISTILL = True
DEFAULT_WARMUP = 0.05
"""The defaults of `quantize_adaptive` (and `codegen.quantize`), chosen from a sweep over three
networks at 12-bit accumulators: docs/adaptive.md."""


@dataclass(frozen=True)
class Recipe:
    """The training recipe's further options (`quantize(..., adaptive=...)` takes them by name);
    the defaults and the sweep behind them: docs/adaptive.md."""

    batch: int = BATCH
    """Images per training step."""
    scale_lr: float = 1.0
    """Learning rate of the quantizers' steps and offsets, relative to `lr`."""
    head_lr: float = 1.0
    """Learning rate of the last weighted layer's weights (the classifier), relative to `lr`."""
    warmup: float = DEFAULT_WARMUP
    """Share of the training steps over which the rates rise linearly from 0 (then cosine)."""
    kd_weight: float = KD_WEIGHT
    """With distillation, the distillation term's share of the loss (the rest: cross entropy)."""
    temperature: float = TEMPERATURE
    """Distillation temperature."""
    weight_decay: float = 0.0
    """L2 weight decay (Adam's) on the latent weights (not on biases, steps or offsets)."""
    budget_bits: float = 0.0
    """Extra accumulator bits the projection allows at the start of training, ..."""
    budget_ramp: float = 0.0
    """... taken off linearly over this share of the training steps (the limit shrinks
    geometrically), then the exact budget."""
    zeros_move: bool | None = None
    """Whether a latent weight at exactly 0 keeps its gradient (`project`); None: with init
    "optq" only."""
    pruned_grad: bool = False
    """Whether weights the projection sets to 0 (below its threshold) keep their gradient
    (straight through), so that they can grow back into the budget (`_l1_ball`)."""
    integer_budget: bool = True
    """Whether the projection's L1 radius is the one at which the rounded integer weights use
    the accumulator budget (`_rounded_cap`) rather than the float weights."""
    rounding: str = "fit"
    """How the projected weights become integers where rounding to nearest breaks the bound:
    "a2q" rounds that whole channel toward zero (A2Q), "fit" rounds only the fewest, cheapest
    weights toward zero (`_fewest_toward_zero`)."""
    ema: float = 0.0
    """Decay per step of an exponential moving average of every trained parameter (weights,
    biases, steps, offsets); the network exported is the average. 0: the last step's."""


FLAGS = ("pruned_grad", "integer_budget")
"""The Recipe's True/False options."""


def recipe(options: Mapping[str, Any] | None) -> Recipe:
    """The Recipe with `options` (names of Recipe's fields) set; a one-line error otherwise."""
    options = dict(options or {})
    known = Recipe.__dataclass_fields__
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise QaccError(f"unknown adaptive options {unknown}; known: {sorted(known)}")
    r = Recipe(**options)
    numbers = [v for k, v in asdict(r).items() if k not in (*FLAGS, "zeros_move", "rounding")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise QaccError(
            f"adaptive options take numbers ({', '.join(FLAGS)}, zeros_move: True/False; "
            f"rounding: a name), got {options}"
        )
    if not isinstance(r.batch, int) or r.batch < 1:
        raise QaccError(f"adaptive option batch must be an integer >= 1, got {r.batch}")
    if r.warmup < 0 or r.warmup >= 1 or not 0 <= r.kd_weight <= 1:
        raise QaccError("adaptive options: 0 <= warmup < 1, 0 <= kd_weight <= 1")
    if min(r.scale_lr, r.head_lr, r.temperature) <= 0 or r.weight_decay < 0:
        raise QaccError("adaptive options: scale_lr, head_lr, temperature > 0, weight_decay >= 0")
    for flag in FLAGS:
        if not isinstance(getattr(r, flag), bool):
            raise QaccError(f"adaptive option {flag} takes True/False, got {getattr(r, flag)}")
    if r.rounding not in ROUNDINGS:
        raise QaccError(
            f"adaptive option rounding: choose {' or '.join(ROUNDINGS)}, got {r.rounding!r}"
        )
    if not 0 <= r.ema < 1:
        raise QaccError(f"adaptive option ema must be in [0, 1), got {r.ema}")
    if r.budget_bits < 0 or not 0 <= r.budget_ramp <= 1:
        raise QaccError("adaptive options: budget_bits >= 0, 0 <= budget_ramp <= 1")
    return r


KEEP_VALUES = frozenset({"maxpool2d", "adaptive_maxpool2d", "reshape", "gather", "zero_insert"})
"""Ops whose outputs are some of their input's values: they need no output quantizer."""
BIAS_SHARE = 0.5
"""The bias may take at most this share of the accumulator range (in accumulator units)."""
INIT_SAMPLES = 1000
"""Calibration samples run through the network to initialise the quantizers."""
INIT_VALUES = 200_000
"""Values per tensor sampled for an activation quantizer's initial step and zero point."""
STEP_SEARCH = 24
"""Weight-step candidates tried upward from the error-minimising step (x1.25 or x2 each)."""
OPTQ_STEPS = (0, -1, 1)
"""init="optq": weight steps tried per channel, in powers of 1.25 (2 for pow2) of the fitted one."""
ADD_FRAC_BITS = 10
"""A residual add brings both operands to 2^-10 of the finer scale (exact for pow2 scales)."""
OUTPUT_BITS = 8
"""With a single `a_bits`, the network output (logits: no accumulator reads them) keeps 8 bits."""


# ----------------------------------------------------------------------------- STE helpers


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round half up (floor(v + 0.5), THE rounding) with a straight-through gradient."""
    return v + (torch.floor(v + 0.5) - v).detach()


def trunc_ste(v: torch.Tensor) -> torch.Tensor:
    """Round toward zero with a straight-through gradient."""
    return v + (torch.trunc(v) - v).detach()


def grad_scale(v: torch.Tensor, g: float) -> torch.Tensor:
    """v in the forward pass, g * dL/dv in the backward pass (LSQ's step-size gradient scale)."""
    return (v - v * g).detach() + v * g


def fake_quant(
    x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """LSQ+ fake quantization: (clamp(round(x / s) + zp, qmin, qmax) - zp) * s, with the
    gradients the composition of `round_ste` and `torch.clamp` would have (see _FakeQuant)."""
    out = _FakeQuant.apply(x, s, zp, qmin, qmax)
    assert isinstance(out, torch.Tensor)
    return out


class _FakeQuant(torch.autograd.Function):
    """`fake_quant` as one autograd node: the activations are the largest tensors of the
    training step, and the composed expression keeps half a dozen of their size for backward.

    With v = x / s, q = round(v) + zp and `inside` = qmin <= q <= qmax (clamp's own gradient
    mask), the output c * s with c = clamp(q) - zp has dx = inside, ds = c - v inside and c
    outside (LSQ+: round(v) - v, or the code limit), dzp = -s outside.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int
    ) -> torch.Tensor:
        v = x / s
        q = torch.floor(v + 0.5).add_(zp)
        inside = (q >= qmin) & (q <= qmax)
        c = q.clamp_(qmin, qmax).sub_(zp)
        ds = torch.where(inside, c - v, c)
        ctx.save_for_backward(inside, ds, s)
        ctx.shapes = (s.shape, zp.shape)
        return c.mul_(s)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inside, ds, s = ctx.saved_tensors
        s_shape, zp_shape = ctx.shapes
        gx = torch.where(inside, g, 0.0)
        gs = torch.dot(g.reshape(-1), ds.reshape(-1)).reshape(s_shape)
        gzp = ((gx.sum() - g.sum()) * s).reshape(zp_shape)
        return gx, gs, gzp, None, None


# ----------------------------------------------------------------------------- quantizers


def _step(log2_step: torch.Tensor, g: float, pow2: bool) -> torch.Tensor:
    """Steps are learned in the log2 domain (Adam's updates are then relative to the step, as
    for the weights they scale); pow2 rounds the exponent."""
    p = grad_scale(log2_step, g)
    return torch.exp2(round_ste(p) if pow2 else p)


class ActQuant(nn.Module):
    """LSQ+ quantizer of one activation format class: learnable step and offset."""

    def __init__(self, bits: int, pow2: bool, step: float, zero_point: int, numel: int):
        super().__init__()
        self.bits, self.pow2 = bits, pow2
        self.signed = bits > 7  # int8 containers: unsigned formats have at most 7 bits
        self.qmin, self.qmax = int_range(bits, self.signed)
        self.g = 1.0 / math.sqrt(max(1, numel) * self.qmax)
        self.s_param = nn.Parameter(torch.tensor(math.log2(step), dtype=torch.float32))
        self.beta = nn.Parameter(torch.tensor(-zero_point * step, dtype=torch.float32))

    def step(self) -> torch.Tensor:
        return _step(self.s_param, self.g, self.pow2)

    def zero_point(self, s: torch.Tensor) -> torch.Tensor:
        return torch.clamp(round_ste(-self.beta / s), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.step()
        return fake_quant(x, s, self.zero_point(s), self.qmin, self.qmax)

    def export(self) -> QFormat:
        with torch.no_grad():
            s = self.step()
            zp = int(self.zero_point(s))
            step = float(s)
        frac = -round(math.log2(step))
        return QFormat(self.bits, self.signed, frac, zp, None if self.pow2 else step)


@dataclass(frozen=True)
class Layer:
    """What the training forward pass of a weighted layer quantizes to (torch tensors)."""

    q: torch.Tensor  # integer weights, IR layout
    bias: torch.Tensor  # integer bias, accumulator units
    w_step: torch.Tensor  # (O,)
    x_step: torch.Tensor
    x_zp: torch.Tensor


class WeightQuant(nn.Module):
    """Weights of one layer, their learnable per-channel steps, and the accumulator constraint."""

    def __init__(self, node: Node, bits: int, acc_bits: int, pow2: bool, r: Recipe | None = None):
        super().__init__()
        w = np.asarray(node.params["weight"], dtype=np.float32)
        self.w = nn.Parameter(torch.as_tensor(w))
        self.b = nn.Parameter(torch.as_tensor(np.asarray(node.params["bias"], dtype=np.float32)))
        self.bits, self.pow2, self.acc_bits = bits, pow2, acc_bits
        self.qmax = (1 << (bits - 1)) - 1
        self.zeros_move = False  # project()'s option: set by start_optq
        r = r or Recipe()
        self.pruned_grad, self.integer_budget = r.pruned_grad, r.integer_budget  # project()'s
        self.rounding = r.rounding
        self.exact_limit = float((1 << (acc_bits - 1)) - 1)
        self.limit = self.exact_limit  # wider while Recipe.budget_bits is ramped off
        k = int(np.prod(w.shape[1:]))
        self.g = 1.0 / math.sqrt(k * self.qmax)
        step = init_weight_steps(w.reshape(w.shape[0], -1), self.qmax, pow2)
        self.s_param = nn.Parameter(torch.as_tensor(np.log2(step)))

    def step(self) -> torch.Tensor:
        return _step(self.s_param, self.g, self.pow2)

    @torch.no_grad()
    def fit_steps(self, act: ActQuant) -> None:
        """Per channel, the step (from the error-minimising one upward) whose projected, rounded
        weights best approximate the float weights. Where the accumulator bound binds, the
        integer weights no longer depend on the step, so the step sets their real scale."""
        o = self.w.shape[0]
        shape = (o,) + (1,) * (self.w.ndim - 1)
        base = self.s_param.detach().clone()
        best = torch.full((o,), math.inf, dtype=torch.float64, device=self.w.device)
        chosen = base.clone()
        for k in range(STEP_SEARCH):
            cand = base + (k if self.pow2 else k * math.log2(1.25))
            self.s_param.copy_(cand)
            lay = self.forward(act)
            w_hat = lay.q * lay.w_step.reshape(shape)
            err = ((w_hat - self.w) ** 2).reshape(o, -1).sum(1).double()
            b_hat = lay.bias * lay.x_step * lay.w_step
            err += ((b_hat - self.b) ** 2).double()
            better = err < best
            best = torch.where(better, err, best)
            chosen = torch.where(better, cand, chosen)
        self.s_param.copy_(chosen)

    @torch.no_grad()
    def start_inside(self, act: ActQuant) -> None:
        """A2Q+'s initialisation: replace the float weights by their projection onto the
        accumulator budget (at the fitted steps), so that training starts inside it."""
        self.w.copy_(self._projected(act)[0])

    @torch.no_grad()
    def start_optq(self, node: Node, act: ActQuant, x: torch.Tensor) -> None:
        """Accumulator-aware OPTQ (AXE, `codegen.quant.rounding`) at this layer's formats: the
        float weights become the integers OPTQ chooses on the layer's quantized calibration
        inputs x (NCHW, or (N, K)) times the weight steps, each inside the budget the training
        forward pass allows, so its projection leaves them be and training starts from OPTQ's
        integer network. Per channel the step is the fitted one or one of OPTQ_STEPS nearby,
        whichever leaves the smaller output error (w - w^)^T H (w - w^) (AXE's finer steps)."""
        sx = act.step()
        zp = act.zero_point(sx)
        xlo, xhi = int(act.qmin - zp), int(act.qmax - zp)
        codes = torch.floor(x.detach().double().cpu() / float(sx) + 0.5)  # code - zero point
        stats = layer_stats(node, codes, codes, cross=False)
        h = stats.h
        dead = h.diagonal(dim1=1, dim2=2) <= 0
        u = optq_factor(h)
        o = self.w.shape[0]
        g = h.shape[0]
        w = self.w.detach().double().cpu().reshape(g, o // g, -1)
        base = self.s_param.detach().clone()
        room = self.limit - 1.0
        best = torch.full((o,), math.inf, dtype=torch.float64)
        chosen_s, chosen_w = base.clone(), self.w.detach().clone()
        for k in OPTQ_STEPS:
            self.s_param.copy_(base + (k if self.pow2 else k * math.log2(1.25)))
            sw = self.step().detach().double().cpu()
            bias = torch.clamp(
                self.b.detach().double().cpu() / (float(sx) * sw),
                -BIAS_SHARE * room, BIAS_SHARE * room,
            )  # fmt: skip
            # the float budget of _projected, floored: its projection is then the identity
            up = torch.floor(room - bias).to(torch.int64).reshape(g, -1)
            dn = torch.floor(room + bias).to(torch.int64).reshape(g, -1)
            swg = sw.reshape(g, -1, 1)
            q = columns(w / swg, up, dn, dead, u, h, h, "optq", xlo, xhi, True, self.qmax)
            d = w - q.double() * swg
            err = torch.einsum("gok,gkl,gol->go", d, h, d).reshape(o)
            better = err < best
            best = torch.where(better, err, best)
            chosen_s = torch.where(better.to(base.device), self.s_param, chosen_s)
            cand = (q.double() * swg).reshape(self.w.shape).to(self.w)
            keep = better.reshape((o,) + (1,) * (self.w.ndim - 1)).to(self.w.device)
            chosen_w = torch.where(keep, cand, chosen_w)
        self.s_param.copy_(chosen_s)
        self.w.copy_(chosen_w)
        self.zeros_move = True

    def _projected(
        self, act: ActQuant
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projected float weights, the bias in accumulator units (kept inside its share of
        the range), the weight steps, and the input's step and zero point."""
        sx = act.step()
        zp = act.zero_point(sx)
        sw = self.step()
        room = self.limit - 1.0  # 1 LSB of slack for the bias' rounding
        bias = torch.clamp(self.b / (sx * sw), -BIAS_SHARE * room, BIAS_SHARE * room)
        w = project(
            self.w, sw, bias, act.qmin - zp, act.qmax - zp, room, self.zeros_move,
            self.pruned_grad, self.qmax if self.integer_budget else None,
        )  # fmt: skip
        return w, bias, sw, sx, zp

    def forward(self, act: ActQuant) -> Layer:
        w, bias, sw, sx, zp = self._projected(act)
        xlo, xhi = act.qmin - zp, act.qmax - zp
        o = self.w.shape[0]
        shape = (o,) + (1,) * (self.w.ndim - 1)
        u = w / sw.reshape(shape)
        b = round_ste(bias)
        toward_zero = torch.clamp(trunc_ste(u), -self.qmax, self.qmax)  # fits: see project()
        nearest = torch.clamp(round_ste(u), -self.qmax, self.qmax)
        if self.rounding == "fit":
            flip = _fewest_toward_zero(
                u.detach(), nearest.detach(), toward_zero.detach(), b.detach(),
                float(xlo.detach()), float(xhi.detach()), self.limit,
            )  # fmt: skip
            nearest = torch.where(flip, toward_zero, nearest)
        fits = _fits(nearest.detach(), b.detach(), xlo.detach(), xhi.detach(), self.limit)
        q = torch.where(fits.reshape(shape), nearest, toward_zero)
        return Layer(q, b, sw, sx, zp)


def _fewest_toward_zero(
    u: torch.Tensor,
    nearest: torch.Tensor,
    toward_zero: torch.Tensor,
    bias: torch.Tensor,
    xlo: float,
    xhi: float,
    limit: float,
) -> torch.Tensor:
    """Which weights to round toward zero instead of to nearest so that every channel's exact
    bound fits [-limit - 1, limit]: per channel the fewest, cheapest ones.

    Only a weight that rounded away from zero can move (by one step, toward zero), and the
    cheapest is the one whose fractional part is closest to 1/2 (its squared error grows by
    2f - 1). With unsigned inputs (xlo = 0) each sign bounds one side: a positive weight moved
    lowers the top of the bound by xhi, a negative one raises the bottom by xhi, so each sign
    moves exactly as many as its side needs. Otherwise every move shrinks both sides (a
    positive weight: the top by xhi, the bottom by -xlo; a negative one the other way round) and
    the cheapest moves are taken, in order, until both fit. Rounding every weight toward zero
    fits (`project`), so the moves always suffice."""
    o = u.shape[0]
    uu, n = u.reshape(o, -1).double(), nearest.reshape(o, -1).double()
    movable = n != toward_zero.reshape(o, -1)
    cost = torch.where(movable, uu.abs() - toward_zero.reshape(o, -1).double().abs(), math.inf)
    pos, neg = (n > 0).double(), (n < 0).double()
    p, m = (n * pos).sum(1), (-n * neg).sum(1)
    b = bias.double()
    hi = b + p * xhi - m * xlo
    lo = b + p * xlo - m * xhi
    if xlo == 0.0:
        need_p = torch.ceil((hi - limit).clamp_min(0.0) / xhi)
        need_m = torch.ceil((-limit - 1.0 - lo).clamp_min(0.0) / xhi)
        flip = torch.zeros_like(movable)
        for sign, need in ((pos, need_p), (neg, need_m)):
            key = torch.where(sign > 0, cost, math.inf)
            rank = key.argsort(dim=1, stable=True).argsort(dim=1)
            flip |= movable & (sign > 0) & (rank < need[:, None])
        return flip.reshape(u.shape)
    order = cost.argsort(dim=1, stable=True)
    ok = movable.gather(1, order).double()
    dp = torch.cumsum(ok * pos.gather(1, order), 1)
    dm = torch.cumsum(ok * neg.gather(1, order), 1)
    zero = torch.zeros((o, 1), dtype=dp.dtype, device=dp.device)
    dp, dm = torch.cat([zero, dp], 1), torch.cat([zero, dm], 1)
    fit = (hi[:, None] - dp * xhi + dm * xlo <= limit) & (
        lo[:, None] - dp * xlo + dm * xhi >= -limit - 1.0
    )
    k = torch.where(fit.any(1), fit.double().argmax(1), float(fit.shape[1] - 1))
    rank = order.argsort(dim=1)
    return (movable & (rank < k[:, None])).reshape(u.shape)


def _fits(
    q: torch.Tensor, bias: torch.Tensor, xlo: torch.Tensor, xhi: torch.Tensor, limit: float
) -> torch.Tensor:
    """Per channel, whether the integer weights q and bias keep the exact sum
    (`channel_bounds`) inside [-limit - 1, limit] for every input code offset in [xlo, xhi]."""
    lo, hi = channel_bounds(
        q.cpu().numpy().astype(np.int64), bias.cpu().numpy().astype(np.int64), int(xlo), int(xhi)
    )
    return torch.as_tensor((hi <= limit) & (lo >= -limit - 1), device=q.device)


def project(
    w: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor,
    xlo: torch.Tensor,
    xhi: torch.Tensor,
    room: float,
    zeros_move: bool = False,
    pruned_grad: bool = False,
    integer_qmax: int | None = None,
) -> torch.Tensor:
    """Bring each channel's weights inside the accumulator bound (the A2Q / A2Q+ constraint).

    In integer units u = w / sw, the sum of a channel over inputs x in [xlo, xhi] (xlo <= 0 <=
    xhi) lies in [bias - P*(-xlo) - N*xhi, bias + P*xhi + N*(-xlo)], P and N the positive and
    negative mass of u. With xlo = 0 (unsigned activations) each sign bounds one side: the
    positive and the negative weights are each projected onto their L1 ball (soft thresholding,
    the Euclidean projection, which keeps the large weights and drops the small ones: a layer
    with many terms and a small budget becomes sparse instead of uniformly tiny). Otherwise one
    factor scales both signs. `room` is the accumulator's largest value less the bias' rounding
    slack; rounding toward zero afterwards can only shrink P and N.

    With `zeros_move` a weight at exactly 0 (inside the budget) keeps its gradient, which relu
    gives only above 0: init="optq" starts with most weights at integer multiples of the step,
    many of them 0, which would otherwise never move (measured: FashionCNN 86.6 % against 90.0 %
    after two quarter epochs). Other inits keep relu (their measured figures are with it).

    With `integer_qmax` (the codes' largest magnitude) each L1 ball's radius is the one at which
    the projected weights, rounded to nearest (and clamped), use the integer budget, instead of
    the one at which the float weights do (`_rounded_cap`).
    """
    o = w.shape[0]
    shape = (o,) + (1,) * (w.ndim - 1)
    up, down = room - bias, room + bias  # what the weights may add above / below the bias
    if float(xlo.detach()) == 0.0:
        cap_p, cap_n = up / xhi * sw, down / xhi * sw
        if integer_qmax is not None:
            cap_p = cap_p * _rounded_cap(F.relu(w), cap_p, sw, integer_qmax)
            cap_n = cap_n * _rounded_cap(F.relu(-w), cap_n, sw, integer_qmax)
        if zeros_move:  # max(w, 0) and max(w, 0) - w: a weight at exactly 0 keeps its gradient
            plus = w.clamp_min(0.0)
            pos = _l1_ball(plus, cap_p, True, pruned_grad)
            neg = _l1_ball(plus - w, cap_n, True, pruned_grad)
        else:
            pos = _l1_ball(F.relu(w), cap_p, False, pruned_grad)
            neg = _l1_ball(F.relu(-w), cap_n, False, pruned_grad)
        return pos - neg
    u = w / sw.reshape(shape)
    tiny = 1e-12
    p = F.relu(u).reshape(o, -1).sum(1)
    n = F.relu(-u).reshape(o, -1).sum(1)
    hi = p * xhi - n * xlo
    lo = p * -xlo + n * xhi
    g = torch.clamp(torch.minimum(up / (hi + tiny), down / (lo + tiny)), max=1.0)
    return w * g.reshape(shape)


ROUNDED_CAP_STEPS = 40
"""Bisection steps of `_rounded_cap`'s threshold (to 2^-40 of the largest weight)."""


@torch.no_grad()
def _rounded_cap(v: torch.Tensor, cap: torch.Tensor, unit: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per channel (rows of v >= 0), the factor f such that projecting v onto the L1 ball of
    radius f * cap and rounding to nearest in `unit`s (clamped to qmax) gives integers whose sum
    is at most cap / unit, with the smallest such threshold: soft thresholding at t shrinks every
    weight by t, and the integers' sum sum_i min(qmax, round((v_i - t) / unit)) only falls as t
    grows, so t is found by bisection. Weights that round to 0 no longer waste the budget (the
    float radius spends it on values below half a unit). Detached: a constant for the gradients."""
    o = v.shape[0]
    a = (v.reshape(o, -1) / unit.reshape(o, 1)).double()
    budget = (cap / unit).double()

    def used(t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.floor(a - t[:, None] + 0.5), 0, qmax).sum(1)

    lo = torch.zeros(o, dtype=a.dtype, device=a.device)
    hi = a.max(1).values + 1.0
    for _ in range(ROUNDED_CAP_STEPS):
        mid = (lo + hi) / 2
        fits = used(mid) <= budget
        hi, lo = torch.where(fits, mid, hi), torch.where(fits, lo, mid)
    t = torch.where(used(lo) <= budget, lo, hi)  # lo = 0 when nothing needs cutting
    # halfway to the next threshold at which a weight would round up one more unit: the
    # float32 projection then stays off the rounding edge
    above = torch.remainder(a - 0.5 - t[:, None], 1.0)
    gap = torch.where((a - 0.5 > t[:, None]) & (above > 0), above, 1.0).min(1).values
    t = torch.where(t > 0, t + gap / 2, t)
    radius = F.relu(a - t[:, None]).sum(1)
    if_all = a.sum(1) + 1.0  # nothing cut: a radius above the whole mass keeps v as it is
    radius = torch.where(t > 0, radius, if_all)
    return (radius / budget.clamp_min(1e-12)).to(cap.dtype)


def _l1_ball(
    v: torch.Tensor, cap: torch.Tensor, zeros_move: bool = False, pruned_grad: bool = False
) -> torch.Tensor:
    """Per channel (rows of v >= 0), relu(v - t) with the smallest t >= 0 whose sum <= cap.

    The kept set comes from sorting (Duchi et al. 2008, on detached values): with u the row
    sorted downward and S its running sum, the largest k with u_k > (S_k - cap) / k. t is then
    the closed form over the kept set, t = (sum_kept v - cap) / |kept|, so gradients reach v and
    cap exactly."""
    o = v.shape[0]
    flat = v.reshape(o, -1)
    d = flat.detach()
    c = cap.detach().clamp_min(0.0)
    u = torch.sort(d, dim=1, descending=True).values
    k = torch.arange(1, u.shape[1] + 1, dtype=d.dtype, device=d.device)
    n_kept = (u * k > u.cumsum(1) - c[:, None]).sum(1)  # the condition holds for k = 1..rho
    css = u.cumsum(1).gather(1, (n_kept - 1).clamp_min(0)[:, None])[:, 0]
    t_det = (css - c) / n_kept.clamp_min(1)
    kept = (d > t_det[:, None]).to(d.dtype)
    t = ((flat * kept).sum(1) - cap.clamp_min(0.0)) / kept.sum(1).clamp_min(1.0)
    t = torch.where(n_kept > 0, t, d.max(dim=1).values)  # nothing kept: a zero budget
    t = torch.where(d.sum(1) > c, t.clamp_min(0.0), torch.zeros_like(t))
    shifted = v - t.reshape((o,) + (1,) * (v.ndim - 1))
    out = shifted.clamp_min(0.0) if zeros_move else F.relu(shifted)  # clamp: v = t = 0 moves
    if pruned_grad:  # a pruned weight (0 forward) gets dL/dv as if kept, apart from t
        pruned = (shifted <= 0).detach().to(v.dtype)
        out = out + (v - v.detach()) * pruned
    return out


def init_weight_steps(w: np.ndarray, qmax: int, pow2: bool) -> np.ndarray:
    """Per-channel steps minimising the round-toward-zero quantization error of w (O, K)."""
    amax = np.abs(w).max(axis=1).clip(min=1e-8)
    if pow2:
        base = np.floor(np.log2(amax / qmax))
        cands = np.exp2(base[None, :] + np.arange(-2, 3)[:, None])
    else:
        cands = amax[None, :] / qmax * np.linspace(0.35, 1.5, 47)[:, None]
    err = np.stack(
        [
            ((np.clip(np.trunc(w / c[:, None]), -qmax, qmax) * c[:, None] - w) ** 2).sum(axis=1)
            for c in cands
        ]
    )
    return cands[err.argmin(axis=0), np.arange(w.shape[0])].astype(np.float32)


def init_act_quant(
    v: np.ndarray, bits: int, pow2: bool, numel: int, nonneg: bool
) -> tuple[float, int]:
    """Step and zero point minimising the quantization error of the calibration values v."""
    signed = bits > 7
    qmin, qmax = int_range(bits, signed)
    lo = 0.0 if nonneg else min(0.0, float(v.min()))
    hi = max(float(v.max()), lo + 1e-6)
    best: tuple[float, float, int] | None = None
    if pow2:
        base = math.floor(math.log2((hi - lo) / (qmax - qmin)))
        steps = [2.0**e for e in range(base - 3, base + 2)]
    else:
        steps = [(hi - lo) / (qmax - qmin) * a for a in np.linspace(0.15, 1.0, 52)]
    for s in steps:
        zp = int(np.clip(qmin + round(-lo / s), qmin, qmax))
        q = np.clip(np.floor(v / s + 0.5) + zp, qmin, qmax)
        err = float(np.mean(((q - zp) * s - v) ** 2))
        if best is None or err < best[0]:
            best = (err, s, zp)
    assert best is not None
    return best[1], best[2]


# ----------------------------------------------------------------------------- the QAT network


def _rep_tensors(graph: Graph) -> dict[str, str]:
    classes = tensor_classes(graph)
    return {t: classes.find(t) for t in graph.tensors}


class QATNet(nn.Module):
    """The float IR with fake quantization everywhere; input and output NCHW like the model.

    Initialisation runs the calibration data through the network in order, so that every
    quantizer is fitted to the values it will really see: each layer's weight steps to its
    weights under the accumulator constraint, each activation quantizer to the output of the
    already quantized prefix. With `init="projected"` each layer's float weights are then
    replaced by their projection onto the accumulator budget (`WeightQuant.start_inside`).
    """

    def __init__(
        self,
        graph: Graph,
        x_calib: np.ndarray,
        w_bits: Mapping[str, int],
        a_bits: Mapping[str, int],
        acc_bits: Mapping[str, int],
        pow2: bool,
        device: torch.device | str = "cpu",
        init: str = "float",
        r: Recipe | None = None,
    ):
        super().__init__()
        self.pow2 = pow2
        self.device = torch.device(device)
        self.graph = graph
        self.rep = _rep_tensors(graph)
        self.acts = nn.ModuleDict()
        self.layers = nn.ModuleDict()
        self.keys: dict[str, str] = {}
        with torch.no_grad():
            x = torch.as_tensor(x_calib[:INIT_SAMPLES], dtype=torch.float32).to(self.device)
            env = {graph.input: self._init_act(graph.input, x, a_bits)(x)}
            for n in graph.nodes:
                if n.op in WEIGHTED_OPS:
                    wq = WeightQuant(n, w_bits[n.name], acc_bits[n.name], pow2, r)
                    wq = wq.to(self.device)
                    wq.fit_steps(self.act(n.inputs[0]))
                    if init == "projected":
                        wq.start_inside(self.act(n.inputs[0]))
                    elif init == "optq":
                        wq.start_optq(n, self.act(n.inputs[0]), env[n.inputs[0]])
                    self.layers[n.name] = wq
                y = self._node(n, [env[t] for t in n.inputs])
                if n.op not in KEEP_VALUES:
                    y = self._init_act(n.output, y, a_bits)(y)
                env[n.output] = y

    def _init_act(self, tensor: str, v: torch.Tensor, a_bits: Mapping[str, int]) -> ActQuant:
        """The quantizer of a tensor's format class, created from the first values it sees."""
        r = self.rep[tensor]
        if r not in self.keys:
            self.keys[r] = f"a{len(self.acts)}"
            members = [m for m, mr in self.rep.items() if mr == r]
            nonneg = all(_nonneg(self.graph, m) for m in members)
            # a softmax divides into a power-of-two output (reference.softmax)
            pow2 = self.pow2 or any(_produced_by(self.graph, m, "softmax") for m in members)
            numel = self.graph.tensors[r].size
            sample = v.detach().double().cpu().numpy().ravel()
            if sample.size > INIT_VALUES:
                sample = np.random.default_rng(0).choice(sample, INIT_VALUES, replace=False)
            s, zp = init_act_quant(sample, a_bits[r], pow2, numel, nonneg)
            act = ActQuant(a_bits[r], pow2, s, zp, numel).to(self.device)
            self.acts[self.keys[r]] = act
        return self.act(tensor)

    def act(self, tensor: str) -> ActQuant:
        m = self.acts[self.keys[self.rep[tensor]]]
        assert isinstance(m, ActQuant)
        return m

    def layer(self, name: str) -> WeightQuant:
        m = self.layers[name]
        assert isinstance(m, WeightQuant)
        return m

    def _node(self, n: Node, xs: list[torch.Tensor]) -> torch.Tensor:
        """One node with quantized weights and its clamp (before its output quantizer)."""
        over: dict[str, Any] = {}
        if n.op in WEIGHTED_OPS:
            lay = self.layer(n.name).forward(self.act(n.inputs[0]))
            shape = (-1,) + (1,) * (lay.q.ndim - 1)
            over = {
                "weight": lay.q * lay.w_step.reshape(shape),
                "bias": lay.bias * lay.x_step * lay.w_step,
            }
        y = simulate.eval_node(n, xs, over) * self._multiplier_error(n)
        lo, hi = n.attrs.get("clamp", (-math.inf, math.inf))
        return y.clamp(lo, hi) if (lo, hi) != (-math.inf, math.inf) else y

    def _multiplier_error(self, n: Node) -> torch.Tensor | float:
        """Realised / real requantization multiplier of a node (a constant for the gradients).

        The integer kernels requantize with `dyadic`'s 15-bit multipliers, not the real ratio of
        the scales; training through the realised ones keeps the fake-quant network's
        predictions those of the deployed integer network (residual adds stay real-valued)."""
        if n.op not in (*WEIGHTED_OPS, "avgpool2d", "global_avgpool", "mul", "adaptive_avgpool2d"):
            return 1.0
        if self.rep[n.output] not in self.keys:  # initialisation: no output quantizer yet
            return 1.0
        if n.op in ("mul", "adaptive_avgpool2d"):  # as export() builds them (ptq.format_node)
            fins = [self.act(t).export() for t in n.inputs]
            fo = self.act(n.output).export()
            rq = format_node(n, fins, fo, fo.qmin, fo.qmax)[2]
            realised = rq.mult * np.exp2(-rq.shift.astype(np.float64))
            if n.op == "mul":
                return float(realised[0] * fo.scale / (fins[0].scale * fins[1].scale))
            exact = fins[0].scale / (np.asarray(n.attrs["counts"], dtype=np.float64) * fo.scale)
            ratio = torch.as_tensor(realised / exact, dtype=torch.float32, device=self.device)
            return ratio.reshape(1, 1, len(n.attrs["rows"]), len(n.attrs["cols"]))
        with torch.no_grad():
            sx = self.act(n.inputs[0]).step().double()
            sy = self.act(n.output).step().double()
            if n.op in WEIGHTED_OPS:
                if self.pow2:
                    return 1.0
                m = sx * self.layer(n.name).step().double() / sy  # as export() computes it
                shape = (1, -1) + (1,) * (2 if n.op == "conv2d" else 0)
                return (_realised(m) / m).float().reshape(shape)
            count = _pool_count(self.graph, n)
            if self.pow2 and count & (count - 1) == 0:
                return 1.0
            m = sx / (count * sy)
            return float(_realised(m) / m)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output (NCHW for an image), or the tuple of them for several outputs."""
        g = self.graph
        env = {g.input: self.act(g.input)(x)}
        for n in g.nodes:
            y = self._node(n, [env[t] for t in n.inputs])
            if n.op not in KEEP_VALUES:  # those keep their input's values
                y = self.act(n.output)(y)
            env[n.output] = y
        return env[g.output] if len(g.outputs) == 1 else tuple(env[t] for t in g.outputs)


def _produced_by(graph: Graph, tensor: str, op: str) -> bool:
    prod = graph.producer(tensor)
    return prod is not None and prod.op == op


def _pool_count(graph: Graph, n: Node) -> int:
    """Values an average pool sums per output: its window, or the whole image (global)."""
    if n.op == "avgpool2d":
        return int(n.attrs["kernel"][0] * n.attrs["kernel"][1])
    shp = graph.tensors[n.inputs[0]].shape
    return int(shp[0] * shp[1])


def _realised(m: torch.Tensor) -> torch.Tensor:
    """mult * 2^-shift of `dyadic(m)` (float64)."""
    mult, shift = dyadic(m.detach().cpu().numpy())
    return torch.as_tensor(mult * np.exp2(-shift.astype(np.float64)), device=m.device)


def _nonneg(graph: Graph, tensor: str) -> bool:
    return is_nonneg(graph, tensor, lambda _: False)  # the input: as the data says


# ----------------------------------------------------------------------------- bits per layer


def resolve_bits(
    graph: Graph, w_bits: int | Mapping[str, int], a_bits: int | Mapping[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """Weight bits per weighted layer, activation bits per tensor (format class representative).

    `a_bits` keys are layer names (their output), "input", "output" and "default"; a single int
    sets the input and hidden activations while the network output keeps 8 bits (logits feed no
    accumulator, and 4-bit logits would tie). "output" is the (first) output's; the further
    outputs of a model with several take it too unless a layer reads them (a feature map the
    network goes on from keeps the hidden width). An 8-bit input costs the first layer 4 bits of
    accumulator headroom: at 12 bits it leaves its weights about 8 integer units of L1 mass.
    """
    weighted = [n.name for n in graph.nodes if n.op in WEIGHTED_OPS]
    layers = [n.name for n in graph.nodes]
    if isinstance(w_bits, Mapping):
        _check_keys(w_bits, set(weighted) | {"default"}, "w_bits")
        wb = {n: int(w_bits.get(n, w_bits.get("default", 4))) for n in weighted}
    else:
        wb = dict.fromkeys(weighted, int(w_bits))
    if isinstance(a_bits, Mapping):
        _check_keys(a_bits, set(layers) | {"default", "input", "output"}, "a_bits")
        default = int(a_bits.get("default", 4))
        io = {"input": int(a_bits.get("input", default)), "output": a_bits.get("output", default)}
        per_layer = {k: int(v) for k, v in a_bits.items()}
    else:
        default = int(a_bits)
        io = {"input": default, "output": OUTPUT_BITS}
        per_layer = {}
    # ops that share their input's format (maxpool, reshape, gather, concat) set bits only when
    # named
    by_tensor = {
        n.output: per_layer.get(n.name, default)
        for n in graph.nodes
        if n.op not in SHARED_FORMAT_OPS or n.name in per_layer
    }
    by_tensor[graph.input] = int(io["input"])
    last = graph.producer(graph.output)
    if last is not None and last.name not in per_layer:
        by_tensor[graph.output] = int(io["output"])
    for t in graph.extra_outputs:
        prod = graph.producer(t)
        if prod is not None and prod.name not in per_layer and not graph.consumers(t):
            by_tensor[t] = int(io["output"])
    rep = _rep_tensors(graph)
    ab: dict[str, int] = {}
    for t, r in rep.items():  # a shared format takes the widest of its members
        if t in by_tensor:
            ab[r] = max(ab.get(r, 0), by_tensor[t])
    for name, bits in [*wb.items(), *ab.items()]:
        if not 2 <= bits <= 8:
            raise QaccError(f"bits for '{name}' must be 2..8, got {bits}")
    return wb, ab


def _check_keys(m: Mapping[str, int], allowed: set[str], what: str) -> None:
    unknown = set(m) - allowed
    if unknown:
        raise QaccError(f"{what} names unknown layers {sorted(unknown)}; known: {sorted(allowed)}")


# ----------------------------------------------------------------------------- training


def param_groups(net: QATNet, lr: float, r: Recipe) -> list[dict[str, Any]]:
    """Adam's parameter groups: latent weights (the classifier's at `head_lr`, all with
    `weight_decay`), biases, and the quantizers' steps and offsets (at `scale_lr`)."""
    weighted = [n.name for n in net.graph.nodes if n.op in WEIGHTED_OPS]
    head = net.layer(weighted[-1]) if weighted else None
    layers = [net.layer(n) for n in weighted]
    body = [q.w for q in layers if q is not head]
    groups = [
        {"params": body, "lr": lr, "weight_decay": r.weight_decay},
        {"params": [q.b for q in layers], "lr": lr, "weight_decay": 0.0},
        {
            "params": [q.s_param for q in layers]
            + [p for a in net.acts.values() for p in (a.s_param, a.beta)],
            "lr": lr * r.scale_lr,
            "weight_decay": 0.0,
        },
    ]
    if head is not None:
        groups.append({"params": [head.w], "lr": lr * r.head_lr, "weight_decay": r.weight_decay})
    return [g for g in groups if g["params"]]


def budget_schedule(net: QATNet, r: Recipe) -> Callable[[float], None] | None:
    """Recipe.budget_bits: every layer's accumulator limit starts 2^budget_bits times wider and
    shrinks geometrically to the exact one over the first `budget_ramp` of the training steps."""
    if r.budget_bits <= 0 or r.budget_ramp <= 0:
        return None
    layers = [net.layer(n) for n in net.layers]

    def on_step(done: float) -> None:
        extra = r.budget_bits * max(0.0, 1.0 - done / r.budget_ramp)
        for q in layers:
            q.limit = q.exact_limit * 2.0**extra if extra > 0 else q.exact_limit

    return on_step


def train_qat(
    net: QATNet,
    train: TrainData,
    epochs: int,
    seed: int,
    progress: bool,
    lr: float = DEFAULT_LR,
    distill: bool = DEFAULT_DISTILL,
    on_epoch: Callable[[QATNet], Mapping[str, float]] | None = None,
    r: Recipe | None = None,
) -> list[dict[str, float]]:
    """Fine-tune every parameter (weights, biases, steps, offsets): Adam, cosine decay; with
    `distill`, the float network is the teacher (knowledge distillation). `train` is arrays
    (x, y), a Dataset or a DataLoader; under torchrun, DistributedDataParallel (see `fit`).
    With several outputs the labels are a tuple (one entry per output, None: distillation
    only) and each output distils from the float network's same output (`training.fit`).
    `on_epoch(net)` is called after every epoch; its figures join the epoch's history row.
    `r`: the recipe's further options (Recipe)."""
    r = r or Recipe()

    def teacher(xb: torch.Tensor) -> Outputs:  # the float network the training started from
        x_nhwc = xb.permute(0, 2, 3, 1) if xb.ndim == 4 else xb
        outs = simulate.run_outputs(net.graph, x_nhwc, dtype=torch.float32, device=xb.device)
        ts = [torch.as_tensor(o, dtype=torch.float32, device=xb.device) for o in outs]
        if len(ts) == 1:
            return ts[0].reshape(len(xb), -1)
        return tuple(t.permute(0, 3, 1, 2) if t.ndim == 4 else t for t in ts)  # as net's, NCHW

    history: list[dict[str, float]] = []
    x, y = train if isinstance(train, tuple) else (train, None)
    ramp = budget_schedule(net, r)
    fit(net, x, y, epochs, batch=r.batch, lr=lr, seed=seed, progress=progress,
        schedule="cosine", desc="adaptive QAT", history=history,
        teacher=teacher if distill else None, temperature=r.temperature,
        device=net.device, on_epoch=None if on_epoch is None else lambda: on_epoch(net),
        groups=param_groups(net, lr, r), warmup=r.warmup, kd_weight=r.kd_weight, on_step=ramp,
        ema=r.ema,
    )  # fmt: skip
    if ramp is not None:
        ramp(1.0)  # the exact budget, whatever the number of steps
    return history


# ----------------------------------------------------------------------------- export


def _requant_of(m: np.ndarray, pow2: bool) -> tuple[np.ndarray, np.ndarray]:
    if pow2:
        shift = -np.round(np.log2(m)).astype(np.int64)
        assert np.allclose(np.exp2(-shift.astype(np.float64)), m), "pow2 scales must be exact"
        return np.ones_like(shift), shift
    return dyadic(m)


@dataclass
class Fixups:
    weights: int = 0


def export(net: QATNet) -> tuple[Graph, dict[str, Any]]:
    """The integer graph the trained QAT network computes, and per-layer constraint figures."""
    g = net.graph
    pow2 = net.pow2
    fmts = {t: net.act(t).export() for t in g.tensors}
    tensors = {t: Tensor(t, v.shape, fmts[t]) for t, v in g.tensors.items()}
    nodes = []
    layers: dict[str, Any] = {}
    fix = Fixups()
    for n in g.nodes:
        fi, fo = fmts[n.inputs[0]], fmts[n.output]
        lo, hi = clamp_limits(n.attrs.get("clamp", (-math.inf, math.inf)), fo)
        attrs = dict(n.attrs)
        params: dict[str, np.ndarray] = {}
        if n.op in WEIGHTED_OPS:
            wq = net.layer(n.name)
            with torch.no_grad():
                lay = wq.forward(net.act(n.inputs[0]))
            q = lay.q.double().cpu().numpy().astype(np.int64)
            bias = lay.bias.double().cpu().numpy().astype(np.int64)
            sw = lay.w_step.double().cpu().numpy()
            q = _enforce_bounds(q, bias, fi, wq.acc_bits, fix)
            m = fi.scale * sw / fo.scale
            mult, shift = _requant_of(m, pow2)
            params = {"weight": q, "bias": bias}
            attrs.update(
                acc_bits=wq.acc_bits,
                input_zero_point=fi.zero_point,
                weight_bits=wq.bits,
                weight_scale=tuple(float(v) for v in sw),
            )
            if pow2:
                attrs["weight_frac"] = tuple(int(v) for v in -np.round(np.log2(sw)))
            rq = Requant(mult, shift, fo.zero_point, lo, hi)
            layers[n.name] = _constraint_row(q, bias, fi, wq)
        elif n.op in ("avgpool2d", "global_avgpool"):
            count = _pool_count(g, n)
            exact = pow2 and count & (count - 1) == 0  # else a 15-bit multiplier divides
            mult, shift = _requant_of(np.array([fi.scale / (count * fo.scale)]), exact)
            rq = Requant(mult, shift, fo.zero_point, lo, hi)
            attrs["input_zero_point"] = fi.zero_point
            span = fi.qmax - fi.qmin
            attrs["acc_bits"] = 16 if count * span < (1 << 15) else 32
        elif n.op == "add":
            fa, fb = (fmts[t] for t in n.inputs)
            base = min(fa.scale, fb.scale) * 2.0**-ADD_FRAC_BITS
            mults = [int(round_half_up(f.scale / base)) for f in (fa, fb)]
            m_out, s_out = _requant_of(np.array([base / fo.scale]), pow2)
            params = {"in_mult": np.array(mults, dtype=np.int64)}
            rq = Requant(m_out, s_out, fo.zero_point, lo, hi)
            attrs["input_zero_points"] = (fa.zero_point, fb.zero_point)
            peak = sum(m * (f.qmax - f.qmin) for m, f in zip(mults, (fa, fb), strict=True))
            attrs["acc_bits"] = 16 if peak < (1 << 15) else 32
        elif n.op == "concat":  # inputs share the output's format (tensor classes)
            k = len(n.inputs)
            rq = Requant(np.ones(k, dtype=np.int64), np.zeros(k, dtype=np.int64), 0, lo, hi)
        else:  # lut, mul, softmax, resize, adaptive pools, gather, maxpool2d, reshape: as in ptq
            more, params, rq = format_node(n, [fmts[t] for t in n.inputs], fo, lo, hi)
            attrs.update(more)
        nodes.append(Node(n.name, n.op, n.inputs, n.output, attrs, params, rq))
    graph = g.with_nodes(tuple(nodes), tensors)
    return graph, {"layers": layers, "bound_fixups": fix.weights}


def _enforce_bounds(
    q: np.ndarray, bias: np.ndarray, fi: QFormat, acc_bits: int, fix: Fixups
) -> np.ndarray:
    """Verify the exact bound of every channel; shrink the largest weights of a channel that
    does not fit (never expected: training caps the float bound with a slack of one LSB)."""
    lim = (1 << (acc_bits - 1)) - 1
    xlo, xhi = fi.qmin - fi.zero_point, fi.qmax - fi.zero_point
    q = q.copy()
    flat = q.reshape(q.shape[0], -1)
    for c in range(flat.shape[0]):
        while True:
            lo, hi = channel_bounds(flat[c : c + 1], bias[c : c + 1], xlo, xhi)
            if lo[0] >= -lim - 1 and hi[0] <= lim:
                break
            j = int(np.abs(flat[c]).argmax())
            if flat[c, j] == 0:
                raise QaccError(
                    f"a channel's bias alone exceeds the {acc_bits}-bit accumulator; raise acc_bits"
                )
            flat[c, j] -= np.sign(flat[c, j])
            fix.weights += 1
    return flat.reshape(q.shape)


def _constraint_row(
    q: np.ndarray, bias: np.ndarray, fi: QFormat, wq: WeightQuant
) -> dict[str, Any]:
    xlo, xhi = fi.qmin - fi.zero_point, fi.qmax - fi.zero_point
    lo, hi = channel_bounds(q, bias, xlo, xhi)
    flat = np.abs(q.reshape(q.shape[0], -1))
    span = max(abs(xlo), abs(xhi))
    lim = (1 << (wq.acc_bits - 1)) - 1
    return {
        "acc_bits": wq.acc_bits,
        "w_bits": wq.bits,
        "l1_max": int(flat.sum(axis=1).max()),
        "a2q_l1_cap": lim // span,  # ||q||_1 <= (2^(P-1)-1) / max|x|: plain A2Q
        "a2q_plus_l1_cap": (2 * lim) // span,  # zero-centred weights (A2Q+)
        "bound": int(max(hi.max(), -lo.min())),
        "acc_limit": lim + 1,
        "fits": bool(hi.max() <= lim and lo.min() >= -lim - 1),
    }


# ----------------------------------------------------------------------------- entry point


def quantize_adaptive(
    graph: Graph,
    calib: np.ndarray,
    train: TrainData,
    acc_bits: Mapping[str, int],
    *,
    w_bits: int | Mapping[str, int] = 4,
    a_bits: int | Mapping[str, int] = 4,
    scale: str = "dyadic",
    epochs: int = 2,
    seed: int = 0,
    progress: bool = True,
    lr: float = DEFAULT_LR,
    distill: bool = DEFAULT_DISTILL,
    device: torch.device | str = "cpu",
    init: str = DEFAULT_INIT,
    on_epoch: Callable[[QATNet], Mapping[str, float]] | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[Graph, dict[str, Any]]:
    """Train, export and check; returns the integer graph and the method's report section.

    Under torchrun every rank initialises from its own first calibration samples and
    DistributedDataParallel then broadcasts rank 0's parameters, so the initialisation is rank
    0's; the training is data parallel and every rank exports the same integer graph."""
    if scale not in SCALES:
        raise QaccError(f"unknown scale kind '{scale}'; choose dyadic or pow2")
    if epochs < 0:
        raise QaccError(f"epochs must be >= 0, got {epochs}")
    if init not in INITS:
        raise QaccError(f"unknown adaptive init '{init}'; choose {' or '.join(INITS)}")
    r = recipe(options)
    wb, ab = resolve_bits(graph, w_bits, a_bits)
    torch.manual_seed(seed)
    net = QATNet(
        graph, calib, wb, ab, acc_bits, pow2=scale == "pow2", device=device, init=init,
        r=r,
    )  # fmt: skip
    for q in net.layers.values():
        assert isinstance(q, WeightQuant)
        if r.zeros_move is not None:
            q.zeros_move = r.zeros_move
    history = train_qat(
        net, train, epochs, seed, progress, lr=lr, distill=distill, on_epoch=on_epoch, r=r
    )
    qgraph, details = export(net)
    agree = fake_vs_integer(net, qgraph, calib)
    extra = {
        "adaptive": {
            "scale": scale,
            "w_bits": wb,
            "a_bits": {t: ab[r] for t, r in net.rep.items()},
            "epochs": epochs,
            "distill": distill,
            "init": init,
            "lr": lr,
            "options": asdict(r),
            "history": history,
            "constraint": details["layers"],
            "bound_fixups": details["bound_fixups"],
            "fake_vs_integer_agreement_calib": agree,
        }
    }
    return qgraph, extra


def fake_vs_integer(net: QATNet, qgraph: Graph, x: np.ndarray) -> float:
    """Share of inputs on which the fake-quant network and the integer graph predict alike
    (the argmax of the first output, for a model with several)."""
    from codegen.core import reference

    def first(out: Outputs) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out[0]

    with torch.no_grad():
        fake = np.concatenate(
            [
                first(net(torch.as_tensor(x[i : i + 512]).to(net.device))).cpu().numpy()
                for i in range(0, len(x), 512)
            ]
        )
    xq = reference.quantize_images(x, qgraph)
    out = reference.run(qgraph, xq).output
    fake2 = fake.reshape(len(x), -1)
    agree = int(np.sum(fake2.argmax(1) == out.reshape(len(x), -1).argmax(1)))
    agree, total = ddp.all_reduce(np.array([agree, len(x)]), "sum")  # over all ranks' samples
    return float(agree / total)
