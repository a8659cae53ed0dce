"""The MLX format: the layout ``mlx_lm.convert -q`` writes, which ``mlx_lm.load`` runs.

For a quantized Linear or Embedding weight ``X.weight`` of shape (out, in), in groups of
g values along the last axis with b bits (8 or 4):

* ``X.weight`` U32 (out, in · b / 32): the codes q ∈ [0, 2^b − 1], packed little endian,
  least significant bits first (8 bits: the codes are the bytes, in order; 4 bits: two to
  a byte, the first in the low nibble);
* ``X.scales`` and ``X.biases`` in the weight's dtype, (out, in / g);
* dequantized: x̂ = scales · q + biases, each operation rounded to the weight's dtype.

config.json gains ``quantization`` = ``quantization_config`` = ``{"group_size": g,
"bits": b, "mode": "affine"}``, with an entry of its own for each layer quantized
otherwise (``--rule``); a layer is quantized when its ``.scales`` exist, so layers left in
float need no entry. Every shard's metadata says ``format: mlx``. MLX
quantizes Linear and Embedding layers whose last dimension divides by the group; norms
and other 1-D tensors stay. Sources: ``mlx/ops.cpp`` (``affine_quantize``) and
``mlx_lm/utils.py`` (``quantize_model``, ``load_model``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.offset import dequantize_offset, quantize_offset_rows
from ..core.quantize import RowResult
from ..core.scheme import BITS, Scheme
from ..errors import QuantizedFormatError, SchemeError, located
from ..storage.dtypes import FLOAT_DTYPES, numpy_dtype
from ..storage.header import Header, TensorEntry
from ..storage.reader import SafetensorsReader
from .base import (
    Codec,
    Deployment,
    QuantizedWeight,
    Role,
    StoredRows,
    StoredTensor,
    StoredWeight,
    pack_nibbles,
    refuse_bad_scales,
    unpack_nibbles,
)

BLOCK_SIZES = (32, 64, 128)
SCALES, BIASES = ".scales", ".biases"
SUPPORTED = "MLX stores groups of 32, 64 or 128 values along the last axis"


class MlxFormat(Codec):
    name = "mlx"
    summary = ("mlx: the layout mlx_lm.convert -q writes (packed codes, scales and biases "
               "in groups of 32/64/128, default 64), for mlx-lm")
    suffix = "mlx-"
    default_scheme = Scheme("affine", "block", 64)
    folder_output = True

    def check_scheme(self, scheme: Scheme) -> None:
        if scheme.method == "fp8":
            raise SchemeError("MLX stores integer codes (its FP formats are mxfp8 and "
                              "nvfp4, which qz does not write)", hint="use --format qz "
                              "or compressed-tensors for FP8")
        if scheme.granularity != "block" or scheme.block_size not in BLOCK_SIZES:
            what = (f"block {scheme.block_size}" if scheme.granularity == "block"
                    else f"per {scheme.granularity}")
            raise SchemeError(f"{SUPPORTED}; {what} is not supported",
                              hint="use --block 32, 64 or 128")

    def keep_reason(self, entry: TensorEntry, scheme: Scheme,
                    deployment: Deployment) -> str | None:
        if not entry.name.endswith(".weight") or len(entry.shape) != 2:
            return "kept for MLX: MLX quantizes the 2-D weights of Linear and Embedding layers"
        if ".experts." in entry.name:
            return "kept for MLX: mlx-lm stacks expert weights when it loads them"
        assert scheme.block_size is not None
        if entry.shape[-1] % scheme.block_size:
            return (f"kept for MLX: the last dimension, {entry.shape[-1]}, is not a multiple "
                    f"of the group size {scheme.block_size}")
        return None

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        rows, columns = entry.shape
        groups = scheme.groups_per_row(columns)
        module = entry.name.removesuffix(".weight")
        return [StoredTensor(entry.name, "U32", (rows, columns * scheme.bits // 32), "codes"),
                StoredTensor(module + SCALES, entry.dtype, (rows, groups), "scale"),
                StoredTensor(module + BIASES, entry.dtype, (rows, groups), "bias")]

    def quantize_rows(self, entry: TensorEntry, rows: np.ndarray, scheme: Scheme, *,
                      tensor_range: tuple[float, float] | None,
                      with_stats: bool) -> RowResult:
        found = quantize_offset_rows(rows, scheme, with_stats=with_stats)
        return RowResult(codes=found.codes, scale=found.scale, zero_point=None,
                         stats=found.stats, bias=found.bias)

    def produced_valid(self, result: RowResult, scheme: Scheme) -> bool:
        # Scales may be negative (MLX's rule); every uint8 code fits 8 bits.
        assert result.bias is not None
        return bool(np.isfinite(result.scale.astype(np.float32)).all()
                    and np.isfinite(result.bias.astype(np.float32)).all())

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        assert result.bias is not None
        module = entry.name.removesuffix(".weight")
        # Codes packed little endian into uint32 are bytes in order: for 8 bits the
        # codes themselves, for 4 bits two to a byte, the first in the low nibble.
        codes = result.codes if scheme.bits == 8 else pack_nibbles(
            result.codes, result.codes.shape[1] // 2)
        return [(entry.name, codes), (module + SCALES, result.scale),
                (module + BIASES, result.bias)]

    def shard_metadata(self, metadata: dict[str, str],
                       quantized: Sequence[QuantizedWeight]) -> dict[str, str]:
        return {**metadata, "format": "mlx"}

    def model_config(self, config: dict[str, Any] | None, scheme: Scheme,
                     quantized: Sequence[QuantizedWeight],
                     kept: Sequence[TensorEntry]) -> dict[str, Any] | None:
        if config is None:
            return None
        quantization: dict[str, Any] = _parameters_of(scheme)
        for weight in quantized:  # layers quantized otherwise than asked (--rule, …)
            if weight.scheme != scheme:
                quantization[weight.entry.name.removesuffix(".weight")] = _parameters_of(
                    weight.scheme)
        return {**config, "quantization": quantization, "quantization_config": quantization}

    # ------------------------------------------------------------------------ reading

    def recognises(self, header: Header) -> bool:
        return any(_module_of_scales(header, entry) is not None for entry in header.tensors)

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        header, path = reader.header, reader.path
        found = []
        for entry in header.tensors:
            module = _module_of_scales(header, entry)
            if module is None:
                continue
            block, bits = _parameters(config, module, path)
            codes = header[module + ".weight"]
            columns = codes.shape[-1] * 32 // bits
            if bits not in BITS or columns != entry.shape[-1] * block:
                raise QuantizedFormatError(located(
                    path, codes.name, f"{bits}-bit codes in groups of {block} do not match "
                    f"its shape {list(codes.shape)} and the scales' {list(entry.shape)}"
                    + ("" if bits in BITS else " (this qz reads 8- and 4-bit MLX weights)")))
            scheme = Scheme("affine", "block", block, "none", bits)
            tensors: tuple[tuple[str, Role], ...] = (
                (codes.name, "codes"), (entry.name, "scale"), (module + BIASES, "bias"))
            found.append(StoredWeight(
                name=codes.name, shape=(*codes.shape[:-1], columns), dtype=entry.dtype,
                scheme=scheme, format=self.name, tensors=tensors,
                description=f"MLX {bits}-bit affine block {block}"))
        return found

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> StoredRows:
        header = reader.header
        columns = weight.row_view[1]
        groups = weight.scheme.groups_per_row(columns)
        row_bytes = columns * weight.scheme.bits // 8
        packed = np.empty((stop - start, row_bytes), dtype=np.uint8)
        reader.read_into(header[weight.codes], start * row_bytes, packed)
        codes = packed if weight.scheme.bits == 8 else unpack_nibbles(packed, columns)
        found: StoredRows = {"codes": codes}
        roles: tuple[Role, ...] = ("scale", "bias")
        for role in roles:
            name = weight.tensor(role)
            assert name is not None
            entry = header[name]
            values = np.empty((stop - start, groups), dtype=numpy_dtype(entry.dtype))
            reader.read_into(entry, start * groups * values.itemsize, values)
            found[role] = values
        return found

    def dequantize_rows(self, weight: StoredWeight, rows: StoredRows, dtype: npt.DTypeLike,
                        path: Path) -> np.ndarray:
        scale, bias = rows["scale"], rows["bias"]
        if not (np.isfinite(scale.astype(np.float32)).all()
                and np.isfinite(bias.astype(np.float32)).all()):
            refuse_bad_scales(path, weight, np.array([np.nan]))
        block = weight.scheme.block_size
        assert block is not None
        codes = rows["codes"]
        grouped = codes.reshape(codes.shape[0], -1, block)
        values = dequantize_offset(grouped, scale, bias, numpy_dtype(weight.dtype))
        return values.reshape(codes.shape).astype(dtype)

    def float_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in config.items()
                if key not in ("quantization", "quantization_config")}

    def float_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        # A float checkpoint for PyTorch-based loaders again.
        return {**metadata, "format": "pt"} if metadata.get("format") == "mlx" else metadata


def _parameters_of(scheme: Scheme) -> dict[str, Any]:
    return {"group_size": scheme.block_size, "bits": scheme.bits, "mode": "affine"}


def _module_of_scales(header: Header, entry: TensorEntry) -> str | None:
    """The module whose ``.scales`` this is, when it has ``.biases`` and packed codes."""
    if not entry.name.endswith(SCALES) or entry.dtype not in FLOAT_DTYPES:
        return None
    module = entry.name.removesuffix(SCALES)
    codes, biases = module + ".weight", module + BIASES
    if codes in header and header[codes].dtype == "U32" and biases in header \
            and header[biases].shape == entry.shape and len(entry.shape) >= 2:
        return module
    return None


def _parameters(config: dict[str, Any] | None, module: str, path: Path) -> tuple[int, int]:
    """(group size, bits) of a module, from config.json's ``quantization`` (its
    per-module entries first): the shapes alone only tell their product."""
    quantization = (config or {}).get("quantization") or (config or {}).get(
        "quantization_config")
    if not isinstance(quantization, dict):
        raise QuantizedFormatError(
            located(path, module + SCALES, "an MLX weight, but config.json has no "
                    "'quantization' entry giving its group size and bits"),
            hint="MLX checkpoints are read as folders with their config.json")
    own = quantization.get(module)
    chosen = own if isinstance(own, dict) else quantization
    block, bits = chosen.get("group_size"), chosen.get("bits")
    if type(block) is not int or type(bits) is not int or block < 1 or not 1 <= bits <= 8:
        raise QuantizedFormatError(located(
            path, module + SCALES, f"config.json's quantization has no valid group_size and "
            f"bits for it (found {block!r} and {bits!r})"))
    return block, bits
