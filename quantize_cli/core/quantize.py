"""INT8 quantization and dequantization in pure numpy (DESIGN.md §1–2).

For each group of values x (the whole tensor, one output channel, or one block of the
last axis) qz stores one float32 scale s and, for affine, one int8 zero point z:

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

from ..errors import DtypeRangeError, NonFiniteValuesError, SchemeError
from . import clip, kernels
from .fp8 import dequantize_fp8_rows, quantize_fp8_rows
from .params import qparams_from_range, round_scale_up
from .scheme import Scheme
from .search import PLAIN, Storage
from .stats import ErrorStats
from .threads import map_tiles, scratch, tile_rows

_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class QuantizedTensor:
    """INT8 codes with their scale (and zero point), as stored in a qz file.

    ``codes`` has the original shape; ``scale`` and ``zero_point`` have the shape given by
    ``scheme.scale_shape(codes.shape)``; ``zero_point`` is None for absmax.
    """

    codes: npt.NDArray[np.int8]
    scale: npt.NDArray[np.float32]
    zero_point: npt.NDArray[np.int8] | None
    scheme: Scheme

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)


@dataclass(frozen=True)
class RowResult:
    """What :func:`quantize_rows` returns for one run of rows of the 2-D row view."""

    codes: np.ndarray  # (rows, columns): int8, or uint8 for a format with a float offset
    scale: np.ndarray  # (rows, groups per row), or (1, 1) per tensor
    zero_point: npt.NDArray[np.int8] | None
    stats: ErrorStats | None
    bias: np.ndarray | None = None  # a float offset per group (core/offset.py)
    #: (min, max) of the integer codes, taken by the tiles while in cache, so that the
    #: check before writing (DESIGN §6.4) needs no pass over the chunk of its own.
    code_bounds: tuple[int, int] | None = None


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


def _check_float(array: np.ndarray) -> None:
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
        raise SchemeError(f"only floating-point values can be quantized, got {array.dtype}")


def as_float32(values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The float32 array qz computes on (float16/bfloat16/float64 are converted)."""
    array = np.asarray(values)
    _check_float(array)
    if array.dtype.name == "bfloat16":
        return _widen_bfloat16(np.ascontiguousarray(array), np.empty(array.shape, np.float32))
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused
        return np.asarray(array, dtype=np.float32, order="C")


