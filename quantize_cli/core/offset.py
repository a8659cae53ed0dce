"""Quantization with a float offset per group, as MLX stores it: unsigned codes
q ∈ [0, 2^bits − 1] with a scale s and a bias b per group, both kept in the weight's
dtype T, and x̂ = T(T(q · s) + b): the product and the sum are each rounded to T, which is
how ``mlx.core.dequantize`` computes them (each operation in float32, then rounded).

Because the bias is a float, the grid need not contain 0, and qz may choose s and b
better than MLX's own rule. For each group three candidates are measured with the
arithmetic above and the one of smallest squared error is kept:

* the group's full range: b = min x (a value of the group, so exact in T) and s = the
  range / (2^bits − 1) rounded *up* to T, so that the grid covers the range;
* MLX's rule (``mlx/backend/cpu/quantized.cpp``): the extreme of larger magnitude is
  made exact and 0 falls on a code; s may be negative; codes chosen with MLX's float32
  scale, as ``mlx.core.quantize`` does;
* MLX's rule with the codes chosen for the scale and bias as stored.

Keeping MLX's own result among the candidates makes qz's error never worse than
``mlx.core.quantize``'s on any group. absmax uses a symmetric grid instead:
b = −2^(bits−1) · s, exact in T.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .kernels import Measured, best_per_group, group_views, view_stats
from .params import Storage, round_scale_up
from .rows import RowResult
from .scheme import Scheme
from .search import search_groups
from .stats import ErrorStats
from .threads import map_tiles, tile_rows
from .values import NonFiniteInTile, non_finite_error

#: MLX's floor for the magnitude of a scale (its ``eps``).
MLX_EPS = np.float32(1e-7)


def dequantize_offset(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                      block_size: int, dtype: npt.DTypeLike) -> np.ndarray:
    """x̂ = T(T(q · s) + b) for (rows, columns) codes and (rows, groups) scales and biases
    of groups of ``block_size`` along the rows, in T = ``dtype``.

    >>> import ml_dtypes
    >>> bf16 = np.dtype(ml_dtypes.bfloat16)
    >>> dequantize_offset(np.array([[255]], np.uint8), np.array([[0.01]], bf16),
    ...                   np.array([[-1.0]], bf16), 1, bf16).astype(np.float32).tolist()
    [[1.546875]]
    """
    grouped = codes.reshape(codes.shape[0], -1, block_size)
    return _dequantize_groups(grouped, scale, bias, np.dtype(dtype)).reshape(codes.shape)


def _dequantize_groups(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                       dtype: np.dtype) -> np.ndarray:
    """:func:`dequantize_offset` of a (rows, groups, length) view."""
    product = (codes * scale[..., None].astype(np.float32)).astype(dtype)
    return (product.astype(np.float32) + bias[..., None].astype(np.float32)).astype(dtype)


def quantize_offset_rows(rows: np.ndarray, scheme: Scheme, *,
                         with_stats: bool = False) -> RowResult:
    """Quantize a run of rows (in the weight's own dtype T) in groups of
    ``scheme.block_size`` along the last axis, with ``scheme.bits``; ``scheme.method``
    affine chooses s and b per group as described above, absmax uses the symmetric grid.
    With a clip search (the default below 8 bits) the error-optimal search of search.py
    is one more candidate.

    >>> import ml_dtypes
    >>> x = np.linspace(-0.5, 1.0, 64, dtype=np.float32).astype(ml_dtypes.bfloat16)[None]
    >>> result = quantize_offset_rows(x, Scheme("affine", "block", 64))
    >>> int(result.codes.min()), int(result.codes.max()), float(result.bias[0, 0])
    (0, 255, -0.5)
    """
    rows = np.ascontiguousarray(rows)
    dtype = rows.dtype
    row_count, columns = rows.shape
    groups = scheme.groups_per_row(columns)
    codes = np.empty(rows.shape, dtype=np.uint8)
    scale = np.empty((row_count, groups), dtype=dtype)
    bias = np.empty((row_count, groups), dtype=dtype)

    def work(tile: slice) -> ErrorStats | None:
        tile_stats = None
        values = rows[tile].astype(np.float32)
        for (view, owned), (code_view, _) in zip(group_views(values, scheme),
                                                 group_views(codes[tile], scheme),
                                                 strict=True):
            if not np.isfinite(view).all():
                raise NonFiniteInTile
            view_codes, view_scale, view_bias, error = _best(
                view, _candidates(view, scheme, dtype), scheme.levels, dtype)
            code_view[...] = view_codes
            scale[tile, owned] = view_scale
            bias[tile, owned] = view_bias
            if with_stats:
                largest = float(np.abs(view_scale.astype(np.float32)).max()) if view.size else 0
                stats = view_stats(view, error, largest)
                tile_stats = stats if tile_stats is None else tile_stats.merge(stats)
        return tile_stats

    try:
        results = map_tiles(work, row_count, tile_rows(columns)) if rows.size else []
    except NonFiniteInTile:
        raise non_finite_error(rows) from None
    return RowResult(codes, scale, bias=bias,
                     stats=ErrorStats.total(results) if with_stats else None)


@dataclass(frozen=True)
class _Candidate:
    """One way of choosing a group's grid: the float32 scale and bias its codes are
    chosen with (MLX chooses codes with its unrounded float32 scale), and the scale and
    bias stored in T, with which they are dequantized."""

    code_scale: np.ndarray
    code_bias: np.ndarray
    scale: np.ndarray  # in T
    bias: np.ndarray  # in T
    half: int | None = None  # the symmetric grid's codes are rint(x / s) + half


def _restored(values: np.ndarray, candidate: _Candidate, levels: int,
              dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The candidate's codes for the values (integers, in float32), and the float32
    values they stand for."""
    if candidate.half is None:
        codes = _codes_for(values, candidate.code_scale, candidate.code_bias, levels)
    else:
        divisor = np.where(candidate.code_scale == 0, 1, candidate.code_scale)[..., None]
        half = candidate.half
        codes = np.rint(values / divisor)
        np.clip(codes, 1 - half, half - 1, out=codes)
        codes += half
    return codes, _dequantize_groups(codes, candidate.scale, candidate.bias,
                                     dtype).astype(np.float32)


def _codes_for(values: np.ndarray, scale: np.ndarray, bias: np.ndarray,
               levels: int) -> np.ndarray:
    """The codes of the grid (scale, bias) nearest to each value (0 in a group of zero
    scale), as float32 integers."""
    zero = scale == 0
    divisor = np.where(zero, np.float32(1), scale)[..., None]
    codes: np.ndarray = values - bias[..., None]
    codes /= divisor
    np.rint(codes, out=codes)
    np.clip(codes, 0, levels, out=codes)
    if zero.any():
        codes[zero] = 0
    return codes


def _candidates(values: np.ndarray, scheme: Scheme, dtype: np.dtype) -> list[_Candidate]:
    levels, half = scheme.levels, 1 << (scheme.bits - 1)
    candidates = [_symmetric(values, dtype, half)] if scheme.symmetric else _affine(
        values, dtype, levels)
    if scheme.clip != "none":
        # The error-optimal search with what MLX stores: scales of either sign, a free
        # offset, both in T. Its x̂ = s·(q − z), q ∈ [−half, half − 1], is s·u + b with
        # u = q + half and b = −s·(half + z).
        low = np.minimum(values.min(axis=-1), 0)
        high = np.maximum(values.max(axis=-1), 0)
        storage = Storage(scale_dtype=dtype, zero_point="float", negative_scales=True)
        scale, zero_point = search_groups(values, low, high, scheme, storage)
        zero_point = np.zeros_like(scale) if zero_point is None else zero_point
        bias = (-scale * (np.float32(half) + zero_point)).astype(dtype)
        stored = scale.astype(dtype)
        candidates.append(_Candidate(stored.astype(np.float32), bias.astype(np.float32),
                                     stored, bias))
    return candidates


def _best(values: np.ndarray, candidates: list[_Candidate], levels: int,
          dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group, the candidate of smallest squared error (on ties the first): its codes,
    scale, bias and the error of every value."""

    def measured() -> Iterator[Measured]:
        for candidate in candidates:
            codes, restored = _restored(values, candidate, levels, dtype)
            error = np.subtract(values, restored, out=restored)
            yield Measured((candidate.scale, candidate.bias), codes, error)

    best = best_per_group(measured())
    scale, bias = best.parameters
    return best.codes.astype(np.uint8), scale, bias, best.error


def _affine(values: np.ndarray, dtype: np.dtype, levels: int) -> list[_Candidate]:
    low, high = values.min(axis=-1), values.max(axis=-1)
    # The full range: the bias is the minimum, a value of the group, so exact in T.
    full_scale = round_scale_up((high - low) / np.float32(levels), dtype).astype(dtype)
    full_bias = low.astype(dtype)
    # MLX's rule, as mlx.core.quantize computes it in float32: codes chosen with the
    # float32 scale, or with the scale and bias as stored.
    mlx_scale, mlx_bias = _mlx_parameters(low, high, levels)
    stored_scale, stored_bias = mlx_scale.astype(dtype), mlx_bias.astype(dtype)
    return [_Candidate(full_scale.astype(np.float32), low, full_scale, full_bias),
            _Candidate(mlx_scale, mlx_bias, stored_scale, stored_bias),
            _Candidate(stored_scale.astype(np.float32), stored_bias.astype(np.float32),
                       stored_scale, stored_bias)]


def _mlx_parameters(low: np.ndarray, high: np.ndarray,
                    levels: int) -> tuple[np.ndarray, np.ndarray]:
    """MLX's scale and bias in float32: s = ±max(range / levels, eps), signed so that the
    extreme of larger magnitude is the edge; s refitted so the edge is exactly a code."""
    larger_low = np.abs(low) > np.abs(high)
    scale = np.maximum((high - low) / np.float32(levels), MLX_EPS)
    scale = np.where(larger_low, scale, -scale)
    edge = np.where(larger_low, low, high)
    first = np.rint(edge / scale)
    refitted = np.where(first != 0, edge / np.where(first != 0, first, 1), scale)
    return refitted.astype(np.float32), np.where(first != 0, edge, 0).astype(np.float32)


def _symmetric(values: np.ndarray, dtype: np.dtype, half: int) -> _Candidate:
    magnitude = np.abs(values).max(axis=-1)
    scale = round_scale_up(magnitude / np.float32(half - 1), dtype).astype(dtype)
    bias = (scale.astype(np.float32) * np.float32(-half)).astype(dtype)
    return _Candidate(scale.astype(np.float32), bias.astype(np.float32), scale, bias, half)
