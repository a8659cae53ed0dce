"""``--scheme PRESET`` writes what llm-compressor writes for the same preset and model.

tests/golden/llm-compressor/ holds llm-compressor's own output for each preset (recorded
by record.py there with ``model_free_ptq``): the model it was given and the config.json
and tensors it wrote. Here qz quantizes the same model with the same preset and must
agree with it on every field of ``quantization_config`` by which vLLM chooses its kernel,
store every quantized weight with the same tensors (names, dtypes, shapes), and quantize
the same layers, except those qz keeps in float for a reason it states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import read_with_safetensors, run_fail, run_ok, write_safetensors

GOLDEN = Path(__file__).resolve().parent / "golden" / "llm-compressor"
PRESETS = sorted(path.stem for path in GOLDEN.glob("*.json"))
#: What vLLM reads of a config group to choose its kernel (``_get_scheme_from_parts``),
#: and the scale and zero-point dtypes compressed-tensors reads the tensors with.
KERNEL_FIELDS = ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size",
                 "block_structure", "scale_dtype", "zp_dtype")


def recorded(preset: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((GOLDEN / f"{preset}.json").read_text())
    return found


def model_folder(folder: Path, model: dict[str, Any]) -> Path:
    """The model llm-compressor was given: the same config.json, names and shapes."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {
        name: (rng.standard_normal(shape) * 0.02).astype(np.float32).astype(ml_dtypes.bfloat16)
        for name, shape in model["shapes"].items()}, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model["config"]))
    return folder


def quantized_weights(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each quantized weight (one with a ``weight_scale``) and its stored tensors."""
    modules = {name.removesuffix(".weight_scale") for name in tensors
               if name.endswith(".weight_scale")}
    return {f"{module}.weight": {name: value for name, value in tensors.items()
                                 if name.startswith(f"{module}.weight")}
            for module in modules}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_write_what_llm_compressor_writes(tmp_path: Path, preset: str) -> None:
    theirs = recorded(preset)
    source = model_folder(tmp_path / "model", theirs["model"])
    output = tmp_path / "out"
    report = json.loads(run_ok(CliRunner(), "quantize", str(source), "--format",
                               "compressed-tensors", "--scheme", preset, "-o", str(output),
                               "--json", "-"))
    ours = json.loads((output / "config.json").read_text())["quantization_config"]
    expected = theirs["quantization_config"]
    assert ours["format"] == expected["format"]
    assert ours["quant_method"] == expected["quant_method"] == "compressed-tensors"
    assert list(ours["config_groups"]) == list(expected["config_groups"]) == [preset]
    group, their_group = ours["config_groups"][preset], expected["config_groups"][preset]
    assert (group["format"], group["targets"]) == (their_group["format"],
                                                   their_group["targets"])
    for part in ("weights", "input_activations", "output_activations"):
        if their_group[part] is None:
            assert group[part] is None, part
            continue
        assert {field: group[part][field] for field in KERNEL_FIELDS} == {
            field: their_group[part][field] for field in KERNEL_FIELDS}, part

    _, stored = read_with_safetensors(output / "model.safetensors")
    our_weights = quantized_weights({name: [dtype, shape] for name, (dtype, shape, _)
                                     in stored.items()})
    their_weights = quantized_weights(theirs["tensors"])
    reasons = {tensor["name"]: tensor["reason"] for tensor in report["tensors"]}
    assert our_weights, "something is quantized"
    for name, tensors in their_weights.items():
        if name in our_weights:
            assert our_weights[name] == tensors, name
        else:  # qz keeps it and says why (llm-compressor quantizes the embedding)
            assert reasons[name].startswith("kept for vLLM: "), name
    assert set(our_weights) <= set(their_weights)


@pytest.mark.parametrize(("preset", "needs"), [
    ("FP8", "static FP8 scales of every layer's inputs"),
    ("NVFP4", "static global scales of every layer's inputs")])
def test_presets_that_need_calibration_are_refused_by_name(tmp_path: Path, preset: str,
                                                           needs: str) -> None:
    source = model_folder(tmp_path / "model", recorded("W8A16")["model"])
    stderr = run_fail(CliRunner(), 2, "quantize", str(source), "--format",
                      "compressed-tensors", "--scheme", preset)
    assert f"--scheme {preset} needs {needs}, which qz's exports do not carry" in stderr


def test_a_preset_sets_the_scheme_alone(tmp_path: Path) -> None:
    from quantize_cli.cli.main import qz

    source = model_folder(tmp_path / "model", recorded("W8A16")["model"])
    result = CliRunner().invoke(qz, ["quantize", str(source), "--scheme", "W4A16", "--bits",
                                     "8"])
    assert result.exit_code == 2
    assert "--scheme W4A16 sets the method, bits, granularity and activations; drop --bits" \
        in result.stderr
