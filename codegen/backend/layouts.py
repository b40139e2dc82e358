"""Data layouts of the NEON kernels: packed weights, padded per-channel constants, blocking.

The NEON kernels (templates/kernels/neon/) read their constants in the order their inner loops
consume them. This module decides, per kernel call, whether a NEON kernel applies and with which
register blocking, and computes the packed arrays; `codegen.backend.emit` stores them in weights.c.

Accumulation paths (report.json "path" of each layer):

* ``acc16``: acc_bits <= 16. Inputs are widened to int16 with the input zero point subtracted
  (x - zp fits int16 for any int8 x and zp), weights are stored as int16, and MLA (by element)
  multiplies 8 int16 lanes and adds into 8 int16 accumulator lanes per instruction. int16 lanes
  wrap modulo 2^16 and wrapping addition is associative, so the lanes hold the exact sum modulo
  2^16 whatever the intermediate overflow; shifting left then arithmetically right by 16 - A
  sign-extends from A bits, which is formats.wrap. No int8 x int8 pair is ever summed in 16 bits,
  so the -128 * -128 pair overflow of vmull_s8 + vmlal_s8 kernels cannot occur.
* ``acc32``: 16 < acc_bits <= 32 without dotprod. The same int16 operands, SMLAL/SMLAL2 (by
  element) into int32 lanes: every product (|x - zp| <= 255, |w| <= 128) is exact in int32 and
  the lanes wrap modulo 2^32; the final wrap to A bits is again a shift pair. Like SDOT's, these
  int32 lanes are requantized in int32 (qacc_neon_requant8_32) where `_vec_requant_ok` proves it
  equal to THE requantization for the layer's accumulator bound.
* ``acc32-sdot`` / ``acc16-sdot``: any acc_bits on a core with dotprod (cortex-a76, cortex-a55):
  SDOT (by element) adds four int8 x int8 products into each int32 lane. The operands must stay
  int8, so the input zero point is folded into the bias: sum w (x - zp) = sum w x - zp * sum w
  (mod 2^A), and padding taps hold the raw value zp (they contribute w * zp, cancelled by the same
  correction). The kernel reads the input in place (a copy with zp in the padding when there is
  padding), kernel row by kernel row (`_sdot_geometry`), in register blocks of up to 5 pixels x
  16 output channels whose weights come in one LD1 of four vectors per 4 terms; every input
  channel count takes it (a 1- or 3-channel stem walks its kernel rows of KW * IC values).
  acc16-sdot is the same kernel for acc_bits <= 16: the int32 lanes hold the sum modulo 2^32, and
  the shift pair by 32 - A wraps it to A bits, which equals wrapping modulo 2^A at every step
  (wrapping addition is associative); it is faster than the int16 MLA path on these cores.

* ``acc16x32``: two-stage accumulation (attrs acc_tile = T, acc2_bits; codegen.core.ir) with a
  first stage of at most 16 bits. The acc16 MLA into int16 lanes for each tile of T terms; the
  tile's lanes are wrapped to acc_bits (shift pair), widened and added into two int32x4 lanes
  (SADDW/SADDW2) that started at the bias, and restarted at 0. The inner loop walks the terms in the
  weight layout's order (direct or im2col walk; the "rows" walk pads inside the order, so only a
  single tile, T >= K, takes it), so tile boundaries fall after every T lanes (T = 1, 2, 4),
  every T / 8 blocks of 8 terms (a multiple of 8), or at the end (T >= K: the acc16 register
  block, widened once after the loop). Tiles of a multiple of 8 terms below K keep the acc16
  register block too: the int32 sums live in a buffer on the stack; the first tile sets them to
  the bias plus its sum (SADDW/SADDW2 from the bias, STP), each later tile reads, adds and writes
  them back, and the last tile is widened into registers as the sums are requantized in int32
  (qacc_neon_requant8_32, where `_lane_bound`'s per-tile bound proves it equal). Where a tap
  holds whole tiles, the kernel loops over the tap's tiles and starts each with MUL (no restart
  at 0); where a tile holds whole taps, it counts taps rather than blocks of 8 terms.
  Other T, groups > 1 and wider first stages use the portable kernel (path ``acc16x32-portable``).

Requantization stays `qacc_requantize`'s function; the kernels evaluate it on 8 lanes at once when
every multiplier fits int32 (see `qacc_neon_requant8` in the templates, tested against
formats.requantize), and call qacc_requantize per lane otherwise. int16 lanes whose multipliers are
all 1 (power-of-two scales) take one saturating rounding shift (`qacc_neon_requant8_16s`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from codegen.backend.lower import KernelCall, container_bits
from codegen.core.formats import wrap
from codegen.core.ir import Graph, Node

GEMM_TEMPLATES = frozenset({"conv2d", "conv2d_pointwise", "dense"})
"""Templates that the NEON convolution/GEMM kernel implements (groups == 1)."""


class AddArray(Protocol):
    def __call__(
        self, what: str, ctype: str, values: Sequence[int], comment: str, bits: int = 0
    ) -> str:
        """(what, ctype, values, comment[, bits: store packed]) -> the C symbol of a new const
        array."""
        ...


# ----------------------------------------------------------------------------- packed weights
#
# A weighted node (conv2d, dense) may declare attrs["weight_bits"] = b (2..8): every weight lies in
# [-2^(b-1), 2^(b-1) - 1]. With b <= 4 its weights are stored packed in flash, in the order the
# kernel consumes them (after the layout transform): two 4-bit two's-complement values per byte
# (element 2i in the low nibble, 2i+1 in the high nibble), or with b <= 2 four 2-bit values per
# byte (element 4i+j in bits 2j..2j+1). The kernels unpack one block (an output channel, or a
# block of output channels) into the scratch buffer and run their inner loops on it; the loops are
# ordered so that a block is unpacked once per inference (output channels outer, pixels inner).


def weight_storage_bits(node: Node) -> int:
    """Bits per stored weight of a node: 4 or 2 (packed), 0 for unpacked int8/int16 storage.

    Raises ValueError when the weights do not fit the declared attrs["weight_bits"] (the graph is
    inconsistent: whoever set the attribute must have produced weights in range)."""
    if "weight_bits" not in node.attrs or "weight" not in node.params:
        return 0
    b = int(node.attrs["weight_bits"])
    if not 2 <= b <= 8:
        raise ValueError(f"node {node.name!r}: attrs['weight_bits'] = {b} is outside 2..8")
    w = np.asarray(node.params["weight"], dtype=np.int64)
    lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
    if w.size and (int(w.min()) < lo or int(w.max()) > hi):
        raise ValueError(
            f"node {node.name!r}: weights in [{int(w.min())}, {int(w.max())}] do not fit the"
            f" declared weight_bits = {b} ([{lo}, {hi}]); the integer graph is inconsistent"
        )
    return 2 if b <= 2 else 4 if b <= 4 else 0


def pack_bits(values: Sequence[int], bits: int) -> tuple[int, ...]:
    """`values` (each in [-2^(bits-1), 2^(bits-1) - 1]) packed 8 / bits per byte, lowest bits
    first, two's complement; the last byte is padded with zero fields. ceil(n * bits / 8) bytes."""
    if bits not in (2, 4):
        raise ValueError(f"cannot pack {bits}-bit values (2 or 4)")
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if v.size and (int(v.min()) < lo or int(v.max()) > hi):
        raise ValueError(f"values in [{int(v.min())}, {int(v.max())}] do not fit {bits} bits")
    per = 8 // bits
    fields = np.zeros(-(-v.size // per) * per, dtype=np.int64)
    fields[: v.size] = v & ((1 << bits) - 1)
    fields = fields.reshape(-1, per) << (bits * np.arange(per, dtype=np.int64))
    return tuple(int(b) for b in fields.sum(axis=1))


def unpack_bits(packed: Sequence[int], bits: int, n: int) -> np.ndarray:
    """The inverse of pack_bits: the first n values (int64)."""
    per = 8 // bits
    b = np.asarray(packed, dtype=np.int64).reshape(-1, 1)
    f = (b >> (bits * np.arange(per, dtype=np.int64))) & ((1 << bits) - 1)
    half = 1 << (bits - 1)
    return ((f ^ half) - half).reshape(-1)[:n]


DSP_MVE_BLOCK = 4
"""Output channels the DSP and MVE conv/pointwise/dense kernels sum per input load."""
MVE_PIXELS = 3
"""Output pixels of one row the MVE conv kernel sums per weight load (when all their taps lie
inside the image: 3 pixels x 2 output channels = 6 VMLADAVA accumulators, even registers)."""


def mve_pixel_block(call: KernelCall, k: Mapping[str, Any]) -> dict[str, Any]:
    """The Helium conv's pixel block, from the kernel context `k`: MVE_PIXELS neighbouring output
    pixels per loaded weight vector (0: not taken), each later pixel's input at a VLDRB immediate
    offset (imm7: at most 127 bytes) from the first's, and the input columns from a block's first
    tap to its last (the kernel takes the block when they all lie inside the image). Pixels
    further apart than that offset allows (stride 2 over 32 channels: 64 bytes) take blocks of
    2 pixels."""
    xoff = int(k["sw"]) * int(k["ic"])
    px = MVE_PIXELS if (MVE_PIXELS - 1) * xoff <= 127 else 2
    if not (
        call.template == "conv2d"
        and k["groups"] == 1
        and k["dw"] == 1
        and not k["in_zp"]
        and not k.get("wbits")
        and k["oc"] % 4 == 0
        and (px - 1) * xoff <= 127
    ):
        return {"mve_pixels": 0}
    return {
        "mve_pixels": px,
        "mve_xoff": xoff,
        "mve_xoffs": [(p, p * xoff) for p in range(1, px)],  # (register q<p>, byte offset)
        "mve_xspan": (px - 1) * int(k["sw"]) + (int(k["kw"]) - 1) * int(k["dw"]),
    }


def unpack_block(call: KernelCall, dialect: str) -> int:
    """Output channels whose packed weights the portable / DSP / MVE kernel of `call` unpacks at
    once (its scratch holds this many rows of int8 weights)."""
    if dialect not in ("dsp", "mve") or call.template not in GEMM_TEMPLATES:
        return 1
    w = call.node.params["weight"]
    oc = int(w.shape[0])
    groups = int(call.node.attrs.get("groups", 1))
    blocked = groups == 1 or (oc // groups) % DSP_MVE_BLOCK == 0
    return DSP_MVE_BLOCK if blocked and oc >= DSP_MVE_BLOCK else 1


@dataclass(frozen=True)
class NeonTarget:
    """The NEON features of a core that kernel selection reads: plain data, filled in by the
    targets stage from its table (codegen.targets.table), so the backend never looks a target up."""

    aarch64: bool = True
    dotprod: bool = False

    @property
    def vector_regs(self) -> int:
        return 32 if self.aarch64 else 16


A64 = NeonTarget()
"""A64 NEON without dotprod (cortex-a53, cortex-a72): the default features of a BuildTarget."""


def _zp_fits_int8(call: KernelCall) -> bool:
    zp = int(call.node.attrs.get("input_zero_point", 0))
    return -128 <= zp <= 127


def path(call: KernelCall, dialect: str, neon: NeonTarget) -> str | None:
    """The accumulation path of a layer: acc16, acc16-sdot, acc32 or acc32-sdot (None: no
    accumulator)."""
    if call.container_bits is None:
        return None
    if call.acc_tile is not None:
        ok = dialect == "neon" and two_stage_supported(call)
        return f"acc{call.container_bits}x32" + ("" if ok else "-portable")
    name = f"acc{call.container_bits}"
    if call.exact_tile is not None:  # two stages that no tile can wrap: one stage
        name = f"acc{container_bits(int(call.node.attrs['acc_bits']))}x32-as-{name}"
    if (
        dialect == "neon"
        and call.template in GEMM_TEMPLATES
        and neon.dotprod
        and gemm_supported(call)
        and _zp_fits_int8(call)
    ):
        return f"{name}-sdot"
    return name + _cortexm_suffix(call, dialect)


def _no_array(what: str, ctype: str, values: Sequence[int], comment: str, bits: int = 0) -> str:
    """An AddArray that stores nothing (asking a context function which kernel it picks)."""
    return what


def _cortexm_suffix(call: KernelCall, dialect: str) -> str:
    """How the Cortex-M kernels of a layer accumulate (report.json "path"): every width sums
    in 32 bits and wraps once at the end (-vmladava on Helium, -wlstp: pointwise / dense with one
    weight stream and a tail-predicated loop; -smlad on the DSP extension, -w16: pointwise / dense
    with weights stored as int16), except the Helium depthwise kernel, which sums in int16 lanes
    when the width is <= 16 or the weights bound the sum (-lanes16), else in int32 lanes
    (-lanes32); the DSP depthwise kernel uses SMLABB/SMLATT (-smlabb). A grouped conv adds
    -grouped, a depthwise layer with a channel multiplier > 1 (one pass per multiplier index)
    -chmult. Kernels that fall back to portable C get no suffix."""
    node = call.node
    if dialect not in ("dsp", "mve") or call.acc_bits is None:
        return ""
    w = node.params.get("weight")
    grouped = "-grouped" if call.template == "conv2d" and int(node.attrs["groups"]) > 1 else ""
    if call.template in GEMM_TEMPLATES and dialect == "mve":
        stream = mve_requant_context(call, _no_array)
        if stream is None or not stream["packed"]:
            return "-vmladava" + grouped
        return ("-vmladava-im2col" if stream["im2col"] else "-vmladava-wlstp") + grouped
    if call.template in GEMM_TEMPLATES:
        w16 = dsp_gemm_context(call, _no_array) is not None
        return ("-smlad-w16" if w16 else "-smlad") + grouped
    if call.template != "conv2d_depthwise" or w is None or weight_storage_bits(node):
        return ""
    if int(node.attrs.get("input_zero_point", 0)) not in range(-128, 128):
        return ""  # the padding row holds IZP as int8: the portable kernel
    m_n = depth_multiplier(call)
    mult = "-chmult" if m_n > 1 else ""
    if dialect == "dsp":
        return "-smlabb" + mult
    if m_n > MVE_DW_MAX_MULT:
        return ""
    w = np.asarray(w, dtype=np.int64)
    taps = w.reshape(w.shape[0], -1).T
    lanes = "-lanes16" if call.acc_bits <= 16 or _taps_fit_int16(taps) else "-lanes32"
    return lanes + mult


def gemm_supported(call: KernelCall) -> bool:
    if call.template not in GEMM_TEMPLATES or call.container_bits is None:
        return False
    if call.acc_tile is not None and not two_stage_supported(call):
        return False
    return int(call.node.attrs.get("groups", 1)) == 1


def two_stage_supported(call: KernelCall) -> bool:
    """The NEON GEMM kernel implements two stages (groups 1) for a first stage of at most 16 bits
    when T is 1, 2, 4, a multiple of 8 or at least K: it widens the int16 lanes after every T
    lanes of an 8-term block, every T / 8 blocks, or once at the end."""
    if call.acc_tile is None or call.container_bits != 16:
        return False
    t, k = call.acc_tile, int(np.prod(call.node.params["weight"].shape[1:]))
    return t in (1, 2, 4) or t % 8 == 0 or t >= k


def depthwise_supported(graph: Graph, call: KernelCall, multiplier: bool = False) -> bool:
    """A depthwise layer that a vector depthwise kernel runs: channel multiplier 1 (NEON), or any
    multiplier (multiplier=True: the Cortex-M kernels, one pass per multiplier index)."""
    if call.template != "conv2d_depthwise" or call.container_bits is None:
        return False
    w = call.node.params["weight"]
    cin = graph.tensors[call.node.inputs[0]].shape[-1]
    return multiplier or int(w.shape[0]) == int(cin)  # depth multiplier 1


def depth_multiplier(call: KernelCall) -> int:
    """The channel multiplier M of a depthwise layer (groups == input channels): output channel
    o reads input channel o // M."""
    return int(call.node.params["weight"].shape[0]) // int(call.node.attrs.get("groups", 1))


def by_pass(v: np.ndarray, m: int, cp: int, fill: int = 0) -> np.ndarray:
    """Per output channel values v (C * M, ...) of a depthwise layer with channel multiplier m,
    as the Cortex-M kernels read them: [pass][...][channel], pass k holding output channels
    c * M + k of the C input channels, which are padded to cp with `fill`."""
    v = np.asarray(v, dtype=np.int64)
    c = v.shape[0] // m
    out = np.full((m, *v.shape[1:], cp), fill, dtype=np.int64)
    out[..., :c] = np.moveaxis(v.reshape(c, m, *v.shape[1:]), 0, -1)
    return out


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _requant_arrays(
    call: KernelCall,
    n: int,
    add: AddArray,
    lane_bits: int,
    lane_bound: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-channel mult and negated shift, padded to n lanes (padding lanes: mult 0, shift 0);
    lane_bits: the accumulator lanes of the kernel (16: the int16 requantization may apply);
    lane_bound: a bound per output channel on |the int32 lanes| the kernel requantizes (given:
    the int32-lane requantization qacc_neon_requant8_32 applies when `_vec_requant_ok` holds for
    it and every shift is at most 31); int16 lanes whose multipliers are all 1 take
    qacc_neon_requant8_16s."""
    rq = call.node.requant
    assert rq is not None
    real = np.asarray(rq.mult, dtype=np.int64).reshape(-1)
    shift = np.asarray(rq.shift, dtype=np.int64).reshape(-1)
    channels = int(call.node.params["weight"].shape[0])
    n = _ceil_to(n, 8)  # the kernels requantize 8 lanes at a time
    mult = np.zeros(n, dtype=np.int64)
    mult[:channels] = np.broadcast_to(real, (channels,))
    rshift = np.zeros(n, dtype=np.int64)
    rshift[:channels] = -np.broadcast_to(shift, (channels,))
    vec = bool(np.all(np.abs(mult) < (1 << 31)))
    name = call.node.name
    left = np.maximum(-shift, 0)
    rq16 = (
        lane_bits == 16
        and bool(np.all(np.abs(real) <= (1 << 15) - 1))
        and bool(np.all(shift <= 31))
        and bool(np.all((np.abs(np.broadcast_to(real, left.shape)) << left) < (1 << 16)))
    )
    rq32 = (
        lane_bits == 32
        and lane_bound is not None
        and bool(np.all(shift <= 31))
        and _vec_requant_ok(call.node, lane_bound)
    )
    extra: dict[str, Any] = {"rq16": rq16, "rq16s": False, "rq32": rq32, "rq_mult32": None}
    if rq32:
        if bool(np.any(mult[:channels] != 1)):
            extra["rq_mult32"] = add(
                "nmult32", "int32_t", [int(v) for v in mult],
                f"{name}: requantization multiplier per output channel (int32), padded to {n}",
            )  # fmt: skip
        extra["rq_rshift32"] = add(
            "nrshift32", "int32_t", [int(v) for v in rshift],
            f"{name}: minus the requantization shift per output channel (int32), padded to {n}",
        )  # fmt: skip
        return extra
    if rq16 and bool(np.all(mult[:channels] == 1)) and bool(np.all(np.abs(shift) <= 15)):
        # every multiplier 1: one saturating rounding shift of the int16 lanes (requant8_16s)
        extra["rq16s"] = True
        extra["rq_rshift16"] = add(
            "nrshift16", "int16_t", [int(v) for v in rshift],
            f"{name}: minus the requantization shift per output channel (int16), padded to {n}",
        )  # fmt: skip
        return extra
    if rq16:
        extra["rq_mult16"] = add(
            "nmult16", "int16_t", [int(v) for v in mult],
            f"{name}: requantization multiplier per output channel (int16), padded to {n} lanes",
        )  # fmt: skip
        extra["rq_rshift32"] = add(
            "nrshift32", "int32_t", [int(v) for v in rshift],
            f"{name}: minus the requantization shift per output channel (int32), padded to {n}",
        )  # fmt: skip
    return extra | {
        "vec_rq": vec,
        "rq_mult": add(
            "nmult", "int32_t" if vec else "int64_t", [int(v) for v in mult],
            f"{name}: requantization multiplier per output channel, padded to {n} lanes",
        ),
        "rq_rshift": add(
            "nrshift", "int64_t", [int(v) for v in rshift],
            f"{name}: minus the requantization shift per output channel (a SRSHL amount),"
            f" padded to {n} lanes",
        ),
    }  # fmt: skip


def gemm_context(
    graph: Graph, call: KernelCall, neon: NeonTarget, add: AddArray
) -> dict[str, Any] | None:
    """Blocking and packed constants of the NEON conv2d/pointwise/dense kernel (None: use the
    portable C kernel)."""
    if not gemm_supported(call):
        return None
    nt = neon
    node = call.node
    assert call.acc_bits is not None and call.container_bits is not None
    w = np.asarray(node.params["weight"], dtype=np.int64)
    oc = int(w.shape[0])
    w2 = w.reshape(oc, -1)
    k = int(w2.shape[1])
    out_shape = graph.tensors[node.output].shape
    pixels = int(np.prod(out_shape[:-1], dtype=np.int64)) if len(out_shape) == 3 else 1
    bias = np.asarray(node.params.get("bias", np.zeros(oc, np.int64)), dtype=np.int64)
    sdot = (path(call, "neon", neon) or "").endswith("-sdot")
    two = call.acc_tile is not None  # two stages: int16 tiles widened into int32 lanes
    # SDOT sums in int32 lanes for every width: wrapping is associative, so the lanes hold the
    # sum modulo 2^32 and the final shift pair wraps it to A bits exactly as formats.wrap does
    lane_bits = 32 if sdot or two else call.container_bits
    in_zp = int(node.attrs.get("input_zero_point", 0))
    # Register blocking: P pixels x O vectors of output channels (8 lanes each, 4 for SDOT).
    lanes = 4 if sdot else 8
    ovecs = -(-oc // lanes)
    mla16 = False  # the A64 int16-lane (MLA) register block
    if sdot:
        # P x O int32 accumulators, P input vectors and O weight vectors in 32 registers (a few
        # left for addresses and temporaries): 5 x 4, 6 x 3, 8 x 2, 8 x 1
        o_max = 4
        o = min(o_max, ovecs)
        p_max = min(8, (SDOT_REGS - o) // (o + 1))
    elif two and not _tiles(call, k)["late"] and not _tiles(call, k)["tb"]:
        # tiles of T < 8 terms, widened after every T lanes: three registers per accumulator
        # vector, the int16 tile and two int32 halves
        o_max, p_max = (2, 4) if nt.aarch64 else (2, 1)
    elif call.container_bits == 16:
        # (two stages with one tile: widened after the loop; with tiles of a multiple of 8
        # terms: the int32 sums in a stack buffer, read and written once per tile)
        o_max, p_max = (4, 5) if nt.aarch64 else (4, 2)
        mla16 = nt.aarch64
    else:
        o_max, p_max = (2, 4) if nt.aarch64 else (2, 2)
    o_n = min(o_max, ovecs)
    p_n = min(p_max, pixels)
    if nt.aarch64 and not sdot and call.container_bits == 32:
        o_n, p_n = _acc32_block(ovecs, pixels, -(-k // 8))
    elif mla16:
        # int16 lanes, 4 x 5 block: fewer pixels when that leaves no partial block (6 x 6
        # pixels: 9 blocks of 4 rather than 8 of 5, the last holding one real pixel); one vector
        # of output channels: more pixels
        p_n = _pixel_block(pixels, 1, A64_ACC16_PIXELS.get(o_n, p_max))
    block = lanes * o_n
    ocp = _ceil_to(oc, block)
    kstep = 4 if sdot else 8
    kp = _ceil_to(k, kstep)
    ic = _ic(graph, call)
    mode = "im2col"
    if sdot:
        mode = "sdot"
        geo = _sdot_geometry(graph, call)
        kp = int(geo["TKH"] * geo["TKW"] * geo["TC"])
    elif k == kp and ic % kstep == 0:
        mode = "direct"
    elif not two or _tiles(call, k)["late"]:
        # rows pad each kernel row, which moves tile boundaries: only one tile may take it
        kh, _kw, row = _kernel_rows(node.params["weight"], ic)
        dw = int(node.attrs.get("dilation", (1, 1))[1])
        if dw == 1 and kh * _ceil_to(row, 8) <= 2 * kp:
            mode = "rows"
            kp = kh * _ceil_to(row, 8)
    if nt.aarch64 and two and mode == "direct" and kp >= 64 and o_n < 4 and _tiles(call, k)["mem"]:
        # two stages, fewer than 4 vectors of output channels: the registers they leave take
        # more pixels (O x P accumulators, O weights and P inputs in v0-v15 still fit 32
        # registers). Measured: one stage, short sums or the rows walk lose more than they
        # gain (GCC then copies inputs into v0-v15 before the MLAs)
        p_n = _pixel_block(pixels, p_n, A64_WIDE_PIXELS[o_n])
    wp = np.zeros((ocp, kp), dtype=np.int64)
    if mode == "sdot":
        # each walked tap (a kernel row, or one input pixel) padded with zero weights to TC terms
        wt = np.zeros((ocp, geo["TKH"] * geo["TKW"], geo["TC"]), dtype=np.int64)
        wt[:oc, :, : geo["TREAL"]] = w2.reshape(oc, geo["TKH"] * geo["TKW"], geo["TREAL"])
        wp = wt.reshape(ocp, kp)
    elif mode == "rows":
        # each kernel row (KW * IC contiguous inputs) padded with zero weights to a multiple of 8
        tc = kp // kh
        wr = np.zeros((ocp, kh, tc), dtype=np.int64)
        wr[:oc, :, :row] = w2.reshape(oc, kh, row)
        wp = wr.reshape(ocp, kp)
    else:
        wp[:oc, :k] = w2
    name = node.name
    if sdot:
        # [oc block][k / 4][vector o][lane (4 channels)][4 consecutive k]
        packed = wp.reshape(ocp // block, o_n, 4, kp // 4, 4).transpose(0, 3, 1, 2, 4)
        wctype = "int8_t"
        # fold the input zero point into the bias (modulo 2^A): sum w (x - zp) = sum w x - zp sum w
        bias = bias - in_zp * w2.sum(axis=1)
        desc = "int8, [oc block][k/4][4-channel vector][channel][4 k]"
    else:
        # [oc block][k][channel within the block]
        packed = wp.reshape(ocp // block, block, kp).transpose(0, 2, 1)
        wctype = "int16_t"
        desc = "int16, [oc block][k][channel within the block]"
    bp = np.zeros(ocp, dtype=np.int64)
    bias_bits = int(call.acc2_bits) if two and call.acc2_bits else call.acc_bits
    bp[:oc] = wrap(bias, bias_bits)
    if sdot:
        # the padded int8 input and the bytes read past its end (none: the kernel reads `in`)
        scratch = -(-int(geo["XBYTES"]) // 2)
    else:
        geo = _geometry(graph, call, mode)
        if geo["direct"]:
            # the widened, padded input (int16) and the zeros read past its end by the last row
            scratch = int(geo["IHP"] * geo["IWP"] * geo["IC"] + geo["SLACK"])
        else:
            scratch = p_n * kp  # im2col rows of P pixels, int16
    wbits = weight_storage_bits(node)
    woff = scratch
    if wbits:  # then one block of unpacked weights (int8 for SDOT, else int16)
        scratch += -(-(block * kp) // 2) if sdot else block * kp
    ow = int(out_shape[1]) if len(out_shape) == 3 else 1
    wl = A64_LANES_PER_LOAD.get((call.container_bits, o_n), 1) if nt.aarch64 and not sdot else 1
    ctx: dict[str, Any] = {
        "neon": True,
        "sdot": sdot,
        # an output row is one run of the walked input (1x1 stride 1 without padding): a pixel's
        # input row is at q * COLSTEP, no division by OW
        "contig": bool(geo["direct"]) and int(geo["ROWSTEP"]) == ow * int(geo["COLSTEP"]),
        "P": p_n,
        "O": o_n,
        "pix": [{"i": p, "col": p * kp} for p in range(p_n)],
        "ovec": [
            {
                "i": o,
                "ch": lanes * o,
                "ch_hi": lanes * o + 4,
                "w": (16 if sdot else 8) * o,
                "pair": (o + 1) < o_n,
                "next": o + 1,
            }
            for o in range(o_n)
        ],
        "wstep": 16 * o_n if sdot else block,
        # A64: the weights of a step come in LD1 of WN vectors (4, 3 for O = 3), each holding
        # the O vectors of WL consecutive lanes
        "wx": nt.aarch64 and not sdot and o_n * wl in (2, 3, 4),
        "WN": o_n * wl,
        "WL": wl,
        "wlanes": [
            {
                "l": lane,
                "wload": lane % wl == 0,
                "wval": [(lane % wl) * o_n + o for o in range(o_n)],
                "fold": two and (call.acc_tile or 8) < 8 and (lane + 1) % (call.acc_tile or 8) == 0,
                "loads": [
                    {
                        "pair": o + 1 < o_n,
                        "a": o,
                        "b": o + 1,
                    }
                    for o in range(0, o_n, 2)
                ],
            }
            for lane in range(lanes)
        ],
        "lanes": list(range(lanes)),
        "block": block,
        "K": k,
        "KP": kp,
        "KSTEP": kstep,
        "OCP": ocp,
        # every block of output channels full: each store of 8 lanes writes 8 channels
        "full8": not sdot and oc % block == 0,
        "scratch_elems": scratch,
        "scratch_bytes": 2 * scratch,
        "wbits": wbits,
        "WOFF": woff,
        "wrap_shift": (16 if two else lane_bits) - call.acc_bits,
        **_tiles(call, k, kp),
        **_fold_unit(call, k, int(geo["TC"])),
        **geo,
        "packed": add(
            "wpacked", wctype, [int(v) for v in packed.reshape(-1)],
            f"{name}: weights for the NEON kernel, {desc}, {ocp} channels x {kp} terms (padded)",
            bits=wbits,
        ),
        "nbias": add(
            "nbias", f"int{lane_bits}_t", [int(v) for v in bp],
            f"{name}: bias in accumulator units (wrapped to {bias_bits} bits)"
            + (", input zero point folded in" if sdot else "") + f", padded to {ocp} lanes",
        ),
    }  # fmt: skip
    # int32 lanes (SDOT, SMLAL at acc32, two stages: the acc2 total): the int32-lane
    # requantization where the bound proves it exact
    ctx.update(
        _requant_arrays(call, ocp, add, lane_bits, _lane_bound(call) if lane_bits == 32 else None)
    )
    return ctx


A64_LANES_PER_LOAD = {(16, 2): 2, (32, 1): 4}
"""A64 GEMM kernel, (lane bits, vectors of output channels O): lanes whose O weight vectors one
LD1 of 4 vectors loads (default 1: one LD1 of O vectors per lane, or LDR for O = 1). Measured:
the other combinations lose more in register moves (inputs copied into v0-v15) than they save."""

A64_ACC16_PIXELS = {1: 6, 2: 6}
"""Most pixels per register block of the A64 MLA (acc16) GEMM kernel with one or two vectors of
output channels (otherwise 5). Measured: with more, GCC copies inputs into v0-v15 before the
MLAs by element and loses more than the larger block saves."""

A64_ACC32_PIXELS = {1: 8, 2: 5, 3: 4, 4: 3}
"""Pixels per register block of the A64 SMLAL (acc32) GEMM kernel with 1 to 4 vectors of output
channels: 2 O P int32 accumulators, P inputs (in v0-v15) and O weights in at most 31 registers."""


def _acc32_block(ovecs: int, pixels: int, steps: int) -> tuple[int, int]:
    """(O, P) of the A64 SMLAL kernel: the register block of the least estimated instructions
    over the layer (blocks of P pixels x O vectors times, per 8-term step, P input loads, 8
    weight loads (one LD1 of O vectors per lane), 16 P O SMLAL and the loop, plus the bias
    loads, requantization and stores of a block; ties: more output channels)."""

    def cost(o: int) -> tuple[int, int]:
        p = min(A64_ACC32_PIXELS[o], pixels)
        blocks = -(-ovecs // o) * -(-pixels // p)
        return blocks * (steps * (p + 8 + 16 * p * o + 3) + 12 * p * o + 6 * p), -o

    o = min(range(1, min(4, ovecs) + 1), key=cost)
    return o, min(A64_ACC32_PIXELS[o], pixels)


A64_WIDE_PIXELS = {1: 8, 2: 8, 3: 6}
"""Pixels per register block of the A64 int16-lane GEMM kernel with 1, 2 or 3 vectors of output
channels (4 vectors: 5 pixels)."""


def _pixel_block(pixels: int, low: int, high: int) -> int:
    """The pixel block in [low, high] (at most `pixels`) of the least estimated cost: blocks
    times (pixels per block + 2, the block's own overhead in pixels; ties: the largest)."""
    cands = range(min(low, pixels), min(high, pixels) + 1)
    return min(cands, key=lambda p: (-(-pixels // p) * (p + 2), -p))


def _lane_bound(call: KernelCall) -> np.ndarray:
    """Per output channel, a bound on |the int32 lanes| a conv2d / dense kernel requantizes after
    its wrap to A bits: the exact sum when no input can make it wrap, else 2^(A-1).
    Two stages: |bias| plus, per tile of T terms (in the weight layout's order, the reference's),
    the smaller of 2^(A-1) (a wrapped tile sum) and the tile's exact bound, when that stays below
    2^(A2-1) (the total never wraps), else 2^(A2-1)."""
    assert call.acc_bits is not None
    node = call.node
    oc = int(node.params["weight"].shape[0])
    if call.acc_tile is None:
        exact = _acc_bound(node, oc)
        top = call.acc_bits
    else:
        assert call.acc2_bits is not None
        t, top = int(call.acc_tile), int(call.acc2_bits)
        w = np.abs(np.asarray(node.params["weight"], dtype=np.int64)).reshape(oc, -1)
        k = int(w.shape[1])
        span = _int8_span(int(node.attrs.get("input_zero_point", 0)))
        tiles = np.add.reduceat(w, np.arange(0, k, t), axis=1) * span
        bias = np.asarray(node.params.get("bias", np.zeros(oc, np.int64)), dtype=np.int64)
        exact = np.abs(bias) + np.minimum(tiles, 1 << (call.acc_bits - 1)).sum(axis=1)
    full = np.full(oc, 1 << (top - 1), dtype=np.int64)
    return exact if bool(np.all(exact < full)) else full


SDOT_REGS = 29
"""Vector registers the SDOT register block may hold (of 32): accumulators, inputs, weights."""

SDOT_SLACK = 16
"""Bytes the SDOT kernel may read past the last input value (its 16-byte loads of a tap's last
4-term groups; the values past the tap meet zero weights or lanes no SDOT reads)."""


def _sdot_geometry(graph: Graph, call: KernelCall) -> dict[str, Any]:
    """How the SDOT kernel walks its int8 input in place (no im2col gather).

    The input is read raw (the zero point is folded into the bias). With padding, or when a
    16-byte load could read past the input, the kernel first copies it into the scratch buffer
    with IZP in the padding rows and columns and SDOT_SLACK bytes after it (`xcopy`); otherwise it
    reads `in` itself. Each output pixel then walks TKH x TKW "taps" of TC contiguous values (TC:
    the TREAL values of the tap rounded up to 4; the extra values meet zero weights):
    rows (dilation 1 along W): a kernel row, KW * IC values; else one input pixel, IC values.
    A tap is TFULL groups of 16 terms (one 16-byte load per pixel, four SDOT lanes) and
    TTAIL groups of 4 (one more load, TTAIL lanes). Dense: one pixel of K values."""
    node = call.node
    a = node.attrs
    w = node.params["weight"]
    if w.ndim == 4:
        ih, iw, ic = (int(v) for v in graph.tensors[node.inputs[0]].shape)
        kh, kw = int(w.shape[1]), int(w.shape[2])
    else:  # dense: one pixel of K inputs
        ih, iw, ic = 1, 1, int(np.prod(w.shape[1:]))
        kh, kw = 1, 1
    sh, sw = (int(v) for v in a.get("stride", (1, 1)))
    dh, dw = (int(v) for v in a.get("dilation", (1, 1)))
    pt, pb, pl, pr = (int(v) for v in a.get("padding", (0, 0, 0, 0)))
    ihp, iwp = ih + pt + pb, iw + pl + pr
    rows = dw == 1 or kw == 1
    treal = kw * ic if rows else ic
    tc = _ceil_to(treal, 4)
    xcopy = bool(pt or pb or pl or pr) or tc % 16 != 0 or treal != tc
    return {
        "IH": ih,
        "IW": iw,
        "IHP": ihp,
        "IWP": iwp,
        "IC": ic,
        "TKH": kh,
        "TKW": 1 if rows else kw,
        "TROW": dh * iwp * ic,
        "TCOL": 0 if rows else dw * ic,
        "TC": tc,
        "TREAL": treal,
        "TFULL": tc // 16,
        "TFULL_TERMS": tc // 16 * 16,
        "TTAIL": list(range((tc % 16) // 4)),
        "TTAIL_TERMS": tc % 16,
        "ROWSTEP": sh * iwp * ic,
        "COLSTEP": sw * ic,
        "xcopy": xcopy,
        "SLACK": SDOT_SLACK if xcopy else 0,
        "XBYTES": ihp * iwp * ic + SDOT_SLACK if xcopy else 0,
        "direct": True,
        "rows": rows,
    }


def _tiles(call: KernelCall, k: int, kp: int = 0) -> dict[str, Any]:
    """Where the two-stage kernel widens its int16 tiles: after every `fold` lane (T < 8), every
    `tb` blocks of 8 terms (T a multiple of 8 below K), and at the end (T >= 8; `late`: one tile,
    the kernel keeps the one-stage register block and widens after the loop). `mem`: the int32
    sums live on the stack; the loop widens `folds` tiles into them, the first onto the bias, and
    the kernel widens the last tile into registers as it requantizes."""
    t = call.acc_tile
    if t is None:
        return {
            "two": False, "tb": 0, "folds": 0, "fold_guard": False, "fold_end": False,
            "late": False, "mem": False, "wrap2_shift": 0,
        }  # fmt: skip
    assert call.acc2_bits is not None
    return {
        "two": True,
        "tb": t // 8 if 8 <= t < k else 0,
        # tiles of sums in memory: the tiles widened in the loop (the first sets the sums to the
        # bias plus its sum); the last, whole or partial, is widened into registers at the end
        "folds": -(-kp // t) - 1 if 8 <= t < k else 0,
        # the walked terms end on a whole tile: the loop must not widen that last one
        "fold_guard": 8 <= t < k and kp % t == 0,
        "fold_end": t >= 8,
        # one tile (T >= K, T >= 8): the int32 lanes are needed only after the loop
        "late": t >= k and t >= 8,
        # several tiles of a multiple of 8 terms: the int32 sums live in a buffer on the stack
        # (the one-stage register block keeps its int16 lanes; each tile reads, adds, writes)
        "mem": 8 <= t < k,
        "wrap2_shift": 32 - int(call.acc2_bits),
    }


def _fold_unit(call: KernelCall, k: int, tc: int) -> dict[str, Any]:
    """Where the kernel with tiles of sums in memory (`mem`) counts toward a tile: a tap walks TC
    terms; tiles inside a tap (TC a multiple of T): a loop over the tap's tiles, a check per
    tile; whole taps per tile (T a multiple of TC): a check per tap; else per block of 8 terms.
    fold_n: the units per tile."""
    t = call.acc_tile
    if t is None or not 8 <= t < k:
        return {"fold_unit": "", "fold_n": 0}
    if tc % t == 0:
        return {"fold_unit": "tile", "fold_n": 1}
    if t % tc == 0:
        return {"fold_unit": "tap", "fold_n": t // tc}
    return {"fold_unit": "block", "fold_n": t // 8}


def _ic(graph: Graph, call: KernelCall) -> int:
    shape = graph.tensors[call.node.inputs[0]].shape
    return int(shape[-1])


def _kernel_rows(weight: Any, ic: int) -> tuple[int, int, int]:
    """(kernel rows, kernel columns, inputs per kernel row = columns x IC) of a conv or dense."""
    w = np.asarray(weight)
    kh, kw = (int(w.shape[1]), int(w.shape[2])) if w.ndim == 4 else (1, 1)
    return kh, kw, kw * ic


def _geometry(graph: Graph, call: KernelCall, mode: str) -> dict[str, Any]:
    """How the GEMM kernel walks its input rows.

    direct: the whole input is widened once to int16 (x - zero point) into the scratch buffer,
    zero padded to (IHP, IWP); every tap of every output pixel is then IC contiguous int16 values
    at row + tap offset, so no im2col gather is needed.
    rows (IC % 8 != 0, dilation 1 along W): the same widened input; the KW taps of a kernel row are
    KW * IC contiguous values, read as one "tap" of TC = KW * IC rounded up to 8 values whose
    extra values (the next columns, or up to SLACK zeros past the end) meet zero weights.
    im2col: an im2col row of KP values per pixel is gathered (one "tap" of KP values)."""
    direct = mode != "im2col"
    node = call.node
    a = node.attrs
    shape = graph.tensors[node.inputs[0]].shape
    hwc = (
        (int(shape[0]), int(shape[1]), int(shape[2])) if len(shape) == 3 else (1, 1, int(shape[0]))
    )
    ih, iw, ic = hwc
    w = node.params["weight"]
    kh, kw = (int(w.shape[1]), int(w.shape[2])) if w.ndim == 4 else (1, 1)
    sh, sw = (int(v) for v in a.get("stride", (1, 1)))
    dh, dw = (int(v) for v in a.get("dilation", (1, 1)))
    pt, pb, pl, pr = (int(v) for v in a.get("padding", (0, 0, 0, 0)))
    ihp, iwp = ih + pt + pb, iw + pl + pr
    if not direct:
        kp = -(-int(np.prod(w.shape[1:])) // 8) * 8
        return {"direct": False, "IHP": ihp, "IWP": iwp, "IC": ic, "TKH": 1, "TKW": 1,
                "TROW": 0, "TCOL": 0, "TC": kp, "ROWSTEP": 0, "COLSTEP": 0,
                "SLACK": 0, "rows": False}  # fmt: skip
    if mode == "rows":
        tc = _ceil_to(kw * ic, 8)
        return {"direct": True, "IHP": ihp, "IWP": iwp, "IC": ic, "TKH": kh, "TKW": 1,
                "TROW": dh * iwp * ic, "TCOL": 0, "TC": tc, "ROWSTEP": sh * iwp * ic,
                "COLSTEP": sw * ic, "SLACK": tc - kw * ic, "rows": True}  # fmt: skip
    return {
        "SLACK": 0,
        "rows": False,
        "direct": True,
        "IHP": ihp,
        "IWP": iwp,
        "IC": ic,
        "TKH": kh,
        "TKW": kw,
        "TROW": dh * iwp * ic,
        "TCOL": dw * ic,
        "TC": ic,
        "ROWSTEP": sh * iwp * ic,
        "COLSTEP": sw * ic,
    }


def depthwise_context(
    graph: Graph, call: KernelCall, neon: NeonTarget, add: AddArray
) -> dict[str, Any] | None:
    """Packed constants of the NEON depthwise kernel (None: use the portable C kernel).

    The kernel copies the input once into the scratch buffer as int8, padded with the input zero
    point (rows x cols pixels, CP channels per pixel), so that every output pixel reads its taps
    at constant offsets without bounds checks. The input zero point is folded into the bias,
    ibias = wrap(bias - IZP * sum(w), A), exact modulo 2^A: a padding tap holds IZP and adds
    w * IZP, which the folded bias cancels, as the reference's x - IZP = 0. acc16 multiplies int8
    inputs by int8 weights (SMLAL.8H, products exact in int16) when every weight fits int8.
    On A64 the int16-lane kernel computes R output pixels of a row per block (`_dw_rows`), so
    that each loaded input column feeds every pixel that reads it, and with at most 8 channels
    and stride 1 two pixels per 16-byte load (`pairs`: the tap weights repeated in both halves)."""
    if not depthwise_supported(graph, call):
        return None
    node = call.node
    assert call.acc_bits is not None and call.container_bits is not None
    w = np.asarray(node.params["weight"], dtype=np.int64)  # (C, kh, kw, 1)
    c = int(w.shape[0])
    kh, kw = int(w.shape[1]), int(w.shape[2])
    cp = _ceil_to(c, 8)
    wp = np.zeros((kh * kw, cp), dtype=np.int64)
    wp[:, :c] = w.reshape(c, kh * kw).T
    bias = np.asarray(node.params.get("bias", np.zeros(c, np.int64)), dtype=np.int64)
    a = node.attrs
    iw = int(graph.tensors[node.inputs[0]].shape[-2])
    oh, ow = (int(v) for v in graph.tensors[node.output].shape[-3:-1])
    sh, sw = (int(v) for v in a.get("stride", (1, 1)))
    pl = int(a.get("padding", (0, 0, 0, 0))[2])
    dh, dw = (int(v) for v in a.get("dilation", (1, 1)))
    in_zp = int(a.get("input_zero_point", 0))
    if not -128 <= in_zp <= 127:
        return None  # the padding (IZP) must fit the int8 scratch
    rows = (oh - 1) * sh + (kh - 1) * dh + 1  # padded rows and columns that the taps read
    cols = (ow - 1) * sw + (kw - 1) * dw + 1
    lf = min(pl, cols)  # padding columns on the left, then input columns
    mid = max(0, min(iw, cols - lf))
    ib = np.zeros(cp, dtype=np.int64)
    ib[:c] = wrap(bias - in_zp * w.reshape(c, -1).sum(axis=1), call.acc_bits)
    # int8 x int8 products (|w| <= 127, |x| <= 128): one is exact in int16 (acc16: SMLAL.8H into
    # the lanes), and so is the sum of two (acc32: SMULL.8H + SMLAL.8H per pair of taps, widened
    # into the int32 lanes by SADDW/SADDW2)
    s8 = bool(np.all(np.abs(w) <= 127))
    name = node.name
    wbits = weight_storage_bits(node)
    scratch = -(-(rows * cols * cp) // 2)  # int8 bytes in the int16 scratch
    taps = [(ky * dh * cols + kx * dw) * cp for ky in range(kh) for kx in range(kw)]
    lanes16 = neon.aarch64 and s8 and not wbits and call.container_bits == 16
    pairs = lanes16 and cp == 8 and sw == 1 and ow >= 2
    r_n = _dw_rows(ow, sw, kh, kw, dw) if lanes16 and cp >= 16 and kh * kw <= DW_ROW_TAPS else 1
    ctx: dict[str, Any] = {
        "neon": True,
        "CP": cp, "full8": cp == c, "ROWS": rows, "COLS": cols, "LF": lf, "MID": mid,
        "taps": taps,
        "tap_pairs": [list(enumerate(taps))[i : i + 2] for i in range(0, len(taps), 2)],
        "s8": s8,
        # A64 with int8 weights: 16 channels per pass (one 16-byte load per tap, SMLAL/SMLAL2;
        # 9 tap weights, 4 int32 sums and 4 biases fit the 32 registers), the last 8 alone
        "dw16": neon.aarch64 and s8 and not wbits and cp >= 16,
        # int16 lanes: R output pixels of a row per block (each input column loaded once for all
        # of them), or two pixels of at most 8 channels per 16-byte load
        "R": r_n,
        "rpix": list(range(r_n)),
        "rsched": _dw_row_schedule(r_n, sw, kh, kw, dh, dw, cols, cp),
        "pairs": pairs,
        "ow_odd": ow % 2 == 1,
        "rover": -ow % r_n,  # the last block of a row starts this many pixels back
        "wbits": wbits,
        "WOFF": scratch,
        # packed weights: then the 8 channels' unpacked int8 weights of every tap
        "scratch_elems": scratch + (4 * kh * kw if wbits else 0),
        "wrap_shift": call.container_bits - call.acc_bits,
        "ibias": add(
            "ibias", f"int{call.container_bits}_t", [int(v) for v in ib],
            f"{name}: bias minus input zero point times the weight sum (wrapped to"
            f" {call.acc_bits} bits), padded to {cp}",
        ),
    }  # fmt: skip
    if s8 or wbits:  # packed: the kernel unpacks to int8 (and widens them when not s8)
        ctx["packed8"] = add(
            "wpacked8" if s8 else "wpacked", "int8_t", [int(v) for v in wp.reshape(-1)],
            f"{name}: depthwise weights for the NEON kernel, int8, [tap][channel], {cp} channels",
            bits=wbits,
        )  # fmt: skip
    else:
        ctx["packed"] = add(
            "wpacked", "int16_t", [int(v) for v in wp.reshape(-1)],
            f"{name}: depthwise weights for the NEON kernel, int16, [tap][channel], {cp} channels",
        )  # fmt: skip
    if pairs:
        ctx["packed_pairs"] = add(
            "wpairs", "int8_t", [int(v) for v in np.concatenate([wp, wp], axis=1).reshape(-1)],
            f"{name}: depthwise weights for the NEON kernel, int8, [tap][2 pixels][channel]",
        )  # fmt: skip
    bound = _lane_bound(call) if call.container_bits == 32 else None
    ctx.update(_requant_arrays(call, cp, add, call.container_bits, bound))
    return ctx


DW_ROW_TAPS = 9
"""Most taps of a depthwise kernel whose int16-lane NEON kernel blocks output pixels (the tap
weights, 2 R accumulators and the requantization constants stay in the 32 vector registers)."""

DW_ROW_PIXELS = 6
"""Most output pixels per block of the int16-lane NEON depthwise kernel."""


def _dw_columns(r: int, sw: int, kw: int, dw: int) -> list[int]:
    """The input columns (relative to the block's first pixel) that R pixels' taps read."""
    return sorted({p * sw + kx * dw for p in range(r) for kx in range(kw)})


def _dw_rows(ow: int, sw: int, kh: int, kw: int, dw: int) -> int:
    """R of the int16-lane depthwise kernel: the block of the least estimated instructions per
    output row (blocks of R pixels, the last one overlapping when R does not divide OW, times
    one load per input column and kernel row plus, per pixel, two SMLAL per tap and about 12
    for the bias, requantization and stores); ties: the smaller block."""

    def cost(r: int) -> tuple[int, int]:
        return -(-ow // r) * (kh * len(_dw_columns(r, sw, kw, dw)) + r * (2 * kh * kw + 12)), r

    return min(range(1, min(DW_ROW_PIXELS, ow) + 1), key=cost)


def _dw_row_schedule(
    r: int, sw: int, kh: int, kw: int, dh: int, dw: int, cols: int, cp: int
) -> list[dict[str, Any]]:
    """Per input column read by a block of R pixels (kernel row by kernel row): its byte offset
    from the block's first pixel in the padded scratch and the (pixel, tap index) pairs it feeds."""
    out = []
    for ky in range(kh):
        for c in _dw_columns(r, sw, kw, dw):
            macs = [
                (p, ky * kw + kx) for p in range(r) for kx in range(kw) if p * sw + kx * dw == c
            ]
            out.append({"off": (ky * dh * cols + c) * cp, "macs": macs})
    return out


def neon_context(
    graph: Graph, call: KernelCall, neon: NeonTarget, add: AddArray
) -> dict[str, Any] | None:
    """The NEON kernel context of a call, or None when the portable C kernel is used."""
    if call.template in GEMM_TEMPLATES:
        return gemm_context(graph, call, neon, add)
    if call.template == "conv2d_depthwise":
        return depthwise_context(graph, call, neon, add)
    return None


# ----------------------------------------------------------------------------- Helium depthwise

MVE_DW_MAX_MULT = 17
"""The largest channel multiplier of the Helium depthwise kernel: its scatter store writes 16
int8 lanes at byte offsets lane * M <= 255."""

MVE_DW_PERM = (0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15)
"""Channel (within a block of 16) of each int32 lane of the MVE depthwise kernel's four int32
accumulator vectors: VMULLB/VMULLT split 16 int8 lanes into the even / odd channels (int16), and
VMOVLB/VMOVLT split each again, so vector v lane j holds channel MVE_DW_PERM[4 v + j]."""


def _taps_fit_int16(w: np.ndarray) -> bool:
    """Whether the sum over all taps of int8 inputs times the weights w (taps, channels) stays
    inside int16: an int8 input times a weight is at most 128 |w| in magnitude."""
    return int((128 * np.abs(w).sum(axis=0)).max(initial=0)) <= (1 << 15) - 1


def mve_depthwise_context(graph: Graph, call: KernelCall, add: AddArray) -> dict[str, Any] | None:
    """Constants and plan of the Helium (MVE) depthwise kernel (None: the portable C kernel).

    16 channels per vector (NHWC keeps them contiguous). Per output pixel the kernel points every
    tap at its input pixel, or at a row of CP copies of the input zero point when the tap lies in
    the padding, so the channel loop has no bounds checks. The input zero point is folded into
    the bias, bias - IZP * sum(w): a padding tap adds w * IZP, which the fold cancels, as the
    reference's (x - IZP) = 0 there; inputs are used raw (int8).

    "lanes16", 16 channels per vector: products are exact in int16 (VMULLB/VMULLT.S8) and every
    tap sums in int16 lanes, modulo 2^16 when acc_bits <= 16 (wrapping to A <= 16 bits then
    reduces it exactly), or exactly when the weights bound the sum (_taps_fit_int16); the lanes
    are then widened (VMOVLB/VMOVLT) to int32. "lanes32", 8 channels per vector: int8 inputs and
    weights widened on load, VMULLB/VMULLT.S16 products summed in int32 lanes modulo 2^32. The
    final wrap to A bits is a shift pair on the int32 lanes, skipped when no sum can reach
    2^(A-1) (the lanes then hold the reference's exact sum). Requantization runs on the int32
    lanes (VMUL, VRSHL, VQADD, VMAX, VMIN) when acc * mult << left stays inside int32 for every
    channel (_vec_requant_ok), else through qacc_requantize lane by lane.

    A channel multiplier M > 1 (at most MVE_DW_MAX_MULT) runs the kernel M times per output pixel
    over the same C input channels: pass m with the weights and per-channel constants of output
    channels c * M + m (stored [m][...], CP per pass), its vectors stored to every M-th output
    byte by a VSTRB scatter (offsets lane * M)."""
    if not depthwise_supported(graph, call, multiplier=True) or weight_storage_bits(call.node):
        return None
    m_n = depth_multiplier(call)
    if m_n > MVE_DW_MAX_MULT:
        return None  # the scatter offsets of 16 int8 lanes are bytes
    node = call.node
    rq = node.requant
    assert rq is not None and call.acc_bits is not None
    a = node.attrs
    in_zp = int(a.get("input_zero_point", 0))
    if not -128 <= in_zp <= 127:
        return None  # the padding row holds IZP as int8
    acc = int(call.acc_bits)
    w = np.asarray(node.params["weight"], dtype=np.int64)  # (C * M, kh, kw, 1)
    oc = int(w.shape[0])
    c = oc // m_n  # input channels
    kh, kw = int(w.shape[1]), int(w.shape[2])
    taps = kh * kw
    cp = _ceil_to(c, 16)
    wt = by_pass(w.reshape(oc, taps), m_n, cp)  # [pass][tap][channel]
    bias = np.asarray(node.params.get("bias", np.zeros(oc, np.int64)), dtype=np.int64)
    wsum = w.reshape(oc, taps).sum(axis=1)
    xmax = max(abs(-128 - in_zp), abs(127 - in_zp))
    bound = np.abs(bias) + xmax * np.abs(w).reshape(oc, taps).sum(axis=1)  # |reference sum|
    exact = bool(np.all(bound < (1 << (acc - 1))))  # no sum wraps: the lanes hold it exactly
    bf = bias - in_zp * wsum
    if not exact:
        bf = wrap(bf, acc)
    # int16 lanes: all taps summed modulo 2^16 (acc_bits <= 16), or exactly (the bound allows)
    lanes16 = acc <= 16 or _taps_fit_int16(w.reshape(oc, taps).T)
    bias16 = acc <= 16
    wrap_shift = 0 if exact or acc == 32 else 32 - acc
    # requantization on int32 lanes (see _vec_requant_ok)
    lane_bound = bound if exact else np.full(oc, 1 << (acc - 1), dtype=np.int64)
    mult = np.broadcast_to(np.asarray(rq.mult, dtype=np.int64).reshape(-1), (oc,))
    shift = np.broadcast_to(np.asarray(rq.shift, dtype=np.int64).reshape(-1), (oc,))
    vec_rq = _vec_requant_ok(node, lane_bound)
    # the channel of each int32 lane: blocks of 16 (int16 lanes widened twice) or of 8 channels
    # (int16 operands, VMULLB/VMULLT.S16 into even / odd channels)
    lane_perm = MVE_DW_PERM if lanes16 else (0, 2, 4, 6, 1, 3, 5, 7)
    n = len(lane_perm)
    perm = np.array([n * b + p for b in range(cp // n) for p in lane_perm], dtype=np.int64)

    def padded(v: np.ndarray, fill: int = 0) -> np.ndarray:  # one pass after the other
        return by_pass(v, m_n, cp, fill).reshape(-1)

    perm = np.concatenate([perm + m * cp for m in range(m_n)])

    name = node.name
    pad = any(int(p) for p in a.get("padding", (0, 0, 0, 0)))
    dh, dw = (int(v) for v in a.get("dilation", (1, 1)))
    how = "exact" if exact else f"wrapped to {acc} bits"
    ctx: dict[str, Any] = {
        "CP": cp,
        "M": m_n,
        "pad": pad,
        "taps": [{"t": ky * kw + kx, "dy": ky * dh, "dx": kx * dw}
                 for ky in range(kh) for kx in range(kw)],
        "lanes16": lanes16,
        "bias16_init": bias16,
        "wrap_shift": wrap_shift,
        "vec_rq": vec_rq,
        "use_mult": bool(np.any(mult != 1)),
        "perm": list(lane_perm),
        "BLK": n,
        "FULL": c // n * n,
        "TAIL": c % n,
        "weights": add(
            "wdw", "int8_t", [int(v) for v in wt.reshape(-1)],
            f"{name}: depthwise weights for the Helium kernel, [tap][channel], {cp} channels",
        ),
    }  # fmt: skip
    if pad:
        ctx["zpad"] = add(
            "zpad", "int8_t", [in_zp] * cp,
            f"{name}: the input zero point, read by the taps that fall in the padding",
        )  # fmt: skip
    bp = padded(bf)
    if bias16:
        # int16 lanes: per block of 16, the even channels then the odd ones (VMULLB, VMULLT)
        order = np.array(
            [
                16 * b + j
                for b in range(m_n * cp // 16)
                for j in (*range(0, 16, 2), *range(1, 16, 2))
            ]
        )
        ctx["bias16"] = add(
            "bias16", "int16_t", [int(v) for v in bp[order]],
            f"{name}: bias minus IZP times the weight sum ({how}),"
            " even then odd channels of each block of 16",
        )  # fmt: skip
    if not bias16:
        ctx["bias32"] = add(
            "bias32", "int32_t", [int(v) for v in bp[perm]],
            f"{name}: bias minus IZP times the weight sum ({how}),"
            " in the int32 lanes' channel order",
        )  # fmt: skip
    if vec_rq:
        if ctx["use_mult"]:
            ctx["rq_mult"] = add(
                "vmult", "int32_t", [int(v) for v in padded(mult, 1)[perm]],
                f"{name}: requantization multiplier, in the int32 lanes' channel order",
            )  # fmt: skip
        ctx["rq_rshift"] = add(
            "vrshift", "int32_t", [int(v) for v in padded(-shift)[perm]],
            f"{name}: minus the requantization shift (a VRSHL amount),"
            " in the int32 lanes' channel order",
        )  # fmt: skip
    else:
        ctx["rq_mult64"] = add(
            "mult", "int64_t", [int(v) for v in mult],
            f"{name}: requantization multiplier per output channel",
        )  # fmt: skip
        ctx["rq_shift"] = add(
            "shift", "int8_t", [int(v) for v in shift],
            f"{name}: requantization shift per output channel",
        )  # fmt: skip
    return ctx


# ----------------------------------------------------------------------------- DSP depthwise


def dsp_depthwise_context(graph: Graph, call: KernelCall, add: AddArray) -> dict[str, Any] | None:
    """Constants of the Cortex-M DSP-extension depthwise kernel (None: the portable C kernel).

    Four channels per step: one word of four int8 inputs split by SXTB16 into channels (0, 2)
    and, rotated by 8, (1, 3); the weights are stored pre-widened in the same order, two int16 per
    word, so SMLABB / SMLATT add each channel's exact product to its 32-bit sum (modulo 2^32,
    reduced to the container and to A bits once at the end). As in the Helium kernel, every tap
    points at its input pixel or at a row of input zero points (padding), and the zero point is
    folded into the bias, wrap(bias - IZP * sum(w), A): inputs are used raw. The last C % 4
    channels are summed one by one. A channel multiplier M > 1 runs the kernel M times per
    output pixel over the same C input channels, pass m with the weights and biases of output
    channels c * M + m (stored [m][...]), writing every M-th output."""
    if not depthwise_supported(graph, call, multiplier=True) or weight_storage_bits(call.node):
        return None
    node = call.node
    assert call.acc_bits is not None
    a = node.attrs
    in_zp = int(a.get("input_zero_point", 0))
    if not -128 <= in_zp <= 127:
        return None
    w = np.asarray(node.params["weight"], dtype=np.int64)  # (C * M, kh, kw, 1)
    m_n = depth_multiplier(call)
    oc = int(w.shape[0])
    c = oc // m_n  # input channels
    kh, kw = int(w.shape[1]), int(w.shape[2])
    taps = kh * kw
    cp = _ceil_to(c, 4)
    wt = by_pass(w.reshape(oc, taps), m_n, cp)  # [pass][tap][channel]
    # [m][group of 4][tap][w0, w2, w1, w3]: the SXTB16 order
    packed = wt.reshape(m_n, taps, cp // 4, 4)[:, :, :, [0, 2, 1, 3]].transpose(0, 2, 1, 3)
    bias = np.asarray(node.params.get("bias", np.zeros(oc, np.int64)), dtype=np.int64)
    bf = wrap(bias - in_zp * w.reshape(oc, taps).sum(axis=1), call.acc_bits)
    bias_rows = by_pass(bf, m_n, cp).reshape(-1) if m_n > 1 else bf  # M = 1: unpadded
    name = node.name
    pad = any(int(p) for p in a.get("padding", (0, 0, 0, 0)))
    dh, dw = (int(v) for v in a.get("dilation", (1, 1)))
    per = "[m][channel]" if m_n > 1 else "[channel]"
    ctx: dict[str, Any] = {
        "CP": cp,
        "FULL": c // 4 * 4,
        "M": m_n,
        "pad": pad,
        "taps": [{"t": ky * kw + kx, "dy": ky * dh, "dx": kx * dw}
                 for ky in range(kh) for kx in range(kw)],
        "unroll": taps <= 16,
        "weights": add(
            "wdw16", "int16_t", [int(v) for v in packed.reshape(-1)],
            f"{name}: depthwise weights for the DSP kernel, int16,"
            f" {'[m]' if m_n > 1 else ''}[4 channels][tap][0, 2, 1, 3]",
        ),
        "weights8": add(
            "wdw", "int8_t", [int(v) for v in wt.reshape(-1)],
            f"{name}: depthwise weights, {'[m]' if m_n > 1 else ''}[tap][channel]"
            " (the last C % 4 channels read these)",
        ) if c % 4 else None,
        "bias": add(
            "fbias", "int32_t", [int(v) for v in bias_rows],
            f"{name}: bias minus IZP times the weight sum, wrapped to {call.acc_bits} bits,"
            f" {per}",
        ),
    }  # fmt: skip
    if pad:
        ctx["zpad"] = add(
            "zpad", "int8_t", [in_zp] * cp,
            f"{name}: the input zero point, read by the taps that fall in the padding",
        )  # fmt: skip
    return ctx


# ------------------------------------------------------------------------ Helium requantization


def _acc_bound(node: Node, channels: int) -> np.ndarray:
    """Per output channel, a bound on |the reference's exact sum| (bias + sum w (x - IZP)) of a
    conv2d or dense node: |bias| + sum |w| * max |x - IZP| over int8 inputs x."""
    w = np.abs(np.asarray(node.params["weight"], dtype=np.int64)).reshape(channels, -1)
    bias = np.asarray(node.params.get("bias", np.zeros(channels, np.int64)), dtype=np.int64)
    zp = int(node.attrs.get("input_zero_point", 0))
    return np.abs(bias) + max(abs(-128 - zp), abs(127 - zp)) * w.sum(axis=1)


def _vec_requant_ok(node: Node, lane_bound: np.ndarray) -> bool:
    """Whether the int32-lane requantization (VMUL, VRSHL, VQADD, VMAX, VMIN) equals
    formats.requantize on every accumulator of magnitude <= lane_bound: acc * mult << left must
    stay inside int32 (or mult is 1 without left shift). VRSHL's rounding right shift computes
    (v + 2^(s-1)) >> s without overflow, which is round_shift; a saturating VQADD of the zero
    point keeps every value on its side of [lo, hi], so clamping afterwards is exact."""
    rq = node.requant
    assert rq is not None
    n = len(lane_bound)
    mult = np.broadcast_to(np.asarray(rq.mult, dtype=np.int64).reshape(-1), (n,))
    shift = np.broadcast_to(np.asarray(rq.shift, dtype=np.int64).reshape(-1), (n,))
    return all(
        (m == 1 and s >= 0) or (s > -31 and abs(m) * b << max(0, -s) < (1 << 31))
        for m, s, b in zip(
            (int(v) for v in mult),
            (int(v) for v in shift),
            (int(v) for v in lane_bound),
            strict=True,
        )
    )  # Python integers: no int64 overflow in the test itself


MVE_IM2COL_TAPS = 256
"""The most taps (KH * KW * ICG) of a Helium conv that copies each pixel's taps (im2col)."""


def mve_im2col(call: KernelCall) -> bool:
    """Whether the Helium conv copies each output pixel's taps into one contiguous buffer (IZP at
    the padded taps) and runs the pointwise kernel's weight stream over it: for a kernel row of
    fewer than 16 input values (KW * ICG < 16: few input channels, as a first layer's), whose
    runs would each take a mostly predicated vector (one group, no horizontal dilation), and for
    every grouped conv (the taps of one group are ICG of every IC input values: the copy, one
    group after the other, makes them one run). The output channels in blocks of 4 (of one
    group), int8 weights, at most MVE_IM2COL_TAPS taps per output channel."""
    node = call.node
    if call.template != "conv2d" or call.container_bits is None or weight_storage_bits(node):
        return False
    o, _, kw, icg = (int(d) for d in node.params["weight"].shape)
    a = node.attrs
    groups = int(a.get("groups", 1))
    if node.params["weight"][0].size > MVE_IM2COL_TAPS or (o // groups) % 4:
        return False
    if groups > 1:
        return True
    return tuple(a.get("dilation", (1, 1)))[1] == 1 and kw * icg < 16


def mve_requant_context(call: KernelCall, add: AddArray) -> dict[str, Any] | None:
    """The vector requantization of the Helium conv2d / pointwise / dense kernels: the four
    32-bit sums of a block of output channels go into one int32x4 vector, get the bias (and the
    zero point correction), the wrap to A bits (a shift pair; skipped when no sum can reach
    2^(A-1), the lanes then hold the exact sum) and the requantization of `_vec_requant_ok`.
    None: requantize lane by lane with qacc_requantize."""
    if call.template not in GEMM_TEMPLATES or call.container_bits is None:
        return None
    node = call.node
    assert call.acc_bits is not None and node.requant is not None
    acc = int(call.acc_bits)
    oc = int(node.params["weight"].shape[0])
    bound = _acc_bound(node, oc)
    exact = bool(np.all(bound < (1 << (acc - 1))))
    lane_bound = bound if exact else np.full(oc, 1 << (acc - 1), dtype=np.int64)
    if not _vec_requant_ok(node, lane_bound):
        return None
    rq = node.requant
    n = _ceil_to(oc, 4)
    mult = np.ones(n, dtype=np.int64)
    mult[:oc] = np.broadcast_to(np.asarray(rq.mult, dtype=np.int64).reshape(-1), (oc,))
    rshift = np.zeros(n, dtype=np.int64)
    rshift[:oc] = -np.broadcast_to(np.asarray(rq.shift, dtype=np.int64).reshape(-1), (oc,))
    bias = np.zeros(n, dtype=np.int64)
    b = np.asarray(node.params.get("bias", np.zeros(oc, np.int64)), dtype=np.int64)
    bias[:oc] = wrap(b, acc)
    name = node.name
    ctx: dict[str, Any] = {
        "wrap_shift": 0 if exact or acc == 32 else 32 - acc,
        "use_mult": bool(np.any(mult != 1)),
        "bias32": add(
            "vbias", "int32_t", [int(v) for v in bias],
            f"{name}: bias in accumulator units (wrapped to {acc} bits), int32 lanes",
        ),
        "rshift": add(
            "vrshift", "int32_t", [int(v) for v in rshift],
            f"{name}: minus the requantization shift per output channel (a VRSHL amount)",
        ),
    }  # fmt: skip
    if ctx["use_mult"]:
        ctx["mult"] = add(
            "vmult", "int32_t", [int(v) for v in mult],
            f"{name}: requantization multiplier per output channel, int32 lanes",
        )  # fmt: skip
    ctx["packed"] = None
    ctx["standalone"] = False
    ctx["im2col"] = mve_im2col(call)
    gemm = call.template in ("conv2d_pointwise", "dense") or ctx["im2col"]
    if gemm and not weight_storage_bits(node) and oc >= 4:
        # one weight stream for the blocks of 4 output channels: [block][16 inputs][channel][16],
        # inputs padded with zero weights to a multiple of 16; the zero point folded into the
        # bias (no padding taps: every weight meets an input; im2col: padded taps read IZP),
        # bias - IZP * sum(w)
        w = np.asarray(node.params["weight"], dtype=np.int64).reshape(oc, -1)
        ic = int(w.shape[1])
        icp = _ceil_to(ic, 16)
        nb = oc // 4
        wp = np.zeros((nb * 4, icp), dtype=np.int64)
        wp[:, :ic] = w[: nb * 4]
        packed = wp.reshape(nb, 4, icp // 16, 16).transpose(0, 2, 1, 3)
        zp = int(node.attrs.get("input_zero_point", 0))
        fb = bias.copy()
        fb[:oc] = wrap(fb[:oc] - zp * w.sum(axis=1), acc) if not exact else b - zp * w.sum(axis=1)
        ctx["packed"] = add(
            "wblk", "int8_t", [int(v) for v in packed.reshape(-1)],
            f"{name}: weights of the blocks of 4 output channels, [block][16 inputs][channel][16]",
        )  # fmt: skip
        ctx["fbias"] = add(
            "vfbias", "int32_t", [int(v) for v in fb],
            f"{name}: bias minus the input zero point times the weight sum"
            f" ({'exact' if exact else f'wrapped to {acc} bits'}), int32 lanes",
        )  # fmt: skip
        # every output channel in blocks of 4: the kernel needs no other weights or constants
        ctx["standalone"] = oc % 4 == 0
        ctx["NIN"] = ic
        ctx["ICP"] = icp
        ctx["IFULL"] = ic // 16
        ctx["ITAIL"] = ic % 16
    return ctx


def dsp_gemm_context(call: KernelCall, add: AddArray) -> dict[str, Any] | None:
    """The DSP-extension conv / pointwise / dense kernel with pre-widened weights (None: the
    generic DSP kernel). Used when the input and output channel counts are multiples of 4 (a
    dense layer's outputs need not be: its last 1..3 outputs are one narrower block; a grouped
    conv's counts per group) and the weights are not stored packed (conv2d: one group without
    horizontal dilation, whose kernel row is one run of whole words, or any groups, whose
    runs are the ICG inputs of one tap; no input zero point when padded, since padded taps are
    skipped): the weights are stored as int16 in
    the order the inner loop reads them, [block of 4 outputs][4 inputs][output][w0, w2, w1, w3]
    (the SXTB16 order of the input word), so each SMLAD pair needs one LDRD and no sign
    extension of weights; this doubles
    the layer's weight flash. The input zero point is folded into the bias,
    wrap(bias - IZP * sum(w), A) (no padding: every weight meets an input). A conv2d reads the
    weights of the taps inside the image: run t (a multiple of 4) is at oc * K + 4 * t."""
    if call.template not in GEMM_TEMPLATES or call.container_bits is None:
        return None
    node = call.node
    if weight_storage_bits(node):
        return None
    a = node.attrs
    groups = int(a.get("groups", 1))
    if call.template == "conv2d" and (  # a kernel row's taps (one group), a tap's: whole words
        (groups == 1 and tuple(a.get("dilation", (1, 1)))[1] != 1)
        or (int(node.params["weight"].shape[0]) // groups) % 4
        or int(node.params["weight"].shape[-1]) % 4
        or (any(a.get("padding", ())) and int(a.get("input_zero_point", 0)))
    ):
        return None
    w = np.asarray(node.params["weight"], dtype=np.int64)
    oc = int(w.shape[0])
    w2 = w.reshape(oc, -1)
    ic = int(w2.shape[1])
    tail = oc % 4  # dense only: the last 1..3 outputs are one more, narrower block
    if (tail and call.template != "dense") or ic % 4 or not oc or not ic:
        return None
    assert call.acc_bits is not None
    full = oc - tail
    sx = [0, 2, 1, 3]  # the SXTB16 order of an input word
    blocks = w2[:full].reshape(full // 4, 4, ic // 4, 4)[:, :, :, sx].transpose(0, 2, 1, 3)
    last = w2[full:].reshape(tail, ic // 4, 4)[:, :, sx].transpose(1, 0, 2)
    packed = np.concatenate([blocks.reshape(-1), last.reshape(-1)])
    bias = np.asarray(node.params.get("bias", np.zeros(oc, np.int64)), dtype=np.int64)
    zp = int(node.attrs.get("input_zero_point", 0))
    fb = wrap(bias - zp * w2.sum(axis=1), call.acc_bits)
    name = node.name
    return {
        "full": full,
        "tail": tail,
        "grouped": groups > 1,
        "weights": add(
            "w16", "int16_t", [int(v) for v in packed.reshape(-1)],
            f"{name}: weights for the DSP kernel, int16, [4 outputs][4 inputs][output][0, 2, 1, 3]"
            + (f", then [4 inputs][the last {tail} outputs][0, 2, 1, 3]" if tail else ""),
        ),
        "bias": add(
            "fbias", "int32_t", [int(v) for v in fb],
            f"{name}: bias minus IZP times the weight sum, wrapped to {call.acc_bits} bits",
        ),
    }  # fmt: skip


# ------------------------------------------------------------------------ 32-bit requantization


def _int8_span(zp: int) -> int:
    """max |x - zp| over int8 values x."""
    return max(abs(-128 - zp), abs(127 - zp))


def requant32_fits(bound: int, mult: int, shift: int) -> bool:
    """Whether qacc_requantize32 (runtime_c/qacc.h) equals formats.requantize for every
    accumulator of magnitude <= bound with this multiplier and shift (no int32 overflow)."""
    p = abs(int(bound)) * abs(int(mult))
    if shift > 0:
        return p + (1 << (shift - 1)) <= (1 << 31) - 1
    return shift > -31 and (p << -shift) + 128 <= (1 << 31) - 1


def requant32_ok(call: KernelCall, taps: int = 0) -> bool:
    """A conv2d / dense / add / mul / average pool / bilinear resizing layer whose
    requantization may use qacc_requantize32: every channel's accumulator (wrapped to A bits,
    or bounded by the weights, or by the inputs' ranges and multipliers for add and mul, or by
    the `taps` inputs of a pool (an adaptive one: its largest window), or by 2^(2B) times the
    inputs' range for a resizing, when no sum can wrap) fits."""
    node = call.node
    ops: tuple[str, ...] = ("conv2d", "dense", "add", "mul", "global_avgpool", "avgpool2d")
    ops += ("resize_bilinear", "adaptive_avgpool2d")
    if call.template == "global_avgpool":  # also an average pool over the whole image
        ops = (node.op,)
    if node.op not in ops or call.acc_bits is None or node.requant is None:
        return False
    if node.op != "conv2d" and node.op != "dense":
        oc = max(np.asarray(node.requant.mult).size, np.asarray(node.requant.shift).size)
        if node.op == "add":
            ms = [int(v) for v in np.asarray(node.params["in_mult"]).reshape(-1)]
            zs = [int(v) for v in node.attrs.get("input_zero_points", (0, 0))]
            span = sum(abs(m) * _int8_span(z) for m, z in zip(ms, zs, strict=True))
        elif node.op == "mul":
            za, zb = (int(v) for v in node.attrs.get("input_zero_points", (0, 0)))
            span = _int8_span(za) * _int8_span(zb)
        elif node.op == "resize_bilinear":  # four weights summing to 2^(2B)
            izp = int(node.attrs.get("input_zero_point", 0))
            span = _int8_span(izp) << (2 * int(node.attrs["weight_bits"]))
        else:
            span = taps * _int8_span(int(node.attrs.get("input_zero_point", 0)))
        bound = np.full(oc, span, dtype=np.int64)
    else:
        oc = int(node.params["weight"].shape[0])
        bound = _acc_bound(node, oc)
    acc = int(call.acc_bits)
    if not bool(np.all(bound < (1 << (acc - 1)))):
        bound = np.full(oc, 1 << (acc - 1), dtype=np.int64)
    rq = node.requant
    mult = np.broadcast_to(np.asarray(rq.mult, dtype=np.int64).reshape(-1), (oc,))
    shift = np.broadcast_to(np.asarray(rq.shift, dtype=np.int64).reshape(-1), (oc,))
    return all(
        requant32_fits(int(b), int(m), int(s)) for b, m, s in zip(bound, mult, shift, strict=True)
    )


POOL_TEMPLATES = (
    "avgpool2d",
    "global_avgpool",
    "adaptive_avgpool2d",
    "add",
    "mul",
    "resize_bilinear",
)
"""The Helium kernels of `mve_pool_context`: average pools, the elementwise add and product,
the bilinear resizing."""


def mve_pool_context(
    call: KernelCall, taps: int, channels: int, add: AddArray
) -> dict[str, Any] | None:
    """The vector requantization of the Helium average pools, add and mul: the accumulators of 4
    channels in int32 lanes — a pool: the exact sum of the (at most `taps`) raw int8 inputs,
    minus IZP times the taps inside the image; add: (a - ZA) * MA + (b - ZB) * MB — modulo
    2^32; mul: (a - ZA) * (b - ZB), exact (|.| <= 2^16); resize_bilinear: the four weighted raw
    inputs minus IZP * 2^(2B) (`izn`), exact — the wrap to A bits (a shift pair;
    skipped when no sum can reach 2^(A-1)) and the requantization of `_vec_requant_ok` (VMUL,
    VRSHL, VQADD, VMAX, VMIN).
    `channels`: the length of the requantization's multiplier and shift arrays (the output
    pixels of an adaptive average pool, whose divisor is per pixel; `taps`: its largest window).
    None: A > 32 or a multiplier the int32 lanes cannot hold; the portable kernel is used."""
    if call.template not in POOL_TEMPLATES or call.acc_bits is None or call.acc_bits > 32:
        return None
    node = call.node
    assert node.requant is not None
    acc = int(call.acc_bits)
    extra: dict[str, Any] = {}
    if call.template == "add":
        ms = [int(v) for v in np.asarray(node.params["in_mult"]).reshape(-1)]
        zs = [int(v) for v in node.attrs.get("input_zero_points", (0, 0))]
        bound = sum(abs(m) * _int8_span(z) for m, z in zip(ms, zs, strict=True))
        extra = {"ma": int(wrap(np.int64(ms[0]), 32)), "mb": int(wrap(np.int64(ms[1]), 32))}
    elif call.template == "mul":
        za, zb = (int(v) for v in node.attrs.get("input_zero_points", (0, 0)))
        bound = _int8_span(za) * _int8_span(zb)
    elif call.template == "resize_bilinear":  # four weights summing to 2^(2B) per output pixel
        one = 1 << (2 * int(node.attrs["weight_bits"]))
        izp = int(node.attrs.get("input_zero_point", 0))
        bound = one * _int8_span(izp)
        if one * 256 > 1 << 31:  # the raw weighted sums would leave the int32 lanes
            return None
        extra = {"izn": izp * one}  # the zero point times the weights' sum, taken out at once
    else:
        bound = taps * _int8_span(int(node.attrs.get("input_zero_point", 0)))
    exact = bound < (1 << (acc - 1))
    lane = bound if exact else 1 << (acc - 1)
    if not _vec_requant_ok(node, np.full(channels, lane, dtype=np.int64)):
        return None
    rq = node.requant
    mult = np.broadcast_to(np.asarray(rq.mult, dtype=np.int64).reshape(-1), (channels,))
    rshift = -np.broadcast_to(np.asarray(rq.shift, dtype=np.int64).reshape(-1), (channels,))
    ctx: dict[str, Any] = {
        "wrap_shift": 0 if exact or acc == 32 else 32 - acc,
        "use_mult": bool(np.any(mult != 1)),
        "mult": None,
        "rshift": None,
        "mult_n": int(mult[0]),
        "rshift_n": int(rshift[0]),
        # the raw sums fit int16 lanes exactly (global pool: 8 channels per vector)
        "lanes16": taps * 128 < (1 << 15),
        **extra,
    }
    if len(set(mult.tolist())) > 1 or len(set(rshift.tolist())) > 1:  # per channel: int32 lanes
        n = _ceil_to(channels, 4)
        m = np.ones(n, dtype=np.int64)
        m[:channels] = mult
        r = np.zeros(n, dtype=np.int64)
        r[:channels] = rshift
        name = node.name
        ctx["mult"] = add(
            "vmult", "int32_t", [int(v) for v in m],
            f"{name}: requantization multiplier per channel, int32 lanes",
        )  # fmt: skip
        ctx["rshift"] = add(
            "vrshift", "int32_t", [int(v) for v in r],
            f"{name}: minus the requantization shift per channel (a VRSHL amount)",
        )  # fmt: skip
    return ctx


def dsp_pool_context(call: KernelCall, taps: int, channels: int) -> dict[str, Any] | None:
    """The DSP global average pool: 4 channels per word, summed by SXTAB16 into two int16 halves
    (exact when the `taps` raw inputs' sum fits int16), whole words then the tail channels one
    by one. None (wider sums, or an accumulator wider than 32 bits): the portable kernel."""
    if call.template != "global_avgpool" or call.acc_bits is None or call.acc_bits > 32:
        return None
    if taps * 128 > 1 << 15:
        return None
    return vector_split(channels, 4)


def dsp_resize_context(
    call: KernelCall, iw: int, channels: int, add: AddArray
) -> dict[str, Any] | None:
    """The DSP bilinear resizing (cortex-m4/m7), separable in two passes over the scratch buffer.

    Per output row, the vertical blend of its two input rows for every input column, 2 channels
    per 32-bit MUL: the input bytes biased to u = x + 128 (EOR 0x80) and split by UXTB16 into
    two 16-bit lanes (channels c, c + 2; and c + 1, c + 3), wt * u_top + wb * u_bottom in one
    MUL and one MLA: the weights are >= 0 and sum to 2^B (B <= 8), so each lane's value
    v < 2^(B+8) <= 2^16 never carries into the next lane. Stored as v - 2^15 (EOR 0x80008000):
    signed halfwords. Per output pixel, the horizontal blend of its two input columns' stored
    words, wl * v_l + wr * v_r, by the halfword MACs (SMLABB, SMLABT, SMLATB, SMLATT) started
    at `bias`: minus the lanes' offsets (2^(2B) * 128 from the input bias, less 2^B * 2^15 from
    the halfword bias) and IZP times the weights' sum 2^(2B), so the sum is the reference's,
    exact in int32. The channels past the last whole word are blended from the inputs directly.

    The weights of each output row and column as one int16 pair: first | second << 16.
    `scratch_elems`: int16 elements of the vertical blends of one row (2 words per 4 channels
    per input column). None: weights wider than 8 bits, or fewer than 4 channels (no whole
    word): the portable kernel."""
    node = call.node
    if call.template != "resize_bilinear" or call.acc_bits is None or channels < 4:
        return None
    bits = int(node.attrs["weight_bits"])
    if bits > 8:
        return None
    one = 1 << bits
    izp = int(node.attrs.get("input_zero_point", 0))
    full = channels - channels % 4
    ctx: dict[str, Any] = {
        "izn": izp << (2 * bits),
        "bias": (1 << (bits + 15)) - (128 << (2 * bits)) - (izp << (2 * bits)),
        "words": full // 2,  # words of vertical blends per input column
        "scratch_elems": iw * full,
        **vector_split(channels, 4),
    }
    for axis in ("row", "col"):
        w1 = [int(w) for w in node.attrs[f"{axis}_weight"]]
        ctx[f"{axis}_pair"] = add(
            f"{axis}_wpair", "int32_t", [(one - w) | w << 16 for w in w1],
            f"{node.name}: the weights of the two input {axis}s of each output {axis}, as an"
            f" int16 pair (first | second << 16), in units of 2^-{bits}",
        )  # fmt: skip
    return ctx


def _inside(n_out: int, n_in: int, k: int, stride: int, pad: int) -> tuple[int, int]:
    """The output positions [first, last) whose window of k inputs lies inside the n_in inputs
    along one axis (first = last: none)."""
    inside = [o for o in range(n_out) if o * stride >= pad and o * stride - pad + k <= n_in]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _dsp_windows(
    call: KernelCall, ih: int, iw: int, oh: int, ow: int, channels: int
) -> dict[str, Any]:
    """The windows of a DSP pool: output rows [y0, y1) times columns [x0, x1) have their window
    inside the image (its KH * KW taps at the constant offsets `taps` from the window's corner,
    unrolled); `full` channels in whole words, a `tail` of 0..3."""
    a = call.node.attrs
    kh, kw = (int(v) for v in a["kernel"])
    sh, sw = (int(v) for v in a.get("stride", (1, 1)))
    pt, _, pl, _ = (int(v) for v in a.get("padding", (0, 0, 0, 0)))
    y0, y1 = _inside(oh, ih, kh, sh, pt)
    x0, x1 = _inside(ow, iw, kw, sw, pl)
    return {
        "y0": y0, "y1": y1, "x0": x0, "x1": x1, "inside": y1 > y0 and x1 > x0,
        "taps": [(ky * iw + kx) * channels for ky in range(kh) for kx in range(kw)],
        **vector_split(channels, 4),
    }  # fmt: skip


def dsp_maxpool_context(
    call: KernelCall, ih: int, iw: int, oh: int, ow: int, channels: int
) -> dict[str, Any]:
    """The DSP max pool (cortex-m4/m7): 4 channels per word, the running maximum of 4 int8
    lanes by SSUB8 + SEL (GE flags per byte), the clamp likewise against words of LO / HI.
    Windows inside the image read their taps unrolled (`_dsp_windows`); the others loop over
    the taps inside the image. The channels past the last whole word, one at a time."""
    rq = call.node.requant
    assert rq is not None
    return {
        "clamp_lo": rq.lo > -128, "clamp_hi": rq.hi < 127,
        "lo_word": _word(rq.lo),
        "hi_word": _word(rq.hi),
        **_dsp_windows(call, ih, iw, oh, ow, channels),
    }  # fmt: skip


def dsp_avgpool_context(
    call: KernelCall, ih: int, iw: int, oh: int, ow: int, channels: int
) -> dict[str, Any] | None:
    """The DSP average pool (cortex-m4/m7): 4 channels per word, SXTAB16 adds bytes 0, 2 and
    (rotated) 1, 3 of every tap to two pairs of int16 sums (exact: KH * KW * 128 <= 2^15), then
    each channel's sum minus IZP per tap inside the image, wrapped to A bits (`exact`: no sum can
    reach 2^(A-1), the wrap is left out) and requantized. Windows as `_dsp_windows`. None
    (larger windows, an accumulator wider than 32 bits): the portable kernel."""
    if call.template != "avgpool2d" or call.acc_bits is None or call.acc_bits > 32:
        return None
    kh, kw = (int(v) for v in call.node.attrs["kernel"])
    if kh * kw * 128 > 1 << 15:
        return None
    span = kh * kw * _int8_span(int(call.node.attrs.get("input_zero_point", 0)))
    return {
        "exact": span < 1 << (call.acc_bits - 1),
        **_dsp_windows(call, ih, iw, oh, ow, channels),
    }


DSP_POOL_UNROLL = 64
"""The most taps of an adaptive pool's windows that the DSP kernel unrolls."""


def adaptive_taps(call: KernelCall) -> int:
    """The taps of the largest window of an adaptive pool (rows times columns)."""
    a = call.node.attrs
    return max(r1 - r0 for r0, r1 in a["rows"]) * max(c1 - c0 for c0, c1 in a["cols"])


def dsp_adaptive_context(call: KernelCall, iw: int, channels: int) -> dict[str, Any] | None:
    """The DSP adaptive pools (cortex-m4/m7) over their given windows, per output pixel: 4
    channels per word, the maximum by SSUB8 + SEL (the clamp likewise against words of LO / HI)
    or the int16 sums of SXTAB16 (exact: every window has at most 256 taps), then each channel's
    sum minus IZP per tap, wrapped to A bits (`exact`: no sum can reach 2^(A-1), the wrap is left
    out) and requantized with its pixel's divisor; the channels past the last whole word one at
    a time. Windows of one size (every row window KH rows, every column window KW columns, as
    when the output size divides the input's, or 7 -> 3) read their taps unrolled at the
    constant offsets `taps` from the window's corner (None: loops over each window's taps).
    None (fewer than 4 channels; an average over a larger window or an accumulator wider than
    32 bits): the portable kernel."""
    if call.template not in ("adaptive_avgpool2d", "adaptive_maxpool2d") or channels < 4:
        return None
    a = call.node.attrs
    rq = call.node.requant
    assert rq is not None
    kh = {int(r1) - int(r0) for r0, r1 in a["rows"]}
    kw = {int(c1) - int(c0) for c0, c1 in a["cols"]}
    uniform = len(kh) == 1 and len(kw) == 1
    ctx: dict[str, Any] = {
        "clamp_lo": rq.lo > -128, "clamp_hi": rq.hi < 127,
        "lo_word": _word(rq.lo), "hi_word": _word(rq.hi),
        "kh": min(kh), "kw": min(kw), "n": min(kh) * min(kw),
        "taps": (
            [(ky * iw + kx) * channels for ky in range(min(kh)) for kx in range(min(kw))]
            if uniform and min(kh) * min(kw) <= DSP_POOL_UNROLL
            else None
        ),
        **vector_split(channels, 4),
    }  # fmt: skip
    if call.template == "adaptive_maxpool2d":
        return ctx
    taps = adaptive_taps(call)
    if call.acc_bits is None or call.acc_bits > 32 or taps * 128 > 1 << 15:
        return None
    span = taps * _int8_span(int(call.node.attrs.get("input_zero_point", 0)))
    return {**ctx, "exact": span < 1 << (call.acc_bits - 1)}


def dsp_add_context(call: KernelCall, pixels: int, channels: int) -> dict[str, Any] | None:
    """The DSP residual add (cortex-m4/m7): 4 elements per word of each input, split by SXTB16
    into int16 lanes (0, 2 and, rotated, 1, 3); each sum (a - ZA) * MA + (b - ZB) * MB as two
    halfword MACs (SMLABB / SMLATB) started at K = -(ZA * MA + ZB * MB): exact modulo 2^32,
    then reduced to the container and to A bits as in the portable kernel. The multipliers must
    be int16: any value modulo 2^16 for a 16-bit container (the sum is taken modulo 2^16), the
    integer itself for a 32-bit one; `exact`: no sum can reach 2^(A-1) (the wrap is the
    identity and is left out). One multiplier and shift for all channels: the tensors are
    one flat row; else rows of `channels` elements. None: the portable kernel."""
    cb = call.container_bits
    if call.template != "add" or cb is None or cb > 32 or call.acc_bits is None:
        return None
    node = call.node
    assert node.requant is not None
    ms = [int(v) for v in np.asarray(node.params["in_mult"]).reshape(-1)]
    zs = [int(v) for v in node.attrs.get("input_zero_points", (0, 0))]
    m16 = [int(wrap(np.int64(m), 16)) for m in ms] if cb == 16 else ms
    if any(not -(1 << 15) <= m < 1 << 15 for m in m16):
        return None
    k = -sum(m * z for m, z in zip(m16, zs, strict=True))
    bound = sum(abs(m) * _int8_span(z) for m, z in zip(m16, zs, strict=True))
    flat = all(np.asarray(v).size == 1 for v in (node.requant.mult, node.requant.shift))
    rows, cols = (1, pixels * channels) if flat else (pixels, channels)
    return {
        "ma": m16[0], "mb": m16[1],
        "mab": f"0x{(m16[0] & 0xFFFF) | (m16[1] & 0xFFFF) << 16:08X}u",
        "k": int(wrap(np.int64(k), 32)),
        "exact": bound < 1 << (call.acc_bits - 1),  # no sum reaches 2^(A-1): no wrap
        "rows": rows, "cols": cols,
        **vector_split(cols, 4),
    }  # fmt: skip


def _int16_pair(v: int) -> str:
    """The int16 value v in both halves of a word, as a C literal."""
    return f"0x{(v & 0xFFFF) * 0x00010001:08X}u"


def dsp_mul_context(
    call: KernelCall, pixels: int, channels: int, b_stride: int
) -> dict[str, Any] | None:
    """The DSP element-wise product (cortex-m4/m7): 4 elements per word of each input, split by
    SXTB16 into int16 lanes (0, 2 and, rotated, 1, 3), the zero points subtracted by SSUB16
    (exact: x - Z fits int16 for every int8 x), each product (a - ZA) * (b - ZB) by one
    halfword multiply (SMULBB / SMULTT), exact in int32 (|.| <= 2^30); then reduced to the
    container and to A bits as in the portable kernel (`exact`: no product can reach 2^(A-1),
    the wrap is left out) and requantized. `b` is a tensor of the output's shape (`b_stride` =
    `channels` per pixel) or one value per channel (`b_stride` 0: squeeze-excitation); two
    tensors of one shape with one multiplier and shift for all channels are one flat row.
    None (zero points beyond int16 lanes, or fewer than 4 elements per row: no whole word):
    the portable kernel."""
    if call.template != "mul" or call.acc_bits is None or call.acc_bits > 32:
        return None
    node = call.node
    assert node.requant is not None
    za, zb = (int(v) for v in node.attrs.get("input_zero_points", (0, 0)))
    if any(not -(1 << 15) + 128 <= z <= (1 << 15) - 129 for z in (za, zb)):
        return None
    rq = node.requant
    flat = b_stride and np.asarray(rq.mult).size == 1 and np.asarray(rq.shift).size == 1
    rows, cols, step = (1, pixels * channels, 0) if flat else (pixels, channels, b_stride)
    if cols < 4:
        return None
    return {
        "rows": rows, "cols": cols, "b_step": step,
        "za": za, "zb": zb, "za_pair": _int16_pair(za), "zb_pair": _int16_pair(zb),
        "exact": _int8_span(za) * _int8_span(zb) < 1 << (call.acc_bits - 1),
        **vector_split(cols, 4),
    }  # fmt: skip


DSP_GATHER_MOVES = 64
"""The most word and byte moves per pixel of the unrolled DSP gather."""


def dsp_gather_context(call: KernelCall) -> dict[str, Any] | None:
    """The DSP channel gather (cortex-m4/m7), unrolled per pixel: the output channels as runs of
    consecutive input channels, each run copied by (possibly unaligned) words, then its last
    0..3 bytes, at constant offsets (`moves`: word or byte, output and input offset; `runs`:
    how many runs). None (a fused
    clamp, or more than DSP_GATHER_MOVES moves per pixel): the portable kernel."""
    node = call.node
    rq = node.requant
    assert rq is not None
    if rq.lo > -128 or rq.hi < 127:
        return None
    index = [int(i) for i in node.attrs["index"]]
    runs: list[dict[str, int]] = []
    for c, i in enumerate(index):
        if runs and runs[-1]["src"] + runs[-1]["n"] == i:
            runs[-1]["n"] += 1
        else:
            runs.append({"dst": c, "src": i, "n": 1})
    moves = []  # (word?, output offset, input offset)
    for r in runs:
        words = r["n"] // 4
        moves += [(True, r["dst"] + 4 * j, r["src"] + 4 * j) for j in range(words)]
        moves += [(False, r["dst"] + j, r["src"] + j) for j in range(4 * words, r["n"])]
    if len(moves) > DSP_GATHER_MOVES:
        return None
    return {"moves": [{"word": w, "dst": d, "src": s} for w, d, s in moves], "runs": len(runs)}


def _word(v: int) -> str:
    """The int8 value v in the 4 bytes of a word, as a C literal."""
    return f"0x{(v & 0xFF) * 0x01010101:08X}u"


def dsp_concat_inputs(
    inputs: Sequence[Mapping[str, Any]], zp: int, lo: int, hi: int
) -> list[dict[str, Any]]:
    """How the DSP concat (cortex-m4/m7) stores each input (the kernel context's `inputs`, with
    integer `mult_n`, `shift_n` and `zp`), `how`: "copy" when the requantization is the identity
    on every int8 value (multiplier 1, no shift, the output's zero point, no saturation inside the
    int8 range), copied by words; "lanes" for multiplier 1, no input zero point and a shift s in
    [-7, 7] (s < 0 only with output zero point 0), 4 values per word: round_shift(x, s) for s > 0
    as SHADD8 (the halving add, floor((a + b) / 2) per byte without overflow) with 2^(s-1), then
    s - 1 halvings (nested floors are the floor of the quotient), x * 2^-s for s < 0 as -s
    saturating doublings (QADD8: each saturates on the side the exact value does), the zero point
    by a saturating QADD8 (exact: the value before it is), the clamp by SSUB8 + SEL; the last 0..3
    values by qacc_requantize32; "rq32" when qacc_requantize32 equals the requantization for
    every |x - zp| <= 255 (`requant32_fits`); else "rq64" (qacc_requantize)."""
    out = []
    for x in inputs:
        m, s, z = int(x["mult_n"]), int(x["shift_n"]), int(x["zp"])
        d: dict[str, Any] = {"how": "rq32" if requant32_fits(_int8_span(z), m, s) else "rq64"}
        if (m, s, z, lo, hi) == (1, 0, zp, -128, 127):
            d["how"] = "copy"
        elif m == 1 and z == 0 and -7 <= s <= 7 and (s >= 0 or zp == 0):
            d = {
                "how": "lanes",
                "round": _word(1 << (s - 1)) if s > 0 else None,
                "halvings": max(0, s - 1),
                "doublings": max(0, -s),
                "zp_word": _word(zp) if zp else None,
                "lo_word": _word(lo) if lo > -128 else None,
                "hi_word": _word(hi) if hi < 127 else None,
            }
        out.append(d)
    return out


def lane_requant_bits(zp: int, mult: int, shift: int) -> int | None:
    """The narrowest Helium lane (8, 16 or 32 bits) in which the vector requantization of an
    int8 input x (VSUB of zp, VMUL by mult, VRSHL by -shift, VQADD of the output zero point,
    VMAX/VMIN) equals formats.requantize(x - zp, mult, shift, ...) for every int8 x: x - zp,
    (x - zp) * mult and that times 2^-shift (shift < 0) lie inside the lane for both ends of the
    int8 range (VRSHL's rounding right shift is round_shift at any precision, and a saturating
    VQADD keeps every value on its side of [lo, hi]). None: no lane holds them."""
    if shift < -30:
        return None
    ends = [-128 - zp, 127 - zp]
    steps = [ends, [v * mult for v in ends], [v * mult << max(0, -shift) for v in ends]]
    for bits in (8, 16, 32):
        top = 1 << (bits - 1)
        if all(-top <= v < top for vs in steps for v in vs):
            return bits
    return None


def mve_concat_inputs(
    inputs: Sequence[Mapping[str, Any]], zp: int, lo: int, hi: int
) -> list[dict[str, Any]]:
    """How the Helium concat (cortex-m55) stores each input (the kernel context's `inputs`, with
    integer `mult_n`, `shift_n` and `zp`): copied 16 values per vector (VLDRB/VSTRB) when the
    requantization is the identity on every int8 value; else requantized in the narrowest lanes
    that hold it exactly (`lane_requant_bits`: 16, 8 or 4 values per widening VLDRB); else
    (`bits` None) one value at a time by qacc_requantize. `full`/`tail`: the input's channels in
    whole vectors and the rest (one tail-predicated vector)."""
    out = []
    for x in inputs:
        m, s, z = int(x["mult_n"]), int(x["shift_n"]), int(x["zp"])
        copy = (m, s, z, lo, hi) == (1, 0, zp, -128, 127)
        bits = 8 if copy else lane_requant_bits(z, m, s)
        lanes = 128 // bits if bits else 1
        out.append(
            {
                "copied": copy,  # not "copy": a dict method in Jinja
                "bits": bits,
                "lanes": lanes,
                "rshift": -s,
                **vector_split(int(x["c"]), lanes),
            }
        )
    return out


def vector_split(n: int, lanes: int) -> dict[str, int]:
    """n elements as `full` ones in whole vectors of `lanes` (loaded without a predicate, which
    GCC handles better) and a `tail` < lanes (one tail-predicated vector, or none)."""
    return {"full": n - n % lanes, "tail": n % lanes}


def mve_elementwise_loops(
    pixels: int, channels: int, b_stride: int, mvp: Mapping[str, Any]
) -> dict[str, Any]:
    """The loops of the Helium add and mul: rows of `cols` elements (whole int32x4 vectors, then
    a tail), `b` advancing `b_step` per row. Two tensors of one shape with one multiplier and
    shift for all channels are one flat row (one tail per tensor, not one per pixel)."""
    if b_stride and mvp["mult"] is None:
        rows, cols, step = 1, pixels * channels, 0
    else:
        rows, cols, step = pixels, channels, b_stride
    return {"rows": rows, "cols": cols, "b_step": step, **vector_split(cols, 4)}


def mve_gather_context(call: KernelCall) -> dict[str, Any] | None:
    """The Helium channel gather: a slice of consecutive channels is a predicated vector copy
    from channel `start` (16 per VLDRB); any other index list is a VLDRB gather with the index
    array itself as the offsets (read with a tail predicate, so not padded): 16 uint8 offsets
    per vector when every index is < 256, else 8 uint16 ones. `clamp`: a fused clamp narrows
    the int8 range. None (an index >= 2^15, stored as int32_t): the portable kernel."""
    node = call.node
    index = [int(i) for i in node.attrs["index"]]
    rq = node.requant
    assert rq is not None
    clamp = rq.lo > -128 or rq.hi < 127
    oc = len(index)
    if index == list(range(index[0], index[0] + oc)):
        return {"start": index[0], "lanes": 16, "vctp": "vctp8q", "gather": False,
                "clamp": clamp, **vector_split(oc, 16)}  # fmt: skip
    top = max(index)
    if top >= 1 << 15:
        return None
    lanes = 16 if top < 256 else 8
    return {"start": 0, "lanes": lanes, "vctp": f"vctp{128 // lanes}q", "gather": True,
            "clamp": clamp, **vector_split(oc, lanes)}  # fmt: skip


MAGIC_MAX_BITS = 30
"""The widest dividend `div_magic` divides exactly with a 32-bit magic number (m <= 2^31)."""


def div_magic(d: int, bits: int) -> tuple[int, int]:
    """The magic reciprocal (m, sh) of a divisor 1 <= d < 2^32 for dividends n < 2^bits, as
    `qacc_div_magic` (runtime_c/qacc.h) computes it at run time: floor(n / d) equals
    ((n * m) >> 32) >> sh, a 32-bit multiply-high (VMULH.U32) and a shift.

    Granlund & Montgomery (1994), the round-up variant: with l = d.bit_length() (so
    2^(l-1) <= d < 2^l), m = ceil(2^(bits + l) / d) and sh = bits + l - 32. Then
    delta = m d - 2^(bits + l) is in [0, d), and n m / 2^(bits + l) = n / d + n delta /
    (d 2^(bits + l)), whose second term is below 1 / d for every n < 2^bits (n delta <
    2^bits 2^l): it cannot carry n / d, whose fractional part is at most (d - 1) / d, past the
    next integer, so the floors agree. m <= 2^(bits + 1) (2^(bits + l) / d <= 2^(bits + 1)), a
    uint32 for bits <= MAGIC_MAX_BITS, and sh >= 0 needs l >= 32 - bits. In C, m is
    ceil(2^(bits + 32) / (d << (32 - l))), the same number: a 64 / 32-bit division whose
    divisor has its top bit set, done in two 16-bit digits."""
    lz = 32 - d.bit_length()
    assert 0 <= lz < 32 and 0 <= bits <= MAGIC_MAX_BITS and bits >= lz, (d, bits)
    return -(-(1 << (bits + 32)) // (d << lz)), bits - lz


def softmax_dividend_max(node: Node, channels: int) -> int:
    """The largest dividend of `reference.softmax`'s division, e * 2^(out_frac + 1) + s with
    e <= the table's largest entry and s <= channels times it."""
    emax = int(np.max(node.params["exp_table"]))
    return (emax << (int(node.attrs["out_frac"]) + 1)) + channels * emax


def softmax_dividend_bits(node: Node, channels: int) -> int:
    """The bits of `softmax_dividend_max`: every dividend is below 2^bits."""
    return softmax_dividend_max(node, channels).bit_length()


def softmax_div32(node: Node, channels: int) -> bool:
    """Whether the softmax's division fits 32 bits: its largest dividend and its divisor 2 s
    (out_frac <= 15 and fewer than 2^16 channels keep them there); else it is a 64-bit one."""
    emax = int(np.max(node.params["exp_table"]))
    return max(softmax_dividend_max(node, channels), 2 * channels * emax) < 1 << 32


def softmax_magic_context(node: Node, channels: int) -> dict[str, Any] | None:
    """The Helium softmax's division by the row's 2 s as a multiply-high by its magic reciprocal
    (`div_magic`, exact for dividends below 2^bits): None where the largest dividend needs more
    than MAGIC_MAX_BITS bits or the smallest divisor, twice the table's entry at distance 0 (the
    maximum's own term of every sum), is below 2^(31 - bits) (the shift would be negative); the
    portable kernel then. `clamp_lo` / `clamp_hi`: whether the saturation can bind, the quotient
    being in [0, 2^out_frac] (e <= s). Rows of 1 or 2 channels keep the portable kernel too: the
    reciprocal costs about 35 instructions per row, more than their scalar divisions."""
    bits = softmax_dividend_bits(node, channels)
    table0 = int(node.params["exp_table"][0])
    if channels < 3 or bits > MAGIC_MAX_BITS or 2 * table0 < 1 << (31 - bits):
        return None
    splits = {
        f"{key}{lanes}": n
        for lanes in (16, 8, 4)
        for key, n in vector_split(channels, lanes).items()
    }
    return {"bits": bits, **_softmax_clamps(node), **splits}


def _softmax_clamps(node: Node) -> dict[str, Any]:
    """Which sides of the softmax's saturation can bind, the quotient being in [0, 2^out_frac]
    (e <= s); `sat`: the one DSP instruction that is the whole saturation (USAT to [0, 2^b - 1],
    SSAT to [-2^(b-1), 2^(b-1) - 1]) where one is needed and the limits are such a range."""
    rq = node.requant
    assert rq is not None
    lo, hi = rq.lo, rq.hi
    clamp_lo, clamp_hi = rq.zero_point < lo, rq.zero_point + (1 << int(node.attrs["out_frac"])) > hi
    sat = None
    if (clamp_lo or clamp_hi) and hi >= 0 and (hi + 1) & hi == 0:  # hi = 2^b - 1
        if lo == 0:
            sat = f"__usat(%s, {hi.bit_length()})"
        elif lo == -(hi + 1):
            sat = f"__ssat(%s, {hi.bit_length() + 1})"
    return {"clamp_lo": clamp_lo, "clamp_hi": clamp_hi, "sat": sat}


def dsp_softmax_context(node: Node, channels: int) -> dict[str, Any] | None:
    """The DSP-extension softmax: 4 channels per word (the maximum by SSUB8 + SEL, the distances
    to it by USUB8, 4 table reads per word load), the division one UDIV per value as in the
    portable kernel (a magic multiply would be two instructions, UMULL and a shift). None for
    fewer than 4 channels: the portable kernel."""
    if channels < 4:
        return None
    return {**vector_split(channels, 4), **_softmax_clamps(node)}


def softmax_path(node: Node, dialect: str, channels: int) -> str | None:
    """report.json "path" of a softmax: ``vmulh-magic`` where the Helium kernel divides by the
    magic reciprocal (`softmax_magic_context`), ``usub8-udiv`` where the DSP kernel runs
    (`dsp_softmax_context`, a 32-bit division), None for the portable kernel."""
    if dialect == "mve" and softmax_magic_context(node, channels) is not None:
        return "vmulh-magic"
    if dialect == "dsp" and dsp_softmax_context(node, channels) and softmax_div32(node, channels):
        return "usub8-udiv"
    return None
