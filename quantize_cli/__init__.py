"""qz: quantize safetensors checkpoints to INT8, inspect them and dequantize them.

The library API is the pure-numpy core::

    >>> import numpy as np
    >>> from quantize_cli import Scheme, quantize, dequantize, error_stats
    >>> x = np.array([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2], dtype=np.float32)
    >>> quantize(x, Scheme("absmax", "tensor")).codes.tolist()
    [33, -14, -70, 35, -59, 10, 47, 127]
"""

__version__ = "1.0.0"

from .core import (
    ErrorStats,
    QuantizedTensor,
    Scheme,
    dequantize,
    error_stats,
    quantize,
)
from .errors import QzError

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
