"""Golden files: the exact bytes qz writes for a tiny input. A change to the format shows
up here as a reviewed diff; regenerate with ``QZ_REGENERATE_GOLDEN=1 python -m pytest
tests/test_golden.py`` and review the new files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import raw_safetensors
from quantize_cli.cli.main import qz

GOLDEN = Path(__file__).resolve().parent / "golden"
VALUES = np.array([[1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2],
                   [0.0, 0.0, 0.0, 0.0, 0.25, -0.5, 0.75, -1.0]], dtype=np.float32)
CASES = {
    "absmax-block4": ["--method", "absmax", "--block", "4"],
    "affine-channel": ["--method", "affine", "--per-channel"],
    # Format version 2: packed 4-bit codes (searched scales), and FP8.
    "int4-absmax-block4": ["--method", "absmax", "--bits", "4", "--block", "4"],
    "int4-affine-channel": ["--method", "affine", "--bits", "4", "--per-channel"],
    "fp8-channel": ["--method", "fp8", "--per-channel"],
    # Format version 3: integers of other widths, the microscaling types (a row of 8 is
    # one short group of 16 or 32).
    "int3-absmax-block4": ["--method", "absmax", "--bits", "3", "--block", "4"],
    "int6-affine-channel": ["--method", "affine", "--bits", "6", "--per-channel"],
    "nvfp4": ["--method", "nvfp4"],
    "mxfp4": ["--method", "mxfp4"],
    "mxfp8": ["--method", "mxfp8"],
}


def tiny_input(path: Path) -> Path:
    path.write_bytes(raw_safetensors(
        {"bias": ("F32", [2], np.float32([0.5, -0.5]).tobytes()),
         "w": ("F32", [2, 8], VALUES.tobytes())},
        {"source": "golden"}))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_bytes(tmp_path: Path, case: str) -> None:
    source = tiny_input(tmp_path / "tiny.safetensors")
    output = tmp_path / "out.safetensors"
    result = CliRunner().invoke(qz, ["quantize", str(source), "-o", str(output), "-q",
                                     "--include", "w", *CASES[case]])
    assert result.exit_code == 0, result.output
    precision = ".int8" if case.startswith(("absmax", "affine")) else ""
    golden = GOLDEN / f"tiny.{case}{precision}.safetensors"
    if os.environ.get("QZ_REGENERATE_GOLDEN"):
        golden.write_bytes(output.read_bytes())
    assert output.read_bytes() == golden.read_bytes()


def test_golden_header_is_what_the_format_documents() -> None:
    data = (GOLDEN / "tiny.absmax-block4.int8.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    assert length % 8 == 0
    metadata = header.pop("__metadata__")
    assert metadata["source"] == "golden" and metadata["qz.format_version"] == "1"
    assert json.loads(metadata["qz.tensors"]) == {
        "w": {"block": 4, "dtype": "F32", "granularity": "block", "method": "absmax"}}
    # Widest dtype first, then by name: every tensor is aligned to its element size.
    assert header == {
        "bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "w_scale": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
        "w": {"dtype": "I8", "shape": [2, 8], "data_offsets": [24, 40]},
    }
    codes = np.frombuffer(data[8 + length + 24:], dtype=np.int8).reshape(2, 8)
    # Block [1.6, -0.7, -3.4, 1.7] has s = 3.4/127; [-2.9, 0.5, 2.3, 6.2] has s = 6.2/127.
    assert codes.tolist() == [[60, -26, -127, 64, -59, 10, 47, 127],
                              [0, 0, 0, 0, 32, -64, 95, -127]]


def test_version_2_header_is_what_the_format_documents() -> None:
    data = (GOLDEN / "tiny.int4-absmax-block4.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    metadata = header.pop("__metadata__")
    assert metadata["qz.format_version"] == "2"
    assert json.loads(metadata["qz.tensors"]) == {"w": {
        "bits": 4, "block": 4, "clip": "mse", "dtype": "F32", "granularity": "block",
        "method": "absmax", "shape": [2, 8]}}
    assert header["w"]["dtype"] == "U8" and header["w"]["shape"] == [2, 4]
    assert header["w_scale"]["shape"] == [2, 2]


def format_doc_reader() -> object:
    """The numpy reader printed in docs/FORMAT.md, run as written."""
    text = (GOLDEN.parent.parent / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    after = text.split("Reading any qz file", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "FORMAT.md", "exec"), namespace)
    return namespace["read_qz"]


@pytest.mark.parametrize("golden", sorted(p.name for p in GOLDEN.glob("*.safetensors")))
def test_the_documented_reader_reads_every_golden_file_as_qz_does(tmp_path: Path,
                                                                  golden: str) -> None:
    read_qz = format_doc_reader()
    tensors = read_qz(GOLDEN / golden)  # type: ignore[operator]
    restored = tmp_path / "restored.safetensors"
    result = CliRunner().invoke(qz, ["dequantize", str(GOLDEN / golden), "-o", str(restored),
                                     "--dtype", "float32", "-q"])
    assert result.exit_code == 0, result.output
    from safetensors.numpy import load_file
    expected = load_file(restored)
    assert set(tensors) == set(expected)
    for name, values in expected.items():
        assert np.array_equal(tensors[name], values), (golden, name)
