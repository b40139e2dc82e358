"""Generated C on the host == the NumPy integer reference, exactly, for every kernel.

Each row of CASES builds a random integer graph (tests/graphs.py) around one kernel and its
sample batch. Every case runs twice:
* in-process: codegen.compile(...) -> CMake -> shared library -> cffi, compared with the reference;
* sanitized: all cases emitted into one CMake project (the root CMakeLists.txt), built once with
  -fsanitize=address,undefined -fno-sanitize-recover=all, each test bench run through files.
Cases whose id says `wrap` choose inputs and weights so that the exact sums overflow the
accumulator; the test checks that the reference saw the wrap-around. No tolerances anywhere.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from codegen.backend import layouts, memory
from codegen.backend.emit import RUNTIME, c_identifier, emit, write_files
from codegen.backend.lower import LoweringError, lower
from codegen.core import reference
from codegen.core.formats import requantize, wrap
from codegen.core.ir import Graph, Node, QFormat, Tensor
from codegen.targets.build import BuildResult, BuildTarget, build, build_many
from codegen.targets.compiled import OutputDirError, compile, run_testbench
from tests.graphs import GraphBuilder, overflowed
from tests.shared_build import build_once, shared_dir

# ----------------------------------------------------------------------------- the case table

Make = Callable[[GraphBuilder], Any]


@dataclass(frozen=True)
class Case:
    id: str
    make: Make
    wraps: bool = False
    seed: int = 0

    @property
    def kernel(self) -> str | None:
        """The kernel the case is about: the id up to the first '-' (None for networks)."""
        k = self.id.split("-")[0]
        return None if k in ("net", "graph") else k

    def build(self) -> tuple[Graph, np.ndarray]:
        b = GraphBuilder(self.id, seed=self.seed)
        self.make(b)
        return b.result()


def _residual(b: GraphBuilder, **add: Any) -> None:
    x = b.input((5, 6, 7))
    y = b.conv2d(x, 7, (1, 1), acc_bits=20)
    b.add(x, y, **add)


def _wide_add(b: GraphBuilder) -> None:
    x = b.input((3, 5, 6), dist="high")
    y = b.conv2d(x, 6, (1, 1), acc_bits=32)
    b.add(x, y, acc_bits=32, in_mult=(1 << 24, (1 << 25) + 12345))


def _squeeze_excitation(b: GraphBuilder, image_gate: bool = False, **mul: Any) -> None:
    """x * gate(x): a per-channel scale from the pooled features, broadcast over the pixels
    (the gate a (C,) vector, or with `image_gate` the (1, 1, C) image)."""
    x = b.input((6, 5, 8))
    g = b.dense(b.global_avgpool(x, acc_bits=16), 8, acc_bits=16, lo=0)
    b.mul(x, b.reshape(g, (1, 1, 8)) if image_gate else g, **mul)


def _conv_transpose(b: GraphBuilder) -> None:
    """A stride-3 transposed conv after a layer whose output has a zero point: the inserted
    values are that zero point, which the conv subtracts (real 0)."""
    y = b.conv2d(b.input((4, 3, 5)), 6, (1, 1), zero_point=-9)
    z = b.zero_insert(y, (3, 3))
    b.conv2d(z, 4, (3, 3), padding=(2, 3, 2, 3), input_zero_point=-9, acc_bits=16)


def _mul_same_shape(b: GraphBuilder) -> None:
    x = b.input((4, 5, 6))
    b.mul(x, b.conv2d(x, 6, (3, 3), padding=(1, 1, 1, 1), acc_bits=18))


def _mul_wrap(b: GraphBuilder) -> None:
    x = b.input((3, 4, 5), dist="high")
    b.mul(x, x, acc_bits=12)  # 127 * 127 leaves a 12-bit accumulator


def _softmax_wide(b: GraphBuilder, shape: tuple[int, ...], out: QFormat, **clamp: int) -> None:
    """A softmax whose exp table is near 2^15 everywhere (input scale 2^-12): sums near
    C * 2^15, the largest divisors and dividends of the division (Helium: by a magic
    reciprocal); the first sample's rows are constant (every sum exactly C * 2^15)."""
    x = b.input(shape)
    b.tensors[x] = replace(b.tensors[x], fmt=QFormat(8, True, 12))
    b.values[x][0] = 5
    b.softmax(x, out=out, **clamp)


def _mul_flat(b: GraphBuilder) -> None:
    x = b.input((5, 3, 7))
    b.mul(x, b.lut(x, "sigmoid"), input_zero_points=(2, -1))


def _mul_broadcast_wrap(b: GraphBuilder) -> None:
    x = b.input((3, 4, 13), dist="high")
    b.mul(x, b.global_avgpool(x), acc_bits=11, input_zero_points=(3, -4), per_channel=True)


def _branches_concat(b: GraphBuilder) -> None:
    x = b.input((6, 5, 4))
    a = b.conv2d(x, 3, (3, 3), padding=(1, 1, 1, 1), acc_bits=18)
    c = b.conv2d(x, 5, (1, 1), acc_bits=14)
    b.concat([a, c], identity=(1,))  # c is already in the output format


def _concat3(b: GraphBuilder) -> None:
    x = b.input((4, 7, 5), lo=0, hi=127)
    a = b.conv2d(x, 6, (1, 1), input_zero_point=50, acc_bits=24, zero_point=3)
    c = b.conv2d(x, 5, (3, 3), padding=(1, 1, 1, 1), groups=5, input_zero_point=50, acc_bits=16)
    b.concat([x, a, c], input_zero_points=(50, 3, 0), zero_point=-7)


def _concat_lanes(b: GraphBuilder) -> None:
    """Helium: requantized in 8-, 16- and 32-bit lanes and one value at a time (a left shift no
    lane holds), whole vectors and tails, a zero point and a clamp."""
    x = b.input((3, 2, 37))
    xs = [x, *(b.maxpool2d(x, (1, 1), (1, 1)) for _ in range(3))]
    ms = [(1, 2), (300, 5), (90, 3), (3, -24)]
    b.concat(xs, input_zero_points=(0, -20, 7, 0), mult_shift=ms, zero_point=5, lo=-100, hi=110)


def _concat_copy_and_lanes(b: GraphBuilder) -> None:
    """An input copied by whole vectors (words on the DSP) and a tail, one in 8-bit lanes."""
    x = b.input((2, 3, 37))
    b.concat([x, b.maxpool2d(x, (1, 1), (1, 1))], mult_shift=[(1, 0), (1, 1)])


def _concat_vectors(b: GraphBuilder) -> None:
    x = b.input((19,))
    b.concat([b.dense(x, 5, acc_bits=20), b.dense(x, 3, acc_bits=12)])


def _chain_net(b: GraphBuilder) -> None:
    x = b.input((15, 13, 3))
    t = b.conv2d(x, 8, (3, 3), (2, 2), (1, 1, 1, 1), acc_bits=16, lo=0, name="stem.conv")
    t = b.conv2d(t, 8, (3, 3), padding=(1, 1, 1, 1), groups=8, acc_bits=15, lo=0, name="dw1")
    t = b.conv2d(t, 12, (1, 1), acc_bits=18, lo=0, hi=96, name="pw1")
    t = b.maxpool2d(t, (2, 2), (2, 2), name="pool")
    t = b.conv2d(t, 10, (3, 3), padding=(1, 0, 1, 0), acc_bits=20, name="conv2")
    t = b.global_avgpool(t, acc_bits=16, name="gap")
    b.dense(t, 5, acc_bits=24, name="classifier")


def _resnet_block(b: GraphBuilder) -> None:
    x = b.input((9, 9, 6))
    stem = b.conv2d(x, 8, (3, 3), padding=(1, 1, 1, 1), acc_bits=20, lo=0)
    t = b.conv2d(stem, 8, (3, 3), padding=(1, 1, 1, 1), acc_bits=20, lo=0)
    t = b.conv2d(t, 8, (3, 3), padding=(1, 1, 1, 1), acc_bits=20)
    t = b.add(stem, t, acc_bits=16, lo=0)
    p = b.maxpool2d(t, (3, 3), (2, 2), (1, 1, 1, 1))
    q = b.avgpool2d(t, (3, 3), (2, 2), (1, 1, 1, 1), acc_bits=12)
    t = b.concat([p, q])
    t = b.conv2d(t, 10, (1, 1), acc_bits=18)
    t = b.flatten(t)
    b.dense(t, 4, acc_bits=22)


def _inception(b: GraphBuilder) -> None:
    x = b.input((8, 8, 5))
    a = b.conv2d(x, 4, (1, 1), acc_bits=16)
    c = b.conv2d(b.conv2d(x, 6, (1, 1), acc_bits=16), 6, (3, 3), padding=(1, 1, 1, 1))
    d = b.maxpool2d(x, (3, 3), (1, 1), (1, 1, 1, 1))
    e = b.concat([a, c, d])
    f = b.conv2d(e, 15, (1, 1), acc_bits=20)
    t = b.add(e, f, acc_bits=20)  # e and f die here: the sum overwrites one of them
    b.conv2d(t, 3, (3, 3), (2, 2), acc_bits=20)


