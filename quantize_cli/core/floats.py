"""Float elements: FP8 E4M3 with float scales, and the microscaling types NVFP4, MXFP4
and MXFP8, whose group scales are themselves small floats (elements.py).

FP8 (``fp8``): each group's values are divided by s = max|x| / 448 and stored as the
nearest E4M3 number; x̂ = q · s. E4M3 ("fn": no infinities) holds magnitudes up to 448
with 3 mantissa bits. The quotient is clamped to ±448 before the cast: ml_dtypes' cast
does not saturate (500 becomes NaN). Groups are a whole tensor, a row (channel), or
square tiles of ``block_size`` × ``block_size`` of a 2-D tensor (what vLLM and
DeepSeek-V3 call 128×128 blocks).

Microscaling (groups of 16 or 32 along the last axis): a group's scale is stored as
FP8 E4M3 (NVFP4, divided by a float32 global scale g of the tensor) or as an E8M0 power
of two (MXFP4, MXFP8). The values are E2M1 (±0, 0.5, 1, 1.5, 2, 3, 4, 6) or E4M3:

    NVFP4:  x̂ = q · (s / g)        s ∈ E4M3, g = 448 · 6 / max|W| (float32)
    MX:     x̂ = q · 2^(e − 127)    e ∈ 0..254

computed in float32 (every product of a code and a power of two is exact). With so coarse
a scale the rounding rule matters: each tool picks it differently (compressed-tensors
e4m3(g · max|x| / 6) and 2^⌊log2 max|x|⌋ / 4; MLX 2^round(log2(max|x| / 6)); llama.cpp
⌊log2 max|x|⌋ − 2), and all decode the same way. qz measures the error of the
candidates around those rules (``clip="mse"``, the default: E4M3 scales from two steps
below the plain rule to one above, E8M0 exponents e − 1, e and e + 1 where 2^e is the
smallest that needs no clipping, which covers every rule above) and keeps each group's
best; the plain rule is offered first and
wins ties, so no group is worse than the plain rule, whichever of those rules it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from ..errors import DtypeRangeError
from .kernels import Measured, best_per_group, group_magnitude, group_views, view_stats
from .params import Storage, absmax_scale, round_scale_up
from .rows import RowResult
from .scheme import Scheme
from .stats import ErrorStats
from .threads import map_tiles, scratch, tile_rows
from .values import NonFiniteInTile, check_fits, float32_tile

#: NVFP4's global scale maps the tensor's largest magnitude to the largest E4M3 scale of
#: the largest E2M1 value: g = 448 · 6 / max|W| (compressed-tensors' ``generate_gparam``).
NVFP4_GLOBAL = 448.0 * 6.0
#: E4M3 steps around the plain NVFP4 scale that the search measures (plain first).
E4M3_STEPS: tuple[int, ...] = (0, -1, -2, 1)
#: E8M0 exponents, relative to the smallest that needs no clipping, that it measures.
E8M0_STEPS: tuple[int, ...] = (0, -1, 1)
#: E8M0's bias, and its largest exponent code (255 is NaN).
E8M0_BIAS, E8M0_LARGEST = 127, 254


def decoded(element: np.dtype) -> np.ndarray:
    """The float32 value of each of the 256 byte patterns of a one-byte float element
    (E4M3, E2M1): decoding by table is 3-4 times faster than ml_dtypes' conversion."""
    key = np.dtype(element).name
    if key not in _DECODED:
        _DECODED[key] = np.arange(256, dtype=np.uint8).view(element).astype(np.float32)
    return _DECODED[key]


_DECODED: dict[str, np.ndarray] = {}


def _e2m1_values(quotient: np.ndarray) -> np.ndarray:
    """The nearest E2M1 value (ties to even) of each float32 in [−6, 6], as float32: the
    grid's step is 0.5 below 2, 1 below 4 and 2 up to 6, that is 2^(e − 1) for a value of
    binary exponent e, and never below 0.5. Computed on the float bits (the step and its
    inverse are powers of two, so x / step is exact), 4-5 times faster than choosing
    among three rounded grids and faster than ml_dtypes' conversion, with the same
    results, signed zeros included."""
    bits = quotient.view(np.uint32) & np.uint32(0x7FFFFFFF)
    exponent = np.maximum(bits >> np.uint32(23), np.uint32(127)) - np.uint32(1)
    step = (exponent << np.uint32(23)).view(np.float32)
    rounded = bits.view(np.float32) * ((np.uint32(254) - exponent) << np.uint32(23)).view(
        np.float32)
    np.rint(rounded, out=rounded)
    rounded *= step
    signed: np.ndarray = np.copysign(rounded, quotient)
    return signed


