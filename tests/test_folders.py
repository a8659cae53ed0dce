"""Model folders in, complete model folders out: where outputs go, what they carry over
and leave out, what config.json says, and every format reading its own folders back.
Each failure qz 1.0 had with real Hugging Face folders has a test here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import read_with_safetensors, run_fail, run_ok, snapshot, write_safetensors

BF16 = ml_dtypes.bfloat16
CONFIG = {"model_type": "bert", "dtype": "float32", "hidden_size": 128}


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embeddings.word_embeddings.weight": (rng.standard_normal((256, 128)) * 0.05).astype(BF16),
        "encoder.layer.0.attention.self.query.weight": (rng.standard_normal((128, 128)) * 0.05
                                                        ).astype(BF16),
        "encoder.layer.0.intermediate.dense.weight": (rng.standard_normal((256, 128)) * 0.05
                                                      ).astype(BF16),
        "encoder.layer.0.output.LayerNorm.weight": np.ones(128, BF16),
    }


def model_folder(parent: Path, name: str = "minilm") -> Path:
    """An unsharded Hugging Face folder as people download them: weights, config,
    tokenizer, templates, a model card, a sentence-transformers pooling folder, the same
    weights in another format, an original/ checkpoint and hidden files."""
    folder = parent / name
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", weights(), {"format": "pt"})
    files = {
        "config.json": json.dumps(CONFIG),
        "tokenizer.json": '{"version": "1.0"}',
        "tokenizer_config.json": '{"model_max_length": 512}',
        "special_tokens_map.json": "{}",
        "vocab.txt": "[PAD]\n[UNK]\nhello\n",
        "generation_config.json": '{"max_length": 20}',
        "chat_template.jinja": "{{ messages }}",
        "README.md": "# minilm\n",
        "modules.json": "[]",
        "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
        "pytorch_model.bin": "not really pickle",
        "onnx/model.onnx": "graph",
        "original/consolidated.pth": "weights",
        ".gitattributes": "*.bin filter=lfs",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


CARRIED = ["1_Pooling/config.json", "README.md", "chat_template.jinja", "generation_config.json",
           "modules.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
           "vocab.txt"]


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_model_folder_gives_a_complete_folder_beside_it(runner: CliRunner,
                                                           tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    before = snapshot(source)
    stdout = run_ok(runner, "quantize", str(source))
    output = tmp_path / "minilm.int8"
    assert f"Wrote {output}" in stdout and "Left out: " in stdout
    assert snapshot(source) == before  # nothing written inside the input
    assert files_in(output) == sorted([*CARRIED, "config.json", "model.safetensors"])
    for name in CARRIED:
        assert (output / name).read_bytes() == (source / name).read_bytes()
    report = json.loads(run_ok(runner, "quantize", str(source), "--dry-run", "--json", "-",
                               "--force"))
    assert report["notes"] == [] and report["warnings"] == []
    assert report["folder"] == {"carried_over": CARRIED, "left_out": [
        {"path": ".gitattributes", "reason": "hidden"},
        {"path": "onnx/", "reason": "only weights in other formats"},
        {"path": "original/", "reason": "another copy of the weights"},
        {"path": "pytorch_model.bin", "reason": "weights in a format qz does not convert"}]}
    # Every later command on the input still works, and the input stays loadable.
    run_ok(runner, "inspect", str(source))
    run_ok(runner, "quantize", str(source), "--format", "compressed-tensors", "-q")
    assert (tmp_path / "minilm.ct-w8a16" / "model.safetensors").exists()
    run_ok(runner, "dequantize", str(tmp_path / "minilm.ct-w8a16"), "-q")
    assert files_in(tmp_path / "minilm.ct-w8a16.dequant") == sorted(
        [*CARRIED, "config.json", "model.safetensors"])
    assert [p.name for p in source.glob("*.safetensors")] == ["model.safetensors"]


def test_the_only_file_of_a_model_folder_is_the_folder(runner: CliRunner,
                                                       tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    run_ok(runner, "quantize", str(source / "model.safetensors"), "-q")
    assert files_in(tmp_path / "minilm.int8") == sorted(
        [*CARRIED, "config.json", "model.safetensors"])


@pytest.mark.parametrize("given", ["out/", "out"])
def test_output_option_names_a_folder(runner: CliRunner, tmp_path: Path, given: str) -> None:
    source = model_folder(tmp_path)
    run_ok(runner, "quantize", str(source), "-o", str(tmp_path / given), "-q")
    assert (tmp_path / "out").is_dir() and (tmp_path / "out" / "model.safetensors").is_file()


def test_output_into_an_existing_empty_folder_and_dash_refused(runner: CliRunner,
                                                                tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    run_ok(runner, "quantize", str(source), "-o", str(tmp_path / "empty"), "-q")
    assert (tmp_path / "empty" / "tokenizer.json").is_file()
    stderr = run_fail(runner, 1, "quantize", str(source), "-o", "-")
    assert stderr.startswith("Error: '-' is not an output: qz writes files and folders")
    assert not Path("-").exists()
    stderr = run_fail(runner, 1, "quantize", str(source), "-o", str(source / "inside"))
    assert "would be written inside the input, which qz never changes" in stderr


def test_a_loose_file_gives_a_file_and_no_invented_config(runner: CliRunner,
                                                          tmp_path: Path) -> None:
    source = write_safetensors(tmp_path / "model.safetensors", weights())
    run_ok(runner, "quantize", str(source), "-q")
    assert sorted(os.listdir(tmp_path)) == ["model.int8.safetensors", "model.safetensors"]
    run_ok(runner, "quantize", str(source), "-o", str(tmp_path / "dir") + "/", "-q")
    assert os.listdir(tmp_path / "dir") == ["model.safetensors"]
    stdout = run_ok(runner, "quantize", str(source), "--format", "compressed-tensors")
    assert os.listdir(tmp_path / "model.ct-w8a16") == ["model.safetensors"]  # no config.json
    assert "Note: no config.json beside the input, so the output has none" in stdout


def test_qz_config_names_qz_and_dequantize_restores_it(runner: CliRunner,
                                                       tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    run_ok(runner, "quantize", str(source), "-q")
    config = json.loads((tmp_path / "minilm.int8" / "config.json").read_text())
    assert config["model_type"] == config["dtype"] == config["torch_dtype"] == (
        "qz: quantized weights, run qz dequantize to restore a model loaders read")
    assert config["quantization_config"] == {"quant_method": "qz", "format_version": "1",
                                             "replaced": {"model_type": "bert",
                                                          "dtype": "float32"}}
    run_ok(runner, "dequantize", str(tmp_path / "minilm.int8"), "-q")
    assert json.loads((tmp_path / "minilm.int8.dequant" / "config.json").read_text()) == CONFIG


def test_a_broken_config_is_refused_before_any_work(runner: CliRunner, tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    (source / "config.json").write_text('{"model_type": "bert",\n "x": }')
    before = snapshot(tmp_path)
    stderr = run_fail(runner, 1, "quantize", str(source))
    assert stderr.startswith(f"Error: {source / 'config.json'}: config.json is not valid JSON: "
                             "Expecting value at line 2 column 7")
    assert snapshot(tmp_path) == before


def test_hugging_face_cache_layout_with_links(runner: CliRunner, tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    blobs = tmp_path / "blobs"
    snapshot_folder = tmp_path / "snapshots" / "0123abc"
    blobs.mkdir()
    snapshot_folder.mkdir(parents=True)
    for path in sorted(source.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            blob = blobs / f"blob{len(os.listdir(blobs))}"
            path.rename(blob)
            link = snapshot_folder / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    run_ok(runner, "quantize", str(snapshot_folder), "-o", str(tmp_path / "out"), "-q")
    out = tmp_path / "out"
    assert files_in(out) == sorted([*CARRIED, "config.json", "model.safetensors"])
    assert not any(p.is_symlink() for p in out.rglob("*"))


def test_dequantize_a_sharded_output_with_a_float_only_shard(runner: CliRunner,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    folder.mkdir()
    rng = np.random.default_rng(0)
    first = {"layers.0.q.weight": (rng.standard_normal((64, 128)) * 0.05).astype(BF16)}
    second = {"embed.weight": (rng.standard_normal((64, 128)) * 0.05).astype(BF16)}
    write_safetensors(folder / "model-00001-of-00002.safetensors", first)
    write_safetensors(folder / "model-00002-of-00002.safetensors", second)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "layers.0.q.weight": "model-00001-of-00002.safetensors",
        "embed.weight": "model-00002-of-00002.safetensors"}}))
    run_ok(runner, "quantize", str(folder), "--exclude", "embed.*", "-q")
    run_ok(runner, "dequantize", str(tmp_path / "llama.int8"), "-q")
    _, back = read_with_safetensors(tmp_path / "llama.int8.dequant" /
                                    "model-00002-of-00002.safetensors")
    assert back["embed.weight"][2] == second["embed.weight"].tobytes()


def test_ct_export_of_tied_embeddings_ignores_the_head(runner: CliRunner,
                                                       tmp_path: Path) -> None:
    folder = tmp_path / "smollm"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_safetensors(folder / "model.safetensors", {
        "model.embed_tokens.weight": (rng.standard_normal((256, 128)) * 0.05).astype(BF16),
        "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((128, 128)) * 0.05
                                                   ).astype(BF16)})
    (folder / "config.json").write_text('{"model_type": "llama", "tie_word_embeddings": true}')
    run_ok(runner, "quantize", str(folder), "--format", "compressed-tensors", "-q")
    config = json.loads((tmp_path / "smollm.ct-w8a16" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head"]


def test_tensor_parallel_reasons_in_the_dry_run(runner: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_safetensors(folder / "model.safetensors", {
        "m.layers.0.mlp.down_proj.weight": (rng.standard_normal((128, 384)) * 0.05).astype(BF16),
        "m.layers.0.mlp.up_proj.weight": (rng.standard_normal((384, 128)) * 0.05).astype(BF16),
        "m.layers.0.self_attn.q_proj.weight": (rng.standard_normal((256, 256)) * 0.05
                                               ).astype(BF16)})
    (folder / "config.json").write_text('{"model_type": "llama"}')
    one = json.loads(run_ok(runner, "quantize", str(folder), "--format", "compressed-tensors",
                            "--dry-run", "--json", "-"))
    assert all(t["action"] == "quantize" for t in one["tensors"])
    four = json.loads(run_ok(runner, "quantize", str(folder), "--format", "compressed-tensors",
                             "--tensor-parallel", "4", "--dry-run", "--json", "-"))
    reasons = {t["name"]: t["reason"] for t in four["tensors"]}
    assert reasons["m.layers.0.mlp.down_proj.weight"] == (
        "kept for vLLM: shape 128×384 per GPU with --tensor-parallel 4: vLLM's "
        "weight-only kernel needs 96 input features a multiple of 128 and 128 output "
        "features a multiple of 64")
    assert reasons["m.layers.0.mlp.up_proj.weight"] == (
        "kept for vLLM: shape 384×128 per GPU with --tensor-parallel 4: vLLM's "
        "weight-only kernel needs 128 input features a multiple of 128 and 96 output "
        "features a multiple of 64")
    assert reasons["m.layers.0.self_attn.q_proj.weight"] == "BF16, 2-D"  # 64 outputs each
    stderr = run_fail(runner, 2, "quantize", str(folder), "--tensor-parallel", "2")
    assert "--tensor-parallel applies to the formats vLLM runs (compressed-tensors)" in stderr


def test_mlx_folder_round_trip_inspect_and_diff(runner: CliRunner, tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    stdout = run_ok(runner, "quantize", str(source), "--format", "mlx")
    output = tmp_path / "minilm.mlx-int8"
    assert "affine block 64" in stdout and f"Wrote {output}" in stdout
    config = json.loads((output / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {
        "group_size": 64, "bits": 8, "mode": "affine"}
    metadata, stored = read_with_safetensors(output / "model.safetensors")
    assert metadata["format"] == "mlx"
    name = "encoder.layer.0.attention.self.query"
    assert stored[f"{name}.weight"][:2] == ("U32", [128, 32])
    assert stored[f"{name}.scales"][:2] == stored[f"{name}.biases"][:2] == ("BF16", [128, 2])
    assert "encoder.layer.0.output.LayerNorm.weight" in stored  # norms stay
    shown = run_ok(runner, "inspect", str(output))
    assert "MLX 8-bit affine block 64 (from BF16)" in shown and "bias of" in shown
    difference = json.loads(run_ok(runner, "diff", str(source), str(output), "--json"))
    assert {t["name"] for t in difference["tensors"]} == set(weights())
    assert min(t["stats"]["sqnr_db"] or 99 for t in difference["tensors"]) > 35
    run_ok(runner, "dequantize", str(output), "-q")
    restored = tmp_path / "minilm.mlx-int8.dequant"
    metadata, back = read_with_safetensors(restored / "model.safetensors")
    assert metadata["format"] == "pt"
    assert {n: t[:2] for n, t in back.items()} == {
        n: ("BF16", list(a.shape)) for n, a in weights().items()}
    assert json.loads((restored / "config.json").read_text()) == CONFIG


# ------------------------------------------------------ never destroy what qz did not write


def test_force_never_replaces_a_folder_qz_did_not_write(runner: CliRunner,
                                                        tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    (source / "original" / "consolidated.pth").write_text("the only copy")
    run_ok(runner, "quantize", str(source), "-q")
    before = snapshot(source)
    stderr = run_fail(runner, 1, "dequantize", str(tmp_path / "minilm.int8"), "-o",
                      str(source), "--force")
    assert stderr == (f"Error: {source}: holds files qz did not write; --force replaces only "
                      "qz's own outputs or an empty folder\n"
                      "Hint: choose another folder with -o\n")
    assert snapshot(source) == before
    # What qz wrote, and an empty folder, it may replace.
    run_ok(runner, "dequantize", str(tmp_path / "minilm.int8"), "-q")
    run_ok(runner, "dequantize", str(tmp_path / "minilm.int8"), "-q", "--force")
    (tmp_path / "empty").mkdir()
    run_ok(runner, "dequantize", str(tmp_path / "minilm.int8"), "-o", str(tmp_path / "empty"),
           "-q", "--force")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def hub_snapshot(cache: Path) -> Path:
    """A model as the Hugging Face hub caches it: every file of the snapshot a link into
    blobs/, the snapshot named after a commit."""
    repository = cache / "hub" / "models--HuggingFaceTB--SmolLM2-135M"
    snapshot_folder = repository / "snapshots" / "12fd25f77366fa6b3b4b768ec3050bf629380bac"
    source = model_folder(tmp_path_of(cache), "download")
    (repository / "blobs").mkdir(parents=True)
    snapshot_folder.mkdir(parents=True)
    for number, name in enumerate(("model.safetensors", "config.json", "tokenizer.json")):
        blob = repository / "blobs" / f"blob{number}"
        blob.write_bytes((source / name).read_bytes())
        (snapshot_folder / name).symlink_to(Path("../..") / "blobs" / blob.name)
    return snapshot_folder


def tmp_path_of(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    return cache.parent


def test_a_model_in_the_hugging_face_cache_gives_an_output_named_after_it(
        runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    source = hub_snapshot(cache)
    before = snapshot(cache)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    stdout = run_ok(runner, "quantize", str(source))
    assert "Wrote SmolLM2-135M.int8" in stdout
    assert files_in(work / "SmolLM2-135M.int8") == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert snapshot(cache) == before  # nothing written in the cache
    stderr = run_fail(runner, 1, "quantize", str(source), "--force", "-o",
                      str(source.parent / "quantized"))
    assert "is inside a Hugging Face cache, which qz never writes to" in stderr
    assert snapshot(cache) == before


def test_links_to_folders_are_left_out_and_links_to_files_followed(runner: CliRunner,
                                                                    tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    elsewhere = tmp_path / "datasets"
    elsewhere.mkdir()
    (elsewhere / "huge.txt").write_text("x" * 1000)
    (source / "loop").symlink_to(".")
    (source / "data").symlink_to(elsewhere)
    (tmp_path / "card.md").write_text("# the card\n")
    (source / "README.md").unlink()
    (source / "README.md").symlink_to(tmp_path / "card.md")
    report = json.loads(run_ok(runner, "quantize", str(source), "--json", "-"))
    left_out = {entry["path"]: entry["reason"] for entry in report["folder"]["left_out"]}
    assert left_out["loop/"] == left_out["data/"] == "a link to a folder, not followed"
    output = tmp_path / "minilm.int8"
    assert files_in(output) == sorted([*CARRIED, "config.json", "model.safetensors"])
    assert (output / "README.md").read_text() == "# the card\n"
    assert not (output / "README.md").is_symlink()


def test_a_file_of_a_model_folder_gives_a_folder_beside_it(runner: CliRunner,
                                                           tmp_path: Path) -> None:
    # vLLM and mlx-lm load every .safetensors of a folder without an index: a file
    # written inside the model folder would be loaded with the model.
    folder = tmp_path / "two"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", weights())
    write_safetensors(folder / "adapter.safetensors", weights(1))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    assert "and 2 .safetensors files" in run_fail(runner, 1, "quantize", str(folder))
    before = snapshot(folder)
    stdout = run_ok(runner, "quantize", str(folder / "model.safetensors"))
    assert f"Wrote {tmp_path / 'two.int8'}" in stdout
    assert files_in(tmp_path / "two.int8") == ["config.json", "model.safetensors"]
    stderr = run_fail(runner, 1, "quantize", str(folder / "model.safetensors"), "-o",
                      str(folder / "model.int8.safetensors"))
    assert "would be written inside the model folder" in stderr
    assert snapshot(folder) == before


def test_outputs_keep_the_permission_bits_of_their_input(runner: CliRunner,
                                                         tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    os.chmod(source / "model.safetensors", 0o600)
    os.chmod(source / "config.json", 0o640)
    os.chmod(source, 0o750)
    run_ok(runner, "quantize", str(source), "-q")
    output = tmp_path / "minilm.int8"
    mode = {name: os.stat(output / name).st_mode & 0o777
            for name in ("model.safetensors", "config.json", ".")}
    assert mode == {"model.safetensors": 0o600, "config.json": 0o640, ".": 0o750}
    run_ok(runner, "dequantize", str(output), "-q")
    assert os.stat(tmp_path / "minilm.int8.dequant" / "model.safetensors").st_mode & 0o777 \
        == 0o600
    loose = write_safetensors(tmp_path / "loose.safetensors", weights())
    os.chmod(loose, 0o640)
    run_ok(runner, "quantize", str(loose), "-q")
    assert os.stat(tmp_path / "loose.int8.safetensors").st_mode & 0o777 == 0o640


def test_dequantize_to_another_dtype_says_so_in_the_config(runner: CliRunner,
                                                           tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    run_ok(runner, "quantize", str(source), "-q")
    run_ok(runner, "dequantize", str(tmp_path / "minilm.int8"), "--dtype", "float16", "-q")
    config = json.loads((tmp_path / "minilm.int8.dequant" / "config.json").read_text())
    assert config == {**CONFIG, "dtype": "float16"}
    _, back = read_with_safetensors(tmp_path / "minilm.int8.dequant" / "model.safetensors")
    # What qz restored is float16; the norm it never quantized keeps its dtype (DESIGN
    # amendment 21), which loaders cast to the config's.
    assert {name: dtype for name, (dtype, _, _) in back.items()} == {
        **dict.fromkeys(weights(), "F16"),
        "encoder.layer.0.output.LayerNorm.weight": "BF16"}


def test_a_folder_of_pytorch_weights_is_named_as_such(runner: CliRunner,
                                                      tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + bytes(100))
    stderr = run_fail(runner, 1, "quantize", str(folder))
    assert stderr == (
        f"Error: {folder}: holds weights only in formats qz does not read "
        "(pytorch_model.bin), no .safetensors file\n"
        "Hint: qz reads safetensors: load the model with transformers and save_pretrained() "
        "it, which writes safetensors\n")
