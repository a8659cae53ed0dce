"""The jobs: quantize, dequantize and inspect checkpoints, streaming tensor by tensor.

Each job opens and validates the whole checkpoint (every header) first, plans the output
from the headers alone, checks the output path, and only then reads data. Tensors are read
in row chunks of at most ``chunk_bytes`` and written as they are produced, so memory is
bounded by a chunk, never by a tensor or the checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack, closing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from .core.params import qparams_from_range
from .core import clip
from .core.quantize import (
    RowResult,
    as_float32,
    dequantize_rows,
    quantize_rows,
    tensor_errors,
    value_range,
)
from .core.scheme import Scheme
from .core.stats import ErrorStats
from .errors import (
    DtypeRangeError,
    InputError,
    InternalCheckError,
    NonFiniteValuesError,
    OutputError,
    QuantizedFormatError,
    SchemeError,
    located,
)
from . import __version__, ctformat
from .plan import TensorPlan, plan_quantization, planned_outputs
from .qzformat import (
    KEY_FORMAT_VERSION,
    KEY_VERSION,
    PENDING_HASH,
    provenance,
    is_quantized,
    plain_metadata,
    check_stored_values,
    quantized_metadata,
    scale_name,
    zero_point_name,
)
from .restore import Restore, find_restores, read_rows
from .storage.checkpoint import Checkpoint, Shard, open_checkpoint
from .storage.dtypes import DTYPE_BITS, OUTPUT_DTYPES, numpy_dtype
from .storage.header import TensorEntry
from .storage.reader import (
    DEFAULT_CHUNK_BYTES,
    SafetensorsReader,
    StreamHasher,
    byte_chunks,
    prefetched,
    row_chunks,
)
from .storage.writer import PlannedTensor, SafetensorsWriter, StagedFolder, check_output_path


class Progress(Protocol):
    """What the jobs report while they run (the CLI draws a progress bar from it)."""

    def start(self, total_bytes: int) -> None: ...

    def advance(self, nbytes: int, tensor: str) -> None: ...


class NoProgress:
    def start(self, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int, tensor: str) -> None:
        pass


# ----------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class TensorReport:
    """What happened to one input tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scheme: Scheme | None  # None: copied unchanged
    reason: str
    input_bytes: int
    output_bytes: int
    stats: ErrorStats | None = None  # None for copied tensors and in a dry run
    shard: str | None = None

    @property
    def bits_per_weight(self) -> float:
        elements = math.prod(self.shape)
        return 8 * self.output_bytes / elements if elements else 0.0


@dataclass(frozen=True)
class QuantizeReport:
    source: Path
    output: Path
    scheme: Scheme
    tensors: list[TensorReport]
    dry_run: bool = False

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
    def pooled_stats(self) -> ErrorStats:
        """Statistics over every quantized value of the checkpoint together."""
        pooled = ErrorStats()
        for tensor in self.quantized:
            if tensor.stats is not None:
                pooled = pooled.merge(tensor.stats)
        return pooled

    def worst(self, count: int = 3) -> list[TensorReport]:
        """The quantized tensors with the lowest SQNR."""
        measured = [t for t in self.quantized if t.stats is not None]
        return sorted(measured, key=lambda t: (t.stats.sqnr_db, t.name))[:count]  # type: ignore[union-attr]


@dataclass(frozen=True)
class DequantizedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    restored_from: Scheme | None  # None: copied unchanged


@dataclass(frozen=True)
class DequantizeReport:
    source: Path
    output: Path
    tensors: list[DequantizedTensor]
    output_bytes: int


@dataclass(frozen=True)
class InspectedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    role: str  # "quantized", "scale", "zero_point" or "tensor"
    scheme: Scheme | None = None  # for quantized tensors
    original_dtype: str | None = None
    of: str | None = None  # scales, zero points: their tensor; packed codes: the weight
    shard: str | None = None
    layout: str = "qz"  # or compressed-tensors' "pack-quantized" / "int-quantized"