def _e2m1_codes(values: np.ndarray) -> np.ndarray:
    """The E2M1 bit patterns of E2M1 values (from :func:`_e2m1_values`): from 1 up, the
    binary exponent and the first mantissa bit; below, 0 and 0.5 are 0 and 1."""
    bits = values.view(np.uint32)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    exponent = (magnitude >> np.uint32(23)).astype(np.int32)
    normal = ((exponent - 126) << 1) | ((magnitude >> np.uint32(22)) & np.uint32(1)).astype(
        np.int32)
    small = (magnitude.view(np.float32) * np.float32(2)).astype(np.int32)
    code = np.where(exponent >= 127, normal, small).astype(np.uint8)
    return code | ((bits >> np.uint32(31)).astype(np.uint8) << 3)


def _element_values(quotient: np.ndarray, element: np.dtype) -> np.ndarray:
    """The nearest value of the element type to each clipped float32 quotient."""
    if element.itemsize == 1 and element.name.startswith("float4"):
        return _e2m1_values(quotient)
    return np.take(decoded(element), quotient.astype(element).view(np.uint8))


def _element_codes(values: np.ndarray, element: np.dtype) -> np.ndarray:
    """Values of the element type as its codes (exact)."""
    if element.name.startswith("float4"):
        return _e2m1_codes(values).view(element)
    return values.astype(element)


def global_scale(magnitude: float) -> float:
    """NVFP4's float32 scale of a tensor (or of layers a runtime fuses) of largest
    magnitude ``magnitude``; 1.0 for an all-zero tensor.

    >>> global_scale(6.0)
    448.0
    """
    if magnitude <= 0 or not math.isfinite(magnitude):
        return 1.0
    scale = np.float32(NVFP4_GLOBAL) / np.float32(magnitude)
    return float(scale) if np.isfinite(scale) else 1.0


def quantize_float_rows(rows: np.ndarray, scheme: Scheme, storage: Storage,
                        magnitude: float | None, with_stats: bool) -> RowResult:
    """Quantize a run of rows (of whole tiles, for FP8 tiles) with a float element type.
    ``magnitude`` is the whole tensor's max|x| (of the layers it is fused with, for
    NVFP4's global scale), needed for one scale per tensor and for NVFP4; without it,
    that of ``rows`` is used.

    >>> result = quantize_float_rows(np.array([[448.0, -1.0, 0.3]], np.float32),
    ...                              Scheme("fp8", "tensor"), Storage(), None, False)
    >>> result.codes.astype(np.float32).tolist(), result.scale.tolist()
    ([[448.0, -1.0, 0.3125]], [[1.0]])

    Raises:
        NonFiniteInTile: a value is NaN or ±inf.
    """
    if scheme.info.microscaling:
        return _quantize_microscaled(rows, scheme, storage, magnitude, with_stats)
    values = rows.astype(np.float32)
    if not np.isfinite(values).all():
        raise NonFiniteInTile
    row_count, columns = values.shape
    scale_dtype = storage.scale_dtype
    if scheme.granularity == "tensor":
        largest = float(np.abs(values).max(initial=0.0)) if magnitude is None else magnitude
        scale = _fp8_scale(np.array([[largest]], np.float32), scale_dtype)
    elif scheme.granularity == "channel":
        scale = _fp8_scale(np.abs(values).max(axis=1, keepdims=True, initial=0.0), scale_dtype)
    else:
        scale = _fp8_scale(tile_magnitudes(values, scheme.block_size or 1), scale_dtype)
    per_element = expand_scale(scale, scheme, values.shape)
    largest_code = scheme.element.largest
    fp8 = scheme.element.dtype()
    codes = np.empty(values.shape, dtype=fp8)

    def work(tile: slice) -> ErrorStats | None:
        tile_scale = per_element[tile]
        divisor = np.where(tile_scale == 0, np.float32(1), tile_scale)
        quotient = np.clip(values[tile] / divisor, -largest_code, largest_code)
        codes[tile] = quotient.astype(fp8)
        if not with_stats:
            return None
        error = values[tile] - np.take(decoded(fp8), codes[tile].view(np.uint8)) * tile_scale
        return view_stats(values[tile], error, float(np.abs(tile_scale).max(initial=0.0)))

    error_parts = map_tiles(work, row_count, tile_rows(columns)) if values.size else []
    return RowResult(codes, scale, stats=ErrorStats.total(error_parts) if with_stats else None)


