"""qacc: quantize PyTorch CNNs as a function of the accumulator width and generate C for ARM."""

from codegen import datasets
from codegen.api import QuantizedModel, quantize
from codegen.compiled import compile as compile
from codegen.errors import QaccError

__version__ = "0.1.0"
__all__ = ["QaccError", "QuantizedModel", "__version__", "datasets", "quantize"]
