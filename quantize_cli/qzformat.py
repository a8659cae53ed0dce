"""How a quantized tensor is stored in a qz file (format version 1, DESIGN §4).

A quantized tensor ``W`` keeps its name and shape and is stored as I8; its scale is
``W_scale`` (F32) and, for affine, its zero point ``W_zero_point`` (I8), with the shapes of
``Scheme.scale_shape``. ``__metadata__`` gains ``qz.format_version``, ``qz.version`` and
``qz.tensors``, a JSON string describing each quantized tensor. docs/FORMAT.md is the
description for other tools.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .core.scheme import GRANULARITIES, METHODS, Scheme
from .errors import QuantizedFormatError, SchemeError, located
from .storage.dtypes import FLOAT_DTYPES
from .storage.header import Header

FORMAT_VERSION = "1"
KEY_FORMAT_VERSION = "qz.format_version"
KEY_VERSION = "qz.version"
KEY_TENSORS = "qz.tensors"
KEY_SOURCE = "qz.source"
KEY_OPTIONS = "qz.options"
KEY_COMMAND = "qz.command"
KEY_ROUNDING = "qz.rounding"
QZ_KEY_PREFIX = "qz."

#: The rounding rule, recorded in every output (DESIGN §1).
ROUNDING = ("round half to even (numpy.rint) of x / s (+ z) in float32, clipped to the "
            "method's range; s from the group's float32 min/max in float64, rounded once "
            "to float32")
#: Stands in for the input's SHA-256 until it is known (same length, so the header keeps
#: its size and is rewritten in place).
PENDING_HASH = "0" * 64


def provenance(source_file: str, sha256: str | None, options: dict[str, Any]) -> dict[str, str]:
    """The metadata that lets anyone re-create an output bit for bit: the source file and
    its hash, the options, the command, the rounding rule (and ``qz.version``)."""
    return {
        KEY_SOURCE: json.dumps({"file": source_file, "sha256": sha256},
                               separators=(",", ":"), sort_keys=True),
        KEY_OPTIONS: json.dumps(options, separators=(",", ":"), sort_keys=True),
        KEY_COMMAND: command_line(source_file, options),
        KEY_ROUNDING: ROUNDING,
    }


def command_line(source: str, options: dict[str, Any]) -> str:
    """The ``qz quantize`` command that re-creates the output from ``source``."""
    parts = ["qz", "quantize", source, "--method", options["method"]]
    if options.get("target_sqnr") is None:
        granularity = options["granularity"]
        parts += (["--block", str(options["block"])] if granularity == "block"
                  else ["--per-channel"] if granularity == "channel" else ["--per-tensor"])
    else:
        parts += ["--target-sqnr", f"{options['target_sqnr']:g}"]
    parts += ["--clip", options["clip"]]
    for pattern in options.get("include", []):
        parts += ["--include", pattern]
    for pattern in options.get("exclude", []):
        parts += ["--exclude", pattern]
    if options.get("format", "qz") != "qz":
        parts += ["--format", options["format"]]
    if options.get("hash") is False:
        parts.append("--no-hash")
    return " ".join(shlex.quote(part) for part in parts)


def scale_name(name: str) -> str:
    return f"{name}_scale"


def zero_point_name(name: str) -> str:
    return f"{name}_zero_point"


@dataclass(frozen=True)
class QuantizedEntry:
    """One entry of ``qz.tensors``: how tensor ``name`` was quantized, from which dtype."""

    name: str
    scheme: Scheme
    original_dtype: str

    def to_json(self) -> dict[str, Any]:
        described = {
            "method": self.scheme.method,
            "granularity": self.scheme.granularity,
            "block": self.scheme.block_size,
            "dtype": self.original_dtype,
        }
        if self.scheme.clip != "none":  # optional: absent means the full range
            described["clip"] = self.scheme.clip
        return described

    def companion_names(self) -> list[str]:
        names = [scale_name(self.name)]
        if not self.scheme.symmetric:
            names.append(zero_point_name(self.name))
        return names


def is_quantized(header: Header) -> bool:
    return KEY_FORMAT_VERSION in header.metadata


def quantized_metadata(
    input_metadata: dict[str, str], entries: list[QuantizedEntry]
) -> dict[str, str]:
    """The output ``__metadata__``: every input key, plus the qz keys."""
    described = {entry.name: entry.to_json() for entry in sorted(entries, key=_by_name)}
    return {
        **input_metadata,
        KEY_FORMAT_VERSION: FORMAT_VERSION,
        KEY_VERSION: __version__,
        KEY_TENSORS: json.dumps(described, separators=(",", ":"), sort_keys=True),
    }


def _by_name(entry: QuantizedEntry) -> str:
    return entry.name


def plain_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata without the qz keys (what dequantize writes)."""
    return {key: value for key, value in metadata.items() if not key.startswith(QZ_KEY_PREFIX)}


