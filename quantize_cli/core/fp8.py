"""FP8 (E4M3) weights: each group's values divided by s = max|x| / 448 and stored as the
nearest FP8 E4M3 number; x̂ = fp8 · s.

E4M3 ("fn": no infinities) holds magnitudes up to 448 with 3 mantissa bits, so a value
keeps about 2 significant digits wherever it lies in its group's range, unlike an
integer grid. The quotient is clamped to ±448 before the cast: ml_dtypes' cast does not
saturate (500 becomes NaN), and a scale stored in a 16-bit dtype is rounded up, so that
nothing needs clamping in practice. Groups are a whole tensor, a row (channel), or square
tiles of ``block_size`` × ``block_size`` of a 2-D tensor (what vLLM and DeepSeek-V3 call
128×128 blocks).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from ..errors import DtypeRangeError
from .kernels import NonFiniteInTile, view_stats
from .params import absmax_scale, round_scale_up
from .scheme import FP8_MAX, Scheme
from .stats import ErrorStats
from .threads import map_tiles, tile_rows


def _fp8() -> np.dtype:
    """FP8 E4M3, from ml_dtypes, imported on first use: importing it costs about half a
    second, which commands that never touch FP8 values should not pay."""
    import ml_dtypes

    fp8: np.dtype = np.dtype(ml_dtypes.float8_e4m3fn)
    return fp8


def quantize_fp8_rows(
    rows: np.ndarray, scheme: Scheme, scale_dtype: np.dtype, magnitude: float | None,
    with_stats: bool,
) -> tuple[np.ndarray, npt.NDArray[np.float32], ErrorStats | None]:
    """(FP8 codes, scales, statistics) of a run of rows (of whole tiles, for tiles);
    ``magnitude`` is the whole tensor's max|x| for one scale per tensor (else that of
    ``rows``).

    >>> codes, scale, _ = quantize_fp8_rows(np.array([[448.0, -1.0, 0.3]], np.float32),
    ...                                     Scheme("fp8", "tensor"), np.dtype(np.float32),
    ...                                     None, False)
    >>> codes.astype(np.float32).tolist(), scale.tolist()
    ([[448.0, -1.0, 0.3125]], [[1.0]])

    Raises:
        NonFiniteInTile: a value is NaN or ±inf.
    """
    values = rows.astype(np.float32)
    if not np.isfinite(values).all():
        raise NonFiniteInTile
    row_count, columns = values.shape
    if scheme.granularity == "tensor":
        largest = float(np.abs(values).max(initial=0.0)) if magnitude is None else magnitude
        scale = _scale(np.array([[largest]], np.float32), scale_dtype)
    elif scheme.granularity == "channel":
        scale = _scale(np.abs(values).max(axis=1, keepdims=True, initial=0.0), scale_dtype)
    else:
        scale = _scale(tile_magnitudes(values, scheme.block_size or 1), scale_dtype)
    per_element = expand_scale(scale, scheme, values.shape)
    fp8 = _fp8()
    codes = np.empty(values.shape, dtype=fp8)

    def work(tile: slice) -> ErrorStats | None:
        tile_scale = per_element[tile]
        divisor = np.where(tile_scale == 0, np.float32(1), tile_scale)
        quotient = np.clip(values[tile] / divisor, -FP8_MAX, FP8_MAX)
        codes[tile] = quotient.astype(fp8)
        if not with_stats:
            return None
        error = values[tile] - codes[tile].astype(np.float32) * tile_scale
        return view_stats(values[tile], error, float(np.abs(tile_scale).max(initial=0.0)))

    error_parts = map_tiles(work, row_count, tile_rows(columns)) if values.size else []
    return codes, scale, ErrorStats.total(error_parts) if with_stats else None


def _scale(magnitude: np.ndarray, dtype: np.dtype) -> npt.NDArray[np.float32]:
    return round_scale_up(absmax_scale(magnitude.astype(np.float32), 8, FP8_MAX), dtype)


def tile_magnitudes(values: np.ndarray, size: int) -> np.ndarray:
    """max|x| of every size × size tile of a 2-D array (ragged at the edges)."""
    rows, columns = values.shape
    out = np.zeros((math.ceil(rows / size), math.ceil(columns / size)), dtype=np.float32)
    magnitude = np.abs(values)
    for row in range(out.shape[0]):
        band = magnitude[row * size:(row + 1) * size]
        out[row] = np.maximum.reduceat(band.max(axis=0), np.arange(0, columns, size))
    return out


def expand_scale(scale: np.ndarray, scheme: Scheme, shape: tuple[int, int]) -> np.ndarray:
    """The scale of every element of a (rows, columns) run, for any FP8 granularity."""
    if scheme.granularity != "block":
        return np.broadcast_to(scale, shape)
    size = scheme.block_size or 1
    expanded = np.repeat(np.repeat(scale, size, axis=0), size, axis=1)
    return expanded[:shape[0], :shape[1]]


def dequantize_fp8_rows(codes: np.ndarray, scale: np.ndarray, scheme: Scheme,
                        dtype: npt.DTypeLike) -> np.ndarray:
    """x̂ = fp8 · s, computed in float32 (exact for a float32, float16 or bfloat16 scale)
    and converted once to ``dtype``.

    Raises:
        DtypeRangeError: a value does not fit ``dtype``.
    """
    values = codes.astype(np.float32) * expand_scale(scale.astype(np.float32), scheme,
                                                       codes.shape)
    target = np.dtype(dtype)
    with np.errstate(over="ignore"):
        converted: np.ndarray = values.astype(target)
    if not np.isfinite(converted.astype(np.float32)).all():
        raise DtypeRangeError(f"values exceed the range of {target.name}")
    return converted
