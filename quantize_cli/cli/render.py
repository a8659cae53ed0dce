"""Rendering reports as rich tables and as JSON. The only module besides the CLI that
imports rich.

Every string that comes from a file (tensor names, metadata) passes through
:func:`display_text`, which escapes control characters, and is placed in a ``Text`` object,
so that neither ANSI escapes nor rich markup such as ``[bold]`` in a tensor name is ever
interpreted.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.filesize import decimal
from rich.table import Table
from rich.text import Text

from ..core.explain import Explanation
from ..core.scheme import Scheme
from ..core.stats import ErrorStats
from ..jobs.reports import (
    DequantizeReport,
    DiffReport,
    FolderReport,
    InspectedTensor,
    InspectReport,
    QuantizeReport,
    TensorReport,
)

#: Version of the JSON documents the commands print. 2: ``format`` on quantize and
#: inspect, tensor roles "codes"/"scale"/"zero_point"/"shape", exact comparisons in diff.
JSON_SCHEMA_VERSION = 2


def display_text(value: str) -> str:
    """``value`` with control and format characters shown as escapes.

    >>> display_text("w\\x1b[31m")
    'w\\\\x1b[31m'
    """
    if value.isprintable():
        return value
    return "".join(
        char if char.isprintable() or char == " " else _escape(char) for char in value
    )


def _escape(char: str) -> str:
    if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def _name(value: str) -> Text:
    return Text(display_text(value))


def _name_width(tensors: Any) -> int:
    """Keep tensor names on one line where they fit: they matter more than the numbers."""
    return min(max((len(display_text(t.name)) for t in tensors), default=6), 36)


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "scalar"


def _db(value: float) -> str:
    return "exact" if math.isinf(value) and value > 0 else f"{value:.2f}"


def _stats_cells(stats: ErrorStats) -> tuple[str, str, str, str]:
    """MSE, max abs error, SQNR and cosine, as the tables show them."""
    return (f"{stats.mse:.3g}", f"{stats.max_abs_error:.3g}", _db(stats.sqnr_db),
            f"{stats.cosine_similarity:.6f}")


def _precision(scheme: Scheme) -> str:
    """What a scheme stores: I8 (as qz 1.0 said), I4 or F8."""
    return "F8" if scheme.method == "fp8" else f"I{scheme.bits}"


def _json_number(value: float) -> float | None:
    # JSON has no infinity; an exact round trip has no finite SQNR.
    return None if math.isinf(value) or math.isnan(value) else value


def scheme_json(scheme: Scheme | None) -> dict[str, Any] | None:
    if scheme is None:
        return None
    return {"method": scheme.method, "granularity": scheme.granularity,
            "block": scheme.block_size, "clip": scheme.clip, "bits": scheme.bits}


def stats_json(stats: ErrorStats | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {
        "mse": stats.mse,
        "max_abs_error": stats.max_abs_error,
        "sqnr_db": _json_number(stats.sqnr_db),
        "cosine_similarity": stats.cosine_similarity,
    }


# --------------------------------------------------------------------------- quantize


def quantize_table(report: QuantizeReport) -> Table:
    """Per-tensor table: scheme (or why copied) and the error statistics."""
    title = "Plan (dry run)" if report.dry_run else "Quantization error per tensor"
    table = Table(title=title, title_justify="left", show_lines=False)
    # No minimum width: on a narrow terminal names fold rather than numbers being cut.
    table.add_column("Tensor", overflow="fold")
    table.add_column("Shape", no_wrap=True)
    table.add_column("Dtype", no_wrap=True)
    table.add_column("Scheme" if report.dry_run else "Scheme / reason")
    if report.dry_run:
        table.add_column("Reason")
        table.add_column("Size before", justify="right")
        table.add_column("Size after", justify="right")
        table.add_column("Bits/weight", justify="right")
    else:
        for heading in ("MSE", "Max abs err", "SQNR dB", "Cosine"):
            table.add_column(heading, justify="right")
    for tensor in report.tensors:
        dtype = f"{tensor.dtype}→{_precision(tensor.scheme)}" if tensor.scheme else tensor.dtype
        label = tensor.scheme.describe() if tensor.scheme else "copied"
        if report.dry_run:
            table.add_row(_name(tensor.name), _shape(tensor.shape), dtype, label,
                          _name(tensor.reason), decimal(tensor.input_bytes),
                          decimal(tensor.output_bytes), f"{tensor.bits_per_weight:.2f}")
        elif tensor.scheme is None:
            table.add_row(_name(tensor.name), _shape(tensor.shape), dtype,
                          Text(f"copied: {display_text(tensor.reason)}", style="dim"),
                          "", "", "", "")
        elif tensor.stats is None:
            table.add_row(_name(tensor.name), _shape(tensor.shape), dtype, label,
                          "", "", "", "")
        else:
            table.add_row(_name(tensor.name), _shape(tensor.shape), dtype, label,
                          *_stats_cells(tensor.stats))
    return table


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
        lines.append(Text(f"Pooled: SQNR {_db(pooled.sqnr_db)} dB, MSE {pooled.mse:.3g}, "
                          f"max abs error {pooled.max_abs_error:.3g}, "
                          f"cosine {pooled.cosine_similarity:.6f}"))
        worst = report.worst()
        if worst:
            listed = ", ".join(f"{display_text(t.name)} ({_db(t.stats.sqnr_db)} dB)"  # type: ignore[union-attr]
                               for t in worst)
            lines.append(Text(f"Worst: {listed}"))
    lines += _folder_lines(report.folder)
    if not report.dry_run:
        lines.append(Text(f"Wrote {display_text(str(report.output))}"))
    else:
        lines.append(Text(f"Would write {display_text(str(report.output))} (nothing written)"))
    return Group(*lines)


def _folder_lines(folder: FolderReport | None) -> list[Text]:
    """What a folder output carries over and leaves out, and notes about it."""
    if folder is None:
        return []
    lines = []
    if folder.carried_over:
        carried = ", ".join(display_text(path) for path in folder.carried_over)
        lines.append(Text(f"Carried over: {carried}"))
    if folder.left_out:
        lines.append(Text("Left out: " + ", ".join(f"{display_text(path)} ({reason})"
                                                   for path, reason in folder.left_out)))
    lines += [Text(f"Note: {display_text(note)}") for note in folder.notes]
    return lines


def folder_json(folder: FolderReport | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    return {"carried_over": list(folder.carried_over),
            "left_out": [{"path": path, "reason": reason} for path, reason in folder.left_out],
            "notes": list(folder.notes)}


def _tensor_json(tensor: TensorReport) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "action": "quantize" if tensor.scheme else "copy",
        "reason": tensor.reason,
        "scheme": scheme_json(tensor.scheme),
        "input_bytes": tensor.input_bytes,
        "output_bytes": tensor.output_bytes,
        "bits_per_weight": tensor.bits_per_weight,
        "shard": tensor.shard,
        "selected": tensor.selected,
        "stats": stats_json(tensor.stats),
    }


def quantize_json(report: QuantizeReport) -> dict[str, Any]:
    measured = any(t.stats is not None for t in report.quantized)
    pooled = report.pooled_stats if measured else None
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "command": "quantize",
        "dry_run": report.dry_run,
        "input": str(report.source),
        "output": str(report.output),
        "format": report.format,
        "scheme": scheme_json(report.scheme),
        "tensors": [_tensor_json(tensor) for tensor in report.tensors],
        "folder": folder_json(report.folder),
        "totals": {
            "quantized_tensors": len(report.quantized),
            "copied_tensors": len(report.tensors) - len(report.quantized),
            "input_bytes": report.input_bytes,
            "output_bytes": report.output_bytes,
            "compression_ratio": _json_number(report.compression_ratio),
            "bits_per_weight": report.bits_per_weight,
            "selected_bits_per_weight": report.selected_bits_per_weight,
            "target_bits": report.target_bits,
            "schemes": dict(report.schemes),
            "pooled": stats_json(pooled),
            "worst": [t.name for t in report.worst()] if not report.dry_run else [],
        },
    }


# ---------------------------------------------------------------------------- inspect


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


def inspect_table(report: InspectReport) -> Group:
    table = Table()
    table.add_column("Tensor", overflow="fold", min_width=_name_width(report.tensors))
    if report.sharded:
        table.add_column("Shard", overflow="fold")
    table.add_column("Dtype")
    table.add_column("Shape")
    table.add_column("Size", justify="right")
    table.add_column("Stored as")
    for tensor in report.tensors:
        cells: list[Any] = [_name(tensor.name)]
        if report.sharded:
            cells.append(_name(tensor.shard or ""))
        cells += [tensor.dtype, _shape(tensor.shape), decimal(tensor.nbytes),
                  Text(_stored_as(tensor))]
        table.add_row(*cells)
    described = "not quantized"
    if report.format is not None:
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


def inspect_json(report: InspectReport) -> dict[str, Any]:
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "command": "inspect",
        "input": str(report.source),
        "sharded": report.sharded,
        "files": [{"name": name, "bytes": size} for name, size in report.shards],
        "format": report.format,
        "format_version": report.format_version,
        "metadata": report.metadata,
        "tensors": [
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "bytes": t.nbytes,
                "role": t.role,
                "of": t.of,
                "scheme": scheme_json(t.scheme),
                "original_dtype": t.original_dtype,
                "stored_as": t.description,
                "shard": t.shard,
            }
            for t in report.tensors
        ],
        "totals": {"tensors": len(report.tensors), "parameters": report.parameter_count,
                   "bytes": report.total_bytes},
    }


def dequantize_summary(report: DequantizeReport) -> Group:
    restored = sum(t.restored_from is not None for t in report.tensors)
    return Group(*_folder_lines(report.folder), Text(
        f"Restored {restored} tensors, copied {len(report.tensors) - restored}; "
        f"wrote {display_text(str(report.output))} ({decimal(report.output_bytes)})"
    ))


def dump_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)


def make_console(file: Any, terminal: bool) -> Console:
    """A console for ``file``; off a terminal it is wide, so that tables stay readable
    in logs (COLUMNS still wins when set)."""
    width = None if terminal or "COLUMNS" in os.environ else 160
    return Console(file=file, width=width, soft_wrap=False, highlight=False)


# ---------------------------------------------------------------------------- explain


def _number(value: float) -> str:
    return f"{value:.6g}"


def _signed(value: float) -> str:
    return "0" if value == 0 else f"{value:+.3g}"


def explain_view(explanation: Explanation) -> Group:
    """Every step of quantizing a short vector: range, scale, zero point, codes, values
    back and the error of each element."""
    scheme = explanation.scheme
    lowest, highest = scheme.code_range
    bits = "" if scheme.bits == 8 else f", {scheme.bits} bits"
    lines: list[Any] = []
    for group in explanation.groups:
        count = len(group.values)
        where = (f"values {group.start}–{group.start + count - 1}"
                 if len(explanation.groups) > 1 else f"{count} values, one group")
        lines.append(Text(f"{scheme.method}{bits}, {where}", style="bold"))
        if scheme.symmetric:
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
            table.add_row(str(group.start + offset), _number(float(group.values[offset])),
                          f"{float(group.scaled[offset]):.3f}", str(int(group.codes[offset])),
                          _number(float(group.dequantized[offset])),
                          _signed(float(group.errors[offset])))
        lines.append(table)
        largest = float(np.abs(group.errors).max()) if len(group.errors) else 0.0
        lines.append(Text(f"  largest error {largest:.3g} ≤ s/2 = {group.scale / 2:.3g}"))
    stats = explanation.stats
    lines.append(Text(f"MSE {stats.mse:.3g}, SQNR {_db(stats.sqnr_db)} dB, "
                      f"cosine similarity {stats.cosine_similarity:.6f}"))
    return Group(*lines)


# ------------------------------------------------------------------------------- diff


def diff_view(report: DiffReport) -> Group:
    table = Table(title=f"{display_text(str(report.b))} against {display_text(str(report.a))}",
                  title_justify="left")
    table.add_column("Tensor", overflow="fold")
    table.add_column("Shape", no_wrap=True)
    table.add_column("A")
    table.add_column("B")
    for heading in ("MSE", "Max abs err", "SQNR dB", "Cosine"):
        table.add_column(heading, justify="right")
    for tensor in report.compared:
        table.add_row(_name(tensor.name), _shape(tensor.shape), tensor.a, tensor.b,
                      *_stats_cells(tensor.stats))
    lines: list[Any] = [table]
    pooled = report.pooled_stats
    lines.append(Text(f"Compared {len(report.compared)} tensors: pooled SQNR "
                      f"{_db(pooled.sqnr_db)} dB, max abs error {pooled.max_abs_error:.3g}"))
    for label, names in (("Only in A", report.only_in_a), ("Only in B", report.only_in_b)):
        if names:
            lines.append(Text(f"{label}: " + ", ".join(display_text(n) for n in names)))
    for name, one, other in report.shape_mismatches:
        lines.append(Text(f"Different shapes: {display_text(name)} {_shape(one)} in A, "
                          f"{_shape(other)} in B"))
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


def diff_json(report: DiffReport) -> dict[str, Any]:
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "command": "diff",
        "a": str(report.a),
        "b": str(report.b),
        "tensors": [{"name": t.name, "shape": list(t.shape), "a": t.a, "b": t.b,
                     "stats": stats_json(t.stats)} for t in report.compared],
        "only_in_a": report.only_in_a,
        "only_in_b": report.only_in_b,
        "shape_mismatches": [{"name": n, "a": list(a), "b": list(b)}
                             for n, a, b in report.shape_mismatches],
        "not_compared": [{"name": n, "a": a, "b": b} for n, a, b in report.not_comparable],
        "exact": [{"name": t.name, "shape": list(t.shape), "a": t.a, "b": t.b,
                   "differing_elements": t.differing} for t in report.exact],
        "pooled": stats_json(report.pooled_stats),
    }