@dataclass(frozen=True)
class InspectReport:
    source: Path
    shards: list[tuple[str, int]]  # (file name, size in bytes)
    metadata: dict[str, str]
    tensors: list[InspectedTensor]
    format_version: str | None = None
    sharded: bool = False
    foreign_format: str | None = None  # "compressed-tensors" when recognised

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.shards)

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(t.shape) if t.layout != "pack-quantized" else 4 * math.prod(t.shape)
                   for t in self.tensors if t.role in ("quantized", "tensor"))


T = TypeVar("T", TensorReport, InspectedTensor)


def _by_name(tensors: list[T]) -> list[T]:
    """Reports list tensors by name, so a tensor's scale sits next to it."""
    return sorted(tensors, key=lambda tensor: tensor.name)


# ---------------------------------------------------------------------------- outputs


def default_output(checkpoint: Checkpoint, suffix: str, folder: bool = False) -> Path:
    """``model.safetensors`` → ``model.<suffix>.safetensors``; a sharded folder ``llama``
    → ``llama.<suffix>`` beside it (and ``model.<suffix>`` when ``folder`` is asked for a
    single file). A ``.int8`` in the name is replaced, not stacked."""
    if folder and not checkpoint.sharded:
        path = checkpoint.shards[0].path
        return path.with_name(path.name.removesuffix(".safetensors") + f".{suffix}")
    if checkpoint.sharded:
        folder = checkpoint.folder
        if folder.name in ("", ".", ".."):
            folder = folder.resolve()
        stem = folder.name.removesuffix(".ct-int8").removesuffix(".int8")
        return folder.parent / f"{stem}.{suffix}"
    path = checkpoint.shards[0].path
    stem = path.name.removesuffix(".safetensors").removesuffix(".ct-int8").removesuffix(".int8")
    return path.with_name(f"{stem}.{suffix}.safetensors")


def _check_folder_output(output: Path, checkpoint: Checkpoint, force: bool) -> None:
    if output.exists() and output.resolve() == checkpoint.folder.resolve():
        raise OutputError(located(output, None, "output would overwrite the input folder"),
                          hint="choose another folder with -o")
    if not output.parent.is_dir():
        raise OutputError(located(output, None, f"directory {str(output.parent)!r} does not "
                                  "exist"))
    if output.exists():
        if not output.is_dir():
            raise OutputError(located(output, None, "exists and is not a folder"))
        if not force:
            raise OutputError(located(output, None, "already exists"),
                              hint="use --force to replace it")
        if any(output.iterdir()) and not any(output.glob("*.safetensors.index.json")):
            raise OutputError(located(output, None, "is not a checkpoint folder; refusing to "
                                      "replace it"), hint="choose another folder with -o")


def _write_index(checkpoint: Checkpoint, folder: Path, shard_tensors: dict[str, list[PlannedTensor]]) -> None:
    assert checkpoint.index is not None and checkpoint.index_path is not None
    weight_map = {tensor.name: shard for shard, tensors in shard_tensors.items()
                  for tensor in tensors}
    total = sum(math.prod(t.shape) * DTYPE_BITS[t.dtype] // 8
                for tensors in shard_tensors.values() for t in tensors)
    index = dict(checkpoint.index)
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = total
    index["metadata"] = metadata
    index["weight_map"] = dict(sorted(weight_map.items()))
    text = json.dumps(index, indent=2, ensure_ascii=False) + "\n"
    (folder / checkpoint.index_path.name).write_text(text, encoding="utf-8")


def _copy_companions(checkpoint: Checkpoint, folder: Path) -> None:
    for path in checkpoint.companion_files():
        shutil.copy2(path, folder / path.name)


# --------------------------------------------------------------------------- quantize


