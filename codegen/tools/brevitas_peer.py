"""Brevitas's accumulator-aware PTQ (AXE) as a peer of qacc's PTQ in `qacc sweep`.

AXE (Colbert et al., "Accumulator-Aware Post-Training Quantization", 2024) constrains GPFQ's or
GPTQ's weight rounding so that every output channel's integer dot product fits a signed
accumulator of A bits for any input in the input format. The recipe is the one of Brevitas's own
ImageNet PTQ example (brevitas_examples/imagenet_classification/ptq): graph preprocessing (BN
merged, 20 iterations of graph equalization), `quantize_model` with the fx backend, W8A8 by default
integer quantization with float scales (per-channel weights, per-tensor symmetric activations,
unsigned after ReLU, 32-bit bias), activation calibration, then `apply_gpfq` (or `apply_gptq`,
with quantized activations, which its AXE needs for the input range) with
`max_accumulator_bit_width=A`, then bias correction. Every layer is constrained (the
example's filter only frees a 3-channel first layer and a 1000-way classifier).

The accuracy is that of Brevitas's fake-quantized torch model (float scales, no integer
requantization), on the images given; AXE's bound covers the weights only (no bias), per
Brevitas. With several (weight, activation) pairs, each width keeps the pair of best accuracy on
the test images, as the AXE paper plots the Pareto frontier of accuracy against accumulator width
over a grid of weight and activation widths: at a narrow accumulator, 8-bit inputs leave AXE
almost no L1 budget for the weights, and fewer bits do better. Brevitas is an optional dependency:
`pip install '.[peers]'`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from codegen.core.errors import QaccError

ALGORITHMS = ("gpfq", "gptq")
BREVITAS_VERSION = "0.13.4"
BATCH = 250
NOTE = (
    "Brevitas rows (brevitas-axe-*): accuracy of Brevitas's fake-quantized model (float "
    "scales: per-channel weights, per-tensor activations; bits (in/w) for every layer, the best "
    "on the test images of the pairs tried, which the bits column lists when there are several), "
    "AXE-constrained weights for the accumulator width (bias not counted), same calibration "
    "images; not an integer run."
)


class PeerMissingError(QaccError):
    """The optional peer library is not installed."""


def _brevitas() -> Any:
    """Brevitas's example PTQ module (it imports brevitas), or a one-line error."""
    try:
        with _quiet():  # its import warns about optional kernels it does not need here
            from brevitas_examples.imagenet_classification.ptq import ptq_common
    except ImportError as e:
        raise PeerMissingError(
            f"the Brevitas peer needs brevitas {BREVITAS_VERSION} ({e}): pip install '.[peers]'"
        ) from None
    return ptq_common


def check(algorithms: Sequence[str], bits: Sequence[Sequence[int]] = ((8, 8),)) -> None:
    """Fail early, in one line, on an unknown algorithm, bad bits or a missing Brevitas; `bits`
    holds (weight, activation) pairs."""
    if not bits:
        raise QaccError("give at least one WEIGHT,ACTIVATION pair of Brevitas bits")
    for pair in bits:
        if len(pair) != 2 or not all(2 <= b <= 16 for b in pair):
            raise QaccError(
                f"Brevitas bits are WEIGHT,ACTIVATION bits, each 2..16, got {list(pair)}"
            )
    for a in algorithms:
        if a not in ALGORITHMS:
            raise QaccError(
                f"unknown Brevitas AXE algorithm '{a}'; choose from {', '.join(ALGORITHMS)}"
            )
    if algorithms:
        _brevitas()


