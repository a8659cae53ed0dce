"""Tile kernels: the per-element work of quantizing and dequantizing, on 3-D group views
(rows, groups, group length) of one tile, with reused scratch buffers.

Two tricks keep this fast in plain numpy, both exact:

* group ranges come from integer reductions over the float32 bit patterns. For finite
  floats, the int32 order of the bits of non-negative values is their float order, so
  ``max`` over the raw bits as int32 finds the largest positive value, ``max`` over them as
  uint32 finds the most negative one, and ``max`` over the bits with the sign cleared
  finds max|x|. numpy's int32 reductions along a short last axis are about three times
  faster than its float32 ones (which must propagate NaN). Any exponent of all ones (NaN or
  ±inf) shows up as bits ≥ 0x7f800000, so non-finite values are caught in the same pass.
* error statistics are computed from the scaled values before rounding: the error of each
  element is ``(y - q) · s`` with ``y = x / s + z``, so no separate dequantization pass is
  needed while the tile is in cache. (Weighting per-group sums by s instead of every
  element was tried: the extra product buffer pushes the tile out of L2 and it is slower.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .clip import search_factors
from .params import (
    PLAIN,
    Storage,
    absmax_scale,
    affine_qparams,
    qparams_from_range,
    round_scale_nearest,
    round_scale_up,
)
from .scheme import Scheme
from .search import search_groups
from .stats import ErrorStats
from .threads import scratch
from .values import FLOAT32_SAFE_MAGNITUDES, NonFiniteInTile


@dataclass(frozen=True)
class _BitLayout:
    """How to read sign-magnitude float bits as integers, for one storage width."""

    signed: type  # the int view: its max is the largest non-negative value
    unsigned: type  # the uint view: its max is the most negative value, if any
    magnitude_mask: int
    non_finite: int  # exponent all ones: NaN or ±inf at or above this magnitude
    to_float32: Callable[[np.ndarray], np.ndarray]  # magnitudes (unsigned) → float32


_LAYOUTS = {
    "float32": _BitLayout(np.int32, np.uint32, 0x7FFFFFFF, 0x7F800000,
                          lambda bits: bits.astype(np.uint32).view(np.float32)),
    # bfloat16 is the top half of a float32, and float16 converts exactly: both read
    # half the bytes of their float32 conversion.
    "bfloat16": _BitLayout(np.int16, np.uint16, 0x7FFF, 0x7F80,
                           lambda bits: (bits.astype(np.uint32) << 16).view(np.float32)),
    "float16": _BitLayout(np.int16, np.uint16, 0x7FFF, 0x7C00,
                          lambda bits: bits.astype(np.uint16).view(np.float16)
                          .astype(np.float32)),
}


def has_bit_layout(dtype: np.dtype) -> bool:
    return dtype.name in _LAYOUTS


def group_views(rows: np.ndarray, scheme: Scheme) -> Iterator[tuple[np.ndarray, slice]]:
    """Split a (r, columns) tile into 3-D (r, groups, group length) views, each with the
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


def group_magnitude(groups: np.ndarray) -> np.ndarray:
    """max|x| per group of a float32, bfloat16 or float16 view, as float32 of shape
    ``groups.shape[:-1]``.

    Raises:
        NonFiniteInTile: a group holds NaN or ±inf.
    """
    layout = _LAYOUTS[groups.dtype.name]
    bits = scratch(0, groups.shape, layout.signed)  # the slot quantize_view fills next
    np.bitwise_and(groups.view(layout.signed), layout.signed(layout.magnitude_mask), out=bits)
    top = bits.max(axis=-1)
    if top.size and top.max() >= layout.non_finite:
        raise NonFiniteInTile
    return layout.to_float32(top)


def group_range(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min(min x, 0), max(max x, 0)) per group of a float32, bfloat16 or float16 view,
    as float32 of shape ``groups.shape[:-1]``.

    Both come from reductions over the raw bits, with no pass that writes: as a signed
    integer the largest pattern is the largest positive value; as unsigned it is the most
    negative value (sign bit set, largest magnitude) whenever the group has one.

    Raises:
        NonFiniteInTile: a group holds NaN or ±inf.
    """
    layout = _LAYOUTS[groups.dtype.name]
    highest = groups.view(layout.signed).max(axis=-1)
    lowest = groups.view(layout.unsigned).max(axis=-1)
    mask = layout.unsigned(layout.magnitude_mask)
    magnitude_of_lowest = lowest & mask
    has_negative = lowest > mask
    if highest.size and (highest.max() >= layout.non_finite
                         or (magnitude_of_lowest * has_negative).max() >= layout.non_finite):
        raise NonFiniteInTile
    # Patterns on the wrong side of zero mean "no value there": the range includes 0.
    high = layout.to_float32(np.maximum(highest, 0))
    low = -layout.to_float32(np.where(has_negative, magnitude_of_lowest, 0))
    return low, high


def float_range(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of a whole tile, refusing non-finite values (for per-tensor scales)."""
    low = float(values.min())
    high = float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise NonFiniteInTile
    return low, high


