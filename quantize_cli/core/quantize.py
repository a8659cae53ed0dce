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
``Scheme.row_view_shape``), in tiles of about ``TILE_ELEMENTS`` values so that the
temporaries stay in the CPU cache, and with the tiles spread over a small thread pool:
numpy releases the GIL inside its loops, so threads give real parallelism here.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import DtypeRangeError, NonFiniteValuesError, SchemeError
from .scheme import Scheme
from .stats import ErrorStats, _stats_of

#: Values per tile: 64 Ki float32 (256 KiB) plus a same-sized scratch buffer fit in L2.
TILE_ELEMENTS = 1 << 16

_FLOAT32_TINY = np.float32(np.finfo(np.float32).tiny)
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

    codes: npt.NDArray[np.int8]  # (rows, columns)
    scale: npt.NDArray[np.float32]  # (rows, groups per row), or (1, 1) per tensor
    zero_point: npt.NDArray[np.int8] | None
    stats: ErrorStats | None


# --------------------------------------------------------------------------- threads

_num_threads = 0
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_scratch = threading.local()


def _default_num_threads() -> int:
    configured = os.environ.get("QZ_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_num_threads(count: int) -> None:
    """Use ``count`` threads for quantizing (default: the CPUs this process may use,
    or the ``QZ_NUM_THREADS`` environment variable)."""
    global _num_threads, _executor
    if count < 1:
        raise ValueError("count must be at least 1")
    with _executor_lock:
        if _executor is not None:
            _executor.shutdown(wait=True)
            _executor = None
        _num_threads = count


def get_num_threads() -> int:
    global _num_threads
    if _num_threads == 0:
        _num_threads = _default_num_threads()
    return _num_threads


def _map_tiles(work: Callable[[slice], object], rows: int, tile_rows: int) -> list[object]:
    tiles = [slice(start, min(start + tile_rows, rows)) for start in range(0, rows, tile_rows)]
    threads = get_num_threads()
    if threads == 1 or len(tiles) <= 1:
        return [work(tile) for tile in tiles]
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qz")
        executor = _executor
    # Contiguous runs of tiles per task keep the per-task overhead small.
    per_task = max(1, math.ceil(len(tiles) / (threads * 4)))
    batches = [tiles[i : i + per_task] for i in range(0, len(tiles), per_task)]
    results = executor.map(lambda batch: [work(tile) for tile in batch], batches)
    return [result for batch in results for result in batch]


def _scratch_buffer(slot: int, size: int) -> np.ndarray:
    """A per-thread float32 buffer reused across tiles (no allocation in the hot loop)."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(slot)
    if buffer is None or buffer.size < size:
        buffer = buffers[slot] = np.empty(max(size, TILE_ELEMENTS), dtype=np.float32)
    return buffer[:size]


def _tile_rows(columns: int) -> int:
    return max(1, TILE_ELEMENTS // max(columns, 1))


# ------------------------------------------------------------------------ parameters


def qparams_from_range(
    low: npt.ArrayLike, high: npt.ArrayLike, method: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int8] | None]:
    """Scale (and zero point) of groups whose values span [low, high] (DESIGN §1).

    >>> scale, zero_point = qparams_from_range(-0.5, 2.0, "affine")
    >>> float(scale), int(zero_point)
    (0.009803921915590763, -77)
    >>> float(qparams_from_range(-3.4, 6.2, "absmax")[0]) == 6.2 / 127
    False
    >>> qparams_from_range(0.0, 0.0, "affine")
    (array(0., dtype=float32), array(0, dtype=int8))
    """
    low64 = np.minimum(np.asarray(low, dtype=np.float64), 0.0)
    high64 = np.maximum(np.asarray(high, dtype=np.float64), 0.0)
    if method == "absmax":
        exact = np.maximum(-low64, high64) / 127.0
    else:
        exact = (high64 - low64) / 255.0
    scale = exact.astype(np.float32)
    scale = np.where((exact > 0) & (scale < _FLOAT32_TINY), _FLOAT32_TINY, scale)
    zero_point = _zero_point(low64, scale, method)
    # At the very top of float32's range, a scale rounded up would make the extreme code
    # dequantize to infinity (127 · fl(3.4028235e38 / 127) overflows): round it down.
    reach = np.maximum(127 - zero_point, zero_point + (127 if method == "absmax" else 128))
    overflow = reach * scale.astype(np.float64) > _FLOAT32_MAX
    if np.any(overflow):
        scale = np.where(overflow, np.nextafter(scale, np.float32(0)), scale)
        zero_point = _zero_point(low64, scale, method)
        _check_finite_grid(low64, high64, scale, zero_point, method)
    if method == "absmax":
        return scale, None
    return scale, zero_point.astype(np.int8)


def _check_finite_grid(
    low64: np.ndarray, high64: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
    method: str,
) -> None:
    """Refuse groups whose extreme values would dequantize to infinity.

    This happens only for values within half a step of float32's largest value
    (±3.4e38), where the rounded zero point pushes the grid past the float32 range; no
    finite grid of that step can honour the s/2 bound there. The check mirrors the
    kernel's float32 arithmetic on the group's extremes, which bound every other value.
    """
    lowest, highest = (-127, 127) if method == "absmax" else (-128, 127)
    safe = np.where(scale == 0, np.float32(1), scale)
    zero32 = zero_point.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for extreme in (low64.astype(np.float32), high64.astype(np.float32)):
            codes = np.clip(np.rint(extreme / safe + zero32), lowest, highest)
            if not np.isfinite((codes - zero32) * scale).all():
                raise SchemeError(
                    f"{method} cannot quantize values this close to the float32 limit "
                    "(±3.4e38): the grid would overflow",
                    hint="use absmax, which represents the extreme values exactly",
                )


def _zero_point(low64: np.ndarray, scale: np.ndarray, method: str) -> np.ndarray:
    """z = clip(rint(-128 - lo / s), -128, 127) in float64; 0 for absmax and zero ranges."""
    if method == "absmax":
        return np.zeros(scale.shape)
    nonzero = scale > 0
    divisor = np.where(nonzero, scale, np.float32(1)).astype(np.float64)
    return np.where(nonzero, np.clip(np.rint(-128.0 - low64 / divisor), -128, 127), 0.0)


def _finite_range(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low = groups.min(axis=-1)
    high = groups.max(axis=-1)
    # min/max propagate NaN and keep ±inf, so one check of the small range arrays finds
    # any non-finite value without another pass over the data.
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise _NonFinite
    return low, high


class _NonFinite(Exception):
    """Raised inside a tile; turned into NonFiniteValuesError with the whole-chunk count."""


def non_finite_error(values: np.ndarray, name: str | None = None) -> NonFiniteValuesError:
    """The error for ``values`` holding NaN/±inf: count and first (N-D) index."""
    bad = ~np.isfinite(values)
    count = int(np.count_nonzero(bad))
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), values.shape))
    return NonFiniteValuesError.build(name, count, first)


# -------------------------------------------------------------------------- kernels


def _group_views(
    rows: np.ndarray, scheme: Scheme
) -> Iterator[tuple[np.ndarray, slice]]:
    """Split a (r, columns) tile into 3-D (r, groups, group_length) views, each with the
    slice of the tile's scale columns it owns. A short tail block gets its own view."""
    columns = rows.shape[1]
    if scheme.granularity != "block":
        yield rows[:, None, :], slice(0, 1)
        return
    size = scheme.block_size
    assert size is not None
    full = columns // size
    if full:
        yield rows[:, : full * size].reshape(rows.shape[0], full, size), slice(0, full)
    if columns % size:
        yield rows[:, full * size :][:, None, :], slice(full, full + 1)


def _quantize_group_view(
    groups: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    codes: np.ndarray,
    lowest: int,
    highest: int,
) -> None:
    scaled = _scratch_buffer(0, groups.size).reshape(groups.shape)
    divisor = np.where(scale == 0, np.float32(1), scale)[..., None]
    np.divide(groups, divisor, out=scaled)
    if zero_point is not None:
        np.add(scaled, zero_point[..., None].astype(np.float32), out=scaled)
    np.rint(scaled, out=scaled)
    np.clip(scaled, lowest, highest, out=scaled)
    np.copyto(codes, scaled, casting="unsafe")


def _dequantize_group_view(
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    out: np.ndarray,
) -> None:
    np.copyto(out, codes, casting="unsafe")
    if zero_point is not None:
        np.subtract(out, zero_point[..., None].astype(np.float32), out=out)
    np.multiply(out, scale[..., None], out=out)


def value_range(rows: np.ndarray) -> tuple[float, float]:
    """(min, max) of a float32 array, tiled and threaded; raises on non-finite values.

    >>> value_range(np.array([[1.5, -2.0], [0.5, 3.0]], dtype=np.float32))
    (-2.0, 3.0)
    """
    matrix = rows.reshape(rows.shape[0], -1) if rows.ndim else rows.reshape(1, 1)
    if matrix.size == 0:
        return 0.0, 0.0

    def tile_range(tile: slice) -> tuple[float, float]:
        low, high = _finite_range(matrix[tile].reshape(1, -1))
        return float(low[0]), float(high[0])

    try:
        ranges = _map_tiles(tile_range, matrix.shape[0], _tile_rows(matrix.shape[1]))
    except _NonFinite:
        raise non_finite_error(rows) from None
    return min(r[0] for r in ranges), max(r[1] for r in ranges)  # type: ignore[index]


def quantize_rows(
    rows: npt.NDArray[np.float32],
    scheme: Scheme,
    *,
    tensor_range: tuple[float, float] | None = None,
    with_stats: bool = False,
) -> RowResult:
    """Quantize a run of rows of a tensor's 2-D row view (see ``Scheme.row_view_shape``).

    Because no group crosses a row, quantizing a tensor in row chunks gives exactly the
    bytes of quantizing it whole. Per-tensor granularity needs the range of the whole
    tensor (``tensor_range``, from :func:`value_range` over all chunks); without it the
    range of ``rows`` is used; a given range must come from :func:`value_range` over the
    same values, which is also what refuses non-finite values. ``with_stats`` also returns the error statistics, computed
    while each tile is still in cache.

    >>> result = quantize_rows(np.array([[1.6, -0.7, -3.4, 1.7]], np.float32), Scheme())
    >>> result.codes.tolist(), result.scale.shape
    ([[60, -26, -127, 64]], (1, 1))
    """
    if rows.dtype != np.float32 or rows.ndim != 2:
        raise TypeError("quantize_rows takes a 2-D float32 array")
    rows = np.ascontiguousarray(rows)
    row_count, columns = rows.shape
    lowest, highest = scheme.code_range
    codes = np.empty(rows.shape, dtype=np.int8)

    if scheme.granularity == "tensor":
        low, high = tensor_range if tensor_range is not None else value_range(rows)
        tensor_scale, tensor_zero = qparams_from_range(low, high, scheme.method)
        scale = tensor_scale.reshape(1, 1)
        zero_point = None if tensor_zero is None else tensor_zero.reshape(1, 1)
    else:
        groups = scheme.groups_per_row(columns)
        scale = np.empty((row_count, groups), dtype=np.float32)
        zero_point = None if scheme.symmetric else np.empty((row_count, groups), np.int8)

    def work(tile: slice) -> ErrorStats | None:
        values = rows[tile]
        tile_codes = codes[tile]
        for (view, columns_of_scale), (code_view, _) in zip(
            _group_views(values, scheme), _group_views(tile_codes, scheme)
        ):
            if scheme.granularity == "tensor":
                view_scale = np.broadcast_to(scale, view.shape[:2])
                view_zero = None if zero_point is None else np.broadcast_to(
                    zero_point, view.shape[:2]
                )
            else:
                low, high = _finite_range(view)
                view_scale, view_zero = qparams_from_range(low, high, scheme.method)
                scale[tile, columns_of_scale] = view_scale
                if zero_point is not None:
                    zero_point[tile, columns_of_scale] = view_zero
            _quantize_group_view(view, view_scale, view_zero, code_view, lowest, highest)
        if not with_stats:
            return None
        dequantized = _scratch_buffer(1, values.size).reshape(values.shape)
        _dequantize_tile(tile_codes, scale, zero_point, scheme, tile, dequantized)
        return _stats_of(values.ravel(), dequantized.ravel())

    try:
        tile_stats = _map_tiles(work, row_count, _tile_rows(columns)) if rows.size else []
    except _NonFinite:
        raise non_finite_error(rows) from None
    stats = None
    if with_stats:
        stats = ErrorStats()
        for item in tile_stats:
            assert isinstance(item, ErrorStats)
            stats = stats.merge(item)
    return RowResult(codes=codes, scale=scale, zero_point=zero_point, stats=stats)


def _dequantize_tile(
    tile_codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    scheme: Scheme,
    tile: slice,
    out: np.ndarray,
) -> None:
    for (code_view, columns_of_scale), (out_view, _) in zip(
        _group_views(tile_codes, scheme), _group_views(out, scheme)
    ):
        if scheme.granularity == "tensor":
            view_scale = np.broadcast_to(scale, code_view.shape[:2])
            view_zero = None if zero_point is None else np.broadcast_to(
                zero_point, code_view.shape[:2]
            )
        else:
            view_scale = scale[tile, columns_of_scale]
            view_zero = None if zero_point is None else zero_point[tile, columns_of_scale]
        _dequantize_group_view(code_view, view_scale, view_zero, out_view)


def dequantize_rows(
    codes: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
    zero_point: npt.NDArray[np.int8] | None,
    scheme: Scheme,
) -> npt.NDArray[np.float32]:
    """Inverse of :func:`quantize_rows`: float32 values of a run of rows.

    ``scale`` and ``zero_point`` are the row-view shaped arrays of those rows ((1, 1) per
    tensor).
    """
    codes = np.ascontiguousarray(codes)
    out = np.empty(codes.shape, dtype=np.float32)
    if codes.size == 0:
        return out
    scale = np.asarray(scale, dtype=np.float32)

    def work(tile: slice) -> None:
        _dequantize_tile(codes[tile], scale, zero_point, scheme, tile, out[tile])

    _map_tiles(work, codes.shape[0], _tile_rows(codes.shape[1]))
    return out


# ---------------------------------------------------------------------- whole tensors


def as_float32(values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The float32 array qz computes on (float16/bfloat16/float64 are converted)."""
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
        raise SchemeError(f"only floating-point values can be quantized, got {array.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused
        return np.asarray(array, dtype=np.float32, order="C")


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
    array = as_float32(values)
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
    """
    scheme = quantized.scheme
    shape = quantized.shape
    rows, _ = row_shape = scheme.row_view_shape(shape)
    groups = 1 if scheme.granularity == "tensor" else scheme.groups_per_row(row_shape[1])
    scale_rows = (1, 1) if scheme.granularity == "tensor" else (rows, groups)
    zero_point = quantized.zero_point
    values = dequantize_rows(
        quantized.codes.reshape(row_shape),
        quantized.scale.reshape(scale_rows),
        None if zero_point is None else zero_point.reshape(scale_rows),
        scheme,
    )
    return cast_checked(values.reshape(shape), dtype)


def cast_checked(values: npt.NDArray[np.float32], dtype: npt.DTypeLike) -> np.ndarray:
    """``values`` as ``dtype``, refusing values that overflow it (float16 above 65504).

    Raises:
        DtypeRangeError: a finite value would become infinite.
    """
    with np.errstate(over="ignore"):
        converted = values.astype(dtype, copy=False)
    if not np.isfinite(converted).all():
        raise DtypeRangeError(f"values exceed the range of {np.dtype(dtype).name}")
    return converted
