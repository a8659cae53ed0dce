"""The dequantize job: turn a quantized checkpoint, in any format qz reads, back into a
float checkpoint with the original tensor names, shapes and dtypes."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import DtypeRangeError, OutputError, QuantizedFormatError, located
from ..formats import DEQUANTIZED_SUFFIX, READERS, StoredWeight
from ..storage.dtypes import OUTPUT_DTYPES, numpy_dtype
from ..storage.reader import DEFAULT_CHUNK_BYTES, SafetensorsReader, row_ranges
from ..storage.stream import ReadAhead
from ..storage.writer import PlannedTensor, SafetensorsWriter
from . import outputs
from .provenance import restored_from
from .reports import DequantizedTensor, DequantizeReport, NoProgress, Progress
from .source import SourceShard, open_source


def dequantize_checkpoint(
    source: str | Path,
    output: str | Path | None = None,
    dtype: str = "original",
    *,
    force: bool = False,
    progress: Progress | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> DequantizeReport:
    """Turn a quantized checkpoint, in any format qz reads, back into a float one with
    the original tensor names, shapes and dtypes (or ``dtype``: float32, float16 or
    bfloat16 for every restored tensor). compressed-tensors weights are restored to the
    dtype of their scales, as compressed-tensors itself does; fine-grained FP8 and
    gpt-oss's MXFP4 to the model's dtype (BF16), as transformers does.

    >>> dequantize_checkpoint("model.int8.safetensors").output   # doctest: +SKIP
    PosixPath('model.dequant.safetensors')

    Raises:
        QzError: the input is invalid or not quantized in a format qz reads, a stored
            number breaks its format, a value does not fit ``dtype``, or the output
            cannot be written. Nothing is written then.
    """
    if dtype != "original" and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    progress = progress or NoProgress()
    opened = open_source(source)
    checkpoint = opened.checkpoint
    output_plan = outputs.plan_output(checkpoint, output, DEQUANTIZED_SUFFIX, folder_format=False)
    if not opened.quantized:
        raise QuantizedFormatError(located(
            checkpoint.source, None, "not a quantized checkpoint: no file is in a format "
            f"qz reads ({', '.join(READERS)})"))
    tensors: list[DequantizedTensor] = []
    output_bytes = 0
    progress.start(checkpoint.data_bytes, "dequantizing")
    with outputs.Destination(output_plan, checkpoint, force) as destination:
        shard_tensors = {}
        for source_shard in opened.shards:
            shard = source_shard.shard
            planned, restored = _plan_shard(source_shard, dtype)
            shard_target = destination.path_for(shard)
            _dequantize_shard(source_shard, planned, restored, shard_target, progress,
                              chunk_bytes)
            shard_tensors[shard.path.name] = planned
            output_bytes += shard_target.stat().st_size
            tensors += [DequantizedTensor(t.name, t.dtype, t.shape,
                                          restored[t.name].scheme if t.name in restored
                                          else None) for t in planned]
        if output_plan.folder:
            config = opened.float_config()
            outputs.finish_folder(destination, checkpoint, shard_tensors,
                                  None if config is None else _float_config(config, dtype))
        destination.publish()
    return DequantizeReport(checkpoint.source, output_plan.path, tensors, output_bytes,
                            outputs.folder_report(output_plan))


def _float_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The dequantized model's config.json: its dtype keys say ``dtype`` when one was
    asked for, so that loaders take the weights as what they now are."""
    if dtype == "original":
        return config
    return {key: dtype if key in ("dtype", "torch_dtype") else value
            for key, value in config.items()}


def _plan_shard(shard: SourceShard,
                dtype: str) -> tuple[list[PlannedTensor], dict[str, StoredWeight]]:
    """The shard's output tensors (restored weights where their codes were, everything
    that is not part of a quantized weight as it is), and the restored weights by name."""
    planned, restored = [], {}
    for tensor in shard.entries():
        weight = shard.weight(tensor.name)
        if weight is not None:
            out_dtype = weight.dtype if dtype == "original" else OUTPUT_DTYPES[dtype]
            planned.append(PlannedTensor(weight.name, out_dtype, weight.shape))
            restored[weight.name] = weight
        else:
            planned.append(PlannedTensor(tensor.name, tensor.dtype, tensor.shape))
    return planned, restored


def _dequantize_shard(source_shard: SourceShard, planned: list[PlannedTensor],
                      restored: dict[str, StoredWeight], target: Path, progress: Progress,
                      chunk_bytes: int) -> None:
    shard = source_shard.shard
    header = shard.header
    with ExitStack() as stack:
        reader = stack.enter_context(SafetensorsReader(shard.path))
        metadata = source_shard.float_metadata()
        metadata.update(restored_from(shard.path.name))
        writer = stack.enter_context(SafetensorsWriter(target, planned, metadata,
                                                       outputs.permissions(shard.path)))
        # Every read of the shard, in order: raw pieces of the tensors that are copied and
        # stored rows of the quantized weights; each is read while the one before is
        # being restored and written.
        steps: list[tuple[PlannedTensor, StoredWeight | None, Callable[[], Any]]] = []
        for tensor in planned:
            weight = restored.get(tensor.name)
            if weight is None:
                entry = header[tensor.name]
                steps += [(tensor, None, partial(reader.read_bytes, entry, start, stop))
                          for start, stop in row_ranges(entry.nbytes, 1, chunk_bytes)]
            else:
                rows, columns = weight.row_view
                # Chunks are sized by the float32 values they become, the largest buffer.
                steps += [(tensor, weight, partial(weight.read_rows, reader, start, stop))
                          for start, stop in row_ranges(rows, columns * 4, chunk_bytes,
                                                        weight.row_multiple)]
        reads = stack.enter_context(ReadAhead([(index, read) for index, (_, _, read)
                                               in enumerate(steps)]))
        for index, (tensor, weight, read) in enumerate(steps):
            stored = reads.take(index, read)
            if weight is None:
                writer.write(tensor.name, stored)
                progress.advance(stored.nbytes, tensor.name)
                continue
            try:
                values = weight.dequantize_rows(stored, numpy_dtype(tensor.dtype), reader.path)
            except DtypeRangeError:
                raise OutputError(
                    located(reader.path, weight.name, f"values exceed the range of "
                            f"{tensor.dtype}"),
                    hint="choose a wider --dtype",
                ) from None
            writer.write(tensor.name, values)
            progress.advance(stored.codes.nbytes, tensor.name)
        reader.check_unchanged()
        writer.publish()
