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
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

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


# ----------------------------------------------------------- tables that fit the width

#: What a column holds decides how it gives way on a narrow terminal: numbers never
#: (they are shown whole or their column is dropped), names are shortened in the middle
#: (the end says which weight, the start which layer), text is cut at the end.
Kind = Literal["name", "number", "text"]
NAME_MINIMUM, NAME_ENOUGH, TEXT_MINIMUM = 16, 28, 10


@dataclass
class Column:
    """A column of a table that fits the terminal: ``drop`` orders the columns that may
    go when even shortened names and text do not fit (the highest first; 0: never);
    ``shortest`` is how narrow names and text may become."""

    header: str
    kind: Kind
    drop: int = 0
    justify: Literal["left", "right"] = "left"
    shortest: int | None = None
    cells: list[str | Text] = field(default_factory=list)

    def natural(self) -> int:
        """The widest cell, or the header if wider: a short one whole, a long one at
        its longest word (it wraps)."""
        header = max((len(word) for word in self.header.split()), default=0)
        if len(self.header) <= 8:
            header = len(self.header)
        return max([header, *(len(cell) for cell in self.cells)])

    def minimum(self, roomy_names: bool = True) -> int:
        """How narrow the column may become. With ``roomy_names``, names keep the width
        at which their initials tell them apart (within bounds)."""
        if self.kind == "number":
            return self.natural()
        if self.kind == "name":
            initials = max((len(shorten_name(str(cell), 0, ellipsis=False))
                            for cell in self.cells), default=0) if roomy_names else 0
            return min(self.natural(), max(NAME_MINIMUM, min(initials, NAME_ENOUGH)))
        return min(self.natural(), self.shortest or TEXT_MINIMUM)


def shorten_name(name: str, width: int, ellipsis: bool = True) -> str:
    """A tensor name in at most ``width`` characters: the words of its leading parts
    become their initials, from the left (layer numbers and the last two parts stay, as
    they tell the tensors apart), then the middle gives way to an ellipsis.

    >>> shorten_name("model.layers.11.self_attn.q_proj.weight", 24)
    'm.l.11.s.q_proj.weight'
    >>> shorten_name("model.layers.11.self_attn.q_proj.weight", 16)
    'm.l.11.…j.weight'
    """
    if len(name) <= width:
        return name
    parts = name.split(".")
    for index in range(len(parts) - 2):
        if not parts[index].isdigit() and len(parts[index]) > 1:
            parts[index] = parts[index][0]
            if len(".".join(parts)) <= width:
                return ".".join(parts)
    return shorten_middle(".".join(parts), width) if ellipsis else ".".join(parts)