def quantize_view(
    groups: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    codes: np.ndarray,
    scheme: Scheme,
    with_stats: bool,
    storage: Storage = PLAIN,
) -> ErrorStats | None:
    """Write the codes of ``groups`` (scale/zero point per group, broadcastable) into
    ``codes``; return the error statistics of the view when asked."""
    scaled = scratch(0, groups.shape)
    divisor = np.where(scale == 0, np.float32(1), scale)[..., None]
    np.divide(groups, divisor, out=scaled)
    if zero_point is not None:
        np.add(scaled, zero_point[..., None].astype(np.float32), out=scaled)
    # Plain absmax needs no clip: |x| ≤ max|x| and s ≥ max|x|/127 keep |x / s| ≤
    # 127.0000x, which rounds into [-127, 127]. Affine, any clipped scale, and a format's
    # own rule (which may round its scale down) need one.
    needs_clip = not scheme.symmetric or scheme.clip != "none" or storage.divisor is not None
    lowest, highest = storage.code_range(scheme)
    if not needs_clip or not with_stats:
        if needs_clip:  # clipping before rounding equals clipping after: integer bounds
            np.clip(scaled, lowest, highest, out=scaled)
        # Rounding straight into the int8 codes saves a pass.
        np.rint(scaled, out=codes, casting="unsafe")
        if not with_stats:
            return None
        rounded: np.ndarray = codes
    else:
        # With statistics, the unclipped y stays: the error is measured against it.
        rounded = scratch(2, groups.shape)
        np.rint(scaled, out=rounded)
        np.clip(rounded, lowest, highest, out=rounded)
        np.copyto(codes, rounded, casting="unsafe")
    error = scaled  # x - x̂ = s · (x / s + z - q)
    np.subtract(scaled, rounded, out=error)
    np.multiply(error, divisor, out=error)
    return view_stats(groups, error, float(np.max(scale)) if scale.size else 0.0)


@dataclass(frozen=True)
class Measured:
    """One candidate grid's outcome over a (rows, groups, length) view: its per-group
    parameters (scale, bias, …), and per value its codes and error x − x̂."""

    parameters: tuple[np.ndarray, ...]
    codes: np.ndarray
    error: np.ndarray


def best_per_group(candidates: Iterator[Measured]) -> Measured:
    """Per group, the candidate of smallest squared error (the first on ties).
    Candidates are compared as they come, so that only two are held at a time; a later
    one's codes and errors are copied over the first's arrays in the groups it wins, so
    each candidate must bring arrays of its own."""
    best = next(candidates)
    energy = _energy(best.error)
    parameters = best.parameters
    for candidate in candidates:
        candidate_energy = _energy(candidate.error)
        better = candidate_energy < energy
        if better.any():
            _copy_groups(best.codes, candidate.codes, better)
            _copy_groups(best.error, candidate.error, better)
            parameters = tuple(np.where(better, new, old)
                               for new, old in zip(candidate.parameters, parameters,
                                                   strict=True))
            energy = np.where(better, candidate_energy, energy)
    return Measured(parameters, best.codes, best.error)


def _energy(error: np.ndarray) -> np.ndarray:
    energy: np.ndarray = np.einsum("...i,...i->...", error, error, dtype=np.float64)
    return energy


def _copy_groups(target: np.ndarray, source: np.ndarray, chosen: np.ndarray) -> None:
    """Copy the groups where ``chosen`` (rows, groups) is true: as whole runs of memory
    for groups of 32 values and more (twice as fast as a masked copy), masked below
    (short runs cost more to gather than to mask)."""
    if source.shape[-1] >= 32:
        target[chosen] = source[chosen]
    else:
        np.copyto(target, source, where=chosen[..., None])


def view_stats(groups: np.ndarray, error: np.ndarray, largest_scale: float) -> ErrorStats:
    values = groups.reshape(-1)  # a copy only for the view of a short tail block
    flat_error = error.reshape(-1)
    magnitude = largest_scale * 256  # bounds |x| for both methods
    low, high = FLOAT32_SAFE_MAGNITUDES
    if magnitude and not low < magnitude < high:
        values, flat_error = values.astype(np.float64), flat_error.astype(np.float64)
    signal = float(np.dot(values, values))
    error_energy = float(np.dot(flat_error, flat_error))
    cross_error = float(np.dot(values, flat_error))
    # x̂ = x - e: Σx·x̂ = Σx² - Σx·e and Σx̂² = Σx² - 2Σx·e + Σe², without forming x̂.
    return ErrorStats(
        count=int(values.size),
        signal_energy=signal,
        error_energy=error_energy,
        dequantized_energy=max(signal - 2.0 * cross_error + error_energy, 0.0),
        cross_energy=signal - cross_error,
        max_abs_error=float(max(flat_error.max(), -flat_error.min())) if values.size else 0.0,
    )


