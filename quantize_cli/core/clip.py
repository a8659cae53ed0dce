"""Error-optimal clipping (``--clip mse``): shrink each group's range when that lowers the
group's squared error.

Rounding to nearest with the full min/max range wastes most of the 256 codes on a few
outliers when a group's values are heavy-tailed. Shrinking the range by a factor f (the
absmax scale, or both ends of the affine range, toward 0) clips those outliers but
rounds everything else more finely. This is the idea of llama.cpp's ``make_qx_quants``
(which searches perturbed inverse scales) and of the MSE observer of compressed-tensors
(which grid-searches shrink factors of min/max). Here the search is vectorised over all
groups of a tile at once, in two stages:

* a coarse grid, f ∈ {1, 0.9, 0.75, 0.6, 0.45, 0.3} (finer near 1, where per-channel and
  block optima lie; per-tensor optima of heavy-tailed weights lie near 0.4), then
* for each group, the two points halfway to its best point's neighbours on the grid
  (at an end of the grid: halfway and a quarter of the way to its one neighbour),

eight evaluations in all. The unshrunk range (f = 1) is always a candidate and a shrunk
one must be strictly better, so a group's error never gets worse. Errors are measured
exactly as the stored result will have them: codes from the kernel's float32 arithmetic,
values dequantized in float32, squares summed in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .params import qparams_from_range
from .scheme import code_range

#: Shrink factors of the first stage, largest first.
COARSE_FACTORS = (1.0, 0.9, 0.75, 0.6, 0.45, 0.3)


def group_errors(
    groups: np.ndarray, low: np.ndarray, high: np.ndarray, factor: np.ndarray, method: str,
    bits: int = 8,
) -> np.ndarray:
    """Σ(x - x̂)² per group (float64, shape ``groups.shape[:-1]``) when each group's range
    [low, high] is shrunk by its ``factor``; ``groups`` is a float32 (r, g, n) view."""
    scale, zero_point = qparams_from_range(low * factor, high * factor, method, bits)
    divisor = np.where(scale == 0, np.float32(1), scale)[..., None]
    lowest, highest = code_range(method, bits)
    codes = groups / divisor
    if zero_point is not None:
        codes += zero_point[..., None].astype(np.float32)
    np.rint(codes, out=codes)
    np.clip(codes, lowest, highest, out=codes)
    if zero_point is not None:
        codes -= zero_point[..., None].astype(np.float32)
    with np.errstate(over="ignore"):
        error = groups - codes * scale[..., None]
        squared: np.ndarray = np.add.reduce(error * error, axis=-1, dtype=np.float64)
    if not np.isfinite(squared).all():
        # Values near ±3.4e38 give errors (or their squares) beyond float32: redo in float64.
        error64 = groups.astype(np.float64) - codes.astype(np.float64) * scale[..., None]
        squared = np.add.reduce(error64 * error64, axis=-1)
    return squared


def search_factors(
    groups: np.ndarray, low: np.ndarray, high: np.ndarray, method: str
) -> np.ndarray:
    """The shrink factor (float32, one per group) with the smallest squared error.

    One group of 65,536 heavy-tailed values (Student-t, 3 degrees of freedom): clipping
    the largest 0.1% gains more on all the others than it costs on them.

    >>> x = np.random.default_rng(0).standard_t(3, (1, 1, 65536)).astype(np.float32)
    >>> magnitude = np.abs(x).max(-1)
    >>> round(float(search_factors(x, -magnitude, magnitude, "absmax")[0, 0]), 3)
    0.825
    """
    best = np.ones(low.shape, dtype=np.float32)
    best_error = group_errors(groups, low, high, best, method)
    for factor in COARSE_FACTORS[1:]:
        best, best_error = _keep_better(groups, low, high, method, best, best_error,
                                        np.full(low.shape, factor, dtype=np.float32))
    for candidate in _refinements(best):
        best, best_error = _keep_better(groups, low, high, method, best, best_error, candidate)
    return best


def _keep_better(
    groups: np.ndarray, low: np.ndarray, high: np.ndarray, method: str,
    best: np.ndarray, best_error: np.ndarray, candidate: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    error = group_errors(groups, low, high, candidate, method)
    better = error < best_error  # strictly: ties keep the wider range
    return np.where(better, candidate, best), np.where(better, error, best_error)


def _refinements(best: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the two second-stage factors around its best coarse factor."""
    grid = np.array(COARSE_FACTORS, dtype=np.float32)
    index = np.abs(grid[:, None] - best.reshape(1, -1)).argmin(axis=0).reshape(best.shape)
    larger = grid[np.maximum(index - 1, 0)]
    smaller = grid[np.minimum(index + 1, grid.size - 1)]
    at_top, at_bottom = index == 0, index == grid.size - 1
    toward_larger = np.where(at_top, (3 * best + smaller) / 4, (best + larger) / 2)
    toward_smaller = np.where(at_bottom, (3 * best + larger) / 4, (best + smaller) / 2)
    return toward_larger.astype(np.float32), toward_smaller.astype(np.float32)


def refined_factors(best: float) -> list[float]:
    """The second-stage candidates around a best coarse factor (one whole tensor)."""
    return [float(f[0]) for f in _refinements(np.array([best], dtype=np.float32))]


def search_tensor_factor(errors_of: Callable[[list[float]], Sequence[float]]) -> float:
    """The two-stage search for one whole-tensor factor; ``errors_of(factors)`` measures
    the tensor's squared error for each factor (one pass over its data)."""
    factors = list(COARSE_FACTORS)
    best, best_error = pick_factor(factors, list(errors_of(factors)))
    refined = refined_factors(best)
    best, _ = pick_factor([best, *refined], [best_error, *errors_of(refined)])
    return best


def pick_factor(factors: list[float], errors: list[float]) -> tuple[float, float]:
    """(factor, error) with the smallest error; on ties, the largest factor."""
    order = sorted(zip(errors, [-f for f in factors], strict=True))
    error, negative = order[0]
    return -negative, error
