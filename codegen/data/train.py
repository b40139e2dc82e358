"""Float training of the demo networks: shipped checkpoints, then a cache (``~/.cache/qacc``).

The package ships trained float checkpoints of the demo networks (``checkpoints/<name>.pt``, a
float32 state_dict, with ``checkpoints/checkpoints.json`` recording how each was made and its
float test accuracy; ``scripts/train-checkpoints.py`` reproduces them). ``trained(...)`` returns
the shipped checkpoint when it matches the request (same network name and architecture, same
recipe: epochs and training set size); otherwise it trains, or reloads what an identical earlier
training left in the cache. ``pretrained(name)`` is the shipped network itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from codegen.core.errors import QaccError
from codegen.quant.training import accuracy, fit

__all__ = [
    "CHECKPOINT_DIR",
    "RECIPES",
    "accuracy",
    "cache_dir",
    "checkpoint_info",
    "fit",
    "pretrained",
    "shipped",
    "trained",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
"""The shipped checkpoints: <name>.pt (float32 state_dict) and checkpoints.json."""

RECIPES: dict[str, dict[str, Any]] = {
    "fashion_cnn": {"epochs": 4, "seed": 0},
    "fashion_ds": {"epochs": 6, "seed": 0},
}
"""How the shipped checkpoints are trained (codegen.quant.training.fit with its defaults: Adam,
one-cycle, batch 128, lr 2e-3) on the 60 000 Fashion-MNIST training images; `seed` seeds the
initialisation and the training order. scripts/train-checkpoints.py applies them."""


def cache_dir() -> Path:
    base = os.environ.get("QACC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qacc"
    )
    return Path(base)


def checkpoint_info(name: str | None = None, directory: Path = CHECKPOINT_DIR) -> dict[str, Any]:
    """checkpoints.json: {name: {"file", "architecture", "epochs", "train_samples",
    "float_test_accuracy", ...}}, or the entry of `name` ({} when none ships); `directory`: where
    the checkpoints are (scripts/train-checkpoints.py --out)."""
    path = directory / "checkpoints.json"
    info: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    return info if name is None else dict(info.get(name, {}))


def _load_matching(model: nn.Module, path: Path) -> bool:
    """Load the state_dict at `path` into `model` if its keys, shapes and dtypes match."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    own = model.state_dict()
    if set(state) != set(own):
        return False
    if any(state[k].shape != own[k].shape or state[k].dtype != own[k].dtype for k in own):
        return False
    model.load_state_dict(state)
    return True


def shipped(name: str, model: nn.Module, epochs: int, train_samples: int) -> nn.Module | None:
    """`model` with the shipped checkpoint of `name` loaded (eval mode), if one ships for this
    architecture and recipe (epochs, training set size); else None (`model` is left as it was)."""
    info = checkpoint_info(name)
    if not info or type(model).__name__ != info["architecture"]:
        return None
    if int(info["epochs"]) != epochs or int(info["train_samples"]) != train_samples:
        return None
    path = CHECKPOINT_DIR / info["file"]
    if not path.is_file() or not _load_matching(model, path):
        return None
    return model.eval()


def pretrained(name: str) -> nn.Module:
    """The shipped float network `name` (codegen.data.models.ZOO[name] with its checkpoint)."""
    from codegen.data import models

    info = checkpoint_info(name)
    if name not in models.ZOO or not info:
        have = ", ".join(sorted(checkpoint_info())) or "none"
        raise QaccError(f"no shipped checkpoint for network '{name}' (shipped: {have})")
    model = models.ZOO[name](**info.get("kwargs", {}))
    path = CHECKPOINT_DIR / info["file"]
    if not path.is_file() or not _load_matching(model, path):
        raise QaccError(
            f"the shipped checkpoint {path} does not fit {type(model).__name__}; "
            "reinstall qacc or run scripts/train-checkpoints.py"
        )
    return model.eval()


def trained(
    name: str,
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 4,
    progress: bool = True,
) -> nn.Module:
    """`model` trained on (x, y) for `epochs`: the shipped checkpoint when it matches, else the
    checkpoint a previous identical training left in the cache, else trained now (and cached)."""
    ready = shipped(name, model, epochs, len(x))
    if ready is not None:
        return ready
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
