"""Step-by-step quantization of a short vector, for learners (``qz explain``).

The numbers come from the same code as everything else (:func:`quantize` and
:func:`dequantize`); this module only gathers the intermediate values to show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .quantize import dequantize, quantize
from .scheme import Scheme
from .stats import ErrorStats, error_stats


@dataclass(frozen=True)
class GroupSteps:
    """One group's way from values to codes and back."""

    start: int  # index of the group's first value
    values: npt.NDArray[np.float32]
    low: float  # the range the scale is made from (includes 0)
    high: float
    scale: float
    zero_point: int | None
    scaled: npt.NDArray[np.float32]  # x / s (+ z), before rounding
    codes: npt.NDArray[np.int8]
    dequantized: npt.NDArray[np.float32]

    @property
    def errors(self) -> npt.NDArray[np.float32]:
        return self.values - self.dequantized


@dataclass(frozen=True)
class Explanation:
    scheme: Scheme
    groups: list[GroupSteps]
    stats: ErrorStats


def explain(values: npt.ArrayLike, scheme: Scheme) -> Explanation:
    """Quantize a 1-D vector with ``scheme`` (per tensor or blocks) and keep every step.

    >>> steps = explain([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2], Scheme("absmax", "tensor"))
    >>> steps.groups[0].codes.tolist()
    [33, -14, -70, 35, -59, 10, 47, 127]
    """
    x = np.asarray(values, dtype=np.float32).reshape(-1)
    quantized = quantize(x, scheme)
    restored = dequantize(quantized)
    size = x.size if scheme.granularity != "block" else scheme.block_size
    assert size is not None
    groups = []
    for index, start in enumerate(range(0, x.size, max(size, 1))):
        part = slice(start, start + size)
        scale = float(quantized.scale.reshape(-1)[index])
        zero_points = quantized.zero_point
        zero = None if zero_points is None else int(zero_points.reshape(-1)[index])
        chunk = x[part]
        if scheme.symmetric:
            low, high = -float(np.abs(chunk).max()), float(np.abs(chunk).max())
        else:
            low, high = min(float(chunk.min()), 0.0), max(float(chunk.max()), 0.0)
        divisor = np.float32(scale if scale else 1)
        scaled = chunk / divisor + np.float32(zero or 0)
        groups.append(GroupSteps(start, chunk, low, high, scale, zero, scaled,
                                 quantized.codes[part], restored[part]))
    return Explanation(scheme, groups, error_stats(x, restored))
