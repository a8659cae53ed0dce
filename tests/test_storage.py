"""The safetensors layer: strict header parsing, chunked reading, streaming atomic writes."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import raw_safetensors, read_with_safetensors, safetensors_bytes, to_array
from quantize_cli.errors import HeaderError, InputError, LayoutError, OutputError
from quantize_cli.storage.header import build_header
from quantize_cli.storage.reader import SafetensorsReader
from quantize_cli.storage.writer import PlannedTensor, SafetensorsWriter, data_order


def open_bytes(tmp_path: Path, data: bytes) -> SafetensorsReader:
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    return SafetensorsReader(path)


def header_file(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(
    "data,error,fragment",
    [
        (b"", HeaderError, "file too short for a safetensors header (0 bytes)"),
        (b"\x05\x00\x00", HeaderError, "file too short"),
        (struct.pack("<Q", 1000) + b"{}", HeaderError, "header length 1,000 exceeds the file size"),
        (struct.pack("<Q", 2**40) + b"{}", HeaderError, "header too large"),
        (struct.pack("<Q", 0), HeaderError, "header is empty"),
        (header_file(b"\xff\xfe{}"), HeaderError, "not valid UTF-8 (byte 0)"),
        (header_file(b"\xef\xbb\xbf{}"), HeaderError, "must be a JSON object starting with '{'"),
        (header_file(b"{not json}"), HeaderError, "not valid JSON"),
        (header_file(b"[1,2,3]"), HeaderError, "must be a JSON object"),
        (header_file(b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}'),
         HeaderError, "NaN is not JSON"),
        (header_file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                     b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
         HeaderError, "duplicate key 'a'"),
        (header_file(b'{"__metadata__":{"k":1}}'), HeaderError, "must be a string"),
        (header_file(b'{"a":{"dtype":"F128","shape":[],"data_offsets":[0,0]}}'),
         HeaderError, "unknown dtype 'F128'"),
        (header_file(b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\0" * 4),
         HeaderError, "shape must be a list of non-negative integers"),
        (header_file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', b"\0" * 4),
         HeaderError, "data_offsets must be [begin, end]"),
        (header_file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"foo":1}}',
                     b"\0" * 4), HeaderError, "unknown field(s) foo"),
        (header_file(b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8),
         LayoutError, "declares 12 bytes (F32 [3]) but its data_offsets span 8"),
        (header_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                     b'"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
         LayoutError, "overlaps"),
        (header_file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
         LayoutError, "bytes 0–4 of the data section belong to no tensor"),
        (header_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 10),
         LayoutError, "2 unexpected bytes after the last tensor"),
        (header_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 5),
         LayoutError, "past the end of the data section (5 bytes); the file is truncated"),
        (header_file(b'{"a":{"dtype":"F32","shape":[2,281474976710655],'
                     b'"data_offsets":[0,8]}}', b"\0" * 8), HeaderError,
         "shape [2, 281474976710655] is too large"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, data: bytes, error: type,
                                     fragment: str) -> None:
    with pytest.raises(error) as caught:
        open_bytes(tmp_path, data)
    assert fragment in str(caught.value)
    assert str(tmp_path / "x.safetensors") in str(caught.value)


def test_git_lfs_pointer_gets_a_hint(tmp_path: Path) -> None:
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    with pytest.raises(HeaderError) as caught:
        open_bytes(tmp_path, pointer)
    assert caught.value.hint is not None and "git lfs pull" in caught.value.hint


def test_valid_unusual_files_are_accepted(tmp_path: Path) -> None:
    # Header order differs from data order; zero-size tensors share an offset; scalar.
    header = (b'{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},'
              b'"e1":{"dtype":"F32","shape":[0,3],"data_offsets":[8,8]},'
              b'"e2":{"dtype":"I8","shape":[0],"data_offsets":[8,8]},'
              b'"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}  ')
    with open_bytes(tmp_path, header_file(header, b"\0" * 8)) as reader:
        assert [t.name for t in reader.header.tensors] == ["a", "b", "e1", "e2"]
        assert reader.header["a"].shape == ()


def test_directory_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        SafetensorsReader(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        SafetensorsReader(tmp_path / "nope.safetensors")


def test_reading_rows_in_chunks(tmp_path: Path) -> None:
    values = np.arange(60, dtype=np.float32).reshape(6, 10)
    with open_bytes(tmp_path, safetensors_bytes({"w": values})) as reader:
        entry = reader.header["w"]
        chunks = list(reader.iter_rows(entry, (6, 10), chunk_bytes=85))  # 2 rows a chunk
        assert [start for start, _ in chunks] == [0, 2, 4]
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), values)
        assert b"".join(p.tobytes() for p in reader.iter_bytes(entry, 7)) == values.tobytes()


def test_file_truncated_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({"w": np.ones((4, 4), np.float32)}))
    with SafetensorsReader(path) as reader:
        os.truncate(path, path.stat().st_size - 16)
        with pytest.raises(LayoutError, match="input changed while reading"):
            reader.read_tensor(reader.header["w"])


def test_header_bytes_are_padded_and_ordered() -> None:
    prefix, offsets = build_header([("w", "F32", (2,)), ("v", "I8", (3,))], {"k": "v"})
    (length,) = struct.unpack("<Q", prefix[:8])
    assert length % 8 == 0 and len(prefix) == 8 + length
    document = json.loads(prefix[8:])
    assert list(document) == ["__metadata__", "w", "v"]
    assert offsets == [(0, 8), (8, 11)]


def test_data_order_aligns_every_tensor() -> None:
    tensors = [PlannedTensor("z", "I8", (3,)), PlannedTensor("a", "F32", (1,)),
               PlannedTensor("m", "BF16", (1,)), PlannedTensor("b", "F64", (1,))]
    assert [t.name for t in data_order(tensors)] == ["b", "a", "m", "z"]


def test_writer_output_opens_with_safetensors(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    tensors = [PlannedTensor("codes", "I8", (2, 3)), PlannedTensor("scale", "F32", (2, 1))]
    with SafetensorsWriter(target, tensors, {"note": "x"}) as writer:
        writer.write("codes", np.array([[1, 2, 3]], np.int8))
        writer.write("codes", np.array([[4, 5, 6]], np.int8))  # appended
        writer.write("scale", np.array([[0.5], [0.25]], np.float32))
        writer.publish()
    metadata, raw = read_with_safetensors(target)
    assert metadata == {"note": "x"}
    assert to_array(*raw["codes"]).tolist() == [[1, 2, 3], [4, 5, 6]]
    assert to_array(*raw["scale"]).tolist() == [[0.5], [0.25]]
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_writer_refuses_to_publish_an_incomplete_file(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    with SafetensorsWriter(target, [PlannedTensor("w", "I8", (6,))], {}) as writer:
        writer.write("w", np.zeros(3, np.int8))
        with pytest.raises(OutputError, match="only 3 of 6 bytes were written"):
            writer.publish()
    assert os.listdir(tmp_path) == []


def test_writer_leaves_nothing_when_interrupted(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")

    def interrupted() -> None:
        with SafetensorsWriter(target, [PlannedTensor("w", "I8", (6,))], {}) as writer:
            writer.write("w", np.zeros(3, np.int8))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted()
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert target.read_bytes() == b"previous"


def test_raw_builder_matches_the_reference_reader(tmp_path: Path) -> None:
    # The test helper itself must write what safetensors reads.
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw_safetensors({"a": ("I8", [2], b"\x01\x02")}, {"k": "v"}))
    metadata, raw = read_with_safetensors(path)
    assert metadata == {"k": "v"} and raw == {"a": ("I8", [2], b"\x01\x02")}