def _fp8_scale(magnitude: np.ndarray, dtype: np.dtype) -> npt.NDArray[np.float32]:
    return round_scale_up(absmax_scale(magnitude.astype(np.float32), 8, 448.0), dtype)


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
    """The scale of every element of a (rows, columns) run, for any granularity of
    float32 scales (tiles repeat in both directions, blocks along the rows)."""
    if scheme.granularity != "block":
        return np.broadcast_to(scale, shape)
    size = scheme.block_size or 1
    expanded = np.repeat(scale, size, axis=1)[:, :shape[1]]
    if scheme.tiles:
        expanded = np.repeat(expanded, size, axis=0)[:shape[0]]
    return expanded


# ------------------------------------------------------------------------ microscaling


def _quantize_microscaled(rows: np.ndarray, scheme: Scheme, storage: Storage,
                          magnitude: float | None, with_stats: bool) -> RowResult:
    row_count, columns = rows.shape
    info = scheme.info
    groups = scheme.groups_per_row(columns)
    element = scheme.element.dtype()
    codes = np.empty(rows.shape, dtype=element)
    encoded = np.empty((row_count, groups), dtype=np.uint8)
    uses_global = info.global_scale and storage.global_scale
    if uses_global and magnitude is None:
        magnitude = float(np.abs(rows.astype(np.float32)).max(initial=0.0))
        if not math.isfinite(magnitude):
            raise NonFiniteInTile
    tensor_scale = global_scale(magnitude or 0.0) if uses_global else 1.0
    search = scheme.clip != "none"

    def work(tile: slice) -> ErrorStats | None:
        tile_stats = None
        native = rows[tile]
        values = float32_tile(native)
        for (view, owned), (range_view, _), (code_view, _) in zip(
            group_views(values, scheme), group_views(native if native.dtype.name in (
                "float32", "bfloat16", "float16") else values, scheme),
            group_views(codes[tile], scheme), strict=True,
        ):
            largest = group_magnitude(range_view)
            candidates = _scale_candidates(largest, scheme, tensor_scale, search)
            chosen, view_codes, error = _best_scales(view, candidates, scheme, tensor_scale)
            encoded[tile, owned] = chosen
            code_view[...] = view_codes
            if with_stats:
                step = decode_scale(chosen, scheme, tensor_scale)
                stats = view_stats(view, error, float(step.max(initial=0.0)))
                tile_stats = stats if tile_stats is None else tile_stats.merge(stats)
        return tile_stats

    results = map_tiles(work, row_count, tile_rows(columns)) if rows.size else []
    scale = encoded.view(_scale_dtype(scheme))
    return RowResult(codes, scale, global_scale=tensor_scale if info.global_scale else None,
                     stats=ErrorStats.total(results) if with_stats else None)


def _scale_dtype(scheme: Scheme) -> np.dtype:
    import ml_dtypes

    found: np.dtype = np.dtype(ml_dtypes.float8_e4m3fn if scheme.scale_type == "e4m3"
                               else ml_dtypes.float8_e8m0fnu)
    return found


def _scale_candidates(largest: np.ndarray, scheme: Scheme, tensor_scale: float,
                      search: bool) -> list[np.ndarray]:
    """The stored scale codes (uint8 bit patterns) each group may take, the plain rule's
    first: for E4M3, e4m3(g · max|x| / largest code) and its neighbours on the E4M3 grid;
    for E8M0, the smallest exponent that needs no clipping and its neighbours."""
    top = np.float32(scheme.element.largest)
    if scheme.scale_type == "e4m3":
        import ml_dtypes

        wanted = np.minimum(largest / top * np.float32(tensor_scale), np.float32(448))
        plain = wanted.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.int16)
        steps: tuple[int, ...] = E4M3_STEPS if search else (0,)
        # Bit patterns of non-negative E4M3 numbers are in their order; 0x7F is NaN. A
        # group that is all zeros keeps the zero scale.
        return [np.where(plain == 0, 0, np.clip(plain + step, 1, 0x7E)).astype(np.uint8)
                for step in steps]
    with np.errstate(divide="ignore"):
        exponent = np.ceil(np.log2(largest.astype(np.float64) / float(top)))
    exponent = np.where(largest > 0, exponent, 0)
    steps = E8M0_STEPS if search else (0,)
    return [np.clip(exponent + step + E8M0_BIAS, 0, E8M0_LARGEST).astype(np.uint8)
            for step in steps]


