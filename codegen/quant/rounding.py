"""Accumulator-aware error-correcting rounding of a layer's weights (AXE: OPTQ and GPFQ).

`nearest` rounds every weight on its own (`accumulator.quantize_at`). `optq` and `gpfq` quantize
a layer one input column (term k of the kernel's sum, in the kernel's term order) at a time and
push the rounding error of each onto the columns not yet quantized, following Colbert et al.,
"Accumulator-Aware Post-Training Quantization" (2024):

- `optq` (GPTQ) minimises ||X~ w - X~ q|| over the layer's quantized calibration inputs X~: the
  error of column k, divided by the diagonal of the upper Cholesky factor U of H^-1 (H = X~^T X~
  plus 1 % damping), is subtracted from the later columns along U's row k;
- `gpfq` minimises ||X w - X~ q|| greedily along the data path (X: the float network's inputs of
  the layer): q_k = round(<X~_k, X w_{<=k} - X~ q_{<k}> / ||X~_k||^2), computed from the Gram
  matrices X~^T X~ and X~^T X.

Both keep every output channel inside its accumulator budget as they go. With integer inputs in
[xmin, xmax] (xmin <= 0 <= xmax), bias b and running sums P (positive weights) and N (|negative
weights|) of the columns done so far, the exact bound of `accumulator.channel_bounds` is

    hi = b + xmax P - xmin N <= 2^(A-1) - 1        lo = b + xmin P - xmax N >= -2^(A-1)

Each new weight is clipped to what keeps both true with the later columns at zero, so the bound
holds at every step and at the end (the remaining budget bounds the remaining columns). As in
AXE, the error-corrected value is first soft-thresholded by the shift that projects the channel's
zero-centred weights onto the L1 ball the bound implies, (2^A - 2) / (xmax - xmin) (zero unless
the float weights exceed it).

The weight formats start from those nearest rounding chose (the largest that fit with every
weight rounded to nearest); each channel is also rounded with one more fractional bit (a finer
step under the same budget, which the clipping and the soft threshold then enforce, as AXE's
fixed scales do) where int8 and the bias allow, and keeps whichever of the two leaves the smaller
output error (w - q)^T H (w - q) on the calibration inputs. Bias correction then moves each bias
by the mean output error on the calibration data, clipped to the range the bound leaves it.

The Gram matrices come from a seeded subsample of at most `max_rows` (patch) rows per group.
Everything is vectorised over output channels and over the groups of a grouped convolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from codegen.core.errors import QaccError
from codegen.core.formats import round_half_up
from codegen.core.ir import Node
from codegen.quant.accumulator import WEIGHT_BITS, Policy, WeightQuant, acc_limits, channel_bounds

ROUNDINGS = ("nearest", "optq", "gpfq")
DEFAULT_ROUNDING = "optq"
"""OPTQ: on Fashion-MNIST (10 000 test images, guaranteed) it loses less than nearest rounding
wherever both were measured: at 12 bits on FashionCNN, FashionDSCNN and ResDWNet, and with
clipping and equalization (the defaults) at 14 and 12 bits on FashionCNN and FashionDSCNN
(README)."""
MAX_ROWS = 8192
DAMPING = 0.01


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise QaccError(f"unknown rounding '{rounding}'; choose one of {', '.join(ROUNDINGS)}")
    return rounding


@dataclass
class LayerStats:
    """Second-order statistics of one layer's inputs, per group of a grouped convolution."""

    h: torch.Tensor  # (G, K, K) X~^T X~ (quantized inputs)
    c: torch.Tensor  # (G, K, K) X~^T X (quantized x float inputs), for GPFQ
    mean_q: torch.Tensor  # (G, K) mean quantized input row
    mean_f: torch.Tensor  # (G, K) mean float input row


