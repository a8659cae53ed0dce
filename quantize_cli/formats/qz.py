"""The qz format (DESIGN §4; docs/FORMAT.md describes it for other tools).

A quantized tensor ``W`` keeps its name and is stored with a scale ``W_scale`` and, for
affine, a zero point ``W_zero_point`` (NVFP4: a global scale ``W_global_scale``), with
the shapes of ``Scheme.scale_shape``. ``__metadata__`` gains ``qz.format_version`` and
``qz.tensors``, a JSON string describing each quantized tensor. The layouts are in
layouts/ (integers.py, fp8.py, microscaling.py).

* Version 1: INT8 codes, ``W`` as I8 of its own shape, the zero point I8.
* Version 2 adds 4-bit codes (U8, two to a byte along the last axis), with scales that
  may be negative and float32 zero points, and FP8 (``W`` as F8_E4M3).
* Version 3 adds integer codes of 2, 3, 5, 6 and 7 bits (packed densely along the last
  axis) and the microscaling types NVFP4, MXFP4 and MXFP8.

A file is written in the lowest version that holds its tensors, so INT8 outputs stay
readable by qz 1.0 and 4-bit and FP8 ones by every qz that reads version 2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core import Scheme
from ..core.elements import INTEGER_BITS, METHODS
from ..core.scheme import GRANULARITIES
from ..errors import QuantizedFormatError, SchemeError, located
from ..storage.dtypes import FLOAT_DTYPES
from ..storage.header import Header, TensorEntry
from ..storage.reader import SafetensorsReader
from .base import ModelFormat, QuantizedWeight
from .layout import StoredWeight, stored_label
from .layouts.fp8 import QzFp8
from .layouts.integers import QzIntegers
from .layouts.microscaling import QzMicroscaled
from .layouts.names import QZ_ZERO_POINT

FORMAT_VERSIONS = ("1", "2", "3")
KEY_FORMAT_VERSION = "qz.format_version"
KEY_TENSORS = "qz.tensors"
#: What config.json's ``model_type`` says of a qz folder. It is the first thing every
#: loader reads (transformers' AutoConfig, and through it sentence-transformers and vLLM;
#: mlx-lm): each refuses a model type it does not know, with this text in its message,
#: whatever dtype the caller asks for. The dtype keys say it too, for a model class named
#: explicitly, which reads no model type and resolves the dtype when none is given.
CONFIG_MARKER = "qz: quantized weights, run qz dequantize to restore a model loaders read"
#: The keys of config.json that a qz folder replaces (and dequantize restores).
REPLACED_CONFIG_KEYS = ("model_type", "dtype", "torch_dtype", "quantization_config")


def format_version(schemes: Sequence[Scheme]) -> str:
    """The lowest version that holds every scheme: 1 for INT8 only (what qz 1.0 reads),
    2 with 4-bit or FP8, else 3.

    >>> [format_version([scheme]) for scheme in (Scheme(), Scheme(bits=4), Scheme("nvfp4"))]
    ['1', '2', '3']
    """
    return max((_version_of(scheme) for scheme in schemes), default="1")


def _version_of(scheme: Scheme) -> str:
    if scheme.method == "fp8" or (not scheme.element.is_float and scheme.bits == 4):
        return "2"
    if scheme.element.is_float or scheme.bits != 8:
        return "3"
    return "1"


def _packed(scheme: Scheme) -> bool:
    """Whether the codes are packed below a byte, so that the stored shape differs from
    the weight's (and ``qz.tensors`` records the weight's)."""
    return scheme.element.bits < 8


class QzFormat(ModelFormat):
    name = "qz"
    summary = ("qz: codes with their scales (and zero points) under the weight's name; "
               "INT2-INT8 packed, FP8, NVFP4, MXFP4, MXFP8")
    prefix = ""
    layouts = (QzIntegers(), QzFp8(), QzMicroscaled())
    supported = "the qz format stores weights, not activation quantization"
    tensor_metadata_keys = (KEY_TENSORS,)

    def hint(self, scheme: Scheme) -> str | None:
        if scheme.activations is not None:
            return "activation quantization is a runtime setting of compressed-tensors " \
                   "(vLLM): use --format compressed-tensors"
        return None

    def refusal(self, scheme: Scheme, reasons: Sequence[str]) -> str:
        if scheme.activations is not None:
            return f"{scheme.activations} activations are for the runtime to quantize"
        return super().refusal(scheme, reasons)

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
        """The model's config.json, telling loaders that the weights are qz codes:
        ``model_type`` and the dtype keys name qz and ``qz dequantize`` (see
        :data:`CONFIG_MARKER`), so that every loader refuses the folder with that in its
        message rather than load codes as weights, and ``quantization_config`` records
        the format and the values of the keys it replaced, which dequantize puts back in
        place. (An unknown ``quant_method`` alone is not enough: transformers warns and
        loads the codes.)"""
        if config is None:
            return None
        replaced = {key: config[key] for key in REPLACED_CONFIG_KEYS if key in config}
        version = format_version([weight.scheme for weight in quantized])
        marked = dict.fromkeys(("model_type", "dtype", "torch_dtype"), CONFIG_MARKER)
        return {**config, **marked,
                "quantization_config": {"quant_method": "qz", "format_version": version,
                                        "replaced": replaced}}

    def float_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config.json the folder was made from: each replaced key gets its value back
        in its place (so a config saved with sorted keys reads as it did), and the keys
        qz added go."""
        recorded = config.get("quantization_config")
        if not (isinstance(recorded, dict) and recorded.get("quant_method") == "qz"):
            return super().float_config(config)
        replaced = recorded.get("replaced")
        replaced = replaced if isinstance(replaced, dict) else {}
        return {key: replaced.get(key, value) for key, value in config.items()
                if key in replaced or key not in REPLACED_CONFIG_KEYS}

    # ------------------------------------------------------------------------ reading

    def recognises(self, header: Header) -> bool:
        return KEY_FORMAT_VERSION in header.metadata

    def version(self, header: Header) -> str | None:
        return header.metadata.get(KEY_FORMAT_VERSION)

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        header, path = reader.header, reader.path
        version, described = _described_tensors(header, path)
        return [self._stored_weight(header, name, value, path, version)
                for name, value in described.items()]

    def _stored_weight(self, header: Header, name: str, value: Any, path: Path,
                       version: str) -> StoredWeight:
        """One ``qz.tensors`` entry, checked against the tensors of the file."""
        scheme, shape = _parse_entry(name, value, path, version)
        if name not in header:
            raise QuantizedFormatError(
                located(path, name, f"listed in {KEY_TENSORS} but the file has no such tensor"))
        codes = header[name]
        shape = shape if shape is not None else codes.shape
        layout = self.layout_for(scheme)
        try:
            expected = layout.stored_tensors(TensorEntry(name, value["dtype"], shape, 0, 0),
                                             scheme)
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
                    located(path, name, f"{scheme.describe()} needs tensor "
                            f"{companion.name!r}, which is missing"))
            found = header[companion.name]
            if found.dtype != companion.dtype or found.shape != companion.shape:
                raise QuantizedFormatError(
                    located(path, companion.name, f"must be {companion.dtype} of shape "
                            f"{list(companion.shape)}, found {found.dtype} "
                            f"{list(found.shape)}"))
        if scheme.symmetric and name + QZ_ZERO_POINT in header:
            raise QuantizedFormatError(
                located(path, name, f"{scheme.method} has no zero point, but "
                        f"{name + QZ_ZERO_POINT!r} exists"))
        return StoredWeight(
            name=name, shape=shape, dtype=value["dtype"], scheme=scheme, format=self.name,
            tensors=tuple((tensor.name, tensor.role) for tensor in expected),
            description=stored_label(scheme), layout=layout)