def _batches(x: np.ndarray, batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A calibration 'loader' in the shape Brevitas's helpers iterate: (images, target) pairs."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return [(t[i : i + batch], torch.zeros(0)) for i in range(0, len(t), batch)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Brevitas's helpers print tqdm bars and warnings; keep the sweep's log readable."""
    import warnings

    with (
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def quantize(
    net: nn.Module,
    calib: np.ndarray,
    acc_bits: int,
    *,
    algorithm: str = "gpfq",
    weight_bits: int = 8,
    act_bits: int = 8,
    equalize_iters: int = 20,
) -> nn.Module:
    """Brevitas's AXE-quantized (fake-quant) copy of `net` for an `acc_bits` accumulator,
    calibrated on `calib` (N x C x H x W float). `net` itself is left untouched."""
    check([algorithm], [(weight_bits, act_bits)])
    ptq = _brevitas()
    from brevitas.graph.quantize import preprocess_for_quantize

    loader = _batches(calib)
    torch.manual_seed(0)
    with _quiet(), torch.no_grad():
        model = copy.deepcopy(net).float().eval()
        model = preprocess_for_quantize(
            model, equalize_iters=equalize_iters, equalize_merge_bias=True, merge_bn=True
        )
        qmodel = ptq.quantize_model(
            model,
            backend="fx",
            weight_bit_width=weight_bits,
            act_bit_width=act_bits,
            bias_bit_width=32,
            weight_quant_granularity="per_channel",
            act_quant_percentile=99.999,
            act_quant_type="sym",
            scale_factor_type="float_scale",
            quant_format="int",
        )
        qmodel.eval()
        qmodel(loader[0][0])  # initialises the scale factors, as the example does
        ptq.calibrate(loader, qmodel)
        if algorithm == "gpfq":
            ptq.apply_gpfq(loader, qmodel, act_order=False, max_accumulator_bit_width=acc_bits)
        else:  # AXE bounds each layer by its quantized input's range: quantized activations
            ptq.apply_gptq(
                loader,
                qmodel,
                act_order=False,
                use_quant_activations=True,
                max_accumulator_bit_width=acc_bits,
            )
        ptq.apply_bias_correction(loader, qmodel)
    return qmodel


def predict(qmodel: nn.Module, x: np.ndarray) -> np.ndarray:
    """The fake-quantized model's logits, N x classes."""
    with torch.no_grad():
        return np.concatenate([qmodel(b).detach().numpy() for b, _ in _batches(x)])


def layer_bounds(qmodel: nn.Module, x: np.ndarray) -> list[dict[str, Any]]:
    """Per quantized conv/linear layer, what AXE constrains: the integer weights as a
    (groups, out/groups, K) array and the integer range [lo, hi] of the layer's input, seen on
    a forward pass over `x`."""
    import brevitas.nn as qnn

    seen: dict[str, tuple[int, bool]] = {}
    layers = {
        n: m for n, m in qmodel.named_modules() if isinstance(m, qnn.QuantConv2d | qnn.QuantLinear)
    }

    def hook(name: str) -> Any:
        def f(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            q = inputs[0]
            seen[name] = (int(q.bit_width), bool(q.signed))

        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        predict(qmodel, x[:2])
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, m in layers.items():
        w = m.quant_weight().int().detach().numpy().astype(np.int64)
        groups = getattr(m, "groups", 1)
        bits, signed = seen[name]
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        out.append(
            {"name": name, "weights": w.reshape(groups, w.shape[0] // groups, -1), "in": (lo, hi)}
        )
    return out


def run(
    net: nn.Module,
    calib: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    acc_bits: int,
    *,
    algorithm: str = "gpfq",
    bits: Sequence[Sequence[int]] = ((8, 8),),
) -> dict[str, Any]:
    """One sweep row: Brevitas AXE at `acc_bits` with each (weight, activation) pair of `bits`,
    the pair of best fake-quant accuracy on `test` (the AXE paper's Pareto frontier over bit
    widths); every pair's accuracy is in the row's "tried"."""
    t0 = time.time()
    x, y = test
    tried: list[tuple[float, int, int]] = []  # (accuracy, weight bits, activation bits)
    for w_b, a_b in bits:
        qmodel = quantize(net, calib, acc_bits, algorithm=algorithm, weight_bits=w_b, act_bits=a_b)
        tried.append((float(np.mean(predict(qmodel, x).argmax(axis=1) == y)), w_b, a_b))
    acc, w_best, a_best = max(tried, key=lambda t: t[0])  # the first of equal accuracy
    return {
        "method": f"brevitas-axe-{algorithm}",
        "policy": "fake-quant",
        "acc_bits": acc_bits,
        "accuracy": acc,
        "bits": f"{a_best}/{w_best}",
        "weight_bits": w_best,
        "activation_bits": a_best,
        "tried": [{"bits": f"{a}/{w}", "accuracy": t} for t, w, a in tried],
        "peer": f"brevitas {BREVITAS_VERSION}",
        "seconds": round(time.time() - t0, 1),
    }
