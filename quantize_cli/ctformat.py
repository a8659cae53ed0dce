"""The compressed-tensors format (what vLLM loads): writing weight-only INT8 as
``pack-quantized``, and recognising compressed-tensors checkpoints for inspect and
dequantize.

For a quantized Linear weight ``X.weight`` of shape (out, in), pack-quantized stores:

* ``X.weight_packed`` I32 (out, in / 4): the codes plus 128 as bytes, four to an int32,
  little endian (compressed-tensors' ``pack_to_int32`` for 8 bits);
* ``X.weight_scale`` in the model's dtype, (out, 1) per channel or (out, in / group);
* ``X.weight_shape`` I64 [2]: (out, in).

Dequantized: ``(code) · scale`` computed in the scale's dtype. The naive/int-quantized
layout stores ``X.weight`` as I8 beside ``X.weight_scale`` (and ``X.weight_zero_point``).
Sources: compressed-tensors ``compressors/pack_quantized`` and vLLM's
``compressed_tensors.py``/``marlin_utils.py`` (see DESIGN.md's references).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core.scheme import Scheme
from .errors import SchemeError
from .storage.dtypes import FLOAT_DTYPES
from .storage.header import Header, TensorEntry
from .storage.writer import PlannedTensor

FORMAT = "compressed-tensors"
PACKED, SCALE, SHAPE, ZERO_POINT = "_packed", "_scale", "_shape", "_zero_point"
GROUP_SIZES = (32, 64, 128)
#: vLLM's INT8 weight-only kernel (Marlin) needs these multiples (marlin_utils.py).
IN_FEATURES_MULTIPLE, OUT_FEATURES_MULTIPLE = 128, 64
SUPPORTED = ("compressed-tensors (vLLM) loads weight-only INT8 only as absmax (symmetric), "
             "per channel or in groups of 32, 64 or 128")


def check_scheme(scheme: Scheme) -> None:
    """Refuse, before any work, a scheme the runtime cannot load."""
    if not scheme.symmetric:
        raise SchemeError(f"{SUPPORTED}; affine is not supported",
                          hint="use --method absmax")
    if scheme.granularity == "tensor":
        raise SchemeError(f"{SUPPORTED}; per tensor is not supported",
                          hint="use --per-channel or --block 128")
    if scheme.granularity == "block" and scheme.block_size not in GROUP_SIZES:
        raise SchemeError(f"{SUPPORTED}; block {scheme.block_size} is not supported",
                          hint="use --block 32, 64 or 128")


def why_not_loadable(entry: TensorEntry, scheme: Scheme) -> str | None:
    """Why the runtime could not load this tensor quantized (None: it can)."""
    if not entry.name.endswith(".weight"):
        return "not a layer's .weight"
    if "embed" in entry.name:
        return "an embedding (vLLM quantizes Linear layers only)"
    if len(entry.shape) != 2:
        return f"{len(entry.shape)}-D (vLLM quantizes 2-D Linear weights)"
    out_features, in_features = entry.shape
    if in_features % IN_FEATURES_MULTIPLE or out_features % OUT_FEATURES_MULTIPLE:
        return (f"shape {out_features}×{in_features}: vLLM's INT8 kernel needs in_features a "
                f"multiple of {IN_FEATURES_MULTIPLE} and out_features of "
                f"{OUT_FEATURES_MULTIPLE}")
    return None


def scale_dtype(entry: TensorEntry) -> str:
    """Scales are stored in the weight's own dtype, as compressed-tensors does."""
    return entry.dtype


def outputs(entry: TensorEntry, scheme: Scheme) -> list[PlannedTensor]:
    out_features, in_features = entry.shape
    groups = 1 if scheme.granularity == "channel" else in_features // (scheme.block_size or 1)
    return [
        PlannedTensor(entry.name + PACKED, "I32", (out_features, in_features // 4)),
        PlannedTensor(entry.name + SCALE, scale_dtype(entry), (out_features, groups)),
        PlannedTensor(entry.name + SHAPE, "I64", (2,)),
    ]


def pack(codes: np.ndarray) -> np.ndarray:
    """int8 codes (rows, in) → the bytes of ``weight_packed``: q + 128 as uint8."""
    return np.bitwise_xor(codes.view(np.uint8), np.uint8(0x80))


def quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json."""
    group = scheme.granularity == "block"
    weights = {
        "num_bits": 8, "type": "int", "symmetric": True,
        "strategy": "group" if group else "channel",
        "group_size": scheme.block_size if group else None,
        "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None,
                                      "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def write_config(folder: Path, source_config: Path | None, config: dict[str, Any]) -> None:
    """config.json of the output: the input model's, with ``quantization_config``."""
    document: dict[str, Any] = {}
    if source_config is not None and source_config.is_file():
        document = json.loads(source_config.read_text(encoding="utf-8"))
    document["quantization_config"] = config
    (folder / "config.json").write_text(json.dumps(document, indent=2) + "\n",
                                        encoding="utf-8")


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ForeignEntry:
    """A compressed-tensors weight found in a file: how to turn it back into floats."""

    name: str  # the weight's name, e.g. "model.layers.0.mlp.up_proj.weight"
    layout: str  # "pack-quantized" or "int-quantized"
    codes: str  # the tensor holding the codes
    scale: str
    zero_point: str | None
    shape: tuple[int, ...]
    dtype: str  # the restored dtype: the scale's
    strategy: str  # tensor, channel or group
    group_size: int | None

    @property
    def companions(self) -> list[str]:
        names = [self.codes, self.scale, self.zero_point, self.name + SHAPE]
        return [n for n in names if n is not None and n != self.name]

    def describe(self) -> str:
        label = "group " + str(self.group_size) if self.strategy == "group" else self.strategy
        return f"{FORMAT} {self.layout}, int8 {label}"


def find_foreign(header: Header, packed_shapes: dict[str, tuple[int, ...]]) -> list[ForeignEntry]:
    """compressed-tensors weights in a header. ``packed_shapes`` maps each
    ``X.weight_packed`` to its original shape (read from ``X.weight_shape``)."""
    found = []
    for entry in header.tensors:
        name = entry.name
        if name.endswith(PACKED) and entry.dtype == "I32":
            weight = name.removesuffix(PACKED)
            scale = header[weight + SCALE] if weight + SCALE in header else None
            shape = packed_shapes.get(name)
            if scale is None or shape is None or len(shape) != 2:
                continue
            found.append(_entry(weight, "pack-quantized", name, scale, None, shape))
        elif (name.endswith(".weight") and entry.dtype == "I8" and name + SCALE in header
              and header[name + SCALE].dtype in FLOAT_DTYPES):
            zero = name + ZERO_POINT if name + ZERO_POINT in header else None
            found.append(_entry(name, "int-quantized", name, header[name + SCALE], zero,
                                entry.shape))
    return found


def _entry(weight: str, layout: str, codes: str, scale: TensorEntry, zero: str | None,
           shape: tuple[int, ...]) -> ForeignEntry:
    columns = shape[-1] if shape else 1
    groups = scale.shape[-1] if scale.shape else 1
    if scale.numel == 1:
        strategy, group_size = "tensor", None
    elif groups == 1:
        strategy, group_size = "channel", None
    else:
        strategy, group_size = "group", max(1, columns // groups)
    return ForeignEntry(weight, layout, codes, scale.name, zero, shape, scale.dtype, strategy,
                        group_size)
