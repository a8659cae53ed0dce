"""`qz inspect` and `qz dequantize` through click's CliRunner, and the entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import (
    raw_safetensors,
    read_with_safetensors,
    run_fail,
    run_ok,
    sha256,
    to_array,
    write_safetensors,
)
from quantize_cli import __version__


@pytest.fixture
def quantized(runner: CliRunner, small_model: Path) -> Path:
    run_ok(runner, "quantize", str(small_model), "--method", "affine", "--block", "64", "-q")
    return small_model.with_name("model.int8-affine-g64.safetensors")


def test_inspect_plain_file(runner: CliRunner, small_model: Path) -> None:
    stdout = run_ok(runner, "inspect", str(small_model))
    assert "a.weight" in stdout and "BF16" in stdout and "8×160" in stdout
    assert "5 tensors, 5,544 parameters" in stdout and "not quantized" in stdout
    assert "format" in stdout and "pt" in stdout  # metadata


def test_inspect_quantized_file(runner: CliRunner, quantized: Path) -> None:
    stdout = run_ok(runner, "inspect", str(quantized))
    assert "INT8 affine block 64 (from BF16)" in stdout
    assert "scale of a.weight" in stdout and "zero point of a.weight" in stdout
    assert "qz format 1, 3 quantized tensors" in stdout


def test_inspect_json(runner: CliRunner, quantized: Path) -> None:
    report = json.loads(run_ok(runner, "inspect", str(quantized), "--json"))
    assert report["schema_version"] == 3
    assert (report["format"], report["format_version"]) == ("qz", "1")
    tensors = {t["name"]: t for t in report["tensors"]}
    assert tensors["a.weight"]["role"] == "codes"
    assert tensors["a.weight"]["stored_as"] == "INT8 affine block 64"
    assert tensors["a.weight"]["scheme"] == {"method": "affine", "granularity": "block",
                                             "block": 64, "clip": "none", "bits": 8,
                                             "label": "INT8", "activations": None}
    assert tensors["a.weight"]["original_dtype"] == "BF16"
    assert tensors["a.weight_zero_point"] == {
        "name": "a.weight_zero_point", "dtype": "I8", "shape": [8, 3], "bytes": 24,
        "role": "zero_point", "scheme": None, "original_dtype": None, "of": "a.weight",
        "shard": None, "stored_as": None}
    assert report["totals"]["bytes"] == quantized.stat().st_size


def test_inspect_reads_only_the_header(runner: CliRunner, small_model: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from quantize_cli.storage.reader import SafetensorsReader

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(SafetensorsReader, "read_into", forbidden)
    run_ok(runner, "inspect", str(small_model))
    run_ok(runner, "quantize", str(small_model), "--dry-run")


def test_round_trip_restores_names_shapes_and_dtypes(runner: CliRunner, small_model: Path,
                                                     quantized: Path) -> None:
    stdout = run_ok(runner, "dequantize", str(quantized))
    restored = small_model.with_name("model.int8-affine-g64.dequant.safetensors")
    assert f"wrote {restored}" in stdout and "Restored 3 tensors, copied 2" in stdout
    original_metadata, original = read_with_safetensors(small_model)
    metadata, back = read_with_safetensors(restored)
    # The input's metadata, and what qz records of the restoring.
    assert metadata == {**original_metadata, "qz.version": __version__,
                        "qz.source": '{"file":"model.int8-affine-g64.safetensors","sha256":null}'}
    assert {n: t[:2] for n, t in back.items()} == {n: t[:2] for n, t in original.items()}
    for name in ("norm.weight", "position_ids"):
        assert back[name] == original[name]  # copied byte for byte
    c_original, c_back = to_array(*original["c.weight"]), to_array(*back["c.weight"])
    assert np.abs(c_original - c_back).max() <= np.abs(c_original).max() / 127  # ≤ one step


def test_dequantize_to_float32(runner: CliRunner, quantized: Path) -> None:
    output = quantized.with_name("f32.safetensors")
    run_ok(runner, "dequantize", str(quantized), "--dtype", "float32", "-o", str(output))
    _, back = read_with_safetensors(output)
    assert back["a.weight"][0] == "F32" and back["norm.weight"][0] == "BF16"


def test_dequantize_unknown_dtype_is_a_usage_error(runner: CliRunner, quantized: Path) -> None:
    assert "'F8' is not one of" in run_fail(runner, 2, "dequantize", str(quantized),
                                            "--dtype", "F8")


def test_dequantize_refuses_a_plain_file(runner: CliRunner, small_model: Path) -> None:
    stderr = run_fail(runner, 1, "dequantize", str(small_model))
    assert stderr == (f"Error: {small_model}: not a quantized checkpoint: no file is in a "
                      "format qz reads (qz, compressed-tensors, mlx, fp8, mxfp4)\n")


def test_dequantize_refuses_float16_overflow(runner: CliRunner, tmp_path: Path) -> None:
    big = np.full((4, 256), 1e6, dtype=ml_dtypes.bfloat16)
    path = write_safetensors(tmp_path / "big.safetensors", {"w": big})
    run_ok(runner, "quantize", str(path), "-q")
    stderr = run_fail(runner, 1, "dequantize", str(tmp_path / "big.int8.safetensors"),
                      "--dtype", "float16")
    assert "tensor 'w': values exceed the range of F16" in stderr
    assert sorted(os.listdir(tmp_path)) == ["big.int8.safetensors", "big.safetensors"]


def _qz_file(tmp_path: Path, metadata: dict[str, str], scale: tuple[str, list[int], bytes] |
             None = ("F32", [2, 1], np.float32([0.5, 0.25]).tobytes())) -> Path:
    tensors = {"w": ("I8", [2, 4], bytes(range(8)))}
    if scale is not None:
        tensors["w_scale"] = scale
    path = tmp_path / "q.safetensors"
    path.write_bytes(raw_safetensors(tensors, metadata))
    return path


GOOD_ENTRY = json.dumps({"w": {"method": "absmax", "granularity": "channel", "block": None,
                               "dtype": "F32"}})


@pytest.mark.parametrize(
    "metadata,scale,fragment",
    [
        ({"qz.format_version": "99", "qz.tensors": GOOD_ENTRY}, ..., "unsupported qz format "
         "version '99' (this qz reads 1, 2 and 3)"),
        ({"qz.format_version": "1", "qz.tensors": "{oops"}, ..., "qz.tensors metadata is not "
         "valid JSON"),
        ({"qz.format_version": "1", "qz.tensors": '{"w": {"method": "absmax"}}'}, ...,
         "tensor 'w': invalid qz.tensors entry"),
        ({"qz.format_version": "1", "qz.tensors": GOOD_ENTRY}, None,
         "absmax channel needs tensor 'w_scale', which is missing"),
        ({"qz.format_version": "1", "qz.tensors": GOOD_ENTRY},
         ("F16", [2, 1], np.float16([0.5, 0.25]).tobytes()),
         "tensor 'w_scale': must be F32 of shape [2, 1], found F16 [2, 1]"),
        ({"qz.format_version": "1", "qz.tensors": GOOD_ENTRY},
         ("F32", [2, 1], np.float32([np.nan, 0.25]).tobytes()),
         "tensor 'w_scale': holds non-finite or negative scales"),
    ],
)
def test_dequantize_refuses_damaged_qz_files(runner: CliRunner, tmp_path: Path,
                                             metadata: dict[str, str], scale: object,
                                             fragment: str) -> None:
    path = _qz_file(tmp_path, metadata) if scale is ... else _qz_file(tmp_path, metadata, scale)  # type: ignore[arg-type]
    before = sha256(path)
    stderr = run_fail(runner, 1, "dequantize", str(path))
    assert fragment in stderr
    assert os.listdir(tmp_path) == ["q.safetensors"] and sha256(path) == before


def test_every_command_has_help_with_an_example(runner: CliRunner) -> None:
    for command in ([], ["quantize"], ["inspect"], ["dequantize"], ["diff"], ["explain"]):
        stdout = run_ok(runner, *command, "--help")
        assert "Example" in stdout


def test_version(runner: CliRunner) -> None:
    assert run_ok(runner, "--version") == f"qz, version {__version__}\n"


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "quantize_cli", "--version"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout == f"qz, version {__version__}\n"
