"""FP8 E4M3 values with float scales (``--method fp8``), in each format that stores them.

* qz: the values under the weight's own name as F8_E4M3, with F32 scales of the
  scheme's scale shape (square tiles for blocks).
* compressed-tensors ``float-quantized`` (what FP8, FP8_DYNAMIC and FP8_BLOCK are stored
  as): ``X.weight`` F8_E4M3 and ``X.weight_scale`` in the weight's dtype: (1,) per
  tensor, (out, 1) per channel, (⌈out / 128⌉, ⌈in / 128⌉) per 128 × 128 block.
* read only: the fine-grained FP8 of DeepSeek-V3/R1 and Qwen3 ``-FP8``, ``X.weight``
  F8_E4M3 and ``X.weight_scale_inv`` per 128 × 128 block (:class:`ScaleInverseFp8`).

All dequantize x̂ = q · s in float32 (exact for a float32, float16 or bfloat16 scale).
"""

from __future__ import annotations

import math
from typing import Any

from ...core import Scheme, Storage
from ...storage.dtypes import FLOAT_DTYPES, numpy_dtype
from ...storage.header import TensorEntry
from ...storage.reader import SafetensorsReader
from ..layout import ScaledCodes, StoredWeight, refuse, stored_label
from .ct_config import FP8_BLOCK, declared_activations, declared_fp8_block, scheme_from_scales
from .names import CT_SCALE, CT_ZERO_POINT, QZ_SCALE, QZ_ZERO_POINT, SCALE_INVERSE


def _fp8(scheme: Scheme) -> str | None:
    return None if scheme.method == "fp8" else "not FP8 with float scales"


def _weight_only_fp8(scheme: Scheme) -> str | None:
    if scheme.activations is not None:
        return "not activation quantization"
    return _fp8(scheme)


class QzFp8(ScaledCodes):
    name = "qz fp8"
    scale_suffix, zero_point_suffix = QZ_SCALE, QZ_ZERO_POINT

    def refusal(self, scheme: Scheme) -> str | None:
        return _weight_only_fp8(scheme)


class CtFloat(ScaledCodes):
    """compressed-tensors ``float-quantized``."""

    name = "float-quantized"
    scale_suffix, zero_point_suffix = CT_SCALE, CT_ZERO_POINT
    scales_in_weight_dtype = True

    def refusal(self, scheme: Scheme) -> str | None:
        if scheme.method != "fp8":
            return _fp8(scheme)
        if scheme.granularity == "block" and scheme.block_size != FP8_BLOCK:
            return f"FP8 block {scheme.block_size} is not supported"
        return None

    def storage(self, dtype: str, scheme: Scheme) -> Storage:
        return Storage(scale_dtype=numpy_dtype(dtype))

    def match(self, reader: SafetensorsReader, entry: TensorEntry,
              config: dict[str, Any] | None) -> StoredWeight | None:
        header = reader.header
        scale = entry.name + CT_SCALE
        if not (entry.name.endswith(".weight") and entry.dtype == "F8_E4M3"
                and scale in header and header[scale].dtype in FLOAT_DTYPES
                and len(entry.shape) == 2):
            return None
        scale_shape = header[scale].shape
        activations = declared_activations(config, "fp8")
        if scale_shape in ((1,), (entry.shape[0], 1)):
            scheme = scheme_from_scales("fp8", entry.shape, scale_shape, 8, config,
                                        activations)
        else:
            scheme = Scheme("fp8", "block", declared_fp8_block(config), "none",
                            activations=activations)  # type: ignore[arg-type]
        return StoredWeight(entry.name, entry.shape, header[scale].dtype, scheme,
                            "compressed-tensors", ((entry.name, "codes"), (scale, "scale")),
                            f"compressed-tensors {self.name} {stored_label(scheme)}", self)


class ScaleInverseFp8(ScaledCodes):
    """The FP8 checkpoints of DeepSeek-V3/R1 and Qwen3 ``-FP8`` (transformers' fine-grained
    FP8, ``quant_method: fp8``): ``X.weight`` F8_E4M3 and ``X.weight_scale_inv`` (F32,
    sometimes BF16) per block of ``weight_block_size`` (128 × 128; the blocks at the
    right and bottom edges are partial), or one for the tensor. The name misleads: the
    "inverse" multiplies, x̂ = q · s, in float32 (DeepSeek's ``weight_dequant`` kernel in
    ``inference/kernel.py``; transformers' ``_dequantize_fp8_weight``).

    qz reads this layout; it writes FP8 as its own format or compressed-tensors'.
    """

    name = "fp8 weight_scale_inv"
    scale_suffix, zero_point_suffix = SCALE_INVERSE, ""

    def refusal(self, scheme: Scheme) -> str | None:
        return "qz writes FP8 in its own format or compressed-tensors'"

    def match(self, reader: SafetensorsReader, entry: TensorEntry,
              config: dict[str, Any] | None) -> StoredWeight | None:
        header = reader.header
        scale = entry.name + SCALE_INVERSE
        if not (entry.dtype == "F8_E4M3" and scale in header
                and header[scale].dtype in FLOAT_DTYPES):
            return None
        scale_shape = header[scale].shape
        if math.prod(scale_shape) == 1:
            scheme = Scheme("fp8", "tensor", clip="none")
        else:
            block = _declared_block(config) or _block_from_scales(entry.shape, scale_shape)
            scheme = Scheme("fp8", "block", block, "none")
            if len(entry.shape) != 2 or scheme.scale_shape(entry.shape) != scale_shape:
                raise refuse(reader.path, scale, f"has shape {list(scale_shape)}, not one "
                             f"scale per {block}×{block} block of the {list(entry.shape)} "
                             "weight")
        dtype = _restored_dtype(config)
        return StoredWeight(entry.name, entry.shape, dtype, scheme, "fp8",
                            ((entry.name, "codes"), (scale, "scale")),
                            f"FP8 {scheme.where} (weight_scale_inv)", self)


def _declared_block(config: dict[str, Any] | None) -> int | None:
    """The square block of ``quantization_config.weight_block_size``, if declared."""
    declared = ((config or {}).get("quantization_config") or {}).get("weight_block_size")
    if isinstance(declared, list) and len(declared) == 2 and declared[0] == declared[1] \
            and isinstance(declared[0], int) and declared[0] > 0:
        return declared[0]
    return None


def _block_from_scales(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> int:
    """The square block that gives ``scale_shape`` for ``shape``, for a checkpoint whose
    config does not say (128 when several would)."""
    for block in (128, 64, 32, 256, 16, 512):
        if len(shape) == 2 and tuple(-(-side // block) for side in shape) == scale_shape:
            return block
    return 128


def _restored_dtype(config: dict[str, Any] | None) -> str:
    """The dtype the model's config names (what the weights are restored to), else BF16."""
    named = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    return {"float32": "F32", "float16": "F16"}.get(named, "BF16") if isinstance(
        named, str) else "BF16"