def _shuffle_block(b: GraphBuilder) -> None:
    """ShuffleNetV2's unit: chunk, a branch on one half, concat, channel shuffle."""
    x = b.input((6, 6, 8))
    keep, branch = b.gather(x, range(4)), b.gather(x, range(4, 8))
    t = b.conv2d(branch, 4, (1, 1), acc_bits=16, lo=0)
    t = b.conv2d(t, 4, (3, 3), padding=(1, 1, 1, 1), groups=4, acc_bits=16)
    b.gather(b.concat([keep, t]), [0, 4, 1, 5, 2, 6, 3, 7])


def _conv_lut_chain(b: GraphBuilder) -> None:
    """Tables after convolutions, in place over the conv outputs, and on a vector."""
    x = b.input((7, 7, 3))
    t = b.lut(b.conv2d(x, 6, (3, 3), padding=(1, 1, 1, 1), acc_bits=16), "hardswish")
    t = b.lut(b.conv2d(t, 8, (3, 3), (2, 2), acc_bits=16), "silu")
    t = b.lut(b.dense(b.flatten(t), 10, acc_bits=20), "tanh")
    b.lut(t, "sigmoid", out=QFormat(7, False, 7))


def _fused_luts(b: GraphBuilder) -> None:
    """A table after every kind of producer that applies it in its store step: conv (GEMM
    paths), depthwise at acc16 and acc32 (int16 and int32 lanes on Helium), pointwise with a
    clamp before the table, add, mul, avgpool, global average pool and dense; 19 channels leave
    vector tails everywhere."""
    x = b.input((8, 8, 5))
    a = b.lut(b.conv2d(x, 19, (3, 3), padding=(1, 1, 1, 1), acc_bits=16), "hardswish")
    d = b.lut(b.conv2d(a, 19, (3, 3), padding=(1, 1, 1, 1), groups=19, acc_bits=16), "sigmoid")
    d = b.conv2d(d, 19, (3, 3), padding=(1, 1, 1, 1), groups=19, acc_bits=20, mult_bits=8)
    d = b.lut(d, "tanh", out=QFormat(8, True, 7))
    p = b.lut(b.conv2d(d, 19, (1, 1), acc_bits=18, w_bits=4, lo=0), "silu")
    s = b.lut(b.add(a, p, acc_bits=16), "tanh")
    m = b.lut(b.mul(s, a, acc_bits=16), "hardsigmoid", out=QFormat(7, False, 7))
    v = b.lut(b.avgpool2d(m, acc_bits=16), "gelu")
    g = b.lut(b.global_avgpool(v, acc_bits=16), "silu")
    b.lut(b.dense(g, 10, acc_bits=20), "tanh", out=QFormat(8, True, 7))


ACC_WIDTHS = range(8, 33)


def _every_acc_width(b: GraphBuilder) -> None:
    """One dense layer per accumulator width 8..32, bias at the top of the width: all wrap."""
    x = b.input((24,), dist="high")
    outs = [
        b.dense(x, 3, acc_bits=a, bias=((1 << (a - 1)) - 600, (1 << (a - 1)) - 1), name=f"acc{a}")
        for a in ACC_WIDTHS
    ]
    b.concat(outs)