def dequantize_view(
    codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, out: np.ndarray
) -> None:
    """``out = q · s`` or ``(q - z) · s`` for one group view."""
    np.copyto(out, codes, casting="unsafe")
    if zero_point is not None:
        np.subtract(out, zero_point[..., None].astype(np.float32), out=out)
    np.multiply(out, scale[..., None], out=out)


def tile_qparams(
    groups: np.ndarray, scheme: Scheme, values: np.ndarray, storage: Storage = PLAIN,
    importance: np.ndarray | None = None,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Scales and zero point of every group of a view (shape ``groups.shape[:-1]``), read
    from the view's own dtype (float32, bfloat16 or float16); ``values`` is the float32
    view. Plain rounding uses the group's range; with a clip search, below 8 bits the
    error-optimal search (search.py), at 8 bits the shrink search (clip.py). Scales are
    values ``storage`` holds (rounded up where plain rounding must not clip).
    ``importance`` weights the search's error by column (search.py).

    Where a format has its own rule (``storage.divisor``), absmax gives more than one
    candidate scale: per group, :func:`quantize_best_view` keeps the one of least error
    (the first on ties), so that qz never loses to the format's own rounding."""
    if scheme.clip == "none":
        if scheme.symmetric:
            return _plain_scales(group_magnitude(groups), scheme, storage), None
        affine_scale, affine_zero = affine_qparams(*group_range(groups), scheme.bits)
        return [round_scale_up(affine_scale, storage.scale_dtype)], affine_zero
    low, high = group_range(groups)
    if scheme.bits < 8:
        searched, zero_point = search_groups(values, low, high, scheme, storage, importance)
        if scheme.clip == "mse" and zero_point is None and storage.divisor is not None:
            # With a format's own rule, plain rounding's scales need not be among the
            # search's candidates, and a search must never lose to plain rounding (found
            # by hypothesis: [3, 4] at 4 bits in compressed-tensors).
            return [searched, *_plain_scales(np.maximum(-low, high), scheme, storage)], None
        return [searched], zero_point
    if scheme.symmetric:
        magnitude = np.maximum(-low, high)
        low, high = -magnitude, magnitude
    factor = search_factors(values, low, high, scheme.method)
    clipped_scale, zero_point = qparams_from_range(low * factor, high * factor, scheme.method)
    return [round_scale_up(clipped_scale, storage.scale_dtype)], zero_point


def _plain_scales(magnitude: np.ndarray, scheme: Scheme, storage: Storage) -> list[np.ndarray]:
    """Plain absmax rounding's scales: max|x| / 127 (or 7, …) rounded up to a stored
    value, and the format's own rule (``storage.divisor``) where it has one."""
    scale = round_scale_up(absmax_scale(magnitude, scheme.bits), storage.scale_dtype)
    if storage.divisor is None:
        return [scale]
    return [scale, round_scale_nearest(absmax_scale(magnitude, scheme.bits, storage.divisor),
                                       storage.scale_dtype)]


def quantize_best_view(
    groups: np.ndarray,
    scales: list[np.ndarray],
    codes: np.ndarray,
    scheme: Scheme,
    with_stats: bool,
    storage: Storage = PLAIN,
) -> tuple[np.ndarray, ErrorStats | None]:
    """:func:`quantize_view` of absmax with several candidate scales per group: the scale
    whose codes give the smallest squared error (the first on ties) and its codes, written
    into ``codes``; the view's error statistics when asked. Each candidate's codes and
    errors are made once."""
    lowest, highest = storage.code_range(scheme)

    def measured() -> Iterator[Measured]:
        for number, candidate in enumerate(scales):
            divisor = np.where(candidate == 0, np.float32(1), candidate)[..., None]
            rounded = scratch(2 if number == 0 else 0, groups.shape)
            np.divide(groups, divisor, out=rounded)
            np.rint(rounded, out=rounded)
            np.clip(rounded, lowest, highest, out=rounded)
            error = scratch(4 if number == 0 else 1, groups.shape)
            np.multiply(rounded, candidate[..., None], out=error)
            np.subtract(groups, error, out=error)
            yield Measured((candidate,), rounded, error)

    best = best_per_group(measured())
    (scale,) = best.parameters
    np.copyto(codes, best.codes, casting="unsafe")
    if not with_stats:
        return scale, None
    return scale, view_stats(groups, best.error, float(np.max(scale)) if scale.size else 0.0)
