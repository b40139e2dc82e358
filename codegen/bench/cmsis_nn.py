"""Benchmark peer on Cortex-M: Arm's CMSIS-NN, on the same layers, under the same QEMU machine.

    layers = cmsis_nn.layers_of(graph)            # {qacc layer name: CmsisLayer}
    counts = cmsis_nn.instructions(list(layers.values()), "cortex-m55")

builds runtime_c/peers/cmsis_nn_layers.c with the CMSIS-NN sources of a source tree (the one
vendored at third_party/CMSIS-NN in a checkout, or a user's own checkout) by arm-none-eabi-gcc -O2
for the target's core, with the same startup code, board linker script and float ABI as qacc's
Cortex-M builds (toolchains/cortex-m.cmake), and counts the instructions of one call of the s8
function TensorFlow Lite Micro calls for each layer (arm_convolve_wrapper_s8, or
arm_convolve_s8 for a grouped conv: the wrapper's 1x1 and 1xN kernels take no groups;
arm_depthwise_conv_wrapper_s8, whatever the channel multiplier; arm_fully_connected_s8,
arm_max_pool_s8, arm_avgpool_s8, arm_elementwise_add_s8, arm_elementwise_mul_s8,
arm_softmax_s8; arm_concatenation_s8_x once per input of a channel concat) between two
qacc_mark() calls, as qacc's per-layer counts are taken between the marks around a layer.
Executables are cached in build/peers, keyed by the sources.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codegen.bench.peers import PeerError, marked_counts
from codegen.core.resources import data_path
from codegen.targets.qemu import run_under_emulator
from codegen.targets.table import TargetError, check_tools, get_target

HARNESS_SRC = data_path("runtime_c", "peers", "cmsis_nn_layers.c")
CORTEXM_DIR = data_path("runtime_c", "cortexm")
BUILD_DIR = data_path("build", "peers")
DEFAULT_TREE = data_path("third_party", "CMSIS-NN")
FIELDS = 14
MAX_CONCAT = 10
"""Most inputs of a channel concat that the harness takes."""

# The source directories whose int8 kernels (and their helpers) the harness links.
SOURCE_DIRS = (
    "BasicMathFunctions",
    "ConcatenationFunctions",
    "ConvolutionFunctions",
    "FullyConnectedFunctions",
    "NNSupportFunctions",
    "PoolingFunctions",
    "SoftmaxFunctions",
    "TransposeFunctions",
)
_MARKERS = (
    "Include/arm_nnfunctions.h",
    "Source/ConvolutionFunctions/arm_convolve_wrapper_s8.c",
)

# Float ABI flags per core, as toolchains/cortex-m.cmake sets them.
FPU_FLAGS = {
    "cortex-m4": ("-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"),
    "cortex-m7": ("-mfpu=fpv5-d16", "-mfloat-abi=hard"),
    "cortex-m55": ("-mfloat-abi=hard",),
}

KINDS = {
    "conv": 0, "depthwise": 1, "dense": 2, "maxpool": 3, "avgpool": 4, "add": 5, "mul": 6,
    "softmax": 7, "concat": 8,
}  # fmt: skip
FUNCTIONS = {
    "conv": "arm_convolve_wrapper_s8",
    "depthwise": "arm_depthwise_conv_wrapper_s8",
    "dense": "arm_fully_connected_s8",
    "maxpool": "arm_max_pool_s8",
    "avgpool": "arm_avgpool_s8",
    "add": "arm_elementwise_add_s8",
    "mul": "arm_elementwise_mul_s8",
    "softmax": "arm_softmax_s8",
    "concat": "arm_concatenation_s8_x",
}


@dataclass(frozen=True)
class CmsisLayer:
    """One CMSIS-NN call: its kind (a key of KINDS), 12 integer parameters (see the harness) and
    the MACs it performs (0 for pooling, add, mul and softmax)."""

    kind: str
    params: tuple[int, ...]
    macs: int

    @property
    def function(self) -> str:
        if self.kind == "conv" and self.groups > 1:
            return "arm_convolve_s8"
        return FUNCTIONS[self.kind]

    @property
    def groups(self) -> int:
        """A conv's groups (the 13th parameter when there are more than one), else 1."""
        return self.params[12] if self.kind == "conv" and len(self.params) > 12 else 1

    def fields(self) -> list[int]:
        return [KINDS[self.kind], *self.params, *[0] * (FIELDS - 1 - len(self.params))]


