"""FP8 E4M3 values with float scales (``--method fp8``), in each format that stores them.

* qz: the values under the weight's own name as F8_E4M3, with F32 scales of the
  scheme's scale shape (square tiles for blocks).
* compressed-tensors ``float-quantized`` (what FP8, FP8_DYNAMIC and FP8_BLOCK are stored
  as): ``X.weight`` F8_E4M3 and ``X.weight_scale`` in the weight's dtype: (1,) per
  tensor, (out, 1) per channel, (⌈out / 128⌉, ⌈in / 128⌉) per 128 × 128 block.

Both dequantize x̂ = q · s in float32 (exact for a float32, float16 or bfloat16 scale).
"""

from __future__ import annotations

from typing import Any

from ...core import Scheme, Storage
from ...storage.dtypes import FLOAT_DTYPES, numpy_dtype
from ...storage.header import TensorEntry
from ...storage.reader import SafetensorsReader
from ..layout import ScaledCodes, StoredWeight, stored_label
from .ct_config import FP8_BLOCK, declared_activations, declared_fp8_block, scheme_from_scales
from .names import CT_SCALE, CT_ZERO_POINT, QZ_SCALE, QZ_ZERO_POINT


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
