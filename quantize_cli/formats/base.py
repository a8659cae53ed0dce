"""What every on-disk format provides: the codec interface, and the records it shares
with the jobs.

A codec is the one place that knows how a format stores a quantized weight: which tensors
a weight becomes (names, dtypes and shapes from the header alone, so an output is planned
before any data is read), how a chunk of rows is encoded into them, what the format adds
to a file's metadata and to a model's config.json, how its quantized weights are found in
a header, and how their rows are read back as floats. The jobs (quantize, dequantize,
inspect, diff) call these and never branch on a format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from ..core.quantize import RowResult, quantize_rows
from ..core.scheme import Scheme
from ..core.search import PLAIN, Storage
from ..errors import QuantizedFormatError, located
from ..storage.dtypes import numpy_dtype
from ..storage.header import Header, TensorEntry
from ..storage.reader import SafetensorsReader
from ..storage.writer import PlannedTensor

#: What a stored tensor is to its quantized weight.
Role = Literal["codes", "scale", "zero_point", "bias", "shape"]

#: The stored rows of one quantized weight, by role, as :meth:`Codec.read_rows` reads them.
StoredRows = dict[Role, np.ndarray]


@dataclass(frozen=True)
class StoredTensor(PlannedTensor):
    """A tensor a format writes for a quantized weight, and what it is to that weight."""

    role: Role


@dataclass(frozen=True)
class StoredWeight:
    """A quantized weight found in a file: what it becomes again and how it is stored.

    ``name``, ``shape`` and ``dtype`` are the weight as the model knows it (the dtype it
    is restored to by default); ``tensors`` maps every stored tensor of the weight to its
    role.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    scheme: Scheme
    format: str
    tensors: tuple[tuple[str, Role], ...]
    description: str  # how it is stored, for people: "INT8 absmax block 128"

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


@dataclass(frozen=True)
class Deployment:
    """What an output will run on, as far as a format's rules depend on it: the number
    of GPUs each layer is split over (tensor parallelism) and the model's config.json."""

    tensor_parallel: int = 1
    config: dict[str, Any] | None = None


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight a job is about to quantize: its input tensor and its scheme."""

    entry: TensorEntry
    scheme: Scheme


class Codec(ABC):
    """One on-disk format. Subclasses are registered in ``formats/__init__.py``."""

    #: The ``--format`` value, and the word for the format everywhere.
    name: ClassVar[str]
    #: One line for ``--format``'s help.
    summary: ClassVar[str]
    #: What default output names say of the format, before the precision
    #: (``model.<suffix>int8.safetensors``).
    suffix: ClassVar[str]
    #: The scheme when none is asked for.
    default_scheme: ClassVar[Scheme] = Scheme()
    #: Whether the output is always a folder (the format is described in config.json).
    folder_output: ClassVar[bool] = False
    #: Whether the tensors of one checkpoint may have different schemes (--target-sqnr).
    mixed_schemes: ClassVar[bool] = True
    #: Whether the format's shape rules depend on tensor parallelism (served by vLLM).
    tensor_parallel: ClassVar[bool] = False
    #: Metadata keys that describe tensors one by one (too long for a metadata table).
    tensor_metadata_keys: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------------ writing

    def scheme(self, method: str | None = None, granularity: str | None = None,
               block_size: int | None = None, clip: str = "auto", bits: int = 8) -> Scheme:
        """The scheme asked for, with this format's defaults for what was not.

        >>> from quantize_cli.formats import codec_for
        >>> codec_for("mlx").scheme(block_size=32)
        Scheme(method='affine', granularity='block', block_size=32, clip='none', bits=8)
        """
        default = self.default_scheme
        chosen = granularity or ("block" if block_size is not None else default.granularity)
        if chosen == "block":
            block_size = block_size or default.block_size or Scheme().block_size
        return Scheme(method or default.method, chosen, block_size, clip, bits)  # type: ignore[arg-type]

    def output_suffix(self, scheme: Scheme, target_bits: float | None = None) -> str:
        """The suffix of default output names: ``int8``, ``ct-int4``, ``mlx-int8``, …, and
        ``4.5bit`` for the mixed schemes of ``--target-bits 4.5``."""
        if target_bits is not None:
            return f"{self.suffix}{target_bits:g}bit"
        return self.suffix + ("fp8" if scheme.method == "fp8" else f"int{scheme.bits}")

    def check_scheme(self, scheme: Scheme) -> None:  # noqa: B027 - most formats store any
        """Refuse, before any work, a scheme this format cannot store (SchemeError)."""

    def keep_reason(self, entry: TensorEntry, scheme: Scheme,
                    deployment: Deployment) -> str | None:
        """Why this tensor must stay in its dtype in this format (None: it can be
        quantized)."""
        return None

    @abstractmethod
    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        """The tensors a quantized ``entry`` becomes, from its header entry alone."""

    def storage(self, entry: TensorEntry, scheme: Scheme) -> Storage:
        """What this format stores of a group's parameters (their dtype, whether zero
        points are fractional and scales may be negative), which the search respects."""
        return PLAIN

    def row_multiple(self, scheme: Scheme) -> int:
        """Row chunks of a weight must hold a multiple of this many rows."""
        return scheme.row_multiple

    def quantize_rows(self, entry: TensorEntry, rows: np.ndarray, scheme: Scheme, *,
                      tensor_range: tuple[float, float] | None,
                      with_stats: bool) -> RowResult:
        """Quantize a chunk of rows of ``entry``'s row view the way this format rounds
        (by default, DESIGN §1, with what :meth:`storage` allows)."""
        return quantize_rows(rows, scheme, tensor_range=tensor_range, with_stats=with_stats,
                             storage=self.storage(entry, scheme))

    def produced_valid(self, result: RowResult, scheme: Scheme) -> bool:
        """Whether quantized numbers are what the format can hold, checked before they
        are written (DESIGN §6.4); by default finite, non-negative scales and codes in
        the scheme's range. Cheap: the small scale array and the codes' min and max."""
        scales_valid = bool(np.isfinite(result.scale).all() and (result.scale >= 0).all())
        if scheme.method == "fp8":  # codes are floats: the cast would have made NaN
            return scales_valid and not np.isnan(result.codes.astype(np.float32)).any()
        lowest, highest = scheme.code_range
        if result.codes.size == 0:
            return scales_valid
        low, high = result.code_bounds or (int(result.codes.min()), int(result.codes.max()))
        return scales_valid and low >= lowest and high <= highest

    @abstractmethod
    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        """What to append to which stored tensor for the rows starting at ``first_row``
        of the row view (chunks come in order, so per-tensor values go with row 0)."""

    @abstractmethod
    def shard_metadata(self, metadata: dict[str, str],
                       quantized: Sequence[QuantizedWeight]) -> dict[str, str]:
        """A shard's output ``__metadata__``, from its input's."""

    def model_config(self, config: dict[str, Any] | None, scheme: Scheme,
                     quantized: Sequence[QuantizedWeight],
                     kept: Sequence[TensorEntry]) -> dict[str, Any] | None:
        """The output model's config.json from the input's (None: there is none);
        ``scheme`` is the one asked for, ``quantized`` the weights with the schemes they
        got, ``kept`` the float tensors that stayed in their dtype."""
        return config

    # ------------------------------------------------------------------------ reading

    @abstractmethod
    def recognises(self, header: Header) -> bool:
        """Whether a file is in this format, from its header alone (cheap)."""

    @abstractmethod
    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        """The quantized weights of a file this codec recognises; ``config`` is the
        model's config.json, for formats that describe their weights there.

        Raises:
            QuantizedFormatError: the file breaks the format.
        """

    def version(self, header: Header) -> str | None:
        """The format version a file declares, if the format has versions."""
        return None

    @abstractmethod
    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> StoredRows:
        """The stored data of rows [start, stop) of ``weight``'s row view (I/O only)."""

    @abstractmethod
    def dequantize_rows(self, weight: StoredWeight, rows: StoredRows, dtype: npt.DTypeLike,
                        path: Path) -> np.ndarray:
        """Those rows as values of ``dtype``, refusing stored numbers the format cannot
        hold (QuantizedFormatError, naming ``path``).

        Raises:
            DtypeRangeError: a value does not fit ``dtype``.
        """

    def float_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """config.json of the dequantized model: without what this format added."""
        return {key: value for key, value in config.items() if key != "quantization_config"}

    def float_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """A shard's ``__metadata__`` once dequantized (qz's own keys are dropped by the
        job)."""
        return metadata


