"""Shared fixtures. Test inputs are built from bytes here (struct + json), never with
qz's own writer, so a writer bug cannot hide a reader bug."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import settings

# CI runs the same examples every time, so that a red run is reproducible; locally
# hypothesis explores new examples on every run. QZ_HYPOTHESIS_PROFILE=long explores more.
settings.register_profile("default", max_examples=200)
settings.register_profile("ci", max_examples=200, derandomize=True, print_blob=True)
settings.register_profile("long", max_examples=5000)
settings.load_profile(os.environ.get("QZ_HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "default"))

CODES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int64): "I64",
    np.dtype(np.bool_): "BOOL",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
}


def raw_safetensors(
    tensors: dict[str, tuple[str, list[int], bytes]],
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Bytes of a safetensors file from (dtype code, shape, raw data) per tensor, in the
    given order, with the header unpadded."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    position = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [position, position + len(data)]}
        position += len(data)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(d for _, _, d in tensors.values())


def safetensors_bytes(arrays: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> bytes:
    return raw_safetensors(
        {name: (CODES[a.dtype], list(a.shape), np.ascontiguousarray(a).tobytes())
         for name, a in arrays.items()},
        metadata,
    )


def write_safetensors(path: Path, arrays: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> Path:
    path.write_bytes(safetensors_bytes(arrays, metadata))
    return path


def read_with_safetensors(
    path: Path,
) -> tuple[dict[str, str], dict[str, tuple[str, list[int], bytes]]]:
    """Metadata and raw tensors as the real safetensors library reads them."""
    import safetensors

    with safe_open_np(path) as handle:
        metadata = handle.metadata() or {}
    tensors = {name: (info["dtype"], list(info["shape"]), bytes(info["data"]))
               for name, info in safetensors.deserialize(path.read_bytes())}
    return metadata, tensors


def safe_open_np(path: Path) -> Any:
    from safetensors import safe_open

    return safe_open(str(path), framework="numpy")


def to_array(dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    numpy_dtypes = {code: dtype for dtype, code in CODES.items()}
    return np.frombuffer(data, dtype=numpy_dtypes[dtype]).reshape(shape)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) with its hash."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def run_ok(runner: CliRunner, *args: str) -> str:
    """Run a qz command that must succeed quietly on stderr; return its stdout."""
    from quantize_cli.cli.main import qz

    result = runner.invoke(qz, list(args))
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stderr == ""
    return result.stdout


def run_fail(runner: CliRunner, code: int, *args: str) -> str:
    """Run a qz command that must fail with ``code``, nothing on stdout and no
    traceback; return its stderr."""
    from quantize_cli.cli.main import qz

    result = runner.invoke(qz, list(args))
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def small_model(tmp_path: Path, rng: np.random.Generator) -> Path:
    """A small checkpoint: two BF16 matrices (one with a tail block), an F32 matrix,
    a 1-D norm, an I64 tensor, and metadata."""
    arrays = {
        "a.weight": (rng.standard_normal((8, 160)) * 0.02).astype(ml_dtypes.bfloat16),
        "b.weight": (rng.standard_normal((16, 128)) * 0.5).astype(ml_dtypes.bfloat16),
        "c.weight": (rng.standard_normal((32, 64))).astype(np.float32),
        "norm.weight": np.ones(160, dtype=ml_dtypes.bfloat16),
        "position_ids": np.arange(8, dtype=np.int64).reshape(1, 8),
    }
    return write_safetensors(tmp_path / "model.safetensors", arrays, {"format": "pt"})
