"""Quantized checkpoints in: the fine-grained FP8 of DeepSeek and Qwen3, gpt-oss's MXFP4
experts, compressed-tensors exports with what llm-compressor adds, and the quantizations
qz does not read (GPTQ, AWQ, bitsandbytes, …), each built the way its producer stores it.

What qz reads is checked against transformers' own dequantization on CPU, bit for bit
(those tests need the ``interop`` extra); what it refuses is refused by name on every
command, leaving nothing behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import read_with_safetensors, run_fail, run_ok, snapshot, write_safetensors
from quantize_cli.core import Scheme, quantize_rows

# The bundled samples' FP8 checkpoint is made by DeepSeek's rule (make_samples.py); the
# tests make theirs the same way.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sample_weights"))
from make_samples import fine_grained_fp8

BF16 = ml_dtypes.bfloat16
FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": [128, 128]}


def to_gpt_oss_mxfp4(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """gpt-oss's experts (experts, in, out) as its checkpoints store them: the transposed
    (experts, out, in) in MXFP4, ``X_blocks`` (experts, out, in / 32, 16) with the first
    E2M1 code of each byte in the low nibble and ``X_scales`` (experts, out, in / 32) of
    E8M0 exponents."""
    stored: dict[str, np.ndarray] = {}
    for name, weight in weights.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[name] = weight
            continue
        transposed = np.ascontiguousarray(weight.astype(np.float32).transpose(0, 2, 1))
        experts, rows, columns = transposed.shape
        result = quantize_rows(transposed.reshape(experts * rows, columns),
                               Scheme("mxfp4", clip="none"))
        patterns = result.codes.view(np.uint8)
        packed = (patterns[:, 0::2] & 0x0F) | ((patterns[:, 1::2] & 0x0F) << 4)
        stored[name + "_blocks"] = packed.reshape(experts, rows, columns // 32, 16)
        stored[name + "_scales"] = result.scale.view(np.uint8).reshape(
            experts, rows, columns // 32)
    return stored


def write_folder(folder: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def llama_weights(hidden: int = 256, inner: int = 384, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {"model.embed_tokens.weight": rng.standard_normal((128, hidden)) * 0.02,
               "model.norm.weight": np.ones(hidden)}
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        weights.update({f"{prefix}.self_attn.q_proj.weight": rng.standard_normal((hidden, hidden)),
                        f"{prefix}.self_attn.o_proj.weight": rng.standard_normal((hidden, hidden)),
                        f"{prefix}.mlp.up_proj.weight": rng.standard_normal((inner, hidden)),
                        f"{prefix}.mlp.down_proj.weight": rng.standard_normal((hidden, inner)),
                        f"{prefix}.input_layernorm.weight": np.ones(hidden)})
    return {name: (value * 0.02 if value.ndim == 2 else value).astype(BF16)
            for name, value in weights.items()}


def fp8_folder(tmp_path: Path, hidden: int = 256, inner: int = 384) -> Path:
    return write_folder(tmp_path / "model-fp8", fine_grained_fp8(llama_weights(hidden, inner)),
                        {"model_type": "llama", "torch_dtype": "bfloat16",
                         "quantization_config": FP8_CONFIG})


# ------------------------------------------------------------------ fine-grained FP8


def test_an_fp8_folder_is_described_dequantized_and_compared(tmp_path: Path) -> None:
    source = fp8_folder(tmp_path, hidden=192, inner=320)  # partial blocks everywhere
    before = snapshot(source)
    shown = json.loads(run_ok(CliRunner(), "inspect", str(source), "--json"))
    assert shown["format"] == "fp8"
    roles = {t["name"]: (t["role"], t["stored_as"]) for t in shown["tensors"]}
    assert roles["model.layers.0.mlp.up_proj.weight"] == (
        "codes", "FP8 block 128×128 (weight_scale_inv)")
    assert roles["model.layers.0.mlp.up_proj.weight_scale_inv"][0] == "scale"
    run_ok(CliRunner(), "dequantize", str(source), "-q")
    restored = tmp_path / "model-fp8.dequant"
    _, tensors = read_with_safetensors(restored / "model.safetensors")
    assert {name: (dtype, tuple(shape)) for name, (dtype, shape, _) in tensors.items()} == {
        name: ("BF16", value.shape) for name, value in llama_weights(192, 320).items()}
    config = json.loads((restored / "config.json").read_text())
    assert config == {"model_type": "llama", "torch_dtype": "bfloat16"}
    # diff reads the FP8 weights as dequantize does (exactly so in float32), and they are
    # within FP8's error of the float weights they came from.
    run_ok(CliRunner(), "dequantize", str(source), "-o", str(tmp_path / "f32"), "--dtype",
           "float32", "-q")
    compared = json.loads(run_ok(CliRunner(), "diff", str(source), str(tmp_path / "f32"),
                                 "--json"))
    assert all(t["stats"]["sqnr_db"] is None for t in compared["tensors"])  # identical
    write_folder(tmp_path / "float", llama_weights(192, 320), {"model_type": "llama"})
    against_float = json.loads(run_ok(CliRunner(), "diff", str(tmp_path / "float"),
                                      str(source), "--json"))
    fp8 = [t["stats"]["sqnr_db"] for t in against_float["tensors"]
           if t["name"].endswith("proj.weight")]
    assert len(fp8) == 8 and all(28 < sqnr < 36 for sqnr in fp8)
    assert snapshot(source) == before


@pytest.mark.parametrize(("flags", "low", "high"), [
    ([], 38.0, 60.0), (["--bits", "4"], 15.0, 30.0),
    (["--format", "compressed-tensors", "--bits", "4"], 15.0, 30.0),
    (["--format", "mlx"], 38.0, 60.0)])
def test_an_fp8_folder_is_quantized_again_to_any_scheme(tmp_path: Path, flags: list[str],
                                                        low: float, high: float) -> None:
    source = fp8_folder(tmp_path)
    before = snapshot(source)
    output = tmp_path / "out"
    report = json.loads(run_ok(CliRunner(), "quantize", str(source), "-o", str(output),
                               "--json", "-", *flags))
    assert report["notes"][-1].startswith("the input is quantized (fp8: FP8 block 128×128 "
                                          "(weight_scale_inv)): its 8 quantized weights")
    stats = [t["stats"]["sqnr_db"] for t in report["tensors"] if t["stats"]]
    assert stats and all(low < sqnr < high for sqnr in stats)
    _, tensors = read_with_safetensors(output / "model.safetensors")
    assert not any(name.endswith("_scale_inv") for name in tensors)
    assert not any(dtype == "F8_E4M3" for dtype, _, _ in tensors.values())
    config = json.loads((output / "config.json").read_text())
    assert "fp8" not in json.dumps(config.get("quantization_config"))
    # What the output holds is within the scheme's error of what the input stands for.
    run_ok(CliRunner(), "dequantize", str(source), "-o", str(tmp_path / "restored"), "-q")
    compared = json.loads(run_ok(CliRunner(), "diff", str(tmp_path / "restored"), str(output),
                                 "--json"))
    measured = {t["name"]: t["stats"]["sqnr_db"] for t in compared["tensors"]
                if t["stats"]["sqnr_db"] is not None}
    assert measured and all(low - 1 < sqnr < high for sqnr in measured.values())
    assert snapshot(source) == before


def test_nan_codes_are_refused_not_restored(tmp_path: Path) -> None:
    tensors = fine_grained_fp8(llama_weights())
    codes = tensors["model.layers.1.mlp.up_proj.weight"].copy()
    codes.view(np.uint8)[3, 5] = 0x7F  # E4M3's NaN
    tensors["model.layers.1.mlp.up_proj.weight"] = codes
    source = write_folder(tmp_path / "model", tensors, {
        "model_type": "llama", "quantization_config": FP8_CONFIG})
    stderr = run_fail(CliRunner(), 1, "dequantize", str(source))
    assert stderr == (f"Error: {source / 'model.safetensors'}: tensor "
                      "'model.layers.1.mlp.up_proj.weight': holds NaN codes\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def saved_by_transformers(model: Any, folder: Path) -> tuple[dict[str, np.ndarray],
                                                          dict[str, Any]]:
    """A transformers model in BF16 as ``save_pretrained`` writes it: its tensors and
    config.json."""
    import torch

    model.to(torch.bfloat16).save_pretrained(folder)
    _, tensors = read_with_safetensors(folder / "model.safetensors")
    return ({name: np.frombuffer(data, BF16).reshape(shape)
             for name, (_, shape, data) in tensors.items()},
            json.loads((folder / "config.json").read_text()))


def assert_dequantized_as_transformers_loads(source: Path, tmp_path: Path) -> None:
    """qz's dequantized folder holds transformers' own values, bit for bit (without a GPU,
    transformers dequantizes FP8 and MXFP4 checkpoints to BF16 when it loads them)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    theirs = transformers.AutoModelForCausalLM.from_pretrained(source).state_dict()
    run_ok(CliRunner(), "dequantize", str(source), "-o", str(tmp_path / "ours"), "-q")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        assert value.shape == theirs[name].shape, name
        assert torch.equal(value.view(torch.int16), theirs[name].view(torch.int16)), name


