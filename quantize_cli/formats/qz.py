"""The qz format (format version 1, DESIGN §4; docs/FORMAT.md describes it for other
tools).

A quantized tensor ``W`` keeps its name and shape and is stored as I8; its scale is
``W_scale`` (F32) and, for affine, its zero point ``W_zero_point`` (I8), with the shapes of
``Scheme.scale_shape``. ``__metadata__`` gains ``qz.format_version`` and ``qz.tensors``, a
JSON string describing each quantized tensor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.quantize import RowResult, dequantize_rows
from ..core.scheme import GRANULARITIES, METHODS, Scheme
from ..errors import QuantizedFormatError, SchemeError, located
from ..storage.dtypes import FLOAT_DTYPES
from ..storage.header import Header, TensorEntry
from ..storage.reader import SafetensorsReader
from .base import (
    Codec,
    QuantizedWeight,
    StoredRows,
    StoredTensor,
    StoredWeight,
    read_groups,
    refuse_bad_scales,
)

FORMAT_VERSION = "1"
KEY_FORMAT_VERSION = "qz.format_version"
KEY_TENSORS = "qz.tensors"
#: What config.json's dtype keys say of a qz folder; a loader that reads them as a torch
#: dtype fails with this text in its message.
CONFIG_MARKER = "qz: quantized weights; run `qz dequantize` to restore them"
#: The keys of config.json that a qz folder replaces (and dequantize restores).
REPLACED_CONFIG_KEYS = ("dtype", "torch_dtype", "quantization_config")


def scale_name(name: str) -> str:
    return f"{name}_scale"


def zero_point_name(name: str) -> str:
    return f"{name}_zero_point"


class QzFormat(Codec):
    name = "qz"
    summary = "qz: INT8 codes with float32 scales (and zero points) under the weight's name"
    suffix = "int8"
    tensor_metadata_keys = (KEY_TENSORS,)

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        return _stored_tensors(entry.name, entry.shape, scheme)

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        pieces: list[tuple[str, np.ndarray]] = [(entry.name, result.codes)]
        # Scale rows follow the code rows, so they stream out in step; one scale per
        # tensor goes out with the first rows.
        if scheme.granularity != "tensor" or first_row == 0:
            pieces.append((scale_name(entry.name), result.scale))
            if result.zero_point is not None:
                pieces.append((zero_point_name(entry.name), result.zero_point))
        return pieces

    def shard_metadata(self, metadata: dict[str, str],
                       quantized: Sequence[QuantizedWeight]) -> dict[str, str]:
        described = {weight.entry.name: _describe(weight)
                     for weight in sorted(quantized, key=lambda weight: weight.entry.name)}
        return {**metadata, KEY_FORMAT_VERSION: FORMAT_VERSION,
                KEY_TENSORS: json.dumps(described, separators=(",", ":"), sort_keys=True)}

    # ------------------------------------------------------------------------ reading

    def recognises(self, header: Header) -> bool:
        return KEY_FORMAT_VERSION in header.metadata

    def version(self, header: Header) -> str | None:
        return header.metadata.get(KEY_FORMAT_VERSION)

    def model_config(self, config: dict[str, Any] | None, scheme: Scheme,
                     kept: Sequence[TensorEntry]) -> dict[str, Any] | None:
        """The model's config.json, telling loaders that the weights are qz codes: the
        dtype keys (``dtype``, and ``torch_dtype`` for transformers 4) name qz, so that
        transformers, vLLM and every loader built on them refuse the folder with that
        name in the message rather than load codes as weights, and
        ``quantization_config`` records the format and the keys it replaced, which
        dequantize puts back. (An unknown ``quant_method`` alone is not enough:
        transformers warns and loads the codes.)"""
        if config is None:
            return None
        replaced = {key: config[key] for key in REPLACED_CONFIG_KEYS if key in config}
        return {**config, "dtype": CONFIG_MARKER, "torch_dtype": CONFIG_MARKER,
                "quantization_config": {"quant_method": "qz", "format_version": FORMAT_VERSION,
                                        "replaced": replaced}}

    def float_config(self, config: dict[str, Any]) -> dict[str, Any]:
        recorded = config.get("quantization_config")
        if not (isinstance(recorded, dict) and recorded.get("quant_method") == "qz"):
            return super().float_config(config)
        restored = {key: value for key, value in config.items()
                    if key not in REPLACED_CONFIG_KEYS}
        replaced = recorded.get("replaced")
        return {**restored, **(replaced if isinstance(replaced, dict) else {})}

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        header, path = reader.header, reader.path
        return [_stored_weight(header, name, value, path)
                for name, value in _described_tensors(header, path).items()]

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> StoredRows:
        rows = reader.read_rows(reader.header[weight.codes], weight.row_view, start, stop)
        return {"codes": rows, **read_groups(reader, weight, start, stop)}

    def dequantize_rows(self, weight: StoredWeight, rows: StoredRows, dtype: npt.DTypeLike,
                        path: Path) -> np.ndarray:
        codes, scale = rows["codes"], rows["scale"]
        refuse_bad_scales(path, weight, scale)
        if weight.scheme.symmetric and codes.size and codes.min() < -127:
            raise QuantizedFormatError(located(
                path, weight.name, "holds the code -128, outside absmax's range [-127, 127]"))
        return dequantize_rows(codes, scale, rows.get("zero_point"), weight.scheme, dtype)


def _stored_tensors(name: str, shape: tuple[int, ...], scheme: Scheme) -> list[StoredTensor]:
    scale_shape = scheme.scale_shape(shape)
    stored = [StoredTensor(name, "I8", shape, "codes"),
              StoredTensor(scale_name(name), "F32", scale_shape, "scale")]
    if not scheme.symmetric:
        stored.append(StoredTensor(zero_point_name(name), "I8", scale_shape, "zero_point"))
    return stored


def _describe(weight: QuantizedWeight) -> dict[str, Any]:
    scheme = weight.scheme
    described: dict[str, Any] = {"method": scheme.method, "granularity": scheme.granularity,
                                 "block": scheme.block_size, "dtype": weight.entry.dtype}
    if scheme.clip != "none":  # optional: absent means the full range
        described["clip"] = scheme.clip
    return described


def _described_tensors(header: Header, path: Path) -> dict[str, Any]:
    """``qz.tensors`` of a qz file, after checking the format version."""
    version = header.metadata[KEY_FORMAT_VERSION]
    if version != FORMAT_VERSION:
        raise QuantizedFormatError(
            located(path, None, f"unsupported qz format version {version!r} (this qz reads "
                    f"{FORMAT_VERSION})"),
            hint="a newer qz may read it",
        )
    try:
        described = json.loads(header.metadata.get(KEY_TENSORS, ""))
    except (json.JSONDecodeError, RecursionError):
        raise QuantizedFormatError(
            located(path, None, f"{KEY_TENSORS} metadata is not valid JSON")) from None
    if not isinstance(described, dict):
        raise QuantizedFormatError(located(path, None, f"{KEY_TENSORS} must be a JSON object"))
    return described


def _stored_weight(header: Header, name: str, value: Any, path: Path) -> StoredWeight:
    """One ``qz.tensors`` entry, checked against the tensors of the file."""
    scheme = _parse_entry(name, value, path)
    if name not in header:
        raise QuantizedFormatError(
            located(path, name, f"listed in {KEY_TENSORS} but the file has no such tensor"))
    codes = header[name]
    if codes.dtype != "I8":
        raise QuantizedFormatError(
            located(path, name, f"quantized values must be I8, found {codes.dtype}"))
    try:
        expected = _stored_tensors(name, codes.shape, scheme)
    except SchemeError as error:
        raise QuantizedFormatError(located(path, name, str(error))) from None
    for companion in expected[1:]:
        if companion.name not in header:
            raise QuantizedFormatError(
                located(path, name, f"{scheme.describe()} needs tensor {companion.name!r}, "
                        "which is missing"))
        found = header[companion.name]
        if found.dtype != companion.dtype or found.shape != companion.shape:
            raise QuantizedFormatError(
                located(path, companion.name, f"must be {companion.dtype} of shape "
                        f"{list(companion.shape)}, found {found.dtype} {list(found.shape)}"))
    if scheme.symmetric and zero_point_name(name) in header:
        raise QuantizedFormatError(
            located(path, name, f"absmax has no zero point, but {zero_point_name(name)!r} "
                    "exists"))
    return StoredWeight(
        name=name, shape=codes.shape, dtype=value["dtype"], scheme=scheme, format="qz",
        tensors=tuple((tensor.name, tensor.role) for tensor in expected),
        description=f"INT8 {scheme.describe()}")


def _parse_entry(name: str, value: Any, path: Path) -> Scheme:
    """The scheme a ``qz.tensors`` entry describes, after checking its keys and values."""

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
        return Scheme(value["method"], value["granularity"], block, value.get("clip", "none"))
    except SchemeError as error:
        raise bad(str(error)) from None
