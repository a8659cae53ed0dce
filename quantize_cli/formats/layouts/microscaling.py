"""The microscaling types NVFP4, MXFP4 and MXFP8 (core/floats.py), in each format that
stores them. FP4 E2M1 codes are 4-bit patterns (sign, two exponent bits, one mantissa
bit: +0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), packed two to a byte, the first
in the low nibble; FP8 E4M3 codes are bytes.

* qz: the codes under the weight's own name (U8 packed along the last axis, or
  F8_E4M3), ``W_scale`` as F8_E4M3 (NVFP4) or F8_E8M0 (MX) in groups along the last axis
  (the last group of a row may be shorter), and NVFP4's ``W_global_scale`` F32 (1,).
* compressed-tensors ``nvfp4-pack-quantized``: ``X.weight_packed`` U8 (out, in / 2),
  ``X.weight_scale`` F8_E4M3 (out, in / 16), ``X.weight_global_scale`` F32 (1,);
  ``mxfp4-pack-quantized``: the same codes, ``X.weight_scale`` U8 (out, in / 32) holding
  E8M0 exponents and no global scale; ``mxfp8-quantized``: ``X.weight`` F8_E4M3 and
  U8 exponents.
* MLX modes ``nvfp4``, ``mxfp4`` and ``mxfp8``: ``X.weight`` U32 words holding the codes
  (little endian, the first in the lowest bits) and ``X.scales`` U8 holding E4M3 or E8M0
  bit patterns; no biases, and no global scale (it is 1).

Sources: compressed-tensors ``compressors/nvfp4``, ``compressors/mxfp4``,
``compressors/mxfp8`` and ``compressors/mx_utils.py``; MLX ``mlx/ops.cpp`` (``fp_quantize``,
``fp_dequantize``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...core import QuantizedRows, RowResult, Scheme, Storage
from ...storage.header import TensorEntry
from ...storage.reader import SafetensorsReader
from ..layout import (
    Layout,
    Role,
    StoredLayout,
    StoredTensor,
    StoredWeight,
    pack_bits,
    read_global_scale,
    read_groups,
    read_packed_rows,
    refuse,
    stored_label,
    unpack_bits,
)
from .names import (
    CT_GLOBAL_SCALE,
    CT_PACKED,
    CT_SCALE,
    GPT_OSS_BLOCKS,
    GPT_OSS_SCALES,
    MLX_SCALES,
    QZ_GLOBAL_SCALE,
    QZ_SCALE,
    module_of,
)

#: What each scale type is stored as in qz's format (safetensors dtypes).
QZ_SCALE_DTYPES = {"e4m3": "F8_E4M3", "e8m0": "F8_E8M0"}


def _microscaling(scheme: Scheme, methods: tuple[str, ...]) -> str | None:
    if scheme.method not in methods:
        return f"stores {', '.join(methods)}, not {scheme.method}"
    return "not activation quantization" if scheme.activations is not None else None


def _packs(scheme: Scheme) -> bool:
    """Whether codes are 4-bit patterns packed two to a byte (E2M1)."""
    return scheme.element.bits == 4


def _code_tensor(name: str, shape: tuple[int, ...], scheme: Scheme) -> StoredTensor:
    """Codes under ``name``: E2M1 packed as U8 along the last axis, E4M3 as F8_E4M3."""
    if _packs(scheme):
        return StoredTensor(name, "U8", (*shape[:-1], math.ceil(shape[-1] / 2)), "codes")
    return StoredTensor(name, "F8_E4M3", shape, "codes")


def _code_bytes(result: RowResult, scheme: Scheme) -> np.ndarray:
    """The codes' bytes as stored: E2M1 patterns packed two to a byte, E4M3 as is."""
    patterns = result.codes.view(np.uint8)
    return pack_bits(patterns, 4) if _packs(scheme) else patterns


def _read_codes(reader: SafetensorsReader, weight: StoredWeight, start: int,
                stop: int) -> np.ndarray:
    entry = reader.header[weight.codes]
    columns = weight.row_view[1]
    bits = weight.scheme.element.bits
    patterns = read_packed_rows(reader, entry, start, stop, bits, columns)
    return patterns.view(weight.scheme.element.dtype())


def _read_scales(reader: SafetensorsReader, weight: StoredWeight, start: int,
                 stop: int) -> np.ndarray:
    """The stored scales as E4M3 or E8M0 numbers, whatever dtype holds their bits."""
    scale = read_groups(reader, weight, start, stop, "scale", as_float32=False)
    assert scale is not None
    import ml_dtypes

    encoding = ml_dtypes.float8_e4m3fn if weight.scheme.scale_type == "e4m3" else _e8m0()
    return np.ascontiguousarray(scale).view(np.uint8).view(encoding)


