"""What the jobs report: plain records that the command line renders as tables or JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..core.scheme import Scheme
from ..core.stats import ErrorStats, OutputError


class Progress(Protocol):
    """What the jobs report while they run (the CLI draws a progress bar from it): each
    phase that reads tensor data starts with the bytes it will read, and advances."""

    def start(self, total_bytes: int, phase: str) -> None: ...

    def advance(self, nbytes: int, tensor: str) -> None: ...


class NoProgress:
    def start(self, total_bytes: int, phase: str) -> None:
        pass

    def advance(self, nbytes: int, tensor: str) -> None:
        pass


@dataclass(frozen=True)
class NamedTensor:
    """A tensor in a report: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


# --------------------------------------------------------------------------- quantize


@dataclass(frozen=True)
class TensorReport(NamedTensor):
    """What happened to one input tensor."""

    scheme: Scheme | None  # None: copied unchanged
    reason: str
    input_bytes: int
    output_bytes: int
    stats: ErrorStats | None = None  # None for copied tensors and in a dry run
    shard: str | None = None
    selected: bool = False  # chosen for quantization by the selection rules (jobs/plan.py)
    output: OutputError | None = None  # the layer's output error, when calibrated

    @property
    def bits_per_weight(self) -> float:
        elements = math.prod(self.shape)
        return 8 * self.output_bytes / elements if elements else 0.0


@dataclass(frozen=True)
class FolderReport:
    """What a folder output carried over from the model folder besides the weights, and
    what it left out (path, reason)."""

    carried_over: tuple[str, ...] = ()
    left_out: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class QuantizeReport:
    source: Path
    output: Path
    scheme: Scheme
    format: str
    tensors: list[TensorReport]
    dry_run: bool = False
    folder: FolderReport | None = None  # None: the output is one file
    target_bits: float | None = None
    notes: tuple[str, ...] = ()  # what a user should know about the output
    warnings: tuple[str, ...] = ()  # options that did nothing (an --exclude matching none)

    @property
    def quantized(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.scheme is not None]

    @property
    def input_bytes(self) -> int:
        return sum(t.input_bytes for t in self.tensors)

    @property
    def output_bytes(self) -> int:
        return sum(t.output_bytes for t in self.tensors)

    @property
    def compression_ratio(self) -> float:
        return self.input_bytes / self.output_bytes if self.output_bytes else math.inf

    @property
    def bits_per_weight(self) -> float:
        """Output bits per element over the whole checkpoint (scales included)."""
        elements = sum(math.prod(t.shape) for t in self.tensors)
        return 8 * self.output_bytes / elements if elements else 0.0

    @property
    def selected_bits_per_weight(self) -> float:
        """Output bits per element over the tensors selected for quantization, whether
        they were quantized or kept (what --target-bits budgets)."""
        selected = [t for t in self.tensors if t.selected]
        elements = sum(math.prod(t.shape) for t in selected)
        return 8 * sum(t.output_bytes for t in selected) / elements if elements else 0.0

    @property
    def schemes(self) -> list[tuple[str, int]]:
        """How many tensors got each scheme (and "kept" for selected tensors left in their
        dtype), most first: the allocation of rules and targets."""
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            if tensor.selected:
                label = tensor.scheme.describe() if tensor.scheme else "kept"
                counts[label] = counts.get(label, 0) + 1
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    @property
    def pooled_stats(self) -> ErrorStats:
        """Statistics over every quantized value of the checkpoint together."""
        return ErrorStats.total(tensor.stats for tensor in self.quantized)

    @property
    def pooled_output(self) -> OutputError | None:
        """The output error of every calibrated layer together (None: none was)."""
        outputs = [tensor.output for tensor in self.quantized if tensor.output is not None]
        if not outputs:
            return None
        pooled = OutputError()
        for output in outputs:
            pooled = pooled.merge(output)
        return pooled

    def worst(self, count: int = 3) -> list[TensorReport]:
        """The quantized tensors with the lowest SQNR."""
        measured = [(t.stats.sqnr_db, t.name, t) for t in self.quantized if t.stats is not None]
        return [t for _, _, t in sorted(measured)[:count]]