def decode_scale(encoded: np.ndarray, scheme: Scheme, tensor_scale: float) -> np.ndarray:
    """The float32 step of each group from its stored scale: s / g for E4M3 (a float32
    division, as compressed-tensors computes it), 2^(e − 127) for E8M0."""
    stored = encoded.view(_scale_dtype(scheme)).astype(np.float32)
    if scheme.scale_type == "e4m3":
        return stored / np.float32(tensor_scale)
    return stored


def _best_scales(values: np.ndarray, candidates: list[np.ndarray], scheme: Scheme,
                 tensor_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of a (rows, groups, length) view, the candidate scale of least squared
    error (the first on ties), with its codes and the error of every value."""
    element = np.dtype(scheme.element.dtype())
    top = np.float32(scheme.element.largest)

    def measured() -> Iterator[Measured]:
        for candidate in candidates:
            step = decode_scale(candidate, scheme, tensor_scale)[..., None]
            quotient = values / np.where(step == 0, np.float32(1), step)
            chosen = _element_values(np.clip(quotient, -top, top, out=quotient), element)
            error = np.multiply(chosen, step, out=quotient)
            yield Measured((candidate,), chosen, np.subtract(values, error, out=error))

    best = best_per_group(measured())
    (scale,) = best.parameters
    return scale, _element_codes(best.codes, element), best.error


# ---------------------------------------------------------------------------- reading


def dequantize_float_rows(codes: np.ndarray, scale: np.ndarray, scheme: Scheme,
                          dtype: npt.DTypeLike, tensor_scale: float | None = None
                          ) -> np.ndarray:
    """x̂ = q · s (FP8), q · (s / g) (NVFP4) or q · 2^(e − 127) (MX), computed in float32
    (exact for the microscaling types and for a float32, float16 or bfloat16 scale) and
    converted once to ``dtype``, tile by tile on the thread pool.

    Raises:
        DtypeRangeError: a value does not fit ``dtype``.
    """
    if scheme.info.microscaling:
        step = decode_scale(scale, scheme, tensor_scale or 1.0)
    else:
        step = np.asarray(scale, dtype=np.float32)
    target = np.dtype(dtype)
    out = np.empty(codes.shape, dtype=target)
    rows, columns = codes.shape
    if codes.size == 0:
        return out
    table = decoded(codes.dtype)  # every code is one byte: its value is looked up
    patterns = codes.view(np.uint8)
    per_tile = tile_rows(columns)
    if scheme.tiles:  # a tile of rows holds whole rows of scale tiles
        size = scheme.block_size or 1
        per_tile = -(-per_tile // size) * size

    def work(tile: slice) -> None:
        values = scratch(3, (tile.stop - tile.start, columns))
        np.take(table, patterns[tile], out=values)
        _scale_in_place(values, _tile_step(step, scheme, tile), scheme)
        if target == np.float32:
            if not np.isfinite(values).all():
                raise DtypeRangeError("values exceed the range of float32")
            out[tile] = values
            return
        check_fits(values, target)
        np.copyto(out[tile], values, casting="unsafe")

    with np.errstate(over="ignore", invalid="ignore"):
        map_tiles(work, rows, per_tile)
    return out


def _tile_step(step: np.ndarray, scheme: Scheme, tile: slice) -> np.ndarray:
    """The steps of the rows of ``tile`` (one per row and group; per tensor, one)."""
    if scheme.granularity == "tensor":
        return step.reshape(1, 1)
    if not scheme.tiles:
        return step[tile]
    size = scheme.block_size or 1
    rows = np.repeat(step[tile.start // size: -(-tile.stop // size)], size, axis=0)
    return rows[: tile.stop - tile.start]


def _scale_in_place(values: np.ndarray, step: np.ndarray, scheme: Scheme) -> None:
    """values ·= the step of each value's group, without expanding the steps to every
    value (a row's last group may be shorter)."""
    if scheme.granularity != "block":
        values *= step
        return
    size = scheme.block_size or 1
    rows, columns = values.shape
    whole = columns // size
    if whole:  # splitting the contiguous last axis is a view, even of a slice
        values[:, : whole * size].reshape(rows, whole, size)[...] *= step[:, :whole, None]
    if columns % size:
        values[:, whole * size:] *= step[:, whole: whole + 1]
