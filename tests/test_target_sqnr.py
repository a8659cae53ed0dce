"""--target-sqnr: the cheapest scheme that reaches the target, per tensor, and why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from conftest import read_with_safetensors, write_safetensors
from quantize_cli import Scheme, dequantize, error_stats, quantize
from quantize_cli.cli.main import qz


def sqnr(x: np.ndarray, scheme: Scheme) -> float:
    return error_stats(x, dequantize(quantize(x, scheme))).sqnr_db


def test_each_tensor_gets_the_cheapest_scheme_that_reaches_the_target(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    smooth = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    rows_differ = smooth * np.logspace(0, 3, 64, dtype=np.float32)[:, None]  # per-row scale
    spiky = smooth.copy()
    spiky[:, ::61] *= 40  # outliers in every row: blocks help
    hopeless = rng.standard_normal((64, 256)).astype(np.float32)
    source = write_safetensors(tmp_path / "m.safetensors", {
        "smooth": smooth, "rows_differ": rows_differ, "spiky": spiky, "hopeless": hopeless})
    target = 38.0
    result = CliRunner().invoke(qz, ["quantize", str(source), "--target-sqnr", str(target),
                                     "--json", "-"])
    assert result.exit_code == 0, result.stderr
    report = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}

    ladder = [Scheme("absmax", "tensor", None, "mse"), Scheme("absmax", "channel"),
              Scheme("absmax", "block", 128), Scheme("absmax", "block", 64),
              Scheme("absmax", "block", 32)]
    for name, values in (("smooth", smooth), ("rows_differ", rows_differ), ("spiky", spiky)):
        expected = next(s for s in ladder if sqnr(values, s) >= target)
        got = report[name]["scheme"]
        assert (got["granularity"], got["block"]) == (expected.granularity, expected.block_size)
        assert report[name]["stats"]["sqnr_db"] >= target
        assert "≥ 38" in report[name]["reason"]
    assert report["smooth"]["scheme"]["granularity"] == "tensor"
    assert report["rows_differ"]["scheme"]["granularity"] == "channel"
    assert report["spiky"]["scheme"]["granularity"] == "block"

    # 38 dB is reachable for Gaussian values too; 60 dB is not for any INT8 scheme.
    result = CliRunner().invoke(qz, ["quantize", str(source), "--target-sqnr", "60",
                                     "--force", "--json", "-", "--include", "hopeless",
                                     "--include", "smooth"])
    assert result.exit_code == 1
    assert "no tensor reaches the target SQNR of 60 dB" in result.stderr


def test_unreachable_tensors_stay_in_their_dtype(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    easy = np.ones((32, 256), np.float32)  # exact with any scheme
    noisy = rng.standard_normal((32, 256)).astype(np.float32)
    source = write_safetensors(tmp_path / "m.safetensors", {"easy": easy, "noisy": noisy})
    target = sqnr(noisy, Scheme("absmax", "block", 32)) + 1  # noisy cannot reach it
    result = CliRunner().invoke(qz, ["quantize", str(source), "--target-sqnr", f"{target}",
                                     "--json", "-"])
    report = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}
    assert report["easy"]["scheme"]["granularity"] == "tensor"
    assert report["easy"]["reason"] == f"tensor exact ≥ {target:g}"
    assert report["noisy"]["action"] == "copy"
    assert report["noisy"]["reason"].startswith("no scheme reaches the target: tensor")
    assert "block 32" in report["noisy"]["reason"]
    _, written = read_with_safetensors(tmp_path / "m.int8.safetensors")
    assert written["noisy"][0] == "F32" and "noisy_scale" not in written


def test_target_and_granularity_exclude_each_other(tmp_path: Path) -> None:
    source = write_safetensors(tmp_path / "m.safetensors", {"w": np.ones((32, 64), np.float32)})
    result = CliRunner().invoke(qz, ["quantize", str(source), "--target-sqnr", "40",
                                     "--per-channel"])
    assert result.exit_code == 2
    assert "--target-sqnr chooses the granularity itself; drop --per-channel" in result.stderr


def test_dry_run_shows_sizes_and_bits_per_weight(tmp_path: Path) -> None:
    source = write_safetensors(tmp_path / "m.safetensors", {
        "w": np.ones((32, 256), np.float32), "b": np.ones(32, np.float32)})
    result = CliRunner().invoke(qz, ["quantize", str(source), "--dry-run", "--json", "-",
                                     "--method", "affine"])
    report = json.loads(result.stdout)
    w = {t["name"]: t for t in report["tensors"]}["w"]
    # 8 bits per code + (32 bits scale + 8 bits zero point) per 128 values
    assert w["bits_per_weight"] == 8 + 40 / 128
    assert w["output_bytes"] == 32 * 256 + 32 * 2 * 5
    assert report["totals"]["bits_per_weight"] == 8 * (32 * 256 + 320 + 128) / (32 * 257)
    assert "Bits/weight" in CliRunner().invoke(qz, ["quantize", str(source), "--dry-run"]).stdout
