"""Sharded checkpoints: round trips through index and folder, and every way an index and
its shards can disagree (refused before anything is written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import read_with_safetensors, run_fail, run_ok, snapshot, write_safetensors

SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"


@pytest.fixture
def sharded(tmp_path: Path, rng: np.random.Generator) -> Path:
    folder = tmp_path / "llama"
    folder.mkdir()
    bf16 = ml_dtypes.bfloat16
    write_safetensors(folder / SHARD_1, {
        "embed.weight": (rng.standard_normal((64, 32)) * 0.02).astype(bf16),
        "layers.0.q.weight": (rng.standard_normal((32, 200)) * 0.02).astype(bf16),
        "layers.0.norm.weight": np.ones(32, bf16)}, {"format": "pt"})
    write_safetensors(folder / SHARD_2, {
        "layers.1.q.weight": (rng.standard_normal((32, 200)) * 0.02).astype(bf16),
        "lm_head.weight": (rng.standard_normal((64, 32)) * 0.02).astype(bf16)},
        {"format": "pt"})
    weight_map = {"embed.weight": SHARD_1, "layers.0.q.weight": SHARD_1,
                  "layers.0.norm.weight": SHARD_1, "layers.1.q.weight": SHARD_2,
                  "lm_head.weight": SHARD_2}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_sharded_round_trip(runner: CliRunner, sharded: Path) -> None:
    before = snapshot(sharded)
    stdout = run_ok(runner, "quantize", str(sharded), "--method", "affine")
    output = sharded.with_name("llama.int8-affine")
    assert f"Wrote {output}" in stdout
    assert sorted(os.listdir(output)) == sorted(
        [SHARD_1, SHARD_2, "model.safetensors.index.json", "config.json", "tokenizer.json"])
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"].startswith("qz: ") and config["dtype"].startswith("qz: ")
    assert config["quantization_config"]["replaced"]["model_type"] == "llama"
    assert config["quantization_config"] == {"quant_method": "qz", "format_version": "1",
                                             "replaced": {"model_type": "llama"}}
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["layers.1.q.weight_scale"] == SHARD_2
    assert index["weight_map"]["layers.0.q.weight_zero_point"] == SHARD_1
    assert index["weight_map"]["layers.0.norm.weight"] == SHARD_1
    total = 0
    for shard in (SHARD_1, SHARD_2):
        _, tensors = read_with_safetensors(output / shard)
        assert {name for name, mapped in index["weight_map"].items() if mapped == shard} == \
            set(tensors)
        total += sum(len(data) for _, _, data in tensors.values())
    assert index["metadata"]["total_size"] == total

    run_ok(runner, "dequantize", str(output / "model.safetensors.index.json"))
    restored = sharded.with_name("llama.int8-affine.dequant")
    for shard in (SHARD_1, SHARD_2):
        original_metadata, original = read_with_safetensors(sharded / shard)
        metadata, back = read_with_safetensors(restored / shard)
        assert {key: value for key, value in metadata.items()
                if not key.startswith("qz.")} == original_metadata
        assert {n: t[:2] for n, t in back.items()} == {n: t[:2] for n, t in original.items()}
    assert json.loads((restored / "config.json").read_text()) == {"model_type": "llama"}
    index = json.loads((restored / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"embed.weight", "layers.0.q.weight",
                                        "layers.0.norm.weight", "layers.1.q.weight",
                                        "lm_head.weight"}
    assert snapshot(sharded) == before


def test_sharded_inspect_and_dry_run(runner: CliRunner, sharded: Path) -> None:
    report = json.loads(run_ok(runner, "inspect", str(sharded), "--json"))
    assert report["sharded"] is True and [f["name"] for f in report["files"]] == [SHARD_1, SHARD_2]
    assert {t["name"]: t["shard"] for t in report["tensors"]}["lm_head.weight"] == SHARD_2
    plan = json.loads(run_ok(runner, "quantize", str(sharded / "model.safetensors.index.json"),
                             "--dry-run", "--json", "-"))
    assert plan["totals"]["quantized_tensors"] == 4
    assert not sharded.with_name("llama.int8").exists()


def test_small_chunks_give_the_same_sharded_bytes(sharded: Path, tmp_path: Path) -> None:
    from quantize_cli.jobs import quantize_checkpoint

    quantize_checkpoint(sharded, tmp_path / "whole")
    quantize_checkpoint(sharded, tmp_path / "chunked", chunk_bytes=100)
    assert snapshot(tmp_path / "whole") == snapshot(tmp_path / "chunked")


def test_existing_output_folder(runner: CliRunner, sharded: Path) -> None:
    output = sharded.with_name("llama.int8")
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    assert "already exists" in run_fail(runner, 1, "quantize", str(sharded))
    stderr = run_fail(runner, 1, "quantize", str(sharded), "--force")
    assert "holds files qz did not write; --force replaces only qz's own outputs" in stderr
    assert (output / "notes.txt").read_text() == "mine"
    (output / "notes.txt").unlink()
    run_ok(runner, "quantize", str(sharded), "--force", "-q")
    run_ok(runner, "quantize", str(sharded), "--force", "-q")  # now a checkpoint: replaced
    assert (output / "model.safetensors.index.json").exists()
    assert [p for p in os.listdir(sharded.parent) if p.startswith(".")] == []


def test_output_folder_may_not_be_the_input(runner: CliRunner, sharded: Path) -> None:
    stderr = run_fail(runner, 1, "quantize", str(sharded), "-o", str(sharded), "--force")
    assert "would be written inside the input, which qz never changes" in stderr


def _break(sharded: Path, how: str) -> str:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if how == "missing shard":
        (sharded / SHARD_2).unlink()
        return f"shard '{SHARD_2}' listed in the index is missing"
    if how == "tensor in two shards":
        write_safetensors(sharded / SHARD_2, {"lm_head.weight": np.ones((4, 4), np.float32),
                                              "layers.1.q.weight": np.ones(4, np.float32),
                                              "embed.weight": np.ones(4, np.float32)})
        return f"tensor 'embed.weight': appears in shard '{SHARD_1}' and in shard '{SHARD_2}'"
    if how == "wrong shard":
        index["weight_map"]["lm_head.weight"] = SHARD_1
    elif how == "unlisted tensor":
        del index["weight_map"]["lm_head.weight"]
    elif how == "outside folder":
        index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    elif how == "absolute path":
        index["weight_map"]["lm_head.weight"] = "/etc/passwd"
    elif how == "not a string":
        index["weight_map"]["lm_head.weight"] = {"file": SHARD_2}
    elif how == "no weight_map":
        del index["weight_map"]
    elif how == "not json":
        index_path.write_text("{oops")
        return "the index file is not valid JSON: Expecting property name"
    elif how == "listed but absent":
        index["weight_map"]["ghost.weight"] = SHARD_2
    elif how == "duplicate index key":
        text = json.dumps(index)
        index_path.write_text(text.replace('"weight_map": {', '"weight_map": {"lm_head.weight": '
                                           f'"{SHARD_2}", ', 1))
        return "duplicate key 'lm_head.weight' in the index file"
    index_path.write_text(json.dumps(index))
    return {
        "wrong shard": f"tensor 'lm_head.weight': is in this shard but is mapped to '{SHARD_1}'",
        "unlisted tensor": "tensor 'lm_head.weight': is in this shard but is not listed",
        "outside folder": "shard path '../elsewhere.safetensors' must be a file name in the "
                          "index's folder",
        "absolute path": "shard path '/etc/passwd' must be a file name",
        "not a string": "must be a file name in the index's folder",
        "no weight_map": "is not a sharded checkpoint's index: it has no weight_map object",
        "listed but absent": "tensor 'ghost.weight': is mapped to shard",
    }[how]


@pytest.mark.parametrize("how", ["missing shard", "tensor in two shards", "wrong shard",
                                 "unlisted tensor", "outside folder", "absolute path",
                                 "not a string", "no weight_map", "not json",
                                 "listed but absent", "duplicate index key"])
@pytest.mark.parametrize("command", ["quantize", "inspect"])
def test_inconsistent_checkpoints_are_refused(runner: CliRunner, sharded: Path, how: str,
                                              command: str) -> None:
    fragment = _break(sharded, how)
    before = snapshot(sharded.parent)
    stderr = run_fail(runner, 1, command, str(sharded))
    assert fragment in stderr, stderr
    assert len(stderr.splitlines()) <= 2
    assert snapshot(sharded.parent) == before  # nothing written, nothing changed


def test_one_bad_shard_stops_everything(runner: CliRunner, sharded: Path) -> None:
    data = (sharded / SHARD_2).read_bytes()
    (sharded / SHARD_2).write_bytes(data[:-3])
    stderr = run_fail(runner, 1, "quantize", str(sharded))
    assert f"{sharded / SHARD_2}: tensor" in stderr and "truncated" in stderr
    assert not sharded.with_name("llama.int8").exists()


def test_nan_in_the_second_shard_leaves_no_partial_folder(runner: CliRunner,
                                                          sharded: Path) -> None:
    values = np.ones((64, 32), np.float32)
    values[5, 5] = np.nan
    write_safetensors(sharded / SHARD_2, {"layers.1.q.weight": np.ones((32, 200), np.float32),
                                          "lm_head.weight": values})
    stderr = run_fail(runner, 1, "quantize", str(sharded))
    assert "tensor 'lm_head.weight': 1 non-finite value (NaN or ±inf), first at index [5, 5]" \
        in stderr
    assert sorted(os.listdir(sharded.parent)) == ["llama"]


def test_index_file_or_folder_as_input(runner: CliRunner, sharded: Path) -> None:
    by_index = json.loads(run_ok(runner, "inspect", str(sharded / "model.safetensors.index.json"),
                                 "--json"))
    by_folder = json.loads(run_ok(runner, "inspect", str(sharded), "--json"))
    assert by_index["tensors"] == by_folder["tensors"]


def test_folder_with_one_file(runner: CliRunner, small_model: Path) -> None:
    report = json.loads(run_ok(runner, "inspect", str(small_model.parent), "--json"))
    assert report["sharded"] is False and len(report["tensors"]) == 5


def test_folder_without_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    stderr = run_fail(runner, 1, "inspect", str(tmp_path))
    assert "folder holds no model.safetensors.index.json and 0 .safetensors files" in stderr


def test_one_shard_already_quantized(runner: CliRunner, sharded: Path) -> None:
    from quantize_cli.jobs import quantize_checkpoint

    quantize_checkpoint(sharded / SHARD_2, sharded.parent / "q.safetensors")
    os.replace(sharded.parent / "q.safetensors", sharded / SHARD_2)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({"layers.1.q.weight_scale": SHARD_2,
                                "lm_head.weight_scale": SHARD_2})
    index_path.write_text(json.dumps(index))
    before = snapshot(sharded)
    # The quantized shard is read as its values, the float one as it is.
    report = json.loads(run_ok(runner, "quantize", str(sharded), "--json", "-"))
    assert report["notes"] == [
        "the input is quantized (qz: INT8 absmax block 128): its 2 quantized weights were "
        "read as the values they stand for, and errors are measured against those values"]
    stats = {t["name"]: t["stats"]["sqnr_db"] for t in report["tensors"] if t["stats"]}
    # Read back in BF16, INT8 values lie near the grid they came from: a small error.
    assert stats["layers.1.q.weight"] > 50 and stats["lm_head.weight"] > 50
    assert 35 < stats["layers.0.q.weight"] < 50
    assert snapshot(sharded) == before
