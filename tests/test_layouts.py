"""The contract every layout keeps: a weight quantized by the core with what the layout
can store, encoded chunk by chunk, written to a file, found again by its format and read
back, dequantizes to exactly the core's values, bit for bit, for every scheme the layout
accepts.

The schemes are every method, bits and granularity qz has; each format tries each, and
the layout it picks is checked. A new layout is covered as soon as a format lists it.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from conftest import raw_safetensors
from quantize_cli.core import (
    QuantizedRows,
    RowResult,
    Scheme,
    dequantize_rows,
    per_tensor_range,
    quantize_rows,
)
from quantize_cli.core.elements import INTEGER_BITS
from quantize_cli.errors import SchemeError
from quantize_cli.formats import FORMATS, ModelFormat, QuantizedWeight, detect
from quantize_cli.storage.dtypes import DTYPE_BITS
from quantize_cli.storage.header import TensorEntry
from quantize_cli.storage.reader import SafetensorsReader

GRANULARITIES: list[tuple[str, int | None]] = [("tensor", None), ("channel", None),
                                               ("block", 32), ("block", 64), ("block", 128)]


def every_scheme() -> list[Scheme]:
    schemes = [Scheme(method, granularity, block, bits=bits)  # type: ignore[arg-type]
               for method, bits, (granularity, block) in itertools.product(
                   ("absmax", "affine"), INTEGER_BITS, GRANULARITIES)]
    schemes += [Scheme("absmax", granularity, activations="int8")  # type: ignore[arg-type]
                for granularity in ("tensor", "channel")]
    schemes += [Scheme("fp8", granularity, block, activations=activations)  # type: ignore[arg-type]
                for (granularity, block), activations in itertools.product(
                    [("tensor", None), ("channel", None), ("block", 128)], (None, "fp8"))]
    schemes += [Scheme(method) for method in ("nvfp4", "mxfp4", "mxfp8")]
    return schemes


def cases() -> list[Any]:
    found = []
    for (name, fmt), scheme in itertools.product(FORMATS.items(), every_scheme()):
        try:
            layout = fmt.layout_for(scheme)
        except SchemeError:
            continue
        found.append(pytest.param(fmt, scheme, id=f"{name}-{layout.name}-{scheme.describe()}"))
    return found


def weights(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Gaussian weights with an outlier column, so that groups differ."""
    rng = np.random.default_rng(math.prod(shape))
    values = rng.standard_normal(shape).astype(np.float32) * 0.05
    values[..., 3] *= 20
    return values.astype(dtype)


def written(fmt: ModelFormat, scheme: Scheme, tensor: TensorEntry, values: np.ndarray,
            folder: Path) -> tuple[Path, dict[str, Any] | None, list[tuple[int, RowResult]]]:
    """The weight quantized in chunks as the quantize job does (rows in multiples of the
    layout's, one range per tensor first), encoded and written; the chunks' results."""
    layout = fmt.layout_for(scheme)
    storage = layout.storage(tensor.dtype, scheme)
    rows = values.reshape(scheme.row_view_shape(tensor.shape))
    tensor_range = per_tensor_range([rows], scheme) if (
        scheme.granularity == "tensor" or scheme.info.global_scale) else None
    step = layout.row_multiple(scheme) * 2
    results = [(start, quantize_rows(rows[start:start + step], scheme,
                                     tensor_range=tensor_range, storage=storage))
               for start in range(0, rows.shape[0], step)]
    stored = {planned.name: planned for planned in layout.stored_tensors(tensor, scheme)}
    data = {name: bytearray() for name in stored}
    for start, result in results:
        for name, piece in layout.encode(tensor, scheme, result, start):
            data[name] += np.ascontiguousarray(piece).tobytes()
    for name, planned in stored.items():
        assert len(data[name]) == math.prod(planned.shape) * DTYPE_BITS[planned.dtype] // 8, name
    quantized = [QuantizedWeight(tensor, scheme)]
    path = folder / "model.safetensors"
    path.write_bytes(raw_safetensors(
        {name: (stored[name].dtype, list(stored[name].shape), bytes(raw))
         for name, raw in data.items()}, fmt.shard_metadata({}, quantized)))
    return path, fmt.model_config({"model_type": "test"}, scheme, quantized, []), results


@pytest.mark.parametrize(("fmt", "scheme"), cases())
@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_every_layout_reads_back_the_cores_values_bit_for_bit(
        tmp_path: Path, fmt: ModelFormat, scheme: Scheme, dtype: str) -> None:
    numpy_dtype = {"BF16": ml_dtypes.bfloat16, "F32": np.float32}[dtype]
    # 136 rows: not a whole number of packed zero-point words or FP8 tiles.
    tensor = TensorEntry("layer.weight", dtype, (136, 256), 0, 136 * 256 * (2 if dtype ==
                                                                             "BF16" else 4))
    path, config, results = written(fmt, scheme, tensor, weights(tensor.shape, numpy_dtype),
                                    tmp_path)
    with SafetensorsReader(path) as reader:
        assert detect(reader.header) is fmt
        (weight,) = fmt.find(reader, config)
        assert (weight.name, weight.shape) == ("layer.weight", tensor.shape)
        found = weight.scheme
        # MLX stores a symmetric grid as its affine one (a bias of −2^(b−1) · s).
        method = "affine" if fmt.name == "mlx" and scheme.method == "absmax" else scheme.method
        assert (found.method, found.granularity, found.block_size, found.bits,
                found.activations) == (method, scheme.granularity, scheme.block_size,
                                       scheme.bits, scheme.activations)
        for start, result in results:
            stop = start + result.codes.shape[0]
            expected = dequantize_rows(result, scheme)
            read = weight.dequantize_rows(weight.read_rows(reader, start, stop), np.float32,
                                          path)
            assert read.tobytes() == expected.tobytes(), (start, stop)


QZ_SHAPES = [(3, 5, 70), (7, 33)]


@pytest.mark.parametrize("scheme", [scheme for scheme in every_scheme()
                                    if scheme.activations is None and not scheme.tiles],
                         ids=Scheme.describe)
@pytest.mark.parametrize("shape", QZ_SHAPES, ids=str)
def test_qz_layouts_hold_any_shape(tmp_path: Path, scheme: Scheme,
                                   shape: tuple[int, ...]) -> None:
    # N-D tensors and odd last dimensions: packed rows end in a partial byte, the last
    # group of a row is shorter.
    fmt = FORMATS["qz"]
    tensor = TensorEntry("w", "F32", shape, 0, math.prod(shape) * 4)
    path, config, results = written(fmt, scheme, tensor, weights(shape, np.float32), tmp_path)
    with SafetensorsReader(path) as reader:
        (weight,) = fmt.find(reader, config)
        assert weight.shape == shape and weight.scheme == scheme
        for start, result in results:
            stop = start + result.codes.shape[0]
            rows = weight.read_rows(reader, start, stop)
            assert isinstance(rows, QuantizedRows)
            assert weight.dequantize_rows(rows, np.float32, path).tobytes() == \
                dequantize_rows(result, scheme).tobytes()
