"""The bundled sample checkpoints: what they hold, their hashes, and what quantizing them
does to a real model's accuracy and to BF16 values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import read_with_safetensors, sha256, to_array
from quantize_cli import Scheme
from quantize_cli.jobs import dequantize_checkpoint, quantize_checkpoint

SAMPLES = Path(__file__).resolve().parent.parent / "sample_weights"


def load(path: Path) -> dict[str, np.ndarray]:
    return {name: to_array(*raw) for name, raw in read_with_safetensors(path)[1].items()}


def mlp_accuracy(tensors: dict[str, np.ndarray]) -> float:
    activations = tensors["eval.images"].astype(np.float32) / 16.0
    for layer in range(3):
        weight = tensors[f"layers.{layer}.weight"].astype(np.float32)
        activations = activations @ weight.T + tensors[f"layers.{layer}.bias"]
        if layer < 2:
            activations = np.maximum(activations, 0.0)
    return float(np.mean(activations.argmax(axis=1) == tensors["eval.labels"]))


def element_scale(scale: np.ndarray, entry: dict[str, object],
                  shape: tuple[int, ...]) -> np.ndarray:
    if entry["granularity"] == "block":
        scale = np.repeat(scale, entry["block"], axis=-1)[..., : shape[-1]]  # type: ignore[arg-type]
    return np.broadcast_to(scale, shape).astype(np.float64)


def test_sample_readme_lists_the_right_hashes() -> None:
    readme = (SAMPLES / "README.md").read_text()
    # The README lists `sha256sum` lines, so `sha256sum -c` can check them too.
    listed = {name: digest for digest, name in
              re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, flags=re.MULTILINE)}
    files = sorted(p for p in SAMPLES.rglob("*") if p.is_file() and p.suffix != ".py"
                   and p.name != "README.md" and "int8" not in str(p) and ".dequant" not in str(p))
    assert sorted(listed) == sorted(str(p.relative_to(SAMPLES)) for p in files)
    for path in files:
        assert listed[str(path.relative_to(SAMPLES))] == sha256(path)
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file()) < 5_000_000


def test_digits_mlp_accuracy_survives_quantization(tmp_path: Path) -> None:
    original = load(SAMPLES / "digits_mlp.safetensors")
    baseline = mlp_accuracy(original)
    metadata, _ = read_with_safetensors(SAMPLES / "digits_mlp.safetensors")
    assert baseline == pytest.approx(float(metadata["eval_accuracy"]))
    assert baseline > 0.95  # a real model, not noise

    report = quantize_checkpoint(SAMPLES / "digits_mlp.safetensors",
                                 tmp_path / "mlp.int8.safetensors")
    assert [t.name for t in report.quantized] == ["layers.0.weight", "layers.1.weight",
                                                   "layers.2.weight"]
    dequantize_checkpoint(tmp_path / "mlp.int8.safetensors", tmp_path / "mlp.safetensors")
    restored = load(tmp_path / "mlp.safetensors")
    assert abs(mlp_accuracy(restored) - baseline) * 100 <= 0.5


@pytest.mark.parametrize("method", ["absmax", "affine"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_bf16_round_trip(tmp_path: Path, method: str, granularity: str) -> None:
    source = SAMPLES / "tiny_llama_bf16.safetensors"
    # Without clipping: the bounds below are those of plain rounding.
    scheme = Scheme(method, granularity, 128 if granularity == "block" else None,  # type: ignore[arg-type]
                    clip="none")
    quantize_checkpoint(source, tmp_path / "q.safetensors", scheme)
    dequantize_checkpoint(tmp_path / "q.safetensors", tmp_path / "same.safetensors")
    dequantize_checkpoint(tmp_path / "q.safetensors", tmp_path / "f32.safetensors",
                          dtype="float32")
    original_metadata, original = read_with_safetensors(source)
    metadata, restored = read_with_safetensors(tmp_path / "same.safetensors")
    # A drop-in replacement: the same names, dtypes, shapes and metadata (beside what qz
    # records of the restoring).
    assert {n: t[:2] for n, t in restored.items()} == {n: t[:2] for n, t in original.items()}
    assert {k: v for k, v in metadata.items() if not k.startswith("qz.")} == original_metadata
    qz_metadata, quantized = read_with_safetensors(tmp_path / "q.safetensors")
    as_float32 = load(tmp_path / "f32.safetensors")
    for name, entry in json.loads(qz_metadata["qz.tensors"]).items():
        x = to_array(*original[name]).astype(np.float64)
        step = element_scale(to_array(*quantized[f"{name}_scale"]), entry, x.shape)
        # float32 output: within half a step, plus float32 rounding (as in the properties).
        rounding = step * 1e-5 + np.abs(x) * 3e-7
        assert np.all(np.abs(x - as_float32[name]) <= step / 2 + rounding)
        # Original dtype: BF16 rounding of the restored value adds at most half a BF16
        # ulp, so the error stays below one step (x itself lies in the same cell).
        back = to_array(*restored[name]).astype(np.float64)
        half_ulp = np.abs(back) * 2.0**-8
        assert np.all(np.abs(x - back) <= step / 2 + rounding + half_ulp)
        assert np.all(np.abs(x - back) <= step + rounding)
