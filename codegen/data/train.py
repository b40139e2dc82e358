"""Float training of the demo networks, with a checkpoint cache (``~/.cache/qacc``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from codegen.quant.training import accuracy, fit

__all__ = ["accuracy", "cache_dir", "fit", "trained"]


def cache_dir() -> Path:
    base = os.environ.get("QACC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qacc"
    )
    return Path(base)


def trained(
    name: str,
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 4,
    progress: bool = True,
) -> nn.Module:
    """Train `model`, or load the checkpoint a previous identical training left in the cache."""
    n_params = sum(p.numel() for p in model.parameters())
    key = hashlib.sha256(
        f"{name}|{epochs}|{len(x)}|{torch.__version__}|{n_params}".encode()
    ).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    fit(model, x, y, epochs=epochs, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval()
