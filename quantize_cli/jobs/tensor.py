"""Running a layout's quantizer over one tensor, chunk by chunk: shared by the quantize
job and by the targets' measurements."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..core import RowResult, Scheme, find_non_finite, per_tensor_range, quantize_rows
from ..errors import NonFiniteValuesError
from ..formats import Layout
from ..storage.stream import TensorChunks


def quantized_chunks(chunks: TensorChunks, scheme: Scheme, layout: Layout, with_stats: bool,
                     magnitude: float | None = None
                     ) -> Iterator[tuple[int, np.ndarray, RowResult]]:
    """``(first_row, rows, result)`` for each chunk of the tensor, quantized as ``layout``
    stores it. One scale per tensor is first found over all chunks, and so is NVFP4's
    global scale, unless ``magnitude`` gives the largest magnitude it is made from (that
    of the layers a runtime fuses with this one).

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
            yield first_row, rows, quantize_rows(rows, scheme, tensor_range=tensor_range,
                                                 with_stats=with_stats, storage=storage)
    except NonFiniteValuesError:
        count, index = find_non_finite(chunks, entry.shape)
        raise NonFiniteValuesError.build(entry.name, count, index, chunks.path) from None
