"""The FP8 checkpoints DeepSeek-V3/R1 and the Qwen3 ``-FP8`` releases ship (transformers'
fine-grained FP8, ``quant_method: fp8`` in config.json): FP8 E4M3 weights, each with a
``weight_scale_inv`` per 128 × 128 block. qz reads them (inspect, dequantize, diff, and
quantize to any other scheme from their values); it writes FP8 in its own format or
compressed-tensors'."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

from ..core import Scheme
from ..storage.header import Header
from ..storage.reader import SafetensorsReader
from .base import ModelFormat, QuantizedWeight
from .layout import Layout, StoredLayout, StoredWeight
from .layouts.fp8 import ScaleInverseFp8
from .layouts.names import SCALE_INVERSE, activation_tensors


class FineGrainedFp8(ModelFormat):
    name = "fp8"
    summary = ("fine-grained FP8: E4M3 weights with a weight_scale_inv per 128×128 block "
               "(DeepSeek-V3/R1, Qwen3 -FP8)")
    prefix = ""
    layouts: ClassVar[tuple[Layout, ...]] = ()
    read_only_layouts: ClassVar[tuple[StoredLayout, ...]] = (ScaleInverseFp8(),)
    supported = "qz reads fine-grained FP8 checkpoints; it does not write them"
    default_scheme = Scheme("fp8", "block", 128)
    writes = False

    def shard_metadata(self, metadata: dict[str, str],
                       quantized: Sequence[QuantizedWeight]) -> dict[str, str]:
        return dict(metadata)

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        """The weights, each with its layer's static activation scale, if any."""
        return [replace(weight, tensors=weight.tensors + activation_tensors(reader.header,
                                                                           weight))
                for weight in super().find(reader, config)]

    def recognises(self, header: Header) -> bool:
        return any(entry.dtype == "F8_E4M3" and entry.name + SCALE_INVERSE in header
                   for entry in header.tensors)
