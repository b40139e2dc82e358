"""The public Python API: `codegen.quantize(...)` and the `QuantizedModel` it returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, cast

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset

from codegen.core import reference, simulate
from codegen.core.errors import (
    InvalidDataError,
    InvalidModelError,
    QaccError,
)
from codegen.core.formats import IntArray, dequantize
from codegen.core.ir import WEIGHTED_OPS, Graph, macs, terms_per_output
from codegen.core.reference import RunResult, quantize_images
from codegen.frontend.torch_fx import from_torch
from codegen.quant import distributed as ddp
from codegen.quant.accumulator import POLICIES, Policy, channel_bounds, tile_bounds
from codegen.quant.adaptive import DEFAULT_DISTILL, DEFAULT_INIT, DEFAULT_LR
from codegen.quant.distributed import resolve_device
from codegen.quant.equalize import ADAPTIVE_CLE, DEFAULT_CLE, check_cle, equalize
from codegen.quant.ptq import DEFAULT_CLIP, PTQResult, check_clip, fakequant_overrides, search
from codegen.quant.rounding import DEFAULT_ROUNDING, check_rounding
from codegen.quant.training import TrainData
from codegen.targets.compiled import compile as compile

METHODS = ("ptq", "adaptive", "transform")


@dataclass
class QuantizedModel:
    """An integer graph plus everything needed to run it as its users see it (NCHW floats)."""

    name: str
    graph: Graph
    float_graph: Graph
    method: str
    policy: str
    report: dict[str, Any] = field(default_factory=dict)

    # -- conversions between the user's float NCHW data and the integer graph's NHWC ints
    # (a 1-D sequence model takes and gives (N, C, L) floats and (N, L, C) ints: the IR's
    # (N, 1, L, C) images without H)
    def quantize_input(self, x: np.ndarray) -> IntArray:
        """Float inputs (N x C x H x W, N x C x L or N x F) to ints in the input format, in the
        C's memory order (NHWC, NLC, NF)."""
        x = to_ir_input(_check_images(x, self.float_graph, "inputs"), self.graph)
        return self._user_int(quantize_images(x, self.graph), self.graph.input)

    def dequantize_output(self, q: Any) -> Floats:
        """The outputs' ints (as `reference_int` gives them: a tuple for several outputs) to
        floats in the framework's layout."""
        qs = self._outputs_arg(q, "dequantize_output")
        return _packed(
            tuple(
                self._dequantize(np.asarray(v), t)
                for v, t in zip(qs, self.graph.outputs, strict=True)
            )
        )

    def _dequantize(self, q: np.ndarray, tensor: str) -> np.ndarray:
        fmt = self.graph.tensors[tensor].fmt
        assert fmt is not None
        q = q.reshape((len(q), *self.graph.tensors[tensor].shape))  # the IR's shape
        return self._user_float(dequantize(q, 0, fmt.zero_point) * fmt.scale, tensor)

    def _outputs_arg(self, q: Any, what: str) -> tuple[Any, ...]:
        """One value per output: `q` itself for one output, else the tuple (or list) it is."""
        n = len(self.graph.outputs)
        if n == 1:
            return (q,)
        if not isinstance(q, (tuple, list)) or len(q) != n:
            raise InvalidDataError(
                f"{what} takes a tuple of {n} arrays, one per output of the model"
            )
        return tuple(q)

    def _user_int(self, q: IntArray, tensor: str) -> IntArray:
        """An IR-shaped int batch as the user sees it: a sequence (N, 1, L, C) as (N, L, C)."""
        return q.reshape((len(q), *self.graph.user_shape(tensor)))

    def _user_float(self, y: np.ndarray, tensor: str) -> np.ndarray:
        """An IR-shaped float output (NHWC) in the framework's layout (NCHW, NCL, NF)."""
        if tensor in self.graph.sequences and y.ndim == 4:
            return np.ascontiguousarray(y[:, 0].transpose(0, 2, 1))
        return simulate.nhwc_to_nchw(y)

    def _user_floats(self, ys: tuple[np.ndarray, ...]) -> Floats:
        return _packed(
            tuple(self._user_float(y, t) for y, t in zip(ys, self.graph.outputs, strict=True))
        )

    def _ir_int(self, q: IntArray) -> IntArray:
        return q.reshape((q.shape[0], *self.graph.tensors[self.graph.input].shape))

    # -- the integer reference
    # A model with several outputs gives a tuple of arrays in the model's order wherever a
    # single-output model gives one array.
    def reference_int(self, x: np.ndarray) -> Ints:
        """Integer outputs (NHWC order for image outputs, NLC for sequences, as the C writes
        them): one array, or a tuple of arrays for a model with several outputs."""
        return _packed(self.run_reference(x).outputs)

    def reference(self, x: np.ndarray) -> Floats:
        """The integer reference dequantized to floats (NCHW for images, like torch)."""
        return self.dequantize_output(self.reference_int(x))

    def run_reference(self, x: np.ndarray) -> RunResult:
        """The integer reference with per-layer overflow statistics (`output` and `outputs`
        shaped like `reference_int`'s, `tensors` in the IR's shapes)."""
        res = reference.run(self.graph, self._ir_int(self.quantize_input(x)))
        outs = zip(res.outputs, self.graph.outputs, strict=True)
        res.outputs = tuple(self._user_int(v, t) for v, t in outs)
        res.output = res.outputs[0]
        return res

    def simulate(self, x: np.ndarray) -> Floats:
        """Float64 fake-quant simulation of the same formats (== `reference` when guaranteed)."""
        x = to_ir_input(_check_images(x, self.float_graph, "inputs"), self.graph)
        formats = {t: v.fmt for t, v in self.graph.tensors.items() if v.fmt is not None}
        out = simulate.run_outputs(
            self.graph,
            simulate.nchw_to_nhwc(x),
            formats=formats,
            overrides=fakequant_overrides(self.graph),
        )
        return self._user_floats(out)

    def float_output(self, x: np.ndarray) -> Floats:
        x = to_ir_input(_check_images(x, self.float_graph, "inputs"), self.float_graph)
        return self._user_floats(simulate.run_outputs(self.float_graph, simulate.nchw_to_nhwc(x)))

    def overflow_report(self, x: np.ndarray) -> dict[str, dict[str, int]]:
        """Per weighted layer: accumulator values that overflowed and samples with any overflow."""
        res = self.run_reference(x)
        return {
            k: {"events": v.events, "samples": v.samples, "max_abs_acc": v.max_abs}
            for k, v in res.overflow.items()
        }