# ------------------------------------------------------- helpers for codecs' reading


def read_groups(reader: SafetensorsReader, weight: StoredWeight, start: int,
                stop: int, roles: tuple[Role, ...] = ("scale", "zero_point")) -> StoredRows:
    """The per-group tensors (scale, zero point) of rows [start, stop) of ``weight``'s
    row view: the scale as float32 (exact from float16, bfloat16 and float32), the zero
    point as stored; one value per tensor is read whole, as shape (1, 1); for tiles, the
    rows of tiles that [start, stop) covers."""
    scheme = weight.scheme
    groups = scheme.groups_per_row(weight.row_view[1])
    if scheme.tiles:
        height = scheme.row_multiple
        start, stop = start // height, -(-stop // height)
    found: StoredRows = {}
    for role in roles:
        name = weight.tensor(role)
        if name is None:
            continue
        entry = reader.header[name]
        if scheme.granularity == "tensor":
            values = reader.read_tensor(entry).reshape(1, 1)
        else:
            values = np.empty((stop - start, groups), dtype=numpy_dtype(entry.dtype))
            reader.read_into(entry, start * groups * values.itemsize, values)
        found[role] = values.astype(np.float32) if role == "scale" else values
    return found


def refuse_bad_scales(path: Path, weight: StoredWeight, scale: np.ndarray,
                      negative: bool = False) -> None:
    """Refuse stored scales qz could never have written (non-finite; negative unless the
    format allows them), rather than return wrong values."""
    if not (np.isfinite(scale).all() and (negative or (scale >= 0).all())):
        raise QuantizedFormatError(located(path, weight.tensor("scale"),
                                           "holds non-finite or negative scales"))


def pack_nibbles(codes: np.ndarray, row_bytes: int) -> np.ndarray:
    """4-bit values (the low nibble of each byte of ``codes``, rows × n) packed two to a
    byte, the first in the low nibble, each row padded with zeros to ``row_bytes``: the
    byte order of qz's 4-bit codes, of MLX's and of compressed-tensors' little-endian words.

    >>> pack_nibbles(np.array([[1, 2, 15]], np.uint8), 2).tolist()
    [[33, 15]]
    """
    rows, count = codes.shape
    nibbles = np.zeros((rows, row_bytes * 2), dtype=np.uint8)
    nibbles[:, :count] = codes.astype(np.uint8) & 0x0F
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """The inverse of :func:`pack_nibbles`: rows × ``count`` values in 0..15, as uint8."""
    values = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    values[:, 0::2] = packed & 0x0F
    values[:, 1::2] = packed >> 4
    return values[:, :count]