def _e8m0() -> Any:
    import ml_dtypes  # imported when first needed: it takes a while (DESIGN amendment 25)

    return ml_dtypes.float8_e8m0fnu


class _Microscaled(Layout):
    """Codes, one scale per group, and NVFP4's global scale where the format keeps it."""

    codes_suffix: str
    scale_suffix: str
    global_suffix: str | None
    #: The safetensors dtype scales are stored as (None: by scale type, as qz does).
    scale_dtype: str | None = None

    def storage(self, dtype: str, scheme: Scheme) -> Storage:
        return Storage(global_scale=self.global_suffix is not None)

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        name, shape = entry.name, entry.shape
        base = self._base(name)
        stored = [_code_tensor(base + self.codes_suffix, shape, scheme),
                  StoredTensor(base + self.scale_suffix,
                               self.scale_dtype or QZ_SCALE_DTYPES[scheme.scale_type],
                               scheme.scale_shape(shape), "scale")]
        if self.global_suffix is not None and scheme.info.global_scale:
            stored.append(StoredTensor(base + self.global_suffix, "F32", (1,),
                                       "global_scale"))
        return stored

    def _base(self, name: str) -> str:
        return name

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        base = self._base(entry.name)
        pieces = [(base + self.codes_suffix, _code_bytes(result, scheme)),
                  (base + self.scale_suffix, result.scale)]
        if self.global_suffix is not None and scheme.info.global_scale and first_row == 0:
            assert result.global_scale is not None
            pieces.append((base + self.global_suffix,
                           np.array([result.global_scale], dtype=np.float32)))
        return pieces

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> QuantizedRows:
        return QuantizedRows(_read_codes(reader, weight, start, stop),
                             _read_scales(reader, weight, start, stop),
                             global_scale=read_global_scale(reader, weight))

    def check_rows(self, weight: StoredWeight, rows: QuantizedRows, path: Any) -> None:
        super().check_rows(weight, rows, path)
        if rows.global_scale is not None and not (np.isfinite(rows.global_scale)
                                                  and rows.global_scale > 0):
            raise refuse(path, weight.tensor("global_scale"),
                         "holds a global scale that is not a positive number")


class QzMicroscaled(_Microscaled):
    name = "qz microscaling"
    codes_suffix = ""
    scale_suffix = QZ_SCALE
    global_suffix = QZ_GLOBAL_SCALE

    def refusal(self, scheme: Scheme) -> str | None:
        return _microscaling(scheme, ("nvfp4", "mxfp4", "mxfp8"))


# --------------------------------------------------------------- compressed-tensors


class _CtMicroscaled(_Microscaled):
    scale_suffix = CT_SCALE
    method: str

    def refusal(self, scheme: Scheme) -> str | None:
        return _microscaling(scheme, (self.method,))

    def match(self, reader: SafetensorsReader, entry: TensorEntry,
              config: dict[str, Any] | None) -> StoredWeight | None:
        header = reader.header
        scheme = Scheme(self.method, clip="none")  # type: ignore[arg-type]
        code_dtype = "U8" if _packs(scheme) else "F8_E4M3"
        if not (entry.name.endswith(".weight" + self.codes_suffix)
                and entry.dtype == code_dtype and len(entry.shape) == 2):
            return None
        name = entry.name.removesuffix(self.codes_suffix)
        scale = name + self.scale_suffix
        global_name = name + self.global_suffix if self.global_suffix else None
        if scale not in header or header[scale].dtype != self.scale_dtype or (
                global_name is not None) != (global_name in header if global_name else False):
            return None
        columns = entry.shape[1] * (2 if _packs(scheme) else 1)
        shape = (entry.shape[0], columns)
        if header[scale].shape != scheme.scale_shape(shape):
            return None
        tensors: list[tuple[str, Role]] = [(entry.name, "codes"), (scale, "scale")]
        if global_name is not None:
            tensors.append((global_name, "global_scale"))
        # compressed-tensors decompresses these weights to bfloat16 (the dtype of its
        # FP4 lookup table and of its E8M0 powers of two); so does qz by default.
        return StoredWeight(name, shape, "BF16", scheme, "compressed-tensors",
                            tuple(tensors), f"compressed-tensors {self.name} "
                            f"{stored_label(scheme, with_choices=False)}", self)


class CtNvfp4(_CtMicroscaled):
    """compressed-tensors ``nvfp4-pack-quantized``."""

    name = "nvfp4-pack-quantized"
    method = "nvfp4"
    codes_suffix = CT_PACKED
    global_suffix = CT_GLOBAL_SCALE
    scale_dtype = "F8_E4M3"


class CtMxfp4(_CtMicroscaled):
    """compressed-tensors ``mxfp4-pack-quantized``."""

    name = "mxfp4-pack-quantized"
    method = "mxfp4"
    codes_suffix = CT_PACKED
    global_suffix = None
    scale_dtype = "U8"