def _describe(weight: QuantizedWeight) -> dict[str, Any]:
    scheme = weight.scheme
    described: dict[str, Any] = {"method": scheme.method, "granularity": scheme.granularity,
                                 "block": scheme.block_size, "dtype": weight.entry.dtype}
    if scheme.clip != "none":  # optional: absent means the full range
        described["clip"] = scheme.clip
    if not scheme.element.is_float and scheme.bits != 8:  # optional: absent means 8
        described["bits"] = scheme.bits
    if _packed(scheme):
        described["shape"] = list(weight.entry.shape)
    return described


def _described_tensors(header: Header, path: Path) -> tuple[str, dict[str, Any]]:
    """The format version and ``qz.tensors`` of a qz file."""
    version = header.metadata[KEY_FORMAT_VERSION]
    if version not in FORMAT_VERSIONS:
        raise QuantizedFormatError(
            located(path, None, f"unsupported qz format version {version!r} (this qz reads "
                    f"{', '.join(FORMAT_VERSIONS[:-1])} and {FORMAT_VERSIONS[-1]})"),
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


#: What each version's ``qz.tensors`` entries may say.
_METHODS = {"1": ("absmax", "affine"), "2": ("absmax", "affine", "fp8"), "3": METHODS}
_BITS = {"1": (8,), "2": (4, 8), "3": INTEGER_BITS}


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
    if value["method"] not in _METHODS[version] or value["granularity"] not in GRANULARITIES:
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
    if type(bits) is not int or bits not in _BITS[version]:
        raise bad(f"bits must be one of {', '.join(map(str, _BITS[version]))}, got {bits!r}")
    try:
        scheme = Scheme(value["method"], value["granularity"], block, value.get("clip", "none"),
                        bits)
    except SchemeError as error:
        raise bad(str(error)) from None
    shape = value.get("shape")
    if (shape is None) == _packed(scheme) or (shape is not None and not (
            isinstance(shape, list) and shape and all(type(d) is int and d >= 0 for d in shape))):
        raise bad("a packed (below 8 bits) tensor needs its shape, a list of sizes; no other "
                  "does")
    return scheme, None if shape is None else tuple(shape)