def patches(node: Node, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The rows the layer's weights multiply, (G, rows, K), K in the weight's OHWI order: every
    row, or the rows numbered `rows` (image * positions + output position)."""
    if node.op == "dense":
        x = x.reshape(1, x.shape[0], -1)
        return x if rows is None else x[:, rows]
    a = node.attrs
    kh, kw = node.params["weight"].shape[1:3]
    top, bottom, left, right = a["padding"]
    xp = F.pad(x, (left, right, top, bottom))
    (sy, sx), (dy, dx) = a["stride"], a["dilation"]
    oh, ow = _out_hw(node, x)
    if rows is None:
        rows = torch.arange(x.shape[0] * oh * ow)
    img, pos = rows // (oh * ow), rows % (oh * ow)
    iy = (pos // ow * sy)[:, None] + torch.arange(kh) * dy  # (R, kh)
    ix = (pos % ow * sx)[:, None] + torch.arange(kw) * dx  # (R, kw)
    p = xp.permute(0, 2, 3, 1)[img[:, None, None], iy[:, :, None], ix[:, None, :]]  # R,kh,kw,C
    g = a["groups"]
    p = p.reshape(len(rows), kh, kw, g, -1).permute(3, 0, 1, 2, 4)
    return p.reshape(g, len(rows), -1)


def _out_hw(node: Node, x: torch.Tensor) -> tuple[int, int]:
    kh, kw = node.params["weight"].shape[1:3]
    top, bottom, left, right = node.attrs["padding"]
    (sy, sx), (dy, dx) = node.attrs["stride"], node.attrs["dilation"]
    oh = (x.shape[2] + top + bottom - dy * (kh - 1) - 1) // sy + 1
    ow = (x.shape[3] + left + right - dx * (kw - 1) - 1) // sx + 1
    return oh, ow


def layer_stats(
    node: Node,
    xq: torch.Tensor,
    xf: torch.Tensor,
    cross: bool = True,
    max_rows: int = MAX_ROWS,
    seed: int = 0,
) -> LayerStats:
    """Gram matrices of a seeded subsample of the layer's input rows (quantized and float);
    `cross`: X~^T X too (GPFQ), else `c` is left empty."""
    total = xq.shape[0] * (1 if node.op == "dense" else int(np.prod(_out_hw(node, xq))))
    if total <= max_rows:
        rows = torch.arange(total)
    else:
        rows = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_rows]
    pq = patches(node, xq.float(), rows)
    pf = patches(node, xf.float(), rows)
    n = pq.shape[1]
    h = (pq.transpose(1, 2) @ pq).double() / n
    c = (pq.transpose(1, 2) @ pf).double() / n if cross else h.new_empty(0)
    return LayerStats(h, c, pq.double().mean(1), pf.double().mean(1))


def _l1_shift(w: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per row of w (..., K): the soft threshold projecting |w - mean| onto the L1 ball."""
    v = (w - w.mean(-1, keepdim=True)).abs()
    u = v.sort(-1, descending=True).values
    cs = u.cumsum(-1)
    j = torch.arange(1, u.shape[-1] + 1, dtype=u.dtype)
    r = radius.unsqueeze(-1)
    ok = u * j > cs - r
    rho = (ok * j).argmax(-1, keepdim=True)  # last index where ok (ok is a prefix)
    theta = ((cs.gather(-1, rho) - r) / (rho + 1).to(u.dtype)).squeeze(-1)
    return torch.where(v.sum(-1) > radius, theta.clamp_min(0), torch.zeros_like(theta))


def refine(
    node: Node,
    wq: WeightQuant,
    stats: LayerStats,
    rounding: str,
    xmin: int,
    xmax: int,
    acc_bits: int,
    policy: Policy,
    bias_correction: bool = True,
) -> WeightQuant:
    """Error-corrected integer weights, starting from nearest rounding's formats (`wq`)."""
    if rounding == "nearest":
        return wq
    w_real = node.params["weight"].reshape(wq.q.shape[0], -1).astype(np.float64)
    b_real = node.params["bias"].astype(np.float64)
    o, k = w_real.shape
    g = stats.h.shape[0]
    og = o // g
    exact = policy == "guaranteed"
    if exact:
        assert xmin <= 0 < xmax, "the budget assumes inputs around zero"
    acc_lo, acc_hi = acc_limits(acc_bits)
    h = stats.h
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag <= 0  # (G, K): inputs that are always zero
    u = optq_factor(h) if rounding == "optq" else torch.where(dead, 1.0, diag)  # GPFQ: diag
    qmax = (1 << (WEIGHT_BITS - 1)) - 1

    def run(frac: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        bq = round_half_up(b_real * np.exp2((frac + wq.input_frac).astype(np.float64)))
        scale = torch.from_numpy(np.exp2(frac.astype(np.float64)))
        w = (torch.from_numpy(w_real) * scale[:, None]).reshape(g, og, k)
        bias = torch.from_numpy(bq).reshape(g, og)
        up, dn = acc_hi - bias, bias - acc_lo  # slack of hi and lo with no weights
        q = columns(w, up, dn, dead, u, h, stats.c, rounding, xmin, xmax, exact, qmax)
        return q, bq

    def error(q: torch.Tensor, frac: np.ndarray) -> torch.Tensor:
        d = torch.from_numpy(w_real) - q.reshape(o, k).double() * torch.from_numpy(
            np.exp2(-frac.astype(np.float64))
        ).unsqueeze(-1)
        d = d.reshape(g, og, k)
        return torch.einsum("gok,gkl,gol->go", d, h, d).reshape(o)

    frac = wq.frac.astype(np.int64)
    q, bq = run(frac)
    # AXE's finer steps: one more fractional bit wherever int8 and the bias allow; each channel
    # keeps whichever rounding leaves the smaller output error on the calibration inputs
    up = frac + 1
    b_up = round_half_up(b_real * np.exp2((up + wq.input_frac).astype(np.float64)))
    ok = (np.abs(w_real).max(axis=1) * np.exp2(up.astype(np.float64)) <= qmax + 0.5) & (
        (b_up >= acc_lo) & (b_up <= acc_hi) if exact else True
    )
    if ok.any():
        up = np.where(ok, up, frac)
        q2, _ = run(up)
        better = (error(q2, up) < error(q, frac)).numpy() & ok
        q = torch.where(torch.from_numpy(better).reshape(g, og, 1), q2, q)
        frac = np.where(better, up, frac)
    qn = q.reshape(o, k).numpy()
    bq = round_half_up(b_real * np.exp2((frac + wq.input_frac).astype(np.float64)))
    if bias_correction:
        # mean output error over the calibration rows, in accumulator units of each channel
        w0 = torch.from_numpy(w_real * np.exp2(frac.astype(np.float64))[:, None])
        ref = (w0.reshape(g, og, k) @ stats.mean_f.unsqueeze(-1)).squeeze(-1)
        got = (q.double() @ stats.mean_q.unsqueeze(-1)).squeeze(-1)
        delta = ((ref - got).reshape(o) * 2.0**wq.input_frac).numpy()
        bq = round_half_up(b_real * np.exp2((frac + wq.input_frac).astype(np.float64)) + delta)
    if exact:
        lo0, hi0 = channel_bounds(qn, np.zeros(o, dtype=np.int64), xmin, xmax)
        bq = np.clip(bq, acc_lo - lo0, acc_hi - hi0)
    qs = qn.reshape(wq.q.shape)
    lo, hi = channel_bounds(qs, bq, xmin, xmax)
    return WeightQuant(qs, frac, bq, wq.input_frac, lo, hi)


def optq_factor(h: torch.Tensor) -> torch.Tensor:
    """OPTQ's upper Cholesky factor of H^-1 (G, K, K), H = X~^T X~ (G, K, K) plus 1 % damping
    (inputs that are always zero get a unit diagonal)."""
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag <= 0
    damp = DAMPING * diag.mean(-1).clamp_min(1e-12)
    hd = h + torch.diag_embed(torch.where(dead, 1.0, 0.0).double() + damp[:, None] * (~dead))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)


def columns(
    w: torch.Tensor,
    up: torch.Tensor,
    dn: torch.Tensor,
    dead: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    rounding: str,
    xmin: int,
    xmax: int,
    exact: bool,
    qmax: int,
) -> torch.Tensor:
    """Integer weights (G, Og, K) in [-qmax, qmax] from w (G, Og, K, integer units), one column
    at a time.

    `u`: OPTQ's upper Cholesky factor of H^-1 (G, K, K), or GPFQ's diag(X~^T X~) (G, K) with
    `h` = X~^T X~ and `c` = X~^T X; `up` and `dn` (G, Og, int64): how far each channel's exact
    sum may rise above and fall below its bias (the accumulator's limits less the bias)."""
    g, og, k = w.shape
    wf = w  # the float target (GPFQ)
    w = w.clone()
    w[dead.unsqueeze(1).expand_as(w)] = 0.0
    pos = torch.zeros(g, og, dtype=torch.int64)
    neg = torch.zeros(g, og, dtype=torch.int64)
    theta = torch.zeros(g, og, dtype=torch.float64)
    if exact:
        theta = _l1_shift(w, (up + dn).double() / float(xmax - xmin))
    q = torch.zeros(g, og, k, dtype=torch.int64)
    for col in range(k):
        if rounding == "optq":
            arg = w[:, :, col]
        else:
            arg = (wf[:, :, : col + 1] @ c[:, col, : col + 1].unsqueeze(-1)).squeeze(-1)
            if col:
                arg = arg - (q[:, :, :col].double() @ h[:, col, :col].unsqueeze(-1)).squeeze(-1)
            arg = torch.where(dead[:, col].unsqueeze(-1), 0.0, arg / u[:, col].unsqueeze(-1))
        arg = arg.sign() * (arg.abs() - theta).clamp_min(0)
        hi_cap = torch.full_like(pos, qmax)
        lo_cap = torch.full_like(pos, qmax)
        if exact:
            sa = up - xmax * pos + xmin * neg  # remaining slack of hi
            sb = dn + xmin * pos - xmax * neg  # remaining slack of lo
            hi_cap = torch.minimum(hi_cap, sa // xmax)
            lo_cap = torch.minimum(lo_cap, sb // xmax)
            if xmin < 0:
                hi_cap = torch.minimum(hi_cap, sb // -xmin)
                lo_cap = torch.minimum(lo_cap, sa // -xmin)
        qc = torch.from_numpy(round_half_up(arg.numpy())).to(torch.int64)
        qc = torch.maximum(torch.minimum(qc, hi_cap), -lo_cap)
        q[:, :, col] = qc
        pos += qc.clamp_min(0)
        neg += (-qc).clamp_min(0)
        if rounding == "optq" and col + 1 < k:
            err = (w[:, :, col] - qc.double()) / u[:, col, col].unsqueeze(-1)
            w[:, :, col + 1 :] -= err.unsqueeze(-1) * u[:, col, col + 1 :].unsqueeze(1)
    return q
