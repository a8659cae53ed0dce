"""Error-optimal scales below 8 bits: for each group, search the scale (and zero point)
that minimises its squared error, never worse than rounding to nearest.

At 4 bits plain rounding wastes much of the 16 codes: the largest magnitude gets the
largest code whatever the rest of the group looks like. The search is llama.cpp's idea
(``make_qx_quants``, ``make_qkx2_quants``) in vectorised numpy: a few starting grids, then
for the codes each one gives, the closed-form least-squares scale (and offset), which is
the best grid for those codes. Every candidate's error is computed exactly, from sums,
for the scale and zero point as the format stores them (rounded to its dtype), and the
best is kept; the plain rounding grid is always a candidate, so no group gets worse.

* symmetric (absmax): codes in [-2^(b-1), 2^(b-1) - 1] ([-8, 7] at 4 bits). Starts: plain
  rounding (s = max|x| / 7 at 4 bits, refitted too), and the group's extreme mapped to
  2^(b-1) + 0.5 code steps (8.5 at 4 bits). When the format allows negative scales the
  extreme goes to the negative side, where -8 lies (as ggml's Q4_0 does); otherwise past
  7, where it is clipped.
* affine with an integer zero point (compressed-tensors): starts at plain rounding and at
  90% of its range; the zero point is rounded and the scale refitted for it.
* affine with a fractional zero point (qz, and MLX's float bias): x̂ = s·q + b is a free
  line through the codes; starts at plain rounding and at 90% of the group's own
  min..max range, each refitted twice (codes, then scale and offset, then codes again).

``clip="weighted"`` weights every element by the group's RMS plus its magnitude (llama.cpp's
``make_qkx2_quants`` weights), which keeps the largest weights closer at some cost in
plain squared error; benchmarks/README.md compares both, on weights and on a real model.
"""

from __future__ import annotations

import functools

import numpy as np

from .params import Storage, absmax_scale, affine_qparams, round_scale_up
from .scheme import Scheme
from .threads import scratch
from .values import FLOAT32_TINY

#: Starting points of the symmetric search: the group's extreme goes to 2^(b−1) plus this
#: many code steps from zero (8.5 at 4 bits), so that it may land on the lowest code.
SYMMETRIC_BEYOND = (0.5,)
#: Starting points of the affine search: the range as a fraction of the full one.
AFFINE_SHRINK = 0.9
#: Least-squares refits of each fractional-zero-point start.
REFITS = 1