Ints = IntArray | tuple[IntArray, ...]
"""Integer outputs: one array, or a tuple in the model's order for several outputs."""
Floats = np.ndarray | tuple[np.ndarray, ...]
"""Float outputs: one array, or a tuple in the model's order for several outputs."""


def _packed(values: tuple[Any, ...]) -> Any:
    """One output as itself, several as the tuple."""
    return values[0] if len(values) == 1 else values


def to_ir_input(x: np.ndarray, graph: Graph) -> np.ndarray:
    """Framework-layout inputs as the IR's: a sequence batch (N, C, L) is (N, C, 1, L)."""
    return x[:, :, None, :] if graph.input in graph.sequences and x.ndim == 3 else x


def _check_images(x: Any, graph: Graph, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise InvalidDataError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise InvalidDataError(
            f"{what} must be float32 (got dtype {x.dtype}); convert with .astype('float32')"
        )
    shape = graph.tensors[graph.input].shape
    want: tuple[int, ...]
    if graph.input in graph.sequences:
        want = (shape[2], shape[1])
    else:
        want = (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != tuple(want):
        raise InvalidDataError(
            f"{what} have shape {tuple(x.shape)}, the model takes N x {' x '.join(map(str, want))}"
        )
    if x.shape[0] == 0:
        raise InvalidDataError(f"{what} are empty; give at least one sample")
    if not np.isfinite(x).all():
        raise InvalidDataError(f"{what} contain NaN or Inf; clean the data first")
    return x


def _check_calib(calib: Any) -> np.ndarray:
    if not isinstance(calib, np.ndarray):
        raise InvalidDataError(
            f"calibration data must be a numpy array, got {type(calib).__name__}"
        )
    if not 2 <= calib.ndim <= 4:
        raise InvalidDataError(
            "calibration data must be N x C x H x W (images), N x C x L (sequences) or N x F "
            f"(vectors), got shape {tuple(calib.shape)}"
        )
    if calib.dtype.kind != "f":
        raise InvalidDataError(
            f"calibration data must be float32 (got dtype {calib.dtype}); "
            "convert with .astype('float32')"
        )
    if calib.shape[0] == 0:
        raise InvalidDataError("calibration data is empty; give at least one sample")
    if not np.isfinite(calib).all():
        raise InvalidDataError("calibration data contains NaN or Inf; clean it first")
    return calib.astype(np.float32, copy=False)


def _check_labels(
    labels: Any, n: int, classes: int, what: str = "labels", per: str = "calibration sample"
) -> np.ndarray | None:
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise InvalidDataError(
            f"{what} have shape {tuple(lab.shape)}, expected ({n},): one label per {per}"
        )
    if lab.dtype.kind not in "iu":
        raise InvalidDataError(f"{what} must be integers (got dtype {lab.dtype})")
    if lab.size and (lab.min() < 0 or lab.max() >= classes):
        raise InvalidDataError(f"{what} must be class indices in [0, {classes - 1}]")
    return lab.astype(np.int64)


def _acc_map(graph: Graph, acc_bits: int | Mapping[str, int]) -> dict[str, int]:
    weighted = [n.name for n in graph.nodes if n.op in WEIGHTED_OPS]
    if isinstance(acc_bits, Mapping):
        unknown = set(acc_bits) - set(weighted) - {"default"}
        if unknown:
            raise QaccError(
                f"acc_bits names unknown layers {sorted(unknown)}; layers are {weighted}"
            )
        default = acc_bits.get("default", 32)
        out = {n: int(acc_bits.get(n, default)) for n in weighted}
    else:
        out = dict.fromkeys(weighted, int(acc_bits))
    for name, a in out.items():
        if not 8 <= a <= 32:
            raise QaccError(f"accumulator width {a} for layer '{name}' is outside 8..32")
    return out


ACC2_BITS = 32
"""The second-stage accumulator of `acc_stages=2`."""


def _check_stages(
    stages: Any, method: str, accs: Mapping[str, int], tile: Any, rounding: str
) -> None:
    if stages not in (1, 2) or isinstance(stages, bool):
        raise QaccError(f"acc_stages must be 1 or 2, got {stages!r}")
    if tile is not None and stages != 2:
        raise QaccError("acc_tile is a two-stage setting: give acc_stages=2 too")
    if tile is not None and (not isinstance(tile, int) or tile < 1 or (tile > 4 and tile % 8)
                             or tile == 3):  # fmt: skip
        raise QaccError(f"acc_tile must be 1, 2, 4 or a multiple of 8, got {tile!r}")
    if stages == 1:
        return
    if method != "ptq":
        raise QaccError(f"acc_stages=2 is implemented for method 'ptq' only, not '{method}'")
    if rounding != "nearest":
        raise QaccError(
            f"rounding='{rounding}' keeps one accumulator budget per channel, not one per tile: "
            "with acc_stages=2 use rounding='nearest'"
        )
    wide = sorted(n for n, a in accs.items() if a >= ACC2_BITS)
    if wide:
        raise QaccError(
            f"acc_stages=2 needs acc_bits below {ACC2_BITS} (layer '{wide[0]}' has"
            f" {accs[wide[0]]}); use e.g. acc_bits=16"
        )


def quantize(
    model: nn.Module | str | PathLike[str],
    calib: np.ndarray,
    acc_bits: int | Mapping[str, int] | None = None,
    overflow: str = "guaranteed",
    labels: np.ndarray | None = None,
    method: str = "ptq",
    margin: float = 2.0,
    progress: bool = True,
    name: str | None = None,
    *,
    w_bits: int | Mapping[str, int] = 4,
    a_bits: int | Mapping[str, int] = 4,
    scale: str = "dyadic",
    bits_per_weight: float = 2.0,
    transform: str = "klt",
    transform_deploy: str = "auto",
    train: TrainData | None = None,
    epochs: int = 2,
    distill: bool = DEFAULT_DISTILL,
    lr: float = DEFAULT_LR,
    init: str = DEFAULT_INIT,
    on_epoch: Callable[[nn.Module], Mapping[str, float]] | None = None,
    adaptive: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    rounding: str | None = None,
    acc_stages: int = 1,
    acc_tile: int | None = None,
    clip: str = DEFAULT_CLIP,
    cle: str | None = None,
) -> QuantizedModel:
    """Quantize an eval-mode nn.Module for accumulators of `acc_bits` bits.

    `acc_bits` is one width for every layer or a mapping {layer name: width, "default": width}
    (default: 16 for "ptq" and "adaptive", 32 for "transform"). `overflow` is "guaranteed" (no
    input in the input format can overflow) or "profiled" (observed range on `calib` times
    `margin`). `labels` (optional) rank candidates by accuracy (of the first output when the
    model has several: a tuple, list or dict of tensors; without labels, candidates are ranked by
    the error of every output).

    method="ptq": post-training, power-of-two formats filling the accumulator (de Bruin et al.).
    `rounding` ("ptq" only): "optq" (the default; "nearest" with acc_stages=2 and under
    torchrun) or "gpfq",
    accumulator-aware error-correcting rounding (AXE: each weight column's rounding error pushed
    onto the columns not yet quantized, every channel kept inside its accumulator budget, then
    bias correction), or "nearest" (each weight on its own: faster, less accurate below 16 bits).
    `clip` ("ptq" only): "none" (each layer input's range covers its calibration maximum),
    "mse" (per input width, the range among it and those 2, 4 and 8 times smaller, the values
    beyond them saturating, with the least quantization error of the input: finer steps under
    the same accumulator budget) or "search" (every such range ranked with the widths by the
    network output; slower). `cle` ("ptq" only): cross-layer equalization of the float network
    before the search, "none", "weights" (Nagel et al.: equal weight ranges across each ReLU) or
    "activations" (every channel of a layer's input reaches the same calibration maximum, which
    tightens the accumulator bound Σ|w|·max|x|); the float outputs are unchanged, and the
    QuantizedModel's float graph is the equalized one (the weights that were quantized).
    method="adaptive": quantization-aware training on `train` for `epochs` with learned step
    sizes and offsets (LSQ+), `w_bits`/`a_bits` (2..8, per network or {layer: bits}), `scale`
    "dyadic" or "pow2", and the A2Q+ L1 constraint that keeps every channel inside `acc_bits`;
    `distill` adds knowledge distillation from the float model to the training loss, `lr` is
    Adam's peak learning rate (a linear warm-up over the recipe's `warmup` share of the steps,
    then cosine decay), `init` "projected" (A2Q+: the float weights
    projected onto the accumulator budget before training), "optq" (accumulator-aware OPTQ's
    integer weights at the adaptive formats: training starts from that PTQ result) or "float",
    and `on_epoch(net)`, if
    given, is called with the fake-quant network after every epoch (its figures join the epoch's
    row of the report's "adaptive" "history"). `adaptive` sets the training recipe's further
    options by name (batch, scale_lr, head_lr, warmup, kd_weight, temperature, weight_decay,
    budget_bits, budget_ramp, zeros_move, pruned_grad, integer_budget, rounding, ema:
    `codegen.quant.adaptive.Recipe`). The defaults and
    the sweep behind them: docs/adaptive.md.
    `acc_stages=2` (method "ptq"): two-stage accumulation, tiles of T terms summed in `acc_bits`
    and their sums in 32 bits; the weights meet the 32-bit bound and T is chosen per layer so
    that no tile can overflow (report: "acc_tile" per layer; docs/number-semantics.md).
    `acc_tile` (1, 2, 4 or a multiple of 8; with acc_stages=2) instead quantizes the weights so
    that every tile of that many terms fits `acc_bits`: T is then at least `acc_tile` (fewer
    widenings, faster) and the weights are finer than with one `acc_bits` stage; a layer with at
    most `acc_tile` terms per output stays one `acc_bits` stage.
    method="transform": decorrelating transform (`transform` "klt" or "elt") and reverse
    water-filling bit allocation at `bits_per_weight`, optionally retrained on `train`;
    `transform_deploy` "auto" (fewer flash bytes), "factored" (coefficient layer + 1x1 layer
    holding the transform) or "reconstructed" (weights U Y requantized to 8 bits);
    `transform="uniform"` is the baseline: every weight at the same bit depth per layer.

    `train` is arrays (x_train, y_train), a torch Dataset of (x, y) pairs or a DataLoader
    (calibration data stays an array). A model with several outputs takes one label entry per
    output, in the model's order: train=(x_train, (y_1, y_2, ...)), a Dataset yielding
    (x, (y_1, y_2, ...)) or a DataLoader of such batches; an entry is class indices for an
    N x classes output or None (no labels: with adaptive's distillation that output distils
    from the float network's same output, otherwise it adds nothing to the loss). The loss is
    the sum over the outputs; the history's "accuracy" is the first labelled output's, and
    "accuracy_k" output k's (from 0). `device` ("cpu" or "cuda") runs calibration, training and
    the fake-quant simulation there; the integer reference stays NumPy on the CPU. Under
    torchrun (torch.distributed initialised) training is DistributedDataParallel and the
    calibration ranges are all-reduced: see docs/distributed.md.
    """
    if method not in METHODS:
        raise QaccError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if rounding is None:  # OPTQ's budget is per channel, not per tile; its statistics per rank
        rounding = DEFAULT_ROUNDING if acc_stages == 1 and not ddp.active() else "nearest"
    check_rounding(rounding)
    if rounding != "nearest" and ddp.active():
        raise QaccError(
            f"rounding='{rounding}' under torchrun: its layer statistics are not all-reduced, "
            "so the ranks would build different graphs; use rounding='nearest'"
        )
    check_clip(clip)
    if method != "ptq" and clip not in (DEFAULT_CLIP, "none"):
        raise QaccError(f"clip is an option of method 'ptq', not '{method}'")
    if method == "transform" and cle not in (None, "none"):
        raise QaccError("cle is an option of methods 'ptq' and 'adaptive', not 'transform'")
    cle = check_cle(cle or (ADAPTIVE_CLE if method == "adaptive" else DEFAULT_CLE))
    if adaptive and method != "adaptive":
        raise QaccError(f"adaptive= sets options of method 'adaptive', not '{method}'")
    if overflow not in POLICIES:
        raise QaccError(f"unknown overflow policy '{overflow}'; choose guaranteed or profiled")
    dev = resolve_device(device)  # before any work: "cuda" without CUDA is a one-line error
    calib = _check_calib(calib)
    fg = float_graph(model, calib, name)
    _check_images(calib, fg, "calibration data")
    calib_ir = to_ir_input(calib, fg)  # what the quantizers read (NCHW; a sequence as H = 1)
    out_shape = fg.tensors[fg.output].shape
    lab = _check_labels(labels, calib.shape[0], out_shape[-1])
    if acc_bits is None:
        acc_bits = 32 if method == "transform" else 16
    accs = _acc_map(fg, acc_bits)
    _check_stages(acc_stages, method, accs, acc_tile, rounding)
    res: PTQResult | None = None
    extra: dict[str, Any] = {}
    if method == "adaptive":
        from codegen.quant.adaptive import quantize_adaptive

        if overflow != "guaranteed":
            raise QaccError("method 'adaptive' trains for overflow='guaranteed' only")
        fg = equalize(fg, cle, simulate.nchw_to_nhwc(calib_ir))  # the same float function
        graph, extra = quantize_adaptive(
            fg,
            calib_ir,
            _check_train(train, fg, "adaptive", distill),
            accs,
            w_bits=w_bits,
            a_bits=a_bits,
            scale=scale,
            epochs=epochs,
            seed=seed,
            progress=progress,
            distill=distill,
            device=dev,
            lr=lr,
            init=init,
            on_epoch=on_epoch,
            options=adaptive,
        )
    elif method == "transform":
        from codegen.quant.transform import quantize_transform

        graph, extra = quantize_transform(
            fg,
            calib_ir,
            None if train is None else _check_train(train, fg, "transform", False),
            accs,
            policy=cast(Policy, overflow),
            bits_per_weight=bits_per_weight,
            transform=transform,
            deploy=transform_deploy,
            epochs=epochs,
            seed=seed,
            progress=progress,
            labels=lab,
            device=dev,
        )
    else:
        acc2 = ACC2_BITS if acc_stages == 2 else None
        x_nhwc = simulate.nchw_to_nhwc(calib_ir)
        fg = equalize(fg, cle, x_nhwc)  # the same float function, the graph quantized
        res = search(fg, x_nhwc, lab, accs, cast(Policy, overflow), margin,
                     progress, device=dev, rounding=rounding, acc2_bits=acc2,
                     min_tile=acc_tile, clip=clip)  # fmt: skip
        graph = res.graph
        extra["rounding"] = rounding
    qm = QuantizedModel(fg.name, graph, fg, method, overflow)
    qm.report = build_report(qm, res, calib) | extra
    return qm


def float_graph(
    model: nn.Module | str | PathLike[str], calib: np.ndarray, name: str | None
) -> Graph:
    """The float IR of a model: an eval-mode nn.Module (torch.fx) or a path to an ONNX file."""
    if isinstance(model, PathLike) or (isinstance(model, str) and model.lower().endswith(".onnx")):
        from codegen.frontend.onnx_model import from_onnx

        return from_onnx(model, calib, name)
    if isinstance(model, str):
        raise InvalidModelError(
            f"model '{model}' is a path but not an .onnx file; pass an nn.Module or an ONNX file"
        )
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return from_torch(model, calib, name)


def _check_train(train: Any, fg: Graph, method: str, teacher: bool) -> TrainData:
    """The (inputs, labels) training pair of the methods that (re)train, or the user's torch
    Dataset of (x, y) pairs or DataLoader (used as given: qacc does not read it ahead; `fit`
    checks its batches). A model with several outputs takes a tuple of labels, one entry per
    output (`_check_output_labels`); `teacher`: the method distils from the float network."""
    out = fg.user_shape(fg.output)
    if len(fg.outputs) == 1 and len(out) != 1:  # the loss is a classifier's: one label a sample
        raise InvalidModelError(
            f"method '{method}' trains on one class label per sample, but the model's output is "
            f"not N x classes (per sample {out}, channels last); train a classifier head or use "
            "method 'ptq'"
        )
    if isinstance(train, (Dataset, DataLoader)):
        return train
    if not (isinstance(train, tuple) and len(train) == 2):
        labels = "y_train" if len(fg.outputs) == 1 else "(y_1, y_2, ...)"
        raise InvalidDataError(
            f"method '{method}' needs train=(x_train, {labels}) (inputs N x C x H x W and "
            "labels), a torch Dataset of (x, y) pairs or a DataLoader"
        )
    x = _check_images(train[0], fg, "training inputs").astype(np.float32, copy=False)
    x = to_ir_input(x, fg)
    if len(fg.outputs) > 1:
        return x, _check_output_labels(train[1], fg, x.shape[0], method, teacher)
    y = _check_labels(train[1], x.shape[0], fg.tensors[fg.output].shape[-1])
    assert y is not None
    return x, y


def _check_output_labels(
    labels: Any, fg: Graph, n: int, method: str, teacher: bool
) -> tuple[np.ndarray | None, ...]:
    """The training labels of a model with several outputs: a tuple (or list) with one entry
    per output, class indices (n,) for an N x classes output or None (that output then trains
    by distillation only, or not at all without a teacher); at least one entry is not None
    unless the method distils."""
    k = len(fg.outputs)
    if not (isinstance(labels, (tuple, list)) and len(labels) == k):
        raise InvalidDataError(
            f"the model has {k} outputs: give train=(x_train, (y_1, ..., y_{k})), one label "
            "array (class indices) or None per output"
        )
    ys: list[np.ndarray | None] = []
    for i, (t, lab) in enumerate(zip(fg.outputs, labels, strict=True)):
        shape = fg.user_shape(t)
        if lab is not None and len(shape) != 1:
            raise InvalidDataError(
                f"output {i} ('{t}') is not N x classes (per sample {shape}): its training "
                "labels must be None"
            )
        what = f"training labels of output {i} ('{t}')"
        ys.append(_check_labels(lab, n, shape[-1], what, "training sample"))
    if all(y is None for y in ys) and not teacher:
        raise InvalidDataError(
            f"method '{method}' needs the labels of at least one output"
            + (" (or distill=True)" if method == "adaptive" else "")
        )
    return tuple(ys)


def build_report(qm: QuantizedModel, res: PTQResult | None, calib: np.ndarray) -> dict[str, Any]:
    g = qm.graph
    run = qm.run_reference(calib)
    layers = []
    total_macs = 0
    weight_bytes = 0
    for n in g.nodes:
        fi, fo = g.tensors[n.inputs[0]].fmt, g.tensors[n.output].fmt
        assert fi is not None and fo is not None
        row: dict[str, Any] = {
            "name": n.name,
            "op": n.op,
            "input_format": fi.describe(),
            "output_format": fo.describe(),
            "input_bits": fi.bits,
            "output_bits": fo.bits,
        }
        if n.op in WEIGHTED_OPS:
            a = int(n.attrs["acc_bits"])
            q = n.params["weight"]
            xlo, xhi = fi.qmin - fi.zero_point, fi.qmax - fi.zero_point  # the kernel subtracts it
            lo, hi = channel_bounds(q, n.params["bias"], xlo, xhi)
            ov = run.overflow[n.name]
            row.update(
                K=terms_per_output(n),
                acc_bits=a,
                weight_bits=int(np.abs(q).max(initial=0)).bit_length() + 1,
                bound=int(max(hi.max(), -lo.min())),
                acc_limit=2 ** (a - 1),
                bound_fits=bool(hi.max() <= 2 ** (a - 1) - 1 and lo.min() >= -(2 ** (a - 1))),
                observed_max_abs_acc=ov.max_abs,
                overflow_events=ov.events,
                overflow_samples=ov.samples,
                macs=macs(g, n),
            )
            if "acc_tile" in n.attrs:  # two stages: the bound above is the total's (acc2_bits)
                a2 = int(n.attrs["acc2_bits"])
                tlo, thi = tile_bounds(q, fi.qmin - fi.zero_point, fi.qmax - fi.zero_point,
                                       int(n.attrs["acc_tile"]))  # fmt: skip
                row.update(
                    acc_tile=int(n.attrs["acc_tile"]),
                    acc2_bits=a2,
                    acc_limit=2 ** (a2 - 1),
                    bound_fits=bool(hi.max() < 2 ** (a2 - 1) and lo.min() >= -(2 ** (a2 - 1))),
                    tile_bound=int(max(thi.max(), -tlo.min())),
                    tile_bound_fits=bool(thi.max() < 2 ** (a - 1) and tlo.min() >= -(2 ** (a - 1))),
                    tile_overflow_events=ov.tile_events,
                )
            if "weight_frac" in n.attrs:
                wf = n.attrs["weight_frac"]
                row["weight_frac"] = [min(wf), max(wf)]
            if res is not None and n.name in res.choices:
                row["search"] = res.choices[n.name].candidates
                row["input_clip"] = res.choices[n.name].clip
            total_macs += macs(g, n)
            stored_bits = int(n.attrs.get("weight_bits", 8))
            weight_bytes += -(-int(q.size) * stored_bits // 8) + 4 * int(q.shape[0])
        layers.append(row)
    return {
        "model": qm.name,
        "method": qm.method,
        "overflow_policy": qm.policy,
        "input_format": g.tensors[g.input].fmt.describe(),  # type: ignore[union-attr]
        "layers": layers,
        "macs": total_macs,
        "weight_bytes": weight_bytes,
        "calibration_samples": int(calib.shape[0]),
        "calibration_overflow_events": sum(v.events for v in run.overflow.values()),
    }


def describe_bits(qm: QuantizedModel) -> str:
    """Compact per-layer 'input bits/weight bits' summary, e.g. 'c1 7/8, c2 5/6 ÷4': ÷n when
    activation clipping made the layer's input range n times smaller than its calibration
    maximum, T= the tile of two-stage accumulation."""
    parts = []
    for row in qm.report["layers"]:
        if "weight_bits" in row:
            clip = f" ÷{2 ** row['input_clip']}" if row.get("input_clip") else ""
            tile = f" T={row['acc_tile']}" if "acc_tile" in row else ""
            parts.append(f"{row['name']} {row['input_bits']}/{row['weight_bits']}{clip}{tile}")
    return ", ".join(parts)
