"""Interoperability: compressed-tensors' own decompression of qz's export gives exactly
qz's dequantized values, bit for bit. Needs the ``interop`` extra (torch and
compressed-tensors): ``pip install -e '.[interop]'``; skipped without it."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_safetensors
from quantize_cli.cli.main import qz

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import (  # noqa: E402
    PackedQuantizationCompressor,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors import safe_open  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_weights"


def export_and_restore(source: Path, folder: Path, *flags: str) -> tuple[Path, Path]:
    exported, restored = folder / "export", folder / "restored"
    runner = CliRunner()
    result = runner.invoke(qz, ["quantize", str(source), "--format", "compressed-tensors",
                                "-o", str(exported), "-q", *flags])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(qz, ["dequantize", str(exported), "-o", str(restored), "-q"])
    assert result.exit_code == 0, result.stderr
    return exported, restored


def decompressed_by_compressed_tensors(exported: Path) -> dict[str, torch.Tensor]:
    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)  # the library accepts our config
    scheme = parsed.config_groups["group_0"]
    weights = {}
    for shard in sorted(exported.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if not name.endswith(".weight_packed"):
                    continue
                module = name.removesuffix("weight_packed")
                state = {part: handle.get_tensor(module + part)
                         for part in ("weight_packed", "weight_scale", "weight_shape")}
                weights[module + "weight"] = PackedQuantizationCompressor.decompress(
                    state, scheme)["weight"]
    return weights


def restored_by_qz(restored: Path, names: list[str]) -> dict[str, torch.Tensor]:
    files = sorted(restored.glob("*.safetensors")) if restored.is_dir() else [restored]
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                if name in handle.keys():  # noqa: SIM118 - a safetensors handle
                    found[name] = handle.get_tensor(name)
    return found


@pytest.mark.parametrize("flags", [["--per-channel"], ["--block", "128"], ["--block", "64"],
                                   ["--block", "32"]])
def test_bf16_sample_bit_for_bit(tmp_path: Path, flags: list[str]) -> None:
    exported, restored = export_and_restore(SAMPLES / "tiny_llama_sharded", tmp_path, *flags)
    theirs = decompressed_by_compressed_tensors(exported)
    ours = restored_by_qz(restored, list(theirs))
    assert len(theirs) == 9 and set(ours) == set(theirs)
    for name, weight in theirs.items():
        assert weight.dtype == ours[name].dtype == torch.bfloat16
        assert torch.equal(weight.view(torch.int16), ours[name].view(torch.int16)), name


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_other_dtypes_bit_for_bit(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(0)
    source = write_safetensors(tmp_path / "model.safetensors", {
        f"layers.{i}.proj.weight": (rng.standard_normal((128, 256)) * 0.05).astype(dtype)
        for i in range(2)})
    exported, restored = export_and_restore(source, tmp_path, "--block", "128")
    theirs = decompressed_by_compressed_tensors(exported)
    ours = restored_by_qz(restored, list(theirs))
    assert len(theirs) == 2
    for name, weight in theirs.items():
        assert weight.dtype == ours[name].dtype
        assert torch.equal(weight.view(torch.uint8), ours[name].view(torch.uint8)), name
