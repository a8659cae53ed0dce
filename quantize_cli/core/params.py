"""Scale and zero point of a group from its range (DESIGN.md §1), in float64.

These run on one value per group (a few hundred per tile), so their cost is per group,
not per element.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..errors import SchemeError
from .scheme import Scheme, code_range
from .values import FLOAT32_MAX, FLOAT32_TINY


@dataclass(frozen=True)
class Storage:
    """What a format can store of a group's parameters, which limits the search: the
    scale's dtype, whether the zero point is an integer (packed codes) or a float, whether
    scales may be negative, whether NVFP4's per-tensor global scale is stored (else it is
    1), and whether codes are unsigned with an offset per group in the weight's dtype
    (MLX's affine, offset.py) instead of a zero point.

    ``divisor`` is a format's own rule for absmax, s = max|x| / divisor with every code
    of the width allowed (compressed-tensors: (2^b − 1) / 2, so 127.5 at 8 bits and 7.5
    at 4, codes in [−2^(b−1), 2^(b−1) − 1]): plain rounding keeps, per group, the better
    of qz's rule and that one, and the search starts from it."""

    scale_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    zero_point: Literal["integer", "float"] = "integer"
    negative_scales: bool = False
    divisor: float | None = None
    global_scale: bool = True
    offset: bool = False

    def code_range(self, scheme: Scheme) -> tuple[int, int]:
        """The integer codes of ``scheme`` this format holds: every code of the width
        where it has its own absmax rule (-128 at 8 bits), else the scheme's.

        >>> Storage(divisor=127.5).code_range(Scheme()), Storage().code_range(Scheme())
        ((-128, 127), (-127, 127))
        """
        if self.divisor is not None and scheme.symmetric:
            return code_range("affine", scheme.bits)
        return scheme.code_range


#: float32 scales, integer zero points: what qz's INT8 format stores.
PLAIN = Storage()


def qparams_from_range(
    low: npt.ArrayLike, high: npt.ArrayLike, method: str, bits: int = 8
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int8] | None]:
    """Scale (and zero point) of groups whose values span [low, high] (DESIGN §1), for
    codes of ``bits``.

    >>> scale, zero_point = qparams_from_range(-0.5, 2.0, "affine")
    >>> float(scale), int(zero_point)
    (0.009803921915590763, -77)
    >>> float(qparams_from_range(-3.4, 6.2, "absmax")[0]) == 6.2 / 127
    False
    >>> qparams_from_range(0.0, 0.0, "affine")
    (array(0., dtype=float32), array(0, dtype=int8))
    >>> float(qparams_from_range(-3.4, 7.0, "absmax", 4)[0])
    1.0
    """
    low32 = np.minimum(np.asarray(low, dtype=np.float32), np.float32(0))
    high32 = np.maximum(np.asarray(high, dtype=np.float32), np.float32(0))
    if method == "absmax":
        return absmax_scale(np.maximum(-low32, high32), bits), None
    return affine_qparams(low32, high32, bits)


def absmax_scale(magnitude: np.ndarray, bits: int = 8,
                 divisor: float | None = None) -> npt.NDArray[np.float32]:
    """s = max|x| / (2^(bits-1) - 1) for float32 ``magnitude`` = max|x| of each group:
    the largest magnitude maps to the largest code (127, or 7 at 4 bits). A format may
    fix another ``divisor`` (compressed-tensors: 7.5 at 4 bits).

    One float32 division gives the correctly rounded quotient, the same value as dividing
    in float64 and rounding once (double rounding is innocuous for a single division).
    """
    highest = divisor or code_range("absmax", bits)[1]
    scale = np.asarray(magnitude / np.float32(highest), dtype=np.float32)
    if scale.size and scale.min() < FLOAT32_TINY:
        scale = _floor_tiny(magnitude.astype(np.float64) / highest, scale)
    if scale.size and magnitude.max() > _LARGE:
        zero = np.zeros(scale.shape)
        scale = _avoid_overflow(-magnitude.astype(np.float64), magnitude.astype(np.float64),
                                scale, zero, "absmax", bits)[0]
    return scale


