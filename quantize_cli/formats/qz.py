"""The qz format (DESIGN §4; docs/FORMAT.md describes it for other tools).

A quantized tensor ``W`` keeps its name and is stored with a scale ``W_scale`` (F32) and,
for affine, a zero point ``W_zero_point``, with the shapes of ``Scheme.scale_shape``.
``__metadata__`` gains ``qz.format_version`` and ``qz.tensors``, a JSON string describing
each quantized tensor.

* Version 1: INT8 codes, ``W`` as I8 of its own shape, the zero point I8.
* Version 2 adds what version 1 cannot hold: 4-bit codes, packed two to a byte along the
  last axis (``W`` as U8 of shape (…, ceil(n / 2)), the first code in the low nibble,
  two's complement), with scales that may be negative (absmax) and a float32 zero point
  (affine, fractional); and FP8, ``W`` as F8_E4M3. A file is written as version 1
  whenever every tensor in it is INT8, so INT8 outputs stay readable by qz 1.0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.quantize import RowResult, dequantize_rows
from ..core.scheme import BITS, GRANULARITIES, METHODS, Scheme
from ..core.search import PLAIN, Storage
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
    pack_nibbles,
    read_groups,
    refuse_bad_scales,
    unpack_nibbles,
)

FORMAT_VERSIONS = ("1", "2")
KEY_FORMAT_VERSION = "qz.format_version"
KEY_TENSORS = "qz.tensors"
#: What config.json's dtype keys say of a qz folder; a loader that reads them as a torch
#: dtype fails with this text in its message.
CONFIG_MARKER = "qz: quantized weights; run `qz dequantize` to restore them"
#: The keys of config.json that a qz folder replaces (and dequantize restores).
REPLACED_CONFIG_KEYS = ("dtype", "torch_dtype", "quantization_config")
#: Below 8 bits qz keeps what the search finds best: a scale of either sign (the
#: extreme of a symmetric group may sit on the side of -8) and a fractional zero point.
LOW_BIT_STORAGE = Storage(zero_point="float", negative_scales=True)


def scale_name(name: str) -> str:
    return f"{name}_scale"


def zero_point_name(name: str) -> str:
    return f"{name}_zero_point"


def format_version(schemes: Sequence[Scheme]) -> str:
    """1 when every scheme is INT8 (what qz 1.0 reads), else 2."""
    return "1" if all(s.bits == 8 and s.method != "fp8" for s in schemes) else "2"


class QzFormat(Codec):
    name = "qz"
    summary = ("qz: codes with float32 scales (and zero points) under the weight's name; "
               "INT8, 4-bit packed, or FP8")
    suffix = ""
    tensor_metadata_keys = (KEY_TENSORS,)

    def storage(self, entry: TensorEntry, scheme: Scheme) -> Storage:
        return LOW_BIT_STORAGE if scheme.bits < 8 else PLAIN

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        return _stored_tensors(entry.name, entry.shape, scheme)

    def produced_valid(self, result: RowResult, scheme: Scheme) -> bool:
        if scheme.bits == 8:
            return super().produced_valid(result, scheme)
        # Below 8 bits scales may be negative and zero points fractional.
        return bool(np.isfinite(result.scale).all()) and (
            result.zero_point is None or bool(np.isfinite(result.zero_point).all()))

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        codes = result.codes
        if scheme.bits < 8:  # two's complement nibbles along the original last axis
            last = entry.shape[-1]
            codes = pack_nibbles(codes.reshape(-1, last).view(np.uint8), math.ceil(last / 2))
        pieces: list[tuple[str, np.ndarray]] = [(entry.name, codes)]
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
        return {**metadata,
                KEY_FORMAT_VERSION: format_version([weight.scheme for weight in quantized]),
                KEY_TENSORS: json.dumps(described, separators=(",", ":"), sort_keys=True)}

    def model_config(self, config: dict[str, Any] | None, scheme: Scheme,
                     quantized: Sequence[QuantizedWeight],
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
        version = format_version([weight.scheme for weight in quantized])
        return {**config, "dtype": CONFIG_MARKER, "torch_dtype": CONFIG_MARKER,
                "quantization_config": {"quant_method": "qz", "format_version": version,
                                        "replaced": replaced}}

    def float_config(self, config: dict[str, Any]) -> dict[str, Any]:
        recorded = config.get("quantization_config")
        if not (isinstance(recorded, dict) and recorded.get("quant_method") == "qz"):
            return super().float_config(config)
        restored = {key: value for key, value in config.items()
                    if key not in REPLACED_CONFIG_KEYS}
        replaced = recorded.get("replaced")
        return {**restored, **(replaced if isinstance(replaced, dict) else {})}

    # ------------------------------------------------------------------------ reading

    def recognises(self, header: Header) -> bool:
        return KEY_FORMAT_VERSION in header.metadata

    def version(self, header: Header) -> str | None:
        return header.metadata.get(KEY_FORMAT_VERSION)

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        header, path = reader.header, reader.path
        version, described = _described_tensors(header, path)
        return [_stored_weight(header, name, value, path, version)
                for name, value in described.items()]

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> StoredRows:
        entry = reader.header[weight.codes]
        columns = weight.row_view[1]
        if weight.scheme.bits < 8:
            last = weight.shape[-1]
            per_row = columns // last * math.ceil(last / 2)  # packed bytes of a row-view row
            packed = np.empty(((stop - start) * columns // last, math.ceil(last / 2)),
                              dtype=np.uint8)
            reader.read_into(entry, start * per_row, packed)
            nibbles = unpack_nibbles(packed, last).view(np.int8)
            codes = ((nibbles ^ 8) - 8).reshape(stop - start, columns)  # sign-extend
        else:
            codes = reader.read_rows(entry, weight.row_view, start, stop)
        return {"codes": codes, **read_groups(reader, weight, start, stop)}

    def dequantize_rows(self, weight: StoredWeight, rows: StoredRows, dtype: npt.DTypeLike,
                        path: Path) -> np.ndarray:
        codes, scale = rows["codes"], rows["scale"]
        scheme = weight.scheme
        refuse_bad_scales(path, weight, scale, negative=scheme.bits < 8)
        zero_point = rows.get("zero_point")
        if zero_point is not None and not np.isfinite(zero_point.astype(np.float32)).all():
            raise QuantizedFormatError(located(path, weight.tensor("zero_point"),
                                               "holds non-finite zero points"))
        if scheme.method == "absmax" and scheme.bits == 8 and codes.size and codes.min() < -127:
            raise QuantizedFormatError(located(
                path, weight.name, "holds the code -128, outside absmax's range [-127, 127]"))
        return dequantize_rows(codes, scale, zero_point, scheme, dtype)


def _stored_tensors(name: str, shape: tuple[int, ...], scheme: Scheme) -> list[StoredTensor]:
    scale_shape = scheme.scale_shape(shape)
    if scheme.method == "fp8":
        codes = StoredTensor(name, "F8_E4M3", shape, "codes")
    elif scheme.bits < 8:
        if not shape:
            raise SchemeError(f"{scheme.describe()} needs a tensor with at least one axis")
        codes = StoredTensor(name, "U8", (*shape[:-1], math.ceil(shape[-1] / 2)), "codes")
    else:
        codes = StoredTensor(name, "I8", shape, "codes")
    stored = [codes, StoredTensor(scale_name(name), "F32", scale_shape, "scale")]
    if not scheme.symmetric:
        stored.append(StoredTensor(zero_point_name(name), "I8" if scheme.bits == 8 else "F32",
                                   scale_shape, "zero_point"))
    return stored


def _describe(weight: QuantizedWeight) -> dict[str, Any]:
    scheme = weight.scheme
    described: dict[str, Any] = {"method": scheme.method, "granularity": scheme.granularity,
                                 "block": scheme.block_size, "dtype": weight.entry.dtype}
    if scheme.clip != "none":  # optional: absent means the full range
        described["clip"] = scheme.clip
    if scheme.bits != 8:  # optional: absent means 8
        described["bits"] = scheme.bits
        described["shape"] = list(weight.entry.shape)
    return described


def _described_tensors(header: Header, path: Path) -> tuple[str, dict[str, Any]]:
    """The format version and ``qz.tensors`` of a qz file."""
    version = header.metadata[KEY_FORMAT_VERSION]
    if version not in FORMAT_VERSIONS:
        raise QuantizedFormatError(
            located(path, None, f"unsupported qz format version {version!r} (this qz reads "
                    f"{' and '.join(FORMAT_VERSIONS)})"),
            hint="a newer qz may read it",
        )
    try:
        described = json.loads(header.metadata.get(KEY_TENSORS, ""))
    except (json.JSONDecodeError, RecursionError):
        raise QuantizedFormatError(
            located(path, None, f"{KEY_TENSORS} metadata is not valid JSON")) from None
    if not isinstance(described, dict):
        raise QuantizedFormatError(located(path, None, f"{KEY_TENSORS} must be a JSON object"))
    return version, described


def _stored_weight(header: Header, name: str, value: Any, path: Path,
                   version: str) -> StoredWeight:
    """One ``qz.tensors`` entry, checked against the tensors of the file."""
    scheme, shape = _parse_entry(name, value, path, version)
    if name not in header:
        raise QuantizedFormatError(
            located(path, name, f"listed in {KEY_TENSORS} but the file has no such tensor"))
    codes = header[name]
    shape = shape if shape is not None else codes.shape
    try:
        expected = _stored_tensors(name, shape, scheme)
    except SchemeError as error:
        raise QuantizedFormatError(located(path, name, str(error))) from None
    if codes.dtype != expected[0].dtype:
        raise QuantizedFormatError(
            located(path, name, f"quantized values must be {expected[0].dtype}, found "
                    f"{codes.dtype}"))
    if codes.shape != expected[0].shape:
        raise QuantizedFormatError(
            located(path, name, f"codes of shape {list(shape)} must be stored as "
                    f"{list(expected[0].shape)}, found {list(codes.shape)}"))
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
            located(path, name, f"{scheme.method} has no zero point, but "
                    f"{zero_point_name(name)!r} exists"))
    kind = "FP8" if scheme.method == "fp8" else f"INT{scheme.bits}"
    return StoredWeight(
        name=name, shape=shape, dtype=value["dtype"], scheme=scheme, format="qz",
        tensors=tuple((tensor.name, tensor.role) for tensor in expected),
        description=f"{kind} {_without_bits(scheme.describe())}")


def _without_bits(label: str) -> str:
    return label.removeprefix("int4 ").removeprefix("fp8 ")


def _parse_entry(name: str, value: Any, path: Path,
                 version: str) -> tuple[Scheme, tuple[int, ...] | None]:
    """The scheme (and, for packed codes, the shape) a ``qz.tensors`` entry describes,
    after checking its keys and values."""

    def bad(rule: str) -> QuantizedFormatError:
        return QuantizedFormatError(located(path, name, f"invalid {KEY_TENSORS} entry: {rule}"))

    required = {"method", "granularity", "block", "dtype"}
    optional = {"clip"} | ({"bits", "shape"} if version != "1" else set())
    if not isinstance(value, dict) or not required <= set(value) <= required | optional:
        raise bad("expected the keys method, granularity, block, dtype (and clip"
                  + (", bits, shape" if version != "1" else "") + ")")
    methods = METHODS if version != "1" else ("absmax", "affine")
    if value["method"] not in methods or value["granularity"] not in GRANULARITIES:
        raise bad(f"unknown method/granularity {value['method']!r}/{value['granularity']!r}")
    block = value["block"]
    if value["granularity"] == "block":
        if type(block) is not int or block < 1:
            raise bad(f"block must be a positive integer, got {block!r}")
    elif block is not None:
        raise bad(f"block must be null for {value['granularity']} granularity")
    if value["dtype"] not in FLOAT_DTYPES:
        raise bad(f"original dtype {value['dtype']!r} is not a float dtype qz quantizes")
    bits = value.get("bits", 8)
    if type(bits) is not int or bits not in BITS:
        raise bad(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    shape = value.get("shape")
    if (shape is None) != (bits == 8) or (shape is not None and not (
            isinstance(shape, list) and shape and all(type(d) is int and d >= 0 for d in shape))):
        raise bad("a packed (4-bit) tensor needs its shape, a list of sizes; no other does")
    try:
        scheme = Scheme(value["method"], value["granularity"], block, value.get("clip", "none"),
                        bits)
    except SchemeError as error:
        raise bad(str(error)) from None
    return scheme, None if shape is None else tuple(shape)
