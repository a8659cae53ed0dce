"""Integer codes of 2 to 8 bits (absmax and affine), in each format that stores them.

* qz: the codes under the weight's own name, I8 at 8 bits, else packed densely along the
  last axis into U8 bytes (two's complement, the first code in the lowest bits); F32
  scales, and for affine zero points (I8 at 8 bits, fractional F32 below).
* compressed-tensors ``pack-quantized`` (weight-only, what vLLM's WNA16 kernels take):
  codes plus 2^(b−1) packed densely into little-endian int32 words (``pack_to_int32``),
  scales in the weight's dtype, the original shape, and for affine the zero points plus
  2^(b−1) packed the same way along the output axis.
* compressed-tensors ``int-quantized`` (W8A8: weights and, at run time, activations in
  INT8): I8 codes of the weight's shape beside its scales.
* MLX ``affine``: unsigned codes packed densely into uint32 words, with a scale and a
  float offset (bias) per group in the weight's dtype (core/offset.py).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ...core import QuantizedRows, RowResult, Scheme, Storage
from ...storage.dtypes import FLOAT_DTYPES, numpy_dtype
from ...storage.header import TensorEntry
from ...storage.reader import SafetensorsReader
from ..layout import (
    Layout,
    Role,
    ScaledCodes,
    StoredTensor,
    StoredWeight,
    from_offset_binary,
    offset_binary,
    pack_bits,
    read_groups,
    read_packed_rows,
    refuse,
    sign_extend,
    stored_label,
    to_unsigned,
    unpack_bits,
)
from .ct_config import declared_activations, declared_bits, scheme_from_scales
from .names import (
    CT_PACKED,
    CT_SCALE,
    CT_SHAPE,
    CT_ZERO_POINT,
    MLX_BIASES,
    MLX_SCALES,
    QZ_SCALE,
    QZ_ZERO_POINT,
    module_of,
)

#: Below 8 bits qz keeps what the search finds best: a scale of either sign (the
#: extreme of a symmetric group may sit on the lowest code) and a fractional zero point.
QZ_LOW_BIT_STORAGE = Storage(zero_point="float", negative_scales=True)
#: The group sizes compressed-tensors' and MLX's kernels take.
KERNEL_GROUPS = (32, 64, 128)
#: The bits MLX packs (mlx.core.quantize: 2, 3, 4, 5, 6 and 8).
MLX_BITS = (2, 3, 4, 5, 6, 8)


def _integers(scheme: Scheme) -> str | None:
    """Weight-only integer codes, or why not."""
    if scheme.element.is_float:
        return "not integer codes"
    return "not activation quantization" if scheme.activations is not None else None


# ------------------------------------------------------------------------------ qz


class QzIntegers(ScaledCodes):
    name = "qz integers"
    scale_suffix, zero_point_suffix = QZ_SCALE, QZ_ZERO_POINT

    def refusal(self, scheme: Scheme) -> str | None:
        return _integers(scheme)

    def storage(self, dtype: str, scheme: Scheme) -> Storage:
        return QZ_LOW_BIT_STORAGE if scheme.bits < 8 else super().storage(dtype, scheme)

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        stored = super().stored_tensors(entry, scheme)
        if scheme.bits == 8:
            return stored
        # Below 8 bits: packed codes, fractional zero points.
        codes, *companions = stored
        packed = (*entry.shape[:-1], math.ceil(entry.shape[-1] * scheme.bits / 8))
        return [replace(codes, dtype="U8", shape=packed),
                *(replace(tensor, dtype="F32") for tensor in companions)]

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        pieces = super().encode(entry, scheme, result, first_row)
        if scheme.bits < 8:  # packed along the original last axis
            bits, last = scheme.bits, entry.shape[-1]
            pieces[0] = (entry.name, pack_bits(to_unsigned(result.codes.reshape(-1, last),
                                                            bits), bits))
        return pieces

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> QuantizedRows:
        bits = weight.scheme.bits
        if bits == 8:
            return super().read_rows(reader, weight, start, stop)
        columns, last = weight.row_view[1], weight.shape[-1]
        # A row of the row view spans columns / last packed rows (channels of N-D).
        per = columns // last if last else 0
        patterns = read_packed_rows(reader, reader.header[weight.codes], start * per,
                                    stop * per, bits, last)
        scale = read_groups(reader, weight, start, stop, "scale")
        assert scale is not None
        return QuantizedRows(sign_extend(patterns, bits).reshape(stop - start, columns), scale,
                             read_groups(reader, weight, start, stop, "zero_point",
                                         as_float32=False))

    def check_rows(self, weight: StoredWeight, rows: QuantizedRows, path: Path) -> None:
        super().check_rows(weight, rows, path)
        scheme = weight.scheme
        if scheme.method == "absmax" and scheme.bits == 8 and rows.codes.size \
                and rows.codes.min() < -127:
            raise refuse(path, weight.name,
                         "holds the code -128, outside absmax's range [-127, 127]")


# --------------------------------------------------------------- compressed-tensors


class CtPacked(Layout):
    """compressed-tensors ``pack-quantized``."""

    name = "pack-quantized"

    def refusal(self, scheme: Scheme) -> str | None:
        if scheme.element.is_float:
            return "not integer codes"
        if scheme.activations is not None:
            return "weight-only: activations are declared by int-quantized"
        if scheme.bits == 8 and not scheme.symmetric:
            return "affine is not supported at 8 bits"
        if scheme.granularity == "tensor":
            return "per tensor is not supported"
        if scheme.granularity == "block" and scheme.block_size not in KERNEL_GROUPS:
            return f"block {scheme.block_size} is not supported"
        return None

    def storage(self, dtype: str, scheme: Scheme) -> Storage:
        # Scales in the weight's dtype, as compressed-tensors stores them; integer zero
        # points (packed); its own rule for symmetric scales beside qz's.
        return _ct_storage(dtype, scheme)

    def row_multiple(self, scheme: Scheme) -> int:
        # Zero points are packed along the output axis: a chunk starts on a word.
        if scheme.symmetric:
            return scheme.row_multiple
        return 32 // math.gcd(32, scheme.bits)

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        name, shape, dtype = entry.name, entry.shape, entry.dtype
        out_features, in_features = shape
        scale_shape = scheme.scale_shape(shape)
        words = math.ceil(in_features * scheme.bits / 32)
        stored = [StoredTensor(name + CT_PACKED, "I32", (out_features, words), "codes"),
                  StoredTensor(name + CT_SCALE, dtype, scale_shape, "scale"),
                  StoredTensor(name + CT_SHAPE, "I64", (2,), "shape")]
        if not scheme.symmetric:
            stored.append(StoredTensor(name + CT_ZERO_POINT, "I32",
                                       (math.ceil(out_features * scheme.bits / 32),
                                        scale_shape[-1]), "zero_point"))
        return stored

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        name, shape = entry.name, entry.shape
        bits = scheme.bits
        words = math.ceil(shape[1] * bits / 32)
        pieces = [(name + CT_PACKED, pack_bits(offset_binary(result.codes, bits), bits,
                                               words * 4)),
                  (name + CT_SCALE, result.scale.astype(numpy_dtype(entry.dtype)))]
        if result.zero_point is not None:
            pieces.append((name + CT_ZERO_POINT, _pack_along_rows(
                offset_binary(result.zero_point, bits), bits)))
        if first_row == 0:
            pieces.append((name + CT_SHAPE, np.array(shape, dtype=np.int64)))
        return pieces

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> QuantizedRows:
        bits = weight.scheme.bits
        values = read_packed_rows(reader, reader.header[weight.codes], start, stop, bits,
                                  weight.shape[1])
        scale = read_groups(reader, weight, start, stop, "scale")
        assert scale is not None
        zero_point = None
        name = weight.tensor("zero_point")
        if name is not None:
            zero_point = from_offset_binary(_read_packed_along_rows(
                reader, reader.header[name], start, stop, bits), bits)
        return QuantizedRows(from_offset_binary(values, bits), scale, zero_point)

    def match(self, reader: SafetensorsReader, entry: TensorEntry,
              config: dict[str, Any] | None) -> StoredWeight | None:
        header = reader.header
        if not (entry.name.endswith(CT_PACKED) and entry.dtype == "I32"
                and len(entry.shape) == 2):
            return None
        name = entry.name.removesuffix(CT_PACKED)
        if name + CT_SCALE not in header or name + CT_SHAPE not in header:
            return None
        return _ct_packed_weight(self, reader, entry, name, config)


class CtInt(ScaledCodes):
    """compressed-tensors ``int-quantized``: what W8A8 (INT8 weights and INT8 dynamic
    per-token activations) is stored as."""

    name = "int-quantized"
    scale_suffix, zero_point_suffix = CT_SCALE, CT_ZERO_POINT
    scales_in_weight_dtype = True

    def refusal(self, scheme: Scheme) -> str | None:
        if scheme.element.is_float or scheme.activations != "int8":
            return "not INT8 weights with INT8 activations"
        if scheme.bits != 8 or not scheme.symmetric or scheme.granularity == "block":
            return "W8A8 takes absmax INT8 per channel or per tensor"
        return None

    def storage(self, dtype: str, scheme: Scheme) -> Storage:
        return _ct_storage(dtype, scheme)

    def match(self, reader: SafetensorsReader, entry: TensorEntry,
              config: dict[str, Any] | None) -> StoredWeight | None:
        header = reader.header
        scale = entry.name + CT_SCALE
        if not (entry.name.endswith(".weight") and entry.dtype == "I8" and scale in header
                and header[scale].dtype in FLOAT_DTYPES and len(entry.shape) == 2):
            return None
        tensors: list[tuple[str, Role]] = [(entry.name, "codes"), (scale, "scale")]
        if entry.name + CT_ZERO_POINT in header:
            tensors.append((entry.name + CT_ZERO_POINT, "zero_point"))
        method = "affine" if len(tensors) == 3 else "absmax"
        scheme = scheme_from_scales(method, entry.shape, header[scale].shape, 8, config,
                                    declared_activations(config, "int8"))
        return StoredWeight(entry.name, entry.shape, header[scale].dtype, scheme,
                            "compressed-tensors", tuple(tensors),
                            f"compressed-tensors {self.name} {stored_label(scheme)}", self)


def _ct_storage(dtype: str, scheme: Scheme) -> Storage:
    """What compressed-tensors stores of integer groups: scales in the weight's dtype,
    integer zero points, and its own symmetric rule, s = max|x| / ((2^b − 1) / 2) with
    codes in [−2^(b−1), 2^(b−1) − 1] (127.5 at 8 bits, 7.5 at 4: ``calculate_qparams``),
    which plain rounding offers beside qz's."""
    return Storage(scale_dtype=numpy_dtype(dtype), divisor=((1 << scheme.bits) - 1) / 2)