# -------------------------------------------------------------------------- calibrate


@dataclass(frozen=True)
class CalibrateReport:
    source: Path
    output: Path
    sequences: int
    length: int
    tokens: int
    layers: int  # linear layers calibrated
    inputs: int  # distinct inputs recorded (layers that read one input share it)
    seconds: float


# ------------------------------------------------------------------------- dequantize


@dataclass(frozen=True)
class DequantizedTensor(NamedTensor):
    restored_from: Scheme | None  # None: copied unchanged


@dataclass(frozen=True)
class DequantizeReport:
    source: Path
    output: Path
    tensors: list[DequantizedTensor]
    output_bytes: int
    folder: FolderReport | None = None  # None: the output is one file


# ---------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class InspectedTensor(NamedTensor):
    """One stored tensor. ``role`` is "tensor" for a plain one, else what it is to the
    quantized weight ``of`` ("codes", "scale", "zero_point", "shape")."""

    nbytes: int
    role: str
    of: str | None = None
    scheme: Scheme | None = None  # on the codes: the weight's scheme, dtype and shape
    original_dtype: str | None = None
    weight_shape: tuple[int, ...] | None = None
    description: str | None = None  # on the codes: how the weight is stored
    shard: str | None = None


@dataclass(frozen=True)
class InspectReport:
    source: Path
    shards: list[tuple[str, int]]  # (file name, size in bytes)
    metadata: dict[str, str]
    tensors: list[InspectedTensor]
    format: str | None = None  # the format of its quantized weights; None: a float file
    format_version: str | None = None
    sharded: bool = False
    tensor_metadata_keys: tuple[str, ...] = ()  # metadata describing tensors one by one
    refused: str | None = None  # what it is, when quantized in a way qz does not read

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.shards)

    @property
    def quantized(self) -> list[InspectedTensor]:
        return [t for t in self.tensors if t.role == "codes"]

    @property
    def parameter_count(self) -> int:
        """Elements of the model: of every plain tensor and every quantized weight."""
        return sum(math.prod(t.weight_shape if t.weight_shape is not None else t.shape)
                   for t in self.tensors if t.role in ("tensor", "codes"))


# ------------------------------------------------------------------------------- diff


@dataclass(frozen=True)
class Comparison:
    """A tensor both sides hold with the same shape, and how each side stores it."""

    name: str
    shape: tuple[int, ...]
    a: str
    b: str


@dataclass(frozen=True)
class TensorDifference(Comparison):
    """A floating tensor: the error statistics of B against A."""

    stats: ErrorStats


@dataclass(frozen=True)
class ExactComparison(Comparison):
    """An integer (or other non-floating) tensor compared element by element."""

    differing: int  # elements that differ

    @property
    def equal(self) -> bool:
        return self.differing == 0


@dataclass(frozen=True)
class DiffReport:
    """``compared``: floating tensors with their error statistics (what is pooled);
    ``exact``: integer and other tensors compared element by element."""

    a: Path
    b: Path
    compared: list[TensorDifference]
    exact: list[ExactComparison] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list)
    not_comparable: list[tuple[str, str, str]] = field(default_factory=list)  # name, a, b

    @property
    def pooled_stats(self) -> ErrorStats:
        return ErrorStats.total(tensor.stats for tensor in self.compared)

    def worst(self, count: int = 3) -> list[TensorDifference]:
        """The compared tensors with the lowest SQNR."""
        return [t for _, _, t in sorted((t.stats.sqnr_db, t.name, t)
                                        for t in self.compared)[:count]]

    @property
    def identical_names_and_shapes(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.shape_mismatches)
