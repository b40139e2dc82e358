"""Transform quantization (seed method 2; Young, Zhe, Taubman, Girod, TPAMI 2021).

Per weighted layer, W reshaped to (O, K):

1. a decorrelating transform over the output channels: the KLT (U = eigenvectors of W W^T / K) or
   the ELT, which weighs the weights by the statistics of the layer's input patches x gathered on
   the calibration data (U = eigenvectors of W G W^T, G = E[x x^T] normalised to trace K, so that
   the distortion of a coefficient row error e is e G e^T, the output error it causes). The
   coefficients are Y = U^T W, row k with variance var_k = y_k G y_k^T / K.
2. bit depths by reverse water-filling over ALL coefficient rows of the network, each weighted by
   its K weights: R_k = max(0, 1/2 log2(var_k / theta)), theta set so that the average rate,
   side information included, meets `bits_per_weight`. Per layer, the transform competes with the
   identity (plain per-row allocation): the one with the smaller Lagrangian cost D + lambda R at
   the water level wins (the transform's side cost is U: O x r at 8 bits plus its formats).
   Rates are then rounded and fixed up greedily on the measured distortion of each row at each
   bit depth until the budget is met. Rows with 0 bits are dropped (r < O rows kept).
3. every kept row is quantized uniformly with b_k bits at the power-of-two step that minimises its
   MSE (1 bit: the sign times the step; 2..7 bits: two's complement; 8 bits: [-127, 127]).
4. optionally, retraining with fake quantization (straight-through estimator) of the kept
   coefficients, U (8 bits) and the identity layers' rows, bit depths and steps fixed.
5. deployment: a transformed layer runs as a conv/dense with r outputs holding the coefficients
   (signed 8-bit intermediate tensor, no bias, no clamp) followed by a 1x1 conv/dense holding the
   8-bit U with the bias and the clamp ("factored"), or as its reconstructed weights U Y requantized
   to 8 bits ("reconstructed"), whichever stores fewer flash bytes ("auto").
   The integer graph is an ordinary one: activation formats come from calibrating the deployed
   float graph (codegen.quant.calibrate) and the PTQ machinery builds it (ptq.build_integer_graph).

The rate (`weight_bits_per_param`) counts every stored bit of the compressed weights: b_k bits per
kept coefficient, 8 bits per entry of U, per row its bit depth (4 bits) and step exponent (8 bits),
per row of U its exponent (8 bits), a 32-bit header per layer; divided by the number of weights of
the float network (biases are not weights and are not counted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from codegen.core import simulate
from codegen.core.errors import InfeasibleAccumulatorError, QaccError
from codegen.core.formats import IntArray, round_half_up
from codegen.core.ir import WEIGHTED_OPS, Graph, Node, QFormat, Tensor
from codegen.quant import distributed as ddp
from codegen.quant.accumulator import Policy, WeightQuant, acc_limits, channel_bounds
from codegen.quant.calibrate import calibrate
from codegen.quant.ptq import (
    build_integer_graph,
    class_infos,
    tensor_classes,
)
from codegen.quant.training import TrainData, fit

FloatArray = npt.NDArray[np.float64]

TRANSFORMS = ("klt", "elt", "uniform")
DEPLOYMENTS = ("auto", "factored", "reconstructed")
MAX_BITS = 8
DEPTH_BITS = 4  # per coefficient row: its bit depth (0..8)
STEP_BITS = 8  # per coefficient row and per row of U: its step exponent
HEADER_BITS = 32  # per layer: identity or transform, r
U_BITS = 8  # entries of the transform matrix
STAT_SAMPLES = 500  # calibration samples for the input statistics (ELT) and sensitivities
NOISE = 0.05  # relative weight noise of the sensitivity probe


# ----------------------------------------------------------------------------- scalar quantizer


def int_limits(bits: int) -> tuple[int, int]:
    """Integer levels of a b-bit coefficient: +-1 (the sign) at 1 bit, two's complement at 2..7
    bits, [-127, 127] at 8 bits (no -128: the NEON kernels' int16 pair sums stay safe)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit depth {bits} outside 1..{MAX_BITS}")
    if bits == 1:
        return -1, 1
    if bits == MAX_BITS:
        return -127, 127
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _levels(v: FloatArray, bits: int) -> FloatArray:
    if bits == 1:
        return np.where(v >= 0, 1.0, -1.0)
    lo, hi = int_limits(bits)
    return np.clip(np.floor(v + 0.5), lo, hi)


def quantize_row(y: FloatArray, bits: int) -> tuple[IntArray, int]:
    """y (K,) at `bits` bits with the power-of-two step 2^-frac of least squared error."""
    m = float(np.abs(y).max(initial=0.0))
    if bits == 0 or m == 0.0:
        return np.zeros(y.shape, dtype=np.int64), 0
    hi = int_limits(bits)[1]
    f0 = math.floor(math.log2(hi / m))
    fracs = np.arange(f0 - 1, f0 + 8)
    scale = np.exp2(fracs.astype(np.float64))[:, None]
    q = _levels(y[None, :] * scale, bits)
    err = ((q / scale - y[None, :]) ** 2).sum(axis=1)
    best = int(np.argmin(err))
    return q[best].astype(np.int64), int(fracs[best])


def quantize_rows(y: FloatArray, bits: IntArray) -> tuple[IntArray, IntArray]:
    """Rows of y (R, K) at their bit depths: integers (R, K) and fractional lengths (R,)."""
    q = np.zeros(y.shape, dtype=np.int64)
    frac = np.zeros(y.shape[0], dtype=np.int64)
    for k in range(y.shape[0]):
        q[k], frac[k] = quantize_row(y[k], int(bits[k]))
    return q, frac


def dequantize_rows(q: IntArray, frac: IntArray) -> FloatArray:
    return q.astype(np.float64) * np.exp2(-frac.astype(np.float64))[:, None]


def storage_bits(q: IntArray) -> int:
    """Two's complement bits that hold every integer of q (at least 2: the packing's minimum)."""
    hi = max(int(q.max(initial=0)), -int(q.min(initial=0)) - 1, 0)
    return max(2, hi.bit_length() + 1)


# ----------------------------------------------------------------------------- transforms


def layer_matrix(node: Node) -> FloatArray:
    w = np.asarray(node.params["weight"], dtype=np.float64)
    return w.reshape(w.shape[0], -1)


def decorrelate(
    w: FloatArray, g: FloatArray | None = None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(U, Y, var): U orthonormal (O, O), eigenvectors of W G W^T / K by decreasing eigenvalue
    (G = I: the KLT), Y = U^T W, var_k = y_k G y_k^T / K (the eigenvalues)."""
    k = w.shape[1]
    m = w @ (w.T if g is None else g @ w.T) / k
    evals, evecs = np.linalg.eigh((m + m.T) / 2)
    order = np.argsort(evals)[::-1]
    u = evecs[:, order]
    # deterministic signs: the largest entry of each column is positive
    idx = np.abs(u).argmax(axis=0)
    u = u * np.where(u[idx, np.arange(u.shape[1])] < 0, -1.0, 1.0)
    y = u.T @ w
    return u, y, row_energy(y, g)


def row_energy(y: FloatArray, g: FloatArray | None) -> FloatArray:
    """e G e^T / K of every row (plain mean square when G is None)."""
    k = y.shape[1]
    if g is None:
        return np.asarray((y**2).sum(axis=1) / k)
    return np.asarray(np.einsum("ik,kl,il->i", y, g, y) / k)


def input_moments(
    fg: Graph,
    x_nhwc: np.ndarray,
    names: list[str],
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, FloatArray]:
    """E[x x^T] of the input patches (im2col rows in (kh, kw, c) order) of each named layer,
    normalised to trace K.

    The sums of x x^T are float64 (products of float32 values, summed per batch and over the
    batches); under torchrun they and the counts are all-reduced (SUM, float64), so every rank
    gets the same bytes. Against one process holding all the samples, only the order of the
    float64 additions differs: relative differences around 1e-16, far below what moves a bit
    allocation (the ELT's eigenvectors and the water-filling compare values, not bits)."""
    acc: dict[str, FloatArray] = {}
    count: dict[str, int] = {}
    wanted = set(names)

    def observe(node: Node, xs: list[torch.Tensor], pre: torch.Tensor) -> None:
        if node.name not in wanted:
            return
        p = _patches(node, xs[0].double())
        acc[node.name] = acc.get(node.name, 0) + (p.T @ p).cpu().numpy()
        count[node.name] = count.get(node.name, 0) + p.shape[0]

    simulate.run(fg, x_nhwc, observe=observe, dtype=torch.float32, batch=250, device=device)
    sums = ddp.all_reduce_dict(acc, "sum")
    counts = ddp.all_reduce_dict(count, "sum")
    out = {}
    for name in names:
        m = sums[name] / counts[name]
        tr = float(np.trace(m))
        out[name] = m * (m.shape[0] / tr) if tr > 0 else np.eye(m.shape[0])
    return out


def _patches(node: Node, x: torch.Tensor) -> torch.Tensor:
    """Rows (N * L, K) of the layer's input patches in the weight's (kh, kw, c) order."""
    if node.op == "dense":
        return x.reshape(x.shape[0], -1)
    a = node.attrs
    _, kh, kw, c = node.params["weight"].shape
    top, bottom, left, right = a["padding"]
    xp = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(xp, (kh, kw), dilation=a["dilation"], stride=a["stride"])  # (N, c*kh*kw, L)
    cols = cols.reshape(x.shape[0], c, kh * kw, -1).permute(0, 3, 2, 1)  # (N, L, kh*kw, c)
    return cols.reshape(-1, kh * kw * c)


def sensitivities(
    fg: Graph,
    nodes: list[Node],
    x_nhwc: np.ndarray,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Squared logit error per unit of weight error energy, per layer: the layer's weights get
    small white noise (NOISE times their RMS) and the network output moves; this puts the
    distortions of all layers on one scale (the network's output) for the global allocation.
    With several outputs, the squared errors of all of them are summed.
    Under torchrun the noise is the same on every rank (same seed) and the per-sample errors
    are summed over the ranks (float64 all-reduce)."""
    rng = np.random.default_rng(seed)
    ref = simulate.run_outputs(fg, x_nhwc, dtype=torch.float32, device=device)
    sums: dict[str, float] = {}
    energy: dict[str, float] = {}
    for n in nodes:
        w = np.asarray(n.params["weight"], dtype=np.float64)
        sigma = NOISE * math.sqrt(float((w**2).mean())) or 1.0
        noisy = w + sigma * rng.standard_normal(w.shape)
        ys = simulate.run_outputs(
            fg, x_nhwc, overrides={n.name: {"weight": noisy}}, dtype=torch.float32, device=device
        )
        sums[n.name] = sum(
            float(((y - r) ** 2).reshape(len(y), -1).sum(axis=1).sum())
            for y, r in zip(ys, ref, strict=True)
        )
        energy[n.name] = float(((noisy - w) ** 2).sum())
    total = ddp.all_reduce_dict(sums, "sum")
    count = float(ddp.all_reduce(np.array([float(len(x_nhwc))]), "sum")[0])
    return {k: max(total[k] / count / energy[k], 1e-30) for k in sums}


# ----------------------------------------------------------------------------- water-filling


def rates_at(var: FloatArray, theta: float, max_bits: float = math.inf) -> FloatArray:
    """Reverse water-filling at level theta: R_k = max(0, 1/2 log2(var_k / theta)), capped."""
    with np.errstate(divide="ignore"):
        r = 0.5 * np.log2(np.maximum(var, 0.0) / theta)
    return np.clip(r, 0.0, max_bits)


def waterfill(
    var: FloatArray, weights: FloatArray, total_bits: float, max_bits: float = math.inf
) -> tuple[FloatArray, float]:
    """Continuous rates (R, theta) with sum(weights * R) == total_bits (reverse water-filling)."""
    var = np.asarray(var, dtype=np.float64)
    pos = var[var > 0]
    if pos.size == 0 or total_bits <= 0:
        return np.zeros_like(var), math.inf
    lo = math.log2(pos.min()) - 2 * min(max_bits, 64.0) - 2
    hi = math.log2(pos.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((weights * rates_at(var, 2.0**mid, max_bits)).sum()) > total_bits:
            lo = mid
        else:
            hi = mid
    theta = 2.0 ** ((lo + hi) / 2)
    return rates_at(var, theta, max_bits), theta


# ----------------------------------------------------------------------------- allocation


@dataclass
class Option:
    """One way of coding a layer: the identity or a transform, with each row's distortion at
    every bit depth (measured: quantize the row, e G e^T of the error)."""

    kind: str  # "identity", "klt" or "elt"
    u: FloatArray  # (O, O)
    y: FloatArray  # (O, K)
    var: FloatArray  # (O,)
    dist: FloatArray  # (O, MAX_BITS + 1)


@dataclass
class LayerCode:
    """The coded form of one weighted layer."""

    name: str
    op: str
    shape: tuple[int, ...]  # the float weight's shape
    kind: str
    u: FloatArray  # (O, r) float, kept columns
    y: FloatArray  # (r, K) float coefficients (latent during retraining)
    bits: IntArray  # (r,) bit depths of the kept rows (identity: r == O, zeros allowed)
    y_frac: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    u_frac: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    bias: FloatArray = field(default_factory=lambda: np.zeros(0))

    @property
    def transformed(self) -> bool:
        return self.kind != "identity"

    @property
    def o(self) -> int:
        return self.shape[0]

    @property
    def k(self) -> int:
        return int(np.prod(self.shape[1:]))

    def quantized(self) -> tuple[IntArray, IntArray | None]:
        """Integer coefficients (r, K) and U (O, r) at the fixed bit depths and steps."""
        qy = _fixed(self.y, self.bits, self.y_frac)
        if not self.transformed:
            return qy, None
        return qy, _fixed(self.u, np.full(self.u.shape[0], MAX_BITS), self.u_frac)

    def reconstructed(self) -> FloatArray:
        qy, qu = self.quantized()
        y = dequantize_rows(qy, self.y_frac)
        if qu is None:
            return y
        return dequantize_rows(qu, self.u_frac) @ y


def _fixed(v: FloatArray, bits: IntArray, frac: IntArray) -> IntArray:
    out = np.zeros(v.shape, dtype=np.int64)
    for k in range(v.shape[0]):
        if bits[k] > 0:
            out[k] = _levels(v[k] * 2.0 ** float(frac[k]), int(bits[k])).astype(np.int64)
    return out


def side_bits(kind: str, o: int, bits: IntArray) -> dict[str, int]:
    """Side information of a coded layer (see the module docstring)."""
    live = int((np.asarray(bits) > 0).sum())
    if kind == "identity":
        return {"transform": 0, "formats": o * DEPTH_BITS + live * STEP_BITS, "header": HEADER_BITS}
    return {
        "transform": o * live * U_BITS,
        "formats": live * (DEPTH_BITS + STEP_BITS) + (o * STEP_BITS if live else 0),
        "header": HEADER_BITS,
    }


def layer_bits(kind: str, o: int, k: int, bits: IntArray) -> dict[str, int]:
    return {"coefficients": k * int(np.asarray(bits).sum())} | side_bits(kind, o, bits)


def _option(kind: str, w: FloatArray, g: FloatArray | None, scale: float = 1.0) -> Option:
    """Distortions (and variances) in units of the network output: times the layer's `scale`."""
    if kind == "identity":
        u, y = np.eye(w.shape[0]), w
        var = row_energy(w, g)
    else:
        u, y, var = decorrelate(w, g)
    var = var * scale
    dist = np.zeros((w.shape[0], MAX_BITS + 1))
    for k in range(w.shape[0]):
        for b in range(MAX_BITS + 1):
            q, f = quantize_row(y[k], b)
            e = y[k] - q * 2.0**-f
            dist[k, b] = scale * (float(e @ e) if g is None else float(e @ g @ e))
    return Option(kind, u, y, var, dist)


def _lagrangian(opt: Option, k: int, theta: float) -> tuple[float, FloatArray]:
    """Modelled D + lambda * rate of an option at water level theta (lambda = 2 ln2 theta)."""
    r = rates_at(opt.var, theta, MAX_BITS)
    d = float((k * opt.var * np.exp2(-2 * r)).sum())
    rate = k * float(r.sum()) + sum(side_bits(opt.kind, len(r), (r > 0).astype(np.int64)).values())
    return d + 2 * math.log(2) * theta * rate, r


def _choose(
    options: list[list[Option]], ks: list[int], theta: float
) -> list[tuple[int, FloatArray]]:
    out = []
    for opts, k in zip(options, ks, strict=True):
        scored = [(*_lagrangian(o, k, theta), i) for i, o in enumerate(opts)]
        _, r, i = min(scored, key=lambda s: s[0])
        out.append((i, r))
    return out


def _total(options: list[list[Option]], ks: list[int], picks: list[tuple[int, IntArray]]) -> int:
    return sum(
        sum(layer_bits(options[li][i].kind, len(b), ks[li], b).values())
        for li, (i, b) in enumerate(picks)
    )


def allocate(
    options: list[list[Option]], ks: list[int], budget: float
) -> list[tuple[int, IntArray]]:
    """Per layer (option index, integer bit depth per row) with total bits <= budget.

    Continuous reverse water-filling with the per-layer option choice (bisection on theta), then
    rounding and a greedy fix-up on the measured distortions: remove the bit that costs the least
    distortion per saved bit while over budget, then add the bit that saves the most distortion
    per spent bit while it fits."""
    all_var = np.concatenate([o.var for opts in options for o in opts])
    pos = all_var[all_var > 0]
    if pos.size == 0:
        return [(0, np.zeros(len(opts[0].var), dtype=np.int64)) for opts in options]
    lo, hi = math.log2(pos.min()) - 2 * MAX_BITS - 2, math.log2(pos.max()) + 1
    for _ in range(60):
        mid = (lo + hi) / 2
        picks = _choose(options, ks, 2.0**mid)
        rate = sum(
            ks[li] * float(r.sum())
            + sum(side_bits(options[li][i].kind, len(r), (r > 0).astype(np.int64)).values())
            for li, (i, r) in enumerate(picks)
        )
        lo, hi = (mid, hi) if rate > budget else (lo, mid)
    chosen = _choose(options, ks, 2.0**hi)
    ints = [(i, np.clip(np.round(r), 0, MAX_BITS).astype(np.int64)) for i, r in chosen]
    return _fix_up(options, ks, ints, budget)


def _step_cost(opt: Option, k: int, bits: IntArray, row: int, delta: int) -> tuple[float, int]:
    """(distortion change, rate change) of changing one row's bit depth by delta (+-1)."""
    new = bits.copy()
    new[row] += delta
    o = len(bits)
    dr = sum(layer_bits(opt.kind, o, k, new).values()) - sum(
        layer_bits(opt.kind, o, k, bits).values()
    )
    dd = float(opt.dist[row, new[row]] - opt.dist[row, bits[row]])
    return dd, dr


def _fix_up(
    options: list[list[Option]], ks: list[int], picks: list[tuple[int, IntArray]], budget: float
) -> list[tuple[int, IntArray]]:
    total = _total(options, ks, picks)
    while total > budget:
        best: tuple[float, int, int, int] | None = None
        for li, (i, b) in enumerate(picks):
            for row in np.nonzero(b > 0)[0]:
                dd, dr = _step_cost(options[li][i], ks[li], b, int(row), -1)
                score = dd / max(-dr, 1)
                if best is None or score < best[0]:
                    best = (score, li, int(row), dr)
        if best is None:
            break
        _, li, at, dr = best
        picks[li][1][at] -= 1
        total += dr
    while True:
        best = None
        for li, (i, b) in enumerate(picks):
            for row in np.nonzero(b < MAX_BITS)[0]:
                dd, dr = _step_cost(options[li][i], ks[li], b, int(row), +1)
                if total + dr > budget or dd >= 0:
                    continue
                score = -dd / max(dr, 1)
                if best is None or score > best[0]:
                    best = (score, li, int(row), dr)
        if best is None:
            break
        _, li, at, dr = best
        picks[li][1][at] += 1
        total += dr
    return picks


def uniform_bits(ns: list[int], bits_per_weight: float) -> list[int]:
    """Per-layer uniform bit depths whose weighted mean is at most bits_per_weight (integers:
    floor everywhere, then one more bit for the largest layers while the budget allows)."""
    base = max(1, min(MAX_BITS, math.floor(bits_per_weight)))
    out = [base] * len(ns)
    budget = bits_per_weight * sum(ns)
    used = base * sum(ns)
    for li in sorted(range(len(ns)), key=lambda i: -ns[i]):
        if out[li] < MAX_BITS and used + ns[li] <= budget:
            out[li] += 1
            used += ns[li]
    return out


# ----------------------------------------------------------------------------- the method


def quantize_transform(
    fg: Graph,
    calib: np.ndarray,
    train: TrainData | None,
    accs: Mapping[str, int],
    *,
    policy: Policy,
    bits_per_weight: float,
    transform: str,
    epochs: int,
    seed: int,
    progress: bool,
    labels: np.ndarray | None = None,
    deploy: str = "auto",
    device: torch.device | str = "cpu",
) -> tuple[Graph, dict[str, Any]]:
    """The integer graph of `fg` coded at `bits_per_weight`, and the report's extra entries."""
    if transform not in TRANSFORMS:
        raise QaccError(f"unknown transform '{transform}'; choose one of {', '.join(TRANSFORMS)}")
    if deploy not in DEPLOYMENTS:
        raise QaccError(
            f"unknown transform_deploy '{deploy}'; choose one of {', '.join(DEPLOYMENTS)}"
        )
    if not (isinstance(bits_per_weight, (int, float)) and 0 < bits_per_weight <= MAX_BITS + 1):
        raise QaccError(f"bits_per_weight must be in (0, {MAX_BITS + 1}], got {bits_per_weight}")
    if epochs < 0:
        raise QaccError(f"epochs must be >= 0, got {epochs}")
    x_nhwc = simulate.nchw_to_nhwc(calib)
    nodes = [n for n in fg.nodes if n.op in WEIGHTED_OPS]
    n_weights = sum(int(n.params["weight"].size) for n in nodes)
    budget = bits_per_weight * n_weights
    codes, alloc_info = code_layers(fg, nodes, x_nhwc, transform, budget, progress, device)
    total = _rate(codes)
    if transform != "uniform" and total["total"] > budget:
        raise QaccError(
            f"bits_per_weight {bits_per_weight} is below the side information alone "
            f"({total['total'] / n_weights:.3f} bits per weight); ask for more"
        )
    history: list[dict[str, float]] = []
    if train is not None and epochs > 0:
        history = retrain(
            fg, codes, train, epochs=epochs, seed=seed, progress=progress, device=device
        )
    graph, deployed = lower(fg, codes, x_nhwc, accs, policy, deploy, progress, device)
    layers = []
    for c in codes:
        w = layer_matrix(fg.node(c.name))
        err = w - c.reconstructed()
        b = c.bits
        layers.append(
            {
                "name": c.name,
                "O": c.o,
                "K": c.k,
                "r": int((b > 0).sum()),
                "transform": c.kind,
                "bits_histogram": {str(v): int((b == v).sum()) for v in range(MAX_BITS + 1)},
                "rate_bits": layer_bits(c.kind, c.o, c.k, b),
                "relative_weight_error": float((err**2).sum() / max((w**2).sum(), 1e-30)),
                **alloc_info.get(c.name, {}),
                **deployed[c.name],
            }
        )
    rate = _rate(codes)
    extra = {
        "weight_bits_per_param": rate["total"] / n_weights,
        "transform": {
            "method": transform,
            "bits_per_weight_target": float(bits_per_weight),
            "float_weights": n_weights,
            "rate_bits": rate,
            "deployed_weight_bits_per_param": sum(
                d["deployed_weight_bits"] for d in deployed.values()
            )
            / n_weights,
            "layers": layers,
            "retraining": history,
        },
    }
    return graph, extra


def _rate(codes: list[LayerCode]) -> dict[str, int]:
    out = {"coefficients": 0, "transform": 0, "formats": 0, "header": 0}
    for c in codes:
        for key, v in layer_bits(c.kind, c.o, c.k, c.bits).items():
            out[key] += v
    out["total"] = sum(out.values())
    return out


def code_layers(
    fg: Graph,
    nodes: list[Node],
    x_nhwc: np.ndarray,
    transform: str,
    budget: float,
    progress: bool,
    device: torch.device | str = "cpu",
) -> tuple[list[LayerCode], dict[str, dict[str, Any]]]:
    """Choose transform/identity, bit depths and steps for every weighted layer."""
    ws = [layer_matrix(n) for n in nodes]
    ks = [w.shape[1] for w in ws]
    if transform == "uniform":
        per_layer = uniform_bits([w.size for w in ws], budget / sum(w.size for w in ws))
        picks_u = [
            np.full(w.shape[0], b, dtype=np.int64) for w, b in zip(ws, per_layer, strict=True)
        ]
        options = [[_option("identity", w, None)] for w in ws]
        picks = [(0, b) for b in picks_u]
        info: dict[str, dict[str, Any]] = {}
    else:
        groups = [int(n.attrs.get("groups", 1)) for n in nodes]
        moments: dict[str, FloatArray] = {}
        if transform == "elt":
            names = [n.name for n, g in zip(nodes, groups, strict=True) if g == 1]
            moments = input_moments(fg, x_nhwc[:STAT_SAMPLES], names, progress, device)
        sens = sensitivities(fg, nodes, x_nhwc[:STAT_SAMPLES], device=device)
        options = []
        for n, w, grp in zip(nodes, ws, groups, strict=True):
            gm, s = moments.get(n.name), sens[n.name]
            opts = [_option("identity", w, gm, s)]
            if grp == 1 and w.shape[0] > 1:  # the factored form mixes channels: no groups
                opts.append(_option(transform, w, gm, s))
            options.append(opts)
        picks = allocate(options, ks, budget)
        info = {
            n.name: {
                "candidates": [o.kind for o in opts],
                "sensitivity": sens[n.name],
                "distortion": float(opts[i].dist[np.arange(len(b)), b].sum()),
            }
            for n, opts, (i, b) in zip(nodes, options, picks, strict=True)
        }
    codes = []
    for n, opts, (i, b) in zip(nodes, options, picks, strict=True):
        opt = opts[i]
        keep = np.arange(len(b)) if opt.kind == "identity" else np.nonzero(b > 0)[0]
        y = opt.y[keep]
        bits = b[keep].astype(np.int64)
        _, y_frac = quantize_rows(y, bits)
        u = opt.u[:, keep]
        code = LayerCode(
            n.name,
            n.op,
            tuple(n.params["weight"].shape),
            opt.kind,
            u,
            y,
            bits,
            y_frac,
            bias=np.asarray(n.params["bias"], dtype=np.float64),
        )
        if code.transformed:
            _, code.u_frac = quantize_rows(u, np.full(u.shape[0], MAX_BITS, dtype=np.int64))
        _zero_row_fracs(code)
        codes.append(code)
    return codes, info


def _zero_row_fracs(code: LayerCode) -> None:
    """Rows without bits (identity layers) take the finest step of their layer: the fractional
    length also sets the bias's precision in the accumulator."""
    live = code.bits > 0
    if (~live).any():
        code.y_frac = code.y_frac.copy()
        code.y_frac[~live] = int(code.y_frac[live].max()) if live.any() else 8


# ----------------------------------------------------------------------------- retraining


def _fq(v: torch.Tensor, frac: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Fake quantization with the straight-through estimator; rows with lo == -1 == -hi are the
    1-bit sign rows (no zero level)."""
    s = torch.exp2(frac)[:, None]
    x = v * s
    q = torch.floor(x + 0.5).clamp(lo[:, None], hi[:, None])
    sign = ((lo == -1) & (hi == 1))[:, None]
    q = torch.where(sign, torch.where(x >= 0, 1.0, -1.0), q)
    return v + (q / s - v).detach()


def _limits(bits: IntArray) -> tuple[torch.Tensor, torch.Tensor]:
    lims = [int_limits(int(b)) if b > 0 else (0, 0) for b in bits]
    return (
        torch.tensor([a for a, _ in lims], dtype=torch.float32),
        torch.tensor([b for _, b in lims], dtype=torch.float32),
    )


class _Coded(torch.nn.Module):
    """The float IR with every weighted layer computed from its fake-quantized code."""

    def __init__(self, fg: Graph, codes: list[LayerCode], device: torch.device | str = "cpu"):
        super().__init__()
        self.fg = fg
        self.codes = {c.name: c for c in codes}
        self.y = torch.nn.ParameterDict()
        self.u = torch.nn.ParameterDict()
        self.b = torch.nn.ParameterDict()
        self.fixed: dict[str, tuple[torch.Tensor, ...]] = {}
        for c in codes:
            key = c.name
            self.y[key] = torch.nn.Parameter(torch.tensor(c.y, dtype=torch.float32))
            self.b[key] = torch.nn.Parameter(torch.tensor(c.bias, dtype=torch.float32))
            lo, hi = _limits(c.bits)
            fixed = [torch.tensor(c.y_frac, dtype=torch.float32), lo, hi]
            if c.transformed:
                self.u[key] = torch.nn.Parameter(torch.tensor(c.u, dtype=torch.float32))
                ulo, uhi = _limits(np.full(c.o, MAX_BITS, dtype=np.int64))
                fixed += [torch.tensor(c.u_frac, dtype=torch.float32), ulo, uhi]
            self.fixed[key] = tuple(t.to(device) for t in fixed)

    def weight(self, name: str) -> torch.Tensor:
        f = self.fixed[name]
        y = _fq(self.y[name], f[0], f[1], f[2])
        if name in self.u:
            y = _fq(self.u[name], f[3], f[4], f[5]) @ y
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output, or the tuple of them for a model with several."""
        env = {self.fg.input: x}
        for node in self.fg.nodes:
            xs = [env[t] for t in node.inputs]
            if node.op in WEIGHTED_OPS:
                pre = _weighted(node, xs[0], self.weight(node.name), self.b[node.name])
            else:
                pre = simulate.eval_node(node, xs, {})
            lo, hi = node.attrs.get("clamp", (-math.inf, math.inf))
            env[node.output] = pre if (lo, hi) == (-math.inf, math.inf) else pre.clamp(lo, hi)
        outs = self.fg.outputs
        return env[outs[0]] if len(outs) == 1 else tuple(env[t] for t in outs)

    def export(self) -> None:
        """Write the trained latent values back into the codes."""
        for name, c in self.codes.items():
            c.y = self.y[name].detach().double().cpu().numpy()
            c.bias = self.b[name].detach().double().cpu().numpy()
            if name in self.u:
                c.u = self.u[name].detach().double().cpu().numpy()


def _weighted(node: Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if node.op == "dense":
        return F.linear(x, w, b)
    a = node.attrs
    w4 = w.reshape(node.params["weight"].shape).permute(0, 3, 1, 2)
    top, bottom, left, right = a["padding"]
    xp = F.pad(x, (left, right, top, bottom)) if any(a["padding"]) else x
    return F.conv2d(xp, w4, b, stride=a["stride"], dilation=a["dilation"], groups=a["groups"])


def retrain(
    fg: Graph,
    codes: list[LayerCode],
    train: TrainData,
    *,
    epochs: int,
    seed: int = 0,
    lr: float = 3e-4,
    batch: int = 128,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """Adam on the fake-quantized codes (bit depths and steps fixed, cosine-decayed LR); the
    codes are updated in place. Returns the loss and accuracy of each epoch. `train` is arrays
    (x, y), a Dataset or a DataLoader; under torchrun, DistributedDataParallel (see `fit`).
    With several outputs the labels are a tuple with one entry per output and the loss is the
    sum of the labelled outputs' cross entropies (an output whose labels are None adds nothing:
    there is no teacher)."""
    model = _Coded(fg, codes, device).to(device)
    history: list[dict[str, float]] = []
    x, y = train if isinstance(train, tuple) else (train, None)
    fit(
        model,
        x,
        y,
        epochs=epochs,
        batch=batch,
        lr=lr,
        seed=seed,
        progress=progress,
        schedule="cosine",
        desc="transform retraining",
        history=history,
        device=device,
    )
    model.export()
    return history


# ----------------------------------------------------------------------------- deployment


def _flash(o: int, k: int, q: IntArray) -> int:
    """Flash bytes of one deployed weighted node: weights (packed at 2 or 4 bits when they fit),
    an int32 bias and an int8 shift per output channel."""
    b = storage_bits(q)
    stored = 2 if b <= 2 else 4 if b <= 4 else 8
    return -(-o * k * stored // 8) + 5 * o


def deployment_costs(c: LayerCode, out_pixels: int) -> dict[str, dict[str, int]]:
    """Flash bytes and MACs of a transformed layer, factored and reconstructed."""
    qy, qu = c.quantized()
    r = qy.shape[0]
    assert qu is not None
    w8 = quantize_rows(c.reconstructed(), np.full(c.o, MAX_BITS, dtype=np.int64))[0]
    return {
        "factored": {
            "flash_bytes": _flash(r, c.k, qy) + _flash(c.o, r, qu),
            "macs": out_pixels * (r * c.k + c.o * r),
        },
        "reconstructed": {"flash_bytes": _flash(c.o, c.k, w8), "macs": out_pixels * c.o * c.k},
    }


def _deployed_graph(
    fg: Graph, codes: list[LayerCode], deploy: str
) -> tuple[Graph, dict[str, tuple[IntArray, IntArray]], dict[str, str], dict[str, dict[str, Any]]]:
    """The float graph as deployed (split factored layers, dequantized weights), the integer
    weights and fractional lengths of its weighted nodes, their original layer, and the report."""
    by_name = {c.name: c for c in codes}
    nodes: list[Node] = []
    tensors = dict(fg.tensors)
    ints: dict[str, tuple[IntArray, IntArray]] = {}
    origin: dict[str, str] = {}
    report: dict[str, dict[str, Any]] = {}
    for n in fg.nodes:
        c = by_name.get(n.name)
        if c is None:
            nodes.append(n)
            continue
        out_shape = fg.tensors[n.output].shape
        pixels = int(np.prod(out_shape[:-1])) if n.op == "conv2d" else 1
        qy, qu = c.quantized()
        if not c.transformed:
            w = dequantize_rows(qy, c.y_frac)
            nodes.append(_with_weight(n, w.reshape(c.shape), c.bias, n.attrs))
            ints[n.name] = (qy.reshape(c.shape), c.y_frac)
            origin[n.name] = n.name
            flash = _flash(c.o, c.k, qy)
            report[n.name] = {
                "deploy": "direct",
                "flash_bytes": {"direct": flash},
                "macs": {"direct": pixels * c.o * c.k},
                "deployed_weight_bits": _stored(qy),
            }
            continue
        assert qu is not None
        costs = deployment_costs(c, pixels)
        how = deploy
        if how == "auto":
            f, r_ = costs["factored"]["flash_bytes"], costs["reconstructed"]["flash_bytes"]
            how = "factored" if f < r_ else "reconstructed"
        r = qy.shape[0]
        if how == "reconstructed" or r == 0:
            how = "reconstructed"
            w8, f8 = quantize_rows(c.reconstructed(), np.full(c.o, MAX_BITS, dtype=np.int64))
            nodes.append(_with_weight(n, dequantize_rows(w8, f8).reshape(c.shape), c.bias, n.attrs))
            ints[n.name] = (w8.reshape(c.shape), f8)
            origin[n.name] = n.name
            stored = _stored(w8)
        else:
            coef = f"{n.name}_coef"
            t = f"{n.output}_coef"
            tensors[t] = Tensor(t, (*out_shape[:-1], r))
            attrs_a = dict(n.attrs) | {"clamp": (-math.inf, math.inf)}
            a = Node(coef, n.op, n.inputs, t, attrs_a, {})
            wa = dequantize_rows(qy, c.y_frac).reshape((r, *c.shape[1:]))
            nodes.append(_with_weight(a, wa, np.zeros(r), attrs_a))
            ints[coef] = (qy.reshape((r, *c.shape[1:])), c.y_frac)
            origin[coef] = n.name
            if n.op == "conv2d":
                attrs_b = {
                    "stride": (1, 1),
                    "padding": (0, 0, 0, 0),
                    "dilation": (1, 1),
                    "groups": 1,
                    "clamp": n.attrs.get("clamp", (-math.inf, math.inf)),
                }
                shape_b: tuple[int, ...] = (c.o, 1, 1, r)
            else:
                attrs_b = {"clamp": n.attrs.get("clamp", (-math.inf, math.inf))}
                shape_b = (c.o, r)
            b = Node(n.name, n.op, (t,), n.output, attrs_b, {})
            nodes.append(
                _with_weight(b, dequantize_rows(qu, c.u_frac).reshape(shape_b), c.bias, attrs_b)
            )
            ints[n.name] = (qu.reshape(shape_b), c.u_frac)
            origin[n.name] = n.name
            stored = _stored(qy) + _stored(qu)
        report[n.name] = {
            "deploy": how,
            "flash_bytes": {k: v["flash_bytes"] for k, v in costs.items()},
            "macs": {k: v["macs"] for k, v in costs.items()},
            "deployed_weight_bits": stored,
        }
    return fg.with_nodes(tuple(nodes), tensors), ints, origin, report


def _stored(q: IntArray) -> int:
    b = storage_bits(q)
    return int(q.size) * (2 if b <= 2 else 4 if b <= 4 else 8)


def _with_weight(n: Node, w: FloatArray, b: FloatArray, attrs: Mapping[str, Any]) -> Node:
    return Node(n.name, n.op, n.inputs, n.output, dict(attrs), {"weight": w, "bias": b})


def lower(
    fg: Graph,
    codes: list[LayerCode],
    x_nhwc: np.ndarray,
    accs: Mapping[str, int],
    policy: Policy,
    deploy: str,
    progress: bool,
    device: torch.device | str = "cpu",
) -> tuple[Graph, dict[str, dict[str, Any]]]:
    """The integer graph: activation formats calibrated on the deployed float graph (widest
    widths: 8 bits signed, 7 unsigned), weights frozen at their codes, bias in accumulator units.
    An input width is narrowed only if the exact bound does not fit the accumulator."""
    dg, ints, origin, report = _deployed_graph(fg, codes, deploy)
    cal = calibrate(dg, x_nhwc, progress, device)
    classes = tensor_classes(dg)
    infos = class_infos(dg, classes, cal)
    bits = {c: info.max_bits for c, info in infos.items()}
    acc = {name: accs[origin[name]] for name in ints}
    while True:
        fmts = {t: infos[classes.find(t)].fmt(bits[classes.find(t)]) for t in dg.tensors}
        weights, bad = _weight_quants(dg, ints, fmts, acc, policy)
        if bad is None:
            break
        cls = classes.find(dg.node(bad).inputs[0])
        if bits[cls] <= 2:
            raise InfeasibleAccumulatorError(
                f"layer '{origin[bad]}' coded by the transform does not fit a {acc[bad]}-bit "
                "accumulator even with 2-bit inputs; use acc_bits=32"
            )
        bits[cls] -= 1
    graph = build_integer_graph(dg, fmts, weights, acc)
    nodes = []
    for n in graph.nodes:
        if n.name in ints:
            attrs = dict(n.attrs) | {"weight_bits": storage_bits(n.params["weight"])}
            n = Node(n.name, n.op, n.inputs, n.output, attrs, n.params, n.requant)
        nodes.append(n)
    return graph.with_nodes(tuple(nodes), graph.tensors), report


def _weight_quants(
    dg: Graph,
    ints: Mapping[str, tuple[IntArray, IntArray]],
    fmts: Mapping[str, QFormat],
    acc: Mapping[str, int],
    policy: Policy,
) -> tuple[dict[str, WeightQuant], str | None]:
    """WeightQuant of every weighted node at its frozen integers, or the first node whose exact
    bound leaves the accumulator (both policies check the exact bound)."""
    out: dict[str, WeightQuant] = {}
    for n in dg.nodes:
        if n.name not in ints:
            continue
        q, frac = ints[n.name]
        fi = fmts[n.inputs[0]]
        bias = round_half_up(
            np.asarray(n.params["bias"]) * np.exp2((frac + fi.frac).astype(np.float64))
        )
        lo, hi = channel_bounds(q, bias, fi.qmin - fi.zero_point, fi.qmax - fi.zero_point)
        alo, ahi = acc_limits(acc[n.name])
        if lo.min(initial=0) < alo or hi.max(initial=0) > ahi:
            return out, n.name
        out[n.name] = WeightQuant(q, frac, bias, fi.frac, lo, hi)
    return out, None
