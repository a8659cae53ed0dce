"""Element types: what one stored value is, and how a group's scale is kept.

A scheme's method names both (DESIGN §1):

| method | a value is | a group's scale is | groups |
|---|---|---|---|
| absmax, affine | an integer of 2 to 8 bits | a float (format's dtype) | tensor, channel, block N |
| fp8 | FP8 E4M3 | a float | tensor, channel, N × N tiles |
| nvfp4 | FP4 E2M1 | FP8 E4M3, divided by a float32 scale of the tensor | 16 values |
| mxfp4 | FP4 E2M1 | E8M0, a power of two | 32 values |
| mxfp8 | FP8 E4M3 | E8M0 | 32 values |

The microscaling types (NVFP4, MXFP4, MXFP8) come from the OCP Microscaling
specification and NVIDIA's Blackwell formats; their group size and scale encoding are
fixed by the type, so a scheme of them has no other granularity.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

Method = Literal["absmax", "affine", "fp8", "nvfp4", "mxfp4", "mxfp8"]
#: How a group's scale is stored: a float of the format's dtype, an FP8 E4M3 number
#: (relative to a per-tensor float32 scale), or an E8M0 power of two.
ScaleType = Literal["float", "e4m3", "e8m0"]


@dataclass(frozen=True)
class ElementType:
    """What one stored value is: an integer code of ``bits`` bits, or a small float."""

    name: str  # "int4", "e4m3", "e2m1"
    bits: int
    #: The numpy dtype of a float element (from ml_dtypes); None for integers.
    float_dtype: str | None = None
    #: The largest magnitude a float element holds.
    largest: float = 0.0

    @property
    def is_float(self) -> bool:
        return self.float_dtype is not None

    def dtype(self) -> np.dtype:
        """The in-memory dtype of codes: int8 for integers, the ml_dtypes float type
        otherwise (imported on first use: it costs half a second)."""
        if self.float_dtype is None:
            return np.dtype(np.int8)
        return _ml_dtype(self.float_dtype)


@functools.cache
def _ml_dtype(name: str) -> np.dtype:
    import ml_dtypes

    found: np.dtype = np.dtype(getattr(ml_dtypes, name))
    return found


def integer(bits: int) -> ElementType:
    """The element type of integer codes of ``bits`` bits.

    >>> integer(4).name, integer(4).is_float
    ('int4', False)
    """
    return ElementType(f"int{bits}", bits)


E4M3 = ElementType("e4m3", 8, "float8_e4m3fn", 448.0)
E2M1 = ElementType("e2m1", 4, "float4_e2m1fn", 6.0)


@dataclass(frozen=True)
class MethodInfo:
    """What a method fixes: its element type (None: integers of the scheme's bits), how
    its scales are stored, a fixed group size, a per-tensor global scale, its label."""

    name: Method
    element: ElementType | None
    scale: ScaleType
    summary: str
    group_size: int | None = None
    global_scale: bool = False
    symmetric: bool = True
    label: str | None = None  # None: "INT" and the bits

    @property
    def microscaling(self) -> bool:
        """Whether groups of a fixed size have scales stored as small floats."""
        return self.group_size is not None


METHOD_INFO: dict[str, MethodInfo] = {info.name: info for info in (
    MethodInfo("absmax", None, "float",
               "symmetric integers, s = max|x| / (2^(b-1) - 1): 127 at 8 bits, 7 at 4"),
    MethodInfo("affine", None, "float",
               "integers with a zero point, s = (max - min) / (2^b - 1)", symmetric=False),
    MethodInfo("fp8", E4M3, "float", "FP8 E4M3 values, s = max|x| / 448", label="FP8"),
    MethodInfo("nvfp4", E2M1, "e4m3",
               "FP4 E2M1 values in groups of 16 with FP8 E4M3 scales and a float32 scale "
               "per tensor", group_size=16, global_scale=True, label="NVFP4"),
    MethodInfo("mxfp4", E2M1, "e8m0",
               "FP4 E2M1 values in groups of 32 with power-of-two (E8M0) scales",
               group_size=32, label="MXFP4"),
    MethodInfo("mxfp8", E4M3, "e8m0",
               "FP8 E4M3 values in groups of 32 with power-of-two (E8M0) scales",
               group_size=32, label="MXFP8"),
)}

METHODS: tuple[Method, ...] = tuple(METHOD_INFO)  # type: ignore[arg-type]
INTEGER_METHODS: tuple[Method, ...] = ("absmax", "affine")
#: The widths of integer codes.
INTEGER_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