def read_quantized_entries(header: Header, path: str | Path) -> list[QuantizedEntry]:
    """Validate a qz file's metadata and tensors; return its quantized entries.

    Raises:
        QuantizedFormatError: not a qz file, unknown format version, malformed
            ``qz.tensors``, or tensors whose names, dtypes or shapes break the format.
    """
    metadata = header.metadata
    version = metadata.get(KEY_FORMAT_VERSION)
    if version is None:
        raise QuantizedFormatError(
            located(path, None, f"not a qz-quantized file (no {KEY_FORMAT_VERSION} metadata)")
        )
    if version != FORMAT_VERSION:
        raise QuantizedFormatError(
            located(path, None, f"unsupported qz format version {version!r} (this qz reads "
                    f"{FORMAT_VERSION})"),
            hint="a newer qz may read it",
        )
    try:
        described = json.loads(metadata.get(KEY_TENSORS, ""))
    except (json.JSONDecodeError, RecursionError):
        raise QuantizedFormatError(
            located(path, None, f"{KEY_TENSORS} metadata is not valid JSON")
        ) from None
    if not isinstance(described, dict):
        raise QuantizedFormatError(located(path, None, f"{KEY_TENSORS} must be a JSON object"))
    entries = [_parse_entry(name, value, path) for name, value in described.items()]
    for entry in entries:
        _check_stored_tensors(header, entry, path)
    return entries


def _parse_entry(name: str, value: Any, path: str | Path) -> QuantizedEntry:
    def bad(rule: str) -> QuantizedFormatError:
        return QuantizedFormatError(located(path, name, f"invalid {KEY_TENSORS} entry: {rule}"))

    required = {"method", "granularity", "block", "dtype"}
    if not isinstance(value, dict) or not required <= set(value) <= required | {"clip"}:
        raise bad("expected the keys method, granularity, block, dtype (and clip)")
    if value["method"] not in METHODS or value["granularity"] not in GRANULARITIES:
        raise bad(f"unknown method/granularity {value['method']!r}/{value['granularity']!r}")
    block = value["block"]
    if value["granularity"] == "block":
        if type(block) is not int or block < 1:
            raise bad(f"block must be a positive integer, got {block!r}")
    elif block is not None:
        raise bad(f"block must be null for {value['granularity']} granularity")
    if value["dtype"] not in FLOAT_DTYPES:
        raise bad(f"original dtype {value['dtype']!r} is not a float dtype qz quantizes")
    try:
        scheme = Scheme(value["method"], value["granularity"], block, value.get("clip", "none"))
    except SchemeError as error:
        raise bad(str(error)) from None
    return QuantizedEntry(name=name, scheme=scheme, original_dtype=value["dtype"])


def _check_stored_tensors(header: Header, entry: QuantizedEntry, path: str | Path) -> None:
    name = entry.name
    if name not in header:
        raise QuantizedFormatError(
            located(path, name, f"listed in {KEY_TENSORS} but the file has no such tensor")
        )
    codes = header[name]
    if codes.dtype != "I8":
        raise QuantizedFormatError(
            located(path, name, f"quantized values must be I8, found {codes.dtype}")
        )
    try:
        expected_shape = entry.scheme.scale_shape(codes.shape)
    except SchemeError as error:
        raise QuantizedFormatError(located(path, name, str(error))) from None
    wanted = [(scale_name(name), "F32")]
    if not entry.scheme.symmetric:
        wanted.append((zero_point_name(name), "I8"))
    for companion, dtype in wanted:
        if companion not in header:
            raise QuantizedFormatError(
                located(path, name, f"{entry.scheme.describe()} needs tensor {companion!r}, "
                        "which is missing")
            )
        found = header[companion]
        if found.dtype != dtype or found.shape != expected_shape:
            raise QuantizedFormatError(
                located(path, companion, f"must be {dtype} of shape {list(expected_shape)}, "
                        f"found {found.dtype} {list(found.shape)}")
            )
    if entry.scheme.symmetric and zero_point_name(name) in header:
        raise QuantizedFormatError(
            located(path, name, f"absmax has no zero point, but {zero_point_name(name)!r} "
                    "exists")
        )


def check_stored_values(
    path: Path,
    name: str,
    scheme: Scheme,
    codes: np.ndarray,
    scale: np.ndarray,
    *,
    check_codes: bool = True,
) -> None:
    """Refuse stored numbers qz could never have written, rather than return wrong values:
    non-finite or negative scales, and (``check_codes``) the absmax code -128."""
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise QuantizedFormatError(
            located(path, scale_name(name), "holds non-finite or negative scales"))
    if check_codes and scheme.symmetric and codes.size and codes.min() < -127:
        raise QuantizedFormatError(
            located(path, name, "holds the code -128, outside absmax's range [-127, 127]"))
