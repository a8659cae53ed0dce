"""What a quantization scheme is: a method and a granularity, as a frozen value."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import SchemeError

Method = Literal["absmax", "affine"]
Granularity = Literal["tensor", "channel", "block"]
Clip = Literal["none", "mse"]
ClipChoice = Literal["auto", "none", "mse"]

METHODS: tuple[Method, ...] = ("absmax", "affine")
GRANULARITIES: tuple[Granularity, ...] = ("tensor", "channel", "block")
CLIPS: tuple[Clip, ...] = ("none", "mse")
CLIP_CHOICES: tuple[ClipChoice, ...] = ("auto", *CLIPS)

#: The INT8 code range of each method. absmax leaves -128 unused so that the range is
#: symmetric and -x always quantizes to -q (as ggml's Q8_0 and optimum-quanto do).
CODE_RANGE: dict[str, tuple[int, int]] = {"absmax": (-127, 127), "affine": (-128, 127)}


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: method, granularity (and block size for ``block``), and
    whether each group's range is shrunk where that lowers its squared error (``clip``).

    ``clip="auto"`` (the default) is resolved when the scheme is made: ``"mse"`` with one
    scale per tensor, where the search gains about 5 dB on heavy-tailed weights, and
    ``"none"`` otherwise, where it gains almost nothing for ten times the work
    (benchmarks/clip_gain.py). A scheme never holds ``"auto"``.

    >>> Scheme()
    Scheme(method='absmax', granularity='block', block_size=128, clip='none')
    >>> Scheme("affine", "tensor").clip
    'mse'
    >>> Scheme("affine", "channel").scale_shape((4, 3, 2))
    (4, 1, 1)
    >>> Scheme("absmax", "block", 128).scale_shape((2, 300))
    (2, 3)
    """

    method: Method = "absmax"
    granularity: Granularity = "block"
    block_size: int | None = 128
    clip: ClipChoice = "auto"

    def __post_init__(self) -> None:
        if self.clip == "auto":
            object.__setattr__(self, "clip", "mse" if self.granularity == "tensor" else "none")
        if self.clip not in CLIPS:
            raise SchemeError(f"unknown clip {self.clip!r} (choose from {', '.join(CLIPS)})")
        if self.method not in METHODS:
            raise SchemeError(
                f"unknown method {self.method!r} (choose from {', '.join(METHODS)})"
            )
        if self.granularity not in GRANULARITIES:
            raise SchemeError(
                f"unknown granularity {self.granularity!r} "
                f"(choose from {', '.join(GRANULARITIES)})"
            )
        if self.granularity == "block":
            size = self.block_size
            if type(size) is not int or size < 1:
                raise SchemeError(f"block size must be a positive integer, got {size!r}")
        elif self.block_size is not None:
            # Normalise so that equal schemes compare equal whatever was passed.
            object.__setattr__(self, "block_size", None)

    @property
    def symmetric(self) -> bool:
        return self.method == "absmax"

    @property
    def code_range(self) -> tuple[int, int]:
        return CODE_RANGE[self.method]

    def describe(self) -> str:
        """A short human label, e.g. ``'affine block 128'`` or ``'absmax tensor, mse clip'``."""
        label = (f"{self.method} block {self.block_size}" if self.granularity == "block"
                 else f"{self.method} {self.granularity}")
        return label + (", mse clip" if self.clip == "mse" else "")

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale (and zero point) for a tensor of ``shape`` (DESIGN §2)."""
        if self.granularity == "tensor":
            return (1,)
        if len(shape) == 0:
            raise SchemeError(f"{self.describe()} needs a tensor with at least one axis")
        if self.granularity == "channel":
            return (shape[0], *(1,) * (len(shape) - 1))
        assert self.block_size is not None
        return (*shape[:-1], math.ceil(shape[-1] / self.block_size))

    def row_view_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The 2-D (rows, columns) view in which no group crosses a row.

        Block groups run along the last axis and channels along axis 0, so processing any
        run of whole rows gives exactly the result of processing the whole tensor; this is
        what lets large tensors be streamed in row chunks.
        """
        if len(shape) == 0:
            return (1, 1)
        if self.granularity == "channel":
            return (shape[0], math.prod(shape[1:]))
        return (math.prod(shape[:-1]), shape[-1])

    def groups_per_row(self, columns: int) -> int:
        """Number of scale values per row of :meth:`row_view_shape`."""
        if self.granularity == "block":
            assert self.block_size is not None
            return math.ceil(columns / self.block_size)
        return 1
