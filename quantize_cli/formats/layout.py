"""How one quantized weight is stored: the layout interface, the records it shares with
the jobs, and the packing every layout builds on.

A layout knows, for the schemes it accepts, which tensors a weight becomes (names, dtypes
and shapes from the header alone, so an output is planned before any data is read), what
of a group's parameters it can hold (``Storage``, which the quantizer respects), how a
chunk of quantized rows is encoded into those tensors, how a weight stored that way is
recognised in a header, and how its rows are read back as the core's ``QuantizedRows``,
which the core dequantizes. A model format (base.py) lists the layouts it holds.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from ..core import PLAIN, QuantizedRows, RowResult, Scheme, Storage, dequantize_rows
from ..errors import QuantizedFormatError, located
from ..storage.dtypes import DTYPE_BITS, numpy_dtype
from ..storage.header import TensorEntry
from ..storage.reader import SafetensorsReader
from ..storage.writer import PlannedTensor

#: What a stored tensor is to its quantized weight.
Role = Literal["codes", "scale", "zero_point", "bias", "shape", "global_scale",
               "activation_scale", "group_index"]


@dataclass(frozen=True)
class StoredTensor(PlannedTensor):
    """A tensor a format writes for a quantized weight, and what it is to that weight."""

    role: Role


@dataclass(frozen=True)
class StoredWeight:
    """A quantized weight found in a file: what it becomes again and how it is stored.

    ``name``, ``shape`` and ``dtype`` are the weight as the model knows it (the dtype it
    is restored to by default); ``tensors`` maps every stored tensor of the weight to its
    role; ``layout`` reads it.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    scheme: Scheme
    format: str
    tensors: tuple[tuple[str, Role], ...]
    description: str  # how it is stored, for people: "INT8 absmax block 128"
    layout: StoredLayout

    def tensor(self, role: Role) -> str | None:
        """The stored tensor with ``role``, if the weight has one."""
        return next((name for name, found in self.tensors if found == role), None)

    @property
    def codes(self) -> str:
        codes = self.tensor("codes")
        assert codes is not None, "every stored weight has codes"
        return codes

    @property
    def row_view(self) -> tuple[int, int]:
        return self.scheme.row_view_shape(self.shape)

    @property
    def row_multiple(self) -> int:
        """Reads of the weight's rows start at multiples of this many rows."""
        return self.layout.weight_row_multiple(self)

    def read_rows(self, reader: SafetensorsReader, start: int, stop: int) -> QuantizedRows:
        """The stored rows [start, stop) of the row view (I/O only)."""
        return self.layout.read_rows(reader, self, start, stop)

    def dequantize_rows(self, rows: QuantizedRows, dtype: npt.DTypeLike,
                        path: Path) -> np.ndarray:
        """Rows read by :meth:`read_rows` as values of ``dtype``, refusing stored numbers
        the format cannot hold (QuantizedFormatError, naming ``path``).

        Raises:
            DtypeRangeError: a value does not fit ``dtype``.
        """
        self.layout.check_rows(self, rows, path)
        return self.layout.arrange(self, dequantize_rows(rows, self.scheme, dtype))


