"""The pure-numpy core: schemes, quantize/dequantize and error statistics. No I/O."""

from .params import PLAIN, Storage, qparams_from_range
from .quantize import (
    QuantizedTensor,
    dequantize,
    dequantize_rows,
    per_tensor_range,
    quantize,
    quantize_rows,
    value_range,
)
from .rows import QuantizedRows, RowResult
from .scheme import Scheme
from .stats import ErrorStats, error_stats
from .threads import get_num_threads, set_num_threads
from .values import find_non_finite

__all__ = [
    "PLAIN",
    "ErrorStats",
    "QuantizedRows",
    "QuantizedTensor",
    "RowResult",
    "Scheme",
    "Storage",
    "dequantize",
    "dequantize_rows",
    "error_stats",
    "find_non_finite",
    "get_num_threads",
    "per_tensor_range",
    "qparams_from_range",
    "quantize",
    "quantize_rows",
    "set_num_threads",
    "value_range",
]
