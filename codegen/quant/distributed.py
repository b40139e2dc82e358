"""Running the quantizers under `torchrun`: PyTorch's own torch.distributed, nothing home-made.

When the user's script has called `torch.distributed.init_process_group` (torchrun sets the
environment), the quantizers:

* train through `DistributedDataParallel` (gradients all-reduced) on data sharded by a
  `DistributedSampler` (`codegen.quant.training.fit`);
* all-reduce their calibration statistics: ranges with MIN / MAX (exact, so the formats do not
  depend on the number of ranks), sums such as second moments in float64;
* keep every rank's result identical (all-reduced gradients make identical Adam steps; the
  accumulator projection is a deterministic function of the weights; `sync_parameters` checks
  and enforces it after training);
* print only on rank 0 (`codegen.core.progress.enabled`, the per-epoch log lines).

When torch.distributed is not initialised, every function here is the single-process identity.
Collectives run on the CPU for the gloo backend and on the current CUDA device for NCCL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from codegen.core.errors import QaccError


def active() -> bool:
    """Whether torch.distributed is initialised (with more than zero ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for training, calibration and fake-quant simulation.

    "cuda" without an index means the current CUDA device (under torchrun, call
    `torch.cuda.set_device(local_rank)` first). A CUDA device without CUDA is a one-line error.
    """
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise QaccError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from e
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise QaccError(f"device '{dev}' is not supported; use 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        raise QaccError(
            f"device='{device}' was asked but torch.cuda.is_available() is False "
            "(no GPU, or a CPU-only torch build); use device='cpu'"
        )
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: np.ndarray, op: str) -> np.ndarray:
    """`values` reduced over the ranks ("min", "max" or "sum"), as float64 (int64 for integer
    input); unchanged (a copy) in a single process. Every rank receives the same bytes."""
    arr = np.asarray(values)
    dtype = torch.int64 if arr.dtype.kind in "iub" else torch.float64
    if not active():
        return np.array(arr, dtype=np.int64 if dtype == torch.int64 else np.float64)
    t = torch.as_tensor(np.ascontiguousarray(arr), dtype=dtype).to(_comm_device())
    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    dist.all_reduce(t, op=ops[op])
    return t.cpu().numpy()


def all_reduce_dict(values: Mapping[str, Any], op: str) -> dict[str, Any]:
    """A dict of scalars or arrays reduced key by key (one collective for all of them); the
    keys must be the same on every rank."""
    keys = sorted(values)
    if not active() or not keys:
        return dict(values)
    arrs = [np.asarray(values[k], dtype=np.float64) for k in keys]
    flat = all_reduce(np.concatenate([a.ravel() for a in arrs]), op)
    out: dict[str, Any] = {}
    i = 0
    for k, a in zip(keys, arrs, strict=True):
        part = flat[i : i + a.size].reshape(a.shape)
        out[k] = part if isinstance(values[k], np.ndarray) else float(part.reshape(()))
        i += a.size
    return out


def sync_parameters(model: nn.Module) -> int:
    """Make every rank's parameters rank 0's; returns the largest number of values that
    differed on a rank (the same on every rank; expected 0: all-reduced gradients give
    identical optimizer steps)."""
    if not active():
        return 0
    differ = 0
    comm = _comm_device()
    with torch.no_grad():
        for p in model.parameters():
            t = p.detach().to(comm).clone()
            mine = t.clone()
            dist.broadcast(t, src=0)
            differ += int((mine != t).sum())
            p.copy_(t.to(p.device))
    return int(all_reduce(np.array([differ]), "max")[0])