class StoredLayout(ABC):
    """One way a quantized weight is stored, as far as reading it goes: how it is
    recognised in a header and how its rows are read back. Layouts qz also writes are
    :class:`Layout`; some it only reads (other tools' checkpoints)."""

    #: What the format calls it (compressed-tensors' ``format``, MLX's ``mode``, …).
    name: ClassVar[str]

    def storage(self, dtype: str, scheme: Scheme) -> Storage:
        """What this layout keeps of a group's parameters, for a weight of ``dtype``."""
        return PLAIN

    def row_multiple(self, scheme: Scheme) -> int:
        """Row chunks of a weight must hold a multiple of this many rows."""
        return scheme.row_multiple

    def weight_row_multiple(self, weight: StoredWeight) -> int:
        """Reads of a stored weight's rows start at multiples of this many rows."""
        return self.row_multiple(weight.scheme)

    def arrange(self, weight: StoredWeight, values: np.ndarray) -> np.ndarray:
        """Dequantized stored rows as rows of the weight's row view (the same, unless
        the layout stores the weight transposed)."""
        return values

    @abstractmethod
    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> QuantizedRows:
        """The stored data of rows [start, stop) of ``weight``'s row view (I/O only)."""

    def check_rows(self, weight: StoredWeight, rows: QuantizedRows, path: Path) -> None:
        """Refuse stored numbers qz could never have written (NaN codes, non-finite or,
        unless the layout allows them, negative scales; non-finite zero points and
        offsets) rather than return wrong values."""
        if rows.codes.dtype.name == "float8_e4m3fn" and bool(
                ((rows.codes.view(np.uint8) & 0x7F) == 0x7F).any()):  # E4M3's NaN patterns
            raise QuantizedFormatError(located(path, weight.codes, "holds NaN codes"))
        negative = self.storage(weight.dtype, weight.scheme).negative_scales
        scale = rows.scale.astype(np.float32)
        if not (np.isfinite(scale).all() and (negative or (scale >= 0).all())):
            raise QuantizedFormatError(located(path, weight.tensor("scale"),
                                               "holds non-finite or negative scales"))
        for role, values in (("zero_point", rows.zero_point), ("bias", rows.bias)):
            if values is not None and not np.isfinite(values.astype(np.float32)).all():
                raise QuantizedFormatError(located(path, weight.tensor(role),  # type: ignore[arg-type]
                                                   f"holds non-finite {role.replace('_', ' ')}s"))

    def match(self, reader: SafetensorsReader, entry: TensorEntry,
              config: dict[str, Any] | None) -> StoredWeight | None:
        """The weight whose codes ``entry`` is, when it is stored this way (for formats
        whose weights are recognised by their tensors; qz's own are listed in its
        metadata), from the header and the tiny tensors that describe a weight (a
        packed weight's shape). None: it is not.

        Raises:
            QuantizedFormatError: it is, but breaks the layout.
        """
        return None


class Layout(StoredLayout):
    """A way of storing a quantized weight that qz writes too. Subclasses are listed by
    the model formats that hold them; a layout never decides what a model format does
    with config.json, names of outputs or deployment."""

    @abstractmethod
    def refusal(self, scheme: Scheme) -> str | None:
        """Why this layout cannot store ``scheme`` (None: it can)."""

    @abstractmethod
    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        """The tensors the weight ``entry`` (its name, dtype and shape) becomes."""

    @abstractmethod
    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        """What to append to which stored tensor for the rows of the weight ``entry``
        starting at ``first_row`` of the row view (chunks come in order, so per-tensor
        values go with row 0)."""

    def produced_valid(self, result: RowResult, scheme: Scheme) -> bool:
        """Whether quantized numbers are what the layout can hold, checked before they
        are written (DESIGN §6.4): finite scales (non-negative unless the storage allows
        otherwise) and integer codes in the scheme's range. Cheap: the small scale array
        and the codes' min and max."""
        scale = result.scale.astype(np.float32)
        scales_valid = bool(np.isfinite(scale).all())
        if result.zero_point is not None:
            scales_valid &= bool(np.isfinite(result.zero_point.astype(np.float32)).all())
        if result.bias is not None:
            scales_valid &= bool(np.isfinite(result.bias.astype(np.float32)).all())
        if scheme.element.is_float:  # the cast would have made NaN: E4M3's 0x7F, 0xFF
            patterns = result.codes.view(np.uint8)
            return scales_valid and (scheme.element.bits == 4 or not bool(
                ((patterns & 0x7F) == 0x7F).any()))
        if result.bias is not None:  # unsigned codes: every one fits
            return scales_valid
        storage = self.storage("F32", scheme)
        if not storage.negative_scales:
            scales_valid &= bool((scale >= 0).all())
        if result.codes.size == 0:
            return scales_valid
        low, high = result.code_bounds or (int(result.codes.min()), int(result.codes.max()))
        lowest, highest = storage.code_range(scheme)
        return scales_valid and low >= lowest and high <= highest


