"""Reading safetensors files: the header, and tensor bytes in bounded pieces.

Reads use ``os.preadv`` into preallocated numpy buffers rather than mmap: a file that is
truncated while it is mapped kills the process with SIGBUS, whereas a short read is an
ordinary error here ("input changed while reading").
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..errors import InputError, LayoutError, located
from .dtypes import numpy_dtype
from .header import Header, TensorEntry, parse_header, read_header_length

#: Default size of one read when streaming a tensor (bytes of the stored dtype).
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024

T = TypeVar("T")


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
            prefix = self._pread(min(info.st_size, 8), 0)
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
        view = memoryview(buffer.reshape(-1).view(np.uint8))
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

    def read_tensor(self, entry: TensorEntry) -> np.ndarray:
        """The whole tensor as a numpy array of its own dtype (float or integer codes)."""
        array = np.empty(entry.shape, dtype=numpy_dtype(entry.dtype))
        self.read_into(entry, 0, array)
        return array

    def iter_rows(
        self, entry: TensorEntry, row_shape: tuple[int, int], chunk_bytes: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, rows)`` of the tensor's 2-D ``row_shape`` view, in the
        chunks of :func:`row_chunks`, as arrays of the stored dtype."""
        dtype = numpy_dtype(entry.dtype)
        columns = row_shape[1]
        for start, stop in row_chunks(entry, row_shape, chunk_bytes):
            chunk = np.empty((stop - start, columns), dtype=dtype)
            self.read_into(entry, start * columns * dtype.itemsize, chunk)
            yield start, chunk

    def iter_bytes(self, entry: TensorEntry, chunk_bytes: int) -> Iterator[np.ndarray]:
        """Yield the raw bytes of ``entry`` in the pieces of :func:`byte_chunks`."""
        for start, stop in byte_chunks(entry, chunk_bytes):
            piece = np.empty(stop - start, dtype=np.uint8)
            self.read_into(entry, start, piece)
            yield piece

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


def row_chunks(
    entry: TensorEntry, row_shape: tuple[int, int], chunk_bytes: int
) -> list[tuple[int, int]]:
    """Row ranges of at most ``chunk_bytes`` of stored data each (at least one row)."""
    rows, columns = row_shape
    row_bytes = max(columns * numpy_dtype(entry.dtype).itemsize, 1)
    step = max(1, chunk_bytes // row_bytes)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def byte_chunks(entry: TensorEntry, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of at most ``chunk_bytes`` covering the tensor."""
    return [(start, min(entry.nbytes, start + chunk_bytes))
            for start in range(0, entry.nbytes, chunk_bytes)]


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """Yield the items of ``items``, reading the next one in a background thread while
    the caller works on the current one (file reads release the GIL), so that reading
    overlaps with computing. At most one item is read ahead; an exception in the reader
    is raised in the caller at the point where that item would have been yielded.
    """
    ready: queue.Queue[tuple[bool, object]] = queue.Queue()
    may_read = threading.Semaphore(0)  # the first item is read at once, later ones on a take
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                ready.put((True, item))
                while not may_read.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
            ready.put((False, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            ready.put((False, error))

    worker = threading.Thread(target=produce, name="qz-reader", daemon=True)
    worker.start()
    try:
        while True:
            has_item, item = ready.get()
            if not has_item:
                if item is not None:
                    raise item  # type: ignore[misc]
                return
            may_read.release()
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()


class StreamHasher:
    """The SHA-256 of a safetensors file, fed with the data as a job reads it in file
    order (so the file is not read a second time), and computed on a thread of its own so
    that hashing overlaps with reading and computing; ``digest()`` falls back to reading
    the file if the job did not see every byte in order. At most one piece waits.

    >>> with SafetensorsReader("model.safetensors") as reader:   # doctest: +SKIP
    ...     hasher = StreamHasher(reader)
    ...     for piece in reader.iter_bytes(reader.header.tensors[0], 1 << 20):
    ...         hasher.update(piece)
    ...     print(hasher.digest())
    """

    def __init__(self, reader: SafetensorsReader) -> None:
        self.path = reader.path
        self._hash = hashlib.sha256(reader._pread(reader.header.data_start, 0))
        self._position = reader.header.data_start
        self._size = reader.header.file_size
        self._pending: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="qz-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._pending.get()) is not None:
            self._hash.update(piece)  # releases the GIL on large pieces

    def update(self, piece: np.ndarray) -> None:
        data = piece.reshape(-1).view(np.uint8)
        self._position += data.nbytes
        self._pending.put(data)

    def close(self) -> None:
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()

    def digest(self) -> str:
        self.close()
        if self._position == self._size:
            return self._hash.hexdigest()
        whole = hashlib.sha256()
        try:
            with open(self.path, "rb", buffering=0) as handle:
                while piece := handle.read(8 * 1024 * 1024):
                    whole.update(piece)
        except OSError as error:
            raise InputError(located(self.path, None,
                                     f"cannot be read ({error.strerror})")) from None
        return whole.hexdigest()
