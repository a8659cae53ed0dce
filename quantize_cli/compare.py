"""``qz diff``: compare two checkpoints tensor by tensor, streaming.

Either side may be a float checkpoint or a qz-quantized one (dequantized on the fly), one
file or sharded. Tensors are matched by name; for each pair with the same shape the error
statistics of B against A (A is the reference) are computed in row chunks along the first
axis, so memory stays bounded by a chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .core.quantize import as_float32, dequantize_rows
from .core.stats import ErrorStats, error_stats
from .errors import DtypeRangeError, NonFiniteValuesError, QuantizedFormatError, located
from .qzformat import check_stored_values
from .restore import Restore, find_restores, read_rows
from .storage.checkpoint import Checkpoint, open_checkpoint
from .storage.dtypes import FLOAT_DTYPES, numpy_dtype
from .storage.header import TensorEntry
from .storage.reader import SafetensorsReader

#: Bytes of float64 per side and chunk (statistics are summed in float64).
CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class LogicalTensor:
    """A tensor as a model sees it: its name, shape and dtype before quantization."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the original dtype for a quantized tensor
    shard: Path
    entry: TensorEntry  # the stored tensor (the codes, for a quantized one)
    quantized: Restore | None = None

    def label(self) -> str:
        if self.quantized is None:
            return self.dtype
        layout = "compressed-tensors " if self.quantized.foreign else ""
        return f"I8 {layout}{self.quantized.scheme.describe()} (from {self.dtype})"


@dataclass(frozen=True)
class TensorDifference:
    name: str
    shape: tuple[int, ...]
    a: str
    b: str
    stats: ErrorStats


@dataclass(frozen=True)
class DiffReport:
    a: Path
    b: Path
    compared: list[TensorDifference]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list)
    not_comparable: list[tuple[str, str, str]] = field(default_factory=list)  # name, a, b

    @property
    def pooled_stats(self) -> ErrorStats:
        pooled = ErrorStats()
        for tensor in self.compared:
            pooled = pooled.merge(tensor.stats)
        return pooled

    @property
    def identical_names_and_shapes(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.shape_mismatches)


def logical_tensors(
    checkpoint: Checkpoint, reader_for: Callable[[Path], SafetensorsReader]
) -> dict[str, LogicalTensor]:
    """The tensors of a checkpoint as the model sees them: the scales and zero points of
    a quantized file (qz or compressed-tensors) are folded into their tensors."""
    tensors = {}
    for shard in checkpoint.shards:
        restores = find_restores(reader_for(shard.path))
        by_codes = {restore.codes: restore for restore in restores.values()}
        stored = {name for restore in restores.values() for name in restore.stored}
        for entry in shard.header.tensors:
            restore = by_codes.get(entry.name)
            if restore is not None:
                tensors[restore.name] = LogicalTensor(restore.name, restore.shape,
                                                      restore.dtype, shard.path, entry, restore)
            elif entry.name not in stored:
                tensors[entry.name] = LogicalTensor(entry.name, entry.shape, entry.dtype,
                                                    shard.path, entry)
    return tensors


def diff_checkpoints(a: str | Path, b: str | Path, chunk_bytes: int = CHUNK_BYTES) -> DiffReport:
    """Compare checkpoint B against checkpoint A (the reference), tensor by tensor.

    >>> diff_checkpoints("model.safetensors", "model.int8.safetensors").pooled_stats.sqnr_db  # doctest: +SKIP
    42.87

    Raises:
        QzError: either checkpoint is invalid, or a compared tensor holds NaN or ±inf.
    """
    left, right = open_checkpoint(a), open_checkpoint(b)
    with ExitStack() as stack:
        readers: dict[Path, SafetensorsReader] = {}

        def reader_for(path: Path) -> SafetensorsReader:
            if path not in readers:
                readers[path] = stack.enter_context(SafetensorsReader(path))
            return readers[path]

        left_tensors = logical_tensors(left, reader_for)
        right_tensors = logical_tensors(right, reader_for)
        report = DiffReport(left.source, right.source, [],
                            sorted(set(left_tensors) - set(right_tensors)),
                            sorted(set(right_tensors) - set(left_tensors)))
        for name in sorted(set(left_tensors) & set(right_tensors)):
            one, other = left_tensors[name], right_tensors[name]
            if one.shape != other.shape:
                report.shape_mismatches.append((name, one.shape, other.shape))
                continue
            if one.dtype not in FLOAT_DTYPES or other.dtype not in FLOAT_DTYPES:
                if one.dtype != other.dtype:
                    report.not_comparable.append((name, one.label(), other.label()))
                    continue
            stats = ErrorStats()
            for values, approximation in zip(
                _value_chunks(reader_for(one.shard), one, chunk_bytes),
                _value_chunks(reader_for(other.shard), other, chunk_bytes),
            ):
                stats = stats.merge(error_stats(values, approximation))
            report.compared.append(TensorDifference(name, one.shape, one.label(),
                                                    other.label(), stats))
    return report


def _value_chunks(
    reader: SafetensorsReader, tensor: LogicalTensor, chunk_bytes: int
) -> Iterator[np.ndarray]:
    """The tensor's values as float64, in chunks of whole slices along the first axis (the
    chunks of both sides of a comparison line up because they have the same shape)."""
    shape = tensor.shape
    leading = shape[0] if len(shape) >= 2 else 1
    per_slice = math.prod(shape) // leading if leading else 0
    step = max(1, chunk_bytes // max(per_slice * 8, 1))
    for start in range(0, leading, step):
        stop = min(leading, start + step)
        values = _read_slices(reader, tensor, start, stop, per_slice)
        if not np.isfinite(values).all():
            bad = ~np.isfinite(values)
            first = start * per_slice + int(np.argmax(bad))
            index = tuple(int(i) for i in np.unravel_index(first, shape))
            raise NonFiniteValuesError.build(tensor.name, int(np.count_nonzero(bad)), index,
                                             reader.path)
        yield values.astype(np.float64)


def _read_slices(
    reader: SafetensorsReader, tensor: LogicalTensor, start: int, stop: int, per_slice: int
) -> np.ndarray:
    """Slices [start, stop) along the first axis, as a flat float32 array."""
    entry = tensor.entry
    if tensor.quantized is None:
        dtype = numpy_dtype(entry.dtype)
        raw = np.empty((stop - start) * per_slice, dtype=dtype)
        reader.read_into(entry, start * per_slice * dtype.itemsize, raw)
        return as_float32(raw) if entry.dtype in FLOAT_DTYPES else raw.astype(np.float32)
    restore = tensor.quantized
    rows = restore.scheme.row_view_shape(tensor.shape)[0]
    leading = tensor.shape[0] if len(tensor.shape) >= 2 else 1
    # Rows of the scheme's row view per slice of the first axis (a whole number for every
    # granularity, since its rows never cross a slice).
    per = rows // leading if leading else 0
    codes, scale, zero_point = read_rows(reader, restore, start * per, stop * per)
    check_stored_values(reader.path, tensor.name, restore.scheme, codes, scale,
                        check_codes=not restore.foreign)
    try:
        return dequantize_rows(codes, scale, zero_point, restore.scheme).reshape(-1)
    except DtypeRangeError:
        raise QuantizedFormatError(located(reader.path, tensor.name, "scales too large: the "
                                           "values overflow float32")) from None
