"""Every output records where it came from and how; the record re-creates it bit for bit."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import read_with_safetensors, sha256
from quantize_cli.cli.main import qz


@pytest.mark.parametrize("options", [
    ["--method", "affine", "--block", "64"],
    ["--per-tensor"],
    ["--per-channel", "--exclude", "b.*"],
    ["--target-sqnr", "30"],
    ["--bits", "4", "--method", "affine", "--per-channel"],
    ["--rule", "a.*=int4,block32", "--rule", "c.*=keep"],
    ["--target-bits", "6"],
])
def test_record_recreates_the_file(small_model: Path, tmp_path: Path,
                                   options: list[str]) -> None:
    runner = CliRunner()
    first = tmp_path / "first.safetensors"
    result = runner.invoke(qz, ["quantize", str(small_model), "-o", str(first), "-q", *options])
    assert result.exit_code == 0, result.stderr
    metadata, _ = read_with_safetensors(first)
    source = json.loads(metadata["qz.source"])
    assert source == {"file": "model.safetensors", "sha256": sha256(small_model)}
    assert "round half to even" in metadata["qz.rounding"]
    assert json.loads(metadata["qz.options"])["format"] == "qz"
    # Re-run the recorded command on the source: the same bytes.
    command = shlex.split(metadata["qz.command"])
    assert command[:3] == ["qz", "quantize", "model.safetensors"]
    second = tmp_path / "second.safetensors"
    result = runner.invoke(qz, [command[1], str(small_model), *command[3:], "-o", str(second),
                                "-q"])
    assert result.exit_code == 0, result.stderr
    assert first.read_bytes() == second.read_bytes()


def test_inspect_shows_the_record_and_dequantize_replaces_it(small_model: Path) -> None:
    runner = CliRunner()
    runner.invoke(qz, ["quantize", str(small_model), "-q"])
    quantized = small_model.with_name("model.int8.safetensors")
    shown = runner.invoke(qz, ["inspect", str(quantized)]).stdout
    assert "qz.source" in shown and sha256(small_model)[:16] in shown
    assert "qz.command" in shown and "qz quantize model.safetensors" in shown
    runner.invoke(qz, ["dequantize", str(quantized), "-q"])
    metadata, _ = read_with_safetensors(small_model.with_name("model.int8.dequant.safetensors"))
    # What was quantized and how is gone; what restored it, from what, stays.
    assert sorted(key for key in metadata if key.startswith("qz.")) == ["qz.source",
                                                                        "qz.version"]
    assert json.loads(metadata["qz.source"]) == {"file": "model.int8.safetensors",
                                                 "sha256": None}


def test_sharded_and_compressed_tensors_outputs_record_each_shard(tmp_path: Path) -> None:
    samples = Path(__file__).resolve().parent.parent / "sample_weights" / "tiny_llama_sharded"
    output = tmp_path / "ct"
    result = CliRunner().invoke(qz, ["quantize", str(samples), "--format", "compressed-tensors",
                                     "--per-channel", "-o", str(output), "-q"])
    assert result.exit_code == 0, result.stderr
    for shard in sorted(samples.glob("*.safetensors")):
        metadata, _ = read_with_safetensors(output / shard.name)
        assert json.loads(metadata["qz.source"]) == {"file": shard.name, "sha256": sha256(shard)}
        assert "--format compressed-tensors" in metadata["qz.command"]


def test_no_hash_records_null(small_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "q.safetensors"
    result = CliRunner().invoke(qz, ["quantize", str(small_model), "-o", str(output), "-q",
                                     "--no-hash"])
    assert result.exit_code == 0
    metadata, _ = read_with_safetensors(output)
    assert json.loads(metadata["qz.source"]) == {"file": "model.safetensors", "sha256": None}
    assert metadata["qz.command"].endswith("--no-hash")
