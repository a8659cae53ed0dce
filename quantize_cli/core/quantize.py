"""Quantization and dequantization in pure numpy (DESIGN.md §1–2): the entry points for
every scheme, and the integer codes themselves.

Integer codes (absmax, affine) are made here; float elements (FP8, NVFP4, MXFP4, MXFP8)
in floats.py; codes with a float offset in the weight's dtype (MLX) in offset.py. For
8-bit integers, for each group of values x (the whole tensor, one output channel, or one
block of the last axis) qz stores one float32 scale s and, for affine, one int8 zero point z:

    absmax   s = max|x| / 127                  q = clip(rint(x / s), -127, 127)      x̂ = q·s
    affine   lo = min(min x, 0), hi = max(max x, 0)
             s = (hi - lo) / 255
             z = clip(rint(-128 - lo / s), -128, 127)
                                                q = clip(rint(x / s + z), -128, 127)  x̂ = (q - z)·s

``np.rint`` rounds half to even, everywhere. A group whose range is zero gets s = 0, z = 0
and q = 0, and dequantizes exactly. Per element, |x - x̂| ≤ s/2 (plus float rounding).

How the numbers are computed, where the formulas leave a choice:

* values are float32; float64 input is converted to float32 first (its range then has to
  fit float32, otherwise the conversion gives ±inf and the tensor is refused);
* s and z are derived from each group's float32 min and max in float64 and s is then
  rounded once to float32, so s is the correctly rounded value of the formula (a plain
  float32 ``(hi - lo) / 255`` would overflow for ranges beyond 3.4e38);
* a non-zero range whose scale would underflow float32's normal range gets the smallest
  normal float32 as its scale, so the bound |x - x̂| ≤ s/2 keeps holding for tiny values;
* x / s is a true float32 division (not a multiplication by 1/s), as the formula says.

The work is done on a 2-D row view in which no group crosses a row (see
``Scheme.row_view_shape``), in tiles that keep their temporaries in the CPU cache, spread
over a small thread pool (``threads.py``); the per-element work is in ``kernels.py`` and
the scale and zero-point formulas in ``params.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import DtypeRangeError, NonFiniteValuesError
from . import clip, kernels
from .floats import dequantize_float_rows, quantize_float_rows
from .offset import dequantize_offset, quantize_offset_rows
from .params import PLAIN, Storage, qparams_from_range, round_scale_up
from .rows import QuantizedRows, RowResult
from .scheme import Scheme
from .stats import ErrorStats
from .threads import map_tiles, scratch, tile_rows
from .values import (
    FLOAT32_MAX,
    NonFiniteInTile,
    check_fits,
    check_float,
    float32_tile,
    non_finite_error,
)


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes with their scale (and zero point), as stored in a qz file.

    ``codes`` has the original shape; ``scale`` and ``zero_point`` have the shape given by
    ``scheme.scale_shape(codes.shape)``; ``zero_point`` is None for absmax;
    ``global_scale`` is NVFP4's scale of the whole tensor (None otherwise).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: npt.NDArray[np.int8] | None
    scheme: Scheme
    global_scale: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)


def value_range(rows: np.ndarray) -> tuple[float, float]:
    """(min, max) of a 2-D float array, tiled and threaded; raises on non-finite values.

    >>> value_range(np.array([[1.5, -2.0], [0.5, 3.0]], dtype=np.float32))
    (-2.0, 3.0)
    """
    if rows.size == 0:
        return 0.0, 0.0

    def work(tile: slice) -> tuple[float, float]:
        return kernels.float_range(float32_tile(rows[tile]))

    try:
        ranges = map_tiles(work, rows.shape[0], tile_rows(rows.shape[1]))
    except NonFiniteInTile:
        raise non_finite_error(rows) from None
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def tensor_errors(
    rows: np.ndarray, value_range_: tuple[float, float], method: str, factors: list[float],
    bits: int = 8,
) -> np.ndarray:
    """Σ(x - x̂)² over ``rows`` (float64, one per factor) with the whole-tensor range
    shrunk by each factor: the per-tensor form of the ``--clip mse`` search, summed over
    row chunks by :func:`per_tensor_range`. Each tile is read once for all factors, on the
    thread pool.
    """
    low, high = (np.full((1, 1), bound, dtype=np.float32) for bound in value_range_)

    def work(tile: slice) -> np.ndarray:
        values = float32_tile(rows[tile])[:, None, :]
        return np.array([
            clip.group_errors(values, np.broadcast_to(low, values.shape[:2]),
                              np.broadcast_to(high, values.shape[:2]),
                              np.full(values.shape[:2], factor, dtype=np.float32),
                              method, bits).sum()
            for factor in factors
        ])

    if rows.size == 0:
        return np.zeros(len(factors))
    totals: np.ndarray = np.sum(map_tiles(work, rows.shape[0], tile_rows(rows.shape[1])),
                                axis=0)
    return totals


def per_tensor_range(chunks: Iterable[np.ndarray], scheme: Scheme) -> tuple[float, float]:
    """The range one scale per tensor is made from: the tensor's min and max, and for
    integer codes with ``--clip mse`` that range shrunk by the factor of smallest squared
    error (the two stages of clip.py). ``chunks`` holds the tensor's rows in any split (a list, or a
    stream that can be read again): it is iterated once for the range and once for each
    stage of the search.

    >>> per_tensor_range([np.array([[1.5, -2.0]], np.float32), np.array([[3.0]], np.float32)],
    ...                  Scheme("absmax", "tensor", clip="none"))
    (-2.0, 3.0)

    Raises:
        NonFiniteValuesError: a value is NaN or ±inf (counted in the chunk it was found in).
    """
    low, high = math.inf, -math.inf
    for chunk in chunks:
        chunk_low, chunk_high = value_range(chunk)
        low, high = min(low, chunk_low), max(high, chunk_high)
    if low > high:  # no values
        low = high = 0.0
    if scheme.clip == "none" or scheme.element.is_float:
        return low, high

    def errors(factors: list[float]) -> list[float]:
        return list(np.sum([tensor_errors(chunk, (low, high), scheme.method, factors,
                                          scheme.bits) for chunk in chunks], axis=0))

    factor = clip.search_tensor_factor(errors)
    return low * factor, high * factor


def quantize_rows(
    rows: np.ndarray,
    scheme: Scheme,
    *,
    tensor_range: tuple[float, float] | None = None,
    with_stats: bool = False,
    storage: Storage = PLAIN,
    importance: np.ndarray | None = None,
) -> RowResult:
    """Quantize a run of rows of a tensor's 2-D row view (see ``Scheme.row_view_shape``).

    ``rows`` may be float32, float64, float16 or bfloat16; values are converted to float32
    tile by tile. Because no group crosses a row, quantizing a tensor in row chunks gives
    exactly the bytes of quantizing it whole. Per-tensor granularity needs the range of
    the whole tensor (``tensor_range``, from :func:`per_tensor_range` over all chunks);
    without it the range of ``rows`` is used; a given range must come from
    :func:`per_tensor_range` over the same values, which is also what refuses non-finite
    values. ``with_stats`` also returns the error statistics, computed while each tile is
    still in cache. ``storage`` says what the format holds: scales in another dtype (they
    are rounded to it, up where plain rounding must not clip), fractional zero points,
    negative scales, a format's own divisor for plain absmax rounding, an offset in the
    weight's dtype (MLX: offset.py), NVFP4's global scale. Float elements go to floats.py.
    For NVFP4, ``tensor_range`` gives the magnitude its global scale is made from.
    ``importance`` (one value per column: the mean square of each input over calibration
    data) weights the scale search's error below 8 bits by what each column does to the
    layer's output (search.py).

    >>> result = quantize_rows(np.array([[1.6, -0.7, -3.4, 1.7]], np.float32), Scheme())
    >>> result.codes.tolist(), result.scale.shape
    ([[60, -26, -127, 64]], (1, 1))
    """
    check_float(rows)
    if rows.ndim != 2:
        raise TypeError("quantize_rows takes a 2-D array")
    rows = np.ascontiguousarray(rows)
    if storage.offset:
        return quantize_offset_rows(rows, scheme, with_stats=with_stats)
    if scheme.element.is_float:
        magnitude = None if tensor_range is None else max(-tensor_range[0], tensor_range[1])
        try:
            return quantize_float_rows(rows, scheme, storage, magnitude, with_stats)
        except NonFiniteInTile:
            raise non_finite_error(rows) from None
    row_count, columns = rows.shape
    codes = np.empty(rows.shape, dtype=np.int8)
    per_tensor = scheme.granularity == "tensor"
    fractional = storage.zero_point == "float" and not scheme.symmetric
    if per_tensor:
        if tensor_range is None:
            tensor_range = per_tensor_range([rows], scheme)
        low, high = tensor_range
        tensor_scale, tensor_zero = qparams_from_range(low, high, scheme.method, scheme.bits)
        scale = round_scale_up(tensor_scale, storage.scale_dtype).reshape(1, 1)
        zero_point = None if tensor_zero is None else tensor_zero.reshape(1, 1)
        if zero_point is not None and fractional:
            zero_point = zero_point.astype(np.float32)
    else:
        groups = scheme.groups_per_row(columns)
        scale = np.empty((row_count, groups), dtype=np.float32)
        zero_point = None if scheme.symmetric else np.empty(
            (row_count, groups), np.float32 if fractional else np.int8)

    # Group ranges are read from the stored bits where they can be (BF16, F16: half the
    # bytes); float64 is read after conversion.
    range_source_is_native = kernels.has_bit_layout(rows.dtype)

    weights = (list(kernels.group_views(np.asarray(importance, np.float32)[None, :], scheme))
               if importance is not None else None)

    def work(tile: slice) -> tuple[ErrorStats | None, tuple[int, int]]:
        tile_stats = None
        native = rows[tile]
        values = float32_tile(native)
        range_source = native if range_source_is_native else values
        for number, ((view, owned), (range_view, _), (code_view, _)) in enumerate(zip(
            kernels.group_views(values, scheme), kernels.group_views(range_source, scheme),
            kernels.group_views(codes[tile], scheme), strict=True,
        )):
            if per_tensor:
                view_scale = np.broadcast_to(scale, view.shape[:2])
                view_zero = None if zero_point is None else np.broadcast_to(
                    zero_point, view.shape[:2])
                stats = kernels.quantize_view(view, view_scale, view_zero, code_view, scheme,
                                              with_stats, storage)
            else:
                view_scales, view_zero = kernels.tile_qparams(
                    range_view, scheme, view, storage,
                    None if weights is None else weights[number][0])
                if len(view_scales) == 1:
                    view_scale = view_scales[0]
                    stats = kernels.quantize_view(view, view_scale, view_zero, code_view,
                                                  scheme, with_stats, storage)
                else:
                    view_scale, stats = kernels.quantize_best_view(
                        view, view_scales, code_view, scheme, with_stats, storage)
                scale[tile, owned] = view_scale
                if zero_point is not None and view_zero is not None:
                    zero_point[tile, owned] = view_zero
            if stats is not None:
                tile_stats = stats if tile_stats is None else tile_stats.merge(stats)
        tile_codes = codes[tile]
        return tile_stats, (int(tile_codes.min()), int(tile_codes.max()))

    try:
        results = map_tiles(work, row_count, tile_rows(columns)) if rows.size else []
    except NonFiniteInTile:
        raise non_finite_error(rows) from None
    stats = ErrorStats.total(item for item, _ in results) if with_stats else None
    bounds = ((min(low for _, (low, _) in results), max(high for _, (_, high) in results))
              if results else None)
    return RowResult(codes=codes, scale=scale, zero_point=zero_point, stats=stats,
                     code_bounds=bounds)


def dequantize_rows(rows: QuantizedRows, scheme: Scheme,
                    dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """Inverse of :func:`quantize_rows`: the values of a run of rows, as ``dtype``.

    ``rows.scale`` and ``rows.zero_point`` are the row-view shaped arrays of those rows
    ((1, 1) per tensor; tile rows by tile columns for FP8 tiles). Integer codes are
    dequantized in float32, tile by tile; a float offset (``rows.bias``) in the dtype of
    its scales, as MLX computes it (offset.py); float elements as floats.py says.

    >>> result = quantize_rows(np.array([[0.0, 0.5, -1.0, 2.0]], np.float32),
    ...                        Scheme("affine", "channel"))
    >>> [round(float(v), 4) for v in dequantize_rows(result, Scheme("affine", "channel"))[0]]
    [0.0, 0.5059, -1.0, 2.0]

    Raises:
        DtypeRangeError: a value does not fit ``dtype`` (float16 above 65504).
    """
    if rows.bias is not None:
        return dequantize_offset(rows.codes, rows.scale, rows.bias, scheme.block_size or 1,
                                 rows.scale.dtype).astype(dtype)
    if scheme.element.is_float:
        return dequantize_float_rows(rows.codes, rows.scale, scheme, dtype, rows.global_scale)
    codes, scale, zero_point = rows.codes, rows.scale, rows.zero_point
    codes = np.ascontiguousarray(codes)
    target = np.dtype(dtype)
    out = np.empty(codes.shape, dtype=target)
    if codes.size == 0:
        return out
    scale = np.asarray(scale, dtype=np.float32)
    per_tensor = scheme.granularity == "tensor"

    # |x̂| ≤ (255 + |z|)·|s|: only scales this large (a damaged file, or values near
    # float32's limit) can overflow, and only then is each tile checked.
    reach = 256 + (float(np.abs(zero_point).max()) if zero_point is not None
                   and zero_point.size else 0)
    may_overflow = bool(scale.size) and float(np.abs(scale).max()) * reach > FLOAT32_MAX

    def work(tile: slice) -> None:
        values = out[tile] if target == np.float32 else scratch(3, out[tile].shape)
        for (code_view, owned), (out_view, _) in zip(
            kernels.group_views(codes[tile], scheme), kernels.group_views(values, scheme),
            strict=True,
        ):
            if per_tensor:
                view_scale = np.broadcast_to(scale, code_view.shape[:2])
                view_zero = None if zero_point is None else np.broadcast_to(
                    zero_point, code_view.shape[:2])
            else:
                view_scale = scale[tile, owned]
                view_zero = None if zero_point is None else zero_point[tile, owned]
            if may_overflow:
                with np.errstate(over="ignore"):
                    kernels.dequantize_view(code_view, view_scale, view_zero, out_view)
                if not np.isfinite(out_view).all():
                    raise DtypeRangeError("values exceed the range of float32")
            else:
                kernels.dequantize_view(code_view, view_scale, view_zero, out_view)
        if target != np.float32:
            check_fits(values, target)
            np.copyto(out[tile], values, casting="unsafe")

    map_tiles(work, codes.shape[0], tile_rows(codes.shape[1]))
    return out


# ---------------------------------------------------------------------- whole tensors


def quantize(
    values: npt.ArrayLike, scheme: Scheme | None = None, *, name: str | None = None
) -> QuantizedTensor:
    """Quantize a floating-point array with ``scheme`` (default INT8 absmax, block 128).

    The worked example (DESIGN §1): absmax over the whole tensor.

    >>> x = np.array([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2], dtype=np.float32)
    >>> qt = quantize(x, Scheme("absmax", "tensor"))
    >>> qt.codes.tolist()
    [33, -14, -70, 35, -59, 10, 47, 127]
    >>> bool(qt.scale[0] == np.float32(6.2) / np.float32(127))
    True

    Raises:
        NonFiniteValuesError: ``values`` holds NaN or ±inf (the message gives the count
            and the first index; ``name`` names the tensor).
        SchemeError: the scheme cannot apply (e.g. channel granularity on a scalar).
    """
    scheme = scheme or Scheme()
    array = np.asarray(values)
    check_float(array)
    shape = tuple(array.shape)
    scale_shape = scheme.scale_shape(shape)
    row_shape = scheme.row_view_shape(shape)
    try:
        result = quantize_rows(array.reshape(row_shape), scheme)
    except NonFiniteValuesError:
        raise non_finite_error(array, name) from None
    zero_point = None if result.zero_point is None else result.zero_point.reshape(scale_shape)
    return QuantizedTensor(
        codes=result.codes.reshape(shape),
        scale=result.scale.reshape(scale_shape),
        zero_point=zero_point,
        scheme=scheme,
        global_scale=result.global_scale,
    )


def dequantize(
    quantized: QuantizedTensor, dtype: npt.DTypeLike = np.float32
) -> np.ndarray:
    """Values back from codes: ``q·s`` (absmax, FP8 and the microscaling types, whose
    ``s`` is decoded from its E4M3 or E8M0 form) or ``(q - z)·s`` (affine), as ``dtype``.

    >>> x = np.array([[0.0, 0.5, -1.0, 2.0]], dtype=np.float32)
    >>> qt = quantize(x, Scheme("affine", "channel"))
    >>> qt.codes.tolist(), qt.zero_point.tolist()
    ([[-43, 0, -128, 127]], [[-43]])
    >>> [round(float(v), 4) for v in dequantize(qt).ravel()]
    [0.0, 0.5059, -1.0, 2.0]

    Raises:
        DtypeRangeError: a value does not fit ``dtype``.
    """
    scheme = quantized.scheme
    shape = quantized.shape
    rows, _ = row_shape = scheme.row_view_shape(shape)
    groups = 1 if scheme.granularity == "tensor" else scheme.groups_per_row(row_shape[1])
    scale_rows = ((1, 1) if scheme.granularity == "tensor" else
                  quantized.scale.shape if scheme.tiles else (rows, groups))
    zero_point = quantized.zero_point
    rows_of = QuantizedRows(
        quantized.codes.reshape(row_shape), quantized.scale.reshape(scale_rows),
        None if zero_point is None else zero_point.reshape(scale_rows),
        global_scale=quantized.global_scale)
    return dequantize_rows(rows_of, scheme, dtype).reshape(shape)
