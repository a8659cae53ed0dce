"""Mutation fuzzing: valid files with random byte flips, truncations, insertions and
deletions must only ever produce qz's own errors — never IndexError, KeyError,
UnicodeDecodeError, RecursionError, MemoryError, a numpy error or a traceback — and a
refused run leaves no output behind.

A quick profile runs in the normal suite; the long one is marked ``slow``:

    QZ_FUZZ_EXAMPLES=100000 python -m pytest -m slow tests/test_fuzz.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import safetensors_bytes
from quantize_cli.errors import QzError
from quantize_cli.jobs import dequantize_checkpoint, inspect_checkpoint, quantize_checkpoint

rng = np.random.default_rng(7)
PLAIN_SEED = safetensors_bytes({
    "w": (rng.standard_normal((16, 96)) * 0.1).astype(np.float32),
    "h": (rng.standard_normal((12, 128)) * 0.1).astype(ml_dtypes.bfloat16),
    "bias": np.ones(16, np.float32),
    "ids": np.arange(4, dtype=np.int64),
}, {"format": "pt"})


def quantized_seed() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "seed.safetensors"
        source.write_bytes(PLAIN_SEED)
        quantize_checkpoint(source, Path(folder) / "q.safetensors", include=["w", "h"])
        return (Path(folder) / "q.safetensors").read_bytes()


QUANTIZED_SEED = quantized_seed()


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([PLAIN_SEED, QUANTIZED_SEED])))
    header_end = 8 + int.from_bytes(data[:8], "little")
    for _ in range(draw(st.integers(1, 3))):
        # Half the mutations hit the header (the structure), half the data (the values:
        # NaN, huge or negative scales, codes out of range).
        in_header = draw(st.booleans()) or len(data) <= header_end
        low, high = (0, min(header_end, len(data))) if in_header else (header_end, len(data))
        position = draw(st.integers(low, max(low, high - 1)))
        # In the data, mostly changed values (the layout stays valid, so the values are
        # reached); sometimes a changed length.
        kinds = ["flip", "set", "truncate", "insert", "delete"]
        kind = draw(st.sampled_from(kinds if in_header else kinds[:2] * 4 + kinds[2:]))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[position] = draw(st.sampled_from(list(b'{}[]",:0123456789-.eE \\x\x00\xff')))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[position:position + draw(st.integers(1, 16))]
    return bytes(data)


def probe(folder: Path, data: bytes) -> None:
    source = folder / "m.safetensors"
    source.write_bytes(data)
    outputs = [folder / "q.safetensors", folder / "d.safetensors"]
    jobs = [
        lambda: inspect_checkpoint(source),
        lambda: quantize_checkpoint(source, outputs[0], force=True),
        lambda: quantize_checkpoint(source, outputs[0], force=True, dry_run=True,
                                    include=["*"]),
        lambda: dequantize_checkpoint(source, outputs[1], force=True),
    ]
    for job in jobs:
        for output in outputs:
            output.unlink(missing_ok=True)
        try:
            job()
        except QzError:
            # Refused: nothing may be left but the input.
            assert sorted(os.listdir(folder)) == ["m.safetensors"]


FUZZ_SETTINGS = {"deadline": None, "database": None,
                 "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=300, **FUZZ_SETTINGS)  # type: ignore[arg-type]
@given(mutations())
def test_mutated_files_give_only_qz_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        probe(Path(folder), data)


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("QZ_FUZZ_EXAMPLES", "100000")),
          **FUZZ_SETTINGS)  # type: ignore[arg-type]
@given(mutations())
def test_mutated_files_give_only_qz_errors_long(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        probe(Path(folder), data)
