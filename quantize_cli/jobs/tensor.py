"""Running a layout's quantizer over one tensor, chunk by chunk: shared by the quantize
job and by the targets' measurements."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..core import RowResult, Scheme, find_non_finite, per_tensor_range, quantize_rows
from ..core.gptq import quantize_rows_calibrated
from ..errors import NonFiniteValuesError
from ..formats import Layout
from ..storage.stream import TensorChunks
from .calibration import Calibration


def quantized_chunks(chunks: TensorChunks, scheme: Scheme, layout: Layout, with_stats: bool,
                     magnitude: float | None = None, calibration: Calibration | None = None
                     ) -> Iterator[tuple[int, np.ndarray, RowResult]]:
    """``(first_row, rows, result)`` for each chunk of the tensor, quantized as ``layout``
    stores it. One scale per tensor is first found over all chunks, and so is NVFP4's
    global scale, unless ``magnitude`` gives the largest magnitude it is made from (that
    of the layers a runtime fuses with this one). With ``calibration`` (the second moment
    of the layer's inputs), each row is quantized for the layer's output (core/gptq.py),
    and the statistics include the output error.

    Raises:
        NonFiniteValuesError: the tensor holds NaN or ±inf (counted over the whole tensor,
            naming the file).
    """
    entry = chunks.entry
    storage = layout.storage(entry.dtype, scheme)
    try:
        tensor_range = None
        if magnitude is not None:
            tensor_range = (-magnitude, magnitude)
        elif scheme.granularity == "tensor" or (scheme.info.global_scale
                                                and storage.global_scale):
            tensor_range = per_tensor_range(chunks, scheme)
        for first_row, rows in chunks.with_rows():
            if calibration is None:
                yield first_row, rows, quantize_rows(rows, scheme, tensor_range=tensor_range,
                                                     with_stats=with_stats, storage=storage)
            else:
                yield first_row, rows, quantize_rows_calibrated(
                    rows, scheme, calibration.second_moment, calibration.plan, storage=storage,
                    tensor_range=tensor_range, with_stats=with_stats)
    except NonFiniteValuesError:
        count, index = find_non_finite(chunks, entry.shape)
        raise NonFiniteValuesError.build(entry.name, count, index, chunks.path) from None
