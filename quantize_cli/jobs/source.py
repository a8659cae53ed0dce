"""A checkpoint as the model it stands for: the one step every job takes before any work.

A checkpoint is float, or quantized in a format qz reads (its files' headers say which,
and config.json's ``quantization_config`` must agree), or quantized in a way qz does not
read (GPTQ, AWQ, bitsandbytes, …), which every job but ``inspect`` refuses by name. Of a
quantized file, the model sees each weight under its own name, shape and dtype, and
never its codes, scales or activation scales: :class:`SourceShard` lists the tensors that
way, and :class:`SourceStream` reads them so, dequantizing weights row chunk by row chunk
(memory stays bounded by a chunk, as for float input).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, located
from ..formats import READERS, ModelFormat, Refused, StoredWeight, declared_method, detect
from ..formats import refused as refused_quantization
from ..storage.checkpoint import Checkpoint, Shard, open_checkpoint
from ..storage.dtypes import numpy_dtype
from ..storage.header import Header, TensorEntry
from ..storage.reader import SafetensorsReader, row_ranges
from ..storage.stream import ShardStream, StreamHasher, TensorChunks
from .outputs import model_config
from .provenance import without_qz_keys


@dataclass(frozen=True)
class SourceShard:
    """One file of a checkpoint: the format it is in (None: float) and its quantized
    weights."""

    shard: Shard
    fmt: ModelFormat | None
    weights: tuple[StoredWeight, ...] = ()
    _by_name: dict[str, StoredWeight] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {weight.name: weight for weight in self.weights})

    @property
    def path(self) -> Path:
        return self.shard.path

    def weight(self, name: str) -> StoredWeight | None:
        """The quantized weight the model knows as ``name``, if it is one."""
        return self._by_name.get(name)

    @property
    def by_codes(self) -> dict[str, StoredWeight]:
        """The quantized weights by the name of their codes."""
        return {weight.codes: weight for weight in self.weights}

    @property
    def stored(self) -> set[str]:
        """Every stored tensor that is part of a quantized weight."""
        return {name for weight in self.weights for name, _ in weight.tensors}

    def float_metadata(self) -> dict[str, str]:
        """The file's ``__metadata__`` as a float file of the model has it: without qz's
        keys and what its format added."""
        metadata = without_qz_keys(self.shard.header.metadata)
        return self.fmt.float_metadata(metadata) if self.fmt is not None else metadata

    def header(self) -> Header:
        """The file's header as the model's tensors (:meth:`entries`), for planning."""
        header = self.shard.header
        return Header(self.float_metadata(), self.entries(), header.data_start)

    def entries(self) -> tuple[TensorEntry, ...]:
        """The file's tensors as the model has them, in file order: each quantized
        weight where its codes are, under its own name, shape and restored dtype (its
        extent covers the bytes it is stored in: codes and companions), and every other
        tensor as it is. These entries are never read raw: :class:`SourceStream` reads
        them."""
        header = self.shard.header
        by_codes, stored = self.by_codes, self.stored
        found = []
        for entry in header.tensors:
            weight = by_codes.get(entry.name)
            if weight is not None:
                size = sum(header[name].nbytes for name, _ in weight.tensors)
                found.append(TensorEntry(weight.name, weight.dtype, weight.shape, entry.begin,
                                         entry.begin + size))
            elif entry.name not in stored:
                found.append(entry)
        return tuple(found)


@dataclass(frozen=True)
class Source:
    """A checkpoint, its config.json, and what each of its files holds."""

    checkpoint: Checkpoint
    config: dict[str, Any] | None
    shards: tuple[SourceShard, ...]
    refused: Refused | None = None  # a quantization qz does not read (inspect only)

    @property
    def formats(self) -> list[ModelFormat]:
        """The formats of its quantized files (one, in every checkpoint qz has seen)."""
        return list(dict.fromkeys(shard.fmt for shard in self.shards if shard.fmt))

    @property
    def quantized(self) -> bool:
        return bool(self.formats)

    def float_config(self) -> dict[str, Any] | None:
        """config.json as it is for the float model: without what the quantized format
        added (its ``quantization_config``, qz's markers)."""
        if self.config is None or not self.formats:
            return self.config
        return self.formats[0].float_config(self.config)


def open_source(path: str | Path, *, describe_only: bool = False) -> Source:
    """Open a checkpoint and find what its files hold, from the headers and config.json
    (no tensor data is read, except the tiny tensors that describe a weight).

    Raises:
        InputError: it is quantized in a way qz does not read (unless ``describe_only``:
            then ``Source.refused`` says so), or config.json declares a quantization that
            no file holds.
        QuantizedFormatError: a file breaks the format it is in.
    """
    checkpoint = open_checkpoint(path)
    config = model_config(checkpoint)
    found = refused_quantization(config, [shard.header for shard in checkpoint.shards],
                                 READERS)
    if found is not None and not describe_only:
        raise InputError(located(checkpoint.source, None, f"is {found.what}"), hint=found.hint)
    shards = []
    for shard in checkpoint.shards:
        fmt = detect(shard.header)
        weights: list[StoredWeight] = []
        if fmt is not None:
            with SafetensorsReader(shard.path) as reader:
                weights = fmt.find(reader, config)
        shards.append(SourceShard(shard, fmt, tuple(weights)))
    source = Source(checkpoint, config, tuple(shards), found)
    declared = declared_method(config)
    if found is None and declared is not None and not any(
            fmt.name == declared for fmt in source.formats):
        holds = (f"its files hold {source.formats[0].name}" if source.formats
                 else "no file holds quantized weights")
        raise InputError(
            located(checkpoint.source, None, f"config.json declares {declared} "
                    f"quantization, but {holds}"),
            hint="config.json and the weights must agree: restore the config.json that "
                 "came with these files")
    return source


class DequantizedChunks(TensorChunks):
    """The rows of a quantized weight's ``row_shape`` view, dequantized chunk by chunk
    from the rows it is stored in, to its restored dtype: the values ``qz dequantize``
    writes, which a job computes on as it would on that float checkpoint (MLX's affine
    codes, for one, are made in the weight's own dtype). Chunks are sized by their
    float32 values; each is a whole number of stored rows (and of the rows a stored
    layout reads together, such as a row of 128 × 128 tiles)."""

    def __init__(self, reader: SafetensorsReader, weight: StoredWeight, entry: TensorEntry,
                 row_shape: tuple[int, int], multiple: int, chunk_bytes: int) -> None:
        self.entry = entry
        self.path = reader.path
        self.row_shape = row_shape
        self.dtype = numpy_dtype(entry.dtype)
        self._reader = reader
        self._weight = weight
        stored_columns = weight.row_view[1]
        # Requested rows per chunk start where stored reads may start: at multiples of
        # the stored rows a read holds, in elements.
        unit = math.lcm(row_shape[1], stored_columns * weight.row_multiple) // row_shape[1]
        self.ranges = row_ranges(row_shape[0], row_shape[1] * 4, chunk_bytes,
                                 math.lcm(multiple, unit))
        self._kept: np.ndarray | None = None

    def with_rows(self) -> Iterator[tuple[int, np.ndarray]]:
        if self._kept is not None:
            yield 0, self._kept
            return
        columns = self.row_shape[1]
        stored_columns = self._weight.row_view[1]
        for start, stop in self.ranges:
            first, last = start * columns // stored_columns, -(-stop * columns // stored_columns)
            rows = self._weight.read_rows(self._reader, first, last)
            values = self._weight.dequantize_rows(rows, self.dtype, self.path)
            chunk = values.reshape(stop - start, columns)
            if len(self.ranges) == 1:
                self._kept = chunk
            yield start, chunk


class SourceStream:
    """The reads a job makes on one file, as the model's tensors: a float tensor through
    the file's read-ahead stream (and hashed on the way when a ``hasher`` is given), a
    quantized weight dequantized chunk by chunk. ``layout`` is :class:`ShardStream`'s,
    in the model's tensors (:meth:`SourceShard.entries`)."""

    def __init__(self, shard: SourceShard, reader: SafetensorsReader,
                 layout: Sequence[tuple[TensorEntry, tuple[int, int] | None, int]],
                 chunk_bytes: int, hasher: StreamHasher | None = None) -> None:
        self._shard = shard
        self._reader = reader
        self._chunk_bytes = chunk_bytes
        self._stream = ShardStream(reader, [step for step in layout
                                            if shard.weight(step[0].name) is None],
                                   chunk_bytes, hasher)

    def rows(self, entry: TensorEntry, row_shape: tuple[int, int],
             multiple: int = 1) -> TensorChunks:
        """The tensor's row chunks in its dtype, as often as they are iterated."""
        weight = self._shard.weight(entry.name)
        if weight is None:
            return self._stream.rows(entry, row_shape, multiple)
        return DequantizedChunks(self._reader, weight, entry, row_shape, multiple,
                                 self._chunk_bytes)

    def pieces(self, entry: TensorEntry) -> Iterator[np.ndarray]:
        """The tensor's bytes as the model holds it (a quantized weight restored to its
        dtype), in pieces of about ``chunk_bytes``."""
        weight = self._shard.weight(entry.name)
        if weight is None:
            yield from self._stream.pieces(entry)
            return
        columns = entry.shape[-1] if entry.shape else 1
        view = (math.prod(entry.shape) // columns, columns)
        for chunk in DequantizedChunks(self._reader, weight, entry, view, 1, self._chunk_bytes):
            yield chunk.reshape(-1).view(np.uint8)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> SourceStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