def test_fp8_checkpoints_read_as_transformers_reads_them(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
        tie_word_embeddings=False)
    weights, saved = saved_by_transformers(transformers.Qwen3ForCausalLM(config),
                                           tmp_path / "bf16")
    source = write_folder(tmp_path / "fp8", fine_grained_fp8(weights),
                          {**saved, "quantization_config": FP8_CONFIG})
    assert_dequantized_as_transformers_loads(source, tmp_path)


def test_partial_edge_blocks_read_as_transformers_expands_them() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from quantize_cli.formats.layouts.fp8 import ScaleInverseFp8

    # DeepSeek-V3's kv_a_proj_with_mqa is 576 × 7168: 4.5 blocks of rows.
    weight = (np.random.default_rng(1).standard_normal((576, 320)) * 0.02).astype(BF16)
    stored = fine_grained_fp8({"self_attn.kv_a_proj.weight": weight})
    codes = stored["self_attn.kv_a_proj.weight"]
    scale = stored["self_attn.kv_a_proj.weight_scale_inv"]
    assert scale.shape == (5, 3)
    # transformers' own block expansion (the one its backward pass uses), in float32.
    theirs = _dequantize_fp8_weight(torch.from_numpy(codes.view(np.uint8)).view(
        torch.float8_e4m3fn), torch.from_numpy(scale), [128, 128], torch.float32)
    from quantize_cli.core import QuantizedRows, dequantize_rows

    ours = dequantize_rows(QuantizedRows(codes, scale), Scheme("fp8", "block", 128, "none"),
                           np.float32)
    assert np.array_equal(ours, theirs.numpy())
    assert ScaleInverseFp8.name == "fp8 weight_scale_inv"


