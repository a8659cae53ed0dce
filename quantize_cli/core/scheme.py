"""What a quantization scheme is: a method, a granularity, a number of bits and how each
group's scale is chosen, as a frozen value."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import SchemeError

Method = Literal["absmax", "affine", "fp8"]
Granularity = Literal["tensor", "channel", "block"]
Clip = Literal["none", "mse", "weighted"]
ClipChoice = Literal["auto", "none", "mse", "weighted"]

METHODS: tuple[Method, ...] = ("absmax", "affine", "fp8")
INTEGER_METHODS: tuple[Method, ...] = ("absmax", "affine")
GRANULARITIES: tuple[Granularity, ...] = ("tensor", "channel", "block")
CLIPS: tuple[Clip, ...] = ("none", "mse", "weighted")
CLIP_CHOICES: tuple[ClipChoice, ...] = ("auto", *CLIPS)
BITS: tuple[int, ...] = (4, 8)

#: The largest magnitude FP8 E4M3 holds (and the divisor of an FP8 scale).
FP8_MAX = 448.0

#: How groups are searched below 8 bits when ``clip="auto"`` (benchmarks/README.md has the
#: evidence: weight SQNR and a real model's embeddings).
LOW_BIT_CLIP: Clip = "mse"


def code_range(method: str, bits: int = 8) -> tuple[int, int]:
    """The codes a method uses at ``bits``.

    INT8 absmax leaves -128 unused, so that the range is symmetric and -x always
    quantizes to -q (as ggml's Q8_0 and optimum-quanto do). Below 8 bits every code
    counts: 4-bit absmax uses [-8, 7], as ggml's Q4_0 does (plain rounding with
    s = max|x| / 7 never reaches -8; the error-optimal search may).

    >>> code_range("absmax"), code_range("absmax", 4), code_range("affine", 4)
    ((-127, 127), (-8, 7), (-8, 7))
    """
    half = 1 << (bits - 1)
    if method == "absmax" and bits == 8:
        return -(half - 1), half - 1
    return -half, half - 1


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: method, granularity (and block size for ``block``), bits,
    and how each group's scale is chosen (``clip``).

    ``clip="none"`` is plain rounding to nearest with the group's full range (the
    tutorial's rule); ``"mse"`` chooses each group's scale (and zero point) to minimise
    its squared error, never worse than plain rounding; ``"weighted"`` does the same with
    each element weighted by the group's RMS plus its magnitude, which protects the
    largest weights. ``clip="auto"`` (the default) is resolved when the scheme is made:
    at 8 bits ``"mse"`` with one scale per tensor, where it gains about 5 dB on heavy-tailed
    weights, and ``"none"`` otherwise, where it gains almost nothing for ten times the
    work (benchmarks/clip_gain.py); below 8 bits :data:`LOW_BIT_CLIP` always, where the
    gains are real. A scheme never holds ``"auto"``.

    ``method="fp8"`` stores FP8 E4M3 values with s = max|x| / 448; its ``block``
    granularity is square tiles of ``block_size`` × ``block_size`` of a 2-D tensor.

    >>> Scheme()
    Scheme(method='absmax', granularity='block', block_size=128, clip='none', bits=8)
    >>> Scheme("affine", "tensor").clip, Scheme("absmax", "block", 32, bits=4).clip
    ('mse', 'mse')
    """

    method: Method = "absmax"
    granularity: Granularity = "block"
    block_size: int | None = 128
    clip: ClipChoice = "auto"
    bits: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SchemeError(
                f"unknown method {self.method!r} (choose from {', '.join(METHODS)})"
            )
        if self.granularity not in GRANULARITIES:
            raise SchemeError(
                f"unknown granularity {self.granularity!r} "
                f"(choose from {', '.join(GRANULARITIES)})"
            )
        if self.bits not in BITS:
            raise SchemeError(f"bits must be one of {', '.join(map(str, BITS))}, "
                              f"got {self.bits!r}")
        if self.method == "fp8" and self.bits != 8:
            raise SchemeError("fp8 has 8 bits")
        if self.clip == "auto":
            object.__setattr__(self, "clip", _auto_clip(self))
        if self.clip not in CLIPS:
            raise SchemeError(f"unknown clip {self.clip!r} (choose from {', '.join(CLIPS)})")
        if self.method == "fp8" and self.clip != "none":
            raise SchemeError("fp8 takes no clip search: its scale is max|x| / 448")
        if self.clip == "weighted" and (self.bits == 8 or self.granularity == "tensor"):
            raise SchemeError("the weighted search applies to blocks and channels below 8 "
                              "bits", hint="use --clip mse")
        if self.granularity == "block":
            size = self.block_size
            if type(size) is not int or size < 1:
                raise SchemeError(f"block size must be a positive integer, got {size!r}")
        elif self.block_size is not None:
            # Normalise so that equal schemes compare equal whatever was passed.
            object.__setattr__(self, "block_size", None)

    def varied(self, method: Method | None = None, granularity: Granularity | None = None,
               block_size: int | None = None, bits: int | None = None) -> Scheme:
        """This scheme with some choices changed (by ``--rule`` or by a target). The clip
        follows: a clip that was chosen by "auto" is chosen again for the new scheme, and
        an explicit one is kept where it applies.

        >>> Scheme().varied(bits=4)
        Scheme(method='absmax', granularity='block', block_size=128, clip='mse', bits=4)
        >>> Scheme(clip="mse").varied(granularity="channel").clip
        'mse'
        """
        method = method or self.method
        granularity = granularity or ("block" if block_size else self.granularity)
        if granularity == "block":
            block_size = block_size or self.block_size or Scheme().block_size
        bits = 8 if method == "fp8" else bits or self.bits
        clip: ClipChoice = "auto" if self.clip == _auto_clip(self) else self.clip
        try:
            return Scheme(method, granularity, block_size, clip, bits)
        except SchemeError:  # the explicit clip does not apply to the new scheme
            return Scheme(method, granularity, block_size, "auto", bits)

    @property
    def symmetric(self) -> bool:
        return self.method != "affine"

    @property
    def tiles(self) -> bool:
        """Whether groups are square 2-D tiles (FP8 blocks) rather than runs of a row."""
        return self.method == "fp8" and self.granularity == "block"

    @property
    def code_range(self) -> tuple[int, int]:
        return code_range(self.method, self.bits)

    @property
    def levels(self) -> int:
        """Codes minus one: the steps between the lowest and highest code."""
        return (1 << self.bits) - 1

    def describe(self) -> str:
        """A short human label, e.g. ``'affine block 128'``, ``'int4 absmax channel'`` or
        ``'absmax tensor, mse clip'`` (8 bits is the default and goes unsaid)."""
        if self.tiles:
            where = f"block {self.block_size}×{self.block_size}"
        elif self.granularity == "block":
            where = f"block {self.block_size}"
        else:
            where = self.granularity
        prefix = "" if self.bits == 8 or self.method == "fp8" else f"int{self.bits} "
        label = f"{prefix}{self.method} {where}"
        return label + (f", {self.clip} clip" if self.clip != "none" else "")

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale (and zero point) for a tensor of ``shape`` (DESIGN §2)."""
        if self.granularity == "tensor":
            return (1,)
        if len(shape) == 0:
            raise SchemeError(f"{self.describe()} needs a tensor with at least one axis")
        if self.granularity == "channel":
            return (shape[0], *(1,) * (len(shape) - 1))
        assert self.block_size is not None
        if self.tiles:
            if len(shape) != 2:
                raise SchemeError(f"{self.describe()} needs a 2-D tensor, got "
                                  f"{len(shape)}-D")
            return (math.ceil(shape[0] / self.block_size),
                    math.ceil(shape[1] / self.block_size))
        return (*shape[:-1], math.ceil(shape[-1] / self.block_size))

    def row_view_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The 2-D (rows, columns) view in which no group crosses a run of
        :attr:`row_multiple` rows.

        Block groups run along the last axis and channels along axis 0, so processing any
        run of whole rows gives exactly the result of processing the whole tensor; this is
        what lets large tensors be streamed in row chunks. Tiles need runs of whole tiles.
        """
        if len(shape) == 0:
            return (1, 1)
        if self.granularity == "channel":
            return (shape[0], math.prod(shape[1:]))
        return (math.prod(shape[:-1]), shape[-1])

    @property
    def row_multiple(self) -> int:
        """Row chunks must hold a multiple of this many rows (the tile height)."""
        return self.block_size or 1 if self.tiles else 1

    def groups_per_row(self, columns: int) -> int:
        """Number of scale values per row of :meth:`row_view_shape` (per tile row, for
        tiles)."""
        if self.granularity == "block":
            assert self.block_size is not None
            return math.ceil(columns / self.block_size)
        return 1


def _auto_clip(scheme: Scheme) -> Clip:
    if scheme.method == "fp8":
        return "none"
    if scheme.bits < 8:
        return LOW_BIT_CLIP
    return "mse" if scheme.granularity == "tensor" else "none"
