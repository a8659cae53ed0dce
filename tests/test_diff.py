"""qz diff: tensor-by-tensor comparison of float and quantized checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import run_fail, run_ok, write_safetensors
from quantize_cli.cli.main import qz
from quantize_cli.jobs import diff_checkpoints, quantize_checkpoint


def test_float_against_quantized_matches_the_quantize_report(small_model: Path,
                                                             tmp_path: Path) -> None:
    quantized = tmp_path / "q.safetensors"
    report = quantize_checkpoint(small_model, quantized)
    difference = diff_checkpoints(small_model, quantized)
    assert difference.identical_names_and_shapes
    measured = {t.name: t.stats for t in difference.compared}
    for tensor in report.quantized:
        assert tensor.stats is not None
        assert measured[tensor.name].sqnr_db == pytest.approx(tensor.stats.sqnr_db, abs=0.01)
        assert measured[tensor.name].max_abs_error == pytest.approx(
            tensor.stats.max_abs_error, rel=1e-3)
    assert measured["norm.weight"].error_energy == 0.0  # copied tensors are exact


def test_quantized_against_quantized_and_small_chunks(small_model: Path, tmp_path: Path) -> None:
    from quantize_cli import Scheme

    one, other = tmp_path / "one.safetensors", tmp_path / "other.safetensors"
    quantize_checkpoint(small_model, one, Scheme("absmax", "channel"))
    quantize_checkpoint(small_model, other, Scheme("affine", "block", 32))
    whole = diff_checkpoints(one, other)
    chunked = diff_checkpoints(one, other, chunk_bytes=64)
    for a, b in zip(whole.compared, chunked.compared, strict=True):
        assert a.stats.count == b.stats.count
        assert a.stats.sqnr_db == pytest.approx(b.stats.sqnr_db, rel=1e-6)  # float32 sums
    labels = {t.name: (t.a, t.b) for t in whole.compared}
    assert labels["a.weight"] == ("INT8 absmax channel (from BF16)",
                                  "INT8 affine block 32 (from BF16)")


def test_names_shapes_and_kinds_that_differ(tmp_path: Path) -> None:
    a = write_safetensors(tmp_path / "a.safetensors", {
        "same": np.ones((4, 4), np.float32), "only_a": np.ones(2, np.float32),
        "reshaped": np.ones((2, 8), np.float32), "ids": np.arange(3, dtype=np.int64)})
    b = write_safetensors(tmp_path / "b.safetensors", {
        "same": np.full((4, 4), 1.5, np.float32), "only_b": np.ones(2, np.float32),
        "reshaped": np.ones((8, 2), np.float32), "ids": np.arange(3, dtype=np.float32)})
    result = CliRunner().invoke(qz, ["diff", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [t["name"] for t in report["tensors"]] == ["same"]
    assert report["tensors"][0]["stats"]["max_abs_error"] == 0.5
    assert report["only_in_a"] == ["only_a"] and report["only_in_b"] == ["only_b"]
    assert report["shape_mismatches"] == [{"name": "reshaped", "a": [2, 8], "b": [8, 2]}]
    assert report["not_compared"] == [{"name": "ids", "a": "I64", "b": "F32"}]
    table = run_ok(CliRunner(), "diff", str(a), str(b))
    assert "Only in A: only_a" in table and "Different shapes: reshaped 2×8 in A, 8×2 in B" in table


def test_sharded_side_and_errors(tmp_path: Path, small_model: Path) -> None:
    folder = Path(__file__).resolve().parent.parent / "sample_weights"
    result = CliRunner().invoke(qz, ["diff", str(folder / "tiny_llama_bf16.safetensors"),
                                     str(folder / "tiny_llama_sharded"), "--json"])
    report = json.loads(result.stdout)
    assert report["pooled"]["sqnr_db"] is None  # identical tensors: exact
    assert len(report["tensors"]) == 27 and not report["only_in_a"]
    assert report["exact"] == [{"name": "model.position_ids", "shape": [1, 64], "a": "I64",
                                "b": "I64", "differing_elements": 0}]
    nan = write_safetensors(tmp_path / "nan.safetensors", {
        "a.weight": np.full((8, 160), np.nan, np.float32)})
    stderr = run_fail(CliRunner(), 1, "diff", str(small_model), str(nan))
    assert f"{nan}: tensor 'a.weight': 1280 non-finite values" in stderr
