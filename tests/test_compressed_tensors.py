"""The compressed-tensors export (what it writes and refuses) and reading compressed-tensors
checkpoints back, without torch (tests/test_interop.py checks against the real library)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import raw_safetensors, read_with_safetensors, run_fail, run_ok, to_array

SAMPLES = Path(__file__).resolve().parent.parent / "sample_weights"


@pytest.mark.parametrize("flags,fragment", [
    (["--method", "affine"], "affine is not supported"),
    (["--per-tensor"], "per tensor is not supported"),
    (["--block", "48"], "block 48 is not supported"),
    (["--method", "fp8", "--block", "64"], "FP8 block 64 is not supported"),
])
def test_what_the_runtime_cannot_load_is_refused_up_front(tmp_path: Path, flags: list[str],
                                                          fragment: str) -> None:
    stderr = run_fail(CliRunner(), 1, "quantize", str(SAMPLES / "tiny_llama_bf16.safetensors"),
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
        "kept for vLLM: shape 128×344: vLLM's kernel needs 344 input features a multiple of "
        "128 and 128 output features a multiple of 64")
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