class ScaledCodes(Layout):
    """Codes of the weight's own shape under its name (I8, or F8_E4M3), with a scale and,
    for affine, a zero point per group beside them, named by the format's suffixes: qz's
    INT8 and FP8, compressed-tensors' ``int-quantized`` and ``float-quantized``."""

    scale_suffix: ClassVar[str]
    zero_point_suffix: ClassVar[str]
    #: Whether scales are stored in the weight's dtype (else float32).
    scales_in_weight_dtype: ClassVar[bool] = False

    def scale_dtype(self, entry: TensorEntry) -> str:
        return entry.dtype if self.scales_in_weight_dtype else "F32"

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        shape = scheme.scale_shape(entry.shape)
        stored = [StoredTensor(entry.name, "F8_E4M3" if scheme.element.is_float else "I8",
                               entry.shape, "codes"),
                  StoredTensor(entry.name + self.scale_suffix, self.scale_dtype(entry), shape,
                               "scale")]
        if not scheme.symmetric:
            stored.append(StoredTensor(entry.name + self.zero_point_suffix, "I8", shape,
                                       "zero_point"))
        return stored

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        pieces: list[tuple[str, np.ndarray]] = [(entry.name, result.codes)]
        # Scale rows follow the code rows, so they stream out in step; one scale per
        # tensor goes out with the first rows.
        if scheme.granularity != "tensor" or first_row == 0:
            pieces.append((entry.name + self.scale_suffix,
                           result.scale.astype(numpy_dtype(self.scale_dtype(entry)))))
            if result.zero_point is not None:
                pieces.append((entry.name + self.zero_point_suffix, result.zero_point))
        return pieces

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> QuantizedRows:
        codes = reader.read_rows(reader.header[weight.codes], weight.row_view, start, stop)
        scale = read_groups(reader, weight, start, stop, "scale")
        assert scale is not None
        return QuantizedRows(codes, scale, read_groups(reader, weight, start, stop,
                                                       "zero_point", as_float32=False))


# ------------------------------------------------------------------------- packing


def pack_bits(codes: np.ndarray, bits: int, row_bytes: int | None = None) -> np.ndarray:
    """Unsigned codes of ``bits`` bits (the low bits of each byte of ``codes``, rows × n)
    packed densely along each row, little endian: code i occupies bits i·b … i·b + b − 1
    of the row's bit stream, so the first code sits in the lowest bits. Each row is padded
    with zeros to ``row_bytes`` (default ⌈n · b / 8⌉). This is the byte order of qz's
    packed codes, of MLX's uint32 words and of compressed-tensors' int32 words.

    >>> pack_bits(np.array([[1, 2, 15]], np.uint8), 4).tolist()
    [[33, 15]]
    >>> pack_bits(np.array([[7, 0, 5]], np.uint8), 3).tolist()
    [[71, 1]]
    """
    rows, count = codes.shape
    width = row_bytes if row_bytes is not None else math.ceil(count * bits / 8)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        packed = codes
    elif bits == 4:
        nibbles = np.zeros((rows, count + count % 2), dtype=np.uint8)
        nibbles[:, :count] = codes & 0x0F
        packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    else:
        stream = np.unpackbits(codes[..., None], axis=-1, count=bits, bitorder="little")
        packed = np.packbits(stream.reshape(rows, count * bits), axis=-1, bitorder="little")
    if packed.shape[1] == width:
        return packed
    out = np.zeros((rows, width), dtype=np.uint8)
    out[:, :packed.shape[1]] = packed
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: rows × ``count`` codes of ``bits`` bits, as
    uint8 (unsigned)."""
    packed = np.ascontiguousarray(packed).view(np.uint8)
    if bits == 8:
        return packed[:, :count]
    if bits == 4:
        values = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
        values[:, 0::2] = packed & 0x0F
        values[:, 1::2] = packed >> 4
        return values[:, :count]
    stream = np.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    codes: np.ndarray = (stream.reshape(packed.shape[0], count, bits) * weights).sum(
        axis=-1, dtype=np.uint8)
    return codes


def to_unsigned(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes of ``bits`` bits as their two's complement bit patterns (uint8)."""
    return (codes.view(np.uint8) & np.uint8((1 << bits) - 1)) if bits < 8 else codes.view(
        np.uint8)


