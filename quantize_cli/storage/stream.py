"""Streaming a shard's data to a job: reads one step ahead on a background thread, tensors
that can be read as often as a job needs, and the input's SHA-256 taken from the same
reads.

A job declares the reads it expects to make, in file order (:class:`ReadAhead`); while
it works on one piece the next one is read, across tensor boundaries too, so reading
overlaps with computing. Nothing depends on the job pulling exactly what it declared: a
piece asked for out of turn (a second pass over a tensor, a skipped tensor) is read on
the spot, and the hash falls back to reading the file when it did not see every byte in
order.
"""

from __future__ import annotations

import hashlib
import math
import queue
import sys
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

from ..errors import InputError, located
from .header import TensorEntry
from .reader import SafetensorsReader, row_ranges

T = TypeVar("T")

_FINISHED = object()


class ReadAhead(Generic[T]):
    """Runs a planned sequence of reads one step ahead, on a background thread.

    ``plan`` lists ``(key, read)`` pairs in the order the caller expects to need them.
    ``take(key, read)`` returns what ``read()`` returns: from the background thread when
    ``key`` is planned and not yet taken (planned reads before it are dropped), otherwise
    by calling ``read`` on the spot. At most one planned read runs ahead of the caller;
    an exception in a planned read is raised by the ``take`` of its key. Use as a context
    manager, so the thread stops when the caller is done.

    >>> with ReadAhead([("a", lambda: 1), ("b", lambda: 2)]) as reads:
    ...     reads.take("a", lambda: 1), reads.take("a", lambda: 10), reads.take("b", lambda: 2)
    (1, 10, 2)
    """

    def __init__(self, plan: Sequence[tuple[Hashable, Callable[[], T]]]) -> None:
        self._position = {key: index for index, (key, _) in reversed(list(enumerate(plan)))}
        self._next = 0  # the index of the next planned read the caller has not taken
        self._finished = len(plan) == 0
        self._ready: queue.Queue[tuple[int, bool, object]] = queue.Queue()
        self._may_read = threading.Semaphore(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(plan,), name="qz-reader",
                                        daemon=True)
        self._thread.start()

    def _produce(self, plan: Sequence[tuple[Hashable, Callable[[], T]]]) -> None:
        for index, (_, read) in enumerate(plan):
            if index and not self._wait_for_turn():
                return
            try:
                self._ready.put((index, True, read()))
            except BaseException as error:  # handed to the caller by take()
                self._ready.put((index, False, error))
                return
        self._ready.put((len(plan), False, _FINISHED))

    def _wait_for_turn(self) -> bool:
        while not self._may_read.acquire(timeout=0.1):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def take(self, key: Hashable, read: Callable[[], T]) -> T:
        index = self._position.get(key)
        if index is None or index < self._next or self._finished:
            return read()
        while True:
            produced, ok, value = self._ready.get()
            self._next = produced + 1
            if value is _FINISHED or (not ok and produced < index):
                self._finished = True  # the background thread has stopped
                return read()
            self._may_read.release()
            if produced == index:
                if not ok:
                    self._finished = True
                    raise value  # type: ignore[misc]
                return value  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class StreamHasher:
    """The SHA-256 of a safetensors file, fed with the data a job reads anyway, on a
    thread of its own so that hashing overlaps with reading and computing.

    Pieces are offered with their position in the file: the next piece in file order is
    hashed, a piece already hashed (a second pass) is ignored, and a gap means the job
    left part of the file unread, in which case :meth:`digest` reads the whole file
    itself. At most one piece waits for the hash thread.

    >>> with SafetensorsReader("model.safetensors") as reader:   # doctest: +SKIP
    ...     hasher = StreamHasher(reader)
    ...     entry = reader.header.tensors[0]
    ...     hasher.offer(reader.header.data_start + entry.begin, reader.read_tensor(entry))
    ...     print(hasher.digest())
    """

    def __init__(self, reader: SafetensorsReader) -> None:
        self.path = reader.path
        self._hash = hashlib.sha256(reader.read_prefix(reader.header.data_start))
        self._position = reader.header.data_start
        self._size = reader.header.file_size
        self._in_order = True
        self._lock = threading.Lock()
        self._pending: queue.Queue[memoryview | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="qz-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._pending.get()) is not None:
            self._hash.update(piece)  # releases the GIL on large pieces

    def offer(self, position: int, piece: np.ndarray) -> None:
        """Hash ``piece`` if it is the next part of the file (``position``: its offset)."""
        data = np.ascontiguousarray(piece).reshape(-1).view(np.uint8).data
        with self._lock:
            if position + data.nbytes <= self._position:
                return  # read before: already hashed
            if position != self._position:
                self._in_order = False
                return
            self._position += data.nbytes
            self._pending.put(data)

    def close(self) -> None:
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()

    def digest(self) -> str:
        self.close()
        if self._in_order and self._position == self._size:
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


class BufferPool:
    """Arrays for reads, reused once nothing refers to them any more.

    A chunk read into a fresh array costs the kernel a page fault and a zeroed page for
    every page of it before the copy (measured: reading a 1.5 GB checkpoint from the page
    cache took 1.6 s of system time into fresh 64 MB arrays); a few reused buffers cost
    that once. A buffer is free when no array, view or memoryview refers to it (its
    reference count): the chunk being computed on, the one read ahead, one waiting to be
    hashed, and a tensor kept whole each hold theirs.
    """

    def __init__(self, capacity: int, keep: int = 4) -> None:
        self.capacity = capacity
        self.keep = keep
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` (a ``np.empty``)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.capacity or nbytes < self.capacity // 8:
            return np.empty(shape, dtype)  # an odd size: a pool buffer would be wasted
        with self._lock:
            free = None
            for buffer in self._buffers:
                # Free: referred to by the list, this loop and getrefcount's argument.
                if sys.getrefcount(buffer) <= 3:
                    free = buffer
                    break
            if free is None:
                free = np.empty(self.capacity, np.uint8)
                if len(self._buffers) < self.keep:
                    self._buffers.append(free)
        return free[:nbytes].view(dtype).reshape(shape)


class TensorChunks:
    """The rows of one tensor's 2-D row view, in chunks of at most ``chunk_bytes``;
    iterate as often as needed. The first pass comes from the shard's read-ahead when the
    job planned it; later passes read again, except for a tensor of one chunk, which is
    kept (it is no larger than one chunk, the memory bound anyway)."""

    def __init__(self, stream: ShardStream, entry: TensorEntry, row_shape: tuple[int, int],
                 multiple: int = 1) -> None:
        self.entry = entry
        self.path = stream.reader.path
        self.row_shape = row_shape
        self.ranges = stream.row_ranges(entry, row_shape, multiple)
        self._stream = stream
        self._kept: np.ndarray | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, chunk in self.with_rows():
            yield chunk

    def with_rows(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, rows)`` for every chunk, in order."""
        if self._kept is not None:
            yield 0, self._kept
            return
        for start, stop in self.ranges:
            chunk = self._stream.take_rows(self.entry, self.row_shape, start, stop)
            if len(self.ranges) == 1:
                self._kept = chunk
            yield start, chunk


class ShardStream:
    """The reads a job makes on one shard: row chunks of tensors it computes on and raw
    pieces of tensors it copies, read one step ahead in file order, and hashed on the way
    when a ``hasher`` is given.

    ``layout`` lists the tensors the job will read, in file order, each with the 2-D row
    view it reads them in (None: raw bytes) and the multiple of rows its chunks hold.
    """

    def __init__(
        self,
        reader: SafetensorsReader,
        layout: Sequence[tuple[TensorEntry, tuple[int, int] | None, int]],
        chunk_bytes: int,
        hasher: StreamHasher | None = None,
    ) -> None:
        self.reader = reader
        self.chunk_bytes = chunk_bytes
        self._hasher = hasher
        self._buffers = BufferPool(chunk_bytes)
        plan: list[tuple[Hashable, Callable[[], np.ndarray]]] = []
        for entry, row_shape, multiple in layout:
            if row_shape is None:
                plan += [((entry.name, "bytes", start),
                          self._bytes_reader(entry, start, stop))
                         for start, stop in row_ranges(entry.nbytes, 1, chunk_bytes)]
            else:
                plan += [((entry.name, row_shape, start),
                          self._rows_reader(entry, row_shape, start, stop))
                         for start, stop in self.row_ranges(entry, row_shape, multiple)]
        self._reads: ReadAhead[np.ndarray] = ReadAhead(plan)

    def row_ranges(self, entry: TensorEntry, row_shape: tuple[int, int],
                   multiple: int = 1) -> list[tuple[int, int]]:
        return row_ranges(row_shape[0], row_shape[1] * self.reader.itemsize(entry),
                          self.chunk_bytes, multiple)

    def rows(self, entry: TensorEntry, row_shape: tuple[int, int],
             multiple: int = 1) -> TensorChunks:
        """The tensor's row chunks, as often as they are iterated."""
        return TensorChunks(self, entry, row_shape, multiple)

    def pieces(self, entry: TensorEntry) -> Iterator[np.ndarray]:
        """The tensor's raw bytes, in pieces of at most ``chunk_bytes``."""
        for start, stop in row_ranges(entry.nbytes, 1, self.chunk_bytes):
            yield self._reads.take((entry.name, "bytes", start),
                                   self._bytes_reader(entry, start, stop))

    def take_rows(self, entry: TensorEntry, row_shape: tuple[int, int], start: int,
                  stop: int) -> np.ndarray:
        return self._reads.take((entry.name, row_shape, start),
                                self._rows_reader(entry, row_shape, start, stop))

    def _rows_reader(self, entry: TensorEntry, row_shape: tuple[int, int], start: int,
                     stop: int) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            rows = self.reader.read_rows(entry, row_shape, start, stop,
                                         self._buffers.allocate)
            self._offer(entry, start * rows.itemsize * row_shape[1], rows)
            return rows

        return read

    def _bytes_reader(self, entry: TensorEntry, start: int, stop: int) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            piece = self.reader.read_bytes(entry, start, stop, self._buffers.allocate)
            self._offer(entry, start, piece)
            return piece

        return read

    def _offer(self, entry: TensorEntry, offset: int, data: np.ndarray) -> None:
        if self._hasher is not None:
            self._hasher.offer(self.reader.header.data_start + entry.begin + offset, data)

    def close(self) -> None:
        self._reads.close()

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
