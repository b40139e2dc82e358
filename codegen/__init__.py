"""qacc: quantize PyTorch CNNs as a function of the accumulator width and generate C for ARM.

The public faces are here: ``codegen.quantize`` and ``codegen.compile`` (both from
``codegen.api``), ``QuantizedModel`` and ``QaccError``. The stages behind them are subpackages
(``core``, ``frontend``, ``quant``, ``backend``, ``targets``, ``data``, ``bench``, ``tools``):
docs/architecture.md says what each one holds and which may import which.
"""

from codegen.api import QuantizedModel, compile, quantize
from codegen.core.errors import QaccError

__version__ = "0.1.0"
__all__ = ["QaccError", "QuantizedModel", "__version__", "compile", "quantize"]
