"""The JSON documents the commands write with ``--json``: one convention, versioned
(``schema_version``), with every number JSON can hold (no infinity: ``null``)."""

from __future__ import annotations

import json
import math
from typing import Any

from ..core import ErrorStats, Scheme
from ..core.stats import OutputError
from ..jobs.reports import (
    DequantizeReport,
    DiffReport,
    FolderReport,
    InspectReport,
    QuantizeReport,
    TensorReport,
)

#: Version of the JSON documents the commands print. 2: ``format`` on quantize and
#: inspect, tensor roles "codes"/"scale"/"zero_point"/"shape", exact comparisons in diff.
#: 3: quantize's ``notes`` (once ``folder.notes``) and ``warnings`` at the top level;
#: inspect's ``refused`` (a quantization qz does not read); roles "activation_scale" and
#: "group_index"; per tensor ``output_stats`` and the totals' ``pooled_output``, the
#: layer's output error with calibration.
JSON_SCHEMA_VERSION = 3


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


def output_json(output: OutputError | None) -> dict[str, Any] | None:
    if output is None:
        return None
    return {"signal": output.signal, "error": output.error,
            "sqnr_db": _json_number(output.sqnr_db)}


def folder_json(folder: FolderReport | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    return {"carried_over": list(folder.carried_over),
            "left_out": [{"path": path, "reason": reason} for path, reason in folder.left_out]}


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
        "output_stats": output_json(tensor.output),
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
        "notes": list(report.notes),
        "warnings": list(report.warnings),
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
            "pooled_output": output_json(report.pooled_output),
            "worst": [t.name for t in report.worst()] if not report.dry_run else [],
        },
    }


def inspect_json(report: InspectReport) -> dict[str, Any]:
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "command": "inspect",
        "input": str(report.source),
        "sharded": report.sharded,
        "files": [{"name": name, "bytes": size} for name, size in report.shards],
        "format": report.format,
        "format_version": report.format_version,
        "refused": report.refused,
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


def dump_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
