"""Streaming reads: read-ahead that never needs the caller in lockstep, tensors that can be
read as often as needed, and the input's hash taken from those reads."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import write_safetensors
from quantize_cli.storage.reader import SafetensorsReader
from quantize_cli.storage.stream import ReadAhead, ShardStream, StreamHasher


def counting(log: list[str], name: str, value: int):  # type: ignore[no-untyped-def]
    def read() -> int:
        log.append(name)
        return value
    return read


def test_read_ahead_in_plan_order() -> None:
    log: list[str] = []
    plan = [(key, counting(log, key, index)) for index, key in enumerate("abc")]
    with ReadAhead(plan) as reads:
        assert [reads.take(key, counting(log, "direct", -1)) for key in "abc"] == [0, 1, 2]
    assert log == ["a", "b", "c"]


def test_read_ahead_rereads_and_skips_without_lockstep() -> None:
    log: list[str] = []
    plan = [(key, counting(log, key, index)) for index, key in enumerate("abcd")]
    with ReadAhead(plan) as reads:
        assert reads.take("a", counting(log, "a again", 10)) == 0
        assert reads.take("a", counting(log, "a again", 10)) == 10  # a second pass: read again
        assert reads.take("c", counting(log, "c direct", 12)) == 2  # b is dropped
        assert reads.take("zzz", counting(log, "unplanned", 99)) == 99
        assert reads.take("d", counting(log, "d direct", 13)) == 3
    assert "a again" in log and "unplanned" in log and "c direct" not in log


def test_read_ahead_raises_an_error_where_its_item_is_taken() -> None:
    def broken() -> int:
        raise OSError("disk on fire")

    with ReadAhead([("a", lambda: 1), ("b", broken), ("c", lambda: 3)]) as reads:
        assert reads.take("a", lambda: -1) == 1
        with pytest.raises(OSError, match="disk on fire"):
            reads.take("b", lambda: -1)
        assert reads.take("c", lambda: 30) == 30  # the thread stopped: read on the spot


def test_read_ahead_reads_at_most_one_item_ahead() -> None:
    started = threading.Event()
    log: list[str] = []

    def read(key: str) -> str:
        log.append(key)
        started.set()
        return key

    with ReadAhead([(key, lambda key=key: read(key)) for key in "abcd"]) as reads:
        started.wait(5)
        assert reads.take("a", lambda: "") == "a"
        threading.Event().wait(0.2)  # give the thread time to run further if it would
        assert log == ["a", "b"]


def model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return write_safetensors(tmp_path / "m.safetensors", {
        "a": rng.standard_normal((10, 6)).astype(np.float32),
        "b": np.arange(7, dtype=np.int64),
        "c": rng.standard_normal((3, 4)).astype(np.float32)})


def test_shard_stream_chunks_rereads_and_hash(tmp_path: Path) -> None:
    path = model(tmp_path)
    with SafetensorsReader(path) as reader:
        a, b, c = (reader.header[name] for name in "abc")
        hasher = StreamHasher(reader)
        layout = [(a, (10, 6), 1), (b, None, 1), (c, (3, 4), 1)]
        with ShardStream(reader, layout, chunk_bytes=48, hasher=hasher) as stream:
            chunks = stream.rows(a, (10, 6))
            first = list(chunks.with_rows())
            assert [(start, rows.shape) for start, rows in first] == [
                (0, (2, 6)), (2, (2, 6)), (4, (2, 6)), (6, (2, 6)), (8, (2, 6))]
            again = np.concatenate(list(chunks))  # a second pass reads again
            assert np.array_equal(again, reader.read_tensor(a).reshape(10, 6))
            assert b"".join(p.tobytes() for p in stream.pieces(b)) == reader.read_tensor(
                b).tobytes()
            whole = stream.rows(c, (3, 4))
            assert len(whole.ranges) == 1
            assert next(iter(whole)) is next(iter(whole))  # one chunk: kept, not re-read
        assert hasher.digest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_hash_falls_back_to_reading_the_file_when_data_was_skipped(tmp_path: Path) -> None:
    path = model(tmp_path)
    with SafetensorsReader(path) as reader:
        hasher = StreamHasher(reader)
        c = reader.header["c"]
        hasher.offer(reader.header.data_start + c.begin, reader.read_tensor(c))  # a gap
        assert hasher.digest() == hashlib.sha256(path.read_bytes()).hexdigest()
