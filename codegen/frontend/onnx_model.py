"""ONNX frontend: an ONNX float model file to the same float `ir.Graph` as the PyTorch frontend.

The ONNX ops are read here; everything after (NHWC, BatchNorm folding, activation fusion, pad
folding, the flatten column permutation) is `builder.IRBuilder`'s, shared with torch_fx, so a
network exported from PyTorch gives the float graph (and so the integer graph) of its torch.fx
trace:

- parameters are the file's float32 initializers widened to float64, as torch_fx widens the
  module's float32 parameters;
- float attributes that torch holds as Python floats but ONNX stores as float32 (BatchNorm
  epsilon, Clip bounds) are read back as the shortest decimal that rounds to the stored float32
  (`1e-05`, `0.3`), the value the user wrote;
- node names follow torch.fx: the module path of a leaf module's op (`features_0`), the function
  name otherwise (`add`, `cat`), from the metadata torch.onnx.export (dynamo) records, or from the
  `/module/Op` names of the TorchScript exporter;
- the graph is named after the exported module's class when the file records it, else the file.

Shape-only subgraphs (Shape, Concat, Expand, CastLike of constants...) are evaluated with the
`onnx` reference implementation; the model's value shapes come from ONNX shape inference on the
calibration data's C x H x W.

An adaptive average pool whose windows differ in size or overlap (AlexNet's and VGG's pools to
6 x 6 and 7 x 7, from smaller features) is spelled out by the dynamo exporter as index
arithmetic: a Transpose that moves the batch axis, GatherND / Gather of the windows' pixels,
Where zeroing padding, ReduceMean or Add and Div by the window sizes. Such values are followed
element by element (`_Gathered`: each is a sum of input elements over a divisor) and become one
`adaptive_avgpool2d` where something else reads them, if each is the mean of a window of its
channel; anything else moved across the batch axis is refused.
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from codegen.core.errors import InvalidDataError, InvalidModelError, UnsupportedModelError
from codegen.core.ir import Graph, Taps, bilinear_taps
from codegen.frontend.builder import (
    INF,
    IRBuilder,
    Namespace,
    Pad4,
    Reject,
    c_identifier,
    normalization_refusal,
)

MIN_OPSET = 11  # Clip bounds and Pad amounts as inputs
SUPPORTED = (
    "Conv (1-D, 2-D), ConvTranspose (1-D, 2-D), Gemm, MatMul(+Add), BatchNormalization, Relu, "
    "Clip, MaxPool, AveragePool, "
    "GlobalAveragePool, GlobalMaxPool, ReduceMean/ReduceMax(H, W), Flatten, Reshape, Add, "
    "Mul (same shape, per-channel scale, constant scalar), Softmax (axis 1), "
    "Concat(axis 1), Pad, Dropout, Identity, Unsqueeze/Squeeze (around 1-D ops), HardSwish, "
    "HardSigmoid, Sigmoid, Tanh, LeakyRelu, Gelu, x * Sigmoid(x) (SiLU), x * HardSigmoid(x) "
    "(Hardswish), Reshape/Transpose (channel shuffle), Split/Slice of channels, "
    "Resize (nearest, linear), the dynamo exporter's adaptive average pools (Transpose, GatherND, "
    "Gather, Where, Add, Div, ReduceMean of the windows)"
)
_LUT_OPS = {  # ONNX op -> the torch.fx name of the function (codegen.core.lut)
    "HardSwish": "hardswish",
    "HardSigmoid": "hardsigmoid",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "LeakyRelu": "leaky_relu",
    "Gelu": "gelu",
}
_LEAF_MODULE_OPS = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "BatchNormalization",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Flatten",
    "Pad",
    "Relu",
    "Clip",
    "Softmax",
    "Resize",
    *_LUT_OPS,  # activations are usually modules (nn.Sigmoid)
}
_FUNCTION_NAMES = {  # the torch function an op comes from, when not from a leaf module
    "Add": "add",
    "Mul": "mul",
    "Concat": "cat",
    "Softmax": "softmax",
    "Conv": "conv2d",
    "ConvTranspose": "conv_transpose2d",
    "Gemm": "linear",
    "MatMul": "linear",
    "MaxPool": "max_pool2d",
    "AveragePool": "avg_pool2d",
    "GlobalAveragePool": "adaptive_avg_pool2d",
    "GlobalMaxPool": "adaptive_max_pool2d",
    "Relu": "relu",
    "Clip": "clamp",
    "ReduceMean": "mean",
    "ReduceMax": "amax",
    "Flatten": "flatten",
    "Reshape": "view",
    "Transpose": "transpose",
    "Resize": "interpolate",
    "Split": "getitem",
    "Slice": "getitem",
    "SequenceAt": "getitem",
    **_LUT_OPS,
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _decimal(v: Any) -> float:
    """The shortest decimal that rounds to the float32 `v` (what a user wrote as a Python float)."""
    return float(str(np.float32(v)))


def load(path: str | PathLike[str]) -> onnx.ModelProto:
    """Read and check an ONNX file; every problem is one InvalidModelError line."""
    p = Path(path)
    if not p.is_file():
        raise InvalidModelError(f"ONNX file '{path}' does not exist")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # protobuf raises several kinds on a damaged file
        raise InvalidModelError(
            f"'{path}' is not a readable ONNX model ({_first_line(e)}); export it again"
        ) from None
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions or not model.graph.node:
        raise InvalidModelError(
            f"'{path}' is not an ONNX model (no ONNX opset or no nodes); export it again"
        )
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= versions[0] <= newest:
        raise InvalidModelError(
            f"'{path}' uses ONNX opset {versions[0]}; qacc reads opsets {MIN_OPSET} to {newest}: "
            f"export it again with an opset_version in that range"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise InvalidModelError(
            f"'{path}' is not a valid ONNX model ({_first_line(e)}); export it again"
        ) from None
    return model


def from_onnx(
    path: str | PathLike[str], example_nchw: np.ndarray, name: str | None = None
) -> Graph:
    """The float graph of the ONNX model in `path`, for inputs shaped like `example_nchw`."""
    model = load(path)
    return _Converter(model, Path(path), tuple(int(d) for d in example_nchw.shape[1:]), name).run()


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


@dataclass(frozen=True)
class _Gathered:
    """A value made of the elements of the runtime value `source` (numbered in its framework
    order, batch axis included): element e is sum(source[terms[e]]) / divisor[e], a term -1
    is a zero. `start` is the node that moved the batch axis, `node` the last one."""

    source: str
    terms: np.ndarray  # int64 (*shape, T)
    divisor: np.ndarray  # float64, broadcasts to shape
    start: onnx.NodeProto
    node: onnx.NodeProto

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.terms.shape[:-1])

    def but(self, node: onnx.NodeProto, terms: np.ndarray, divisor: np.ndarray) -> _Gathered:
        return _Gathered(self.source, terms, divisor, self.start, node)


def _terms_to(terms: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`_Gathered.terms` broadcast to a value shape (the terms axis kept)."""
    lead = (1,) * (len(shape) - (terms.ndim - 1))
    return np.broadcast_to(terms.reshape(lead + terms.shape), (*shape, terms.shape[-1]))


