"""How stored quantized weights become floats again: qz tensors and compressed-tensors
ones (pack-quantized or int-quantized), for dequantize, inspect and diff alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ctformat
from .core.scheme import Scheme
from .qzformat import is_quantized, read_quantized_entries, scale_name, zero_point_name
from .storage.dtypes import numpy_dtype
from .storage.reader import SafetensorsReader


@dataclass(frozen=True)
class Restore:
    """How one stored weight becomes floats again: a qz tensor, or a compressed-tensors
    one (pack-quantized or int-quantized)."""

    name: str  # the restored tensor's name
    shape: tuple[int, ...]
    dtype: str  # the dtype it is restored to by default
    scheme: Scheme
    codes: str  # the stored tensor with the codes
    scale: str
    zero_point: str | None
    packed: bool = False  # codes stored as compressed-tensors' weight_packed
    foreign: bool = False
    extra: tuple[str, ...] = ()  # other stored tensors that belong to it (weight_shape)

    @property
    def stored(self) -> set[str]:
        names = {self.codes, self.scale, *self.extra}
        return names | ({self.zero_point} if self.zero_point else set())


def find_restores(reader: SafetensorsReader) -> dict[str, Restore]:
    """A file's quantized weights (qz or compressed-tensors), by the name of the
    restored tensor; empty for a plain float file.

    Raises:
        QuantizedFormatError: a qz file whose metadata or tensors break the format.
    """
    header, path = reader.header, reader.path
    if is_quantized(header):
        return {entry.name: Restore(entry.name, header[entry.name].shape,
                                    entry.original_dtype, entry.scheme, entry.name,
                                    scale_name(entry.name),
                                    None if entry.scheme.symmetric else zero_point_name(entry.name))
                for entry in read_quantized_entries(header, path)}
    foreign = ctformat.find_foreign(header, _packed_shapes(reader))
    restores = {}
    for entry in foreign:
        granularity = "block" if entry.strategy == "group" else entry.strategy
        scheme = Scheme("affine" if entry.zero_point else "absmax", granularity,  # type: ignore[arg-type]
                        entry.group_size if granularity == "block" else None)
        restores[entry.name] = Restore(
            entry.name, entry.shape, entry.dtype, scheme, entry.codes, entry.scale,
            entry.zero_point, packed=entry.layout == "pack-quantized", foreign=True,
            extra=tuple(n for n in (entry.name + ctformat.SHAPE,) if n in header))
    return restores


def _packed_shapes(reader: SafetensorsReader) -> dict[str, tuple[int, ...]]:
    """The original shapes of compressed-tensors' packed weights (from X.weight_shape)."""
    shapes = {}
    for entry in reader.header.tensors:
        if entry.name.endswith(ctformat.PACKED):
            shape_name = entry.name.removesuffix(ctformat.PACKED) + ctformat.SHAPE
            if shape_name in reader.header:
                stored = reader.header[shape_name]
                if stored.dtype in ("I64", "I32") and stored.shape == (2,):
                    values = reader.read_tensor(stored)
                    shape = tuple(int(v) for v in values)
                    if all(v > 0 for v in shape) and shape[1] == entry.shape[1] * 4 \
                            and shape[0] == entry.shape[0]:
                        shapes[entry.name] = shape
    return shapes


def read_rows(
    reader: SafetensorsReader, restore: Restore, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes, scale as float32, zero point) for rows [start, stop) of the scheme's row
    view; ready for ``dequantize_rows``."""
    header = reader.header
    scheme = restore.scheme
    columns = scheme.row_view_shape(restore.shape)[1]
    groups = 1 if scheme.granularity == "tensor" else scheme.groups_per_row(columns)
    codes = np.empty((stop - start, columns), dtype=np.uint8 if restore.packed else np.int8)
    reader.read_into(header[restore.codes], start * columns, codes)
    if restore.packed:  # compressed-tensors stores q + 128
        codes = np.bitwise_xor(codes, np.uint8(0x80)).view(np.int8)
    parameters: list[np.ndarray | None] = []
    for name in (restore.scale, restore.zero_point):
        if name is None:
            parameters.append(None)
            continue
        stored = header[name]
        if scheme.granularity == "tensor":
            values = reader.read_tensor(stored).reshape(1, 1)
        else:
            values = np.empty((stop - start, groups), dtype=numpy_dtype(stored.dtype))
            reader.read_into(stored, start * groups * values.itemsize, values)
        parameters.append(values)
    assert parameters[0] is not None
    scale = parameters[0].astype(np.float32)  # exact: scales are float16/32 or bf16
    return codes, scale, parameters[1]
