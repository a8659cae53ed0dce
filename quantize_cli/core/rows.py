"""Quantized rows: the codes of a run of rows of a tensor's row view with the parameters
of their groups, as the quantizers make them, the formats store them and the
dequantizer reads them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import ErrorStats, OutputError


@dataclass(frozen=True)
class QuantizedRows:
    """Codes and group parameters of a run of rows of a tensor's 2-D row view.

    * ``codes`` (rows, columns): int8 integer codes; uint8 codes of a float offset
      (``bias``); FP8 E4M3 or FP4 E2M1 values (ml_dtypes arrays) for float elements;
    * ``scale`` (rows, groups per row), (1, 1) for one per tensor, (tile rows, tile
      columns) for FP8 tiles: float32 values, or the stored E4M3/E8M0 numbers of a
      microscaling scheme (ml_dtypes arrays);
    * ``zero_point``: int8 (float32 when the format stores it fractional), affine only;
    * ``bias``: a float offset per group (MLX's affine, core/offset.py);
    * ``global_scale``: NVFP4's float32 scale of the whole tensor, which divides every
      group's scale (1.0 where a format stores none).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None = None
    bias: np.ndarray | None = None
    global_scale: float | None = None


@dataclass(frozen=True)
class RowResult(QuantizedRows):
    """What a quantizer returns for a run of rows: the quantized rows, their error
    statistics when asked for, and the (min, max) of integer codes, taken by the tiles
    while in cache, so that the check before writing (DESIGN §6.4) needs no pass over
    the chunk of its own."""

    stats: ErrorStats | None = None
    code_bounds: tuple[int, int] | None = None
    output: OutputError | None = None  # the layer's output error, with calibration
