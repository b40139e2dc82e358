"""Load a user's model from `path/to/file.py:callable` or `model.onnx` (the CLI's MODEL)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch import nn

from codegen.core.errors import InvalidModelError, QaccError


def load_model(spec: str) -> nn.Module | str:
    """Import the file and call the callable; it must return an nn.Module with its weights.

    An ONNX file (`.onnx`) is returned as its path: `codegen.quantize` reads it."""
    if spec.lower().endswith(".onnx"):
        if not Path(spec).is_file():
            raise QaccError(f"ONNX file '{spec}' does not exist")
        return spec
    path, sep, func = spec.rpartition(":")
    if not sep or not path or not func:
        raise QaccError(f"MODEL must be path/to/file.py:callable or model.onnx, got '{spec}'")
    file = Path(path)
    if not file.is_file():
        raise QaccError(f"model file '{path}' does not exist")
    mod_name = f"qacc_user_model_{abs(hash(file.resolve()))}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise QaccError(f"model file '{path}' cannot be imported as Python")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # user code: report it in one line
        raise InvalidModelError(f"importing '{path}' failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        raise QaccError(f"'{path}' has no callable '{func}'")
    try:
        model = fn()
    except Exception as e:
        raise InvalidModelError(
            f"calling {func}() in '{path}' failed: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"{func}() in '{path}' returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
