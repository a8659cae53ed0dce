"""A small thread pool over tiles, and per-thread scratch buffers.

numpy releases the GIL inside its loops, so tiles processed on several threads run in
parallel. Scratch buffers are reused from tile to tile, so the hot loop allocates nothing.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

#: Values per tile: 256 Ki float32 (1 MiB). Smaller tiles fit the L2 cache better but
#: spend more of their time in Python, under the GIL, and stop scaling across threads
#: (measured with benchmarks/core_speed.py: 2^16 → 1.0× from a second thread, 2^18 → 1.8×).
TILE_ELEMENTS = 1 << 18

T = TypeVar("T")

_num_threads = 0
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_local = threading.local()


def _default_num_threads() -> int:
    configured = os.environ.get("QZ_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_num_threads(count: int) -> None:
    """Use ``count`` threads (default: the CPUs this process may use, or the
    ``QZ_NUM_THREADS`` environment variable)."""
    global _num_threads, _executor
    if count < 1:
        raise ValueError("count must be at least 1")
    with _lock:
        if _executor is not None:
            _executor.shutdown(wait=True)
            _executor = None
        _num_threads = count


def get_num_threads() -> int:
    global _num_threads
    if _num_threads == 0:
        _num_threads = _default_num_threads()
    return _num_threads


def tile_rows(columns: int) -> int:
    """Rows per tile for rows of ``columns`` values (at least one row)."""
    return max(1, TILE_ELEMENTS // max(columns, 1))


def map_tiles(work: Callable[[slice], T], rows: int, rows_per_tile: int) -> list[T]:
    """``work(tile)`` for every run of ``rows_per_tile`` rows, in order, on the pool."""
    tiles = [slice(start, min(start + rows_per_tile, rows))
             for start in range(0, rows, rows_per_tile)]
    threads = get_num_threads()
    if threads == 1 or len(tiles) <= 1:
        return [work(tile) for tile in tiles]
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qz")
        executor = _executor
    # A few batches per thread: little per-task overhead, still balanced.
    per_task = max(1, math.ceil(len(tiles) / (threads * 4)))
    batches = [tiles[i : i + per_task] for i in range(0, len(tiles), per_task)]
    results = executor.map(lambda batch: [work(tile) for tile in batch], batches)
    return [result for batch in results for result in batch]


def scratch(slot: int, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """This thread's reusable buffer number ``slot``, viewed with ``shape`` and ``dtype``
    (of at most 4 bytes an element)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    size = math.prod(shape)
    buffer = buffers.get(slot)
    if buffer is None or buffer.size < size:
        buffer = buffers[slot] = np.empty(max(size, TILE_ELEMENTS), dtype=np.float32)
    words = -(-size * np.dtype(dtype).itemsize // 4)
    return buffer[:words].view(dtype)[:size].reshape(shape)