CASES: list[Case] = [
    # conv2d, general
    Case(
        "conv2d_acc32-odd7x9-k3-same", lambda b: b.conv2d(b.input((7, 9, 3)), 5, padding=(1,) * 4)
    ),
    Case(
        "conv2d_acc32-stride2-asympad",
        lambda b: b.conv2d(b.input((9, 8, 6)), 10, (3, 3), (2, 2), (0, 1, 2, 1)),
    ),
    Case(
        "conv2d_acc32-dilation2",
        lambda b: b.conv2d(b.input((11, 10, 5)), 7, (3, 3), (1, 1), (2, 1, 2, 0), (2, 2)),
    ),
    Case(
        "conv2d_acc32-groups2",
        lambda b: b.conv2d(b.input((6, 7, 6)), 4, (3, 3), padding=(1,) * 4, groups=2),
    ),
    Case(
        "conv2d_acc32-groups3-k5x3-stride2x1",
        lambda b: b.conv2d(b.input((9, 7, 9)), 6, (5, 3), (2, 1), (2, 2, 1, 1), groups=3),
    ),
    Case("conv2d_acc32-cin1", lambda b: b.conv2d(b.input((8, 5, 1)), 3, (3, 2), (1, 2))),
    Case(
        "conv2d_acc32-1x1-padded",
        lambda b: b.conv2d(b.input((4, 5, 3)), 2, (1, 1), padding=(1, 0, 0, 1)),
    ),
    Case(
        "conv2d_acc16-k3-no-wrap",
        lambda b: b.conv2d(b.input((6, 6, 4), lo=-8, hi=8), 6, padding=(1,) * 4, acc_bits=16),
    ),
    Case(
        "conv2d_acc16-relu-clamp",
        lambda b: b.conv2d(b.input((6, 5, 3)), 9, padding=(1,) * 4, acc_bits=16, lo=0),
    ),
    Case(
        "conv2d_acc32-relu6-clamp-per-tensor",
        lambda b: b.conv2d(b.input((5, 5, 3)), 4, lo=0, hi=96, per_channel=False),
    ),
    Case(
        "conv2d_acc32-input-zero-point",
        lambda b: b.conv2d(
            b.input((6, 7, 3), lo=0, hi=127),
            5,
            padding=(1, 0, 1, 0),
            input_zero_point=64,
            zero_point=-5,
        ),
    ),
    Case(
        "conv2d_acc32-int64-mult",
        lambda b: b.conv2d(b.input((5, 4, 3)), 4, acc_bits=20, mult_bits=33),
    ),
    *[
        Case(
            f"conv2d_acc{16 if a <= 16 else 32}-wrap-acc{a}",
            lambda b, a=a: b.conv2d(
                b.input((7, 6, 5), dist="high"),
                4,
                (3, 3),
                (1, 2),
                (1, 1, 0, 1),
                acc_bits=a,
                w_dist="positive",
            ),
            wraps=True,
        )
        for a in (8, 11, 12, 15, 16, 17)
    ],
    *[
        Case(
            f"conv2d_acc32-wrap-acc{a}-bias",
            lambda b, a=a: b.conv2d(
                b.input((5, 5, 3), dist="high"),
                3,
                acc_bits=a,
                w_dist="positive",
                bias=((1 << (a - 1)) - 3000, (1 << (a - 1)) - 1),
            ),
            wraps=True,
        )
        for a in (24, 31, 32)
    ],
    # rows of output pixels with every tap inside the image (the Helium kernel's blocks of
    # pixels: 3, or 2 when the third's input is beyond a VLDRB offset, as 2 * 32 channels
    # here), then pixels left over at the right edge
    Case(
        "conv2d_acc32-pixel-blocks-tail",
        lambda b: b.conv2d(b.input((6, 10, 8)), 8, padding=(1,) * 4),
    ),
    Case(
        "conv2d_acc16-pixel-blocks-stride1x2-wrap-acc14",
        lambda b: b.conv2d(
            b.input((5, 15, 32), dist="high"),
            4,
            (3, 3),
            (1, 2),
            (1,) * 4,
            acc_bits=14,
            w_dist="positive",
        ),
        wraps=True,
    ),
    # conv2d, 1x1 pointwise specialisation
    Case("conv2d_pointwise_acc32-c13to9", lambda b: b.conv2d(b.input((5, 7, 13)), 9, (1, 1))),
    Case(
        "conv2d_pointwise_acc16-stride2-wrap-acc10",
        lambda b: b.conv2d(
            b.input((7, 9, 6), dist="high"), 5, (1, 1), (2, 2), acc_bits=10, w_dist="positive"
        ),
        wraps=True,
    ),
    Case(
        "conv2d_pointwise_acc32-per-tensor",
        lambda b: b.conv2d(b.input((3, 3, 17)), 3, (1, 1), per_channel=False, acc_bits=21),
    ),
    # conv2d, depthwise specialisation
    Case(
        "conv2d_depthwise_acc32-c11-k3-same",
        lambda b: b.conv2d(b.input((6, 5, 11)), 11, padding=(1,) * 4, groups=11),
    ),
    Case(
        "conv2d_depthwise_acc16-stride2-asympad-dilation2",
        lambda b: b.conv2d(
            b.input((9, 10, 6)), 6, (3, 3), (2, 2), (1, 2, 0, 2), (2, 2), groups=6, acc_bits=16
        ),
    ),
    Case(
        "conv2d_depthwise_acc32-multiplier2",
        lambda b: b.conv2d(b.input((5, 6, 3)), 6, (3, 3), padding=(0, 1, 1, 0), groups=3),
    ),
    Case(  # 5 channels, stride 1 (A64): two pixels per 16-byte load, the last pair overlapping
        "conv2d_depthwise_acc16-wrap-acc9",
        lambda b: b.conv2d(
            b.input((5, 5, 5), dist="high"), 5, (3, 3), groups=5, acc_bits=9, w_dist="positive"
        ),
        wraps=True,
    ),
    # the Helium (MVE) and DSP depthwise kernels: tails (C % 16, C % 8, C % 4), both requantization
    # paths (int32 lanes with mult 1 or a small multiplier, lane by lane), int16 lanes (A <= 16,
    # or exact sums with small weights), wrapping at narrow and full width, input zero point
    Case(
        "conv2d_depthwise_acc32-c19-same-mult1",
        lambda b: b.conv2d(b.input((6, 5, 19)), 19, padding=(1,) * 4, groups=19, mult_bits=1),
    ),
    Case(
        "conv2d_depthwise_acc16-c21-wrap-acc12-zp",
        lambda b: b.conv2d(
            b.input((5, 6, 21), dist="high"),
            21,
            (3, 3),
            padding=(0, 1, 1, 0),
            groups=21,
            acc_bits=12,
            w_dist="positive",
            input_zero_point=-3,
            mult_bits=4,
        ),
        wraps=True,
    ),
    Case(
        "conv2d_depthwise_acc32-k5-stride2-smallw-acc24",
        lambda b: b.conv2d(
            b.input((9, 8, 16)),
            16,
            (5, 5),
            (2, 2),
            (2, 2, 2, 1),
            groups=16,
            acc_bits=24,
            w_bits=4,
            mult_bits=1,
        ),
    ),
    # NEON (A64): 16 channels per pass, no 8-channel tail; int16 lanes: blocks of 4 pixels along
    # a row of 11, the last one overlapping
    Case(
        "conv2d_depthwise_acc16-c32-wrap-acc13",
        lambda b: b.conv2d(
            b.input((5, 11, 32), dist="high"),
            32,
            (3, 3),
            padding=(1,) * 4,
            groups=32,
            acc_bits=13,
            w_dist="positive",
        ),
        wraps=True,
    ),
    Case(  # 16 channels, stride 2: blocks of pixels along a row, the last one overlapping
        "conv2d_depthwise_acc16-c16-rows-stride2-zp",
        lambda b: b.conv2d(
            b.input((5, 15, 16)),
            16,
            (3, 3),
            (2, 2),
            (1,) * 4,
            groups=16,
            acc_bits=16,
            input_zero_point=-5,
        ),
    ),
    Case(
        "conv2d_depthwise_acc32-c16-stride2-zp",
        lambda b: b.conv2d(
            b.input((7, 7, 16)), 16, (3, 3), (2, 2), (1,) * 4, groups=16, input_zero_point=4
        ),
    ),
    Case(
        "conv2d_depthwise_acc32-c17-wrap-acc32",
        lambda b: b.conv2d(
            b.input((4, 4, 17), dist="high"),
            17,
            (3, 3),
            padding=(1,) * 4,
            groups=17,
            acc_bits=32,
            w_dist="positive",
            bias=((1 << 31) - 3000, (1 << 31) - 1),
        ),
        wraps=True,
    ),
    # depthwise with a channel multiplier (Cortex-M: one pass per multiplier index, Helium stores
    # by VSTRB scatters): tails (C % 16, C % 4, fewer channels than a vector), int32 lanes with a
    # lane-by-lane or a vector requantization, int16 lanes wrapped to a narrow width with a zero
    # point
    Case(
        "conv2d_depthwise_acc32-c19-mult2-same",
        lambda b: b.conv2d(b.input((5, 6, 19)), 38, padding=(1,) * 4, groups=19),
    ),
    Case(
        "conv2d_depthwise_acc16-c20-mult3-wrap-acc12-zp",
        lambda b: b.conv2d(
            b.input((5, 6, 20), dist="high"),
            60,
            (3, 3),
            padding=(0, 1, 1, 0),
            groups=20,
            acc_bits=12,
            w_dist="positive",
            input_zero_point=-3,
            mult_bits=4,
        ),
        wraps=True,
    ),
    Case(
        "conv2d_depthwise_acc32-c16-mult2-stride2-mult1",
        lambda b: b.conv2d(
            b.input((7, 7, 16)), 32, (3, 3), (2, 2), (1,) * 4, groups=16, mult_bits=1
        ),
    ),
    Case(
        "conv2d_depthwise_acc16-c8-mult4-mult1",
        lambda b: b.conv2d(
            b.input((6, 5, 8)), 32, (3, 3), padding=(1,) * 4, groups=8, acc_bits=16, mult_bits=1
        ),
    ),
    # grouped conv (Cortex-M: DSP int16 weights, one run per tap of a group's inputs; Helium
    # im2col of one group's taps, then the weight stream of its output channels): 8 inputs per
    # group, 6 (a predicated copy and no int16 weights on DSP) wrapped to a narrow width, and a
    # horizontal dilation with an input zero point and no padding
    Case(
        "conv2d_acc32-groups4-c32-k3-same-mult4",
        lambda b: b.conv2d(b.input((6, 7, 32)), 32, padding=(1,) * 4, groups=4, mult_bits=4),
    ),
    Case(
        "conv2d_acc16-groups2-c12to8-wrap-acc12",
        lambda b: b.conv2d(
            b.input((5, 6, 12), dist="high"),
            8,
            padding=(1,) * 4,
            groups=2,
            acc_bits=12,
            w_dist="positive",
        ),
        wraps=True,
    ),
    Case(
        "conv2d_acc16-groups2-c16to8-dilation2-zp",
        lambda b: b.conv2d(
            b.input((7, 8, 16)),
            8,
            (3, 3),
            dilation=(1, 2),
            groups=2,
            acc_bits=16,
            input_zero_point=7,
        ),
    ),
    Case(
        "conv2d_pointwise_acc32-c70to13-zp-mult1",
        lambda b: b.conv2d(
            b.input((3, 4, 70), lo=-100, hi=127), 13, (1, 1), input_zero_point=-100, mult_bits=1
        ),
    ),
    Case(
        "conv2d_acc32-c20-k3-same-mult1",
        lambda b: b.conv2d(b.input((5, 6, 20)), 8, (3, 3), padding=(1,) * 4, mult_bits=1),
    ),
    # the SDOT kernel (dotprod cores): kernel rows of 16-term groups, partial pixel and channel
    # blocks (5 x 16, 8 x 8), input read in place (no padding), per-pixel taps (dilation along
    # W) with 4-term tail groups, the int32-lane requantization with and without a multiplier
    Case(
        "conv2d_acc32-c32-k3-same-40ch-mult1",
        lambda b: b.conv2d(b.input((6, 7, 32)), 40, padding=(1,) * 4, mult_bits=1),
    ),
    Case(
        "conv2d_pointwise_acc32-c32to24-in-place-mult4",
        lambda b: b.conv2d(b.input((5, 6, 32)), 24, (1, 1), mult_bits=4),
    ),
    Case(
        "conv2d_acc16-c20-dilation2-stride2-wrap-acc12",
        lambda b: b.conv2d(
            b.input((9, 9, 20), dist="high"),
            8,
            (3, 3),
            (2, 2),
            (2, 2, 2, 2),
            (2, 2),
            acc_bits=12,
            w_dist="positive",
            mult_bits=1,
        ),
        wraps=True,
    ),
    Case(
        "conv2d_acc16-c6-k3-row-tail-wrap-acc16",
        lambda b: b.conv2d(
            b.input((6, 5, 6), dist="high"),
            12,
            padding=(1, 0, 1, 1),
            acc_bits=16,
            w_dist="positive",
            input_zero_point=5,
        ),
        wraps=True,
    ),
    Case("dense_acc32-64to20-in-place-mult1", lambda b: b.dense(b.input((64,)), 20, mult_bits=1)),
    # two-stage accumulation: tiles of T terms wrap in acc_bits, their sums (and the bias) in 32
    Case(
        "conv2d_acc16x32-k3-tile8-wrap",
        lambda b: b.conv2d(
            b.input((6, 6, 8), dist="high"),
            16,
            padding=(1,) * 4,
            acc_bits=16,
            w_dist="positive",
            acc_tile=8,
        ),
        wraps=True,
    ),
    Case(  # taps of 16 terms in tiles of 24: tile boundaries inside taps (counted per 8 terms)
        "conv2d_acc16x32-k3-tile24-relu",
        lambda b: b.conv2d(
            b.input((7, 6, 16), lo=0, hi=127), 24, padding=(1,) * 4, acc_bits=16, acc_tile=24, lo=0
        ),
    ),
    Case(
        "conv2d_acc16x32-cin3-stride2x1-tile4-wrap-acc14",
        lambda b: b.conv2d(
            b.input((8, 7, 3), dist="high"),
            10,
            (3, 3),
            (2, 1),
            (1, 1, 1, 1),
            acc_bits=14,
            w_dist="positive",
            acc_tile=4,
        ),
        wraps=True,
    ),
    Case(
        "conv2d_acc16x32-groups2-zero-point-tile5-wrap-acc12",
        lambda b: b.conv2d(
            b.input((6, 7, 6), lo=0, hi=127, dist="high"),
            4,
            (3, 3),
            padding=(1,) * 4,
            groups=2,
            acc_bits=12,
            input_zero_point=-64,
            w_dist="positive",
            acc_tile=5,
        ),
        wraps=True,
    ),
    Case(
        "conv2d_acc16x32-k3-one-tile-wrap-acc13",
        lambda b: b.conv2d(
            b.input((5, 6, 8), dist="high"),
            8,
            padding=(1,) * 4,
            acc_bits=13,
            w_dist="positive",
            acc_tile=72,
        ),
        wraps=True,
    ),
    Case(
        "conv2d_acc16x32-cin3-one-tile-rows-wrap-acc12",
        lambda b: b.conv2d(
            b.input((8, 8, 3), dist="high"),
            8,
            padding=(1,) * 4,
            acc_bits=12,
            w_dist="positive",
            acc_tile=27,
        ),
        wraps=True,
    ),
    Case(
        "conv2d_acc16x32-stride2-oc-tail-tile16-wrap-acc12",
        lambda b: b.conv2d(
            b.input((9, 9, 16), dist="high"),
            20,
            (3, 3),
            (2, 2),
            (1, 0, 1, 0),
            acc_bits=12,
            w_dist="positive",
            acc_tile=16,
        ),
        wraps=True,
    ),
    Case(  # 72 terms in tiles of 16: the last tile (8 terms) is partial
        "conv2d_acc16x32-k3-tile16-partial-wrap-acc14",
        lambda b: b.conv2d(
            b.input((5, 5, 8), dist="high"),
            8,
            padding=(1,) * 4,
            acc_bits=14,
            w_dist="positive",
            acc_tile=16,
        ),
        wraps=True,
    ),
    Case(  # 1x1, 32 terms in two tiles of 16: one tile widened in the loop (onto the bias)
        "conv2d_acc16x32-pointwise-two-tiles-wrap-acc14",
        lambda b: b.conv2d(
            b.input((3, 4, 32), dist="high"),
            16,
            (1, 1),
            acc_bits=14,
            w_dist="positive",
            acc_tile=16,
        ),
        wraps=True,
    ),
    Case(
        "conv2d_acc16x32-pointwise-tile-k",
        lambda b: b.conv2d(b.input((5, 5, 16)), 12, (1, 1), acc_bits=16, acc_tile=16),
    ),
    Case(
        "dense_acc16x32-tile24-wrap-acc13",
        lambda b: b.dense(
            b.input((70,), dist="high"), 9, acc_bits=13, w_dist="positive", acc_tile=24
        ),
        wraps=True,
    ),
    # DSP: int16 weights read by LDRD (one group, ICG % 4 == 0); no padding: the input zero point
    # is folded into the bias (the padded w16 rows above have none)
    Case(
        "conv2d_acc16-c8-k3-stride2-zero-point-w16-wrap-acc13",
        lambda b: b.conv2d(
            b.input((7, 8, 8), dist="high"),
            12,
            (3, 3),
            (2, 2),
            acc_bits=13,
            w_dist="positive",
            input_zero_point=5,
        ),
        wraps=True,
    ),
    # two stages that no tile can wrap (4-bit weights: a tile of 8 terms fits, the whole sum
    # does not): Cortex-M runs them as one 32-bit stage, its DSP / Helium kernels (Helium:
    # im2col, 3 * 5 < 16 inputs per kernel row, IZP at the padded taps)
    Case(
        "conv2d_acc16x32-tiles-exact-c5to8-zero-point",
        lambda b: b.conv2d(
            b.input((6, 7, 5), dist="high"),
            8,
            padding=(1,) * 4,
            acc_bits=16,
            w_bits=4,
            acc_tile=8,
            input_zero_point=3,
        ),
    ),
    # dense
    Case(
        "dense_acc16-wrap-acc11-mult3",
        lambda b: b.dense(
            b.input((37,), dist="high"), 8, acc_bits=11, w_dist="positive", mult_bits=3
        ),
        wraps=True,
    ),
    Case("dense_acc32-37to10", lambda b: b.dense(b.input((37,)), 10)),
    Case(
        "dense_acc16-wrap-acc13",
        lambda b: b.dense(b.input((45,), dist="high"), 7, acc_bits=13, w_dist="positive"),
        wraps=True,
    ),
    Case(
        "dense_acc32-wrap-acc32-bias",
        lambda b: b.dense(
            b.input((20,), dist="high"),
            5,
            acc_bits=32,
            w_dist="positive",
            bias=((1 << 31) - 20000, (1 << 31) - 1),
        ),
        wraps=True,
    ),
    Case(
        "dense_acc32-input-zero-point-relu",
        lambda b: b.dense(b.input((24,), lo=0, hi=127), 6, input_zero_point=70, lo=0),
    ),
    # pooling
    Case("maxpool2d-k2s2-odd", lambda b: b.maxpool2d(b.input((7, 9, 5)), (2, 2), (2, 2))),
    Case(
        "maxpool2d-k3s2-pad1-clamp",
        lambda b: b.maxpool2d(b.input((8, 7, 3)), (3, 3), (2, 2), (1, 1, 1, 1), lo=-20, hi=90),
    ),
    Case(
        "maxpool2d-window-in-padding",
        lambda b: b.maxpool2d(b.input((4, 5, 2)), (2, 2), (2, 2), (0, 2, 1, 0), lo=-100),
    ),
    Case(
        "avgpool2d_acc16-k3s1-pad1",
        lambda b: b.avgpool2d(b.input((6, 7, 5)), (3, 3), (1, 1), (1, 1, 1, 1)),
    ),
    Case(
        "avgpool2d_acc16-wrap-acc8",
        lambda b: b.avgpool2d(b.input((7, 7, 3), dist="high"), (3, 3), (2, 2), acc_bits=8),
        wraps=True,
    ),
    Case(
        "avgpool2d_acc32-zero-point-per-channel",
        lambda b: b.avgpool2d(
            b.input((6, 6, 4), lo=0, hi=127),
            (2, 3),
            (2, 1),
            (0, 1, 1, 1),
            acc_bits=20,
            input_zero_point=60,
            per_channel=True,
        ),
    ),
    Case(  # Cortex-M: the global average pool's kernel (its one window is the whole image)
        "avgpool2d_acc16-whole-image-7x5x12",
        lambda b: b.avgpool2d(b.input((7, 5, 12)), (7, 5), (1, 1)),
    ),
    Case(
        "global_avgpool_acc16-wrap-acc10",
        lambda b: b.global_avgpool(b.input((6, 6, 3), dist="high"), acc_bits=10),
        wraps=True,
    ),
    Case(
        "global_avgpool_acc32-zero-point-per-channel",
        lambda b: b.global_avgpool(
            b.input((4, 3, 5), lo=0, hi=127), acc_bits=20, input_zero_point=30, per_channel=True
        ),
    ),
    # pools over channel counts that are not multiples of 16 / 8 / 4 (Helium vector tails)
    Case(
        "maxpool2d-c21-k3s2-pad-clamp",
        lambda b: b.maxpool2d(b.input((5, 6, 21)), (3, 3), (2, 2), (1, 0, 1, 1), lo=-50, hi=100),
    ),
    Case(
        "avgpool2d_acc16-c19-zero-point-wrap-acc10",
        lambda b: b.avgpool2d(
            b.input((6, 5, 19), dist="high"),
            (3, 3),
            (2, 1),
            (1, 1, 0, 1),
            acc_bits=10,
            input_zero_point=-7,
        ),
        wraps=True,
    ),
    Case(
        "global_avgpool_acc16-c27-zero-point-wrap-acc12",
        lambda b: b.global_avgpool(
            b.input((5, 4, 27), dist="high"), acc_bits=12, input_zero_point=5
        ),
        wraps=True,
    ),
    Case(
        "global_avgpool_acc32-16x17x6-per-channel",  # 272 taps: sums beyond int16 lanes
        lambda b: b.global_avgpool(
            b.input((16, 17, 6), dist="high"), acc_bits=24, input_zero_point=-3, per_channel=True
        ),
    ),
    # add
    Case("add_acc16-residual", lambda b: _residual(b)),
    Case(
        "add_acc32-zero-points-per-channel-relu",
        lambda b: _residual(b, acc_bits=24, input_zero_points=(3, -2), per_channel=True, lo=0),
    ),
    Case(
        "add_acc16-wrap-acc9",
        lambda b: _residual(b, acc_bits=9, in_mult=(300, 411)),
        wraps=True,
    ),
    Case("add_acc32-wrap-acc32", _wide_add, wraps=True),
    Case(  # DSP: MA as int16 modulo 2^16 (the sum is taken modulo 2^16)
        "add_acc16-mult-beyond-int16-zero-point-wrap",
        lambda b: _residual(b, acc_bits=16, in_mult=(40000, 3), input_zero_points=(2, 0)),
        wraps=True,
    ),
    Case(
        "add_acc16-unit-mult-zero-points-wrap-acc8",  # Helium: the plain vector sum
        lambda b: _residual(b, acc_bits=8, in_mult=(1, 1), input_zero_points=(4, -3)),
        wraps=True,
    ),
    # mul: elementwise, or by one value per channel (squeeze-excitation)
    Case("mul_acc16-same-shape", _mul_same_shape),
    Case("mul_acc16-squeeze-excitation", _squeeze_excitation),
    Case(
        "mul_acc32-zero-points-per-channel-clamped",
        lambda b: _squeeze_excitation(
            b, True, acc_bits=32, input_zero_points=(-5, 7), per_channel=True, lo=-20, hi=90
        ),
    ),
    Case("mul_acc16-vectors-square", lambda b: b.mul(*[b.dense(b.input((9,)), 7)] * 2)),
    Case("mul_acc16-wrap-acc12", _mul_wrap, wraps=True),
    Case("mul_acc16-flat-105-zero-points", _mul_flat),  # Helium: one flat row, a tail of 1
    Case(  # Helium: channel rows of 13 (a tail of 1), per-channel vector requantization
        "mul_acc16-broadcast-c13-zero-points-per-channel-wrap-acc11",
        _mul_broadcast_wrap,
        wraps=True,
    ),
    # softmax over the channels (of a vector, or of every pixel)
    Case("softmax-classifier", lambda b: b.softmax(b.dense(b.input((12,)), 10, acc_bits=20))),
    Case(  # e * 2^17 leaves 32 bits: the 64-bit division
        "softmax-out-frac16-wide-division",
        lambda b: b.softmax(b.input((9,)), out=QFormat(8, True, 16)),
    ),
    Case(  # Helium: 1000 classes (sums up to 2^25, 26-bit dividends), 16/8/4-lane loops, no tail
        "softmax-1000-classes-flat-exp",
        lambda b: _softmax_wide(b, (1000,), QFormat(8, True, 8)),
    ),
    Case(  # rows of 33 (a tail of 1 in every loop), a zero point, both clamps binding
        "softmax-pixels-c33-flat-exp-zero-point-clamped",
        lambda b: _softmax_wide(b, (4, 3, 33), QFormat(8, True, 7, -60), lo=-50, hi=50),
    ),
    Case(
        "softmax-pixels-signed-zero-point-clamped",
        lambda b: b.softmax(b.input((3, 4, 7)), out=QFormat(8, True, 8, -100), lo=-120, hi=100),
    ),
    # concat
    Case("concat-two-branches", _branches_concat),
    Case("concat-three-inputs-zero-points", _concat3),
    Case("concat-vectors", _concat_vectors),
    Case("concat-lanes-8-16-32-scalar-clamped", _concat_lanes),
    Case("concat-copy-and-8-bit-lanes", _concat_copy_and_lanes),
    # networks
    Case("lut-hardswish", lambda b: b.lut(b.input((6, 7, 5)), "hardswish")),
    Case(
        "lut-hardsigmoid-unsigned-out",
        lambda b: b.lut(b.input((4, 5, 3)), "hardsigmoid", out=QFormat(7, False, 7)),
    ),
    Case(
        "lut-hardsigmoid-affine-clamped",
        lambda b: b.lut(b.input((4, 5, 3)), "hardsigmoid", (0.2, 0.5), lo=-100, hi=100),
    ),
    Case(
        "lut-silu-zero-point",
        lambda b: b.lut(b.input((5, 5, 4)), "silu", out=QFormat(8, True, 5, zero_point=-20)),
    ),
    Case("lut-sigmoid-unsigned-in", lambda b: b.lut(b.input((3, 9, 2), lo=0), "sigmoid")),
    Case("lut-tanh-vector", lambda b: b.lut(b.input((37,)), "tanh", out=QFormat(8, True, 7))),
    Case("lut-leaky-relu", lambda b: b.lut(b.input((5, 3, 6)), "leaky_relu", (0.01,))),
    Case("lut-gelu", lambda b: b.lut(b.input((4, 4, 4)), "gelu")),
    Case(
        "lut-gelu-tanh-dyadic-out",
        lambda b: b.lut(b.input((4, 4, 4)), "gelu_tanh", out=QFormat(8, True, 5, 3, step=0.0371)),
    ),
    # adaptive pools (any output size), average pools with windows of different sizes
    Case(
        "adaptive_avgpool2d_acc16-upsample-7x5",
        lambda b: b.adaptive_pool(b.input((2, 3, 6)), (7, 5)),
    ),
    Case(
        "adaptive_avgpool2d_acc16-down-zero-point",
        lambda b: b.adaptive_pool(b.input((9, 10, 4)), (4, 3), input_zero_point=-9, lo=0),
    ),
    Case(
        "adaptive_avgpool2d_acc16-ceil-windows-wrap",
        lambda b: b.adaptive_pool(
            b.input((5, 5, 6), dist="high"),  # DSP: windows of 2 sizes (loops), a tail of 2
            (3, 3),
            acc_bits=9,
            windows=(((0, 2), (1, 4), (3, 5)), ((0, 3), (2, 5), (4, 5))),
        ),
        wraps=True,
    ),
    Case(
        "adaptive_avgpool2d_acc32-wide",
        lambda b: b.adaptive_pool(b.input((6, 5, 3)), (4, 4), acc_bits=20),
    ),
    Case(
        "adaptive_maxpool2d-down",  # DSP: column windows of 2 and 3 (loops), a tail of 1
        lambda b: b.adaptive_pool(b.input((7, 9, 5)), (3, 5), kind="max"),
    ),
    Case(
        "adaptive_maxpool2d-upsample-clamped",
        lambda b: b.adaptive_pool(b.input((1, 2, 7)), (6, 6), kind="max", lo=-5, hi=70),
    ),
    # bilinear resizing (integer weights)
    Case(
        "resize_bilinear_acc32-up2-half-pixel",
        lambda b: b.resize_bilinear(b.input((3, 4, 5)), (6, 8)),
    ),
    Case(
        "resize_bilinear_acc32-align-corners-zero-point-clamped",
        lambda b: b.resize_bilinear(
            b.input((5, 4, 6)), (9, 7), align_corners=True, input_zero_point=-7, lo=0, hi=100
        ),
    ),
    Case(
        "resize_bilinear_acc32-down-per-channel",
        lambda b: b.resize_bilinear(b.input((7, 9, 4)), (3, 4), per_channel=True),
    ),
    # gather (channel shuffle, chunk, split)
    Case(
        "gather-channel-shuffle", lambda b: b.gather(b.input((5, 3, 8)), [0, 4, 1, 5, 2, 6, 3, 7])
    ),
    Case("gather-chunk-clamped", lambda b: b.gather(b.input((4, 6, 9)), range(5, 9), lo=-3, hi=60)),
    Case("gather-vector-wide", lambda b: b.gather(b.input((300,)), range(299, -1, -2))),
    Case(  # DSP: runs of 11, 2 and 6 channels: words, then bytes
        "gather-split-runs-words-and-bytes",
        lambda b: b.gather(b.input((2, 3, 26)), [*range(3, 14), 0, 1, *range(20, 26)]),
    ),
    # zero_insert (a transposed convolution: zeros between the pixels, then a stride-1 conv2d)
    Case(  # Helium: runs of 19 values (a whole vector and a tail)
        "zero_insert-stride3x2", lambda b: b.zero_insert(b.input((3, 4, 19), lo=0), (3, 2))
    ),
    Case("net-conv-transpose-zero-point", _conv_transpose),
    Case(  # Helium: two full gathers of 16 channels and a tail of 8
        "gather-channel-shuffle-c40",
        lambda b: b.gather(b.input((3, 2, 40)), [i // 2 + i % 2 * 20 for i in range(40)]),
    ),
    Case("net-shuffle-block", _shuffle_block),
    Case("net-conv-lut-chain", _conv_lut_chain),
    Case("net-fused-luts", _fused_luts),
    Case("net-chain-cnn", _chain_net),
    Case("net-resnet-block", _resnet_block),
    Case("net-inception-inplace-add", _inception),
    Case("net-every-acc-width-8-to-32", _every_acc_width, wraps=True),
    Case("net-pools-only", lambda b: b.global_avgpool(b.maxpool2d(b.input((6, 6, 3))))),
    Case("net-reshape-only", lambda b: b.flatten(b.input((2, 3, 4)))),
]

CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


@pytest.fixture(scope="module")
def graphs() -> dict[str, tuple[Graph, np.ndarray, np.ndarray]]:
    """case id -> (graph, sample inputs, reference outputs)."""
    out = {}
    for c in CASES:
        g, x = c.build()
        out[c.id] = (g, x, reference.run(g, x).output)
    return out


# ----------------------------------------------------------------------------- in-process runs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_c_equals_reference(case: Case, tmp_path: Path, graphs: dict[str, Any]) -> None:
    g, x, want = graphs[case.id]
    kernels = {c.kernel for c in lower(g).calls}
    if case.kernel is not None:
        assert case.kernel in kernels, f"expected kernel {case.kernel}, lowered to {kernels}"
    if case.wraps:
        assert overflowed(g, x), "the case was meant to overflow the accumulator"
    c = compile(g, out_dir=tmp_path / "out", testbench=False)
    got = c.run_int_q(x)
    assert got.dtype == np.int64 and got.shape == want.shape
    assert np.array_equal(got, want)
    one = c.run_int_q(x[0])  # a single sample without the batch axis
    assert np.array_equal(one, want[0])
    assert (tmp_path / "out" / f"lib{c.name}.a").is_file()


def test_every_acc_width_wraps(graphs: dict[str, Any]) -> None:
    g, x, _ = graphs["net-every-acc-width-8-to-32"]
    wrapped = overflowed(g, x)
    assert sorted(wrapped) == sorted(f"acc{a}" for a in ACC_WIDTHS)
    assert {c.kernel for c in lower(g).calls} == {"dense_acc16", "dense_acc32", "concat"}


# ----------------------------------------------------------------------------- sanitizers


@pytest.fixture(scope="session")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every case emitted into one CMake project and built once with ASan + UBSan; shared by the
    pytest-xdist workers through a lock file. case id -> test bench path, or "ERROR <log>"."""

    def build(root: Path) -> dict[str, str]:
        dirs = []
        for c in CASES:
            g, _ = c.build()
            d = root / "models" / c_identifier(c.id)
            write_files(emit(g, c.id), d)
            dirs.append(d)
        # -O1: a third faster to build than -O2 (which the in-process builds use)
        host_o1 = BuildTarget("host", c_flags=("-O1",))
        results = build_many(dirs, root / "build", host_o1, sanitize=True, testbench=True)
        return {
            cid: (str(r.testbench) if isinstance(r, BuildResult) else f"ERROR {r}")
            for cid, r in zip(CASE_IDS, results.values(), strict=True)
        }

    return build_once(shared_dir(tmp_path_factory), "qacc-sanitized", build)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sanitized_testbench_equals_reference(
    case: Case, sanitized: dict[str, str], graphs: dict[str, Any]
) -> None:
    g, x, want = graphs[case.id]
    tb = sanitized[case.id]
    if tb.startswith("ERROR "):
        pytest.fail(f"sanitized build failed: {tb}")
    got = run_testbench(tb, x, g.tensors[g.input].shape, g.tensors[g.output].shape)
    assert np.array_equal(got, want)


# ----------------------------------------------------------------------------- qacc.h itself


@pytest.fixture(scope="module")
def runtime_lib(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """qacc.h's requantize and wrap helpers in a tiny shared library loaded with cffi."""
    import cffi

    d = tmp_path_factory.mktemp("qacc_h")
    src = d / "shim.c"
    src.write_text(
        '#include "qacc.h"\n'
        "void rq(const int64_t *acc, const int64_t *mult, const int32_t *shift, long n,\n"
        "        int32_t zp, int32_t lo, int32_t hi, int8_t *out)\n"
        "{ long i; for (i = 0; i < n; ++i)"
        " out[i] = qacc_requantize(acc[i], mult[i], shift[i], zp, lo, hi); }\n"
        "void rq32(const int32_t *acc, const int32_t *mult, const int32_t *shift, long n,\n"
        "          int32_t zp, int32_t lo, int32_t hi, int8_t *out)\n"
        "{ long i; for (i = 0; i < n; ++i)"
        " out[i] = qacc_requantize32(acc[i], mult[i], shift[i], zp, lo, hi); }\n"
        "void w16(const uint16_t *acc, long n, int bits, int32_t *out)\n"
        "{ long i; for (i = 0; i < n; ++i) out[i] = qacc_wrap16(acc[i], bits); }\n"
        "void w32(const uint32_t *acc, long n, int bits, int32_t *out)\n"
        "{ long i; for (i = 0; i < n; ++i) out[i] = qacc_wrap32(acc[i], bits); }\n"
        "void magic(const uint32_t *d, const int32_t *bits, long n, uint32_t *m)\n"
        "{ long i; for (i = 0; i < n; ++i) m[i] = qacc_div_magic(d[i], bits[i]); }\n"
    )
    so = d / "libshim.so"
    flags = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fPIC", "-shared"]
    subprocess.run(
        ["cc", *flags, "-I", str(RUNTIME), str(src), "-o", str(so)], check=True, capture_output=True
    )
    ffi = cffi.FFI()
    ffi.cdef(
        "void rq(const int64_t *, const int64_t *, const int32_t *, long, int32_t, int32_t,"
        " int32_t, int8_t *);"
        "void rq32(const int32_t *, const int32_t *, const int32_t *, long, int32_t, int32_t,"
        " int32_t, int8_t *);"
        "void w16(const uint16_t *, long, int, int32_t *);"
        "void w32(const uint32_t *, long, int, int32_t *);"
        "void magic(const uint32_t *, const int32_t *, long, uint32_t *);"
    )
    return ffi, ffi.dlopen(str(so))


def test_qacc_requantize_equals_formats(runtime_lib: Any) -> None:
    ffi, lib = runtime_lib
    rng = np.random.default_rng(7)
    n = 20000
    acc = np.concatenate(
        [
            rng.integers(-(1 << 31), 1 << 31, n),
            rng.integers(-300, 300, n),
            np.array([0, 1, -1, (1 << 31) - 1, -(1 << 31), (1 << 40), -(1 << 40)]),
        ]
    )
    m = acc.size
    mult = np.where(
        rng.random(m) < 0.5, rng.integers(0, 1 << 31, m), rng.integers(-(1 << 34), 1 << 34, m)
    )
    shift = rng.integers(-31, 63, m).astype(np.int32)
    for zp, lo, hi in ((0, -128, 127), (-7, 0, 127), (5, -20, 90), (0, 10, 3)):
        want = requantize(acc, mult, shift, zp, lo, hi)
        got = np.empty(m, dtype=np.int8)
        lib.rq(
            ffi.from_buffer("int64_t[]", acc),
            ffi.from_buffer("int64_t[]", mult),
            ffi.from_buffer("int32_t[]", shift),
            m,
            zp,
            lo,
            hi,
            ffi.from_buffer("int8_t[]", got),
        )
        assert np.array_equal(got.astype(np.int64), want), (zp, lo, hi)


def test_qacc_requantize32_equals_formats(runtime_lib: Any) -> None:
    """qacc_requantize32 (the DSP kernels' 32-bit requantization) equals formats.requantize on
    every (acc, mult, shift) that layouts.requant32_fits admits, including its edges."""
    ffi, lib = runtime_lib
    rng = np.random.default_rng(8)
    n = 60000
    acc = np.where(
        rng.random(n) < 0.5, rng.integers(-(1 << 31), 1 << 31, n), rng.integers(-3000, 3000, n)
    )
    mult = np.where(rng.random(n) < 0.5, 1, rng.integers(-(1 << 15), 1 << 15, n))
    shift = rng.integers(-31, 40, n)
    ok = np.array(
        [
            layouts.requant32_fits(abs(int(a)), int(m), int(s))
            for a, m, s in zip(acc, mult, shift, strict=True)
        ]
    )
    edges = [((1 << 31) - 2, 1, 1), (-(1 << 31) + 2, 1, 1), ((1 << 30) - 1, 1, 31), (-1, 1, 31)]
    edges += [(1 << 24, 1, -6), (-(1 << 24), 1, -6), (0, 0, 0), (-(1 << 31) + 2, -1, 1)]
    assert all(layouts.requant32_fits(abs(a), m, s) for a, m, s in edges)
    assert not layouts.requant32_fits((1 << 31) - 1, 1, 1)  # + 2^0 would leave int32
    acc = np.concatenate([acc[ok], [a for a, _, _ in edges]]).astype(np.int32)
    mult = np.concatenate([mult[ok], [m for _, m, _ in edges]]).astype(np.int32)
    shift = np.concatenate([shift[ok], [s for _, _, s in edges]]).astype(np.int32)
    assert acc.size > n // 4
    for zp, lo, hi in ((0, -128, 127), (-7, 0, 127), (5, -20, 90)):
        want = requantize(acc, mult, shift, zp, lo, hi)
        got = np.empty(acc.size, dtype=np.int8)
        lib.rq32(
            ffi.from_buffer("int32_t[]", acc),
            ffi.from_buffer("int32_t[]", mult),
            ffi.from_buffer("int32_t[]", shift),
            acc.size,
            zp,
            lo,
            hi,
            ffi.from_buffer("int8_t[]", got),
        )
        assert np.array_equal(got.astype(np.int64), want), (zp, lo, hi)


@pytest.mark.parametrize("bits", list(range(1, 33)))
def test_qacc_wrap_equals_formats(runtime_lib: Any, bits: int) -> None:
    ffi, lib = runtime_lib
    rng = np.random.default_rng(bits)
    exact = np.concatenate([rng.integers(-(1 << 40), 1 << 40, 3000), np.arange(-70000, 70000, 7)])
    want = wrap(exact, bits)
    got = np.empty(exact.size, dtype=np.int32)
    u32 = (exact & 0xFFFFFFFF).astype(np.uint32)  # what a uint32_t container holds
    lib.w32(ffi.from_buffer("uint32_t[]", u32), exact.size, bits, ffi.from_buffer("int32_t[]", got))
    assert np.array_equal(got.astype(np.int64), want)
    if bits <= 16:
        u16 = (exact & 0xFFFF).astype(np.uint16)
        lib.w16(
            ffi.from_buffer("uint16_t[]", u16), exact.size, bits, ffi.from_buffer("int32_t[]", got)
        )
        assert np.array_equal(got.astype(np.int64), want)


def _magic_divisors(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(d, bits) pairs `div_magic` admits (bits <= 30, 2^(31 - bits) <= d < 2^32): random ones
    and every power of two, its neighbours and the largest d of each bit length."""
    bits = rng.integers(1, layouts.MAGIC_MAX_BITS + 1, n)
    low = np.left_shift(1, 31 - bits)
    d = low + (rng.random(n) * ((1 << 32) - low)).astype(np.int64)
    edges = [
        (x, b)
        for b in range(1, layouts.MAGIC_MAX_BITS + 1)
        for lg in range(31 - b, 32)
        for x in (1 << lg, (1 << lg) + 1, (1 << lg) - 1, (2 << lg) - 1)
        if 1 << (31 - b) <= x < 1 << 32
    ]
    d = np.concatenate([np.minimum(d, (1 << 32) - 1), [x for x, _ in edges]])
    return d.astype(np.uint32), np.concatenate([bits, [b for _, b in edges]]).astype(np.int32)


def test_qacc_div_magic_equals_layouts(runtime_lib: Any) -> None:
    """qacc_div_magic (two 32-bit divisions) computes div_magic's m, ceil(2^(bits + 32) /
    (d << clz(d))), for every kind of divisor: random, powers of two and their neighbours."""
    ffi, lib = runtime_lib
    d, bits = _magic_divisors(np.random.default_rng(11), 200000)
    got = np.empty(d.size, dtype=np.uint32)
    lib.magic(
        ffi.from_buffer("uint32_t[]", d),
        ffi.from_buffer("int32_t[]", bits),
        d.size,
        ffi.from_buffer("uint32_t[]", got),
    )
    want = [layouts.div_magic(int(x), int(b))[0] for x, b in zip(d, bits, strict=True)]
    assert got.astype(np.int64).tolist() == want


def test_div_magic_divides_exactly() -> None:
    """((n * m) >> 32) >> sh == n // d for every n < 2^bits, on divisors of softmax sums (d = 2 s
    >= 2^16) at every dividend width, the largest and smallest divisors of each and random ones.
    The multiply-high is monotone in n and never below n // d, so it can only be wrong at the
    end of a block of equal quotients: checking every n = q d + d - 1 (and 2^bits - 1) checks
    the whole range."""
    rng = np.random.default_rng(12)
    checked = 0
    for bits in range(17, layouts.MAGIC_MAX_BITS + 1):
        lo, hi = 1 << 16, min(1 << 32, 1 << (bits + 2))
        spread = np.exp2(rng.uniform(16, np.log2(hi), 400)).astype(np.int64)  # log-uniform
        ds = {lo, lo + 1, hi - 1, hi - 2, *spread.tolist()}
        ds |= {1 << lg for lg in range(17, 32) if 1 << lg < hi}
        for d in sorted(ds):
            m, sh = layouts.div_magic(d, bits)
            assert sh >= 0 and 0 < m < 1 << 32, (d, bits)
            n = np.arange(d - 1, (1 << bits) + d - 1, d, dtype=np.uint64)
            n[-1] = min(int(n[-1]), (1 << bits) - 1)  # the last block ends at 2^bits - 1
            got = ((n * np.uint64(m)) >> np.uint64(32)) >> np.uint64(sh)
            assert np.array_equal(got, n // np.uint64(d)), (d, bits)
            checked += n.size
    assert checked > 10**6


def test_softmax_magic_bounds_the_dividends() -> None:
    """The Helium softmax divides with the magic reciprocal only where every dividend of the
    reference's division (e * 2^(out_frac + 1) + s) is below 2^bits and every divisor (2 s) has
    a shift >= 0; wider layers keep the portable kernel."""
    b = GraphBuilder("bounds")
    x = b.input((32,))
    for out, channels, want in ((QFormat(7, False, 7), 32, 24), (QFormat(8, True, 8), 1000, 26)):
        node = b.graph(b.softmax(x, out=out)).nodes[-1]
        emax = int(node.params["exp_table"].max())
        big = (emax << (out.frac + 1)) + channels * emax  # the largest dividend: e = emax = s/C
        assert layouts.softmax_dividend_bits(node, channels) == want == big.bit_length()
        v = layouts.softmax_magic_context(node, channels)
        assert v is not None and v["bits"] == want
        assert v["full16"] + v["tail16"] == channels and v["clamp_hi"] and not v["clamp_lo"]
    node = b.graph(b.softmax(x, out=QFormat(8, True, 16))).nodes[-1]  # e * 2^17: 32 bits
    assert layouts.softmax_magic_context(node, 32) is None
    node = b.graph(b.softmax(x)).nodes[-1]  # rows of 2: the scalar divisions are shorter
    assert layouts.softmax_magic_context(node, 2) is None
    assert layouts.softmax_magic_context(node, 3) is not None


# ----------------------------------------------------------------------------- determinism

STAMP = re.compile(r"^(/\*|#) Generated by qacc \S+ from .+\. Do not edit\.( \*/)?$")


def test_emit_is_deterministic_and_stamped(graphs: dict[str, Any]) -> None:
    g = graphs["net-resnet-block"][0]
    a, b = emit(g, "resnet block"), emit(g, "resnet block")
    assert a == b
    assert list(a) == sorted(a)
    for path, text in a.items():
        if path.endswith((".c", ".h", "CMakeLists.txt")) and path != "qacc.h":
            assert STAMP.match(text.splitlines()[0]), path
    assert "/* conv2d2: conv2d -> conv2d_acc32" in a["resnet_block.c"]  # layer names in comments


def test_compile_twice_gives_identical_sources(graphs: dict[str, Any], tmp_path: Path) -> None:
    g = graphs["net-chain-cnn"][0]
    c1 = compile(g, out_dir=tmp_path / "a", testbench=False)
    c2 = compile(g, out_dir=tmp_path / "b", testbench=False)

    def sources(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.suffix != ".a"}

    s1, s2 = sources(c1.out_dir), sources(c2.out_dir)
    assert s1 == s2
    assert {"net_chain_cnn.c", "net_chain_cnn.h", "CMakeLists.txt", "report.json"} <= set(s1)
    for text in s1.values():
        assert str(tmp_path).encode() not in text  # no absolute paths in generated files


# ----------------------------------------------------------------------------- memory plan


def _independent_bound(g: Graph, plan: memory.MemoryPlan) -> int:
    """max over steps of the bytes of arena tensors live at that step, from the graph alone."""
    sizes = {b.name: b.size for b in plan.buffers if b.location == memory.ARENA}
    bound = 0
    for step in range(len(g.nodes)):
        live = set()
        for t in sizes:
            members = plan.buffer(t).tensors
            first = min(
                -1 if m == g.input else next(i for i, n in enumerate(g.nodes) if n.output == m)
                for m in members
            )
            last = max(
                [first] + [i for i, n in enumerate(g.nodes) for m in members if m in n.inputs]
            )
            if first <= step <= last:
                live.add(t)
        bound = max(bound, sum(sizes[t] for t in live))
    return bound


def _check_no_overlap(plan: memory.MemoryPlan) -> None:
    arena = [b for b in plan.buffers if b.location == memory.ARENA]
    for i, a in enumerate(arena):
        assert a.offset >= 0 and a.offset + a.size <= plan.arena_bytes
        for b in arena[i + 1 :]:
            if a.start <= b.end and b.start <= a.end:
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset


@pytest.mark.parametrize("seed", range(40))
def test_arena_reaches_lower_bound_on_chains(seed: int) -> None:
    rng = np.random.default_rng(seed)
    b = GraphBuilder(f"chain{seed}", seed=seed, batch=1)
    t = b.input(tuple(int(v) for v in rng.integers(3, 9, 3)))
    for _ in range(int(rng.integers(2, 9))):
        kind = rng.integers(0, 4)
        if b.tensors[t].shape.__len__() == 1:
            t = b.dense(t, int(rng.integers(1, 40)))
        elif kind == 0:
            t = b.conv2d(t, int(rng.integers(1, 30)), (1, 1))
        elif kind == 1 and min(b.tensors[t].shape[:2]) >= 2:
            t = b.maxpool2d(t, (2, 2), (2, 2))
        elif kind == 2:
            t = b.conv2d(t, int(rng.integers(1, 20)), (3, 3), padding=(1, 1, 1, 1))
        else:
            t = b.flatten(t)
    g, _ = b.result()
    plan = lower(g).plan
    assert plan.arena_bytes == plan.lower_bound, plan.method
    assert plan.lower_bound == _independent_bound(g, plan)
    _check_no_overlap(plan)


def _random_dag(seed: int) -> tuple[Graph, dict[str, tuple[int, ...]]]:
    """A random branchy graph for the planner alone (ops are placeholders): fan-in up to 3,
    reshape aliases, and nodes whose kernel may write in place over their first input."""
    rng = np.random.default_rng(seed)
    tensors = {"x": Tensor("x", (int(rng.integers(1, 100)),))}
    names, nodes, inplace = ["x"], [], {}
    for i in range(int(rng.integers(2, 14))):
        picks = rng.integers(max(0, len(names) - 4), len(names), int(rng.integers(1, 4)))
        ins = tuple(dict.fromkeys(names[int(j)] for j in picks))
        op = "reshape" if len(ins) == 1 and rng.random() < 0.15 else "op"
        size = tensors[ins[0]].size if op == "reshape" else int(rng.integers(1, 100))
        if op == "op" and rng.random() < 0.3:
            size, inplace[f"n{i}"] = tensors[ins[0]].size, (0,)
        t = f"t{i}"
        tensors[t] = Tensor(t, (size,))
        names.append(t)
        nodes.append(Node(f"n{i}", op, ins, t))
    return Graph(f"dag{seed}", tuple(nodes), tensors, "x", names[-1]), inplace


def test_random_branchy_plans_are_valid_and_near_the_bound() -> None:
    gaps = []
    for seed in range(400):
        g, inplace = _random_dag(seed)
        plan = memory.plan(g, inplace=inplace)
        _check_no_overlap(plan)
        assert plan.lower_bound == _independent_bound(g, plan)
        assert plan.gap == plan.arena_bytes - plan.lower_bound >= 0
        gaps.append(plan.gap / plan.lower_bound if plan.lower_bound else 0.0)
    assert sum(v > 0 for v in gaps) <= 4 and max(gaps) <= 0.05, gaps


def test_plan_states_its_gap_on_a_branchy_graph() -> None:
    """A graph where the heuristics stay above the bound (4 bytes at the time of writing)."""
    g, inplace = _random_dag(1872)
    plan = memory.plan(g, inplace=inplace)
    summary = plan.summary()
    assert summary["arena_gap_bytes"] == plan.arena_bytes - plan.lower_bound
    assert 0 <= summary["arena_gap_bytes"] <= 0.05 * plan.lower_bound
    assert summary["arena_lower_bound"] == _independent_bound(g, plan)


def test_branchy_plan_reports_gap(graphs: dict[str, Any], tmp_path: Path) -> None:
    for cid in ("net-resnet-block", "net-inception-inplace-add", "concat-three-inputs-zero-points"):
        g = graphs[cid][0]
        plan = lower(g).plan
        _check_no_overlap(plan)
        assert plan.lower_bound == _independent_bound(g, plan)
        assert plan.arena_bytes >= plan.lower_bound
        report = json.loads(emit(g, cid)["report.json"])["memory"]
        assert report["arena_bytes"] == plan.arena_bytes
        assert report["arena_lower_bound"] == plan.lower_bound
        assert report["arena_gap_bytes"] == plan.arena_bytes - plan.lower_bound
        assert report["ram_bytes"] == plan.arena_bytes + report["scratch_bytes"]
        assert report["flash_weight_bytes"] > 0


def test_inplace_add_and_reshape_alias(graphs: dict[str, Any]) -> None:
    g = graphs["net-inception-inplace-add"][0]
    plan = lower(g).plan
    add = next(n for n in g.nodes if n.op == "add")
    assert plan.inplace[add.name] in add.inputs
    assert plan.buffer_of(add.output) == plan.buffer_of(plan.inplace[add.name])
    assert f"in place over {plan.inplace[add.name]}" in emit(g)["net_inception_inplace_add.c"]
    g = graphs["net-resnet-block"][0]
    plan = lower(g).plan
    r = next(n for n in g.nodes if n.op == "reshape")
    assert plan.buffer_of(r.output) == plan.buffer_of(r.inputs[0])


def test_header_states_shapes_and_memory(graphs: dict[str, Any]) -> None:
    g = graphs["net-chain-cnn"][0]
    files = emit(g, "net-chain-cnn")
    header = files["net_chain_cnn.h"]
    report = json.loads(files["report.json"])
    macros = dict(re.findall(r"^#define (QACC_NET_CHAIN_CNN_\w+) (.+)$", header, re.M))
    assert macros["QACC_NET_CHAIN_CNN_INPUT_SHAPE"] == "{ 15, 13, 3 }"
    assert macros["QACC_NET_CHAIN_CNN_INPUT_SIZE"] == str(15 * 13 * 3)
    assert macros["QACC_NET_CHAIN_CNN_OUTPUT_SIZE"] == "5"
    assert macros["QACC_NET_CHAIN_CNN_ARENA_BYTES"] == str(report["memory"]["arena_bytes"])
    assert macros["QACC_NET_CHAIN_CNN_WEIGHT_BYTES"] == str(report["memory"]["flash_weight_bytes"])
    assert "int qacc_net_chain_cnn_run(const int8_t *in, int8_t *out);" in header
    c = files["net_chain_cnn.c"]
    assert "malloc" not in c and "static int8_t arena[QACC_NET_CHAIN_CNN_ARENA_BYTES];" in c
    assert all(
        line.startswith("const ")
        for line in files["net_chain_cnn_weights.c"].splitlines()
        if line.endswith("= {")
    )


# ----------------------------------------------------------------------------- integration


def test_firmware_project_links_generated_library(graphs: dict[str, Any], tmp_path: Path) -> None:
    """A project that add_subdirectory()s the generated model and links lib<model>.a."""
    g, x, want = graphs["net-chain-cnn"]
    model = tmp_path / "model"
    write_files(emit(g, "net-chain-cnn"), model)
    app = tmp_path / "app"
    app.mkdir()
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.13)\nproject(app C)\n"
        f'add_subdirectory("{model}" model)\n'
        "add_executable(app main.c)\ntarget_link_libraries(app PRIVATE net_chain_cnn)\n"
    )
    (app / "main.c").write_text(
        '#include <stdio.h>\n#include "net_chain_cnn.h"\n'
        "static const int8_t x[QACC_NET_CHAIN_CNN_INPUT_SIZE] = {"
        + ", ".join(str(int(v)) for v in x[0].reshape(-1))
        + "};\nint main(void) {\n  int8_t y[QACC_NET_CHAIN_CNN_OUTPUT_SIZE]; int i;\n"
        "  if (qacc_net_chain_cnn_run(x, y) != 0) return 1;\n"
        '  for (i = 0; i < QACC_NET_CHAIN_CNN_OUTPUT_SIZE; ++i) printf("%d\\n", y[i]);\n'
        "  return 0;\n}\n"
    )
    bdir = tmp_path / "build"
    flags = "-O2 -Wall -Wextra -Werror -pedantic"
    subprocess.run(
        ["cmake", "-S", str(app), "-B", str(bdir), f"-DCMAKE_C_FLAGS={flags}"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(bdir)], check=True, capture_output=True)
    out = subprocess.run([str(bdir / "app")], check=True, capture_output=True, text=True).stdout
    assert [int(v) for v in out.split()] == [int(v) for v in want[0]]
    assert (bdir / "model" / "libnet_chain_cnn.a").is_file()


def test_build_many_standalone(graphs: dict[str, Any], tmp_path: Path) -> None:
    """The root CMakeLists.txt builds generated directories (here: one) without sanitizers."""
    g, x, want = graphs["dense_acc32-37to10"]
    d = tmp_path / "dense"
    write_files(emit(g, "dense"), d)
    (r,) = build_many([d], tmp_path / "build").values()
    assert isinstance(r, BuildResult) and r.testbench is not None
    assert np.array_equal(run_testbench(r.testbench, x, (37,), (10,)), want)
    r2 = build(d)
    assert (d / "libdense.a").is_file() and r2.shared_lib is not None
    # the static and shared libraries and the test bench share one object of the weights
    assert r2.testbench is not None and len(list(r2.build_dir.rglob("dense_weights.c.o"))) == 1


def test_run_and_run_int_with_a_model_object(graphs: dict[str, Any], tmp_path: Path) -> None:
    """compile() needs only .graph and .name; run/run_int use the model's (de)quantizers."""
    g, x, want = graphs["net-chain-cnn"]

    class Model:
        name = "chain model"
        graph = g

        def quantize_input(self, xf: np.ndarray) -> np.ndarray:
            return np.transpose(np.asarray(xf), (0, 2, 3, 1)).astype(np.int64)

        def dequantize_output(self, q: np.ndarray) -> np.ndarray:
            return np.asarray(q, dtype=np.float64) * 2.0**-4

        def reference_int(self, xf: np.ndarray) -> np.ndarray:
            return reference.run(g, self.quantize_input(xf)).output

    qm = Model()
    xf = np.transpose(x, (0, 3, 1, 2)).astype(np.float32)
    c = compile(qm, out_dir=tmp_path / "m", testbench=False)
    assert c.name == "chain_model"
    assert np.array_equal(c.run_int(xf), qm.reference_int(xf))
    assert np.array_equal(c.run(xf), want * 2.0**-4)
    assert c.report["memory"]["arena_lower_bound"] == lower(g).plan.lower_bound


def test_sanitized_compile_runs_through_testbench(graphs: dict[str, Any], tmp_path: Path) -> None:
    g, x, want = graphs["conv2d_acc16-wrap-acc12"]
    c = compile(g, out_dir=tmp_path / "san", sanitize=True)
    assert c.build.shared_lib is None
    assert np.array_equal(c.run_int_q(x), want)


def test_errors_are_reported_before_writing(graphs: dict[str, Any], tmp_path: Path) -> None:
    g = graphs["dense_acc32-37to10"][0]
    n = g.nodes[0]
    bad = Graph(
        g.name,
        (
            type(n)(
                n.name, n.op, n.inputs, n.output, {**n.attrs, "acc_bits": 40}, n.params, n.requant
            ),
        ),
        g.tensors,
        g.input,
        g.output,
    )
    with pytest.raises(LoweringError, match="accumulator width 40"):
        compile(bad, out_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError):
        compile(g, out_dir=busy)
    assert (busy / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("attrs", "shape", "message"),
    [
        ({"stride": (2, 2)}, (7, 7, 19), r"output shape \(7, 7, 19\) should be \(5, 7, 19\)"),
        ({"stride": (0, 2)}, (7, 7, 19), r"stride \(0, 2\) >= 1"),
    ],
)
def test_zero_insert_shapes_are_checked(
    graphs: dict[str, Any], attrs: dict[str, Any], shape: tuple[int, ...], message: str
) -> None:
    g = graphs["zero_insert-stride3x2"][0]
    n = g.nodes[0]
    tensors = {**g.tensors, n.output: Tensor(n.output, shape, g.tensors[n.output].fmt)}
    node = Node(n.name, n.op, n.inputs, n.output, attrs, n.params, n.requant)
    with pytest.raises(LoweringError, match=message):
        lower(Graph(g.name, (node,), tensors, g.input, g.output))


def test_quantized_torch_model_end_to_end(tmp_path: Path) -> None:
    """codegen.quantize(torch) -> codegen.compile -> run_int == qm.reference_int, exactly."""
    import torch
    from torch import nn

    import codegen

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()  # fmt: skip
    x = np.random.default_rng(0).standard_normal((8, 1, 12, 12)).astype(np.float32)
    qm = codegen.quantize(model, x, acc_bits=14, progress=False, name="tiny cnn")
    c = codegen.compile(qm, target="host", out_dir=tmp_path / "tiny")
    assert np.array_equal(c.run_int(x), qm.reference_int(x))
    assert np.array_equal(c.run(x), qm.reference(x))
    assert {"tiny_cnn.h", "libtiny_cnn.a", "report.json", "CMakeLists.txt"} <= {
        p.name for p in (tmp_path / "tiny").iterdir()
    }