class _Converter:
    def __init__(
        self, model: onnx.ModelProto, path: Path, chw: tuple[int, ...], name: str | None
    ) -> None:
        self.model = model
        self.path = path
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.graph = model.graph
        self.consts: dict[str, np.ndarray] = {}
        for init in self.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InvalidModelError(
                    f"initializer '{init.name}' holds NaN or Inf; fix the model before quantizing"
                )
            self.consts[init.name] = arr
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise UnsupportedModelError(
                f"the ONNX model has {len(inputs)} inputs; qacc takes models with one image input"
            )
        self.input = inputs[0]
        # readers of each value's data (CastLike's model operand and Shape only read its type)
        self.users: Counter[str] = Counter(
            v
            for n in self.graph.node
            for i, v in enumerate(n.input)
            if v and (n.op_type, i) not in (("CastLike", 1), ("Shape", 0))
        )
        self.users.update(o.name for o in self.graph.output)
        self.names = Namespace()
        self.fused: set[str] = set()  # outputs of nodes read as part of a pattern (SiLU's Mul)
        self.pieces: dict[str, tuple[str, int, list[tuple[int, int]]]] = {}  # SplitToSequence
        self.gathered: dict[str, _Gathered] = {}  # values moved across the batch axis
        self.shapes, self.types = self._infer_shapes(chw)
        self.b = IRBuilder(c_identifier(name or self._model_name()), batch=1)

    # ------------------------------------------------------------------ set-up
    def _model_name(self) -> str:
        for node in self.graph.node:
            classes = self._meta_list(node, "pkg.torch.onnx.class_hierarchy")
            if classes:
                return classes[0].rsplit(".", 1)[-1]
        return self.path.stem

    def _infer_shapes(
        self, chw: tuple[int, ...]
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
        """Value shapes (with batch 1) and element types, by ONNX shape inference."""
        dims = self.input.type.tensor_type.shape.dim
        declared = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        if len(declared) != 1 + len(chw) or any(
            d is not None and d != c for d, c in zip(declared[1:], chw, strict=False)
        ):
            want = " x ".join("?" if d is None else str(d) for d in declared[1:])
            raise InvalidDataError(
                f"the model takes inputs of shape N x {want}, not N x {' x '.join(map(str, chw))}; "
                "give data of the shape it was trained on"
            )
        shapes: dict[str, tuple[int, ...]] = {}
        types: dict[str, int] = {}
        done: set[int] = set()
        for rounds in range(len(self.graph.node) + 1):
            # constant subgraphs (ReduceMean axes, Reshape shapes...) become initializers first,
            # so inference sees their values; then shapes of runtime values (Shape) whose size
            # inference found, and what follows from them (x.size() arithmetic), again
            folded = [
                i
                for i, node in enumerate(self.graph.node)
                if i not in done and self._fold_for_inference(node, shapes)
            ]
            pieces = self._sequence_shapes(shapes)
            if rounds and not folded and pieces.keys() <= shapes.keys():
                break
            done.update(folded)
            shapes, types = self._inference(chw, done, pieces)
        return shapes, types

    def _sequence_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Shapes of SequenceAt values (chunk's pieces), which ONNX inference leaves unknown
        when the pieces differ in size."""
        seqs = {n.output[0]: n for n in self.graph.node if n.op_type == "SplitToSequence"}
        out: dict[str, tuple[int, ...]] = {}
        for n in self.graph.node:
            split = seqs.get(n.input[0]) if n.op_type == "SequenceAt" else None
            if split is None or split.input[0] not in shapes or n.input[1] not in self.consts:
                continue
            shape = shapes[split.input[0]]
            axis = int(self.attrs(split).get("axis", 0)) % len(shape)
            sizes = self._split_sizes(split, shape[axis], shape[axis])
            size = sizes[int(self.consts[n.input[1]].reshape(-1)[0])]
            out[n.output[0]] = (*shape[:axis], size, *shape[axis + 1 :])
        return out

    def _fold_for_inference(self, node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Evaluate a constant node, or a Shape of a value whose shape is known."""
        ins = [v for v in node.input if v]
        if node.op_type == "Shape" and ins and ins[0] not in self.consts and ins[0] in shapes:
            a = self.attrs(node)
            full = np.array(shapes[ins[0]], dtype=np.int64)
            self.consts[node.output[0]] = full[a.get("start", 0) : a.get("end", len(full))]
            return True
        return self.evaluate(node)

    def _inference(
        self, chw: tuple[int, ...], folded: set[int], known: dict[str, tuple[int, ...]]
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for i in sorted(folded, reverse=True):
            for name in m.graph.node[i].output:
                if name:
                    m.graph.initializer.append(numpy_helper.from_array(self.consts[name], name))
            del m.graph.node[i]
        del m.graph.value_info[:]
        elem = self.input.type.tensor_type.elem_type
        m.graph.value_info.extend(
            onnx.helper.make_tensor_value_info(v, elem, shape) for v, shape in known.items()
        )
        for v in m.graph.input:
            if v.name == self.input.name:
                shape = v.type.tensor_type.shape
                for d, size in zip(shape.dim, (1, *chw), strict=True):
                    d.Clear()
                    d.dim_value = size
        for v in m.graph.output:
            v.type.tensor_type.ClearField("shape")
        try:
            m = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
        except Exception as e:  # onnx raises InferenceError and others
            for node in self.graph.node:  # ops of other domains have no shape functions
                if node.domain not in ("", "ai.onnx"):
                    raise self.fail(node, f"unsupported op {node.domain}.{node.op_type}") from None
            raise InvalidDataError(
                f"the model does not accept inputs of shape N x {' x '.join(map(str, chw))} "
                f"({_first_line(e)}); give data of the shape it was trained on"
            ) from None
        shapes: dict[str, tuple[int, ...]] = {}
        types: dict[str, int] = {}
        for v in (*m.graph.input, *m.graph.value_info, *m.graph.output):
            tt = v.type.tensor_type
            types[v.name] = tt.elem_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                shapes[v.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
        return shapes, types

    @staticmethod
    def _meta_list(node: onnx.NodeProto, key: str) -> list[str]:
        for p in node.metadata_props:
            if p.key == key:
                try:
                    value = ast.literal_eval(p.value)
                except (ValueError, SyntaxError):
                    return []
                return [str(v) for v in value] if isinstance(value, list) else []
        return []

    def ir_name(self, node: onnx.NodeProto, function: str | None = None) -> str:
        """The torch.fx name of the op this node came from, when the file says (`function`: the
        torch function a pattern of ONNX ops comes from, for files that do not say)."""
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
            weight = re.fullmatch(r"([\w.]+)\.weight", node.input[1])
            if weight:  # the parameter's name survives exporters' fusions (Conv + BatchNorm)
                return self.names.create(weight.group(1))
        scopes = self._meta_list(node, "pkg.torch.onnx.name_scopes")
        classes = self._meta_list(node, "pkg.torch.onnx.class_hierarchy")
        if len(scopes) >= 3 and len(classes) == len(scopes):
            owner = classes[-2]  # the module whose forward emitted the op
            if owner.startswith(("torch.nn.", "torch.ao.nn.")) and not owner.endswith(
                ".Sequential"
            ):
                return self.names.create(scopes[-2])  # a leaf module: fx names it by its path
        if scopes:
            base = scopes[-1]  # the exported program's node, named after the function
        elif node.name.startswith("/"):  # TorchScript exporter: /module/path/OpType_N
            parts = node.name.strip("/").split("/")
            if len(parts) > 1 and node.op_type in _LEAF_MODULE_OPS:
                return self.names.create(parts[-2])
            base = function or _FUNCTION_NAMES.get(node.op_type, node.op_type)
        else:
            base = node.name or node.op_type
        return self.names.create(re.sub(r"_\d+$", "", base))  # renumbered here, as fx does

    # ------------------------------------------------------------------ helpers
    def fail(self, node: onnx.NodeProto, what: str | None = None) -> UnsupportedModelError:
        what = what or f"unsupported ONNX op {node.op_type}"
        return UnsupportedModelError(
            f"{what} at node '{_node_label(node)}' ({node.op_type}); supported: {SUPPORTED}"
        )

    def attrs(self, node: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def arg(self, node: onnx.NodeProto, i: int) -> str:
        """A runtime tensor operand."""
        v = node.input[i] if i < len(node.input) else ""
        if not v or not self.b.knows(v):
            what = "constant" if v in self.consts else "missing"
            raise Reject(f"{what} input {i} of {node.op_type} (a tensor computed from the input)")
        return v

    def const(self, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
        """A constant operand (an initializer or computed from constants), None when absent."""
        v = node.input[i] if i < len(node.input) else ""
        if not v:
            return None
        if v not in self.consts:
            raise Reject(f"{node.op_type} with a {what} computed at run time (only constants)")
        return self.consts[v]

    def weight(self, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
        arr = self.const(node, i, what)
        return None if arr is None else arr.astype(np.float64)

    def shape(self, value: str) -> tuple[int, ...]:
        if value not in self.shapes:
            raise Reject(f"value '{value}' whose shape ONNX shape inference could not determine")
        return self.shapes[value]

    def out(self, node: onnx.NodeProto) -> tuple[int, ...]:
        """The NCHW shape (no batch) of the node's first output."""
        return self.shape(node.output[0])[1:]

    def only_first_output(self, node: onnx.NodeProto) -> None:
        if any(self.users[o] for o in node.output[1:] if o):
            raise Reject(f"{node.op_type} whose second output is used")

    def shared(self, node: onnx.NodeProto) -> bool:
        return self.users[node.input[0]] > 1

    def spatial(self, node: onnx.NodeProto, a: dict[str, Any], kernel: tuple[int, int]) -> Pad4:
        """(top, bottom, left, right) from `pads` or `auto_pad`."""
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        one_d = len(self.shape(node.input[0])) == 3  # a sequence: the image (C, 1, L)
        if auto in ("NOTSET", "VALID"):
            p = (
                [int(v) for v in a.get("pads", [0] * (2 if one_d else 4))]
                if auto == "NOTSET"
                else []
            )
            p = p or [0] * (2 if one_d else 4)
            if one_d and len(p) == 2:
                return (0, 0, p[0], p[1])
            if len(p) != 4:
                raise Reject(f"{node.op_type} that is not 1-D or 2-D")
            return (p[0], p[2], p[1], p[3])
        # SAME_UPPER / SAME_LOWER: output = ceil(input / stride), the odd pixel after / before
        h, w = (1, *self.shape(node.input[0])[2:]) if one_d else self.shape(node.input[0])[2:]
        sh, sw = _spatial2(a.get("strides"), one_d)
        dh, dw = _spatial2(a.get("dilations"), one_d)
        pads = []
        for size, k, s, d in ((h, kernel[0], sh, dh), (w, kernel[1], sw, dw)):
            total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
            small = total // 2
            pads.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        return (pads[0][0], pads[0][1], pads[1][0], pads[1][1])

    # ------------------------------------------------------------------ constants
    def fold(self, node: onnx.NodeProto) -> bool:
        """Evaluate a node whose inputs are all constants (a shape computation, a Constant)."""
        ins = [v for v in node.input if v]
        if node.op_type == "Shape" and ins and ins[0] not in self.consts:
            if ins[0] not in self.shapes:
                return False
            a = self.attrs(node)
            full = np.array(self.shapes[ins[0]], dtype=np.int64)
            self.consts[node.output[0]] = full[a.get("start", 0) : a.get("end", len(full))]
            return True
        if node.op_type == "CastLike" and ins[0] in self.consts and ins[1] in self.types:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(self.types[ins[1]])
            self.consts[node.output[0]] = self.consts[ins[0]].astype(dtype)
            return True
        return self.evaluate(node)

    def evaluate(self, node: onnx.NodeProto) -> bool:
        """Evaluate a node whose inputs are all constants (or that has none: Constant)."""
        ins = [v for v in node.input if v]
        if any(v not in self.consts for v in ins) or node.op_type.startswith("Random"):
            return False
        try:
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(
                None, {v: self.consts[v] for v in ins}
            )
        except Exception as e:  # the reference raises what the op's code raises
            raise InvalidModelError(
                f"evaluating constant node '{_node_label(node)}' ({node.op_type}) failed "
                f"({_first_line(e)}); fix the model"
            ) from None
        for name, value in zip(node.output, results, strict=False):
            if name:
                self.consts[name] = np.asarray(value)
        return True

    # ------------------------------------------------------------------ ops
    def conv_weight(self, node: onnx.NodeProto) -> tuple[np.ndarray, bool]:
        """A Conv / ConvTranspose's 4-D weight, and whether the op is 1-D (a sequence is the
        image (C, 1, L))."""
        w = self.weight(node, 1, "weight")
        assert w is not None  # the checker requires the operand
        one_d = w.ndim == 3
        if one_d:
            w = w[:, :, None, :]
        if w.ndim != 4:
            raise Reject(f"{node.op_type} over {w.ndim - 2} dimension(s) (only 1-D and 2-D)")
        return w, one_d

    def conv(self, node: onnx.NodeProto) -> None:
        a = self.attrs(node)
        w, one_d = self.conv_weight(node)
        kernel = (int(w.shape[2]), int(w.shape[3]))
        self.b.conv(
            self.ir_name(node),
            node.output[0],
            self.arg(node, 0),
            w,
            self.weight(node, 2, "bias"),
            stride=_spatial2(a.get("strides"), one_d),
            padding=self.spatial(node, a, kernel),
            dilation=_spatial2(a.get("dilations"), one_d),
            groups=int(a.get("group", 1)),
            nchw=self.out(node),
        )

    def conv_transpose(self, node: onnx.NodeProto) -> None:
        """ConvTranspose with explicit `pads` (or auto_pad VALID) and `output_padding`."""
        a = self.attrs(node)
        w, one_d = self.conv_weight(node)
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if "output_shape" in a or auto not in ("NOTSET", "VALID"):
            what = "output_shape" if "output_shape" in a else f"auto_pad {auto}"
            raise Reject(f"ConvTranspose with {what} (give pads and output_padding instead)")
        p = [int(v) for v in a.get("pads", [])] if auto == "NOTSET" else []
        p = p or [0] * (2 if one_d else 4)
        pads = (0, 0, p[0], p[1]) if one_d else (p[0], p[2], p[1], p[3])
        self.b.conv_transpose(
            self.ir_name(node),
            node.output[0],
            self.arg(node, 0),
            w,
            self.weight(node, 2, "bias"),
            stride=_spatial2(a.get("strides"), one_d),
            padding=pads,
            output_padding=_spatial2(a.get("output_padding"), one_d, 0),
            dilation=_spatial2(a.get("dilations"), one_d),
            groups=int(a.get("group", 1)),
            nchw=self.out(node),
        )

    def gemm(self, node: onnx.NodeProto) -> None:
        a = self.attrs(node)
        if a.get("transA", 0):
            raise Reject("Gemm with transA=1")
        w = self.weight(node, 1, "weight")
        assert w is not None
        if not a.get("transB", 0):
            w = w.T
        if a.get("alpha", 1.0) != 1.0:
            w = w * _decimal(a["alpha"])
        c = self.weight(node, 2, "bias")
        if c is not None:
            c = self._per_channel(c, w.shape[0], "Gemm bias")
            if a.get("beta", 1.0) != 1.0:
                c = c * _decimal(a["beta"])
        self.dense(node, w, c)

    def matmul(self, node: onnx.NodeProto) -> None:
        w = self.weight(node, 1, "weight")
        assert w is not None
        if w.ndim != 2:
            raise Reject("MatMul with a weight that is not 2-D")
        self.dense(node, w.T, None)

    def dense(self, node: onnx.NodeProto, w: np.ndarray, bias: np.ndarray | None) -> None:
        x = self.arg(node, 0)
        self.b.dense(self.ir_name(node), node.output[0], x, w, bias, self.out(node), node.op_type)

    @staticmethod
    def _per_channel(c: np.ndarray, channels: int, what: str) -> np.ndarray:
        """A constant broadcast over one output channel axis, as a (channels,) vector."""
        if c.size == 1:
            return np.full(channels, float(c.reshape(-1)[0]))
        squeezed = c.reshape([d for d in c.shape if d != 1] or [1])
        if squeezed.shape != (channels,):
            raise Reject(f"{what} of shape {tuple(c.shape)} (only one value per channel)")
        return squeezed.astype(np.float64)

    def batchnorm(self, node: onnx.NodeProto) -> None:
        a = self.attrs(node)
        if a.get("training_mode", 0):
            raise Reject("BatchNormalization in training mode")
        self.only_first_output(node)
        gamma, beta, mean, var = (self.weight(node, i, "parameter") for i in (1, 2, 3, 4))
        assert gamma is not None and beta is not None and mean is not None and var is not None
        self.b.batchnorm(
            node.output[0],
            self.arg(node, 0),
            mean=mean,
            var=var,
            gamma=gamma,
            beta=beta,
            eps=_decimal(a.get("epsilon", 1e-5)),
            shared=self.shared(node),
            title="BatchNormalization",
            name=lambda: self.ir_name(node),
        )

    def relu(self, node: onnx.NodeProto) -> None:
        x = self.arg(node, 0)
        self.b.clamp(node.output[0], x, 0.0, INF, self.shared(node), lambda: self.ir_name(node))

    def clip(self, node: onnx.NodeProto) -> None:
        lo, hi = self.const(node, 1, "minimum"), self.const(node, 2, "maximum")
        self.b.clamp(
            node.output[0],
            self.arg(node, 0),
            -INF if lo is None else _decimal(lo.reshape(-1)[0]),
            INF if hi is None else _decimal(hi.reshape(-1)[0]),
            self.shared(node),
            lambda: self.ir_name(node),
        )

    def lut(self, node: onnx.NodeProto) -> None:
        """An element-wise function as a table node; Sigmoid(x) read only by Mul(x, Sigmoid(x))
        is SiLU, HardSigmoid(x) (torch's) read only by Mul(x, HardSigmoid(x)) is Hardswish."""
        a = self.attrs(node)
        x = self.arg(node, 0)
        function, value = _LUT_OPS[node.op_type], node.output[0]
        args: tuple[float, ...] = ()
        if node.op_type == "HardSigmoid":
            alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
            if np.float32(alpha) != np.float32(1 / 6) or np.float32(beta) != np.float32(0.5):
                args = (_decimal(alpha), _decimal(beta))  # torch's is relu6(x + 3) / 6
        elif node.op_type == "LeakyRelu":
            args = (_decimal(a.get("alpha", 0.01)),)
        elif node.op_type == "Gelu":
            approximate = a.get("approximate", b"none")
            approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
            if approximate not in ("none", "tanh"):
                raise Reject(f"Gelu with approximate='{approximate}'")
            function = "gelu_tanh" if approximate == "tanh" else "gelu"
        times_x = {"sigmoid": "silu", "hardsigmoid": "hardswish"}.get(function)
        if times_x is not None and not args and self.users[value] == 1:
            mul = self.times_x(x, value)
            if mul is not None:  # x * f(x): torch's export of SiLU (and of Hardswish, opset < 14)
                self.fused.add(mul.output[0])
                function, value = times_x, mul.output[0]
        name = self.ir_name(node, function if value != node.output[0] else None)
        self.b.lut(name, value, x, function, args, self.out(node))

    def times_x(self, x: str, s: str) -> onnx.NodeProto | None:
        """The Mul node of x * s, if any."""
        for n in self.graph.node:
            if n.op_type == "Mul" and x != s and sorted(n.input) == sorted((x, s)):
                return n
        return None

    def mul(self, node: onnx.NodeProto) -> None:
        """A product of two tensors (one may be a per-channel scale (N, C, 1, 1)), or of a tensor
        and a constant scalar (a `scale` table); x * Sigmoid(x) was read with the function."""
        if node.output[0] in self.fused:
            return
        consts = [i for i in (0, 1) if node.input[i] in self.consts]
        if consts:
            c = self.weight(node, consts[0], "factor")
            assert c is not None
            if c.size != 1:
                raise Reject(f"Mul by a constant of shape {tuple(c.shape)} (only a scalar)")
            x = self.arg(node, 1 - consts[0])
            factor = (_decimal(c.reshape(-1)[0]),)
            self.b.lut(self.ir_name(node), node.output[0], x, "scale", factor, self.out(node))
            return
        a, b = self.arg(node, 0), self.arg(node, 1)
        self.b.mul(self.ir_name(node), node.output[0], a, b, self.out(node))

    def pool(self, node: onnx.NodeProto) -> None:
        a = self.attrs(node)
        kind = "maxpool2d" if node.op_type == "MaxPool" else "avgpool2d"
        kernel = a.get("kernel_shape", [])
        one_d = len(kernel) == 1
        if len(kernel) not in (1, 2):
            raise Reject(f"{node.op_type} that is not 1-D or 2-D")
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise Reject(f"{node.op_type} with dilations")
        self.only_first_output(node)
        k = _spatial2(kernel, one_d)
        pad = self.spatial(node, a, k)
        self.b.pool(
            self.ir_name(node),
            node.output[0],
            kind,
            self.arg(node, 0),
            kernel=k,
            stride=_spatial2(a.get("strides"), one_d),
            padding=pad,
            nchw=self.out(node),
            ceil_mode=bool(a.get("ceil_mode", 0)),
            count_include_pad=bool(a.get("count_include_pad", 0)),
        )

    def global_pool(self, node: onnx.NodeProto) -> None:
        self.b.global_avgpool(self.ir_name(node), node.output[0], self.arg(node, 0), self.out(node))

    def global_max_pool(self, node: onnx.NodeProto) -> None:
        """GlobalMaxPool (torch's AdaptiveMaxPool(1)): a max pool over the whole image."""
        self.b.global_maxpool(self.ir_name(node), node.output[0], self.arg(node, 0), self.out(node))

    def reduce_mean(self, node: onnx.NodeProto) -> None:
        """ReduceMean (a global average pool) or ReduceMax (a max pool over the whole image)
        over H and W, or over L for a sequence."""
        a = self.attrs(node)
        axes = self.const(node, 1, "axes") if self.opset >= 18 else a.get("axes")
        rank = len(self.shape(node.input[0]))
        spatial = [2, 3] if rank == 4 else [2]  # over H and W, or over L for a sequence
        if axes is None or rank not in (3, 4) or sorted(int(x) % rank for x in axes) != spatial:
            centred = [
                n
                for n in self.graph.node
                if n.op_type == "Sub" and node.output[0] in n.input and node.input[0] in n.input
            ]
            if node.op_type == "ReduceMean" and centred:  # x - mean(x): a decomposed LayerNorm
                raise normalization_refusal(
                    "ReduceMean and Sub of its input (a layer normalisation's mean)",
                    _node_label(node),
                )
            raise Reject(f"{node.op_type} other than over H and W")
        x = self.arg(node, 0)
        name = self.ir_name(node)
        flatten = None if a.get("keepdims", 1) else self.names.create(f"{name}_flatten")
        kind = "maxpool2d" if node.op_type == "ReduceMax" else "avgpool2d"
        self.b.reduce(name, node.output[0], kind, x, self.shape(node.output[0]), flatten)

    def normalization(self, node: onnx.NodeProto) -> None:
        """LayerNormalization, GroupNormalization, InstanceNormalization: refused, saying why."""
        raise normalization_refusal(node.op_type, _node_label(node))

    def view_as(self, node: onnx.NodeProto) -> None:
        """Unsqueeze / Squeeze of the H axis of a sequence (exporters wrap 1-D pools in them)."""
        self.b.view_as(node.output[0], self.arg(node, 0), self.out(node))

    def flatten(self, node: onnx.NodeProto) -> None:
        if self.attrs(node).get("axis", 1) != 1:
            raise Reject("Flatten other than from axis 1")
        self.reshape(node)

    def reshape(self, node: onnx.NodeProto) -> None:
        out = self.shape(node.output[0])
        if len(out) == 2 or node.op_type == "Flatten":  # a flatten
            self.b.reshape(self.ir_name(node), node.output[0], self.arg(node, 0), out)
            return
        if out[0] != 1:
            raise Reject(f"Reshape to {out}: of the batch axis")
        self.b.view(self.ir_name(node), node.output[0], self.arg(node, 0), out[1:], "Reshape")

    def resize(self, node: onnx.NodeProto) -> None:
        """Resize, mode nearest (asymmetric coordinates, floor): the input row and column of each
        output row and column, floor(i / scale) in float32; mode linear (half_pixel,
        pytorch_half_pixel or align_corners coordinates): PyTorch's bilinear taps, which these
        modes define alike (`ir.bilinear_taps`; ONNX's edge values past the border are the
        clamped coordinate's)."""
        a = {k: v.decode() if isinstance(v, bytes) else v for k, v in self.attrs(node).items()}
        mode = a.get("mode", "nearest")
        coords = a.get("coordinate_transformation_mode", "half_pixel")
        setting = (mode, coords, a.get("nearest_mode", "round_prefer_floor"))
        linear = ("half_pixel", "pytorch_half_pixel", "align_corners")
        if a.get("antialias", 0) or not (
            setting == ("nearest", "asymmetric", "floor") or (mode == "linear" and coords in linear)
        ):
            got = setting if mode == "nearest" else setting[:2]
            raise Reject(
                "Resize other than nearest (asymmetric, floor) or linear (half_pixel, "
                f"pytorch_half_pixel, align_corners), not {got}"
            )
        src, out = self.shape(node.input[0]), self.shape(node.output[0])
        scales = self.const(node, 2, "scales")
        rank = 3 if mode == "linear" and len(src) == 3 else 4
        if len(src) != rank or src[:2] != out[:2]:
            raise Reject("Resize of other axes than H and W (L for a sequence)")
        given = [
            float(scales[axis]) if scales is not None and scales.size else None
            for axis in range(2, rank)
        ]
        if mode == "linear":
            sizes = list(zip(src[2:], out[2:], strict=True))
            if rank == 3:  # a sequence: the image (C, 1, L)
                sizes, given = [(1, 1), *sizes], [None, *given]
            taps: list[Taps] = []
            for (size, o), scale in zip(sizes, given, strict=True):
                if o == 1 and size > 1 and coords == "pytorch_half_pixel":
                    taps.append((((0, 0),), (0.0,)))  # its one output reads the first row
                else:
                    sf = None if scale is None else _decimal(scale)
                    taps.append(bilinear_taps(size, o, coords == "align_corners", sf))
            self.b.resize_bilinear(
                self.ir_name(node), node.output[0], self.arg(node, 0), taps[0], taps[1], out[1:]
            )
            return
        idx = []
        for axis, scale in zip((2, 3), given, strict=True):
            step = np.float32(scale) if scale is not None else None
            step = np.float32(out[axis]) / np.float32(src[axis]) if step is None else step
            i = np.floor(np.arange(out[axis], dtype=np.float32) / step).astype(np.int64)
            idx.append(tuple(int(v) for v in np.minimum(i, src[axis] - 1)))
        self.b.upsample_nearest(
            self.ir_name(node), node.output[0], self.arg(node, 0), idx[0], idx[1], out[1:]
        )

    def transpose(self, node: onnx.NodeProto) -> None:
        """A permutation of the axes after the batch axis (channel shuffle's transpose); one that
        moves the batch axis starts a `_Gathered` value (an exported adaptive average pool)."""
        rank = len(self.shape(node.input[0]))
        perm = [int(p) for p in self.attrs(node).get("perm", range(rank - 1, -1, -1))]
        x = self.arg(node, 0)
        if perm[0] != 0:
            shape = self.shape(node.input[0])
            terms = np.arange(math.prod(shape), dtype=np.int64).reshape(*shape, 1)
            self.gathered[node.output[0]] = _Gathered(
                x, terms.transpose(*perm, rank), np.ones(()), node, node
            )
            return
        dims = tuple(p - 1 for p in perm[1:])
        self.b.permute(self.ir_name(node), node.output[0], x, dims, "Transpose")

    # ------------------------------------------------------------------ gathered values
    def gathered_op(self, node: onnx.NodeProto) -> bool:
        """Follow a node that reads `_Gathered` values into a new one, or return False (the
        node reads them as tensors: `materialize` them)."""
        ins = [self.gathered.get(v) for v in node.input]
        g = ins[0]
        out = node.output[0]
        op, a = node.op_type, self.attrs(node)
        if g is not None and op == "Transpose":
            perm = [int(p) for p in a.get("perm", range(len(g.shape) - 1, -1, -1))]
            div = np.broadcast_to(g.divisor, g.shape).transpose(perm)
            self.gathered[out] = g.but(node, g.terms.transpose(*perm, len(perm)), div)
        elif g is not None and op in ("GatherND", "Gather") and node.input[1] in self.consts:
            idx = self.consts[node.input[1]].astype(np.int64)
            if op == "GatherND":
                k = idx.shape[-1]
                if a.get("batch_dims", 0) or k > len(g.shape):
                    return False
                at = tuple(np.where(idx[..., j] < 0, idx[..., j] + g.shape[j], idx[..., j])
                           for j in range(k))  # fmt: skip
                terms = g.terms[at]
                div = np.broadcast_to(g.divisor, g.shape)[at]
            else:
                axis = int(a.get("axis", 0)) % len(g.shape)
                idx = np.where(idx < 0, idx + g.shape[axis], idx)
                terms = np.take(g.terms, idx, axis=axis)
                div = np.take(np.broadcast_to(g.divisor, g.shape), idx, axis=axis)
            self.gathered[out] = g.but(node, terms, div)
        elif op == "Where" and len(node.input) == 3 and node.input[0] in self.consts:
            cond = self.consts[node.input[0]].astype(bool)
            which = [i for i in (1, 2) if ins[i] is not None]
            zero = self.consts.get(node.input[3 - which[0]]) if len(which) == 1 else None
            if zero is None or np.any(zero != 0):
                return False
            g = ins[which[0]]
            assert g is not None
            shape = np.broadcast_shapes(cond.shape, g.shape, zero.shape)
            kept = (cond if which[0] == 1 else ~cond)[..., None]
            terms = np.where(kept, _terms_to(g.terms, shape), -1)
            self.gathered[out] = g.but(node, terms, np.broadcast_to(g.divisor, shape))
        elif op == "Add" and ins[0] is not None and ins[1] is not None:
            ga, gb = ins[0], ins[1]
            shape = np.broadcast_shapes(ga.shape, gb.shape)
            div = np.broadcast_to(ga.divisor, shape)
            if ga.source != gb.source or np.any(div != np.broadcast_to(gb.divisor, shape)):
                return False
            terms = np.concatenate([_terms_to(ga.terms, shape), _terms_to(gb.terms, shape)], -1)
            self.gathered[out] = ga.but(node, terms, div)
        elif g is not None and op == "Div" and node.input[1] in self.consts:
            d = self.consts[node.input[1]].astype(np.float64)
            if not np.all(np.isfinite(d) & (d > 0)):
                return False
            shape = np.broadcast_shapes(g.shape, d.shape)
            self.gathered[out] = g.but(node, _terms_to(g.terms, shape), g.divisor * d)
        elif g is not None and op in ("ReduceMean", "ReduceSum"):
            axes = self.const(node, 1, "axes") if len(node.input) > 1 else a.get("axes")
            rank = len(g.shape)
            if axes is None or np.size(axes) == 0:  # (all axes, or none: not a pool's)
                return False
            red = sorted({int(v) % rank for v in np.asarray(axes).reshape(-1)})
            keep = [i for i in range(rank) if i not in red]
            div = np.broadcast_to(g.divisor, g.shape)
            first = div[tuple(slice(0, 1) if i in red else slice(None) for i in range(rank))]
            if not np.array_equal(div, np.broadcast_to(first, g.shape)):
                return False  # a divisor that differs along the axes summed
            terms = g.terms.transpose(*keep, *red, rank)
            terms = terms.reshape(*(g.shape[i] for i in keep), -1)
            div = first.reshape([g.shape[i] for i in keep])
            if op == "ReduceMean":
                div = div * math.prod(g.shape[i] for i in red)
            if a.get("keepdims", 1):
                terms = np.expand_dims(terms, tuple(red))
                div = np.expand_dims(div, tuple(red))
            self.gathered[out] = g.but(node, terms, div)
        else:
            return False
        return True

    def materialize(self, value: str) -> None:
        """A `_Gathered` value read as a tensor: an `adaptive_avgpool2d` if each element (n, c,
        i, j) is the mean of the pixels of rows[i] x cols[j] of the source's channel c."""
        g = self.gathered.pop(value)
        src, shape = self.shape(g.source), g.shape
        refused = Reject(
            f"values moved across the batch axis at node '{_node_label(g.start)}' (Transpose) "
            "that are not the means of windows of the image (an exported adaptive average pool)"
        )
        if len(src) != 4 or len(shape) != 4 or shape[:2] != src[:2] or shape[0] != 1:
            raise refused
        _, c, h, w = src
        terms = g.terms[0]
        div = np.broadcast_to(g.divisor, shape)[0]

        def span(v: np.ndarray) -> tuple[int, int]:
            return (int(v.min()), int(v.max()) + 1) if v.size else (0, 0)

        rows = tuple(span(terms[0, i, 0][terms[0, i, 0] >= 0] // w % h) for i in range(shape[2]))
        cols = tuple(span(terms[0, 0, j][terms[0, 0, j] >= 0] % w) for j in range(shape[3]))
        counts = []
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(cols):
                area = (r1 - r0) * (c1 - c0)
                want = (np.arange(c)[:, None, None] * h * w + np.arange(r0, r1)[:, None] * w
                        + np.arange(c0, c1)).reshape(c, area)  # fmt: skip
                got = np.sort(terms[:, i, j], axis=-1)
                if not area or got.shape[-1] < area or np.any(got[:, :-area] >= 0):
                    raise refused
                if not np.array_equal(got[:, -area:], want) or np.any(div[:, i, j] != area):
                    raise refused
                counts.append(area)
        self.b.windowed_pool(
            self.ir_name(g.node), value, "avgpool2d", g.source, rows, cols, tuple(counts), shape[1:]
        )

    def _pieces(self, node: onnx.NodeProto, axis: int, sizes: list[int]) -> list[tuple[int, int]]:
        rank = len(self.shape(node.input[0]))
        if axis % rank == 0:
            raise Reject(f"{node.op_type} of the batch axis")
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
        return bounds

    def _split_sizes(self, node: onnx.NodeProto, total: int, count: int) -> list[int]:
        """The sizes of a Split / SplitToSequence of `total`: given, or `count` (near-)equal
        pieces."""
        given = self.const(node, 1, "split") if len(node.input) > 1 else None
        if given is None:
            given = self.attrs(node).get("split")
        if given is not None and np.ndim(given) == 1:
            return [int(v) for v in np.asarray(given).reshape(-1)]
        step = int(np.asarray(given).reshape(-1)[0]) if given is not None else -(-total // count)
        return [min(step, total - i) for i in range(0, total, step)]

    def split(self, node: onnx.NodeProto) -> None:
        """Split: one slice per output (chunk/split of channels)."""
        a = self.attrs(node)
        axis = int(a.get("axis", 0)) % len(self.shape(node.input[0]))
        total = self.shape(node.input[0])[axis]
        sizes = self._split_sizes(node, total, int(a.get("num_outputs", len(node.output))))
        x = self.arg(node, 0)
        for out, (start, stop) in zip(node.output, self._pieces(node, axis, sizes), strict=True):
            if out:
                self.b.slice(self.ir_name(node), out, x, axis - 1, start, stop, "Split")

    def split_to_sequence(self, node: onnx.NodeProto) -> None:
        """SplitToSequence (a chunk): its pieces are read by SequenceAt."""
        a = self.attrs(node)
        axis = int(a.get("axis", 0)) % len(self.shape(node.input[0]))
        if not int(a.get("keepdims", 1)) and len(node.input) < 2:
            raise Reject("SplitToSequence with keepdims=0")
        total = self.shape(node.input[0])[axis]
        sizes = self._split_sizes(node, total, total)
        self.pieces[node.output[0]] = (self.arg(node, 0), axis, self._pieces(node, axis, sizes))

    def sequence_at(self, node: onnx.NodeProto) -> None:
        seq = node.input[0]
        if seq not in self.pieces:
            raise Reject("SequenceAt of a sequence not made by SplitToSequence")
        x, axis, bounds = self.pieces[seq]
        pos = self.const(node, 1, "position")
        assert pos is not None
        start, stop = bounds[int(pos.reshape(-1)[0])]
        self.b.slice(self.ir_name(node), node.output[0], x, axis - 1, start, stop, "SequenceAt")

    def slice(self, node: onnx.NodeProto) -> None:
        """Slice with constant bounds and step 1 (a chunk of channels)."""
        shape = self.shape(node.input[0])
        starts, ends = self.const(node, 1, "starts"), self.const(node, 2, "ends")
        axes, steps = self.const(node, 3, "axes"), self.const(node, 4, "steps")
        assert starts is not None and ends is not None
        axes = np.arange(len(starts)) if axes is None else axes
        if steps is not None and np.any(steps != 1):
            raise Reject("Slice with a step other than 1")
        value = self.arg(node, 0)
        name = self.ir_name(node)
        for i, (ax, lo, hi) in enumerate(zip(axes, starts, ends, strict=True)):
            ax = int(ax) % len(shape)
            lo, hi, _ = slice(int(lo), int(hi)).indices(shape[ax])
            if ax == 0:
                raise Reject("Slice of the batch axis")
            out = node.output[0] if i == len(axes) - 1 else f"{node.output[0]}:{i}"
            self.b.slice(name, out, value, ax - 1, lo, hi, "Slice")
            value = out

    def add(self, node: onnx.NodeProto) -> None:
        consts = [i for i in (0, 1) if node.input[i] in self.consts]
        if consts:
            c = self.weight(node, consts[0], "addend")
            assert c is not None
            x = self.arg(node, 1 - consts[0])
            channels = self.shape(x)[1]
            bias = self._per_channel(c, channels, "Add of a constant")
            self.b.bias_add(node.output[0], x, bias, self.users[x] > 1)
            return
        a, b = self.arg(node, 0), self.arg(node, 1)
        self.b.add(self.ir_name(node), node.output[0], a, b, self.out(node))

    def softmax(self, node: onnx.NodeProto) -> None:
        """Softmax over the channel axis (before opset 13, `axis` flattens the trailing axes:
        the same only when they are all 1)."""
        shape = self.shape(node.input[0])
        axis = int(self.attrs(node).get("axis", -1 if self.opset >= 13 else 1))
        if self.opset < 13 and math.prod(shape[2:]) != 1:
            raise Reject("Softmax (opset < 13) over more than the channels")
        self.b.softmax(self.ir_name(node), node.output[0], self.arg(node, 0), axis, self.out(node))

    def concat(self, node: onnx.NodeProto) -> None:
        rank = len(self.shape(node.output[0]))
        if int(self.attrs(node)["axis"]) % rank != 1:
            raise Reject("Concat other than on the channel axis (axis=1)")
        xs = [self.arg(node, i) for i in range(len(node.input))]
        self.b.concat(self.ir_name(node), node.output[0], xs, self.out(node))

    def pad(self, node: onnx.NodeProto) -> None:
        a = self.attrs(node)
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        pads = self.const(node, 1, "pads")
        value = self.const(node, 2, "constant value")
        rank = len(self.shape(node.input[0]))
        axes_arr = self.const(node, 3, "axes")
        axes = list(range(rank)) if axes_arr is None else [int(x) % rank for x in axes_arr]
        if mode != "constant" or pads is None or (value is not None and value.any()):
            raise Reject("padding other than non-negative zero padding of H and W")
        full = [0] * (2 * rank)
        for i, ax in enumerate(axes):
            full[ax], full[rank + ax] = int(pads[i]), int(pads[len(axes) + i])
        if rank != 4 or any(full[i] for i in (0, 1, 4, 5)):
            raise Reject("padding other than non-negative zero padding of H and W")
        self.b.zero_pad(node.output[0], self.arg(node, 0), (full[2], full[6], full[3], full[7]))

    def identity(self, node: onnx.NodeProto) -> None:
        self.only_first_output(node)
        if node.op_type == "Dropout":
            training = self.const(node, 2, "training_mode")
            if training is not None and bool(training.reshape(-1)[0]):
                raise Reject("Dropout with training_mode=True")
        if self._meta_list(node, "pkg.torch.onnx.name_scopes"):
            self.ir_name(node)  # an fx node (DenseNet's cat of one value): it took a name there
        self.b.same(node.output[0], self.arg(node, 0))

    HANDLERS: ClassVar[dict[str, Callable[[_Converter, onnx.NodeProto], None]]] = {
        "Conv": conv,
        "ConvTranspose": conv_transpose,
        "Gemm": gemm,
        "MatMul": matmul,
        "BatchNormalization": batchnorm,
        "Relu": relu,
        "Clip": clip,
        "MaxPool": pool,
        "AveragePool": pool,
        "GlobalAveragePool": global_pool,
        "GlobalMaxPool": global_max_pool,
        "ReduceMean": reduce_mean,
        "ReduceMax": reduce_mean,
        "Unsqueeze": view_as,
        "Squeeze": view_as,
        "Flatten": flatten,
        "Reshape": reshape,
        "Transpose": transpose,
        "Resize": resize,
        **dict.fromkeys(
            ("LayerNormalization", "GroupNormalization", "InstanceNormalization"), normalization
        ),
        "Split": split,
        "SplitToSequence": split_to_sequence,
        "SequenceAt": sequence_at,
        "Slice": slice,
        "Add": add,
        "Concat": concat,
        "Softmax": softmax,
        "Pad": pad,
        "Dropout": identity,
        "Identity": identity,
        "Mul": mul,
        **dict.fromkeys(_LUT_OPS, lut),
    }

    # ------------------------------------------------------------------ driver
    def run(self) -> Graph:
        value = self.input.name
        # the input's name is taken first, as in torch.fx
        self.b.set_input(self.names.create(value), value, self.shapes[value][1:])
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise self.fail(node, f"unsupported op {node.domain}.{node.op_type}")
            if all(o in self.consts for o in node.output if o) or self.fold(node):
                continue
            try:
                if any(v in self.gathered for v in node.input) and self.gathered_op(node):
                    continue
                for v in node.input:
                    if v in self.gathered:
                        self.materialize(v)
            except Reject as e:
                raise self.fail(node, str(e)) from None
            handler = self.HANDLERS.get(node.op_type)
            if handler is None:
                raise self.fail(node)
            try:
                handler(self, node)
            except Reject as e:
                raise self.fail(node, str(e)) from None
        for output in self.graph.output:  # one or more, in the model's order
            out = output.name
            if out in self.gathered:
                try:
                    self.materialize(out)
                except Reject as e:
                    raise UnsupportedModelError(f"{e} at the model output '{out}'") from None
            if not self.b.knows(out):
                raise InvalidModelError("the model computes nothing from its input")
            try:
                self.b.set_output(out)
            except Reject as e:
                raise UnsupportedModelError(f"{e} at the model output '{out}'") from None
        return self.b.freeze()


def _pair2(v: Any) -> tuple[int, int]:
    a, b = (int(x) for x in v)
    return (a, b)


def _spatial2(v: Any, one_d: bool, default: int = 1) -> tuple[int, int]:
    """Strides, dilations or a kernel of a 2-D op, or of a 1-D op as (1, L) (`default` 1;
    output_padding: 0)."""
    if one_d:
        return (default, int(v[0]) if v else default)
    return _pair2(v if v else [default, default])
