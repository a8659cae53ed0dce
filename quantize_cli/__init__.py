"""qz: quantize safetensors checkpoints (INT8, 4-bit, FP8), inspect them and dequantize
them.

The library API is the pure-numpy core::

    >>> import numpy as np
    >>> from quantize_cli import Scheme, quantize, dequantize, error_stats
    >>> x = np.array([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2], dtype=np.float32)
    >>> quantize(x, Scheme("absmax", "tensor")).codes.tolist()
    [33, -14, -70, 35, -59, 10, 47, 127]

Importing the package imports nothing else: the names below load the core (and numpy)
when first used, so that the command line can configure numpy's threads first
(cli/__init__.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "1.0.0"

if TYPE_CHECKING:
    from .core import ErrorStats, QuantizedTensor, Scheme, dequantize, error_stats, quantize
    from .errors import QzError

_LAZY = {"ErrorStats": ".core", "QuantizedTensor": ".core", "Scheme": ".core",
         "dequantize": ".core", "error_stats": ".core", "quantize": ".core",
         "QzError": ".errors"}

__all__ = [
    "ErrorStats",
    "QuantizedTensor",
    "QzError",
    "Scheme",
    "__version__",
    "dequantize",
    "error_stats",
    "quantize",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