def affine_qparams(
    low: np.ndarray, high: np.ndarray, bits: int = 8
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int8]]:
    """s = (hi - lo) / (2^bits - 1) and z = clip(rint(lowest - lo / s), lowest, highest)
    for float32 ``low`` ≤ 0 ≤ ``high`` (255 and -128 at 8 bits); the difference is taken
    in float64, where it is exact."""
    low64 = low.astype(np.float64)
    high64 = high.astype(np.float64)
    exact = (high64 - low64) / ((1 << bits) - 1)
    scale = np.asarray(exact.astype(np.float32))
    if scale.size and scale.min() < FLOAT32_TINY:
        scale = _floor_tiny(exact, scale)
    zero_point = _zero_point(low64, scale, bits)
    if scale.size and max(-low.min(), high.max()) > _LARGE:
        scale, zero_point = _avoid_overflow(low64, high64, scale, zero_point, "affine", bits)
    return scale, zero_point.astype(np.int8)


# Below this magnitude no scale can overflow the grid (255 · s ≤ 2 · 1e38 < 3.4e38).
_LARGE = 1e38


def _floor_tiny(exact: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A non-zero range whose scale underflows float32's normal range gets the smallest
    normal float32, so the bound |x - x̂| ≤ s/2 keeps holding for tiny values."""
    return np.where((exact > 0) & (scale < FLOAT32_TINY), FLOAT32_TINY, scale)


def _avoid_overflow(
    low64: np.ndarray, high64: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
    method: str, bits: int,
) -> tuple[np.ndarray, np.ndarray]:
    """At the very top of float32's range, a scale rounded up would make the extreme code
    dequantize to infinity (127 · fl(3.4028235e38 / 127) overflows): round it down."""
    lowest, highest = code_range(method, bits)
    reach = np.maximum(highest - zero_point, zero_point - lowest)
    overflow = reach * scale.astype(np.float64) > FLOAT32_MAX
    if np.any(overflow):
        scale = np.where(overflow, np.nextafter(scale, np.float32(0)), scale)
        if method == "affine":
            zero_point = _zero_point(low64, scale, bits)
        _check_finite_grid(low64, high64, scale, zero_point, method, bits)
    return scale, zero_point


def _check_finite_grid(
    low64: np.ndarray, high64: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
    method: str, bits: int,
) -> None:
    """Refuse groups whose extreme values would dequantize to infinity.

    This happens only for values within half a step of float32's largest value
    (±3.4e38), where the rounded zero point pushes the grid past the float32 range; no
    finite grid of that step can honour the s/2 bound there. The check mirrors the
    kernel's float32 arithmetic on the group's extremes, which bound every other value.
    """
    lowest, highest = code_range(method, bits)
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


def _zero_point(low64: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """z = clip(rint(lowest - lo / s), lowest, highest) in float64; 0 where s = 0."""
    lowest, highest = code_range("affine", bits)
    ratio = np.zeros(scale.shape)
    np.divide(low64, scale, out=ratio, where=scale > 0)
    zero_point = np.clip(np.rint(lowest - ratio), lowest, highest)
    return np.where(scale > 0, zero_point, 0.0)


def round_scale_nearest(scale: np.ndarray, dtype: np.dtype) -> npt.NDArray[np.float32]:
    """float32 scales rounded to the nearest value ``dtype`` can hold (as float32).

    Raises:
        SchemeError: a scale beyond the range of ``dtype`` (float16 above 65504).
    """
    if dtype in (np.float32, np.float64):
        return scale
    with np.errstate(over="ignore"):
        rounded = scale.astype(dtype).astype(np.float32)
    if not np.isfinite(rounded).all():
        raise SchemeError(f"scales exceed the range of {dtype.name}")
    return rounded


def round_scale_up(scale: np.ndarray, dtype: np.dtype) -> npt.NDArray[np.float32]:
    """float32 scales rounded *up* to the nearest value ``dtype`` can hold (as float32).

    For formats that store scales in the model's dtype (compressed-tensors, vLLM): the
    codes must be made with the stored scale, and rounding it up keeps |x / s| ≤ 127, so
    absmax still needs no clipping. Zero stays zero.

    >>> import ml_dtypes
    >>> float(round_scale_up(np.array([0.1], np.float32), np.dtype(ml_dtypes.bfloat16))[0])
    0.10009765625

    Raises:
        SchemeError: a scale beyond the range of ``dtype`` (float16 above 65504).
    """
    if dtype in (np.float32, np.float64):
        return scale
    nearest = scale.astype(dtype)
    below = nearest.astype(np.float32) < scale
    bits = nearest.view(np.uint16) + below.astype(np.uint16)  # positive: +1 ulp goes up
    rounded = bits.view(dtype).astype(np.float32)
    if not np.isfinite(rounded).all():
        raise SchemeError(f"scales exceed the range of {dtype.name}")
    return rounded
