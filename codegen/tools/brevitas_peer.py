"""Brevitas's accumulator-aware PTQ (AXE) and training (A2Q+) as peers in `qacc sweep`.

AXE (Colbert et al., "Accumulator-Aware Post-Training Quantization", 2024) constrains GPFQ's or
GPTQ's weight rounding so that every output channel's integer dot product fits a signed
accumulator of A bits for any input in the input format. The recipe is the one of Brevitas's own
ImageNet PTQ example (brevitas_examples/imagenet_classification/ptq): graph preprocessing (BN
merged, 20 iterations of graph equalization), `quantize_model` with the fx backend, W8A8 by default
integer quantization with float scales (per-channel weights, per-tensor symmetric activations,
unsigned after ReLU, 32-bit bias), activation calibration, then `apply_gpfq` (or `apply_gptq`,
with quantized activations, which its AXE needs for the input range) with
`max_accumulator_bit_width=A`, then bias correction. Every layer is constrained (the
example's filter only frees a 3-channel first layer and a 1000-way classifier). The example's
graph quantizer is given qacc's formats where its defaults would cost Brevitas a bit that qacc
keeps (`_graph_quantize`, shared with A2Q+): `torch.relu` becomes a ReLU module (an unsigned
`QuantReLU`, where Brevitas would quantize a residual add's output as signed before the ReLU,
and graph equalization sees through it), a quantizer whose input is never negative (images in
[0, 1], a global pooling of ReLU outputs) is unsigned, and the logits get 8 bits, not the
activation bits. The example's other options stay at its defaults: no activation equalization,
no act-order, no learned rounding, statistics (not MSE) for the scales.

The accuracy is that of Brevitas's fake-quantized torch model (float scales, no integer
requantization), on the images given; AXE's bound covers the weights only (no bias), per
Brevitas. With several (weight, activation) pairs, each width keeps the pair of best accuracy on
the test images, as the AXE paper plots the Pareto frontier of accuracy against accumulator width
over a grid of weight and activation widths: at a narrow accumulator, 8-bit inputs leave AXE
almost no L1 budget for the weights, and fewer bits do better.

A2Q+ (Colbert et al., "A2Q+: Improving Accumulator-Aware Weight Quantization", 2024) is the peer of
qacc's adaptive training: the float network quantized by Brevitas's fx graph quantizer with its
A2Q+ weight quantizer (`Int8AccumulatorAwareZeroCenterWeightQuant`: learned per-channel scales,
weights zero-centred per channel, their L1 norm capped for the accumulator width, rounded toward
zero) on every conv and linear layer, learned per-tensor activation scales (input and hidden,
unsigned after ReLU and for non-negative images; 8-bit logits), 32-bit biases; BN stays a
float layer during training, as in Brevitas's A2Q examples (folding it afterwards scales each
channel's float scale and bias, not its integer weights, so the accumulator bound is unchanged;
it also absorbs the mean that zero-centring removes). Initialised as in Brevitas's A2Q+
CIFAR-10 example (`brevitas_examples/imagenet_classification/a2q`): from the float weights,
EP-init (the weights' Euclidean projection onto the L1 budget), activation calibration, bias
correction; then trained with that example's penalty on norms above the cap, in qacc's training
loop with qacc's adaptive budget (same images, epochs, batch, Adam and learning-rate schedule,
distillation from the float network). `a2q` is the same with Brevitas's A2Q quantizer (no
zero-centring, half the L1 budget): zero-centring changes what a trained filter computes, which
A2Q+ must then win back by training. Brevitas is an optional dependency: `pip install '.[peers]'`.
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
from codegen.quant.adaptive import DEFAULT_LR, DEFAULT_WARMUP

ALGORITHMS = ("gpfq", "gptq")
"""Brevitas's AXE PTQ algorithms."""
QAT = ("a2q+", "a2q")
"""Brevitas's accumulator-aware training: A2Q+ (zero-centred weights, twice A2Q's L1 budget) and
A2Q (the weights as they are)."""
PEERS = (*ALGORITHMS, *QAT)
A2Q_PENALTY = 1e-3
"""Weight of the A2Q penalty on norms above the accumulator cap (Brevitas's A2Q+ example)."""
BREVITAS_VERSION = "0.13.4"
BATCH = 250
NOTE = (
    "Brevitas rows (brevitas-axe-*): accuracy of Brevitas's fake-quantized model (float "
    "scales: per-channel weights, per-tensor activations; bits (in/w) for every layer, the best "
    "on the test images of the pairs tried, which the bits column lists when there are several), "
    "AXE-constrained weights for the accumulator width (bias not counted), same calibration "
    "images; not an integer run."
)
QAT_NOTE = (
    "Brevitas A2Q+ / A2Q rows (brevitas-a2q+, brevitas-a2q): accuracy of Brevitas's "
    "fake-quantized model (float scales: per-channel weights, per-tensor activations, the same "
    "bits (in/w) as adaptive for every layer) trained with A2Q+ (A2Q) weights for the "
    "accumulator width (bias not counted) from the float weights with EP-init, with the adaptive "
    "rows' images, epochs and optimiser; not an integer run."
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
        if a not in PEERS:
            raise QaccError(f"unknown Brevitas peer '{a}'; choose from {', '.join(PEERS)}")
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
    loader = _batches(calib)
    torch.manual_seed(0)
    with _quiet(), torch.no_grad():
        qmodel = _graph_quantize(
            net, _axe_maps(weight_bits, act_bits), act_bits, loader[0][0],
            equalize_iters=equalize_iters, merge_bn=True,
        )  # fmt: skip
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


def _axe_maps(weight_bits: int, act_bits: int) -> dict[str, Any]:
    """Brevitas fx quantizer's layer maps of its ImageNet PTQ example (`quantize_model` with the
    fx backend and the example's defaults): integer formats with float scales, per-channel
    symmetric weights (scales from their statistics), per-tensor symmetric activations (99.999th
    percentile, unsigned where Brevitas knows them non-negative), 32-bit bias."""
    layers, _, acts, identities = _brevitas().create_quant_maps(
        dtype=torch.float32, device="cpu", bias_bit_width=32,
        weight_bit_width=weight_bits, weight_param_method="stats",
        weight_scale_type="float_scale", weight_quant_type="sym",
        weight_quant_granularity="per_channel", weight_narrow_range=False,
        weight_quant_format="int", act_quant_format="int", uint_sym_act_for_unsigned_values=True,
        act_bit_width=act_bits, act_scale_type="float_scale", act_scale_computation_type="static",
        act_param_method="stats", act_quant_type="sym", act_quant_granularity="per_tensor",
        act_quant_percentile=99.999,
    )  # fmt: skip
    return {"compute_layer_map": layers, "quant_act_map": acts, "quant_identity_map": identities}


def _graph_quantize(
    net: nn.Module,
    maps: dict[str, Any],
    act_bits: int,
    x: torch.Tensor,
    *,
    equalize_iters: int,
    merge_bn: bool,
) -> Any:
    """A float copy of `net` through Brevitas's fx graph quantizer with `maps`, as both peers use
    it: traced, `torch.relu` made a ReLU module (so that it becomes Brevitas's unsigned
    `QuantReLU` and graph equalization sees through it, as it does through `nn.ReLU`),
    preprocessed (BN merged if `merge_bn`, `equalize_iters` iterations of graph equalization),
    quantized, then qacc's input and logit formats (`_formats`, seen on `x`)."""
    from brevitas.fx import symbolic_trace
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas.graph.quantize import quantize as fx_quantize
    from brevitas.graph.standardize import TorchFunctionalToModule

    model = symbolic_trace(copy.deepcopy(net).float().eval())
    model = TorchFunctionalToModule(((torch.relu, nn.ReLU), (torch.relu_, nn.ReLU))).apply(model)
    model = preprocess_for_quantize(
        model, trace_model=False, equalize_iters=equalize_iters, equalize_merge_bias=True,
        merge_bn=merge_bn,
    )  # fmt: skip
    qmodel = fx_quantize(model, **maps)
    qmodel.eval()
    _formats(qmodel, maps, act_bits, x)
    return qmodel


def notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table notes that the Brevitas rows among `rows` need."""
    methods = {r["method"] for r in rows if r.get("peer")}
    qat = {method_name(q) for q in QAT}
    return ([NOTE] if methods - qat else []) + ([QAT_NOTE] if methods & qat else [])


def method_name(peer: str) -> str:
    """The sweep's method name of a Brevitas peer."""
    return f"brevitas-{peer}" if peer in QAT else f"brevitas-axe-{peer}"


def _a2q_maps(acc_bits: int, weight_bits: int, act_bits: int, plus: bool) -> dict[str, Any]:
    """Brevitas fx quantizer's layer maps for A2Q+ (A2Q if not `plus`): its A2Q+ CIFAR-10
    example's quantizers (A2Q+ weights, learned log-domain activation scales) at the given bits,
    on every layer."""
    import brevitas.nn as qnn
    from brevitas.core.restrict_val import RestrictValueType
    from brevitas.quant import (
        Int8AccumulatorAwareWeightQuant,
        Int8AccumulatorAwareZeroCenterWeightQuant,
        Int8ActPerTensorFloat,
        Int32Bias,
        Uint8ActPerTensorFloat,
    )

    a2q = Int8AccumulatorAwareZeroCenterWeightQuant if plus else Int8AccumulatorAwareWeightQuant
    weight = a2q.let(
        bit_width=weight_bits,
        accumulator_bit_width=acc_bits,
        scaling_min_val=1e-8,
        pre_scaling_min_val=1e-8,
    )
    act = {"bit_width": act_bits, "restrict_scaling_type": RestrictValueType.LOG_FP}
    signed = {"act_quant": Int8ActPerTensorFloat.let(**act), "return_quant_tensor": True}
    unsigned = {"act_quant": Uint8ActPerTensorFloat.let(**act), "return_quant_tensor": True}
    layer = {"weight_quant": weight, "bias_quant": Int32Bias, "return_quant_tensor": False}
    return {
        "compute_layer_map": {
            nn.Conv2d: (qnn.QuantConv2d, layer),
            nn.Linear: (qnn.QuantLinear, layer),
        },
        "quant_act_map": {nn.ReLU: (qnn.QuantReLU, unsigned)},
        "quant_identity_map": {
            "signed": (qnn.QuantIdentity, signed),
            "unsigned": (qnn.QuantIdentity, unsigned),
        },
    }


def _formats(qmodel: Any, maps: dict[str, Any], act_bits: int, x: torch.Tensor) -> None:
    """Brevitas's graph quantizer quantizes the network input, and a layer input it inserts (after
    a global pooling), as signed, and the logits at the activation bits. As in qacc's adaptive
    method, a quantizer whose input is never negative (on `x`: images in [0, 1], the pooled
    output of a ReLU) becomes unsigned, so that no code is wasted on a sign, and the logits get 8
    bits (4-bit logits would tie)."""
    cls, signed = maps["quant_identity_map"]["signed"]
    unsigned = maps["quant_identity_map"]["unsigned"][1]
    lowest: dict[str, float] = {}

    def seen(name: str) -> Any:
        def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            v = getattr(inputs[0], "value", inputs[0])  # a QuantTensor's float values
            lowest[name] = min(lowest.get(name, 0.0), float(v.min()))

        return hook

    handles = [
        m.register_forward_pre_hook(seen(n))
        for n, m in qmodel.named_modules()
        if isinstance(m, cls)
    ]
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in handles:
            h.remove()
    outputs = {n.target for o in qmodel.graph.nodes if o.op == "output" for n in o.all_input_nodes}
    for name in lowest:
        if name in outputs:
            kwargs = {"act_quant": signed["act_quant"].let(bit_width=max(8, act_bits))}
            qmodel.add_submodule(name, cls(**kwargs, return_quant_tensor=False))
        elif lowest[name] >= 0:
            qmodel.add_submodule(name, cls(**unsigned))


def a2q_model(
    net: nn.Module,
    calib: np.ndarray,
    acc_bits: int,
    *,
    peer: str = "a2q+",
    weight_bits: int = 4,
    act_bits: int = 4,
    merge_bn: bool = False,
    bias_correction: bool = True,
) -> nn.Module:
    """Brevitas's A2Q+ (`peer="a2q"`: A2Q) fake-quant copy of `net` for an `acc_bits`
    accumulator, before training: A2Q+ weights and quantized activations on every layer (BN kept
    as a float layer unless `merge_bn`), EP-init, activations calibrated and biases corrected on
    `calib` (the order of Brevitas's A2Q+ example)."""
    check([peer], [(weight_bits, act_bits)])
    if peer not in QAT:
        raise QaccError(f"'{peer}' is not a Brevitas training peer: {', '.join(QAT)}")
    ptq = _brevitas()
    from brevitas_examples.imagenet_classification.a2q.ep_init import apply_ep_init

    loader = _batches(calib)
    maps = _a2q_maps(acc_bits, weight_bits, act_bits, plus=peer == "a2q+")
    torch.manual_seed(0)
    with _quiet():
        qmodel = _graph_quantize(
            net, maps, act_bits, loader[0][0], equalize_iters=0, merge_bn=merge_bn
        )
        with torch.no_grad():
            qmodel(loader[0][0])  # initialises the scale factors
        apply_ep_init(qmodel, loader[0][0])
        ptq.calibrate(loader, qmodel)
        if bias_correction:
            ptq.apply_bias_correction(loader, qmodel)
    return qmodel


class _A2QPenalty:
    """Brevitas's A2Q regulariser: the amount by which each constrained channel's learned norm
    parameter g exceeds its cap T * s (where the clamp stops its gradient), summed over the
    forward passes that record a graph since the last call."""

    def __init__(self, qmodel: nn.Module):
        from brevitas.core.scaling import AccumulatorAwareParameterPreScaling

        self.total: torch.Tensor | float = 0.0
        self.handles = [
            m.register_forward_hook(self._hook)
            for m in qmodel.modules()
            if isinstance(m, AccumulatorAwareParameterPreScaling)
        ]

    def _hook(self, module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
        from brevitas.function import abs_binary_sign_grad

        if not torch.is_grad_enabled():
            return
        weights, in_bits, in_signed = inputs
        s = module.scaling_impl(weights)
        g = abs_binary_sign_grad(module.restrict_clamp_scaling(module.value))
        cap = module.calc_max_l1_norm(in_bits, in_signed)
        self.total = self.total + torch.relu(g - cap * s).sum()

    def __call__(self) -> torch.Tensor:
        total, self.total = self.total, 0.0
        return A2Q_PENALTY * torch.as_tensor(total)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def train_a2q(
    qmodel: nn.Module,
    net: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    epochs: int,
    *,
    lr: float,
    distill: bool,
    progress: bool = False,
    on_epoch: Any = None,
) -> list[dict[str, float]]:
    """Train the A2Q+ model in qacc's adaptive training loop (Adam, the adaptive method's warm-up
    and cosine decay, batch 128, distillation from `net` if `distill`), with Brevitas's A2Q
    penalty; the per-epoch history."""
    from codegen.quant.training import fit

    teacher = copy.deepcopy(net).float().eval()
    penalty = _A2QPenalty(qmodel)
    history: list[dict[str, float]] = []
    try:
        with _quiet():
            fit(
                qmodel,
                train[0],
                train[1],
                epochs,
                lr=lr,
                progress=progress,
                schedule="cosine",
                warmup=DEFAULT_WARMUP,
                desc="brevitas A2Q",
                history=history,
                teacher=teacher if distill else None,
                penalty=penalty,
                on_epoch=on_epoch,
            )
    finally:
        penalty.remove()
    return history


def run_a2q(
    net: nn.Module,
    calib: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    acc_bits: int,
    *,
    peer: str = "a2q+",
    weight_bits: int = 4,
    act_bits: int = 4,
    epochs: int = 2,
    lr: float = DEFAULT_LR,
    distill: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """One sweep row: Brevitas A2Q+ trained at `acc_bits`, its fake-quant test accuracy after
    every epoch and at the end."""
    t0 = time.time()
    x, y = test
    qmodel = a2q_model(net, calib, acc_bits, peer=peer, weight_bits=weight_bits, act_bits=act_bits)

    def test_accuracy() -> dict[str, float]:
        return {"test_accuracy": float(np.mean(predict(qmodel, x).argmax(axis=1) == y))}

    history = train_a2q(
        qmodel, net, train, epochs, lr=lr, distill=distill, progress=progress,
        on_epoch=test_accuracy,
    )  # fmt: skip
    qmodel.eval()
    return {
        "method": method_name(peer),
        "policy": "fake-quant",
        "acc_bits": acc_bits,
        "accuracy": test_accuracy()["test_accuracy"],
        "bits": f"{act_bits}/{weight_bits}",
        "weight_bits": weight_bits,
        "activation_bits": act_bits,
        "epochs": epochs,
        "lr": lr,
        "distill": distill,
        "history": [
            {"epoch": int(h["epoch"]), "train_loss": h["loss"], "test_accuracy": h["test_accuracy"]}
            for h in history
        ],
        "peer": f"brevitas {BREVITAS_VERSION}",
        "seconds": round(time.time() - t0, 1),
    }


def predict(qmodel: nn.Module, x: np.ndarray) -> np.ndarray:
    """The fake-quantized model's logits, N x classes."""
    with torch.no_grad():
        return np.concatenate([qmodel(b).detach().numpy() for b, _ in _batches(x)])


def layer_bounds(qmodel: nn.Module, x: np.ndarray) -> list[dict[str, Any]]:
    """Per quantized conv/linear layer, what AXE constrains: the integer weights as a
    (groups, out/groups, K) array and the integer range [lo, hi] of the layer's input, seen on
    a forward pass over `x`."""
    import brevitas.nn as qnn

    seen: dict[str, Any] = {}
    layers = {
        n: m for n, m in qmodel.named_modules() if isinstance(m, qnn.QuantConv2d | qnn.QuantLinear)
    }

    def hook(name: str) -> Any:
        def f(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            seen[name] = inputs[0]

        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        predict(qmodel, x[:2])
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, m in layers.items():
        q = seen[name]  # A2Q's weights depend on their input's format
        w = m.quant_weight(quant_input=q).int().detach().numpy().astype(np.int64)
        groups = getattr(m, "groups", 1)
        bits, signed = int(q.bit_width), bool(q.signed)
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
        "method": method_name(algorithm),
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