# ------------------------------------------------------------------- gpt-oss MXFP4


def gpt_oss_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((64, 128)),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((128, 128))}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        weights.update({f"{prefix}.gate_up_proj": rng.standard_normal((4, 64, 128)),
                        f"{prefix}.gate_up_proj_bias": rng.standard_normal((4, 128)),
                        f"{prefix}.down_proj": rng.standard_normal((4, 64, 64)),
                        f"{prefix}.down_proj_bias": rng.standard_normal((4, 64))})
    return {name: (value * 0.02).astype(BF16) for name, value in weights.items()}


def test_gpt_oss_experts_are_read_into_the_bf16_release_layout(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "gpt-oss", to_gpt_oss_mxfp4(gpt_oss_weights()),
                          {"model_type": "gpt_oss",
                           "quantization_config": {"quant_method": "mxfp4"}})
    shown = run_ok(CliRunner(), "inspect", str(source))
    assert "gpt-oss MXFP4 experts (from BF16) → model.layers.0.mlp.experts.down_proj" in shown
    run_ok(CliRunner(), "dequantize", str(source), "-o", str(tmp_path / "bf16"), "-q")
    _, restored = read_with_safetensors(tmp_path / "bf16" / "model.safetensors")
    assert {name: (dtype, tuple(shape)) for name, (dtype, shape, _) in restored.items()} == {
        name: ("BF16", value.shape) for name, value in gpt_oss_weights().items()}
    compared = json.loads(run_ok(CliRunner(), "diff", str(tmp_path / "bf16"), str(source),
                                 "--json"))
    assert all(t["stats"]["sqnr_db"] is None for t in compared["tensors"])  # identical
    # Every expert is within MXFP4's error of the float weights, in its own place.
    write_folder(tmp_path / "float", gpt_oss_weights(), {"model_type": "gpt_oss"})
    against_float = json.loads(run_ok(CliRunner(), "diff", str(tmp_path / "float"),
                                      str(source), "--json"))
    experts = [t["stats"]["sqnr_db"] for t in against_float["tensors"]
               if t["name"].endswith("_proj")]
    assert len(experts) == 4 and all(15 < sqnr < 25 for sqnr in experts)


