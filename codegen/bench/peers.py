"""Benchmark peers: XNNPACK's qs8 convolution on the same layer shapes, under the same QEMU CPU.

    xnnpack_conv_instructions(32, 32, 32, 32, k=3, stride=1, pad=1, groups=1, target="cortex-a53")

builds runtime_c/peers/xnnpack_conv.c with aarch64-linux-gnu-gcc against Debian's
libxnnpack-dev:arm64 (installed by scripts/setup-xnnpack.sh; XNNPACK ships only a shared library,
so the harness is linked dynamically and qemu-aarch64 finds the arm64 loader and libraries of the
multiarch install under /lib and /usr/lib/aarch64-linux-gnu), and counts the dynamic instructions
of one `xnn_run_operator` (operator creation, setup and a warm-up run are excluded) with the
instruction-count plugin of codegen.targets.qemu. XNNPACK runs single-threaded (no thread pool).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from codegen.core.errors import QaccError
from codegen.core.resources import data_path
from codegen.targets.qemu import RunResult, run_under_emulator
from codegen.targets.table import TARGETS, get_target

HARNESS_SRC = data_path("runtime_c", "peers", "xnnpack_conv.c")
BUILD_DIR = data_path("build", "peers")
MULTIARCH_LIB = Path("/usr/lib/aarch64-linux-gnu")
XNNPACK_HEADER = Path("/usr/include/xnnpack.h")
XNNPACK_LIB = MULTIARCH_LIB / "libXNNPACK.so"
ARM64_LOADER = Path("/lib/ld-linux-aarch64.so.1")
SETUP_HINT = "run scripts/setup-xnnpack.sh (or `make bench`)"

Pair = int | tuple[int, int]
Pad = int | tuple[int, int] | tuple[int, int, int, int]


class PeerError(QaccError):
    """The peer cannot be built or run (a package is missing, or the target has no XNNPACK)."""


@dataclass(frozen=True)
class ConvShape:
    """A 2-D convolution: input h x w x cin, cout outputs, kernel, stride, padding (t, l, b, r)."""

    h: int
    w: int
    cin: int
    cout: int
    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        t, left, b, r = self.pad
        return (
            (self.h + t + b - self.kh) // self.sh + 1,
            (self.w + left + r - self.kw) // self.sw + 1,
        )

    @property
    def macs(self) -> int:
        oh, ow = self.out_hw
        return oh * ow * self.cout * self.kh * self.kw * (self.cin // self.groups)

    def argv(self) -> list[str]:
        t, left, b, r = self.pad
        vals = (self.h, self.w, self.cin, self.cout, self.kh, self.kw, self.sh, self.sw)
        return [str(v) for v in (*vals, t, left, b, r, self.groups)]


def conv_shape(
    h: int, w: int, cin: int, cout: int, k: Pair, stride: Pair = 1, pad: Pad = 0, groups: int = 1
) -> ConvShape:
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if isinstance(pad, int):
        p4 = (pad, pad, pad, pad)
    elif len(pad) == 2:
        p4 = (pad[0], pad[1], pad[0], pad[1])
    else:
        p4 = (pad[0], pad[1], pad[2], pad[3])
    return ConvShape(h, w, cin, cout, kh, kw, sh, sw, p4, groups)


def check_xnnpack() -> None:
    """PeerError naming the Debian package to install when the peer's pieces are missing."""
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        raise PeerError(
            "the XNNPACK peer needs aarch64-linux-gnu-gcc: apt-get install gcc-aarch64-linux-gnu"
        )
    if shutil.which("qemu-aarch64") is None:
        raise PeerError("the XNNPACK peer needs qemu-aarch64: apt-get install qemu-user")
    if not XNNPACK_HEADER.is_file() or not XNNPACK_LIB.exists():
        raise PeerError(
            "XNNPACK for arm64 is not installed: apt-get install libxnnpack-dev:arm64 "
            f"(after dpkg --add-architecture arm64); {SETUP_HINT}"
        )
    if not ARM64_LOADER.exists():
        raise PeerError(
            f"the arm64 C library is not installed: apt-get install libc6:arm64; {SETUP_HINT}"
        )


def build_harness() -> Path:
    """Build (once per source) the harness; returns the executable's path."""
    check_xnnpack()
    src = HARNESS_SRC.read_bytes()
    digest = hashlib.sha256(src + XNNPACK_HEADER.read_bytes()).hexdigest()[:12]
    exe = BUILD_DIR / f"xnnpack_conv_{digest}"
    if exe.is_file():
        return exe
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(".tmp")
    cmd = [
        "aarch64-linux-gnu-gcc",
        "-std=c99",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pedantic",
        # The address of qacc_mark that nm prints must be the one executed: no PIE.
        "-no-pie",
        # xnnpack.h (and pthreadpool.h) live in /usr/include; after the cross sysroot's headers.
        "-idirafter",
        "/usr/include",
        str(HARNESS_SRC),
        "-o",
        str(tmp),
        f"-L{MULTIARCH_LIB}",
        f"-Wl,-rpath-link,{MULTIARCH_LIB}",
        "-lXNNPACK",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    if proc.returncode != 0:
        raise PeerError(f"building the XNNPACK harness failed:\n{proc.stderr[-3000:]}")
    tmp.replace(exe)
    return exe


def _aarch64(target: str) -> None:
    t = get_target(target)
    if t.family != "aarch64-linux":
        raise PeerError(
            "the XNNPACK peer runs on AArch64 targets only ("
            + ", ".join(n for n, x in TARGETS.items() if x.family == "aarch64-linux")
            + f"), not {target}"
        )


def xnnpack_conv_many(
    shapes: Sequence[ConvShape], target: str, timeout_s: float = 600.0
) -> list[int]:
    """Instructions of one xnn_run_operator per shape, all in one emulator run."""
    if not shapes:
        return []
    _aarch64(target)
    exe = build_harness()
    args = [a for s in shapes for a in s.argv()]
    res = run_under_emulator(target, exe, args, timeout_s=timeout_s, count_insns=True)
    return marked_counts(res, "XNNPACK", target, len(shapes))


def marked_counts(res: RunResult, peer: str, target: str, calls: int) -> list[int]:
    """Instructions of each of a peer harness's `calls` calls: between its pairs of marks."""
    if res.returncode != 0:
        raise PeerError(
            f"{peer} harness failed on {target} (exit {res.returncode}): "
            + res.stderr.strip()[-500:]
        )
    assert res.counts is not None
    marks = res.counts.marks
    if len(marks) != 2 * calls:
        raise PeerError(f"{peer} harness: expected {2 * calls} marks, got {len(marks)}")
    return [marks[2 * i + 1] - marks[2 * i] for i in range(calls)]


def xnnpack_conv_instructions(
    h: int,
    w: int,
    cin: int,
    cout: int,
    k: Pair,
    stride: Pair,
    pad: Pad,
    groups: int,
    target: str,
) -> int:
    """Dynamic instructions of XNNPACK's qs8 convolution (one run) on `target` under QEMU.

    `k`, `stride`: an int or (h, w); `pad`: an int, (h, w) or (top, left, bottom, right)."""
    return xnnpack_conv_many([conv_shape(h, w, cin, cout, k, stride, pad, groups)], target)[0]


__all__ = [
    "ConvShape",
    "PeerError",
    "build_harness",
    "check_xnnpack",
    "conv_shape",
    "xnnpack_conv_instructions",
    "xnnpack_conv_many",
]