def _pack_along_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, groups) unsigned values packed densely along the rows, as
    compressed-tensors packs zero points: (⌈rows · b / 32⌉, groups) int32 words."""
    rows = values.shape[0]
    words = math.ceil(rows * bits / 32)
    packed = pack_bits(np.ascontiguousarray(values.T), bits, words * 4)
    return np.ascontiguousarray(packed.view("<i4").T)


def _read_packed_along_rows(reader: SafetensorsReader, entry: TensorEntry, start: int,
                            stop: int, bits: int) -> np.ndarray:
    """Rows [start, stop) of values packed by :func:`_pack_along_rows` (``start`` on a
    word boundary, as the layout's row multiple ensures)."""
    groups = entry.shape[1]
    per_word = 32 // math.gcd(32, bits)  # rows that fill whole words
    first = start // per_word * per_word * bits // 32
    last = min(math.ceil(stop * bits / 32), entry.shape[0])
    words = np.empty((last - first, groups), dtype="<u4")
    reader.read_into(entry, first * groups * 4, words)
    stream = np.ascontiguousarray(words.T).view(np.uint8)
    values = unpack_bits(stream, bits, (last - first) * 32 // bits).T
    offset = start - first * 32 // bits
    return np.ascontiguousarray(values[offset:offset + stop - start])


def _ct_packed_weight(layout: Layout, reader: SafetensorsReader, entry: TensorEntry,
                      name: str, config: dict[str, Any] | None) -> StoredWeight | None:
    """A pack-quantized weight, its bits from config.json where it says, else from the
    width of the packed rows."""
    header = reader.header
    shape = _declared_shape(reader, header[name + CT_SHAPE])
    if shape is None:
        return None
    rows, columns = shape
    words = entry.shape[1]
    # Rows of 32 values or more tell the bits; shorter ones fit several widths: the
    # config says which, else the usual 8 and 4 first.
    fitting = [bits for bits in (8, 4, 2, 3, 5, 6, 7) if math.ceil(columns * bits / 32) == words]
    declared = [bits for bits in fitting if bits in declared_bits(config)]
    if rows != entry.shape[0] or not fitting:
        return None
    bits = (declared or fitting)[0]
    tensors: list[tuple[str, Role]] = [(entry.name, "codes"), (name + CT_SCALE, "scale"),
                                       (name + CT_SHAPE, "shape")]
    if name + CT_ZERO_POINT in header:
        tensors.append((name + CT_ZERO_POINT, "zero_point"))
    scale = header[name + CT_SCALE]
    method = "affine" if len(tensors) == 4 else "absmax"
    scheme = scheme_from_scales(method, shape, scale.shape, bits, config)
    return StoredWeight(name, shape, scale.dtype, scheme, "compressed-tensors",
                        tuple(tensors), f"compressed-tensors {layout.name} "
                        f"{stored_label(scheme)}", layout)


def _declared_shape(reader: SafetensorsReader, entry: TensorEntry) -> tuple[int, int] | None:
    """The original shape a ``weight_shape`` tensor holds, if it is one."""
    if entry.dtype not in ("I64", "I32") or entry.shape != (2,):
        return None
    rows, columns = (int(value) for value in reader.read_tensor(entry))
    return (rows, columns) if rows > 0 and columns > 0 else None


# ----------------------------------------------------------------------------- MLX


class MlxAffine(Layout):
    """MLX's ``affine`` mode (``mlx.core.quantize``)."""

    name = "affine"

    def refusal(self, scheme: Scheme) -> str | None:
        if _integers(scheme) is not None:
            return _integers(scheme)
        if scheme.bits not in MLX_BITS:
            return f"MLX packs {', '.join(map(str, MLX_BITS))} bits, not {scheme.bits}"
        if scheme.granularity != "block" or scheme.block_size not in KERNEL_GROUPS:
            what = (f"block {scheme.block_size}" if scheme.granularity == "block"
                    else f"per {scheme.granularity}")
            return f"MLX stores groups of 32, 64 or 128 values along the last axis; {what} " \
                   "is not supported"
        return None

    def storage(self, dtype: str, scheme: Scheme) -> Storage:
        return Storage(scale_dtype=numpy_dtype(dtype), zero_point="float",
                       negative_scales=True, offset=True)

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        name, shape, dtype = entry.name, entry.shape, entry.dtype
        rows, columns = shape
        groups = scheme.groups_per_row(columns)
        module = module_of(name)
        return [StoredTensor(name, "U32", (rows, columns * scheme.bits // 32), "codes"),
                StoredTensor(module + MLX_SCALES, dtype, (rows, groups), "scale"),
                StoredTensor(module + MLX_BIASES, dtype, (rows, groups), "bias")]

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        assert result.bias is not None
        module = module_of(entry.name)
        return [(entry.name, pack_bits(result.codes, scheme.bits)),
                (module + MLX_SCALES, result.scale), (module + MLX_BIASES, result.bias)]

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> QuantizedRows:
        codes = read_packed_rows(reader, reader.header[weight.codes], start, stop,
                                 weight.scheme.bits, weight.shape[1])
        scale = read_groups(reader, weight, start, stop, "scale", as_float32=False)
        assert scale is not None
        return QuantizedRows(codes, scale, bias=read_groups(reader, weight, start, stop,
                                                            "bias", as_float32=False))
