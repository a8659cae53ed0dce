"""Running a format's quantizer over one tensor, chunk by chunk: shared by the quantize
job and by --target-sqnr's measurements."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..core.quantize import RowResult, find_non_finite, per_tensor_range
from ..core.scheme import Scheme
from ..errors import NonFiniteValuesError
from ..formats import Codec
from ..storage.stream import TensorChunks


def quantized_chunks(chunks: TensorChunks, scheme: Scheme, codec: Codec,
                     with_stats: bool) -> Iterator[tuple[int, np.ndarray, RowResult]]:
    """``(first_row, rows, result)`` for each chunk of the tensor, quantized the way
    ``codec`` rounds; one scale per tensor is first found over all chunks.

    Raises:
        NonFiniteValuesError: the tensor holds NaN or ±inf (counted over the whole tensor,
            naming the file).
    """
    try:
        tensor_range = (per_tensor_range(chunks, scheme) if scheme.granularity == "tensor"
                        else None)
        for first_row, rows in chunks.with_rows():
            yield first_row, rows, codec.quantize_rows(
                chunks.entry, rows, scheme, tensor_range=tensor_range, with_stats=with_stats)
    except NonFiniteValuesError:
        count, index = find_non_finite(chunks, chunks.entry.shape)
        raise NonFiniteValuesError.build(chunks.entry.name, count, index, chunks.path) \
            from None
