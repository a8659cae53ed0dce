"""The diff job (``qz diff``): compare two checkpoints tensor by tensor, streaming.

Either side may be a float checkpoint or a quantized one in any format qz reads (restored
on the fly), one file or sharded. Tensors are matched by name. Floating tensors of the
same shape get the error statistics of B against A (A is the reference); integer and other
non-floating tensors are compared exactly. Both are read in chunks of whole slices along
the first axis, so memory stays bounded by a chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core import ErrorStats, find_non_finite
from ..core.stats import compare
from ..core.values import as_float32
from ..errors import (
    DtypeRangeError,
    InputError,
    NonFiniteValuesError,
    QuantizedFormatError,
    located,
)
from ..formats import StoredWeight
from ..storage.dtypes import DTYPE_BITS, FLOAT_DTYPES, INTEGER_DTYPES, numpy_dtype
from ..storage.header import TensorEntry
from ..storage.reader import SafetensorsReader, row_ranges
from .reports import DiffReport, ExactComparison, NoProgress, Progress, TensorDifference
from .source import Source, open_source

#: Bytes of float32 values per side and chunk.
CHUNK_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class LogicalTensor:
    """A tensor as a model sees it: its name, shape and dtype before quantization, and
    how to read it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the restored dtype for a quantized weight
    reader: SafetensorsReader
    entry: TensorEntry  # the stored tensor (the codes, for a quantized weight)
    weight: StoredWeight | None = None

    @property
    def stored_bytes(self) -> int:
        """Bytes of the file this tensor is read from (codes and companions)."""
        if self.weight is None:
            return self.entry.nbytes
        return sum(self.reader.header[name].nbytes for name, _ in self.weight.tensors)

    def label(self) -> str:
        if self.weight is None:
            return self.dtype
        return f"{self.weight.description} (from {self.dtype})"

    @property
    def multiple(self) -> int:
        """Chunks must hold a multiple of this many slices: of as many as the rows a
        stored weight reads together (rows of tiles, packed zero points, an expert of
        gpt-oss) take."""
        if self.weight is None or not self.slices:
            return 1
        rows_per_slice = self.weight.row_view[0] // self.slices
        return -(-self.weight.row_multiple // max(rows_per_slice, 1))

    @property
    def slices(self) -> int:
        """Slices along the first axis (the unit both sides of a comparison read in)."""
        return self.shape[0] if len(self.shape) >= 2 else 1


def logical_tensors(source: Source,
                    reader_for: Callable[[Path], SafetensorsReader]) -> dict[str, LogicalTensor]:
    """The tensors of a checkpoint as the model sees them: the companions of a quantized
    weight (scales, zero points, …) are folded into it."""
    tensors = {}
    for shard in source.shards:
        reader = reader_for(shard.path)
        for entry in shard.entries():
            weight = shard.weight(entry.name)
            if weight is not None:
                tensors[weight.name] = LogicalTensor(weight.name, weight.shape, weight.dtype,
                                                     reader, reader.header[weight.codes],
                                                     weight)
            else:
                tensors[entry.name] = LogicalTensor(entry.name, entry.shape, entry.dtype,
                                                    reader, entry)
    return tensors


def diff_checkpoints(a: str | Path, b: str | Path, chunk_bytes: int = CHUNK_BYTES,
                     progress: Progress | None = None) -> DiffReport:
    """Compare checkpoint B against checkpoint A (the reference), tensor by tensor;
    ``progress`` counts the stored bytes of both sides as they are read.

    >>> report = diff_checkpoints("model.safetensors", "model.int8.safetensors")  # doctest: +SKIP
    >>> report.pooled_stats.sqnr_db                                              # doctest: +SKIP
    42.87

    Raises:
        QzError: either checkpoint is invalid, or a compared tensor holds NaN or ±inf.
    """
    left, right = open_source(a), open_source(b)
    with ExitStack() as stack:
        readers: dict[Path, SafetensorsReader] = {}

        def reader_for(path: Path) -> SafetensorsReader:
            if path not in readers:
                readers[path] = stack.enter_context(SafetensorsReader(path))
            return readers[path]

        left_tensors = logical_tensors(left, reader_for)
        right_tensors = logical_tensors(right, reader_for)
        report = DiffReport(left.checkpoint.source, right.checkpoint.source, [],
                            only_in_a=sorted(set(left_tensors) - set(right_tensors)),
                            only_in_b=sorted(set(right_tensors) - set(left_tensors)))
        common = sorted(set(left_tensors) & set(right_tensors))
        if not common:
            raise InputError(located(right.checkpoint.source, None, f"has no tensor in "
                                     f"common with {left.checkpoint.source}: there is "
                                     "nothing to compare"),
                             hint="qz inspect lists each side's tensor names")
        progress = progress or NoProgress()
        progress.start(sum(left_tensors[name].stored_bytes + right_tensors[name].stored_bytes
                           for name in common
                           if left_tensors[name].shape == right_tensors[name].shape),
                       "comparing")
        for name in common:
            one, other = left_tensors[name], right_tensors[name]
            if one.shape != other.shape:
                report.shape_mismatches.append((name, one.shape, other.shape))
            elif one.dtype in FLOAT_DTYPES and other.dtype in FLOAT_DTYPES:
                report.compared.append(TensorDifference(
                    name, one.shape, one.label(), other.label(),
                    _compare(one, other, chunk_bytes, progress)))
            elif _exactly_comparable(one, other):
                differing = sum(int(np.count_nonzero(x != y)) for x, y in zip(
                    _exact_chunks(one, chunk_bytes), _exact_chunks(other, chunk_bytes),
                    strict=True))
                report.exact.append(ExactComparison(name, one.shape, one.label(),
                                                    other.label(), differing))
            else:
                report.not_comparable.append((name, one.label(), other.label()))
            progress.advance(one.stored_bytes + other.stored_bytes, name)
    return report


def _compare(one: LogicalTensor, other: LogicalTensor, chunk_bytes: int,
             progress: Progress) -> ErrorStats:
    """The error statistics of ``other`` against ``one``, chunk by chunk."""
    stats = ErrorStats()
    multiple = math.lcm(one.multiple, other.multiple)
    for values, approximation in zip(_float_chunks(one, chunk_bytes, multiple),
                                     _float_chunks(other, chunk_bytes, multiple),
                                     strict=True):
        chunk_stats = compare(values, approximation)
        # Squares of finite float32 values cannot overflow float64: a non-finite sum
        # means a non-finite value, which is refused, naming the tensor and where.
        if not math.isfinite(chunk_stats.signal_energy + chunk_stats.dequantized_energy):
            for side in (one, other):
                _refuse_non_finite(side, chunk_bytes, multiple)
        stats = stats.merge(chunk_stats)
    return stats


def _slice_ranges(tensor: LogicalTensor, bytes_per_slice: int, chunk_bytes: int,
                  multiple: int = 1) -> list[tuple[int, int]]:
    return row_ranges(tensor.slices, bytes_per_slice, chunk_bytes, multiple)


def _float_chunks(tensor: LogicalTensor, chunk_bytes: int,
                  multiple: int) -> Iterator[np.ndarray]:
    """The tensor's values as float32, in chunks of whole slices along the first axis (the
    chunks of both sides of a comparison line up because they have the same shape and
    the same ``multiple``)."""
    per_slice = math.prod(tensor.shape) // tensor.slices if tensor.slices else 0
    for start, stop in _slice_ranges(tensor, per_slice * 4, chunk_bytes, multiple):
        yield _read_float_slices(tensor, start, stop, per_slice)


def _refuse_non_finite(tensor: LogicalTensor, chunk_bytes: int, multiple: int) -> None:
    count, index = find_non_finite(_float_chunks(tensor, chunk_bytes, multiple), tensor.shape)
    if count:
        raise NonFiniteValuesError.build(tensor.name, count, index, tensor.reader.path)


def _read_float_slices(tensor: LogicalTensor, start: int, stop: int,
                       per_slice: int) -> np.ndarray:
    """Slices [start, stop) along the first axis, as a flat float32 array."""
    reader, weight = tensor.reader, tensor.weight
    if weight is None:
        dtype = numpy_dtype(tensor.entry.dtype)
        raw = np.empty((stop - start) * per_slice, dtype=dtype)
        reader.read_into(tensor.entry, start * per_slice * dtype.itemsize, raw)
        return as_float32(raw)
    # Rows of the weight's row view per slice of the first axis (a whole number for every
    # granularity, since its rows never cross a slice).
    per = weight.row_view[0] // tensor.slices if tensor.slices else 0
    rows = weight.read_rows(reader, start * per, stop * per)
    try:
        values = weight.dequantize_rows(rows, np.float32, reader.path)
    except DtypeRangeError:
        raise QuantizedFormatError(located(reader.path, tensor.name, "scales too large: the "
                                           "values overflow float32")) from None
    return values.reshape(-1)


def _exactly_comparable(one: LogicalTensor, other: LogicalTensor) -> bool:
    """Integer and bool tensors compare by value; other dtypes only with their own kind."""
    both_integers = one.dtype in INTEGER_DTYPES and other.dtype in INTEGER_DTYPES
    return (one.weight is None and other.weight is None
            and (both_integers or one.dtype == other.dtype))


def _exact_chunks(tensor: LogicalTensor, chunk_bytes: int) -> Iterator[np.ndarray]:
    """The stored elements in chunks of whole slices: integers as their values, any
    other dtype as the unsigned integers of its bits (bytes for widths below 8)."""
    entry = tensor.entry
    bits = DTYPE_BITS[entry.dtype]
    if entry.dtype in INTEGER_DTYPES:
        dtype = INTEGER_DTYPES[entry.dtype]
    else:
        dtype = np.dtype(f"<u{bits // 8}") if bits in (8, 16, 32, 64) else np.dtype(np.uint8)
    per_slice = entry.nbytes // dtype.itemsize // tensor.slices if tensor.slices else 0
    # Ranges as if every element took 8 bytes, so both sides split alike whatever their
    # integer widths.
    for start, stop in _slice_ranges(tensor, per_slice * 8, chunk_bytes):
        values = np.empty((stop - start) * per_slice, dtype=dtype)
        tensor.reader.read_into(entry, start * per_slice * dtype.itemsize, values)
        yield values