def test_gpt_oss_reads_as_transformers_reads_it(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    weights, saved = saved_by_transformers(transformers.GptOssForCausalLM(config),
                                           tmp_path / "bf16")
    source = write_folder(tmp_path / "mxfp4", to_gpt_oss_mxfp4(weights),
                          {**saved, "quantization_config": {"quant_method": "mxfp4"}})
    assert_dequantized_as_transformers_loads(source, tmp_path)


# --------------------------------------------------------------- what qz does not read


def gptq_tensors() -> dict[str, np.ndarray]:
    """A layer as GPTQ stores it: 4-bit codes packed eight to an int32 down the input
    axis, packed zero points, F16 scales per group of 128 and the group of each input."""
    rng = np.random.default_rng(0)
    return {"model.layers.0.mlp.up_proj.qweight": rng.integers(0, 2**31, (32, 512), np.int32),
            "model.layers.0.mlp.up_proj.qzeros": rng.integers(0, 2**31, (2, 64), np.int32),
            "model.layers.0.mlp.up_proj.scales": rng.random((2, 512)).astype(np.float16),
            "model.layers.0.mlp.up_proj.g_idx": np.arange(256, dtype=np.int32) // 128,
            "model.embed_tokens.weight": rng.standard_normal((64, 256)).astype(np.float16)}


REFUSED = [
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True},
     gptq_tensors(), "is a GPTQ checkpoint (4-bit, groups of 128, act-order)"),
    ("awq", {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
     {k: v for k, v in gptq_tensors().items() if not k.endswith("g_idx")},
     "is an AWQ checkpoint (4-bit, groups of 128)"),
    ("bitsandbytes-by-names", None, {
        "model.layers.0.mlp.up_proj.weight": np.zeros((4096, 1), np.uint8),
        "model.layers.0.mlp.up_proj.weight.absmax": np.ones(128, np.float32),
        "model.layers.0.mlp.up_proj.weight.quant_map": np.ones(16, np.float32),
        "model.embed_tokens.weight": np.ones((64, 256), np.float16)},
     "is a bitsandbytes checkpoint"),
    ("gptq-by-names", None, gptq_tensors(), "is a GPTQ checkpoint"),
    ("hqq", {"quant_method": "hqq", "nbits": 4}, {"w": np.ones((64, 64), np.float16)},
     "is quantized with 'hqq' (config.json's quantization_config), which qz does not read"),
]


@pytest.mark.parametrize(("config", "tensors", "what"), [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])
def test_quantizations_qz_does_not_read_are_refused_by_name(
        tmp_path: Path, config: dict[str, Any] | None, tensors: dict[str, np.ndarray],
        what: str) -> None:
    source = tmp_path / "model"
    source.mkdir()
    write_safetensors(source / "model.safetensors", tensors)
    (source / "config.json").write_text(json.dumps(
        {"model_type": "llama", **({"quantization_config": config} if config else {})}))
    before = snapshot(tmp_path)
    for command in (["quantize", str(source)], ["dequantize", str(source)],
                    ["diff", str(source), str(source)], ["quantize", str(source), "--dry-run"]):
        stderr = run_fail(CliRunner(), 1, *command)
        lines = stderr.splitlines()
        assert len(lines) == 2 and lines[0] == f"Error: {source}: {what}", stderr
        assert lines[1].startswith("Hint: ") and "float release" in lines[1]
    assert snapshot(tmp_path) == before  # nothing written, the input unchanged
    shown = json.loads(run_ok(CliRunner(), "inspect", str(source), "--json"))
    assert shown["refused"] == what.removeprefix("is ")
    assert f"{what.removeprefix('is ')}, which qz does not read" in " ".join(
        run_ok(CliRunner(), "inspect", str(source)).split())


def test_a_config_that_claims_a_quantization_no_file_holds_is_refused(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "model", llama_weights(),
                          {"model_type": "llama", "quantization_config": FP8_CONFIG})
    stderr = run_fail(CliRunner(), 1, "quantize", str(source))
    assert stderr.startswith(f"Error: {source}: config.json declares fp8 quantization, but "
                             "no file holds quantized weights\n")


# ------------------------------------------------- compressed-tensors from llm-compressor


