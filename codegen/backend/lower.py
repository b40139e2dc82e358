"""Lowering: the integer graph -> a list of kernel calls and a memory plan.

For every node this chooses the kernel (its template and C name) and the accumulator container:
`uint16_t` for acc_bits <= 16, `uint32_t` for acc_bits <= 32. Kernel names follow the DESIGN
convention `<kernel>_acc<container>` (e.g. `conv2d_pointwise_acc16`) for the kernels that
accumulate, and the bare op name otherwise (`maxpool2d`, `concat`). `reshape` nodes are not
kernels: their output aliases their input in memory (see `codegen.backend.memory`).

A `lut` node whose input comes only from a requantizing kernel that can apply a table in its store
step is fused into that kernel (`fuse_luts`): the kernel stores table[requantize(acc)], so the
intermediate tensor never exists. The integer reference still runs the unfused graph; the fused
kernel computes exactly what the producer and the table compute one after the other.

Everything here is a pure function of the graph (and the dialect), so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from codegen.backend import memory
from codegen.core.errors import UnsupportedModelError
from codegen.core.formats import tile_bounds
from codegen.core.ir import Graph, Node, conv_out_size

DIALECTS = ("c", "neon", "dsp", "mve")
"""Kernel dialects; a dialect without its own template of a kernel uses the portable C one."""

ACC_OPS = frozenset(
    {
        "conv2d",
        "dense",
        "avgpool2d",
        "global_avgpool",
        "add",
        "mul",
        "adaptive_avgpool2d",
        "resize_bilinear",
    }
)
"""Ops whose accumulator width (attrs["acc_bits"]) is part of the semantics."""

MAX_ACC_BITS = 32

INPLACE_INPUTS: Mapping[str, tuple[int, ...]] = {
    "add": (0, 1),
    "lut": (0,),
    "mul": (0, 1),
    "softmax": (0,),
}
"""Kernel templates whose output may overwrite the given inputs (elementwise kernels)."""


_STORE_TABLE = frozenset(
    {
        "conv2d",
        "conv2d_pointwise",
        "conv2d_depthwise",
        "dense",
        "add",
        "mul",
        "avgpool2d",
        "global_avgpool",
    }
)
LUT_FUSION: Mapping[str, frozenset[str]] = {
    "c": _STORE_TABLE,
    "neon": _STORE_TABLE,
    "dsp": _STORE_TABLE,
    "mve": frozenset(),
}
"""Per dialect, the kernel templates into which `fuse_luts` folds a following `lut`: every code
path of the dialect's template (and of the portable fallback it includes) stores
table[requantize(acc)] when the kernel context has `lut` (the portable `q.requantize` macro, which
the DSP kernels use too, and NEON's `requant_store`: TBL/TBX on AArch64). Helium fuses nothing:
its standalone table kernel reads 16 values per VLDRB gather, and a gather in the int32-lane
store step of these kernels reads 4; measured on cortex-m55 (QEMU), the fused conv, pointwise,
add, mul and pools executed 7-21 % more instructions than the kernel and the standalone table."""


class LoweringError(UnsupportedModelError):
    """The integer graph uses something the C kernels cannot express."""


@dataclass(frozen=True)
class KernelCall:
    """One node lowered to one kernel."""

    node: Node
    template: str
    """Template stem under templates/kernels/<dialect>/ (e.g. "conv2d_depthwise")."""
    kernel: str
    """Full kernel name, as in test ids (e.g. "conv2d_depthwise_acc16")."""
    acc_bits: int | None
    container_bits: int | None
    """16 or 32 for accumulating kernels, None otherwise."""
    acc_tile: int | None = None
    """Two-stage accumulation: terms per tile (attrs["acc_tile"]), None for one stage."""
    acc2_bits: int | None = None
    """Two-stage accumulation: the width of the tile sums' accumulator (attrs["acc2_bits"])."""
    lut: Node | None = None
    """A `lut` node fused into this kernel (`fuse_luts`): its table is applied in the store step."""
    exact_tile: int | None = None
    """A two-stage node (tiles of this many terms) that no tile can wrap, run as one stage of
    acc_bits = its acc2_bits (`tiles_cannot_wrap`); None otherwise."""

    @property
    def acc_ctype(self) -> str | None:
        return None if self.container_bits is None else f"uint{self.container_bits}_t"


@dataclass(frozen=True)
class Lowered:
    graph: Graph
    """The graph the kernels run: the integer graph with its fused `lut` nodes folded away."""
    dialect: str
    calls: tuple[KernelCall, ...]
    plan: memory.MemoryPlan

    @property
    def fused_luts(self) -> dict[str, str]:
        """Fused `lut` node -> the node whose kernel applies its table."""
        return {c.lut.name: c.node.name for c in self.calls if c.lut is not None}

    def call(self, node_name: str) -> KernelCall:
        for c in self.calls:
            if c.node.name == node_name:
                return c
        raise KeyError(node_name)


def container_bits(acc_bits: int) -> int:
    """The C container of an accumulator of `acc_bits` bits: 16 or 32."""
    if not 1 <= acc_bits <= MAX_ACC_BITS:
        raise LoweringError(
            f"accumulator width {acc_bits} is not supported by the C kernels (1..{MAX_ACC_BITS});"
            " quantize for a narrower accumulator"
        )
    return 16 if acc_bits <= 16 else 32


def _shape(graph: Graph, tensor: str) -> tuple[int, ...]:
    return graph.tensors[tensor].shape


def choose_template(graph: Graph, node: Node, one_stage: bool = False) -> str:
    """The kernel template of a node (before the accumulator suffix); one_stage: a two-stage
    node run as one stage (`tiles_cannot_wrap`)."""
    if node.op == "conv2d" and "acc_tile" in node.attrs and not one_stage:
        return "conv2d"  # two stages: the generic kernel (any groups), NEON's GEMM when it applies
    if node.op == "conv2d":
        _, kh, kw, cin_g = node.params["weight"].shape
        cin = _shape(graph, node.inputs[0])[-1]
        groups = int(node.attrs["groups"])
        if groups == 1 and kh == 1 and kw == 1 and not any(node.attrs["padding"]):
            return "conv2d_pointwise"
        if groups > 1 and groups == cin and cin_g == 1:
            return "conv2d_depthwise"
        return "conv2d"
    if node.op in (
        "dense",
        "maxpool2d",
        "avgpool2d",
        "global_avgpool",
        "add",
        "concat",
        "lut",
        "mul",
        "softmax",
        "gather",
        "adaptive_avgpool2d",
        "adaptive_maxpool2d",
        "zero_insert",
        "resize_bilinear",
    ):
        return node.op
    raise LoweringError(f"op {node.op!r} of node {node.name!r} has no C kernel")


def _check_node(graph: Graph, node: Node) -> None:
    for t in (*node.inputs, node.output):
        if t not in graph.tensors:
            raise LoweringError(f"node {node.name!r} refers to unknown tensor {t!r}")
    if node.op != "reshape" and node.requant is None:
        raise LoweringError(f"node {node.name!r} has no requantization; quantize the graph first")
    if node.op in ACC_OPS and "acc_bits" not in node.attrs:
        raise LoweringError(
            f"node {node.name!r} has no attrs['acc_bits']; quantize the graph first"
        )
    if "acc_tile" in node.attrs:
        tile, acc = int(node.attrs["acc_tile"]), int(node.attrs["acc_bits"])
        acc2 = int(node.attrs.get("acc2_bits", 32))
        if node.op not in ("conv2d", "dense") or tile < 1 or not acc < acc2 <= MAX_ACC_BITS:
            raise LoweringError(
                f"node {node.name!r}: two-stage accumulation needs a conv2d or dense node,"
                f" acc_tile >= 1 and acc_bits < acc2_bits <= {MAX_ACC_BITS}"
                f" (got {node.op}, {tile}, {acc}, {acc2})"
            )
    if node.requant is not None:
        rq = node.requant
        if not (-128 <= rq.lo <= rq.hi <= 127):
            raise LoweringError(
                f"node {node.name!r}: saturation limits [{rq.lo}, {rq.hi}] leave the int8 container"
            )
        shifts = [int(s) for s in rq.shift.reshape(-1)]
        if any(s < -31 or s > 62 for s in shifts):
            raise LoweringError(f"node {node.name!r}: requantization shift outside [-31, 62]")
    if node.op == "reshape":
        src, dst = graph.tensors[node.inputs[0]], graph.tensors[node.output]
        if src.size != dst.size:
            raise LoweringError(f"reshape {node.name!r} changes the number of elements")


def _check_shapes(graph: Graph, node: Node) -> None:
    """The shapes the kernels index with must agree with the attributes (no out-of-bounds C)."""
    ins = [graph.tensors[t].shape for t in node.inputs]
    out = graph.tensors[node.output].shape
    a = node.attrs

    def bad(why: str) -> LoweringError:
        return LoweringError(f"node {node.name!r} ({node.op}): {why}")

    def spatial(kh: int, kw: int, dilation: tuple[int, int]) -> tuple[int, int]:
        h, w = ins[0][0], ins[0][1]
        sh, sw = a.get("stride", (1, 1))
        t, b, left, r = a.get("padding", (0, 0, 0, 0))
        if min(sh, sw) < 1 or min(dilation) < 1 or min(t, b, left, r) < 0:
            raise bad("stride and dilation must be >= 1, padding >= 0")
        return (
            conv_out_size(h, kh, sh, t, b, dilation[0]),
            conv_out_size(w, kw, sw, left, r, dilation[1]),
        )

    if node.op in ("conv2d", "maxpool2d", "avgpool2d", "global_avgpool") and len(ins[0]) != 3:
        raise bad(f"input shape {ins[0]} is not (H, W, C)")
    if node.op == "conv2d":
        w = node.params["weight"]
        groups = int(a.get("groups", 1))
        if w.ndim != 4 or groups < 1 or w.shape[0] % groups or ins[0][2] != w.shape[3] * groups:
            raise bad(f"weight {w.shape} does not match input {ins[0]} with {groups} groups")
        oh, ow = spatial(int(w.shape[1]), int(w.shape[2]), tuple(a.get("dilation", (1, 1))))
        if out != (oh, ow, w.shape[0]):
            raise bad(f"output shape {out} should be {(oh, ow, w.shape[0])}")
    elif node.op == "dense":
        w = node.params["weight"]
        if w.ndim != 2 or ins[0] != (w.shape[1],) or out != (w.shape[0],):
            raise bad(f"weight {w.shape} does not match input {ins[0]} and output {out}")
    elif node.op in ("maxpool2d", "avgpool2d"):
        kh, kw = a["kernel"]
        oh, ow = spatial(int(kh), int(kw), (1, 1))
        if out != (oh, ow, ins[0][2]):
            raise bad(f"output shape {out} should be {(oh, ow, ins[0][2])}")
    elif node.op == "global_avgpool":
        if out not in ((ins[0][2],), (1, 1, ins[0][2])):  # same bytes either way
            raise bad(f"output shape {out} should be {(ins[0][2],)} or {(1, 1, ins[0][2])}")
    elif node.op == "add":
        if len(ins) != 2 or ins[0] != ins[1] or out != ins[0]:
            raise bad(f"operands {ins} and output {out} must have one shape")
    elif node.op == "mul":
        scale = (out[-1],) if out else ()
        if len(ins) != 2 or ins[0] != out or ins[1] not in (out, scale, (1, 1, *scale)):
            raise bad(f"operands {ins} must be the output's shape {out}, the second may be {scale}")
    elif node.op == "softmax":
        if len(ins) != 1 or out != ins[0] or not 1 <= out[-1] <= 1 << 16:
            raise bad(f"output {out} should be the input's {ins}, with 1..65536 channels")
        t = node.params.get("exp_table")
        if t is None or t.shape != (256,) or int(t.min()) < 0 or int(t.max()) > 1 << 15:
            raise bad("params['exp_table'] must hold 256 values in [0, 2^15]")
        if not 0 <= int(a.get("out_frac", -1)) <= 40:
            raise bad("attrs['out_frac'] must be in [0, 40]")
    elif node.op == "concat":
        if any(len(s) != len(out) or s[:-1] != out[:-1] for s in ins):
            raise bad(f"inputs {ins} differ from the output {out} outside the channel axis")
        if sum(s[-1] for s in ins) != out[-1]:
            raise bad(f"channels of {ins} do not add up to {out[-1]}")
    elif node.op == "lut":
        if len(ins) != 1 or out != ins[0]:
            raise bad(f"output shape {out} should be the input's {ins[0] if ins else ()}")
        t = node.params.get("table")
        if t is None or t.shape != (256,) or int(t.min()) < -128 or int(t.max()) > 127:
            raise bad("params['table'] must hold 256 int8 values (indexed by input + 128)")
    elif node.op in ("adaptive_avgpool2d", "adaptive_maxpool2d"):
        rows, cols = list(a["rows"]), list(a["cols"])
        if len(ins[0]) != 3 or out != (len(rows), len(cols), ins[0][2]):
            raise bad(f"output shape {out} should be ({len(rows)}, {len(cols)}, C of {ins[0]})")
        for windows, size in ((rows, ins[0][0]), (cols, ins[0][1])):
            if any(not 0 <= int(lo) < int(hi) <= size for lo, hi in windows):
                raise bad(f"a window of {windows} is empty or leaves the input (size {size})")
        rq = node.requant
        sizes = {len(rq.mult), len(rq.shift)} if rq is not None else set()
        if node.op == "adaptive_avgpool2d" and sizes - {1, len(rows) * len(cols)}:
            raise bad("requant.mult/shift must have one value per output pixel")
    elif node.op == "resize_bilinear":
        rows, cols = list(a["rows"]), list(a["cols"])
        if len(ins) != 1 or len(ins[0]) != 3 or out != (len(rows), len(cols), ins[0][2]):
            raise bad(f"output shape {out} should be ({len(rows)}, {len(cols)}, C of {ins})")
        bits = int(a.get("weight_bits", -1))
        if not 0 <= bits <= 15:
            raise bad("attrs['weight_bits'] must be in [0, 15]")
        for taps, key, size in ((rows, "row", ins[0][0]), (cols, "col", ins[0][1])):
            if any(not 0 <= int(i) < size for tap in taps for i in tap):
                raise bad(f"a {key} of {taps} leaves the input (size {size})")
            weights = [int(w) for w in a.get(f"{key}_weight", ())]
            if len(weights) != len(taps) or not all(0 <= w <= 1 << bits for w in weights):
                raise bad(f"attrs['{key}_weight'] must hold {len(taps)} values in [0, 2^{bits}]")
        fmt = graph.tensors[node.inputs[0]].fmt
        zp = int(a.get("input_zero_point", 0))
        span = max(fmt.qmax - zp, zp - fmt.qmin) if fmt is not None else 255
        acc = int(a.get("acc_bits", 0))
        if span << (2 * bits) >= 1 << max(acc - 1, 0):  # the exact sum must never wrap
            raise bad(f"|acc| <= {span << (2 * bits)} does not fit acc_bits={acc}")
    elif node.op == "gather":
        index = [int(i) for i in node.attrs.get("index", ())]
        if len(ins) != 1 or not index or len(out) != len(ins[0]) or out[:-1] != ins[0][:-1]:
            raise bad(f"output shape {out} should be the input's {ins[0]} but for channels")
        if out[-1] != len(index) or min(index) < 0 or max(index) >= ins[0][-1]:
            raise bad(f"index must name {out[-1]} channels of the input's {ins[0][-1]}")
    elif node.op == "zero_insert":
        sh, sw = (int(v) for v in a.get("stride", (0, 0)))
        if len(ins) != 1 or len(ins[0]) != 3 or min(sh, sw) < 1:
            raise bad(f"input {ins} should be one (H, W, C) image, stride {a.get('stride')} >= 1")
        ih, iw, ic = ins[0]
        want = ((ih - 1) * sh + 1, (iw - 1) * sw + 1, ic)
        if out != want:
            raise bad(f"output shape {out} should be {want}")
    if node.op in ("conv2d", "dense") and node.params.get("bias") is not None:
        bias = node.params["bias"]
        if bias.shape != (node.params["weight"].shape[0],):
            raise bad(f"bias shape {bias.shape} is not (O,)")


def tiles_cannot_wrap(graph: Graph, node: Node) -> bool:
    """Whether a two-stage node equals one stage of acc2_bits <= 32 bits: no tile can wrap (every
    tile sum fits acc_bits by the exact bound over the input format's values minus the input zero
    point, and 0 for a padded tap), so the wrapped tile sums are the exact ones and the bias plus
    them, wrapped to acc2_bits, is the plain sum wrapped once to acc2_bits."""
    fmt = graph.tensors[node.inputs[0]].fmt
    acc2 = int(node.attrs.get("acc2_bits", 32))
    if "acc_tile" not in node.attrs or fmt is None or acc2 > 32:
        return False
    zp = int(node.attrs.get("input_zero_point", 0))
    xmin, xmax = min(0, fmt.qmin - zp), max(0, fmt.qmax - zp)
    lo, hi = tile_bounds(node.params["weight"], xmin, xmax, int(node.attrs["acc_tile"]))
    half = 1 << (int(node.attrs["acc_bits"]) - 1)
    return int(lo.min(initial=0)) >= -half and int(hi.max(initial=0)) < half


def whole_image_pool(graph: Graph, node: Node) -> bool:
    """Whether an average pool's one window is its whole unpadded input: the global average
    pool's sum and requantization, bit for bit."""
    if node.op != "avgpool2d" or any(node.attrs.get("padding", (0, 0, 0, 0))):
        return False
    h, w = _shape(graph, node.inputs[0])[:2]
    return tuple(node.attrs["kernel"]) == (h, w) and _shape(graph, node.output)[:2] == (1, 1)


def lower_node(graph: Graph, node: Node, dialect: str = "c") -> KernelCall | None:
    """The kernel call of one node, or None for a reshape (a memory alias). On Cortex-M (the
    `dsp` and `mve` dialects) a two-stage node that no tile can wrap runs as one stage, and an
    average pool over the whole image runs the global average pool's kernel."""
    _check_node(graph, node)
    _check_shapes(graph, node)
    if node.op == "reshape":
        return None
    cortex_m = dialect in ("dsp", "mve")
    one_stage = cortex_m and tiles_cannot_wrap(graph, node)
    template = choose_template(graph, node, one_stage)
    if cortex_m and whole_image_pool(graph, node):
        template = "global_avgpool"
    if node.op in ACC_OPS:
        acc = int(node.attrs["acc_bits"])
        cb = container_bits(acc)
        if "acc_tile" in node.attrs:
            tile, acc2 = int(node.attrs["acc_tile"]), int(node.attrs.get("acc2_bits", 32))
            if one_stage:
                c2 = container_bits(acc2)
                return KernelCall(node, template, f"{template}_acc{c2}", acc2, c2, exact_tile=tile)
            return KernelCall(node, template, f"{template}_acc{cb}x32", acc, cb, tile, acc2)
        return KernelCall(node, template, f"{template}_acc{cb}", acc, cb)
    return KernelCall(node, template, template, None, None)


@dataclass(frozen=True)
class LutFusion:
    graph: Graph
    """The graph the kernels run: each fused producer writes its lut's output tensor, the lut
    nodes and the tensors between are gone."""
    luts: Mapping[str, Node]
    """Producer node name -> the `lut` node fused into it."""


def fuse_luts(graph: Graph, dialect: str) -> LutFusion:
    """Fold every `lut` node into its producer where that is exact and the kernel can do it.

    A lut fuses when its input tensor is produced by a node whose template is in
    `LUT_FUSION[dialect]`, is read by nothing else and is not a graph output. The formats chain by
    construction (the table is indexed by the producer's output, already saturated to its
    requantization's [lo, hi]: a fused clamp applies before the table)."""
    outputs = set(graph.outputs)
    fusable = LUT_FUSION.get(dialect, frozenset())
    luts: dict[str, Node] = {}
    for node in graph.nodes:
        if node.op != "lut":
            continue
        t = node.inputs[0]
        producer = graph.producer(t)
        if producer is None or producer.op == "reshape" or t in outputs:
            continue
        call = lower_node(graph, producer, dialect)
        if len(graph.consumers(t)) != 1 or call is None or call.template not in fusable:
            continue
        luts[producer.name] = node
    if not luts:
        return LutFusion(graph, {})
    dropped = {n.name for n in luts.values()}
    gone = {graph.node(p).output for p in luts}
    nodes = tuple(
        replace(n, output=luts[n.name].output) if n.name in luts else n
        for n in graph.nodes
        if n.name not in dropped
    )
    tensors = {k: v for k, v in graph.tensors.items() if k not in gone}
    return LutFusion(graph.with_nodes(nodes, tensors), luts)


def lower(graph: Graph, dialect: str = "c", align: int = 1, fuse: bool = True) -> Lowered:
    """Kernel choice for every node plus the static memory plan. fuse=False keeps every `lut`
    a kernel of its own (`fuse_luts`)."""
    if dialect not in DIALECTS:
        raise LoweringError(f"dialect {dialect!r} is not implemented (have: {', '.join(DIALECTS)})")
    if not graph.is_quantized:
        raise LoweringError(
            "the graph is not quantized (a tensor has no format); quantize it first"
        )
    for node in graph.nodes:  # every node is checked, the fused luts too
        lower_node(graph, node, dialect)
    fusion = fuse_luts(graph, dialect) if fuse else LutFusion(graph, {})
    g = fusion.graph
    calls = []
    inplace: dict[str, tuple[int, ...]] = {}
    for node in g.nodes:
        call = lower_node(g, node, dialect)
        if call is None:
            continue
        calls.append(replace(call, lut=fusion.luts.get(node.name)))
        if call.template in INPLACE_INPUTS:
            inplace[node.name] = INPLACE_INPUTS[call.template]
    plan = memory.plan(g, inplace=inplace, align=align)
    return Lowered(g, dialect, tuple(calls), plan)