def shorten_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, the middle replaced by an ellipsis.

    >>> shorten_middle("model.layers.11.self_attn.q_proj.weight", 24)
    'model.layer…_proj.weight'
    """
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _shorten_end(cell: str | Text, width: int) -> str | Text:
    if len(cell) <= width:
        return cell
    text = cell if isinstance(cell, Text) else Text(cell)
    text = text.copy()
    text.truncate(width, overflow="ellipsis")
    return text


#: Columns with ``drop`` up to this go only once names are as short as they may be.
ESSENTIAL = 2


def fitted_table(columns: list[Column], width: int, **options: Any) -> Table:
    """A table of ``columns`` no wider than ``width``: text and names shortened to their
    minimum first, then columns dropped by ``drop`` (the essential ones only once names
    are at their shortest), then the space left given back to names and text. Numbers
    are never cut.

    >>> table = fitted_table([Column("Tensor", "name", cells=["a" * 40]),
    ...                       Column("SQNR dB", "number", justify="right", cells=["42.10"])], 30)
    >>> [column.header for column in table.columns], table.columns[0].width
    (['Tensor', 'SQNR dB'], 16)
    """
    shown = list(columns)

    def overhead(count: int) -> int:
        return 3 * count + 1  # borders and padding of a boxed table

    def needed(roomy_names: bool) -> int:
        return sum(c.minimum(roomy_names) for c in shown) + overhead(len(shown))

    for roomy_names, keep in ((True, ESSENTIAL), (False, ESSENTIAL), (False, 0)):
        while needed(roomy_names) > width and any(c.drop > keep for c in shown):
            shown.remove(max((c for c in shown if c.drop > keep), key=lambda c: c.drop))
        if needed(roomy_names) <= width:
            break
    widths = {id(c): c.minimum(roomy_names) for c in shown}
    spare = width - overhead(len(shown)) - sum(widths.values())
    # Text first: names already have the width at which their initials tell them apart.
    for kind in ("text", "name"):
        for column in shown:
            if column.kind == kind and spare > 0:
                grow = min(spare, column.natural() - widths[id(column)])
                widths[id(column)] += grow
                spare -= grow
    if spare < 0:  # even the columns that never go do not fit: names give way to numbers
        for column in shown:
            if column.kind == "name":
                widths[id(column)] = max(1, widths[id(column)] + spare)
    table = Table(**options)
    for column in shown:
        # Cells are made to fit below, so only a header ever wraps (at its spaces).
        table.add_column(column.header, justify=column.justify, width=widths[id(column)])
    for index in range(len(columns[0].cells) if columns else 0):
        cells: list[str | Text] = []
        for column in shown:
            cell, column_width = column.cells[index], widths[id(column)]
            if column.kind == "name":
                plain = cell.plain if isinstance(cell, Text) else cell
                cells.append(Text(shorten_name(plain, column_width)))
            elif column.kind == "text":
                cells.append(_shorten_end(cell, column_width))
            else:
                cells.append(cell)
        table.add_row(*cells)
    return table


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "scalar"


def _db(value: float) -> str:
    return "exact" if math.isinf(value) and value > 0 else f"{value:.2f}"


def _sqnr(value: float) -> str:
    """An SQNR in a sentence: "42.10 dB", or "exact"."""
    text = _db(value)
    return text if text == "exact" else f"{text} dB"


def _stats_cells(stats: ErrorStats) -> tuple[str, str, str, str]:
    """MSE, max abs error, SQNR and cosine, as the tables show them."""
    return (f"{stats.mse:.3g}", f"{stats.max_abs_error:.3g}", _db(stats.sqnr_db),
            f"{stats.cosine_similarity:.6f}")


def _precision(scheme: Scheme) -> str:
    """What a scheme stores: I8 (as qz 1.0 said), I4, F8, NVFP4, …"""
    if scheme.element.is_float:
        return scheme.label if scheme.info.microscaling else "F8"
    return f"I{scheme.bits}"


def _json_number(value: float) -> float | None:
    # JSON has no infinity; an exact round trip has no finite SQNR.
    return None if math.isinf(value) or math.isnan(value) else value


def scheme_json(scheme: Scheme | None) -> dict[str, Any] | None:
    if scheme is None:
        return None
    return {"method": scheme.method, "granularity": scheme.granularity,
            "block": scheme.block_size, "clip": scheme.clip, "bits": scheme.bits,
            "label": scheme.label, "activations": scheme.activations}


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


def quantize_table(report: QuantizeReport, width: int, worst: int | None = None) -> Table:
    """Per-tensor table that fits ``width``: scheme (or why copied) and the error
    statistics; with ``worst``, only that many quantized tensors, lowest SQNR first."""
    shown = report.tensors if worst is None else report.worst(worst)
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
    for row in shown:
        cells: list[str | Text] = [
            display_text(row.name), _shape(row.shape),
            f"{row.dtype}→{_precision(row.scheme)}" if row.scheme else row.dtype]
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
        lines.append(Text(f"Pooled: SQNR {_sqnr(pooled.sqnr_db)}, MSE {pooled.mse:.3g}, "
                          f"max abs error {pooled.max_abs_error:.3g}, "
                          f"cosine {pooled.cosine_similarity:.6f}"))
        worst = report.worst()
        if worst:
            listed = ", ".join(f"{display_text(t.name)} ({_sqnr(t.stats.sqnr_db)})"  # type: ignore[union-attr]
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
        cells += [tensor.dtype, _shape(tensor.shape), decimal(tensor.nbytes),
                  _stored_as(tensor)]
        for column, cell in zip(columns, cells, strict=True):
            column.cells.append(cell)
    table = fitted_table(columns, width)
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


def dequantize_json(report: DequantizeReport) -> dict[str, Any]:
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "command": "dequantize",
        "input": str(report.source),
        "output": str(report.output),
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                     "action": "restore" if t.restored_from else "copy",
                     "restored_from": scheme_json(t.restored_from)} for t in report.tensors],
        "folder": folder_json(report.folder),
        "totals": {"restored_tensors": sum(t.restored_from is not None for t in report.tensors),
                   "copied_tensors": sum(t.restored_from is None for t in report.tensors),
                   "output_bytes": report.output_bytes},
    }


def dump_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)


def leave_on_closed_output(file: Any) -> NoReturn:
    """The reader of ``file`` went away (``qz … | head``) after the job was done: that
    is no failure, so exit 0. Later writes (and the interpreter's final flush) go to
    /dev/null, so that nothing complains on the way out."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, file.fileno())
    raise SystemExit(0)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's own handler exits with status 1.
        leave_on_closed_output(self.file)


def make_console(file: Any, terminal: bool) -> Console:
    """A console for ``file``; off a terminal it is wide, so that tables stay readable
    in logs (COLUMNS still wins when set)."""
    width = None if terminal or "COLUMNS" in os.environ else 160
    return _Console(file=file, width=width, soft_wrap=False, highlight=False)


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
    lines.append(Text(f"MSE {stats.mse:.3g}, SQNR {_sqnr(stats.sqnr_db)}, "
                      f"cosine similarity {stats.cosine_similarity:.6f}"))
    return Group(*lines)


# ------------------------------------------------------------------------------- diff


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
        cells = [display_text(tensor.name), _shape(tensor.shape), tensor.a, tensor.b,
                 *_stats_cells(tensor.stats)]
        for column, cell in zip(columns, cells, strict=True):
            column.cells.append(cell)
    table = fitted_table(columns, width, title=title, title_justify="left")
    lines: list[Any] = [table] if report.compared else []
    pooled = report.pooled_stats
    if report.compared:
        lines.append(Text(f"Compared {len(report.compared)} floating tensors: pooled SQNR "
                          f"{_sqnr(pooled.sqnr_db)}, max abs error "
                          f"{pooled.max_abs_error:.3g}"))
        lines.append(Text("Worst: " + ", ".join(
            f"{display_text(t.name)} ({_sqnr(t.stats.sqnr_db)})" for t in report.worst())))
    else:
        lines.append(Text("No floating tensor in common to compare"))
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


def diff_failures(report: DiffReport, fail_under: float) -> list[str]:
    """Why the comparison fails ``qz diff --fail-under``: tensors below the SQNR, and
    every other difference (empty: it passes)."""
    failures = []
    below = [t for t in report.worst(len(report.compared)) if t.stats.sqnr_db < fail_under]
    if below:
        listed = ", ".join(f"{display_text(t.name)} ({_sqnr(t.stats.sqnr_db)})"
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


def diff_json(report: DiffReport, fail_under: float | None = None,
              failures: list[str] | None = None) -> dict[str, Any]:
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
        # JSON has no infinity: "--fail-under inf" is recorded as the string "inf".
        "fail_under": "inf" if fail_under == math.inf else fail_under,
        "failures": failures or [],
    }
