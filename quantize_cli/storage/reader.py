"""Reading safetensors files: the header, and tensor bytes in bounded pieces.

Reads use ``os.preadv`` into preallocated numpy buffers rather than mmap: a file that is
truncated while it is mapped kills the process with SIGBUS, whereas a short read is an
ordinary error here ("input changed while reading").
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import InputError, LayoutError, located
from .dtypes import numpy_dtype
from .header import Header, TensorEntry, parse_header, read_header_length

#: Default size of one read when streaming a tensor (bytes of the stored dtype).
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
#: Makes the array a read fills, from its shape and dtype (``np.empty``, or a pool's).
Allocator = Callable[[tuple[int, ...], np.dtype], np.ndarray]


class SafetensorsReader:
    """An open safetensors file. Use as a context manager.

    >>> with SafetensorsReader("model.safetensors") as reader:    # doctest: +SKIP
    ...     names = [entry.name for entry in reader.header.tensors]
    ...     weight = reader.read_tensor(reader.header["w"])
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = _open_regular_file(self.path)
        try:
            info = os.fstat(self._fd)
            self._identity = (info.st_size, info.st_mtime_ns)
            # The length, and a few bytes more to say what the file is if it is no
            # safetensors file.
            prefix = self._pread(min(info.st_size, 24), 0)
            length = read_header_length(prefix, info.st_size, self.path)
            header_bytes = self._pread(length, 8)
            self.header: Header = parse_header(header_bytes, info.st_size, self.path)
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise self._changed_error()
        return data

    def _changed_error(self) -> LayoutError:
        return LayoutError(
            located(self.path, None, "input changed while reading (it is shorter than its "
                    "header declares)")
        )

    def read_into(self, entry: TensorEntry, byte_offset: int, buffer: np.ndarray) -> None:
        """Fill ``buffer`` with ``buffer.nbytes`` bytes of ``entry`` from ``byte_offset``."""
        # A uint8 view: memoryview cannot export ml_dtypes' bfloat16.
        view = buffer.reshape(-1).view(np.uint8).data
        position = self.header.data_start + entry.begin + byte_offset
        if byte_offset + len(view) > entry.nbytes:
            raise ValueError("read past the end of the tensor")
        done = 0
        while done < len(view):
            try:
                count = os.preadv(self._fd, [view[done:]], position + done)
            except OSError as error:
                raise InputError(located(self.path, entry.name,
                                         f"cannot be read ({error.strerror})")) from None
            if count == 0:
                raise self._changed_error()
            done += count

    def read_prefix(self, length: int) -> bytes:
        """The first ``length`` bytes of the file (the header and what precedes it)."""
        return self._pread(length, 0)

    def read_tensor(self, entry: TensorEntry) -> np.ndarray:
        """The whole tensor as a numpy array of its own dtype (float or integer codes)."""
        array = np.empty(entry.shape, dtype=numpy_dtype(entry.dtype))
        self.read_into(entry, 0, array)
        return array

    @staticmethod
    def itemsize(entry: TensorEntry) -> int:
        """Bytes per element of a dtype qz computes on (float or integer)."""
        return numpy_dtype(entry.dtype).itemsize

    def read_rows(
        self, entry: TensorEntry, row_shape: tuple[int, int], start: int, stop: int,
        allocate: Allocator = np.empty,
    ) -> np.ndarray:
        """Rows [start, stop) of the tensor's 2-D ``row_shape`` view, in its stored dtype
        (in an array from ``allocate``, which takes a shape and a dtype)."""
        rows = allocate((stop - start, row_shape[1]), numpy_dtype(entry.dtype))
        self.read_into(entry, start * rows.itemsize * row_shape[1], rows)
        return rows

    def read_bytes(self, entry: TensorEntry, start: int, stop: int,
                   allocate: Allocator = np.empty) -> np.ndarray:
        """Bytes [start, stop) of the tensor's data, as uint8."""
        piece = allocate((stop - start,), np.dtype(np.uint8))
        self.read_into(entry, start, piece)
        return piece

    def iter_rows(
        self, entry: TensorEntry, row_shape: tuple[int, int], chunk_bytes: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, rows)`` of the tensor's 2-D ``row_shape`` view in chunks
        of at most ``chunk_bytes`` (at least one row), as arrays of the stored dtype."""
        row_bytes = row_shape[1] * self.itemsize(entry)
        for start, stop in row_ranges(row_shape[0], row_bytes, chunk_bytes):
            yield start, self.read_rows(entry, row_shape, start, stop)

    def iter_bytes(self, entry: TensorEntry, chunk_bytes: int) -> Iterator[np.ndarray]:
        """Yield the raw bytes of ``entry`` in pieces of at most ``chunk_bytes``."""
        for start, stop in row_ranges(entry.nbytes, 1, chunk_bytes):
            yield self.read_bytes(entry, start, stop)

    def check_unchanged(self) -> None:
        """Fail if the file's size or modification time changed since it was opened."""
        info = os.stat(self.path)
        if (info.st_size, info.st_mtime_ns) != self._identity:
            raise InputError(located(self.path, None, "input changed while reading"))


def _open_regular_file(path: Path) -> int:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(located(path, None, "does not exist")) from None
    except OSError as error:
        raise InputError(located(path, None, f"cannot be read ({error.strerror})")) from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(
            located(path, None, "is a directory, not a safetensors file"),
            hint="pass a folder with model.safetensors.index.json or a .safetensors file",
        )
    if not stat.S_ISREG(info.st_mode):
        raise InputError(located(path, None, "is not a regular file"))
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as error:
        raise InputError(located(path, None, f"cannot be read ({error.strerror})")) from None


def row_ranges(rows: int, row_bytes: int, chunk_bytes: int,
               multiple: int = 1) -> list[tuple[int, int]]:
    """Runs of rows of at most ``chunk_bytes`` each (at least ``multiple`` rows a run, and
    a multiple of it but for the last): how every job splits a tensor, whatever it reads
    or produces per row.

    >>> row_ranges(5, 40, 100), row_ranges(5, 40, 100, multiple=4)
    ([(0, 2), (2, 4), (4, 5)], [(0, 4), (4, 5)])
    """
    step = max(1, chunk_bytes // max(row_bytes, 1))
    step = max(multiple, step - step % multiple)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]
