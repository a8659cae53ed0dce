"""gpt-oss's checkpoints (``quant_method: mxfp4`` in config.json): the experts' weights in
MXFP4 as ``X_blocks`` and ``X_scales``, everything else in BF16. qz reads them into the
names and shapes of the BF16 release (inspect, dequantize, diff, and quantize to any
other scheme from their values); it writes MXFP4 in its own format, compressed-tensors'
or MLX's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ..core import Scheme
from ..storage.header import Header
from .base import ModelFormat, QuantizedWeight
from .layout import Layout, StoredLayout
from .layouts.microscaling import GptOssExperts
from .layouts.names import GPT_OSS_BLOCKS, GPT_OSS_SCALES


class GptOssMxfp4(ModelFormat):
    name = "mxfp4"
    summary = "gpt-oss: MXFP4 experts as X_blocks and X_scales, the rest in BF16"
    prefix = ""
    layouts: ClassVar[tuple[Layout, ...]] = ()
    read_only_layouts: ClassVar[tuple[StoredLayout, ...]] = (GptOssExperts(),)
    supported = "qz reads gpt-oss's MXFP4 checkpoints; it does not write them"
    default_scheme = Scheme("mxfp4")
    writes = False

    def shard_metadata(self, metadata: dict[str, str],
                       quantized: Sequence[QuantizedWeight]) -> dict[str, str]:
        return dict(metadata)

    def recognises(self, header: Header) -> bool:
        return any(entry.name.endswith(GPT_OSS_BLOCKS) and entry.dtype == "U8"
                   and entry.name.removesuffix(GPT_OSS_BLOCKS) + GPT_OSS_SCALES in header
                   for entry in header.tensors)
