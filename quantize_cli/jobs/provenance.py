"""Provenance: what every quantized output records about how it was made (DESIGN
amendment 8), whatever its format, so that anyone can re-create it bit for bit."""

from __future__ import annotations

import json
import shlex
from typing import Any

from .. import __version__
from ..formats import DEFAULT_FORMAT

KEY_PREFIX = "qz."
KEY_VERSION = "qz.version"
KEY_SOURCE = "qz.source"
KEY_OPTIONS = "qz.options"
KEY_COMMAND = "qz.command"
KEY_ROUNDING = "qz.rounding"

#: The rounding rule, recorded in every output (DESIGN §1).
ROUNDING = ("round half to even (numpy.rint) of x / s (+ z) in float32, clipped to the "
            "method's range; s from the group's float32 min/max in float64, rounded once "
            "to float32")
#: Stands in for the input's SHA-256 until it is known (same length, so the header keeps
#: its size and is rewritten in place).
PENDING_HASH = "0" * 64


def provenance(source_file: str, sha256: str | None, options: dict[str, Any],
               command: str) -> dict[str, str]:
    """The metadata keys that say how an output was made: the qz version, the source
    file and its hash, the options, the command that re-creates the whole output (for a
    shard: the folder's) and the rounding rule.

    >>> options = {"method": "absmax", "granularity": "channel", "block": None,
    ...            "clip": "none"}
    >>> provenance("m.safetensors", None, options,
    ...            command_line("m.safetensors", options))["qz.command"]
    'qz quantize m.safetensors --method absmax --per-channel --clip none'
    """
    return {
        KEY_VERSION: __version__,
        KEY_SOURCE: json.dumps({"file": source_file, "sha256": sha256},
                               separators=(",", ":"), sort_keys=True),
        KEY_OPTIONS: json.dumps(options, separators=(",", ":"), sort_keys=True),
        KEY_COMMAND: command,
        KEY_ROUNDING: ROUNDING,
    }


def granularity_options(granularity: str, block_size: int | None) -> list[str]:
    """The command-line options that choose a granularity.

    >>> granularity_options("block", 64), granularity_options("channel", None)
    (['--block', '64'], ['--per-channel'])
    """
    if granularity == "block":
        return ["--block", str(block_size)]
    return ["--per-channel"] if granularity == "channel" else ["--per-tensor"]


def command_line(source: str, options: dict[str, Any]) -> str:
    """The ``qz quantize`` command that re-creates the output from ``source`` (the file,
    index or folder given as input)."""
    parts = ["qz", "quantize", source, "--method", options["method"]]
    if options.get("bits", 8) != 8:
        parts += ["--bits", str(options["bits"])]
    if options.get("activations") is not None:
        parts += ["--activations", options["activations"]]
    targets = [(flag, options.get(key)) for flag, key in (
        ("--target-sqnr", "target_sqnr"), ("--target-bits", "target_bits"))]
    if all(value is None for _, value in targets):
        parts += granularity_options(options["granularity"], options["block"])
    for flag, value in targets:
        if value is not None:
            parts += [flag, f"{value:g}"]
    parts += ["--clip", options["clip"]]
    for option, key in (("--include", "include"), ("--exclude", "exclude"),
                        ("--rule", "rules")):
        for pattern in options.get(key, []):
            parts += [option, pattern]
    if options.get("format", DEFAULT_FORMAT) != DEFAULT_FORMAT:
        parts += ["--format", options["format"]]
    if options.get("tensor_parallel", 1) != 1:
        parts += ["--tensor-parallel", str(options["tensor_parallel"])]
    if options.get("hash") is False:
        parts.append("--no-hash")
    if options.get("calibration"):
        parts += ["--calibration", options["calibration"]["file"]]
        parts += [*(["--no-gptq"] if options.get("gptq") is False else []),
                  *(["--act-order"] if options.get("act_order") else [])]
    return " ".join(shlex.quote(part) for part in parts)


def without_qz_keys(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata without qz's keys."""
    return {key: value for key, value in metadata.items() if not key.startswith(KEY_PREFIX)}


def restored_from(source_file: str) -> dict[str, str]:
    """What a dequantized file records in place of the quantized one's keys: qz's
    version and the file it was restored from (which tells, too, that qz wrote it).

    >>> restored_from("m.int8.safetensors")["qz.source"]
    '{"file":"m.int8.safetensors","sha256":null}'
    """
    return {KEY_VERSION: __version__,
            KEY_SOURCE: json.dumps({"file": source_file, "sha256": None},
                                   separators=(",", ":"), sort_keys=True)}