def test_activation_scales_and_plain_group_indexes_are_not_weights(tmp_path: Path) -> None:
    # llm-compressor's NVFP4 and FP8 write each layer's static activation scale beside its
    # weight, and GPTQ exports a group index: a float model has neither.
    source = tmp_path / "model"
    source.mkdir()
    write_safetensors(source / "model.safetensors", llama_weights())
    (source / "config.json").write_text('{"model_type": "llama"}')
    exported = tmp_path / "exported"
    run_ok(CliRunner(), "quantize", str(source), "--format", "compressed-tensors", "--bits",
           "4", "-o", str(exported), "-q")
    metadata, tensors = read_with_safetensors(exported / "model.safetensors")
    extra = {"model.layers.0.mlp.up_proj.input_global_scale": np.ones(1, np.float32),
             "model.layers.0.mlp.up_proj.weight_g_idx": np.arange(256, dtype=np.int32) // 128}
    arrays = {name: np.frombuffer(data, {"BF16": BF16, "I32": np.int32, "I64": np.int64,
                                         "F32": np.float32}[dtype]).reshape(shape)
              for name, (dtype, shape, data) in tensors.items()}
    write_safetensors(exported / "model.safetensors", {**arrays, **extra}, metadata)
    shown = {t["name"]: t["role"] for t in json.loads(run_ok(
        CliRunner(), "inspect", str(exported), "--json"))["tensors"]}
    assert shown["model.layers.0.mlp.up_proj.input_global_scale"] == "activation_scale"
    assert shown["model.layers.0.mlp.up_proj.weight_g_idx"] == "group_index"
    run_ok(CliRunner(), "dequantize", str(exported), "-o", str(tmp_path / "restored"), "-q")
    _, restored = read_with_safetensors(tmp_path / "restored" / "model.safetensors")
    assert set(restored) == set(llama_weights())
    # A group index that reorders the groups (GPTQ's activation order) is refused.
    reordered = np.argsort(np.random.default_rng(0).random(256)).astype(np.int32) % 2
    write_safetensors(exported / "model.safetensors", {
        **arrays, **extra, "model.layers.0.mlp.up_proj.weight_g_idx": reordered}, metadata)
    stderr = run_fail(CliRunner(), 1, "dequantize", str(exported), "-o",
                      str(tmp_path / "again"))
    assert stderr.startswith(f"Error: {exported / 'model.safetensors'}: tensor "
                             "'model.layers.0.mlp.up_proj.weight_g_idx': reorders the "
                             "weight's groups (GPTQ's activation order), which qz does not "
                             "read\n")


# ------------------------------------------------------------ mixture-of-experts stacks


def test_expert_stacks_are_quantized_per_expert_or_kept_with_the_reason(tmp_path: Path) -> None:
    # gpt-oss's experts read back as (experts, in, out): each expert's rows get their
    # own scales in qz's format; formats whose runtimes load experts one 2-D matrix at a
    # time keep the stack, and say why.
    source = write_folder(tmp_path / "gpt-oss", to_gpt_oss_mxfp4(gpt_oss_weights()),
                          {"model_type": "gpt_oss",
                           "quantization_config": {"quant_method": "mxfp4"}})
    name = "model.layers.0.mlp.experts.gate_up_proj"
    run_ok(CliRunner(), "quantize", str(source), "--block", "64", "-o", str(tmp_path / "q"),
           "-q")
    _, stored = read_with_safetensors(tmp_path / "q" / "model.safetensors")
    assert stored[name][:2] == ("I8", [4, 64, 128])
    assert stored[name + "_scale"][:2] == ("F32", [4, 64, 2])  # per expert, row and group
    reasons = {}
    for flags in (["--method", "fp8"], ["--format", "compressed-tensors"],
                  ["--format", "mlx"]):
        plan = json.loads(run_ok(CliRunner(), "quantize", str(source), "--dry-run", "--json",
                                 "-", *flags))
        reasons[flags[-1]] = next(t["reason"] for t in plan["tensors"] if t["name"] == name)
    assert reasons == {
        "fp8": "kept: 128×128 blocks need a 2-D tensor, not a 3-D one",
        "compressed-tensors": "kept for vLLM: not a layer's .weight",
        "mlx": "kept for MLX: MLX quantizes the 2-D weights of Linear and Embedding layers"}