class CtMxfp8(_CtMicroscaled):
    """compressed-tensors ``mxfp8-quantized``."""

    name = "mxfp8-quantized"
    method = "mxfp8"
    codes_suffix = ""
    global_suffix = None
    scale_dtype = "U8"


# ----------------------------------------------------------------------------- MLX


class MlxMicroscaled(_Microscaled):
    """MLX's ``nvfp4``, ``mxfp4`` and ``mxfp8`` modes."""

    name = "mlx microscaling"
    codes_suffix = ""
    scale_suffix = MLX_SCALES
    global_suffix = None
    scale_dtype = "U8"

    def refusal(self, scheme: Scheme) -> str | None:
        return _microscaling(scheme, ("nvfp4", "mxfp4", "mxfp8"))

    def _base(self, name: str) -> str:
        return module_of(name)

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        rows, columns = entry.shape
        return [StoredTensor(entry.name, "U32", (rows, columns * scheme.element.bits // 32),
                             "codes"),
                StoredTensor(module_of(entry.name) + MLX_SCALES, "U8",
                             scheme.scale_shape(entry.shape), "scale")]

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        return [(entry.name, _code_bytes(result, scheme)),
                (module_of(entry.name) + MLX_SCALES, result.scale.view(np.uint8))]


# -------------------------------------------------------------------------- gpt-oss


class GptOssExperts(StoredLayout):
    """gpt-oss's MXFP4 experts: ``X_blocks`` U8 (experts, out, in / 32, 16), the E2M1
    codes of each group of 32 packed two to a byte (the first in the low nibble), and
    ``X_scales`` U8 (experts, out, in / 32), E8M0 exponents (2^(e − 127)). The model (and
    the BF16 release) holds ``X`` as (experts, in, out): transformers' ``mxfp4``
    integration (``convert_moe_packed_tensors``) decodes the codes with E2M1's table,
    multiplies by the powers of two and swaps the last two axes. qz does the same, one
    expert at a time, so a read holds whole experts.

    qz reads this layout; it writes MXFP4 as its own format, compressed-tensors' or MLX's.
    """

    name = "gpt-oss mxfp4 experts"

    def match(self, reader: SafetensorsReader, entry: TensorEntry,
              config: dict[str, Any] | None) -> StoredWeight | None:
        header = reader.header
        if not (entry.name.endswith(GPT_OSS_BLOCKS) and entry.dtype == "U8"
                and len(entry.shape) == 4 and entry.shape[-1] == 16):
            return None
        name = entry.name.removesuffix(GPT_OSS_BLOCKS)
        scales = name + GPT_OSS_SCALES
        if scales not in header or header[scales].dtype != "U8":
            return None
        experts, rows, groups, _ = entry.shape
        if header[scales].shape != (experts, rows, groups):
            raise refuse(reader.path, scales, f"has shape {list(header[scales].shape)}, not "
                         f"one exponent per group of 32 of {name}: "
                         f"{[experts, rows, groups]}")
        scheme = Scheme("mxfp4", clip="none")
        return StoredWeight(name, (experts, groups * 32, rows), "BF16", scheme, "mxfp4",
                            ((entry.name, "codes"), (scales, "scale")),
                            "gpt-oss MXFP4 experts", self)

    def weight_row_multiple(self, weight: StoredWeight) -> int:
        return weight.shape[1]  # the rows of one expert

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> QuantizedRows:
        """Rows [start, stop) of the (experts · in, out) row view: the stored rows of
        the experts they cover, (experts · out, in) codes and scales."""
        inputs = weight.shape[1]
        first, last = start // inputs, -(-stop // inputs)
        blocks = reader.header[weight.codes]
        outputs = blocks.shape[1]
        row_bytes = inputs // 2
        packed = np.empty(((last - first) * outputs, row_bytes), dtype=np.uint8)
        reader.read_into(blocks, first * outputs * row_bytes, packed)
        codes = unpack_bits(packed, 4, inputs).view(weight.scheme.element.dtype())
        scales_entry = reader.header[weight.tensor("scale") or ""]
        groups = inputs // 32
        exponents = np.empty(((last - first) * outputs, groups), dtype=np.uint8)
        reader.read_into(scales_entry, first * outputs * groups, exponents)
        return QuantizedRows(codes, exponents.view(_e8m0()))

    def arrange(self, weight: StoredWeight, values: np.ndarray) -> np.ndarray:
        """(experts · out, in) as stored → (experts · in, out), as the model holds it."""
        inputs, outputs = weight.shape[1], weight.shape[2]
        experts = values.shape[0] // outputs
        return np.ascontiguousarray(values.reshape(experts, outputs, inputs).transpose(
            0, 2, 1)).reshape(experts * inputs, outputs)
