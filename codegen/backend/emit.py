"""Emit: render the Jinja templates into C sources, a header, CMake files and the report.

`emit(graph, model)` returns {relative path: text}; it is a pure function of its arguments, so the
same graph always gives byte-identical files. Every number the templates print is computed here;
the templates only substitute (no arithmetic, no formatting decisions).

Files of a model `<name>` (a C identifier derived from the model name):

  <name>.h               the public header: run function, shapes, formats, memory macros
  <name>.c               one static function per kernel call, the arena, qacc_<name>_run
  <name>_weights.c/.h    the const parameters (weights, biases, per-channel requantization)
  <name>_testbench.c     reads inputs from a file, writes outputs to a file
  qacc.h                 the runtime (copied from runtime_c/qacc.h)
  CMakeLists.txt         static library <name>; options for a shared library and the test bench
  report.json            RAM, flash, the arena's lower bound and the plan, per-layer kernels
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import jinja2
import numpy as np

from codegen.backend import layouts, memory
from codegen.backend.lower import KernelCall, Lowered, LoweringError, lower
from codegen.core.formats import wrap
from codegen.core.ir import Graph, Node, QFormat, Tensor, macs
from codegen.core.resources import data_path

TEMPLATES = data_path("templates")
RUNTIME = data_path("runtime_c")

_CTYPES: dict[str, tuple[int, int, int]] = {
    # name: (bytes, min, max)
    "uint8_t": (1, 0, (1 << 8) - 1),
    "int8_t": (1, -(1 << 7), (1 << 7) - 1),
    "uint16_t": (2, 0, (1 << 16) - 1),
    "int16_t": (2, -(1 << 15), (1 << 15) - 1),
    "int32_t": (4, -(1 << 31), (1 << 31) - 1),
    "int64_t": (8, -(1 << 63), (1 << 63) - 1),
}


def version() -> str:
    try:
        return metadata.version("qacc")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.1.0"


@functools.cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **context: Any) -> str:
    return _env().get_template(template).render(**context)


def kernel_template(dialect: str, stem: str) -> str:
    """The template of a kernel in a dialect; a dialect without its own version of a kernel uses
    the portable C one (templates/kernels/c/)."""
    own = f"kernels/{dialect}/{stem}.c.j2"
    if (TEMPLATES / own).is_file():
        return own
    return f"kernels/c/{stem}.c.j2"


CMAKE_RESERVED = frozenset(
    {"all", "clean", "depend", "edit_cache", "help", "install", "package", "package_source",
     "preinstall", "rebuild_cache", "test"}
)  # fmt: skip
"""Target names CMake reserves; a model with one of these names gets a suffix."""


def c_identifier(text: str, fallback: str = "m") -> str:
    """A C identifier from any name: [A-Za-z0-9_], not starting with a digit, never empty."""
    s = re.sub(r"[^0-9A-Za-z_]+", "_", text).strip("_")
    s = re.sub(r"__+", "_", s)
    if not s or s[0].isdigit():
        s = f"{fallback}_{s}" if s else fallback
    return s


def comment_text(text: str) -> str:
    """Text safe inside a /* */ comment on one line."""
    return " ".join(text.replace("*/", "* /").replace("/*", "/ *").split())


def c_int(v: int) -> str:
    """A C literal for an integer of any int64 value, typed wide enough (portable)."""
    v = int(v)
    if -(1 << 31) < v < (1 << 31):
        return str(v)
    if v == -(1 << 31):
        return "(-2147483647 - 1)"
    if v == -(1 << 63):
        return "(-INT64_C(9223372036854775807) - 1)"
    if not -(1 << 63) < v < (1 << 63):
        raise LoweringError(f"integer {v} does not fit int64")
    return f"INT64_C({v})" if v > 0 else f"(-INT64_C({-v}))"


def _ctype_for(values: Iterable[int], candidates: Sequence[str]) -> str:
    vals = list(values)
    lo, hi = min(vals, default=0), max(vals, default=0)
    for ct in candidates:
        _, cmin, cmax = _CTYPES[ct]
        if cmin <= lo and hi <= cmax:
            return ct
    raise LoweringError(f"values in [{lo}, {hi}] fit none of {', '.join(candidates)}")


@dataclass(frozen=True)
class ConstArray:
    """One const array of weights.c: a symbol, its C type and its values."""

    sym: str
    ctype: str
    values: tuple[int, ...]
    comment: str
    group: int = 0
    """Values per row group (e.g. per output channel); 0 for no grouping comments."""

    @property
    def length(self) -> int:
        return len(self.values)

    @property
    def nbytes(self) -> int:
        return len(self.values) * _CTYPES[self.ctype][0]

    @property
    def body(self) -> str:
        per_line = 16 if self.ctype in ("int8_t", "uint8_t") else 8
        lit = {"int64_t": c_int, "uint8_t": lambda v: f"0x{v:02x}"}.get(self.ctype, str)
        group = self.group if 0 < self.group < len(self.values) else len(self.values)
        lines: list[str] = []
        for g0 in range(0, len(self.values), group):
            if group < len(self.values):
                lines.append(f"    /* output channel {g0 // group} */")
            chunk = self.values[g0 : g0 + group]
            for i in range(0, len(chunk), per_line):
                lines.append("    " + ", ".join(lit(v) for v in chunk[i : i + per_line]) + ",")
        return "\n".join(lines)


def _ints(a: Any) -> tuple[int, ...]:
    arr = np.asarray(a)
    if arr.dtype.kind not in "iub":
        raise LoweringError(f"expected integer parameters, got dtype {arr.dtype}")
    return tuple(int(v) for v in arr.reshape(-1))


def _hwc(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) == 3:
        return int(shape[0]), int(shape[1]), int(shape[2])
    if len(shape) == 1:
        return 1, 1, int(shape[0])
    raise LoweringError(f"tensor shape {tuple(shape)} is neither (H, W, C) nor (C,)")


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _fmt(t: Tensor) -> QFormat:
    assert t.fmt is not None
    return t.fmt


class _Emitter:
    def __init__(self, lowered: Lowered, model: str, target: str, neon: layouts.NeonTarget):
        self.lowered = lowered
        self.neon = neon
        self.graph = lowered.graph
        self.plan = lowered.plan
        self.model = model
        self.target = target
        self.name = model_c_name(lowered.graph, model)
        self.prefix = f"QACC_{self.name.upper()}"
        self.run_fn = f"qacc_{self.name}_run"
        self.stamp_text = f"Generated by qacc {version()} from {comment_text(model)}. Do not edit."
        self.arrays: list[ConstArray] = []
        self.layer_weight_bytes: dict[str, int] = {}
        self.layer_ids: dict[str, str] = {}
        self.scratch_elems = 0
        """int16 elements of the static scratch buffer shared by the kernels (max over layers)."""
        used: set[str] = set()
        for node in self.graph.nodes:
            base = c_identifier(node.name, "layer")
            lid, i = base, 2
            while lid in used:
                lid, i = f"{base}_{i}", i + 1
            used.add(lid)
            self.layer_ids[node.name] = lid

    # -- const data

    def add_array(
        self,
        node: Node,
        what: str,
        ctype: str,
        values: Sequence[int],
        comment: str,
        group: int = 0,
        bits: int = 0,
    ) -> str:
        """A const array of `values` as `ctype`; bits 4 or 2: stored packed instead
        (layouts.pack_bits, a uint8_t array of ceil(n * bits / 8) bytes; the kernels unpack it
        to `ctype` with qacc_unpack_s<bits>)."""
        lid = self.layer_ids[node.name]
        sym = f"qacc_{self.name}_{lid}_{what}"
        _, lo, hi = _CTYPES[ctype]
        if any(v < lo or v > hi for v in values):
            raise LoweringError(f"{node.name}: {what} values do not fit {ctype}")
        if bits:
            packed = layouts.pack_bits(values, bits)
            comment = (
                f"{comment}; packed: {len(values)} {bits}-bit two's complement values"
                f" ({8 // bits} per byte, lowest bits first) in {len(packed)} bytes"
            )
            ctype, values, group = "uint8_t", packed, 0
        arr = ConstArray(sym, ctype, tuple(values), comment_text(comment), group)
        self.arrays.append(arr)
        self.layer_weight_bytes[node.name] = self.layer_weight_bytes.get(node.name, 0) + arr.nbytes
        return sym

    # -- pointers

    def ptr(self, tensor: str) -> str:
        b = self.plan.buffer_of(tensor)
        if b.location == memory.INPUT:
            return "in"
        if b.location == memory.OUTPUT:
            return self.out_param(b.port)
        return "arena" if b.offset == 0 else f"arena + {b.offset}"

    def out_param(self, k: int) -> str:
        """The run function's parameter receiving output k: `out`, or out0, out1... when the
        model has several outputs."""
        return "out" if len(self.graph.outputs) == 1 else f"out{k}"

    # -- kernels

    def requant_context(
        self, node: Node, channels: int, per: str = "output channel"
    ) -> dict[str, Any]:
        rq = node.requant
        assert rq is not None
        mult, shift = _ints(rq.mult), _ints(rq.shift)
        ctx: dict[str, Any] = {
            "zp": rq.zero_point,
            "lo": rq.lo,
            "hi": rq.hi,
            "mult_sym": None,
            "shift_sym": None,
        }
        for what, vals, ctypes in (
            ("mult", mult, ("int32_t", "int64_t")),
            ("shift", shift, ("int8_t",)),
        ):
            if len(vals) not in (1, channels):
                raise LoweringError(
                    f"{node.name}: requant.{what} has {len(vals)} values for {channels} channels"
                )
            if len(set(vals)) == 1:
                ctx[what] = c_int(vals[0])
            else:
                ctx[what] = None
                ctx[f"{what}_sym"] = self.add_array(
                    node,
                    what,
                    _ctype_for(vals, ctypes),
                    vals,
                    f"{node.name}: requantization {what}, per {per}",
                )
        return ctx

    def lut_table(self, owner: Node, lut: Node, what: str, rotated: bool) -> str:
        """The 256-entry table of `lut` as a const array of layer `owner`: at [q + 128], or
        rotated by 128 (at [(uint8_t)q]) for the input q."""
        table = np.asarray(lut.params["table"], dtype=np.int64)
        return self.add_array(
            owner,
            what,
            "int8_t",
            _ints(np.roll(table, 128) if rotated else table),
            f"{lut.name}: {lut.attrs['function']} table, output for input q at "
            + ("[(uint8_t)q] (rotated)" if rotated else "[q + 128]"),
        )

    def title(self, call: KernelCall) -> str:
        node, g = call.node, self.graph
        ins = " + ".join(_shape_text(g.tensors[t].shape) for t in node.inputs)
        parts = [
            f"{node.name}: {node.op} -> {call.kernel}, {ins} -> "
            f"{_shape_text(g.tensors[node.output].shape)}"
        ]
        a = node.attrs
        if node.op == "conv2d":
            _, kh, kw, _ = node.params["weight"].shape
            parts.append(f"kernel {kh}x{kw}")
        elif "kernel" in a:
            parts.append(f"kernel {a['kernel'][0]}x{a['kernel'][1]}")
        if "stride" in a:
            parts.append(f"stride {a['stride'][0]}x{a['stride'][1]}")
        if "padding" in a and any(a["padding"]):
            t, b, lf, r = a["padding"]
            parts.append(f"padding t{t} b{b} l{lf} r{r}")
        if "dilation" in a and tuple(a["dilation"]) != (1, 1):
            parts.append(f"dilation {a['dilation'][0]}x{a['dilation'][1]}")
        if int(a.get("groups", 1)) > 1:
            parts.append(f"groups {a['groups']}")
        if call.acc_tile is not None:
            parts.append(
                f"two-stage accumulator: tiles of {call.acc_tile} terms in {call.acc_bits} bits"
                f" ({call.acc_ctype}), their sums in {call.acc2_bits} bits (uint32_t)"
            )
        elif call.exact_tile is not None:
            parts.append(
                f"two-stage accumulator (tiles of {call.exact_tile} terms in"
                f" {node.attrs['acc_bits']} bits) that no tile can wrap: one {call.acc_bits}-bit"
                f" stage in {call.acc_ctype}"
            )
        elif call.acc_bits is not None:
            parts.append(f"accumulator {call.acc_bits} bits in {call.acc_ctype}")
        rq = node.requant
        if rq is not None:
            parts.append(f"output [{rq.lo}, {rq.hi}]")
        if call.lut is not None:
            parts.append(f"then the {call.lut.attrs['function']} table of {call.lut.name} (fused)")
        if node.name in self.plan.inplace:
            parts.append(f"in place over {self.plan.inplace[node.name]}")
        return comment_text(", ".join(parts))

    def kernel_context(self, call: KernelCall, own_params: bool = True) -> dict[str, Any]:
        """Every value any kernel template may need, computed from the node generically.

        own_params=False: the weight, bias and per-channel requantization arrays are not stored
        (a dialect kernel stores its own packed versions instead; see codegen.backend.layouts)."""
        node, g = call.node, self.graph
        a, p = node.attrs, node.params
        ins = [g.tensors[t] for t in node.inputs]
        out = g.tensors[node.output]
        ih, iw, ic = _hwc(ins[0].shape)
        oh, ow, oc = _hwc(out.shape)
        stride = tuple(a.get("stride", (1, 1)))
        padding = tuple(a.get("padding", (0, 0, 0, 0)))
        dilation = tuple(a.get("dilation", (1, 1)))
        groups = int(a.get("groups", 1))
        kernel = tuple(a.get("kernel", (1, 1)))
        k: dict[str, Any] = {
            "fn": f"layer_{self.layer_ids[node.name]}",
            "title": self.title(call),
            "ih": ih,
            "iw": iw,
            "ic": ic,
            "oh": oh,
            "ow": ow,
            "oc": oc,
            "hw": ih * iw,
            "pixels": oh * ow,
            "kh": kernel[0],
            "kw": kernel[1],
            "sh": stride[0],
            "sw": stride[1],
            "pt": padding[0],
            "pl": padding[2],
            "dh": dilation[0],
            "dw": dilation[1],
            "groups": groups,
            "in_zp": int(a.get("input_zero_point", 0)),
        }
        if call.container_bits is not None:
            cb = call.container_bits
            k.update(
                acc_t=call.acc_ctype,
                acc_bits=call.acc_bits,
                container_bits=cb,
                wrap=f"qacc_wrap{cb}",
                mul=f"qacc_mul_u{cb}",
                tile=call.acc_tile or 0,
                acc2_bits=call.acc2_bits or 0,
            )
        if "weight" in p:
            w = np.asarray(p["weight"])
            per_out = math.prod(w.shape[1:])
            wbits = layouts.weight_storage_bits(node)
            k["wbits"] = wbits
            k["weight"] = (
                None
                if not own_params
                else self.add_array(
                    node,
                    "weight",
                    "int8_t",
                    _ints(w),
                    f"{node.name}: weights, shape {tuple(int(d) for d in w.shape)}"
                    f" ({'O, kh, kw, I/groups' if w.ndim == 4 else 'O, I'})",
                    per_out,
                    bits=wbits,
                )
            )
            k["w_stride"] = per_out
            k["icg"] = int(w.shape[-1])
            k["ocg"] = oc // groups
            if w.ndim == 4:
                k["kh"], k["kw"] = int(w.shape[1]), int(w.shape[2])
            bias = _ints(p["bias"]) if "bias" in p else (0,) * int(w.shape[0])
            assert call.acc_bits is not None and call.container_bits is not None
            # two stages: the bias belongs to the wide (acc2_bits, int32) stage
            bias_bits = call.acc2_bits or call.acc_bits
            wrapped = [int(v) for v in wrap(np.asarray(bias, dtype=np.int64), bias_bits)]
            k["bias"] = (
                None
                if not own_params
                else self.add_array(
                    node,
                    "bias",
                    "int32_t" if call.acc2_bits else f"int{call.container_bits}_t",
                    wrapped,
                    f"{node.name}: bias in accumulator units (wrapped to {bias_bits} bits)",
                )
            )
        if node.op == "add":
            assert call.container_bits is not None
            mask = (1 << call.container_bits) - 1
            ma, mb = (int(v) for v in _ints(p["in_mult"]))
            za, zb = (int(v) for v in a.get("input_zero_points", (0, 0)))
            k.update(ma=f"{ma & mask}u", mb=f"{mb & mask}u", za=za, zb=zb)
        if node.op == "mul":
            za, zb = (int(v) for v in a.get("input_zero_points", (0, 0)))
            per_channel = ins[1].size != out.size  # the second operand: one value per channel
            k.update(za=za, zb=zb, b_stride=0 if per_channel else oc)
        if node.op == "softmax":
            k["norm_shift"] = int(a["out_frac"]) + 1
            # the division in 32 bits when e * 2^norm_shift + sum and 2 * sum fit (they do for
            # out_frac <= 15 and fewer than 2^16 channels); else in 64 bits (a library call on
            # 32-bit cores)
            k["div32"] = layouts.softmax_div32(node, oc)
            k["exp_table"] = self.add_array(
                node,
                "exp",
                "uint16_t",
                _ints(p["exp_table"]),
                f"{node.name}: exp(-d * input scale) in units of 2^-15, at [d] = max - input",
            )
        if node.op == "lut":  # the table is the layer: stored whatever the dialect
            k["size"] = out.size
            # Helium / DSP: rotated by 128, so the input byte itself is the VLDRB gather offset
            # or the UXTB-extracted index
            k["table_rotated"] = self.lowered.dialect in ("mve", "dsp")
            k.update(layouts.vector_split(out.size, 16))
            k["table"] = self.lut_table(node, node, "table", k["table_rotated"])
        # a fused lut, read in the store step: rotated (at [(uint8_t)q]: the byte itself is the
        # index, also NEON's TBL index)
        k["lut"] = None if call.lut is None else self.lut_table(node, call.lut, "lut", True)
        if node.op in ("adaptive_avgpool2d", "adaptive_maxpool2d"):  # the windows
            for axis, what in (("rows", "row"), ("cols", "col")):
                for i, end in ((0, "start"), (1, "end")):
                    vals = [int(w[i]) for w in a[axis]]
                    k[f"{what}_{end}"] = self.add_array(
                        node,
                        f"{what}_{end}",
                        _ctype_for(vals, ("uint8_t", "int16_t", "int32_t")),
                        vals,
                        f"{node.name}: the window of each output {what}: its {end}"
                        f" ({'exclusive' if i else 'inclusive'}) in the input",
                    )
        if node.op == "resize_bilinear":  # the two input rows/columns and their weights
            one = 1 << int(a["weight_bits"])
            for axis in ("row", "col"):
                taps, w1 = a[f"{axis}s"], [int(w) for w in a[f"{axis}_weight"]]
                for i, vals, ctypes, what in (
                    (0, [int(t[0]) for t in taps], ("uint8_t", "int16_t", "int32_t"), "first"),
                    (1, [int(t[1]) for t in taps], ("uint8_t", "int16_t", "int32_t"), "second"),
                ):
                    k[f"{axis}{i}"] = self.add_array(
                        node, f"{axis}{i}", _ctype_for(vals, ctypes), vals,
                        f"{node.name}: the {what} input {axis} of each output {axis}",
                    )  # fmt: skip
                for i, vals in ((0, [one - w for w in w1]), (1, w1)):
                    k[f"{axis}_w{i}"] = self.add_array(
                        node, f"{axis}_w{i}", _ctype_for(vals, ("uint8_t", "uint16_t")), vals,
                        f"{node.name}: the weight of the {('first', 'second')[i]} input {axis},"
                        f" in units of 2^-{a['weight_bits']}",
                    )  # fmt: skip
        if node.op == "gather":  # the input channel of every output channel
            index = [int(i) for i in a["index"]]
            k["index"] = self.add_array(
                node,
                "index",
                _ctype_for(index, ("uint8_t", "int16_t", "int32_t")),
                index,
                f"{node.name}: the input channel of each output channel",
            )
        if node.op == "concat":
            rq = node.requant
            assert rq is not None
            mult, shift = _ints(rq.mult), _ints(rq.shift)
            n = len(node.inputs)
            if len(mult) not in (1, n) or len(shift) not in (1, n):
                raise LoweringError(f"{node.name}: concat needs one mult and shift per input")
            zps = [int(v) for v in a.get("input_zero_points", (0,) * n)]
            offset, xs = 0, []
            for i, t in enumerate(node.inputs):
                c = _hwc(g.tensors[t].shape)[2]
                xs.append(
                    {
                        "name": f"in{i}",
                        "tensor": comment_text(t),
                        "c": c,
                        "offset": offset,
                        "zp": zps[i],
                        "mult": c_int(mult[i if len(mult) > 1 else 0]),
                        "shift": c_int(shift[i if len(shift) > 1 else 0]),
                        "mult_n": int(mult[i if len(mult) > 1 else 0]),
                        "shift_n": int(shift[i if len(shift) > 1 else 0]),
                    }
                )
                offset += c
            k.update(inputs=xs, zp=rq.zero_point, lo=rq.lo, hi=rq.hi)
        elif node.op == "adaptive_avgpool2d":  # one divisor per output pixel
            k.update(self.requant_context(node, oh * ow, "output pixel"))
        elif node.requant is not None and own_params:
            k.update(self.requant_context(node, oc))
        elif node.requant is not None:
            k.update(zp=node.requant.zero_point, lo=node.requant.lo, hi=node.requant.hi)
        return k

    def kernel_code(self, call: KernelCall) -> str:
        neon = None
        dialect = self.lowered.dialect
        if call.acc_tile is not None and dialect not in ("c", "neon"):
            dialect = "c"  # two stages: the DSP and MVE kernels have no such path yet

        def add(what: str, ctype: str, values: Sequence[int], comment: str, bits: int = 0) -> str:
            return self.add_array(call.node, what, ctype, values, comment, bits=bits)

        if dialect == "neon":
            neon = layouts.neon_context(
                self.graph,
                call,
                self.neon,
                add,
            )
        mve = None
        if dialect == "mve" and call.template == "conv2d_depthwise":
            mve = layouts.mve_depthwise_context(
                self.graph,
                call,
                add,
            )
        dsp = None
        if dialect == "dsp" and call.template in layouts.GEMM_TEMPLATES:
            dsp = layouts.dsp_gemm_context(
                call,
                add,
            )
        if dialect == "dsp" and call.template == "conv2d_depthwise":
            dsp = layouts.dsp_depthwise_context(
                self.graph,
                call,
                add,
            )
        mvq = None
        if dialect == "mve":
            mvq = layouts.mve_requant_context(
                call,
                add,
            )
        own = neon is None and mve is None and dsp is None
        ctx = self.kernel_context(call, own_params=own and not (mvq and mvq["standalone"]))
        if dsp is not None and call.node.requant is not None:  # scalar requantization
            ctx.update(self.requant_context(call.node, int(ctx["oc"])))
        if neon is not None:
            neon["lut"] = ctx["lut"]  # the NEON store macros read it from the NEON context
        ctx["neon"] = neon
        ctx["mve"] = mve
        # DSP: 32-bit requantization where the layer's bounds allow it (no cheap 64-bit shifts)
        pool_taps = (
            int(ctx["kh"]) * int(ctx["kw"])
            if call.template == "avgpool2d"
            else layouts.adaptive_taps(call)
            if call.template == "adaptive_avgpool2d"
            else int(ctx["hw"])
        )
        ctx["rq32"] = dialect == "dsp" and layouts.requant32_ok(call, pool_taps)
        ctx["dspp"] = (
            layouts.dsp_pool_context(call, int(ctx["hw"]), int(ctx["ic"]))
            if dialect == "dsp"
            else None
        )
        ctx["dspr"] = (
            layouts.dsp_resize_context(call, int(ctx["iw"]), int(ctx["ic"]), add)
            if dialect == "dsp" and call.template == "resize_bilinear"
            else None
        )
        if ctx["dspr"] is not None:  # the vertical blends of one output row
            self.scratch_elems = max(self.scratch_elems, int(ctx["dspr"]["scratch_elems"]))
        if dialect == "dsp" and call.template == "concat":  # copy, or requantize in 32 bits
            hows = layouts.dsp_concat_inputs(ctx["inputs"], ctx["zp"], ctx["lo"], ctx["hi"])
            for x, how in zip(ctx["inputs"], hows, strict=True):
                x["dsp"], x["dspl"] = how["how"], how
        shapes = (int(ctx[n]) for n in ("ih", "iw", "oh", "ow", "ic"))
        ctx["dspm"] = (
            layouts.dsp_maxpool_context(call, *shapes)
            if dialect == "dsp" and call.template == "maxpool2d"
            else layouts.dsp_avgpool_context(call, *shapes)
            if dialect == "dsp" and call.template == "avgpool2d"
            else None
        )
        ctx["dspa"] = (
            layouts.dsp_add_context(call, int(ctx["pixels"]), int(ctx["oc"]))
            if dialect == "dsp" and call.template == "add"
            else None
        )
        ctx["dspx"] = (  # the DSP product: SMULBB / SMULTT on SXTB16 lanes
            layouts.dsp_mul_context(
                call, int(ctx["pixels"]), int(ctx["oc"]), int(ctx.get("b_stride", 0))
            )
            if dialect == "dsp" and call.template == "mul"
            else None
        )
        ctx["dspw"] = (  # the DSP adaptive pools over their given windows
            layouts.dsp_adaptive_context(call, int(ctx["iw"]), int(ctx["ic"]))
            if dialect == "dsp"
            else None
        )
        ctx["dspl"] = (  # the DSP table lookup: 4 values per word
            layouts.vector_split(int(ctx["size"]), 4)
            if dialect == "dsp" and call.template == "lut"
            else None
        )
        ctx["dspg"] = (
            layouts.dsp_gather_context(call)
            if dialect == "dsp" and call.template == "gather"
            else None
        )
        if dialect == "mve" and call.template == "concat":  # copy, or requantize in lanes
            mves = layouts.mve_concat_inputs(ctx["inputs"], ctx["zp"], ctx["lo"], ctx["hi"])
            for x, mv in zip(ctx["inputs"], mves, strict=True):
                x["mve"] = mv
        # DSP zero insertion: the output zero point in the 4 bytes of a word
        ctx["zp_word"] = (
            f"0x{(int(ctx['zp']) & 0xFF) * 0x01010101:08X}u"
            if dialect == "dsp" and call.template == "zero_insert"
            else None
        )
        # DSP conv: the 4 weight rows are read at LDR immediate offsets (imm12) from one pointer
        ctx["ldr_rows"] = 3 * int(ctx.get("w_stride", 0)) <= 4095
        ctx["dsp"] = dsp
        ctx["mvq"] = mvq
        ctx.update(layouts.mve_pixel_block(call, ctx) if dialect == "mve" else {"mve_pixels": 0})
        ctx["mvp"] = None
        if dialect == "mve" and call.template in layouts.POOL_TEMPLATES:
            taps = {"global_avgpool": ctx["hw"], "avgpool2d": ctx["kh"] * ctx["kw"]}
            channels = {"add": ctx["oc"], "adaptive_avgpool2d": ctx["pixels"]}
            if call.template == "adaptive_avgpool2d":  # the largest window
                taps[call.template] = layouts.adaptive_taps(call)
            ctx["mvp"] = layouts.mve_pool_context(
                call,
                int(taps.get(call.template, 1)),
                int(channels.get(call.template, ctx["ic"])),
                add,
            )
            if call.template == "resize_bilinear" and ctx["mvp"] is not None:
                ctx["mvp"].update(layouts.vector_split(int(ctx["ic"]), 4))
            if call.template in ("add", "mul") and ctx["mvp"] is not None:
                b_stride = int(ctx.get("b_stride", ctx["oc"]))  # add: two tensors of one shape
                ctx["mvp"].update(
                    layouts.mve_elementwise_loops(ctx["pixels"], ctx["oc"], b_stride, ctx["mvp"])
                )
        ctx["smx"] = (  # Helium softmax: the division by a magic reciprocal; DSP: 4 per word
            layouts.softmax_magic_context(call.node, int(ctx["oc"]))
            if dialect == "mve" and call.template == "softmax"
            else layouts.dsp_softmax_context(call.node, int(ctx["oc"]))
            if dialect == "dsp" and call.template == "softmax"
            else None
        )
        ctx["mvg"] = (
            layouts.mve_gather_context(call)
            if dialect == "mve" and call.template == "gather"
            else None
        )
        if neon is not None:
            self.scratch_elems = max(self.scratch_elems, int(neon.get("scratch_elems", 0)))
        elif ctx.get("wbits"):
            # the block of unpacked int8 weights of the portable / DSP / MVE kernels
            ctx["wblock"] = layouts.unpack_block(call, dialect)
            need = ctx["wblock"] * int(ctx["w_stride"])
            self.scratch_elems = max(self.scratch_elems, -(-need // 2))
        return render(kernel_template(dialect, call.template), k=ctx).strip("\n")

    # -- files

    def io_context(self, role: str, tensor: str, param: str = "in") -> dict[str, Any]:
        t = self.graph.tensors[tensor]
        f = _fmt(t)
        shape = [int(d) for d in t.shape]
        dims = [{"name": f"DIM{i}", "value": d} for i, d in enumerate(shape)]
        if len(shape) == 3:
            dims += [{"name": n, "value": d} for n, d in zip("HWC", shape, strict=True)]
        elif len(shape) == 1:
            dims.append({"name": "C", "value": shape[0]})
        return {
            "role": role,
            "param": param,
            "name": tensor,
            "tensor": comment_text(tensor),
            "macro": f"{self.prefix}_{role.upper()}",
            "rank": len(shape),
            "dims": dims,
            "shape": shape,
            "shape_list": ", ".join(str(d) for d in shape),
            "shape_text": _shape_text(shape),
            "size": t.size,
            "bits": f.bits,
            "signed": int(f.signed),
            "frac": f.frac if f.frac >= 0 else f"({f.frac})",
            "scale": f"{f.scale!r}",  # repr: the shortest text that reads back as this double
            "scale_note": "2^-FRAC" if f.is_pow2 else "dyadic: FRAC is only its nearest 2^-n",
            "zero_point": f.zero_point if f.zero_point >= 0 else f"({f.zero_point})",
            "qmin": f.qmin if f.qmin >= 0 else f"({f.qmin})",
            "qmax": f.qmax,
            "format": f.describe() + (f" zero point {f.zero_point}" if f.zero_point else ""),
        }

    def files(self) -> dict[str, str]:
        g, plan, name = self.graph, self.plan, self.name
        kernels = [self.kernel_code(c) for c in self.lowered.calls]
        steps = []
        for c in self.lowered.calls:
            n = c.node
            args = [self.ptr(t) for t in n.inputs] + [self.ptr(n.output)]
            note = f", in place over {plan.inplace[n.name]}" if n.name in plan.inplace else ""
            steps.append(
                {
                    "fn": f"layer_{self.layer_ids[n.name]}",
                    "args": ", ".join(args),
                    "comment": comment_text(
                        f"{n.name} ({c.kernel}): {', '.join(n.inputs)} -> {n.output}{note}"
                    ),
                }
            )
        buffers = []
        for b in plan.buffers:
            where = (
                f"arena[{b.offset}..{b.offset + b.size})"
                if b.location == memory.ARENA
                else f"caller's {'in' if b.location == memory.INPUT else self.out_param(b.port)}"
            )
            buffers.append(
                comment_text(
                    f"{', '.join(b.tensors)}: {b.size} bytes at {where},"
                    f" live steps {b.start}..{b.end}"
                )
            )
        weight_bytes = sum(a.nbytes for a in self.arrays)
        packed = [a for a in self.arrays if a.ctype == "uint8_t"]
        common = {
            "stamp": f"/* {self.stamp_text} */",
            "stamp_cmake": f"# {self.stamp_text}",
            "name": name,
            "model": comment_text(self.model),
            "prefix": self.prefix,
            "run_fn": self.run_fn,
            "dialect": self.lowered.dialect,
            "arena_bytes": plan.arena_bytes,
            "lower_bound": plan.lower_bound,
            "scratch_bytes": 2 * self.scratch_elems,
            "scratch_elems": self.scratch_elems,
            "ram_bytes": plan.arena_bytes + 2 * self.scratch_elems,
            "weight_bytes": weight_bytes,
            "packed_arrays": len(packed),
            "packed_bytes": sum(a.nbytes for a in packed),
        }
        io_in = self.io_context("input", g.input)
        several = len(g.outputs) > 1
        io_outs = [
            self.io_context(f"output{k}" if several else "output", t, self.out_param(k))
            for k, t in enumerate(g.outputs)
        ]
        copies = [
            {"out": io_outs[k], "src": self.ptr(t), "tensor": comment_text(t)}
            for k, t in plan.output_copies
        ]
        files = {
            f"{name}.h": render(
                "model.h.j2",
                **common,
                guard=f"{self.prefix}_H",
                input=io_in,
                outputs=io_outs,
                n_kernels=len(kernels),
            ),
            f"{name}.c": render(
                "model.c.j2",
                **common,
                kernels=kernels,
                steps=steps,
                buffers=buffers,
                plan_method=plan.method,
                outputs=io_outs,
                copies=copies,
            ),
            f"{name}_weights.h": render(
                "weights.h.j2", **common, guard=f"{self.prefix}_WEIGHTS_H", arrays=self.arrays
            ),
            f"{name}_weights.c": render("weights.c.j2", **common, arrays=self.arrays),
            f"{name}_testbench.c": render("testbench.c.j2", **common, outputs=io_outs),
            "CMakeLists.txt": render("CMakeLists.txt.j2", **common),
            "qacc.h": (RUNTIME / "qacc.h").read_text(),
            "report.json": json.dumps(
                self.report(io_in, io_outs, weight_bytes), indent=2, sort_keys=True
            )
            + "\n",
        }
        return dict(sorted(files.items()))

    def report(
        self, io_in: dict[str, Any], io_outs: list[dict[str, Any]], weight_bytes: int
    ) -> dict[str, Any]:
        g, plan = self.graph, self.plan

        def io(d: dict[str, Any]) -> dict[str, Any]:
            f = _fmt(g.tensors[d["name"]])
            return {
                "tensor": d["name"],
                "shape": d["shape"],
                "bytes": d["size"],
                "format": f.describe(),
                "zero_point": f.zero_point,
            }

        bound = plan.lower_bound
        layers: list[dict[str, Any]] = []
        for c in self.lowered.calls:
            n = c.node
            layers.append(
                {
                    "name": n.name,
                    "op": n.op,
                    "kernel": c.kernel,
                    "function": f"layer_{self.layer_ids[n.name]}",
                    "acc_bits": c.acc_bits,
                    "container_bits": c.container_bits,
                    "path": (
                        layouts.softmax_path(n, self.lowered.dialect, g.tensors[n.output].shape[-1])
                        if n.op == "softmax"
                        else layouts.path(c, self.lowered.dialect, self.neon)
                    ),
                    "macs": macs(g, n),
                    "weight_bytes": self.layer_weight_bytes.get(n.name, 0),
                    "inputs": list(n.inputs),
                    "output": n.output,
                    "in_place": n.name in plan.inplace,
                    "fused_lut": None if c.lut is None else c.lut.name,
                }
            )
        return {
            "generator": f"qacc {version()}",
            "model": self.model,
            "name": self.name,
            "target": self.target,
            "dialect": self.lowered.dialect,
            "header": f"{self.name}.h",
            "library": f"lib{self.name}.a",
            "run_function": self.run_fn,
            "input": io(io_in),
            "output": io(io_outs[0]),
            "outputs": [io(d) | {"parameter": d["param"]} for d in io_outs],
            "memory": {
                "ram_bytes": plan.arena_bytes + 2 * self.scratch_elems,
                "arena_bytes": plan.arena_bytes,
                "scratch_bytes": 2 * self.scratch_elems,
                "arena_lower_bound": bound,
                "arena_gap_bytes": plan.gap,
                "arena_gap_percent": round(100.0 * plan.gap / bound, 2) if bound else 0.0,
                "flash_weight_bytes": weight_bytes,
                "io_bytes": io_in["size"] + sum(d["size"] for d in io_outs),
                "plan": plan.summary(),
            },
            "layers": layers,
            "fused_luts": self.lowered.fused_luts,
            "macs": sum(int(v["macs"]) for v in layers),
        }


class KernelTarget(Protocol):
    """What the backend reads of a target: the name the report states, the kernel dialect, the
    arena alignment and the core's NEON features. The targets stage's BuildTarget is one."""

    @property
    def name(self) -> str: ...
    @property
    def dialect(self) -> str: ...
    @property
    def align(self) -> int: ...
    @property
    def neon(self) -> layouts.NeonTarget: ...


@dataclass(frozen=True)
class PortableTarget:
    """Portable C for the build machine: what `emit` generates when no target is given."""

    name: str = "host"
    dialect: str = "c"
    align: int = 1
    neon: layouts.NeonTarget = layouts.A64


PORTABLE = PortableTarget()


def emit_lowered(
    lowered: Lowered, model: str | None = None, target: KernelTarget = PORTABLE
) -> dict[str, str]:
    """Render an already lowered graph (lowered for `target`'s dialect)."""
    return _Emitter(lowered, model or lowered.graph.name, target.name, target.neon).files()


def emit(graph: Graph, model: str | None = None, target: KernelTarget = PORTABLE) -> dict[str, str]:
    """All files of the generated model directory, {relative path: text}, deterministic.

    `model` names the model (default: graph.name); the C name is derived from it. `target`
    gives the kernel dialect, the arena alignment and the NEON features the kernel choice
    reads (codegen.targets.build.resolve_target(name) for a target of the table).
    """
    return emit_lowered(lower(graph, dialect=target.dialect, align=target.align), model, target)


def model_c_name(graph: Graph, model: str | None = None) -> str:
    """The C identifier emit() uses for a model (file names, symbols, CMake target)."""
    name = c_identifier(model or graph.name).lower()
    return f"{name}_model" if name in CMAKE_RESERVED else name


def write_files(files: dict[str, str], out_dir: Path) -> list[Path]:
    """Write emitted files under out_dir (created if missing); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rel, text in files.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