def sign_extend(patterns: np.ndarray, bits: int) -> np.ndarray:
    """Two's complement patterns of ``bits`` bits (uint8) as int8 codes."""
    if bits == 8:
        return patterns.view(np.int8)
    sign = np.uint8(1 << (bits - 1))
    return ((patterns ^ sign).astype(np.int16) - int(sign)).astype(np.int8)


def offset_binary(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes plus 2^(bits−1), as uint8: how compressed-tensors packs them. (The
    sum modulo 256 of the codes' two's-complement bytes: one pass, no widening.)"""
    return codes.astype(np.int8, copy=False).view(np.uint8) + np.uint8(1 << (bits - 1))


def from_offset_binary(values: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`offset_binary`: int8 codes."""
    return (values.astype(np.uint8, copy=False) - np.uint8(1 << (bits - 1))).view(np.int8)


# ------------------------------------------------------------------------- reading


def read_packed_rows(reader: SafetensorsReader, entry: TensorEntry, start: int, stop: int,
                     bits: int, count: int) -> np.ndarray:
    """Rows [start, stop) of a tensor packed along its last axis (any dtype: the bytes of
    each row, in order), unpacked to ``count`` unsigned codes of ``bits`` bits each."""
    row_bytes = entry.shape[-1] * DTYPE_BITS[entry.dtype] // 8 if entry.shape else 0
    packed = np.empty((stop - start, row_bytes), dtype=np.uint8)
    reader.read_into(entry, start * row_bytes, packed)
    return unpack_bits(packed, bits, count)


def read_groups(reader: SafetensorsReader, weight: StoredWeight, start: int, stop: int,
                role: Role, as_float32: bool = True) -> np.ndarray | None:
    """A per-group tensor (scale, zero point, bias) of rows [start, stop) of ``weight``'s
    row view, as float32 (exact from float16, bfloat16, float32 and FP8) or as stored;
    one value per tensor is read whole, as shape (1, 1); for tiles, the rows of tiles
    that [start, stop) covers. None: the weight has no such tensor."""
    name = weight.tensor(role)
    if name is None:
        return None
    scheme = weight.scheme
    entry = reader.header[name]
    if scheme.granularity == "tensor":
        values = reader.read_tensor(entry).reshape(1, 1)
    else:
        groups = scheme.groups_per_row(weight.row_view[1])
        if scheme.tiles:
            height = scheme.row_multiple
            start, stop = start // height, -(-stop // height)
        values = np.empty((stop - start, groups), dtype=numpy_dtype(entry.dtype))
        reader.read_into(entry, start * groups * values.itemsize, values)
    return values.astype(np.float32) if as_float32 else values


def read_global_scale(reader: SafetensorsReader, weight: StoredWeight) -> float | None:
    """The weight's float32 global scale (NVFP4), if it has one."""
    name = weight.tensor("global_scale")
    if name is None:
        return None
    return float(reader.read_tensor(reader.header[name]).astype(np.float32).reshape(-1)[0])


def stored_label(scheme: Scheme, with_choices: bool = True) -> str:
    """How a weight is stored, for people: ``INT8 absmax block 128``, ``INT4 affine
    channel, mse clip``, ``FP8 block 128×128``, ``NVFP4``.

    >>> stored_label(Scheme("affine", "channel", bits=4))
    'INT4 affine channel, mse clip'
    """
    parts = [scheme.label]
    if not scheme.element.is_float:
        parts.append(scheme.method)
    if not scheme.info.microscaling:
        parts.append(scheme.where)
    return " ".join(parts) + (scheme.choices if with_choices else "")


def refuse(path: Path, tensor: str | None, rule: str) -> QuantizedFormatError:
    """The error for a stored weight that breaks its layout."""
    return QuantizedFormatError(located(path, tensor, rule))
