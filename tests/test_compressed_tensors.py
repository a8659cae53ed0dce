"""The compressed-tensors export (what it writes and refuses) and reading compressed-tensors
checkpoints back, without torch (tests/test_interop.py checks against the real library)."""

from __future__ import annotations

import json
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
    to_array,
    write_safetensors,
)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_weights"


@pytest.mark.parametrize("flags,fragment", [
    (["--method", "affine"], "affine is not supported"),
    (["--per-tensor"], "per tensor is not supported"),
    (["--block", "48"], "block 48 is not supported"),
    (["--method", "fp8", "--block", "64"], "FP8 block 64 is not supported"),
])
def test_what_the_runtime_cannot_load_is_refused_up_front(tmp_path: Path, flags: list[str],
                                                          fragment: str) -> None:
    stderr = run_fail(CliRunner(), 2, "quantize", str(SAMPLES / "tiny_llama_bf16.safetensors"),
                      "--format", "compressed-tensors", "-o", str(tmp_path / "out"), *flags)
    assert "compressed-tensors" in stderr and fragment in stderr
    assert not (tmp_path / "out").exists()


def test_export_layout_config_and_ignore_list(tmp_path: Path) -> None:
    output = tmp_path / "out"
    report = json.loads(run_ok(CliRunner(), "quantize", str(SAMPLES / "tiny_llama_sharded"),
                               "--format", "compressed-tensors", "--block", "64", "-o",
                               str(output), "--json", "-"))
    reasons = {t["name"]: t["reason"] for t in report["tensors"]}
    assert reasons["model.embed_tokens.weight"] == (
        "kept for vLLM: an embedding (vLLM quantizes Linear layers only)")
    assert reasons["model.layers.0.mlp.down_proj.weight"] == (
        "kept for vLLM: shape 128×344: vLLM's weight-only kernel needs 344 input features a "
        "multiple of 128 and 128 output features a multiple of 64")
    assert reasons["lm_head.weight"] == (
        "kept for vLLM: the output head stays in its dtype, as llm-compressor does")
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "llama"  # the model's own config, kept
    quantization = config["quantization_config"]
    assert quantization["format"] == "pack-quantized"
    assert quantization["config_groups"]["group_0"]["weights"] == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64,
        "dynamic": False, "actorder": None, "block_structure": None, "observer": None,
        "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None}
    assert quantization["ignore"] == ["lm_head"] + [
        f"model.layers.{layer}.mlp.{name}" for layer in (0, 1)
        for name in ("down_proj", "gate_proj", "up_proj")]
    index = json.loads((output / "model.safetensors.index.json").read_text())
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    _, tensors = read_with_safetensors(output / index["weight_map"][q_proj + "_packed"])
    assert tensors[q_proj + "_packed"][:2] == ("I32", [128, 32])
    assert tensors[q_proj + "_scale"][:2] == ("BF16", [128, 2])
    assert to_array(*tensors[q_proj + "_shape"]).tolist() == [128, 128]
    assert q_proj not in tensors


def test_reading_int_quantized_checkpoints(tmp_path: Path) -> None:
    codes = np.array([[-128, -1, 0, 127], [5, -5, 10, -10]], dtype=np.int8)
    scale = np.array([[0.5], [0.25]], dtype=ml_dtypes.bfloat16)
    zero = np.array([[1], [-2]], dtype=np.int8)
    path = tmp_path / "ct.safetensors"
    path.write_bytes(raw_safetensors({
        "layer.weight": ("I8", [2, 4], codes.tobytes()),
        "layer.weight_scale": ("BF16", [2, 1], scale.tobytes()),
        "layer.weight_zero_point": ("I8", [2, 1], zero.tobytes()),
        "layer.bias": ("BF16", [2], np.ones(2, ml_dtypes.bfloat16).tobytes())}))
    shown = run_ok(CliRunner(), "inspect", str(path))
    assert "compressed-tensors int-quantized INT8 affine channel (from BF16)" in shown
    assert "compressed-tensors format, 1 quantized tensors" in shown
    run_ok(CliRunner(), "dequantize", str(path), "-q")
    _, restored = read_with_safetensors(tmp_path / "ct.dequant.safetensors")
    assert sorted(restored) == ["layer.bias", "layer.weight"]
    expected = ((codes.astype(np.float32) - zero) * scale.astype(np.float32)).astype(
        ml_dtypes.bfloat16)
    assert restored["layer.weight"][0] == "BF16"
    assert to_array(*restored["layer.weight"]).tobytes() == expected.tobytes()


def smol_shaped(folder: Path) -> Path:
    """SmolLM2-135M's layer shapes (hidden 576, MLP 1536, 3 key/value heads of 64), two
    layers: vLLM's weight-only kernel needs 128 input features, which 576 is not."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
              "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
              "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
              "mlp.down_proj": (576, 1536)}
    write_safetensors(folder / "model.safetensors", {
        f"model.layers.{layer}.{name}.weight": (rng.standard_normal(shape) * 0.02
                                                ).astype(np.float32)
        for layer in range(2) for name, shape in shapes.items()})
    (folder / "config.json").write_text('{"model_type": "llama", "num_key_value_heads": 3}')
    return folder


def test_a_summary_says_what_the_kernels_keep_and_what_would_quantize_it(
        tmp_path: Path) -> None:
    source = smol_shaped(tmp_path / "smol")
    stdout = run_ok(CliRunner(), "quantize", str(source), "--format", "compressed-tensors",
                    "--worst", "0")
    assert "Tensors: 2 quantized, 12 copied unchanged" in stdout
    assert ("Note: 12 of 14 selected tensors kept in their dtype for compressed-tensors: "
            "model.layers.0.self_attn.q_proj.weight and 3 more (kept for vLLM: shape 576×576: "
            "vLLM's weight-only kernel needs 576 input features a multiple of 128 and 576 "
            "output features a multiple of 64); 2 other reasons (--dry-run lists them); "
            "--scheme W8A8 or --scheme FP8_DYNAMIC quantize all of them"
            ) in " ".join(stdout.split())
    report = json.loads(run_ok(CliRunner(), "quantize", str(source), "--format",
                               "compressed-tensors", "--scheme", "W8A8", "--json", "-"))
    assert report["totals"]["quantized_tensors"] == 14 and report["notes"] == []


def test_nothing_the_format_can_store_says_why_each_was_kept(tmp_path: Path) -> None:
    source = smol_shaped(tmp_path / "smol")
    stderr = run_fail(CliRunner(), 1, "quantize", str(source), "--format",
                      "compressed-tensors", "--include", "*.q_proj.*")
    assert stderr == (
        f"Error: {source}: has no tensor compressed-tensors can store as asked: "
        "model.layers.0.self_attn.q_proj.weight and 1 more (kept for vLLM: shape 576×576: "
        "vLLM's weight-only kernel needs 576 input features a multiple of 128 and 576 "
        "output features a multiple of 64)\n"
        "Hint: --scheme W8A8 or --scheme FP8_DYNAMIC quantize all of them\n")


def test_writing_what_transformers_cannot_load_says_so(tmp_path: Path) -> None:
    stdout = run_ok(CliRunner(), "quantize", str(SAMPLES / "tiny_llama_sharded"), "--format",
                    "compressed-tensors", "--bits", "4", "--method", "affine", "-o",
                    str(tmp_path / "out"), "--worst", "0")
    assert ("Note: asymmetric integer weights (packed zero points) load in vLLM and "
            "compressed-tensors, but not in transformers") in " ".join(stdout.split())
