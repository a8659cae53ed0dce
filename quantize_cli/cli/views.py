"""The views the commands print: per-tensor tables and summaries of quantize, inspect,
dequantize and diff, and explain's steps.

Every string that comes from a file (tensor names, metadata) passes through
:func:`display_text`, which escapes control characters, and is placed in a ``Text`` object,
so that neither ANSI escapes nor rich markup such as ``[bold]`` in a tensor name is ever
interpreted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.console import Group
from rich.filesize import decimal
from rich.table import Table
from rich.text import Text

from ..core import ErrorStats, Scheme
from ..core.explain import Explanation, GroupSteps
from ..jobs.reports import (
    CalibrateReport,
    DequantizeReport,
    DiffReport,
    FolderReport,
    InspectedTensor,
    InspectReport,
    QuantizeReport,
)
from .tables import Column, fitted_table
from .text import db_text, display_text, precision, shape_text, sqnr_text


def _name(value: str) -> Text:
    return Text(display_text(value))


def _stats_cells(stats: ErrorStats) -> tuple[str, str, str, str]:
    """MSE, max abs error, SQNR and cosine, as the tables show them."""
    return (f"{stats.mse:.3g}", f"{stats.max_abs_error:.3g}", db_text(stats.sqnr_db),
            f"{stats.cosine_similarity:.6f}")


def quantize_table(report: QuantizeReport, width: int, worst: int | None = None) -> Table:
    """Per-tensor table that fits ``width``: scheme (or why copied) and the error
    statistics; with ``worst``, only that many quantized tensors, lowest SQNR first."""
    shown = report.tensors if worst is None else report.worst(worst)
    calibrated = report.pooled_output is not None
    if report.dry_run:
        title = "Plan (dry run)"
    elif worst is None:
        title = "Quantization error per tensor"
    else:
        title = (f"The {len(shown)} tensors of lowest SQNR, of {len(report.quantized)} "
                 "quantized (--all shows every tensor)")
    tensor = Column("Tensor", "name")
    if report.dry_run:
        columns = [tensor, Column("Shape", "number", drop=5), Column("Dtype", "number", drop=3),
                   Column("Scheme", "text", drop=2, shortest=16),
                   Column("Reason", "text", drop=6, shortest=12),
                   Column("Size before", "number", drop=7, justify="right"),
                   Column("Size after", "number", drop=4, justify="right"),
                   Column("Bits/weight", "number", justify="right")]
    else:
        columns = [tensor, Column("Shape", "number", drop=6), Column("Dtype", "number", drop=4),
                   Column("Scheme / reason", "text", drop=2, shortest=16),
                   Column("MSE", "number", drop=7, justify="right"),
                   Column("Max abs err", "number", drop=8, justify="right"),
                   Column("SQNR dB", "number", justify="right"),
                   Column("Cosine", "number", drop=5, justify="right")]
        if calibrated:
            columns.append(Column("Output dB", "number", justify="right"))
    for row in shown:
        cells: list[str | Text] = [
            display_text(row.name), shape_text(row.shape),
            f"{row.dtype}→{precision(row.scheme)}" if row.scheme else row.dtype]
        label = row.scheme.describe() if row.scheme else "copied"
        if report.dry_run:
            cells += [label, display_text(row.reason), decimal(row.input_bytes),
                      decimal(row.output_bytes), f"{row.bits_per_weight:.2f}"]
        elif row.scheme is None:
            cells += [Text(f"copied: {display_text(row.reason)}", style="dim"), "", "", "", ""]
        elif row.stats is None:
            cells += [label, "", "", "", ""]
        else:
            cells += [label, *_stats_cells(row.stats)]
        if calibrated and not report.dry_run:
            cells.append(db_text(row.output.sqnr_db) if row.output is not None else "")
        for column, cell in zip(columns, cells, strict=True):
            column.cells.append(cell)
    return fitted_table(columns, width, title=title, title_justify="left")


def quantize_summary(report: QuantizeReport) -> Group:
    """Totals: sizes, ratio, pooled statistics, worst tensors, output path."""
    quantized, total = len(report.quantized), len(report.tensors)
    lines = [
        Text(f"Tensors: {quantized} quantized, {total - quantized} copied unchanged"),
        Text(f"Size: {decimal(report.input_bytes)} → {decimal(report.output_bytes)} "
             f"({report.compression_ratio:.2f}× smaller, "
             f"{report.bits_per_weight:.2f} bits per weight)"),
    ]
    schemes = report.schemes
    if len(schemes) > 1 or report.target_bits is not None:
        lines.append(Text("Schemes: " + ", ".join(f"{label} ({count})"
                                                  for label, count in schemes)))
        target = ("" if report.target_bits is None
                  else f" (target {report.target_bits:g})")
        lines.append(Text(f"Selected tensors: {report.selected_bits_per_weight:.3f} bits per "
                          f"weight{target}"))
    measured = any(t.stats is not None for t in report.quantized)
    if not report.dry_run and measured:
        pooled = report.pooled_stats
        lines.append(Text(f"Pooled: SQNR {sqnr_text(pooled.sqnr_db)}, MSE {pooled.mse:.3g}, "
                          f"max abs error {pooled.max_abs_error:.3g}, "
                          f"cosine {pooled.cosine_similarity:.6f}"))
        output = report.pooled_output
        if output is not None:
            calibrated_count = sum(t.output is not None for t in report.quantized)
            lines.append(Text(f"Output: SQNR {sqnr_text(output.sqnr_db)} over the "
                              f"{calibrated_count} calibrated layers' outputs (their inputs' "
                              "second moment from the calibration statistics)"))
        worst = report.worst()
        if worst:
            listed = ", ".join(f"{display_text(t.name)} ({sqnr_text(t.stats.sqnr_db)})"  # type: ignore[union-attr]
                               for t in worst)
            lines.append(Text(f"Worst: {listed}"))
    lines += _folder_lines(report.folder)
    lines += [Text(f"Note: {display_text(note)}") for note in report.notes]
    if not report.dry_run:
        lines.append(Text(f"Wrote {display_text(str(report.output))}"))
    else:
        lines.append(Text(f"Would write {display_text(str(report.output))} (nothing written)"))
    return Group(*lines)


def _folder_lines(folder: FolderReport | None) -> list[Text]:
    """What a folder output carries over and leaves out."""
    if folder is None:
        return []
    lines = []
    if folder.carried_over:
        carried = ", ".join(display_text(path) for path in folder.carried_over)
        lines.append(Text(f"Carried over: {carried}"))
    if folder.left_out:
        lines.append(Text("Left out: " + ", ".join(f"{display_text(path)} ({reason})"
                                                   for path, reason in folder.left_out)))
    return lines


def _stored_as(tensor: InspectedTensor) -> str:
    """What a stored tensor is: how a quantized weight is stored (on its codes), or what
    a companion is to its weight."""
    if tensor.role == "codes":
        stored = f"{tensor.description} (from {tensor.original_dtype})"
        if tensor.of != tensor.name:
            stored += f" → {display_text(tensor.of or '')}"
        return stored
    if tensor.role == "tensor":
        return ""
    return f"{tensor.role.replace('_', ' ')} of {display_text(tensor.of or '')}"


def inspect_table(report: InspectReport, width: int) -> Group:
    columns = [Column("Tensor", "name")]
    if report.sharded:
        columns.append(Column("Shard", "name", drop=5))
    columns += [Column("Dtype", "number", drop=3), Column("Shape", "number", drop=5),
                Column("Size", "number", drop=4, justify="right"),
                Column("Stored as", "text", drop=1, shortest=22)]
    for tensor in report.tensors:
        cells: list[str | Text] = [display_text(tensor.name)]
        if report.sharded:
            cells.append(display_text(tensor.shard or ""))
        cells += [tensor.dtype, shape_text(tensor.shape), decimal(tensor.nbytes),
                  _stored_as(tensor)]
        for column, cell in zip(columns, cells, strict=True):
            column.cells.append(cell)
    table = fitted_table(columns, width)
    described = "not quantized"
    if report.refused is not None:
        described = f"{display_text(report.refused)}, which qz does not read"
    elif report.format is not None:
        version = f" {report.format_version}" if report.format_version else ""
        described = f"{report.format} format{version}, {len(report.quantized)} quantized tensors"
    lines: list[Any] = [Text(display_text(str(report.source)), style="bold"), table, Text(
        f"{len(report.tensors)} tensors, {report.parameter_count:,} parameters, "
        f"{decimal(report.total_bytes)} in {len(report.shards)} file(s); {described}")]
    shown = {k: v for k, v in report.metadata.items() if k not in report.tensor_metadata_keys}
    if shown:
        metadata = Table(title="Metadata", title_justify="left", show_header=False)
        metadata.add_column("Key", overflow="fold")
        metadata.add_column("Value", overflow="fold")
        for key, value in sorted(shown.items()):
            metadata.add_row(_name(key), _name(value))
        lines.append(metadata)
    return Group(*lines)


def calibrate_summary(report: CalibrateReport) -> Text:
    return Text(f"Ran {report.sequences} sequences of {report.length} tokens "
                f"({report.tokens:,} tokens) in {report.seconds:.0f} s; recorded the inputs "
                f"of {report.layers} linear layers ({report.inputs} distinct); wrote "
                f"{display_text(str(report.output))}")


def dequantize_summary(report: DequantizeReport) -> Group:
    restored = sum(t.restored_from is not None for t in report.tensors)
    return Group(*_folder_lines(report.folder), Text(
        f"Restored {restored} tensors, copied {len(report.tensors) - restored}; "
        f"wrote {display_text(str(report.output))} ({decimal(report.output_bytes)})"
    ))


def _number(value: float) -> str:
    return f"{value:.6g}"


def _signed(value: float) -> str:
    return "0" if value == 0 else f"{value:+.3g}"


def explain_view(explanation: Explanation) -> Group:
    """Every step of quantizing a short vector: range, scale, zero point, codes, values
    back and the error of each element."""
    scheme = explanation.scheme
    floats = scheme.element.is_float
    lowest, highest = (0, 0) if floats else scheme.code_range
    bits = "" if scheme.bits == 8 or floats else f", {scheme.bits} bits"
    lines: list[Any] = []
    if explanation.global_scale is not None:
        largest = max(float(np.abs(group.values).max()) for group in explanation.groups)
        lines.append(Text(f"global scale: g = 448 · 6 / max|x| = 2688 / {_number(largest)} = "
                          f"{_number(explanation.global_scale)}   (float32, one per tensor)"))
    for group in explanation.groups:
        count = len(group.values)
        where = (f"values {group.start}–{group.start + count - 1}"
                 if len(explanation.groups) > 1 else f"{count} values, one group")
        lines.append(Text(f"{scheme.method}{bits}, {where}", style="bold"))
        if floats:
            lines += _float_steps(scheme, group, explanation.global_scale)
        elif scheme.symmetric:
            lines.append(Text(f"  range:  max|x| = {_number(group.high)}"))
            lines.append(Text(f"  scale:  s = max|x| / {highest} = {_number(group.high)} / "
                              f"{highest} = {_number(group.scale)}"
                              + (f"   (1/s = {_number(1 / group.scale)})" if group.scale else "")))
            lines.append(Text(f"  codes:  q = round(x / s), kept in [{lowest}, {highest}]"))
        else:
            lines.append(Text(f"  range:  lo = min(min x, 0) = {_number(group.low)}, "
                              f"hi = max(max x, 0) = {_number(group.high)}"))
            lines.append(Text(f"  scale:  s = (hi - lo) / {scheme.levels} = "
                              f"{_number(group.scale)}"))
            lines.append(Text(f"  zero point: z = round({lowest} - lo / s) = "
                              f"{group.zero_point}   (the code of 0.0)"))
            lines.append(Text(f"  codes:  q = round(x / s + z), kept in [{lowest}, {highest}]"))
        if group.scale == 0:
            lines.append(Text("  an all-zero group: s = 0, every code 0, exact"))
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("i", justify="right")
        table.add_column("x", justify="right")
        table.add_column("x / s" if scheme.symmetric else "x / s + z", justify="right")
        table.add_column("q", justify="right")
        table.add_column("x̂ = q·s" if scheme.symmetric else "x̂ = (q - z)·s", justify="right")
        table.add_column("x - x̂", justify="right")
        for offset in range(len(group.values)):
            code = float(group.codes[offset])
            table.add_row(str(group.start + offset), _number(float(group.values[offset])),
                          f"{float(group.scaled[offset]):.3f}",
                          _number(code) if floats else str(int(code)),
                          _number(float(group.dequantized[offset])),
                          _signed(float(group.errors[offset])))
        lines.append(table)
        largest = float(np.abs(group.errors).max()) if len(group.errors) else 0.0
        if not floats:
            lines.append(Text(f"  largest error {largest:.3g} ≤ s/2 = {group.scale / 2:.3g}"))
        else:
            lines.append(Text(f"  largest error {largest:.3g}"))
    stats = explanation.stats
    lines.append(Text(f"MSE {stats.mse:.3g}, SQNR {sqnr_text(stats.sqnr_db)}, "
                      f"cosine similarity {stats.cosine_similarity:.6f}"))
    return Group(*lines)


#: The magnitudes of each float element, for the explanation.
_GRIDS = {"e2m1": "±0, 0.5, 1, 1.5, 2, 3, 4, 6", "e4m3": "3 mantissa bits, up to ±448"}


def _float_steps(scheme: Scheme, group: GroupSteps, global_scale: float | None) -> list[Text]:
    """How a group of float elements gets its scale and values."""
    largest = scheme.element.largest
    lines = [Text(f"  range:  max|x| = {_number(group.high)}")]
    if scheme.scale_type == "e8m0":
        exponent = int(group.stored_scale or 0)
        lines.append(Text(f"  scale:  s = 2^e, the smallest power of two with max|x| / s ≤ "
                          f"{largest:g}: e = {exponent}, s = {_number(group.scale)}   (E8M0 "
                          f"code {exponent + 127})"))
    elif scheme.scale_type == "e4m3":
        lines.append(Text(f"  scale:  E4M3(g · max|x| / {largest:g}) = "
                          f"{_number(group.stored_scale or 0)}, s = that / g = "
                          f"{_number(group.scale)}"))
    else:
        lines.append(Text(f"  scale:  s = max|x| / {largest:g} = {_number(group.high)} / "
                          f"{largest:g} = {_number(group.scale)}"))
    lines.append(Text(f"  values: q = x / s rounded to the nearest {scheme.element.name.upper()} "
                      f"value ({_GRIDS[scheme.element.name]})"))
    if global_scale is not None and not global_scale:
        lines.append(Text("  an all-zero group: every value 0, exact"))
    return lines


def diff_view(report: DiffReport, width: int, worst: int | None = None) -> Group:
    """The comparison, fitted to ``width``; with ``worst``, only that many tensors, lowest
    SQNR first."""
    shown = report.compared if worst is None else report.worst(worst)
    title = f"{display_text(str(report.b))} against {display_text(str(report.a))}"
    if worst is not None:
        title += (f": the {len(shown)} tensors of lowest SQNR, of {len(report.compared)} "
                  "(--all shows every tensor)")
    columns = [Column("Tensor", "name"), Column("Shape", "number", drop=5),
               Column("A", "text", drop=6, shortest=12), Column("B", "text", drop=2,
                                                                shortest=22),
               Column("MSE", "number", drop=7, justify="right"),
               Column("Max abs err", "number", drop=8, justify="right"),
               Column("SQNR dB", "number", justify="right"),
               Column("Cosine", "number", drop=4, justify="right")]
    for tensor in shown:
        cells = [display_text(tensor.name), shape_text(tensor.shape), tensor.a, tensor.b,
                 *_stats_cells(tensor.stats)]
        for column, cell in zip(columns, cells, strict=True):
            column.cells.append(cell)
    table = fitted_table(columns, width, title=title, title_justify="left")
    lines: list[Any] = [table] if report.compared and worst != 0 else []
    pooled = report.pooled_stats
    if report.compared:
        lines.append(Text(f"Compared {len(report.compared)} floating tensors: pooled SQNR "
                          f"{sqnr_text(pooled.sqnr_db)}, max abs error "
                          f"{pooled.max_abs_error:.3g}"))
        lines.append(Text("Worst: " + ", ".join(
            f"{display_text(t.name)} ({sqnr_text(t.stats.sqnr_db)})" for t in report.worst())))
    else:
        lines.append(Text("No floating tensor in common to compare"))
    for label, names in (("Only in A", report.only_in_a), ("Only in B", report.only_in_b)):
        if names:
            lines.append(Text(f"{label}: " + ", ".join(display_text(n) for n in names)))
    for name, one, other in report.shape_mismatches:
        lines.append(Text(f"Different shapes: {display_text(name)} {shape_text(one)} in A, "
                          f"{shape_text(other)} in B"))
    for name, label_a, label_b in report.not_comparable:
        lines.append(Text(f"Not compared: {display_text(name)} is {label_a} in A, {label_b} "
                          "in B"))
    if report.exact:
        differing = [t for t in report.exact if not t.equal]
        line = (f"Compared exactly: {len(report.exact)} integer or other non-float tensors, "
                f"{len(report.exact) - len(differing)} equal")
        if differing:
            line += "; differ: " + ", ".join(
                f"{display_text(t.name)} ({t.differing:,} elements)" for t in differing)
        lines.append(Text(line))
    if report.identical_names_and_shapes:
        lines.append(Text("Same tensor names and shapes on both sides"))
    return Group(*lines)


def diff_failures(report: DiffReport, fail_under: float) -> list[str]:
    """Why the comparison fails ``qz diff --fail-under``: tensors below the SQNR, and
    every other difference (empty: it passes)."""
    failures = []
    below = [t for t in report.worst(len(report.compared)) if t.stats.sqnr_db < fail_under]
    if below:
        listed = ", ".join(f"{display_text(t.name)} ({sqnr_text(t.stats.sqnr_db)})"
                           for t in below[:3])
        more = f" and {len(below) - 3} more" if len(below) > 3 else ""
        threshold = "exact" if math.isinf(fail_under) else f"{fail_under:g} dB"
        failures.append(f"{len(below)} tensor{'s' if len(below) > 1 else ''} below "
                        f"{threshold}: {listed}{more}")
    others = [(len(report.only_in_a), "only in A"), (len(report.only_in_b), "only in B"),
              (len(report.shape_mismatches), "with different shapes"),
              (len(report.not_comparable), "not comparable"),
              (sum(not t.equal for t in report.exact), "integer or other tensors differing")]
    failures += [f"{count} tensor{'s' if count > 1 else ''} {what}"
                 for count, what in others if count]
    return failures
