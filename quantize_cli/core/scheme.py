"""What a quantization scheme is, as a frozen value: a method (which names the element
type and how scales are stored, elements.py), a granularity, the bits of integer codes,
how each group's scale is chosen, and what the runtime does with the layer's inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import SchemeError
from .elements import (
    INTEGER_BITS,
    INTEGER_METHODS,
    METHOD_INFO,
    METHODS,
    ElementType,
    Method,
    MethodInfo,
    ScaleType,
    integer,
)

Granularity = Literal["tensor", "channel", "block"]
Clip = Literal["none", "mse", "weighted"]
ClipChoice = Literal["auto", "none", "mse", "weighted"]
#: What a runtime quantizes a layer's inputs to, dynamically (per token, or per group of
#: 128 beside FP8 tiles). It changes what a format declares, never the weights' numbers.
Activations = Literal["int8", "fp8"]

GRANULARITIES: tuple[Granularity, ...] = ("tensor", "channel", "block")
CLIPS: tuple[Clip, ...] = ("none", "mse", "weighted")
CLIP_CHOICES: tuple[ClipChoice, ...] = ("auto", *CLIPS)
ACTIVATIONS: tuple[Activations, ...] = ("int8", "fp8")
#: The bits of integer codes (the floats' bits are their element type's).
BITS = INTEGER_BITS
#: The block size when none is given.
DEFAULT_BLOCK = 128

#: How groups are searched below 8 bits when ``clip="auto"`` (benchmarks/README.md has the
#: evidence: weight SQNR and a real model's embeddings).
LOW_BIT_CLIP: Clip = "mse"

__all__ = ["ACTIVATIONS", "BITS", "CLIPS", "CLIP_CHOICES", "DEFAULT_BLOCK", "GRANULARITIES",
           "INTEGER_METHODS", "METHODS", "Activations", "Clip", "ClipChoice", "Granularity",
           "Method", "Scheme", "code_range"]


def code_range(method: str, bits: int = 8) -> tuple[int, int]:
    """The integer codes a method uses at ``bits``.

    INT8 absmax leaves -128 unused, so that the range is symmetric and -x always
    quantizes to -q (as ggml's Q8_0 and optimum-quanto do). Below 8 bits every code
    counts: 4-bit absmax uses [-8, 7], as ggml's Q4_0 does (plain rounding with
    s = max|x| / 7 never reaches -8; the error-optimal search may).

    >>> code_range("absmax"), code_range("absmax", 4), code_range("affine", 3)
    ((-127, 127), (-8, 7), (-4, 3))
    """
    half = 1 << (bits - 1)
    if method == "absmax" and bits == 8:
        return -(half - 1), half - 1
    return -half, half - 1


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: method, granularity (and block size for ``block``), bits of
    integer codes, how each group's scale is chosen (``clip``) and the activations a
    runtime quantizes (``activations``, for the formats that declare them).

    ``clip="none"`` is plain rounding to nearest with the group's full range (the
    tutorial's rule); ``"mse"`` chooses each group's scale (and zero point) to minimise
    its squared error, never worse than plain rounding; ``"weighted"`` does the same with
    each element weighted by the group's RMS plus its magnitude, which protects the
    largest weights. ``clip="auto"`` (the default) is resolved when the scheme is made:
    for 8-bit integers ``"mse"`` with one scale per tensor, where it gains about 5 dB on
    heavy-tailed weights, and ``"none"`` otherwise, where it gains almost nothing for ten
    times the work (benchmarks/clip_gain.py); below 8 bits :data:`LOW_BIT_CLIP` always,
    where the gains are real; ``"mse"`` for the microscaling types, whose scales are
    coarse; ``"none"`` for FP8. A scheme never holds ``"auto"``.

    ``method="fp8"`` stores FP8 E4M3 values with s = max|x| / 448; its ``block``
    granularity is square tiles of ``block_size`` × ``block_size`` of a 2-D tensor. The
    microscaling methods fix their group (16 or 32 values) and bits.

    >>> Scheme()
    Scheme(method='absmax', granularity='block', block_size=128, clip='none', bits=8, \
activations=None)
    >>> Scheme("affine", "tensor").clip, Scheme("absmax", "block", 32, bits=4).clip
    ('mse', 'mse')
    >>> Scheme("nvfp4").block_size, Scheme("nvfp4").bits, Scheme("nvfp4").label
    (16, 4, 'NVFP4')
    """

    method: Method = "absmax"
    granularity: Granularity = "block"
    block_size: int | None = None
    clip: ClipChoice = "auto"
    bits: int = 8
    activations: Activations | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SchemeError(
                f"unknown method {self.method!r} (choose from {', '.join(METHODS)})"
            )
        info = self.info
        if self.granularity not in GRANULARITIES:
            raise SchemeError(
                f"unknown granularity {self.granularity!r} "
                f"(choose from {', '.join(GRANULARITIES)})"
            )
        if info.element is not None:
            if self.bits not in (8, info.element.bits):
                raise SchemeError(f"{self.method} has {info.element.bits} bits")
            object.__setattr__(self, "bits", info.element.bits)
        elif self.bits not in BITS:
            raise SchemeError(f"bits must be one of {', '.join(map(str, BITS))}, "
                              f"got {self.bits!r}")
        if info.group_size is not None:
            if self.granularity != "block" or self.block_size not in (None, info.group_size):
                chosen = ("block " + str(self.block_size) if self.granularity == "block"
                          else self.granularity)
                raise SchemeError(f"{self.method} quantizes groups of {info.group_size} "
                                  f"values, not {chosen}")
            object.__setattr__(self, "block_size", info.group_size)
        if self.clip == "auto":
            object.__setattr__(self, "clip", _auto_clip(self))
        if self.clip not in CLIPS:
            raise SchemeError(f"unknown clip {self.clip!r} (choose from {', '.join(CLIPS)})")
        if self.method == "fp8" and self.clip != "none":
            raise SchemeError("fp8 takes no clip search: its scale is max|x| / 448")
        if info.microscaling and self.clip == "weighted":
            raise SchemeError(f"{self.method} takes the mse search or none",
                              hint="use --clip mse")
        if self.clip == "weighted" and (self.bits == 8 or self.granularity == "tensor"):
            raise SchemeError("the weighted search applies to blocks and channels below 8 "
                              "bits", hint="use --clip mse")
        if self.activations is not None and self.activations not in ACTIVATIONS:
            raise SchemeError(f"unknown activations {self.activations!r} (choose from "
                              f"{', '.join(ACTIVATIONS)})")
        if self.granularity == "block":
            if self.block_size is None:
                object.__setattr__(self, "block_size", DEFAULT_BLOCK)
            size = self.block_size
            if type(size) is not int or size < 1:
                raise SchemeError(f"block size must be a positive integer, got {size!r}")
        elif self.block_size is not None:
            # Normalise so that equal schemes compare equal whatever was passed.
            object.__setattr__(self, "block_size", None)

    def varied(self, method: Method | None = None, granularity: Granularity | None = None,
               block_size: int | None = None, bits: int | None = None,
               clip: ClipChoice | None = None,
               activations: Activations | Literal["unchanged"] | None = "unchanged"
               ) -> Scheme:
        """This scheme with some choices changed (by the command line's options, by
        ``--rule`` or by a target); what is not given is kept where it still applies.
        A clip that was chosen by "auto" is chosen again for the new scheme, and an
        explicit one is kept where it applies. A microscaling method brings its own group
        and bits; leaving one brings the usual block.

        >>> Scheme().varied(bits=4)
        Scheme(method='absmax', granularity='block', block_size=128, clip='mse', bits=4, \
activations=None)
        >>> Scheme(clip="mse").varied(granularity="channel").clip
        'mse'
        >>> Scheme("affine", "block", 64).varied(method="mxfp4").describe()
        'mxfp4, mse clip'
        """
        method = method or self.method
        info = METHOD_INFO.get(method, self.info)
        if info.microscaling:
            granularity, block_size = "block", info.group_size
        else:
            granularity = granularity or ("block" if block_size else self.granularity)
            if granularity == "block" and block_size is None and not self.info.microscaling:
                block_size = self.block_size
        if info.element is not None:
            if bits not in (None, info.element.bits):
                raise SchemeError(f"{method} has {info.element.bits} bits",
                                  hint="--bits is for integer codes (absmax, affine)")
            bits = info.element.bits
        else:
            bits = bits or (self.bits if self.info.element is None else 8)
        if clip is None:
            clip = "auto" if self.clip == _auto_clip(self) else self.clip
        chosen = self.activations if activations == "unchanged" else activations
        try:
            return Scheme(method, granularity, block_size, clip, bits, chosen)
        except SchemeError:
            if clip == "auto":
                raise
            # The kept clip does not apply to the new scheme.
            return Scheme(method, granularity, block_size, "auto", bits, chosen)

    @property
    def info(self) -> MethodInfo:
        """What the method fixes (elements.py)."""
        return METHOD_INFO[self.method]

    @property
    def element(self) -> ElementType:
        """What one stored value is."""
        return self.info.element or integer(self.bits)

    @property
    def scale_type(self) -> ScaleType:
        """How a group's scale is stored."""
        return self.info.scale

    @property
    def symmetric(self) -> bool:
        return self.info.symmetric

    @property
    def tiles(self) -> bool:
        """Whether groups are square 2-D tiles (FP8 blocks) rather than runs of a row."""
        return self.method == "fp8" and self.granularity == "block"

    @property
    def code_range(self) -> tuple[int, int]:
        """The integer codes of an integer scheme."""
        return code_range(self.method, self.bits)

    @property
    def levels(self) -> int:
        """Codes minus one: the steps between the lowest and highest code."""
        return (1 << self.bits) - 1

    @property
    def label(self) -> str:
        """What the weights are stored as, in capitals: ``INT8``, ``INT4``, ``FP8``,
        ``NVFP4``, ``MXFP4``, ``MXFP8``.

        >>> Scheme(bits=3).label, Scheme("fp8", "channel").label
        ('INT3', 'FP8')
        """
        return self.info.label or f"INT{self.bits}"

    def describe(self) -> str:
        """A short human label, e.g. ``'affine block 128'``, ``'int4 absmax channel'``,
        ``'absmax tensor, mse clip'`` or ``'fp8 channel, fp8 activations'`` (8 bits is the
        integers' default and goes unsaid; microscaling types name only their method).

        >>> Scheme("absmax", "channel", activations="int8").describe()
        'absmax channel, int8 activations'
        """
        label: str = self.method
        if not self.info.microscaling:
            prefix = "" if self.bits == 8 or self.info.element is not None else f"int{self.bits} "
            label = f"{prefix}{self.method} {self.where}"
        return label + self.choices

    @property
    def where(self) -> str:
        """The granularity in words: ``tensor``, ``channel``, ``block 128`` or
        ``block 128×128`` (the microscaling types: ``groups of 16``)."""
        if self.info.microscaling:
            return f"groups of {self.block_size}"
        if self.tiles:
            return f"block {self.block_size}×{self.block_size}"
        if self.granularity == "block":
            return f"block {self.block_size}"
        return self.granularity

    @property
    def choices(self) -> str:
        """How scales were chosen and what the runtime quantizes, when not the plain
        default: ``', mse clip'``, ``', int8 activations'``."""
        text = f", {self.clip} clip" if self.clip != "none" else ""
        return text + (f", {self.activations} activations" if self.activations else "")

    def shape_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a tensor of ``shape`` cannot be quantized with this scheme (None: it can).

        >>> Scheme("fp8", "block", 128).shape_problem((8, 256, 512))
        'kept: 128×128 blocks need a 2-D tensor, not a 3-D one'
        """
        if self.tiles and len(shape) != 2:
            return (f"kept: {self.block_size}×{self.block_size} blocks need a 2-D tensor, "
                    f"not a {len(shape)}-D one")
        return None

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
    if scheme.info.microscaling:
        return "mse"
    if scheme.bits < 8:
        return LOW_BIT_CLIP
    return "mse" if scheme.granularity == "tensor" else "none"
