"""Step-by-step quantization of a short vector, for learners (``qz explain``).

The numbers come from the same code as everything else (:func:`quantize` and
:func:`dequantize`); this module only gathers the intermediate values to show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .floats import decode_scale
from .quantize import dequantize, quantize
from .scheme import Scheme
from .stats import ErrorStats, error_stats


@dataclass(frozen=True)
class GroupSteps:
    """One group's way from values to codes and back. ``scale`` is the step a code is
    multiplied by; for the microscaling types ``stored_scale`` is what the file keeps of it
    (the E4M3 value, or the E8M0 exponent e of 2^e)."""

    start: int  # index of the group's first value
    values: npt.NDArray[np.float32]
    low: float  # the range the scale is made from (includes 0)
    high: float
    scale: float
    zero_point: int | None
    scaled: npt.NDArray[np.float32]  # x / s (+ z), before rounding
    codes: np.ndarray  # integer codes, or the float values of float elements
    dequantized: npt.NDArray[np.float32]
    stored_scale: float | None = None

    @property
    def errors(self) -> npt.NDArray[np.float32]:
        return self.values - self.dequantized


@dataclass(frozen=True)
class Explanation:
    scheme: Scheme
    groups: list[GroupSteps]
    stats: ErrorStats
    global_scale: float | None = None  # NVFP4's scale of the whole vector


def explain(values: npt.ArrayLike, scheme: Scheme) -> Explanation:
    """Quantize a 1-D vector with ``scheme`` (per tensor or blocks) and keep every step.

    >>> steps = explain([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2], Scheme("absmax", "tensor"))
    >>> steps.groups[0].codes.tolist()
    [33, -14, -70, 35, -59, 10, 47, 127]
    >>> steps = explain([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2], Scheme("mxfp4", clip="none"))
    >>> steps.groups[0].scale, steps.groups[0].stored_scale, steps.groups[0].codes.tolist()
    (2.0, 1.0, [1.0, -0.5, -1.5, 1.0, -1.5, 0.0, 1.0, 3.0])
    """
    x = np.asarray(values, dtype=np.float32).reshape(-1)
    quantized = quantize(x, scheme)
    restored = dequantize(quantized)
    size = x.size if scheme.granularity != "block" else scheme.block_size
    assert size is not None
    microscaling = scheme.info.microscaling
    steps = (decode_scale(quantized.scale, scheme, quantized.global_scale or 1.0)
             if microscaling else quantized.scale.astype(np.float32)).reshape(-1)
    groups = []
    for index, start in enumerate(range(0, x.size, max(size, 1))):
        part = slice(start, start + size)
        scale = float(steps[index])
        zero_points = quantized.zero_point
        zero = None if zero_points is None else int(zero_points.reshape(-1)[index])
        chunk = x[part]
        if scheme.symmetric:
            low, high = -float(np.abs(chunk).max()), float(np.abs(chunk).max())
        else:
            low, high = min(float(chunk.min()), 0.0), max(float(chunk.max()), 0.0)
        stored = None
        if microscaling:
            encoded = float(quantized.scale.reshape(-1)[index])
            stored = float(np.log2(encoded)) if scheme.scale_type == "e8m0" else encoded
        divisor = np.float32(scale if scale else 1)
        scaled = chunk / divisor + np.float32(zero or 0)
        codes = quantized.codes[part]
        groups.append(GroupSteps(start, chunk, low, high, scale, zero, scaled,
                                 codes.astype(np.float32) if scheme.element.is_float else codes,
                                 restored[part], stored))
    return Explanation(scheme, groups, error_stats(x, restored), quantized.global_scale)