def quantize_checkpoint(
    source: str | Path,
    output: str | Path | None = None,
    scheme: Scheme | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
    error_stats: bool = True,
    target_sqnr: float | None = None,
    export: str = "qz",
    hash_source: bool = True,
    progress: Progress | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> QuantizeReport:
    """Quantize a checkpoint (file, index or folder) and write the INT8 result.

    ``error_stats=False`` skips measuring the error (the report then has no statistics);
    the written bytes are the same. ``target_sqnr`` gives each tensor the cheapest scheme
    of :data:`SQNR_LADDER` (with ``scheme``'s method) whose SQNR reaches it, or leaves the
    tensor in its dtype; this measures the candidates first, so it reads the data even in
    a dry run. ``export="compressed-tensors"`` writes what vLLM loads (ctformat.py): a
    folder with the pack-quantized tensors and config.json's ``quantization_config``.
    ``hash_source=False`` records no SHA-256 of the input (it costs about 0.7 s of one core
    per GB).

    >>> report = quantize_checkpoint("model.safetensors", scheme=Scheme("affine"))  # doctest: +SKIP
    >>> report.output, report.pooled_stats.sqnr_db                                 # doctest: +SKIP
    (PosixPath('model.int8.safetensors'), 40.7)

    Raises:
        QzError: the input is invalid or already quantized, nothing would be quantized,
            a tensor holds NaN/inf, or the output cannot be written. Nothing is written
            then.
    """
    scheme = scheme or Scheme()
    progress = progress or NoProgress()
    as_ct = export == ctformat.FORMAT
    if as_ct:
        ctformat.check_scheme(scheme)
        if target_sqnr is not None:
            raise SchemeError("--target-sqnr cannot be combined with the compressed-tensors "
                              "format, which has one scheme for all layers")
    checkpoint = open_checkpoint(source)
    for shard in checkpoint.shards:
        if is_quantized(shard.header):
            raise InputError(
                located(shard.path, None, "is already quantized by qz (format version "
                        f"{shard.header.metadata[KEY_FORMAT_VERSION]})"),
                hint="run qz dequantize first",
            )
    plans = {
        shard.path.name: plan_quantization(shard.header, scheme, shard.path, include, exclude)
        for shard in checkpoint.shards
    }
    if target_sqnr is not None:
        for shard in checkpoint.shards:
            with SafetensorsReader(shard.path) as reader:
                plans[shard.path.name] = [
                    _choose_for_target(reader, plan, scheme.method, target_sqnr, chunk_bytes)
                    if plan.quantized else plan
                    for plan in plans[shard.path.name]
                ]
    if as_ct:
        plans = {name: [_as_ct_plan(plan) for plan in shard_plans]
                 for name, shard_plans in plans.items()}
    all_plans = [plan for shard_plans in plans.values() for plan in shard_plans]
    if target_sqnr is not None and all_plans and not any(p.quantized for p in all_plans):
        raise InputError(
            located(checkpoint.source, None, f"no tensor reaches the target SQNR of "
                    f"{target_sqnr:g} dB"),
            hint="lower --target-sqnr; the reasons in --dry-run show what each tensor reaches",
        )
    if not any(plan.quantized for plan in all_plans):
        what = "has no tensors" if not all_plans else "has no tensor to quantize"
        raise InputError(
            located(checkpoint.source, None, what),
            hint=None if not all_plans else "qz quantizes float tensors with ≥ 2 dimensions "
            "and ≥ 1024 elements; --include selects others",
        )
    target = Path(output) if output is not None else default_output(
        checkpoint, "ct-int8" if as_ct else "int8", folder=as_ct)
    options = {"method": scheme.method, "granularity": scheme.granularity,
               "block": scheme.block_size, "clip": scheme.clip, "include": list(include),
               "exclude": list(exclude), "target_sqnr": target_sqnr, "format": export}
    if not hash_source:
        options["hash"] = False

    def report_for(shard: Shard, stats: dict[str, ErrorStats]) -> list[TensorReport]:
        return [
            TensorReport(
                name=plan.name, dtype=plan.entry.dtype, shape=plan.entry.shape,
                scheme=plan.scheme, reason=plan.reason, input_bytes=plan.entry.nbytes,
                output_bytes=plan.output_bytes(), stats=stats.get(plan.name),
                shard=shard.path.name if checkpoint.sharded else None,
            )
            for plan in plans[shard.path.name]
        ]

    if dry_run:
        tensors = [t for shard in checkpoint.shards for t in report_for(shard, {})]
        return QuantizeReport(checkpoint.source, target, scheme, _by_name(tensors), dry_run=True)

    progress.start(checkpoint.data_bytes)
    tensors = []
    if not checkpoint.sharded and not as_ct:
        shard = checkpoint.shards[0]
        check_output_path(target, [shard.path], force)
        stats = _quantize_shard(shard, plans[shard.path.name], target, progress, chunk_bytes,
                                error_stats, options)
        tensors = report_for(shard, stats)
    else:  # a folder: sharded input, or the compressed-tensors export
        _check_folder_output(target, checkpoint, force)
        shard_tensors = {}
        with StagedFolder(target, force) as staging:
            for shard in checkpoint.shards:
                shard_plans = plans[shard.path.name]
                stats = _quantize_shard(shard, shard_plans, staging.path / shard.path.name,
                                        progress, chunk_bytes, error_stats, options)
                tensors += report_for(shard, stats)
                shard_tensors[shard.path.name] = planned_outputs(shard_plans)
            if checkpoint.sharded:
                _write_index(checkpoint, staging.path, shard_tensors)
                _copy_companions(checkpoint, staging.path)
            if as_ct:
                ctformat.write_config(
                    staging.path, checkpoint.folder / "config.json",
                    ctformat.quantization_config(scheme, _ct_ignore(all_plans)))
            staging.publish()
    return QuantizeReport(checkpoint.source, target, scheme, _by_name(tensors))


def _as_ct_plan(plan: TensorPlan) -> TensorPlan:
    """The plan for the compressed-tensors export: what the runtime cannot load stays."""
    if plan.scheme is None:
        return plan
    reason = ctformat.why_not_loadable(plan.entry, plan.scheme)
    if reason is not None:
        return TensorPlan(plan.entry, None, f"kept for vLLM: {reason}")
    return TensorPlan(plan.entry, plan.scheme, plan.reason, export=ctformat.FORMAT)


def _ct_ignore(plans: list[TensorPlan]) -> list[str]:
    """Linear-like weights left in float, by module name: vLLM must not expect them packed."""
    return sorted(plan.name.removesuffix(".weight") for plan in plans
                  if plan.scheme is None and plan.name.endswith(".weight")
                  and len(plan.entry.shape) == 2)


def _quantize_shard(
    shard: Shard,
    plans: list[TensorPlan],
    target: Path,
    progress: Progress,
    chunk_bytes: int,
    error_stats: bool,
    options: dict[str, object],
) -> dict[str, ErrorStats]:
    if any(plan.export == ctformat.FORMAT for plan in plans):
        metadata = {**shard.header.metadata, KEY_VERSION: __version__}
    else:
        metadata = quantized_metadata(
            shard.header.metadata, [plan.quantized_entry() for plan in plans if plan.quantized]
        )
    # The input's hash is taken from the data as it is read, and written into the header
    # at the end (a placeholder of the same length holds its place).
    hash_source = options.get("hash", True)
    metadata.update(provenance(shard.path.name, PENDING_HASH if hash_source else None,
                               options))
    stats: dict[str, ErrorStats] = {}
    with ExitStack() as stack:
        reader = stack.enter_context(SafetensorsReader(shard.path))
        writer = stack.enter_context(SafetensorsWriter(target, planned_outputs(plans), metadata))
        if reader.header != shard.header:
            raise InputError(located(shard.path, None, "input changed while reading"))
        hasher = stack.enter_context(closing(StreamHasher(reader))) if hash_source else None
        # One read-ahead stream for the whole shard, so that reading the first chunk of
        # a tensor overlaps with quantizing the last chunk of the one before.
        with closing(prefetched(_shard_reads(reader, plans, chunk_bytes, hasher))) as reads:
            for plan in plans:
                if plan.scheme is None:
                    for _ in byte_chunks(plan.entry, chunk_bytes):
                        piece = next(reads)
                        writer.write(plan.name, piece)
                        progress.advance(piece.nbytes, plan.name)
                    continue
                tensor_stats = _quantize_tensor(reader, reads, plan, writer, progress,
                                                chunk_bytes, error_stats)
                if tensor_stats is not None:
                    stats[plan.name] = tensor_stats
        reader.check_unchanged()
        if hasher is not None:
            metadata.update(provenance(shard.path.name, hasher.digest(), options))
            writer.replace_metadata(metadata)
        writer.publish()
    return stats


def _passes(scheme: Scheme) -> int:
    # Per tensor, the scale depends on the whole tensor: one pass for the range, with
    # --clip mse one for each stage of the search, and one to quantize.
    if scheme.granularity != "tensor":
        return 1
    return 4 if scheme.clip == "mse" else 2


def _whole_tensor_range(
    one_pass: Callable[[], Iterator[np.ndarray]], scheme: Scheme
) -> tuple[float, float]:
    """The range a per-tensor scale is made from: one pass for min and max, and with
    --clip mse one more for each stage of the search. ``one_pass()`` yields the tensor's
    row chunks once."""
    low, high = math.inf, -math.inf
    for chunk in one_pass():
        chunk_low, chunk_high = value_range(chunk)
        low, high = min(low, chunk_low), max(high, chunk_high)
    if scheme.clip == "none":
        return low, high

    def errors(factors: list[float]) -> list[float]:
        total = np.zeros(len(factors))
        for chunk in one_pass():
            total += tensor_errors(chunk, (low, high), scheme.method, factors)
        return list(total)

    factor = clip.search_tensor_factor(errors)
    return low * factor, high * factor


#: The schemes --target-sqnr tries, from the smallest output to the largest.
SQNR_LADDER: tuple[tuple[str, int | None], ...] = (
    ("tensor", None), ("channel", None), ("block", 128), ("block", 64), ("block", 32))


def _choose_for_target(
    reader: SafetensorsReader, plan: TensorPlan, method: str, target_db: float,
    chunk_bytes: int,
) -> TensorPlan:
    """The cheapest scheme of the ladder whose SQNR reaches ``target_db``, or a copy."""
    tried = []
    for granularity, block in SQNR_LADDER:
        scheme = Scheme(method, granularity, block,  # type: ignore[arg-type]
                        "mse" if granularity == "tensor" else "none")
        sqnr = _measure(reader, plan.entry, scheme, chunk_bytes).sqnr_db
        reached = sqnr >= target_db
        label = granularity if block is None else f"block {block}"
        measured = "exact" if math.isinf(sqnr) else f"{sqnr:.1f} dB"
        tried.append(f"{label} {measured} {'≥' if reached else '<'} {target_db:g}")
        if reached:
            return TensorPlan(plan.entry, scheme, "; ".join(tried))
    return TensorPlan(plan.entry, None, "no scheme reaches the target: " + "; ".join(tried))


def _measure(
    reader: SafetensorsReader, entry: TensorEntry, scheme: Scheme, chunk_bytes: int
) -> ErrorStats:
    """The error statistics ``scheme`` would give ``entry``, streaming, writing nothing."""
    row_shape = scheme.row_view_shape(entry.shape)

    def one_pass() -> Iterator[np.ndarray]:
        return (chunk for _, chunk in reader.iter_rows(entry, row_shape, chunk_bytes))

    try:
        tensor_range = (_whole_tensor_range(one_pass, scheme)
                        if scheme.granularity == "tensor" else None)
        stats = ErrorStats()
        for chunk in one_pass():
            result = quantize_rows(chunk, scheme, tensor_range=tensor_range, with_stats=True)
            assert result.stats is not None
            stats = stats.merge(result.stats)
    except NonFiniteValuesError:
        raise _locate_non_finite(reader, entry, row_shape, chunk_bytes) from None
    return stats


def _shard_reads(
    reader: SafetensorsReader, plans: list[TensorPlan], chunk_bytes: int,
    hasher: StreamHasher | None,
) -> Iterator[np.ndarray]:
    """Every read the quantize job makes on a shard, in the order it makes them; the
    first pass over each tensor also feeds the shard's hash (on the read-ahead thread)."""
    for plan in plans:
        if plan.scheme is None:
            for piece in reader.iter_bytes(plan.entry, chunk_bytes):
                if hasher is not None:
                    hasher.update(piece)
                yield piece
            continue
        row_shape = plan.scheme.row_view_shape(plan.entry.shape)
        for number in range(_passes(plan.scheme)):
            for _, chunk in reader.iter_rows(plan.entry, row_shape, chunk_bytes):
                if number == 0 and hasher is not None:
                    hasher.update(chunk)
                yield chunk


def _quantize_tensor(
    reader: SafetensorsReader,
    reads: Iterator[np.ndarray],
    plan: TensorPlan,
    writer: SafetensorsWriter,
    progress: Progress,
    chunk_bytes: int,
    error_stats: bool,
) -> ErrorStats | None:
    entry, scheme = plan.entry, plan.scheme
    assert scheme is not None
    as_ct = plan.export == ctformat.FORMAT
    row_shape = scheme.row_view_shape(entry.shape)
    chunks = row_chunks(entry, row_shape, chunk_bytes)
    tensor_range = None
    stored_scale = numpy_dtype(ctformat.scale_dtype(entry)) if as_ct else None
    try:
        if scheme.granularity == "tensor":
            tensor_range = _whole_tensor_range(lambda: (next(reads) for _ in chunks), scheme)
            scale, zero_point = qparams_from_range(*tensor_range, scheme.method)
            writer.write(scale_name(entry.name), scale.reshape(1))
            if zero_point is not None:
                writer.write(zero_point_name(entry.name), zero_point.reshape(1))
        if as_ct:
            writer.write(entry.name + ctformat.SHAPE, np.array(entry.shape, dtype=np.int64))
        stats = ErrorStats()
        for _ in chunks:
            chunk = next(reads)
            result = quantize_rows(chunk, scheme, tensor_range=tensor_range,
                                   with_stats=error_stats, scale_dtype=stored_scale)
            _check_produced(writer.target, entry.name, scheme, result)
            if as_ct:
                writer.write(entry.name + ctformat.PACKED, ctformat.pack(result.codes))
                assert stored_scale is not None
                writer.write(entry.name + ctformat.SCALE, result.scale.astype(stored_scale))
            else:
                writer.write(entry.name, result.codes)
            if scheme.granularity != "tensor" and not as_ct:
                # Scale rows follow the code rows, so they stream out in step.
                writer.write(scale_name(entry.name), result.scale)
                if result.zero_point is not None:
                    writer.write(zero_point_name(entry.name), result.zero_point)
            if result.stats is not None:
                stats = stats.merge(result.stats)
            progress.advance(chunk.nbytes, entry.name)
    except NonFiniteValuesError:
        raise _locate_non_finite(reader, entry, row_shape, chunk_bytes) from None
    return stats if error_stats else None


def _check_produced(target: Path, name: str, scheme: Scheme, result: RowResult) -> None:
    """Check the numbers before they are written (DESIGN §6.4): finite, non-negative
    scales and codes in the method's range. Cheap (int8 min/max and the small scale
    array); a failure is a bug in qz, and nothing is published."""
    lowest, highest = scheme.code_range
    scale_ok = bool(np.isfinite(result.scale).all() and (result.scale >= 0).all())
    codes_ok = result.codes.size == 0 or (
        int(result.codes.min()) >= lowest and int(result.codes.max()) <= highest)
    if not (scale_ok and codes_ok):
        raise InternalCheckError(
            located(target, name, "produced scales or codes out of range; nothing was written"),
            hint="this is a bug in qz: please report it with the input's header",
        )


def _locate_non_finite(
    reader: SafetensorsReader, entry: TensorEntry, row_shape: tuple[int, int], chunk_bytes: int
) -> NonFiniteValuesError:
    """Count the non-finite values of the whole tensor and find the first (slow path,
    taken only on failure)."""
    count, first = 0, None
    for start, chunk in reader.iter_rows(entry, row_shape, chunk_bytes):
        bad = ~np.isfinite(as_float32(chunk))  # F64 beyond float32's range counts too
        found = int(np.count_nonzero(bad))
        if found and first is None:
            first = start * row_shape[1] + int(np.argmax(bad))
        count += found
    index = tuple(int(i) for i in np.unravel_index(first or 0, entry.shape))
    return NonFiniteValuesError.build(entry.name, count, index, reader.path)


# ------------------------------------------------------------------------- dequantize


def dequantize_checkpoint(
    source: str | Path,
    output: str | Path | None = None,
    dtype: str = "original",
    *,
    force: bool = False,
    progress: Progress | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> DequantizeReport:
    """Turn a qz checkpoint (or a compressed-tensors one) back into a float checkpoint
    with the original tensor names, shapes and dtypes (or ``dtype``: float32, float16 or
    bfloat16 for every restored tensor). compressed-tensors weights are restored to the
    dtype of their scales, as compressed-tensors itself does.

    >>> dequantize_checkpoint("model.int8.safetensors").output   # doctest: +SKIP
    PosixPath('model.dequant.safetensors')
    """
    if dtype != "original" and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    progress = progress or NoProgress()
    checkpoint = open_checkpoint(source)
    restores = {}
    for shard in checkpoint.shards:
        with SafetensorsReader(shard.path) as reader:
            restores[shard.path.name] = find_restores(reader)
            if not restores[shard.path.name]:
                raise QuantizedFormatError(located(
                    shard.path, None, f"not a qz-quantized file (no {KEY_FORMAT_VERSION} "
                    "metadata) nor a compressed-tensors one"))
    target = Path(output) if output is not None else default_output(checkpoint, "dequant")

    def shard_outputs(shard: Shard) -> list[PlannedTensor]:
        shard_restores = restores[shard.path.name]
        by_codes = {restore.codes: restore for restore in shard_restores.values()}
        stored = {name for restore in shard_restores.values() for name in restore.stored}
        planned = []
        for tensor in shard.header.tensors:
            restore = by_codes.get(tensor.name)
            if restore is not None:
                out_dtype = restore.dtype if dtype == "original" else OUTPUT_DTYPES[dtype]
                planned.append(PlannedTensor(restore.name, out_dtype, restore.shape))
            elif tensor.name not in stored:
                planned.append(PlannedTensor(tensor.name, tensor.dtype, tensor.shape))
        return planned

    progress.start(checkpoint.data_bytes)
    tensors: list[DequantizedTensor] = []
    output_bytes = 0

    def run(shard: Shard, shard_target: Path) -> list[PlannedTensor]:
        nonlocal output_bytes
        planned = shard_outputs(shard)
        shard_restores = restores[shard.path.name]
        metadata = plain_metadata(shard.header.metadata)
        with SafetensorsReader(shard.path) as reader, \
                SafetensorsWriter(shard_target, planned, metadata) as writer, \
                closing(prefetched(_dequantize_reads(reader, planned, shard_restores,
                                                     chunk_bytes))) as reads:
            for tensor in planned:
                restore = shard_restores.get(tensor.name)
                if restore is not None:
                    _dequantize_tensor(reader, reads, restore, tensor.dtype, writer,
                                       progress, chunk_bytes)
                else:
                    entry = shard.header[tensor.name]
                    for _ in byte_chunks(entry, chunk_bytes):
                        piece = next(reads)
                        writer.write(tensor.name, piece)
                        progress.advance(piece.nbytes, tensor.name)
                tensors.append(DequantizedTensor(
                    tensor.name, tensor.dtype, tensor.shape,
                    None if restore is None else restore.scheme))
            reader.check_unchanged()
            writer.publish()
            output_bytes += writer.file_size
        return planned

    if not checkpoint.sharded:
        shard = checkpoint.shards[0]
        check_output_path(target, [shard.path], force)
        run(shard, target)
    else:
        _check_folder_output(target, checkpoint, force)
        with StagedFolder(target, force) as staging:
            shard_tensors = {shard.path.name: run(shard, staging.path / shard.path.name)
                             for shard in checkpoint.shards}
            _write_index(checkpoint, staging.path, shard_tensors)
            _copy_companions(checkpoint, staging.path)
            _drop_quantization_config(staging.path / "config.json")
            staging.publish()
    return DequantizeReport(checkpoint.source, target, tensors, output_bytes)


def _drop_quantization_config(config: Path) -> None:
    """A restored model is a float model: its config.json must not announce quantization."""
    if not config.is_file():
        return
    try:
        document = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # not ours to judge: copied as it was
    if isinstance(document, dict) and document.pop("quantization_config", None) is not None:
        config.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _dequantize_row_chunks(restore: Restore, chunk_bytes: int) -> list[tuple[int, int]]:
    # Chunks are sized by the float32 values they become, the largest buffer here.
    rows, columns = restore.scheme.row_view_shape(restore.shape)
    step = max(1, chunk_bytes // max(columns * 4, 1))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _dequantize_reads(
    reader: SafetensorsReader,
    planned: list[PlannedTensor],
    restores: dict[str, Restore],
    chunk_bytes: int,
) -> Iterator[object]:
    """Every read the dequantize job makes on a shard, in order: raw pieces of copied
    tensors, and (codes, scale, zero point) row chunks of quantized ones."""
    header = reader.header
    for tensor in planned:
        restore = restores.get(tensor.name)
        if restore is None:
            yield from reader.iter_bytes(header[tensor.name], chunk_bytes)
            continue
        for start, stop in _dequantize_row_chunks(restore, chunk_bytes):
            yield read_rows(reader, restore, start, stop)


def _dequantize_tensor(
    reader: SafetensorsReader,
    reads: Iterator[object],
    restore: Restore,
    out_dtype: str,
    writer: SafetensorsWriter,
    progress: Progress,
    chunk_bytes: int,
) -> None:
    target = numpy_dtype(out_dtype)
    for _ in _dequantize_row_chunks(restore, chunk_bytes):
        codes, scale, zero_point = next(reads)  # type: ignore[misc]
        check_stored_values(reader.path, restore.name, restore.scheme, codes, scale,
                            check_codes=not restore.foreign)
        try:
            values = dequantize_rows(codes, scale, zero_point, restore.scheme, target)
        except DtypeRangeError:
            raise OutputError(
                located(reader.path, restore.name, f"values exceed the range of {out_dtype}"),
                hint="choose a wider --dtype",
            ) from None
        writer.write(restore.name, values)
        progress.advance(codes.nbytes, restore.name)


# ---------------------------------------------------------------------------- inspect


def inspect_checkpoint(source: str | Path) -> InspectReport:
    """Describe a checkpoint from its headers: tensors, roles, schemes, metadata. For a
    compressed-tensors checkpoint it also reads the tiny ``weight_shape`` tensors.

    >>> inspect_checkpoint("model.int8.safetensors").format_version   # doctest: +SKIP
    '1'
    """
    checkpoint = open_checkpoint(source)
    tensors: list[InspectedTensor] = []
    format_version = None
    foreign_format = None
    for shard in checkpoint.shards:
        header = shard.header
        shard_name = shard.path.name if checkpoint.sharded else None
        restores: dict[str, Restore] = {}
        if is_quantized(header):
            format_version = header.metadata[KEY_FORMAT_VERSION]
        if is_quantized(header) or any(t.name.endswith((ctformat.PACKED, ctformat.SCALE))
                                       for t in header.tensors):
            with SafetensorsReader(shard.path) as reader:
                restores = find_restores(reader)
        if any(restore.foreign for restore in restores.values()):
            foreign_format = ctformat.FORMAT
        by_codes = {restore.codes: restore for restore in restores.values()}
        owners = {}
        for restore in restores.values():
            owners[restore.scale] = (restore.name, "scale")
            if restore.zero_point:
                owners[restore.zero_point] = (restore.name, "zero_point")
            for name in restore.extra:
                owners[name] = (restore.name, "shape")
        for tensor in header.tensors:
            common = dict(name=tensor.name, dtype=tensor.dtype, shape=tensor.shape,
                          nbytes=tensor.nbytes, shard=shard_name)
            if tensor.name in by_codes:
                restore = by_codes[tensor.name]
                tensors.append(InspectedTensor(
                    **common, role="quantized", scheme=restore.scheme,
                    original_dtype=restore.dtype,
                    layout=(("pack-quantized" if restore.packed else "int-quantized")
                            if restore.foreign else "qz"),
                    of=None if tensor.name == restore.name else restore.name))
            elif tensor.name in owners:
                owner, role = owners[tensor.name]
                tensors.append(InspectedTensor(**common, role=role, of=owner))
            else:
                tensors.append(InspectedTensor(**common, role="tensor"))
    return InspectReport(
        source=checkpoint.source,
        shards=[(shard.path.name, shard.header.file_size) for shard in checkpoint.shards],
        metadata=checkpoint.shards[0].header.metadata,
        tensors=_by_name(tensors),
        format_version=format_version,
        sharded=checkpoint.sharded,
        foreign_format=foreign_format,
    )