def _widen_bfloat16(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 values as float32, into ``out``: a bfloat16 is the top half of a float32,
    so widening the bits is exact, and about three times as fast as ml_dtypes' cast."""
    np.left_shift(values.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def _float32_tile(values: np.ndarray) -> np.ndarray:
    """A tile as float32, converted into this thread's scratch buffer when it is stored
    in another dtype (BF16, F16, F64): conversion happens in cache, on every thread."""
    if values.dtype == np.float32:
        return values
    converted = scratch(3, values.shape)
    if values.dtype.name == "bfloat16":
        return _widen_bfloat16(values, converted)
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf, then refused
        np.copyto(converted, values, casting="unsafe")
    return converted


def value_range(rows: np.ndarray) -> tuple[float, float]:
    """(min, max) of a 2-D float array, tiled and threaded; raises on non-finite values.

    >>> value_range(np.array([[1.5, -2.0], [0.5, 3.0]], dtype=np.float32))
    (-2.0, 3.0)
    """
    if rows.size == 0:
        return 0.0, 0.0

    def work(tile: slice) -> tuple[float, float]:
        return kernels.float_range(_float32_tile(rows[tile]))

    try:
        ranges = map_tiles(work, rows.shape[0], tile_rows(rows.shape[1]))
    except kernels.NonFiniteInTile:
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
        values = _float32_tile(rows[tile])[:, None, :]
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
    """The range one scale per tensor is made from: the tensor's min and max, and with
    ``--clip mse`` that range shrunk by the factor of smallest squared error (the two
    stages of clip.py). ``chunks`` holds the tensor's rows in any split (a list, or a
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
    if scheme.clip == "none":
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
    negative scales, or a format's own divisor for plain absmax rounding. FP8 goes to
    fp8.py.

    >>> result = quantize_rows(np.array([[1.6, -0.7, -3.4, 1.7]], np.float32), Scheme())
    >>> result.codes.tolist(), result.scale.shape
    ([[60, -26, -127, 64]], (1, 1))
    """
    _check_float(rows)
    if rows.ndim != 2:
        raise TypeError("quantize_rows takes a 2-D array")
    rows = np.ascontiguousarray(rows)
    if scheme.method == "fp8":
        magnitude = None if tensor_range is None else max(-tensor_range[0], tensor_range[1])
        try:
            fp8_codes, fp8_scale, fp8_stats = quantize_fp8_rows(
                rows, scheme, storage.scale_dtype, magnitude, with_stats)
        except kernels.NonFiniteInTile:
            raise non_finite_error(rows) from None
        return RowResult(fp8_codes, fp8_scale, None, fp8_stats)
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

    def work(tile: slice) -> tuple[ErrorStats | None, tuple[int, int]]:
        tile_stats = None
        native = rows[tile]
        values = _float32_tile(native)
        range_source = native if range_source_is_native else values
        for (view, owned), (range_view, _), (code_view, _) in zip(
            kernels.group_views(values, scheme), kernels.group_views(range_source, scheme),
            kernels.group_views(codes[tile], scheme), strict=True,
        ):
            if per_tensor:
                view_scale = np.broadcast_to(scale, view.shape[:2])
                view_zero = None if zero_point is None else np.broadcast_to(
                    zero_point, view.shape[:2])
            else:
                view_scale, view_zero = kernels.tile_qparams(range_view, scheme, view, storage)
                scale[tile, owned] = view_scale
                if zero_point is not None and view_zero is not None:
                    zero_point[tile, owned] = view_zero
            stats = kernels.quantize_view(view, view_scale, view_zero, code_view, scheme,
                                          with_stats)
            if stats is not None:
                tile_stats = stats if tile_stats is None else tile_stats.merge(stats)
        tile_codes = codes[tile]
        return tile_stats, (int(tile_codes.min()), int(tile_codes.max()))

    try:
        results = map_tiles(work, row_count, tile_rows(columns)) if rows.size else []
    except kernels.NonFiniteInTile:
        raise non_finite_error(rows) from None
    stats = ErrorStats.total(item for item, _ in results) if with_stats else None
    bounds = ((min(low for _, (low, _) in results), max(high for _, (_, high) in results))
              if results else None)
    return RowResult(codes=codes, scale=scale, zero_point=zero_point, stats=stats,
                     code_bounds=bounds)


def dequantize_rows(
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    scheme: Scheme,
    dtype: npt.DTypeLike = np.float32,
) -> np.ndarray:
    """Inverse of :func:`quantize_rows`: the values of a run of rows, as ``dtype``.

    ``scale`` and ``zero_point`` are the row-view shaped arrays of those rows ((1, 1) per
    tensor; tile rows by tile columns for FP8 tiles). Values are computed in float32 and
    converted tile by tile.

    Raises:
        DtypeRangeError: a value does not fit ``dtype`` (float16 above 65504).
    """
    if scheme.method == "fp8":
        return dequantize_fp8_rows(codes, scale, scheme, dtype)
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
    may_overflow = bool(scale.size) and float(np.abs(scale).max()) * reach > _FLOAT32_MAX

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
            _check_fits(values, target)
            np.copyto(out[tile], values, casting="unsafe")

    map_tiles(work, codes.shape[0], tile_rows(codes.shape[1]))
    return out


def _check_fits(values: np.ndarray, target: np.dtype) -> None:
    # Conversion is monotonic, so the largest magnitude converts finitely iff all do.
    largest = np.float32(max(values.max(), -values.min()))
    with np.errstate(over="ignore"):
        if not np.isfinite(np.asarray(largest).astype(target)):
            raise DtypeRangeError(f"values exceed the range of {target.name}")


# ---------------------------------------------------------------------- whole tensors


def quantize(
    values: npt.ArrayLike, scheme: Scheme | None = None, *, name: str | None = None
) -> QuantizedTensor:
    """Quantize a floating-point array to INT8 with ``scheme`` (default absmax, block 128).

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
    _check_float(array)
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
    )


def dequantize(
    quantized: QuantizedTensor, dtype: npt.DTypeLike = np.float32
) -> np.ndarray:
    """Values back from codes: ``q·s`` (absmax) or ``(q - z)·s`` (affine), as ``dtype``.

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
    values = dequantize_rows(
        quantized.codes.reshape(row_shape),
        quantized.scale.reshape(scale_rows),
        None if zero_point is None else zero_point.reshape(scale_rows),
        scheme,
        dtype,
    )
    return values.reshape(shape)
