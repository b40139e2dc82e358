"""Element-wise nonlinearities as per-layer int8 lookup tables (the IR op `lut`).

A `lut` node carries `attrs["function"]` (a name in `FUNCTIONS`) and `attrs["args"]` (its float
parameters: LeakyReLU's negative slope, a non-default HardSigmoid's alpha and beta, clamp's lo and
hi (either may be infinite), the constant of `scale` (x * constant); empty otherwise). The float
graph evaluates the real function (`apply`); the integer graph carries the 256-entry table
`params["table"]` that `table` computes from the real function and the input and output formats:

    table[q + 128] = saturate(round_half_up(f((q - zp_in) * scale_in) / scale_out) + zp_out, lo, hi)

for every int8 q (entries outside the input format's range are never read). The float function is
evaluated in float64 by the same torch code the float simulation runs, and the rounding is
`formats.quantize` (round half up, saturate), so the fake-quantized simulation, the table and the C
agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from codegen.core.formats import IntArray, quantize
from codegen.core.ir import QFormat


def _hardsigmoid(x: torch.Tensor, *args: float) -> torch.Tensor:
    if not args:
        return F.hardsigmoid(x)
    alpha, beta = args
    return (x * alpha + beta).clamp(0.0, 1.0)


@dataclass(frozen=True)
class Function:
    """One element-wise function: its torch evaluation and its torch name (for messages)."""

    fn: Callable[..., torch.Tensor]
    title: str
    nonneg: bool
    """f(x) >= 0 for every x (the output format may be unsigned)."""
    nargs: tuple[int, ...] = (0,)
    """Numbers of float arguments accepted."""


FUNCTIONS: dict[str, Function] = {
    "hardswish": Function(lambda x: F.hardswish(x), "Hardswish", False),
    "hardsigmoid": Function(_hardsigmoid, "Hardsigmoid", True, (0, 2)),
    "silu": Function(lambda x: F.silu(x), "SiLU", False),
    "sigmoid": Function(lambda x: torch.sigmoid(x), "Sigmoid", True),
    "tanh": Function(lambda x: torch.tanh(x), "Tanh", False),
    "leaky_relu": Function(lambda x, s: F.leaky_relu(x, s), "LeakyReLU", False, (1,)),
    "gelu": Function(lambda x: F.gelu(x), "GELU", False),
    "gelu_tanh": Function(lambda x: F.gelu(x, approximate="tanh"), "GELU(tanh)", False),
    # ReLU/ReLU6/Hardtanh/clamp that cannot fuse into a producer (after a concat, on the input,
    # after another table...): exact by construction, the table holds the clamped input
    "relu": Function(lambda x: F.relu(x), "ReLU", True),
    "clamp": Function(lambda x, lo, hi: x.clamp(lo, hi), "clamp", False, (2,)),
    # x * a constant scalar (its one argument)
    "scale": Function(lambda x, s: x * s, "multiplication by a constant", False, (1,)),
}


def check(function: str, args: Sequence[float]) -> None:
    spec = FUNCTIONS.get(function)
    if spec is None:
        raise ValueError(f"unknown lut function {function!r} (have: {', '.join(FUNCTIONS)})")
    if len(args) not in spec.nargs:
        raise ValueError(f"lut function {function!r} takes {spec.nargs} arguments, got {args}")


def apply(function: str, args: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """The real function, element-wise (any dtype; float64 for tables)."""
    check(function, args)
    return FUNCTIONS[function].fn(x, *(float(a) for a in args))


def table(
    function: str,
    args: Sequence[float],
    fin: QFormat,
    fout: QFormat,
    lo: int | None = None,
    hi: int | None = None,
) -> IntArray:
    """The 256 outputs, indexed by q_in + 128, of `function` from format `fin` to `fout`.

    `lo`/`hi` (default: the output format's range) are the saturation limits, a fused clamp's."""
    q = np.arange(-128, 128, dtype=np.int64)
    x = (q - fin.zero_point).astype(np.float64) * fin.scale
    y = apply(function, args, torch.as_tensor(x, dtype=torch.float64)).numpy()
    lo, hi = fout.qmin if lo is None else lo, fout.qmax if hi is None else hi
    return quantize(y / fout.scale, 0, lo, hi, fout.zero_point)
