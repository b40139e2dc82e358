"""torchvision's model definitions, importable beside the CPU torch this project pins.

torchvision 0.28.0 (a pinned `dev` extra) registers fake kernels for its compiled ops
(``torchvision::nms`` and the others) at import time; this torch build has no such ops, so a
plain ``import torchvision`` raises ``operator torchvision::nms does not exist``. The model
definitions use none of those ops: ``torch.library.register_fake`` is a no-op decorator factory
during the import only, and restored afterwards. This is the one place that workaround lives.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch


def _no_op_register_fake(*_args: Any, **_kwargs: Any) -> Callable[[Any], Any]:
    def decorate(fn: Any) -> Any:
        return fn

    return decorate


def torchvision_models() -> ModuleType:
    """``torchvision.models``, imported with ``torch.library.register_fake`` as a no-op."""
    if "torchvision.models" in sys.modules:
        return sys.modules["torchvision.models"]
    original = torch.library.register_fake
    torch.library.register_fake = _no_op_register_fake  # type: ignore[assignment]
    try:
        import torchvision.models
    finally:
        torch.library.register_fake = original
    return torchvision.models
