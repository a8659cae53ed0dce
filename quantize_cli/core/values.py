"""What qz computes on: values as float32, float32's limits, and where a tensor holds
values that are not finite.

Every quantizer reads its input through :func:`as_float32` or :func:`float32_tile`, so
BF16, F16 and F64 weights are converted once, tile by tile, in cache. Non-finite values
are found by the kernels on the way (they raise ``NonFiniteInTile``); counting them and
naming the first is the slow path of :func:`find_non_finite`, taken only on failure.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from ..errors import DtypeRangeError, NonFiniteValuesError, SchemeError
from .threads import scratch

#: The smallest normal float32: the floor of every non-zero scale (DESIGN §1).
FLOAT32_TINY = np.float32(np.finfo(np.float32).tiny)
#: The largest float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Sums of squares and products of float32 values stay within float32 only for magnitudes
#: between these: beyond them a tile's statistics are summed in float64 (rare: weights
#: are not near 1e16 or 1e-15).
FLOAT32_SAFE_MAGNITUDES = (1e-15, 1e16)


class NonFiniteInTile(Exception):
    """A tile holds NaN or ±inf; the caller reports count and position for the whole array."""


def is_float(array: np.ndarray) -> bool:
    """Whether qz can quantize values of this array's dtype."""
    return bool(np.issubdtype(array.dtype, np.floating)) or array.dtype.name == "bfloat16"


def check_float(array: np.ndarray) -> None:
    if not is_float(array):
        raise SchemeError(f"only floating-point values can be quantized, got {array.dtype}")


def as_float32(values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The float32 array qz computes on (float16/bfloat16/float64 are converted).

    >>> as_float32(np.array([1.5], np.float16)).dtype
    dtype('float32')
    """
    array = np.asarray(values)
    check_float(array)
    if array.dtype.name == "bfloat16":
        return widen_bfloat16(np.ascontiguousarray(array), np.empty(array.shape, np.float32))
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused
        return np.asarray(array, dtype=np.float32, order="C")


def widen_bfloat16(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 values as float32, into ``out``: a bfloat16 is the top half of a float32,
    so widening the bits is exact, and about three times as fast as ml_dtypes' cast."""
    np.left_shift(values.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def float32_tile(values: np.ndarray) -> np.ndarray:
    """A tile as float32, converted into this thread's scratch buffer when it is stored
    in another dtype (BF16, F16, F64): conversion happens in cache, on every thread."""
    if values.dtype == np.float32:
        return values
    converted = scratch(3, values.shape)
    if values.dtype.name == "bfloat16":
        return widen_bfloat16(values, converted)
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf, then refused
        np.copyto(converted, values, casting="unsafe")
    return converted


def find_non_finite(
    chunks: Iterable[np.ndarray], shape: tuple[int, ...]
) -> tuple[int, tuple[int, ...]]:
    """How many values are NaN or ±inf, and the index (in ``shape``) of the first, over a
    tensor given as consecutive chunks in C order. Values are judged as float32, so a
    float64 beyond float32's range counts too. The slow path, taken only on failure.

    >>> find_non_finite([np.array([[1.0, np.nan]]), np.array([[np.inf, 2.0]])], (2, 2))
    (2, (0, 1))
    """
    count, first, offset = 0, None, 0
    for chunk in chunks:
        bad = ~np.isfinite(as_float32(chunk))
        found = int(np.count_nonzero(bad))
        if found and first is None:
            first = offset + int(np.argmax(bad))
        count += found
        offset += bad.size
    index = tuple(int(i) for i in np.unravel_index(first or 0, shape)) if shape else ()
    return count, index


def non_finite_error(values: np.ndarray, name: str | None = None) -> NonFiniteValuesError:
    """The error for ``values`` holding NaN/±inf: count and first (N-D) index."""
    return NonFiniteValuesError.build(name, *find_non_finite([values], values.shape))


def check_fits(values: np.ndarray, target: np.dtype) -> None:
    """Refuse float32 ``values`` that do not all convert to ``target`` finitely: NaN, or
    a magnitude beyond its range.

    Raises:
        DtypeRangeError: naming ``target``.
    """
    # Conversion is monotonic, so the largest magnitude converts finitely iff all do
    # (and NaN makes the largest NaN).
    largest = np.float32(max(values.max(), -values.min()))
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(np.asarray(largest).astype(target)):
            raise DtypeRangeError(f"values exceed the range of {target.name}")
