"""Decide, from the header alone, what happens to each tensor and what the output holds.

Nothing here reads tensor data, so a plan (and ``--dry-run``) is instant even for a
checkpoint of hundreds of GB, and the output header is known before any data is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .core.scheme import Scheme
from .errors import InputError, located
from .qzformat import QuantizedEntry, scale_name, zero_point_name
from .storage.dtypes import DTYPE_BITS, FLOAT_DTYPES
from .storage.header import Header, TensorEntry
from .storage.writer import PlannedTensor

#: Tensors smaller than this stay in their dtype by default (DESIGN §3): the scale and
#: zero point would eat most of the saving, and such tensors are usually sensitive.
MIN_ELEMENTS = 1024


@dataclass(frozen=True)
class TensorPlan:
    """The decision for one input tensor: quantize with ``scheme``, or copy (None)."""

    entry: TensorEntry
    scheme: Scheme | None
    reason: str
    export: str = "qz"  # or "compressed-tensors": how the quantized tensor is stored

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def quantized(self) -> bool:
        return self.scheme is not None

    def outputs(self) -> list[PlannedTensor]:
        """The tensors this input tensor becomes in the output."""
        entry = self.entry
        if self.scheme is None:
            return [PlannedTensor(entry.name, entry.dtype, entry.shape)]
        if self.export == "compressed-tensors":
            from . import ctformat  # a format module of its own; imported where needed

            return ctformat.outputs(entry, self.scheme)
        scale_shape = self.scheme.scale_shape(entry.shape)
        planned = [
            PlannedTensor(entry.name, "I8", entry.shape),
            PlannedTensor(scale_name(entry.name), "F32", scale_shape),
        ]
        if not self.scheme.symmetric:
            planned.append(PlannedTensor(zero_point_name(entry.name), "I8", scale_shape))
        return planned

    def output_bytes(self) -> int:
        return sum(_nbytes(t) for t in self.outputs())

    def quantized_entry(self) -> QuantizedEntry:
        assert self.scheme is not None
        return QuantizedEntry(self.name, self.scheme, self.entry.dtype)


def _nbytes(tensor: PlannedTensor) -> int:
    return math.prod(tensor.shape) * DTYPE_BITS[tensor.dtype] // 8


def plan_tensor(
    entry: TensorEntry,
    scheme: Scheme,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> TensorPlan:
    """Decide one tensor (DESIGN §3).

    Without ``include`` patterns, floating tensors with ≥ 2 dimensions and ≥ 1024 elements
    are quantized. With them, exactly the floating tensors matching one are (1-D and small
    ones too). ``exclude`` always wins. Integer, bool, other float formats, scalars and
    empty tensors are always copied byte for byte.

    >>> entry = TensorEntry("model.norm.weight", "BF16", (4096,), 0, 8192)
    >>> plan_tensor(entry, Scheme()).reason
    '1-D tensor'
    """

    def copy(reason: str) -> TensorPlan:
        return TensorPlan(entry, None, reason)

    if entry.dtype not in FLOAT_DTYPES:
        kind = "bool" if entry.dtype == "BOOL" else (
            "float format qz does not quantize" if entry.dtype.startswith("F") else "integer")
        return copy(f"{kind} dtype {entry.dtype}")
    if len(entry.shape) == 0:
        return copy("scalar")
    if entry.numel == 0:
        return copy("empty tensor")
    excluded = next((p for p in exclude if fnmatchcase(entry.name, p)), None)
    if excluded is not None:
        return copy(f"matches --exclude {excluded!r}")
    if include:
        included = next((p for p in include if fnmatchcase(entry.name, p)), None)
        if included is None:
            return copy("matches no --include pattern")
        return TensorPlan(entry, scheme, f"matches --include {included!r}")
    if len(entry.shape) < 2:
        return copy("1-D tensor")
    if entry.numel < MIN_ELEMENTS:
        return copy(f"fewer than {MIN_ELEMENTS} elements")
    return TensorPlan(entry, scheme, f"{entry.dtype}, {len(entry.shape)}-D")


def plan_quantization(
    header: Header,
    scheme: Scheme,
    path: str | Path,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[TensorPlan]:
    """Decide every tensor of a file, and refuse output names that would collide.

    Raises:
        InputError: a scale or zero-point name qz would write already exists.
    """
    plans = [plan_tensor(entry, scheme, include, exclude) for entry in header.tensors]
    for plan in plans:
        if not plan.quantized:
            continue
        for companion in plan.outputs()[1:]:
            if companion.name in header:
                raise InputError(
                    located(path, companion.name, f"collides with the name qz would give the "
                            f"{'scale' if companion.dtype == 'F32' else 'zero point'} of "
                            f"{plan.name!r}"),
                    hint=f"leave {plan.name!r} as it is with --exclude",
                )
    return plans


def planned_outputs(plans: Sequence[TensorPlan]) -> list[PlannedTensor]:
    return [tensor for plan in plans for tensor in plan.outputs()]