def search_groups(values: np.ndarray, low: np.ndarray, high: np.ndarray, scheme: Scheme,
                  storage: Storage, importance: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """The scale (float32, of values the storage dtype holds) and zero point (int8, or
    float32 for a fractional one; None for absmax) of every group of a float32
    (rows, groups, length) view; ``low`` ≤ 0 ≤ ``high`` are the groups' ranges.
    ``importance`` (broadcastable to the view: one value per column) weights each value's
    squared error by how much it matters to the layer's output, the mean square of its
    input column over calibration data (llama.cpp's imatrix); the error minimised is then
    the layer's output error, as far as the input columns are uncorrelated.

    >>> x = np.random.default_rng(0).standard_normal((1, 2, 128)).astype(np.float32)
    >>> scale, _ = search_groups(x, x.min(-1), x.max(-1), Scheme("absmax", bits=4),
    ...                          Storage())
    >>> [round(float(v), 2) for v in (np.abs(x).max(-1) / scale)[0]]  # plain rounding: 7
    [8.55, 8.51]
    """
    sums = _Sums(values, weighted=scheme.clip == "weighted", importance=importance)
    if scheme.symmetric:
        return _symmetric(values, low, high, scheme, storage, sums), None
    if storage.zero_point == "integer":
        return _affine_integer(values, low, high, scheme, storage, sums)
    return _affine_float(values, low, high, scheme, storage, sums)


class _Sums:
    """The weighted sums from which a candidate's least-squares fit and error follow."""

    def __init__(self, values: np.ndarray, weighted: bool,
                 importance: np.ndarray | None = None) -> None:
        self.values = values
        # Sums over a group (≤ a few thousand values) are taken in float32, which is
        # plenty to rank candidates, and combined in float64.
        weights = None
        if weighted:
            rms = np.sqrt(np.einsum("...i,...i->...", values, values) / values.shape[-1])
            weights = rms[..., None] + np.abs(values)
        if importance is not None:
            weights = np.broadcast_to(importance, values.shape).astype(np.float32) * (
                1 if weights is None else weights)
        if weights is not None:
            self.weights: np.ndarray | None = weights
            self.weighted_values = self.weights * values
            self.total = _total(self.weights)
        else:
            self.weights = None
            self.weighted_values = values
            self.total = np.full(values.shape[:-1], values.shape[-1], dtype=np.float64)
        self.xx = np.einsum("...i,...i->...", self.weighted_values, values).astype(np.float64)
        self.zero = np.zeros(values.shape[:-1])

    @functools.cached_property
    def x(self) -> np.ndarray:
        """Σw·x (only offsets need it: a symmetric search never reads the values again)."""
        return _total(self.weighted_values)

    def of_codes(self, codes: np.ndarray,
                 symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Σw·q, Σw·q², Σw·x·q), as float64 (Σw·q is 0 for a symmetric fit, which does
        not use it)."""
        weighted_codes = codes if self.weights is None else self.weights * codes
        return (self.zero if symmetric else _total(weighted_codes),
                np.einsum("...i,...i->...", weighted_codes, codes).astype(np.float64),
                np.einsum("...i,...i->...", self.weighted_values, codes).astype(np.float64))

    def error(self, scale: np.ndarray, offset: np.ndarray | None,
              codes_sums: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """Σw·(x − s·q − b)² for those codes, expanded into the sums (b = 0: None)."""
        q, qq, xq = codes_sums
        s = scale.astype(np.float64)
        error: np.ndarray = self.xx - 2 * s * xq + s * s * qq
        if offset is not None:
            b = offset.astype(np.float64)
            error += self.total * b * b - 2 * b * self.x + 2 * s * b * q
        return error


def _total(values: np.ndarray) -> np.ndarray:
    """Σ along the last axis, as float64 (einsum: three times numpy's sum on short rows)."""
    total: np.ndarray = np.einsum("...i->...", values).astype(np.float64)
    return total


def _stored(scale: np.ndarray, storage: Storage) -> np.ndarray:
    """A scale as the format will hold it (nearest), as float32; a non-zero scale is at
    least float32's smallest normal number, as plain rounding's is (params.py)."""
    scale = np.nan_to_num(scale.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    scale = np.where((scale != 0) & (np.abs(scale) < FLOAT32_TINY),
                     np.copysign(FLOAT32_TINY, scale), scale)
    if storage.scale_dtype == np.float32:
        return scale
    return scale.astype(storage.scale_dtype).astype(np.float32)


def _codes(values: np.ndarray, scale: np.ndarray, shift: np.ndarray | float,
           lowest: int, highest: int) -> np.ndarray:
    """The codes of the grid nearest to each value: clip(rint(x / s + shift)), in this
    thread's scratch buffer. (x times 1/s: a candidate's codes need not be the exact
    quotient's; the final codes are made by the kernel with a true division.)"""
    inverse = (np.float32(1) / np.where(scale == 0, np.float32(1), scale))[..., None]
    codes = scratch(4, values.shape)
    np.multiply(values, inverse.astype(np.float32), out=codes)
    if np.ndim(shift):
        np.add(codes, np.asarray(shift, dtype=np.float32)[..., None], out=codes)
    np.rint(codes, out=codes)
    return np.clip(codes, lowest, highest, out=codes)


class _Best:
    """The candidate of smallest error so far, per group. A later candidate must beat the
    best by more than the rounding of the sums (a millionth of the group's energy), so
    that plain rounding, offered first, keeps every tie."""

    def __init__(self, sums: _Sums) -> None:
        shape = sums.xx.shape
        self.margin = sums.xx * 1e-6
        self.error = np.full(shape, np.inf)
        self.scale = np.zeros(shape, dtype=np.float32)
        self.zero_point = np.zeros(shape, dtype=np.float32)

    def offer(self, error: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> None:
        better = error < self.error - self.margin
        self.error = np.where(better, error, self.error)
        self.scale = np.where(better, scale, self.scale)
        self.zero_point = np.where(better, zero_point, self.zero_point)


def _least_squares_scale(sums: tuple[np.ndarray, np.ndarray, np.ndarray],
                         fallback: np.ndarray) -> np.ndarray:
    _, qq, xq = sums
    return np.where(qq > 0, xq / np.where(qq > 0, qq, 1), fallback)


def _symmetric(values: np.ndarray, low: np.ndarray, high: np.ndarray, scheme: Scheme,
               storage: Storage, sums: _Sums) -> np.ndarray:
    lowest, highest = scheme.code_range
    magnitude = np.maximum(-low, high)
    zero = np.zeros(magnitude.shape, dtype=np.float32)  # the zero point a _Best records
    best = _Best(sums)
    plain = round_scale_up(absmax_scale(magnitude, scheme.bits, storage.divisor),
                           storage.scale_dtype)
    extreme = np.where(-low > high, low, high)  # signed: the value of largest magnitude
    half = 1 << (scheme.bits - 1)
    starts = [plain] + [_stored((-extreme if storage.negative_scales else magnitude)
                                / np.float32(half + beyond), storage)
                        for beyond in SYMMETRIC_BEYOND]
    for number, start in enumerate(starts):
        codes = _codes(values, start, 0.0, lowest, highest)
        code_sums = sums.of_codes(codes, symmetric=True)
        if number == 0:
            best.offer(sums.error(start, None, code_sums), start, zero)
        refitted = _stored(_least_squares_scale(code_sums, start), storage)
        if not storage.negative_scales:
            refitted = np.abs(refitted)
        best.offer(sums.error(refitted, None, code_sums), refitted, zero)
    return best.scale


def _affine_integer(values: np.ndarray, low: np.ndarray, high: np.ndarray, scheme: Scheme,
                    storage: Storage, sums: _Sums) -> tuple[np.ndarray, np.ndarray]:
    lowest, highest = scheme.code_range
    best = _Best(sums)
    for shrink in (1.0, AFFINE_SHRINK):
        scale, zero_point = affine_qparams((low * shrink).astype(np.float32),
                                           (high * shrink).astype(np.float32), scheme.bits)
        scale = round_scale_up(scale, storage.scale_dtype)
        zero_point = zero_point.astype(np.float32)
        codes = _codes(values, scale, zero_point, lowest, highest)
        code_sums = sums.of_codes(codes)
        if shrink == 1.0:  # plain rounding
            best.offer(sums.error(scale, -zero_point * scale, code_sums), scale, zero_point)
        line_scale, line_offset = _least_squares_line(sums, code_sums, scale, -zero_point * scale)
        refitted_zero = np.clip(np.rint(-line_offset / np.where(line_scale == 0, 1, line_scale)),
                                lowest, highest).astype(np.float32)
        # The best scale for the codes with that integer zero point.
        q, qq, xq = code_sums
        centred = qq - 2 * refitted_zero * q + refitted_zero ** 2 * sums.total
        refitted = _stored(np.where(centred > 0, (xq - refitted_zero * sums.x)
                                    / np.where(centred > 0, centred, 1), scale), storage)
        refitted = np.abs(refitted)
        best.offer(sums.error(refitted, -refitted_zero * refitted, code_sums), refitted,
                   refitted_zero)
    return best.scale, best.zero_point.astype(np.int8)


def _affine_float(values: np.ndarray, low: np.ndarray, high: np.ndarray, scheme: Scheme,
                  storage: Storage, sums: _Sums) -> tuple[np.ndarray, np.ndarray]:
    lowest, highest = scheme.code_range
    best = _Best(sums)
    plain_scale, plain_zero = affine_qparams(low.astype(np.float32), high.astype(np.float32),
                                             scheme.bits)
    plain_scale = round_scale_up(plain_scale, storage.scale_dtype)
    shrunk_scale = _stored((high - low) * np.float32(AFFINE_SHRINK / scheme.levels), storage)
    # x̂ = s·(q − z) = s·q + b with b = −z·s; starts given as (scale, offset).
    starts = [(plain_scale, -plain_zero.astype(np.float32) * plain_scale),
              (shrunk_scale, low * np.float32(AFFINE_SHRINK) - lowest * shrunk_scale)]
    for number, (scale, offset) in enumerate(starts):
        for refit in range(REFITS):
            zero_point = -offset / np.where(scale == 0, 1, scale)
            codes = _codes(values, scale, zero_point, lowest, highest)
            code_sums = sums.of_codes(codes)
            if number == 0 and refit == 0:  # plain rounding
                best.offer(sums.error(scale, offset, code_sums), scale,
                           plain_zero.astype(np.float32))
            line_scale, line_offset = _least_squares_line(sums, code_sums, scale, offset)
            scale = _stored(np.abs(line_scale), storage)
            offset = np.where(line_scale < 0, offset, line_offset).astype(np.float32)
        zero_point = -offset / np.where(scale == 0, 1, scale)
        best.offer(sums.error(scale, offset, code_sums), scale, zero_point)
    return best.scale, best.zero_point


def _least_squares_line(sums: _Sums, code_sums: tuple[np.ndarray, np.ndarray, np.ndarray],
                        scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scale and offset of the line s·q + b nearest (weighted) to the values for these
    codes; a group whose codes are all equal keeps the given ones."""
    q, qq, xq = code_sums
    determinant = sums.total * qq - q * q
    solvable = determinant > 1e-12 * np.maximum(sums.total * qq, 1e-300)
    safe = np.where(solvable, determinant, 1)
    fitted_scale = np.where(solvable, (sums.total * xq - q * sums.x) / safe, scale)
    fitted_offset = np.where(solvable, (sums.x - fitted_scale * q) / np.where(
        sums.total > 0, sums.total, 1), offset)
    return fitted_scale.astype(np.float32), fitted_offset.astype(np.float32)
