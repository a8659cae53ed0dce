"""The pure-numpy core: schemes, quantize/dequantize and error statistics. No I/O."""

from .params import qparams_from_range
from .quantize import (
    QuantizedTensor,
    RowResult,
    dequantize,
    dequantize_rows,
    find_non_finite,
    per_tensor_range,
    quantize,
    quantize_rows,
    value_range,
)
from .scheme import Scheme
from .stats import ErrorStats, error_stats
from .threads import get_num_threads, set_num_threads

__all__ = [
    "ErrorStats",
    "QuantizedTensor",
    "RowResult",
    "Scheme",
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