def conv_layer(
    h: int,
    w: int,
    cin: int,
    cout: int,
    k: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    groups: int = 1,
) -> CmsisLayer:
    """A conv (arm_convolve_wrapper_s8 with groups 1, arm_convolve_s8 with groups = input_ch /
    kernel_ch > 1) or a depthwise conv (groups == cin, cout = channel multiplier x cin:
    arm_depthwise_conv_wrapper_s8); pad is (top, bottom, left, right) as in qacc's graph.
    Groups that do not divide both channel counts: PeerError."""
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    t, b, left, r = pad
    if groups < 1 or cin % groups or cout % groups:
        raise PeerError(f"{groups} groups do not divide {cin} input and {cout} output channels")
    oh, ow = (h + t + b - kh) // sh + 1, (w + left + r - kw) // sw + 1
    macs = oh * ow * cout * kh * kw * (cin // groups)
    tail = (kh, kw, sh, sw, t, left, oh, ow)
    if groups == 1:
        return CmsisLayer("conv", (h, w, cin, cout, *tail), macs)
    if groups == cin:
        return CmsisLayer("depthwise", (h, w, cin, cout // cin, *tail), macs)
    return CmsisLayer("conv", (h, w, cin, cout, *tail, groups), macs)


def pool_layer(
    kind: str,
    h: int,
    w: int,
    c: int,
    k: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> CmsisLayer:
    """A max or average pool ("maxpool" / "avgpool"); pad is (top, bottom, left, right)."""
    t, b, left, r = pad
    oh, ow = (h + t + b - k[0]) // stride[0] + 1, (w + left + r - k[1]) // stride[1] + 1
    return CmsisLayer(kind, (h, w, c, 0, k[0], k[1], stride[0], stride[1], t, left, oh, ow), 0)


def dense_layer(cin: int, cout: int) -> CmsisLayer:
    return CmsisLayer("dense", (cin, cout), cin * cout)


def add_layer(n: int) -> CmsisLayer:
    return CmsisLayer("add", (n,), 0)


def mul_layer(n: int) -> CmsisLayer:
    """An element-wise product of two tensors of n values (CMSIS-NN has no s8 broadcast one)."""
    return CmsisLayer("mul", (n,), 0)


def softmax_layer(rows: int, row_size: int) -> CmsisLayer:
    """A softmax over each of `rows` rows of `row_size` values (the channels of each pixel)."""
    return CmsisLayer("softmax", (rows, row_size), 0)


def concat_layer(pixels: int, channels: Sequence[int]) -> CmsisLayer:
    """A channel concat of NHWC tensors of `pixels` pixels (CMSIS-NN copies each input without
    rescaling: TFLite Micro's int8 concat needs one format for all). At most MAX_CONCAT inputs
    (the harness reads a fixed number of fields): PeerError beyond."""
    if len(channels) > MAX_CONCAT:
        raise PeerError(f"the CMSIS-NN harness takes at most {MAX_CONCAT} concat inputs")
    return CmsisLayer("concat", (pixels, len(channels), *(int(c) for c in channels)), 0)


def _ints(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def _pair(v: Any) -> tuple[int, int]:
    a, b = _ints(v)
    return a, b


def _quad(v: Any) -> tuple[int, int, int, int]:
    a, b, c, d = _ints(v)
    return a, b, c, d


def layers_of(graph: Any) -> dict[str, CmsisLayer]:
    """{qacc layer name: the CMSIS-NN call TFLite Micro makes for it} for the nodes of an integer
    graph that have one (conv2d without dilation, any groups, depthwise with any channel
    multiplier; dense; max, average and global average pooling; add and mul of two tensors of one
    shape; softmax; channel concat of at most MAX_CONCAT inputs). Reshapes and the
    rest (lut: CMSIS-NN has no s8 table activation) are left out."""
    out: dict[str, CmsisLayer] = {}
    for n in graph.nodes:
        shape = graph.tensors[n.inputs[0]].shape
        if n.op == "conv2d":
            if _ints(n.attrs.get("dilation", (1, 1))) != (1, 1):
                continue
            h, w, cin = _ints(shape)
            cout, kh, kw = _ints(n.params["weight"].shape[:3])
            groups = int(n.attrs["groups"])
            stride, pad = _pair(n.attrs["stride"]), _quad(n.attrs["padding"])
            out[n.name] = conv_layer(h, w, cin, cout, (kh, kw), stride, pad, groups)
        elif n.op == "dense":
            cout, cin = _ints(n.params["weight"].shape)
            out[n.name] = dense_layer(cin, cout)
        elif n.op in ("maxpool2d", "avgpool2d"):
            h, w, c = _ints(shape)
            kind = "maxpool" if n.op == "maxpool2d" else "avgpool"
            k, stride, pad = (
                _pair(n.attrs["kernel"]),
                _pair(n.attrs["stride"]),
                _quad(n.attrs["padding"]),
            )
            out[n.name] = pool_layer(kind, h, w, c, k, stride, pad)
        elif n.op == "global_avgpool":
            h, w, c = _ints(shape)
            out[n.name] = pool_layer("avgpool", h, w, c, (h, w), (h, w))
        elif n.op == "add" and len(n.inputs) == 2:
            out[n.name] = add_layer(int(graph.tensors[n.output].size))
        elif n.op == "mul" and graph.tensors[n.inputs[1]].size == graph.tensors[n.output].size:
            out[n.name] = mul_layer(int(graph.tensors[n.output].size))
        elif n.op == "softmax":
            size, row = int(graph.tensors[n.output].size), int(shape[-1])
            out[n.name] = softmax_layer(size // row, row)
        elif n.op == "concat" and len(n.inputs) <= MAX_CONCAT:
            ins = [graph.tensors[t].shape for t in n.inputs]
            pixels = int(graph.tensors[n.output].size) // int(graph.tensors[n.output].shape[-1])
            out[n.name] = concat_layer(pixels, [int(s[-1]) for s in ins])
    return out


def check_tree(tree: str | Path | None = None) -> Path:
    """The CMSIS-NN source tree to build (default: the vendored one); PeerError if it is not one."""
    path = Path(tree) if tree is not None else DEFAULT_TREE
    missing = [m for m in _MARKERS if not (path / m).is_file()]
    if missing:
        if tree is None:
            raise PeerError(
                f"no CMSIS-NN source tree at {path} (qacc installed without its checkout): "
                "give one with --cmsis-nn DIR"
            )
        raise PeerError(f"{path} is not a CMSIS-NN source tree (no {missing[0]})")
    return path.resolve()


def sources(tree: Path) -> list[Path]:
    """The int8 kernels of `tree` and their helpers (float and int4/int16-only files left out)."""
    out: list[Path] = []
    for d in SOURCE_DIRS:
        for f in sorted((tree / "Source" / d).glob("*.c")):
            n = f.name
            if "_f16" in n or "_f32" in n:
                continue
            if "s8" in n or n in ("arm_nntables.c", "arm_q7_to_q15_with_offset.c"):
                out.append(f)
    return out


def _compile_flags(target: str) -> list[str]:
    t = get_target(target)
    if t.family != "cortex-m" or t.cpu not in FPU_FLAGS:
        raise PeerError(
            f"the CMSIS-NN peer runs on Cortex-M targets only ({', '.join(FPU_FLAGS)}), "
            f"not {target}"
        )
    return [f"-mcpu={t.cpu}", "-mthumb", *FPU_FLAGS[t.cpu], "-O2", "-std=c99"]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise PeerError(f"building {what} failed:\n{proc.stderr[-3000:]}")


def build_harness(target: str, tree: str | Path | None = None) -> Path:
    """Build (once per target and sources) the harness with CMSIS-NN; returns the executable."""
    flags = _compile_flags(target)
    t = get_target(target)
    try:
        check_tools(t)
    except TargetError as e:
        raise PeerError(str(e)) from None
    root = check_tree(tree)
    srcs = sources(root)
    startup = [CORTEXM_DIR / "startup.c", CORTEXM_DIR / "qacc_cycles.c"]
    ld = CORTEXM_DIR / f"{t.machine}.ld"
    h = hashlib.sha256(" ".join(flags).encode())
    for f in [HARNESS_SRC, *startup, ld, CORTEXM_DIR / "cortexm-sections.ld", *srcs]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    for f in sorted((root / "Include").rglob("*.h")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    exe = BUILD_DIR / f"cmsis_nn_{t.cpu}_{h.hexdigest()[:12]}"
    if exe.is_file():
        return exe
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    inc = [f"-I{root / 'Include'}"]
    with tempfile.TemporaryDirectory(prefix="qacc-cmsis-nn-") as tmp:
        obj = Path(tmp) / "harness.o"
        warn = ["-Wall", "-Wextra", "-Werror", "-pedantic"]
        _run([t.compiler, *flags, *warn, *inc, "-c", str(HARNESS_SRC), "-o", str(obj)], "harness")
        # Linked next to its final name (same file system), then renamed: a concurrent build of
        # the same sources never sees a half-written file.
        out = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
        link = [
            t.compiler,
            *flags,
            "-ffunction-sections",
            "-fdata-sections",
            *inc,
            f"-I{CORTEXM_DIR}",
            *(str(s) for s in [*srcs, *startup, obj]),
            "--specs=rdimon.specs",
            f"-L{CORTEXM_DIR}",
            f"-T{ld}",
            "-Wl,--gc-sections",
            "-o",
            str(out),
        ]
        try:
            _run(link, f"CMSIS-NN from {root} for {target}")
            out.replace(exe)
        finally:
            out.unlink(missing_ok=True)
    return exe


def instructions(
    layers: Sequence[CmsisLayer],
    target: str,
    tree: str | Path | None = None,
    timeout_s: float = 600.0,
) -> list[int]:
    """Instructions of one CMSIS-NN call per layer on `target` under QEMU, all in one run."""
    if not layers:
        return []
    exe = build_harness(target, tree)
    with tempfile.TemporaryDirectory(prefix="qacc-cmsis-nn-") as tmp:
        spec = Path(tmp) / "layers.txt"
        spec.write_text("".join(" ".join(map(str, x.fields())) + "\n" for x in layers))
        res = run_under_emulator(
            target, exe, [str(spec)], timeout_s=timeout_s, count_insns=True, progress=False
        )
    return marked_counts(res, "CMSIS-NN", target, len(layers))


__all__ = [
    "DEFAULT_TREE",
    "CmsisLayer",
    "add_layer",
    "build_harness",
    "check_tree",
    "conv_layer",
    "dense_layer",
    "instructions",
    "layers_of",
    "mul_layer",
    "pool_layer",
    "softmax_layer",
]
