"""The safetensors header: strict parsing of untrusted bytes, and building for writing.

Format (safetensors README, "Format"): 8 bytes little-endian u64 N, then N bytes of UTF-8
JSON mapping tensor names to ``{"dtype", "shape", "data_offsets"}`` plus an optional
``__metadata__`` string-to-string map, then the data section, which the tensors must cover
exactly, without holes or overlaps.

qz is deliberately stricter than the reference parser in a few places, each because the
lenient reading would silently drop or change meaning: duplicate keys at any level are
refused (Python's json keeps the last one), unknown per-tensor fields are refused (a future
field such as strides could change how the bytes read), and lone surrogates in names are
refused. Everything else the reference accepts, qz accepts.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HeaderError, LayoutError, located
from .dtypes import DTYPE_BITS
from .jsonfile import loads_strict

#: The reference's cap on the JSON header (safetensors ``MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000
#: The JSON schema's bound for shape entries and offsets (size_t ≤ 2^48 - 1 in practice).
MAX_DIMENSION = 2**48 - 1
METADATA_KEY = "__metadata__"
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header: metadata, tensors in data order, and where the data starts."""

    metadata: dict[str, str]
    tensors: tuple[TensorEntry, ...]
    data_start: int
    _by_name: dict[str, TensorEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {entry.name: entry for entry in self.tensors})

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> TensorEntry:
        return self._by_name[name]

    @property
    def data_size(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_size


def read_header_length(prefix: bytes, file_size: int, path: str | Path) -> int:
    """Validate the 8-byte length prefix against the file size; return N."""
    if file_size < 8:
        raise HeaderError(
            located(path, None, f"file too short for a safetensors header ({file_size} bytes)"),
            hint="a safetensors file starts with an 8-byte header length",
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    plausible = length <= MAX_HEADER_BYTES and 8 + length <= file_size
    # A header length can start like a pickle (0x0280 bytes is b"\x80\x02"): another
    # format only when the bytes cannot be a safetensors header.
    known = None if plausible and prefix[8:9] == b"{" else other_format(prefix)
    if known is not None:
        what, hint = known
        raise HeaderError(located(path, None, f"is {what}, not a safetensors file"), hint=hint)
    if not plausible and prefix[8:9] != b"{":
        # Not a damaged safetensors file but something else (vocab.txt, a .bin, a pointer
        # file): say what it looks like rather than quote a nonsense header length.
        raise HeaderError(
            located(path, None, f"is not a safetensors file: it starts with "
                    f"{_looks_like(prefix)}, where a safetensors file has an 8-byte header "
                    "length and then a JSON header"),
            hint=_pointer_hint(prefix) or "qz reads .safetensors files, a sharded "
            "checkpoint's model.safetensors.index.json, or a model folder holding either",
        )
    if length == 0:
        raise HeaderError(located(path, None, "header is empty, expected a JSON object"))
    if length > MAX_HEADER_BYTES:
        raise HeaderError(
            located(path, None, f"header too large ({length:,} bytes; the limit is "
                    f"{MAX_HEADER_BYTES:,})"),
            hint=_pointer_hint(prefix),
        )
    if 8 + length > file_size:
        raise HeaderError(
            located(path, None, f"header length {length:,} exceeds the file size "
                    f"({file_size:,} bytes)"),
            hint=_pointer_hint(prefix) or "the file may be truncated",
        )
    return int(length)


def _looks_like(prefix: bytes) -> str:
    """The start of a file, for an error message: as text when it is text.

    >>> _looks_like(b"[PAD] [UNK] [CLS] [SEP]"), _looks_like(bytes(range(200, 216)))
    ("the text '[PAD] [UNK] [CLS'", 'the bytes c8 c9 ca cb cc cd ce cf')
    """
    start = prefix[:16]
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError:
        return f"the bytes {start[:8].hex(' ')}"
    if all(char.isprintable() or char in "\n\r\t" for char in text):
        return f"the text {text!r}"
    return f"the bytes {start[:8].hex(' ')}"


#: What to do with weights in a format qz does not read.
TO_SAFETENSORS = ("qz reads safetensors: load the model with transformers and "
                  "save_pretrained() it, which writes safetensors")
#: Files of other weight formats by how they start: what they are, and what to do.
OTHER_FORMATS: tuple[tuple[bytes, str, str], ...] = (
    (b"PK\x03\x04", "a PyTorch checkpoint (a zip archive, as torch.save writes)", TO_SAFETENSORS),
    *((b"\x80" + bytes([protocol]), "a PyTorch checkpoint (a Python pickle)", TO_SAFETENSORS)
      for protocol in range(2, 6)),
    (b"GGUF", "a GGUF file (llama.cpp's format)",
     "qz reads safetensors, the checkpoints GGUF files are converted from; gguf-py reads "
     "GGUF"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a Keras or TensorFlow checkpoint)", TO_SAFETENSORS),
)


def other_format(prefix: bytes) -> tuple[str, str] | None:
    """What a file that starts with ``prefix`` is, when it is weights in a format qz does
    not read, and what to do instead.

    >>> other_format(b"GGUF and what follows")[0]
    "a GGUF file (llama.cpp's format)"
    """
    for magic, what, hint in OTHER_FORMATS:
        if prefix.startswith(magic):
            return what, hint
    return None


def _pointer_hint(prefix: bytes) -> str | None:
    if prefix.startswith(b"version "):
        return "this looks like a Git LFS pointer file, not the weights: run `git lfs pull`"
    return None


def parse_header(header_bytes: bytes, file_size: int, path: str | Path) -> Header:
    """Parse and validate a header (the N bytes after the length prefix).

    Raises:
        HeaderError: not UTF-8, not JSON, wrong structure, bad fields, duplicates.
        LayoutError: the data offsets do not tile the data section exactly.
    """
    raw = _decode_json(header_bytes, path)
    if not isinstance(raw, dict):
        raise HeaderError(located(path, None, "header must be a JSON object"))
    metadata = _parse_metadata(raw.pop(METADATA_KEY, {}), path)
    entries = [_parse_entry(name, value, path) for name, value in raw.items()]
    data_start = 8 + len(header_bytes)
    entries.sort(key=lambda entry: (entry.begin, entry.end))
    _check_layout(entries, file_size - data_start, path)
    return Header(metadata=metadata, tensors=tuple(entries), data_start=data_start)


def _decode_json(header_bytes: bytes, path: str | Path) -> Any:
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HeaderError(
            located(path, None, f"header is not valid UTF-8 (byte {error.start})")
        ) from None
    if not text.lstrip(" \t\r\n").startswith("{"):
        raise HeaderError(
            located(path, None, "header must be a JSON object starting with '{'"),
            hint=_pointer_hint(header_bytes),
        )

    return loads_strict(text, "header", lambda rule: HeaderError(located(path, None, rule)))


def _parse_metadata(value: Any, path: str | Path) -> dict[str, str]:
    if not isinstance(value, dict):
        raise HeaderError(located(path, None, "__metadata__ must be an object of strings"))
    for key, item in value.items():
        _check_text(key, path, "metadata key")
        if not isinstance(item, str):
            raise HeaderError(
                located(path, None, f"metadata value for {key!r} must be a string, "
                        f"got {type(item).__name__}")
            )
        _check_text(item, path, f"metadata value for {key!r}")
    return dict(value)


def _check_text(text: str, path: str | Path, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError(
            located(path, None, f"{what} {text!r} is not valid Unicode (lone surrogate)")
        ) from None


def _parse_entry(name: str, value: Any, path: str | Path) -> TensorEntry:
    _check_text(name, path, "tensor name")
    if not isinstance(value, dict):
        raise HeaderError(
            located(path, name, "entry must be an object with dtype, shape and data_offsets")
        )
    missing = _TENSOR_FIELDS - value.keys()
    if missing:
        raise HeaderError(located(path, name, f"entry lacks {', '.join(sorted(missing))}"))
    unknown = value.keys() - _TENSOR_FIELDS
    if unknown:
        raise HeaderError(
            located(path, name, f"entry has unknown field(s) {', '.join(sorted(unknown))}"),
            hint="qz refuses fields it does not understand rather than ignore their meaning",
        )
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(located(path, name, f"unknown dtype {dtype!r}"))
    shape = value["shape"]
    if not isinstance(shape, list) or not all(
        _is_integer(dim) and 0 <= dim < 2**64 for dim in shape  # the reference's usize
    ):
        raise HeaderError(located(path, name, "shape must be a list of non-negative integers"))
    if not _small_enough(shape):
        raise HeaderError(located(path, name, f"shape {shape} is too large"))
    offsets = value["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_size(offset) for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise HeaderError(
            located(path, name, "data_offsets must be [begin, end] with 0 ≤ begin ≤ end")
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _is_integer(value: Any) -> bool:
    # type() rather than isinstance(): JSON true would otherwise pass as the integer 1.
    return type(value) is int


def _small_enough(shape: list[int]) -> bool:
    """The element count fits the schema's size_t bound; stops early, so a hostile shape
    of many huge entries costs no big-integer arithmetic."""
    count = 1
    for dim in shape:
        if dim == 0:
            return True
    for dim in shape:
        count *= dim
        if count > MAX_DIMENSION:
            return False
    return True


def _is_size(value: Any) -> bool:
    return _is_integer(value) and 0 <= value <= MAX_DIMENSION


def _check_layout(entries: list[TensorEntry], data_size: int, path: str | Path) -> None:
    position = 0
    for entry in entries:
        bits = entry.numel * DTYPE_BITS[entry.dtype]
        if bits % 8:
            raise LayoutError(
                located(path, entry.name, f"{entry.dtype} {list(entry.shape)} is not a whole "
                        "number of bytes")
            )
        if bits // 8 != entry.nbytes:
            raise LayoutError(
                located(path, entry.name, f"declares {bits // 8:,} bytes ({entry.dtype} "
                        f"{list(entry.shape)}) but its data_offsets span {entry.nbytes:,}")
            )
        if entry.begin < position:
            raise LayoutError(
                located(path, entry.name, f"overlaps the previous tensor at byte {entry.begin:,}"
                        " of the data section")
            )
        if entry.begin > position:
            raise LayoutError(
                located(path, None, f"bytes {position:,}–{entry.begin:,} of the data section "
                        "belong to no tensor")
            )
        position = entry.end
    if position > data_size:
        last = entries[-1]
        raise LayoutError(
            located(path, last.name, f"ends at byte {position:,}, past the end of the data "
                    f"section ({data_size:,} bytes); the file is truncated"),
            hint="re-download or re-copy the file",
        )
    if position < data_size:
        raise LayoutError(
            located(path, None, f"{data_size - position:,} unexpected bytes after the last "
                    "tensor")
        )


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (length prefix included) and data offsets for tensors in this order.

    The JSON is compact, with ``__metadata__`` first and tensors in data order, and it is
    padded with spaces so that the data section starts on an 8-byte boundary.

    >>> prefix, offsets = build_header([("w", "F32", (2,))], {})
    >>> int.from_bytes(prefix[:8], "little"), prefix[8:], offsets
    (56, b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  ', [(0, 8)])
    """
    offsets = []
    document: dict[str, Any] = {}
    if metadata:
        document[METADATA_KEY] = dict(sorted(metadata.items()))
    position = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        offsets.append((position, position + nbytes))
        document[name] = {"dtype": dtype, "shape": list(shape),
                          "data_offsets": [position, position + nbytes]}
        position += nbytes
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets
