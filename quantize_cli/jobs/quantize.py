"""The quantize job: plan every tensor from the headers, check the output, then stream
each shard through the layouts of its format.

Tensors are read in row chunks of at most ``chunk_bytes`` and written as they are
produced, so memory is bounded by a chunk, never by a tensor or the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..core import ErrorStats, RowResult, Scheme, value_range
from ..core.stats import OutputError
from ..errors import InputError, InternalCheckError, SchemeError, located
from ..formats import (
    DEFAULT_FORMAT,
    FORMATS,
    Deployment,
    Layout,
    ModelFormat,
    format_named,
    output_suffix,
)
from ..storage.checkpoint import Checkpoint, Shard
from ..storage.reader import DEFAULT_CHUNK_BYTES, SafetensorsReader
from ..storage.stream import StreamHasher, TensorChunks
from ..storage.writer import SafetensorsWriter
from . import outputs
from .calibration import Calibration, CalibrationStatistics, calibration_of
from .plan import (
    KeptByFormat,
    TensorPlan,
    candidate_schemes,
    check_patterns,
    keep_fused_together,
    kept_by_format,
    plan_shard,
)
from .provenance import PENDING_HASH, command_line, provenance
from .reports import NoProgress, Progress, QuantizeReport, TensorReport
from .rules import Rule, parse_rules
from .source import Source, SourceShard, SourceStream, open_source
from .target import TARGET_BITS, choose_for_bits, choose_for_sqnr, measure
from .tensor import quantized_chunks


def quantize_checkpoint(
    source: str | Path,
    output: str | Path | None = None,
    scheme: Scheme | None = None,
    *,
    format: str = DEFAULT_FORMAT,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
    error_stats: bool = True,
    target_sqnr: float | None = None,
    target_bits: float | None = None,
    rules: Sequence[str] = (),
    tensor_parallel: int = 1,
    hash_source: bool = True,
    calibration: str | Path | None = None,
    gptq: bool = True,
    act_order: bool = False,
    progress: Progress | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> QuantizeReport:
    """Quantize a checkpoint (file, index or model folder) and write it in ``format``.

    A model folder gives a complete model folder beside it (outputs.py says what it
    holds); a loose file gives a file. ``scheme`` defaults to the format's own default.
    ``error_stats=False`` skips measuring the error (the report then has no statistics);
    the written bytes are the same. ``rules`` are ``GLOB=SCHEME`` overrides (rules.py),
    the last match winning. ``target_sqnr`` gives each tensor the cheapest scheme of the
    ladder in target.py (with ``scheme``'s method and bits) whose SQNR reaches it, or
    leaves the tensor in its dtype; ``target_bits`` chooses among 4 and 8 bits and every
    granularity the schemes of least total squared error within that average of bits per
    weight (with ``target_sqnr``: among those that reach it). Targets measure the
    candidates first, so they read the data even in a dry run. ``tensor_parallel``
    applies the shape rules of formats that vLLM runs split over that many GPUs.
    ``hash_source=False`` records no SHA-256 of the input. ``calibration`` names a
    statistics file of ``qz calibrate``: each calibrated layer is then quantized for its
    output (the scale search weighted by its inputs, and, unless ``gptq`` is False, GPTQ;
    ``act_order`` rounds the columns of largest inputs first), the report gives each its
    output error beside the weight error, and the targets allocate by the output error.

    >>> report = quantize_checkpoint("model.safetensors", scheme=Scheme("affine"))  # doctest: +SKIP
    >>> report.output, report.pooled_stats.sqnr_db                                 # doctest: +SKIP
    (PosixPath('model.int8.safetensors'), 40.7)

    Raises:
        QzError: the input is invalid or already quantized, nothing would be quantized,
            the format cannot store the scheme, a tensor holds NaN/inf, or the output
            cannot be written. Nothing is written then.
    """
    fmt = format_named(format)
    scheme = scheme or fmt.default_scheme
    progress = progress or NoProgress()
    parsed_rules = check_options(fmt, scheme, rules, target_sqnr, target_bits, tensor_parallel)
    opened = open_source(source)
    checkpoint = opened.checkpoint
    statistics = (CalibrationStatistics(calibration, gptq=gptq, act_order=act_order)
                  if calibration is not None else None)
    output_plan = outputs.plan_output(checkpoint, output,
                                      output_suffix(fmt, scheme, target_bits), fmt.folder_output)
    config = opened.float_config()
    deployment = Deployment(tensor_parallel, config)
    plans = {shard.path.name: plan_shard(shard.header(), shard.path, scheme, fmt, include,
                                         exclude, deployment, parsed_rules)
             for shard in opened.shards}
    warnings = check_patterns(checkpoint.source, [plan for shard_plans in plans.values()
                                                  for plan in shard_plans],
                              include, exclude, parsed_rules)
    plans = keep_fused_together(plans, fmt)
    kept = kept_by_format(plans, scheme, fmt, include, exclude, deployment, parsed_rules)
    if target_sqnr is None and target_bits is None:
        fmt.check_model(_decided(plans))
    else:
        schemes = candidate_schemes(scheme, fmt, TARGET_BITS if target_bits else (scheme.bits,))
        candidates = measure(opened, plans, schemes, fmt, deployment, chunk_bytes,
                             progress, target_sqnr if target_bits is None else None,
                             statistics)
        if target_bits is not None:
            plans = choose_for_bits(checkpoint, plans, candidates, target_bits, target_sqnr,
                                    fmt)
        elif target_sqnr is not None:
            plans = choose_for_sqnr(plans, candidates, target_sqnr, fmt)
    _refuse_nothing_to_do(checkpoint, plans, target_sqnr, kept, fmt)
    options: dict[str, Any] = {
        "method": scheme.method, "granularity": scheme.granularity,
        "block": scheme.block_size, "clip": scheme.clip, "include": list(include),
        "exclude": list(exclude), "target_sqnr": target_sqnr, "format": fmt.name}
    # Options added since qz 1.0 are recorded when used, so that an INT8 file made
    # without them is byte for byte what qz 1.0 wrote.
    bits = 8 if scheme.element.is_float else scheme.bits
    for key, value, default in (("bits", bits, 8), ("activations", scheme.activations, None),
                                ("rules", list(rules), []),
                                ("target_bits", target_bits, None),
                                ("tensor_parallel", tensor_parallel, 1),
                                ("hash", hash_source, True)):
        if value != default:
            options[key] = value
    if statistics is not None:
        options.update(calibration={"file": statistics.path.name,
                                    "sha256": statistics.sha256()},
                       gptq=gptq, act_order=act_order)
    command = command_line(checkpoint.source.name, options)
    every = [plan for shard_plans in plans.values() for plan in shard_plans]
    notes = tuple(fmt.notes(list(dict.fromkeys(plan.scheme for plan in every
                                               if plan.scheme is not None))))
    kept_note = kept.note(fmt)
    if kept_note is not None:
        notes += (kept_note,)
    notes += _read_from(opened)
    if output_plan.folder and fmt.folder_output and config is None:
        notes += (f"no config.json beside the input, so the output has none: loaders need "
                  f"the model's config.json, with what {fmt.name} adds to it",)

    def report_for(shard: Shard, stats: dict[str, tuple[ErrorStats | None, OutputError | None]]
                   ) -> list[TensorReport]:
        return [TensorReport(
            name=plan.name, dtype=plan.entry.dtype, shape=plan.entry.shape,
            scheme=plan.scheme, reason=plan.reason, input_bytes=plan.entry.nbytes,
            output_bytes=plan.output_bytes, stats=stats.get(plan.name, (None, None))[0],
            shard=shard.path.name if checkpoint.sharded else None, selected=plan.selected,
            output=stats.get(plan.name, (None, None))[1],
        ) for plan in plans[shard.path.name]]

    def report(tensors: list[TensorReport]) -> QuantizeReport:
        return QuantizeReport(checkpoint.source, output_plan.path, scheme, fmt.name,
                              sorted(tensors, key=lambda tensor: tensor.name), dry_run,
                              outputs.folder_report(output_plan), target_bits, notes,
                              tuple(warnings))

    if dry_run:
        outputs.check_destination(output_plan, checkpoint, force)
        return report([t for shard in checkpoint.shards for t in report_for(shard, {})])

    magnitudes = _global_magnitudes(opened, plans, fmt, chunk_bytes, progress)
    tensors: list[TensorReport] = []
    progress.start(checkpoint.data_bytes, "quantizing")
    with outputs.Destination(output_plan, checkpoint, force) as destination:
        for source_shard in opened.shards:
            shard = source_shard.shard
            stats = _quantize_shard(source_shard, plans[shard.path.name],
                                    destination.path_for(shard), fmt, options, command,
                                    error_stats, progress, chunk_bytes, magnitudes,
                                    statistics)
            tensors += report_for(shard, stats)
        if output_plan.folder:
            outputs.finish_folder(
                destination, checkpoint,
                {name: [t for plan in shard_plans for t in plan.outputs]
                 for name, shard_plans in plans.items()},
                fmt.model_config(config, scheme,
                                 [plan.as_quantized_weight() for plan in every
                                  if plan.quantized],
                                 [plan.entry for plan in every if not plan.quantized]))
        destination.publish()
    return report(tensors)


def check_options(fmt: ModelFormat, scheme: Scheme, rules: Sequence[str] = (),
                  target_sqnr: float | None = None, target_bits: float | None = None,
                  tensor_parallel: int = 1) -> tuple[Rule, ...]:
    """Refuse, before any input is read, options that cannot work together: a scheme (or
    a rule's) that the format cannot store, a malformed rule, targets out of range,
    tensor parallelism for a format no runtime splits. Returns the parsed rules.

    Raises:
        SchemeError: naming the option and why.
    """
    fmt.check_scheme(scheme)
    parsed_rules = parse_rules(rules, scheme)
    for rule in parsed_rules:
        if rule.scheme is not None:
            fmt.check_scheme(rule.scheme)
    _check_targets(target_sqnr, target_bits)
    if tensor_parallel != 1 and not fmt.tensor_parallel:
        served = ", ".join(name for name, other in FORMATS.items() if other.tensor_parallel)
        raise SchemeError(f"--tensor-parallel applies to the formats vLLM runs ({served}), "
                          f"not to {fmt.name}")
    return parsed_rules


def _decided(plans: dict[str, list[TensorPlan]]) -> dict[str, Scheme | None]:
    return {plan.name: plan.scheme for shard_plans in plans.values() for plan in shard_plans}


def _global_magnitudes(source: Source, plans: dict[str, list[TensorPlan]],
                       fmt: ModelFormat, chunk_bytes: int, progress: Progress
                       ) -> dict[str, float]:
    """The largest magnitude of every tensor whose NVFP4 global scale is shared with the
    layers a runtime fuses it with (vLLM takes the largest of their global scales, so
    llm-compressor makes them equal), over those layers, wherever their shards are. One
    reading pass over those tensors, before any is quantized."""
    shared = {plan.name: key for shard_plans in plans.values() for plan in shard_plans
              if plan.scheme is not None and plan.scheme.info.global_scale
              and fmt.layout_for(plan.scheme).storage(plan.entry.dtype, plan.scheme).global_scale
              and (key := fmt.fused_with(plan.name)) is not None}
    if not shared:
        return {}
    measured = {shard.path.name: [plan for plan in plans[shard.path.name] if plan.name in shared]
                for shard in source.shards}
    progress.start(sum(plan.entry.nbytes for found in measured.values() for plan in found),
                   "measuring")
    largest: dict[str, float] = {}
    for shard in source.shards:
        found = measured[shard.path.name]
        layout = [(plan.entry, (plan.entry.numel // plan.entry.shape[-1], plan.entry.shape[-1]),
                   1) for plan in found]
        with SafetensorsReader(shard.path) as reader, \
                SourceStream(shard, reader, layout, chunk_bytes) as stream:
            for plan, (entry, row_shape, _) in zip(found, layout, strict=True):
                magnitude = 0.0
                for rows in stream.rows(entry, row_shape):
                    low, high = value_range(rows)
                    magnitude = max(magnitude, -low, high)
                    progress.advance(rows.nbytes, plan.name)
                key = shared[plan.name]
                largest[key] = max(largest.get(key, 0.0), magnitude)
    return {name: largest[key] for name, key in shared.items()}


def _check_targets(target_sqnr: float | None, target_bits: float | None) -> None:
    """Refuse, before any work, targets the numbers rule out."""
    if target_sqnr is not None and not target_sqnr > 0:
        raise SchemeError(f"--target-sqnr must be a positive number of dB, got {target_sqnr:g}",
                          hint="typical targets: 20 dB at 4 bits, 35-45 dB at 8 bits")
    if target_bits is not None and not 0 < target_bits < 64:
        raise SchemeError(f"--target-bits must be an average number of bits per weight, "
                          f"got {target_bits:g}", hint="for example 4.5 or 6")


def _read_from(source: Source) -> tuple[str, ...]:
    """What the summary says of a quantized input: its weights were read as the values
    they stand for, and the error is measured against those."""
    found = [(shard.fmt, weight) for shard in source.shards if shard.fmt is not None
             for weight in shard.weights]
    if not found:
        return ()
    fmt, weight = found[0]
    weights = f"{len(found)} quantized weight" + ("s" if len(found) > 1 else "")
    return (f"the input is quantized ({fmt.name}: {weight.description}): its {weights} "
            "were read as the values they stand for, and errors are measured against "
            "those values",)


def _refuse_nothing_to_do(checkpoint: Checkpoint, plans: dict[str, list[TensorPlan]],
                          target_sqnr: float | None, kept: KeptByFormat,
                          fmt: ModelFormat) -> None:
    every = [plan for shard_plans in plans.values() for plan in shard_plans]
    if any(plan.quantized for plan in every):
        return
    if kept.kept and len(kept.kept) == kept.selected:
        raise InputError(
            located(checkpoint.source, None, f"has no tensor {fmt.name} can store as asked: "
                    f"{kept.reasons()}"),
            hint=kept.advice)
    if target_sqnr is not None and every:
        raise InputError(
            located(checkpoint.source, None, f"no tensor reaches the target SQNR of "
                    f"{target_sqnr:g} dB"),
            hint="lower --target-sqnr; the reasons in --dry-run show what each tensor reaches",
        )
    raise InputError(
        located(checkpoint.source, None, "has no tensor to quantize" if every
                else "has no tensors"),
        hint=None if not every else "qz quantizes float tensors with ≥ 2 dimensions and "
        "≥ 1024 elements; --include selects others",
    )


def _quantize_shard(
    source_shard: SourceShard,
    plans: list[TensorPlan],
    target: Path,
    fmt: ModelFormat,
    options: dict[str, Any],
    command: str,
    error_stats: bool,
    progress: Progress,
    chunk_bytes: int,
    magnitudes: dict[str, float],
    statistics: CalibrationStatistics | None,
) -> dict[str, tuple[ErrorStats | None, OutputError | None]]:
    shard = source_shard.shard
    hash_source = options.get("hash", True)
    metadata = fmt.shard_metadata(source_shard.float_metadata(),
                                  [plan.as_quantized_weight() for plan in plans
                                   if plan.quantized])
    # The input's hash is taken from the data as it is read, and written into the header
    # at the end (a placeholder of the same length holds its place).
    metadata.update(provenance(shard.path.name, PENDING_HASH if hash_source else None,
                               options, command))
    layouts = {plan.name: fmt.layout_for(plan.scheme) for plan in plans if plan.scheme}
    layout = [(plan.entry, plan.scheme.row_view_shape(plan.entry.shape),
               layouts[plan.name].row_multiple(plan.scheme)) if plan.scheme
              else (plan.entry, None, 1) for plan in plans]
    stats: dict[str, tuple[ErrorStats | None, OutputError | None]] = {}
    with ExitStack() as stack:
        reader = stack.enter_context(SafetensorsReader(shard.path))
        writer = stack.enter_context(SafetensorsWriter(
            target, [tensor for plan in plans for tensor in plan.outputs], metadata,
            outputs.permissions(shard.path)))
        if reader.header != shard.header:
            raise InputError(located(shard.path, None, "input changed while reading"))
        hasher = StreamHasher(reader) if hash_source else None
        if hasher is not None:
            stack.callback(hasher.close)
        stream = stack.enter_context(SourceStream(source_shard, reader, layout, chunk_bytes,
                                                  hasher))
        for plan, (entry, row_shape, multiple) in zip(plans, layout, strict=True):
            if row_shape is None:
                for piece in stream.pieces(entry):
                    writer.write(plan.name, piece)
                    progress.advance(piece.nbytes, plan.name)
                continue
            stats[plan.name] = _quantize_tensor(
                stream.rows(entry, row_shape, multiple), plan, layouts[plan.name], writer,
                error_stats, progress, magnitudes.get(plan.name),
                calibration_of(statistics, plan.entry))
        reader.check_unchanged()
        if hasher is not None:
            metadata.update(provenance(shard.path.name, hasher.digest(), options, command))
            writer.replace_metadata(metadata)
        writer.publish()
    return stats


def _quantize_tensor(chunks: TensorChunks, plan: TensorPlan, layout: Layout,
                     writer: SafetensorsWriter, error_stats: bool, progress: Progress,
                     magnitude: float | None, calibration: Calibration | None
                     ) -> tuple[ErrorStats | None, OutputError | None]:
    """Quantize and write one tensor; its weight error and, when calibrated, its
    layer's output error (None without statistics)."""
    entry, scheme = plan.entry, plan.scheme
    assert scheme is not None
    stats, output = ErrorStats(), OutputError()
    for first_row, rows, result in quantized_chunks(chunks, scheme, layout, error_stats,
                                                    magnitude, calibration):
        _check_produced(layout, writer.target, entry.name, scheme, result)
        for name, values in layout.encode(entry, scheme, result, first_row):
            writer.write(name, values)
        if result.stats is not None:
            stats = stats.merge(result.stats)
        if result.output is not None:
            output = output.merge(result.output)
        progress.advance(rows.nbytes, entry.name)
    if not error_stats:
        return None, None
    return stats, output if calibration is not None else None


def _check_produced(layout: Layout, target: Path, name: str, scheme: Scheme,
                    result: RowResult) -> None:
    """Check the numbers before they are written (DESIGN §6.4); a failure is a bug in qz,
    and nothing is published."""
    if not layout.produced_valid(result, scheme):
        raise InternalCheckError(
            located(target, name, "produced scales or codes out of range; nothing was written"),
            hint="this is a bug in qz: please report it with the input's header",
        )
