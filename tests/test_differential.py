"""qz accepts exactly the files the real safetensors library accepts, apart from the
deliberate differences listed in docs/RELIABILITY.md (each one checked here)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from test_reliability import BAD_FILES, header_file, one_tensor, weight_file

from quantize_cli.errors import QzError
from quantize_cli.storage.reader import SafetensorsReader

#: Files qz refuses on purpose although safetensors opens them, by the fragment of qz's
#: message, with the reason (docs/RELIABILITY.md lists them too).
DELIBERATE = {
    "duplicate key": "a later value would silently replace an earlier one",
    "unknown field(s)": "a field qz does not understand could change how the bytes read",
}


def verdicts(path: Path) -> tuple[str | None, str | None]:
    """(qz's error or None, safetensors' error or None) for one file."""
    from safetensors import safe_open

    try:
        with SafetensorsReader(path):
            pass
        ours = None
    except QzError as error:
        ours = str(error)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
        theirs = None
    except Exception as error:  # the reference raises SafetensorsError and OSError
        theirs = f"{type(error).__name__}: {error}"
    return ours, theirs


def deliberate(message: str) -> bool:
    return any(fragment in message for fragment in DELIBERATE)


VALID = {
    "weights": weight_file(v=np.ones((4, 4), np.float32)),
    "empty-header": header_file("{}"),
    "only-metadata": header_file('{"__metadata__":{"k":"v"}}'),
    "leading-whitespace": header_file('  {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
                                      b"\0" * 8),
    "trailing-spaces": header_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}   ',
                                   b"\0" * 8),
    "header-order-differs": header_file(
        '{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},'
        '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8),
    "zero-size-shared": header_file(
        '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
        '"b":{"dtype":"I8","shape":[0,3],"data_offsets":[0,0]}}'),
    "scalar": header_file('{"a":{"dtype":"F64","shape":[],"data_offsets":[0,8]}}', b"\0" * 8),
    "every-dtype": header_file(json.dumps({
        dtype: {"dtype": dtype, "shape": [2], "data_offsets": [16 * i, 16 * i + size * 2]}
        for i, (dtype, size) in enumerate([("F64", 8), ("I64", 8), ("U64", 8), ("C64", 8)])
    }), b"\0" * 64),
    "fp8-and-bool": header_file(
        '{"a":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]},'
        '"b":{"dtype":"BOOL","shape":[4],"data_offsets":[4,8]}}', b"\0" * 8),
    "unicode-names": header_file(json.dumps(
        {"权重\u0000x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}), b"\0"),
}

DIFFERENT = {
    "duplicate-metadata-key": (header_file('{"__metadata__":{"k":"1","k":"2"}}'),
                               "duplicate key 'k'"),
    "duplicate-zero-size-tensor": (header_file(
        '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
        '"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'), "duplicate key 'a'"),
    "unknown-field": (one_tensor({"dtype": "F32", "shape": [2], "data_offsets": [0, 8],
                                  "strides": [1]}), "unknown field(s) strides"),
    "C19": (next(c[1] for c in BAD_FILES if c[0] == "C19-duplicate-metadata-key"),
            "duplicate key 'k'"),
    "C22": (next(c[1] for c in BAD_FILES if c[0] == "C22-unknown-field"),
            "unknown field(s) foo"),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_both_accept(tmp_path: Path, name: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(VALID[name])
    assert verdicts(path) == (None, None)


# Format-level refusals; C19 and C22 are deliberate differences (below), C27 (no tensors)
# is a valid file that only `quantize` refuses.
FORMAT_CASES = [case for case in BAD_FILES if case[0][0] in "ABCD"
                and case[0] not in ("C19-duplicate-metadata-key", "C22-unknown-field",
                                    "C27-no-tensors")]


@pytest.mark.parametrize("data", [case[1] for case in FORMAT_CASES],
                         ids=[case[0] for case in FORMAT_CASES])
def test_both_refuse(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    ours, theirs = verdicts(path)
    assert ours is not None and theirs is not None, (ours, theirs)


@pytest.mark.parametrize("name", sorted(DIFFERENT))
def test_deliberate_differences(tmp_path: Path, name: str) -> None:
    data, fragment = DIFFERENT[name]
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    ours, theirs = verdicts(path)
    assert theirs is None, theirs  # the reference opens it...
    assert ours is not None and fragment in ours  # ...qz refuses, saying why
    assert deliberate(ours)  # and the reason is one of the documented ones


def test_header_length_prefix_only(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2))
    ours, theirs = verdicts(path)
    assert ours is not None and theirs is not None
