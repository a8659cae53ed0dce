"""Interoperability: the tools people run models with load what qz writes, on CPU.

* compressed-tensors' own decompression of qz's export equals qz's dequantized values
  bit for bit, and transformers (with compressed-tensors) runs the export and gives the
  logits of qz's dequantized folder, with tied and untied embeddings;
* transformers refuses a qz-format folder, naming qz;
* MLX: ``mx.dequantize`` of qz's MLX export equals qz's dequantize bit for bit, its error
  is no worse than ``mx.quantize``'s, and mlx-lm loads the folder and generates;
* a sentence-transformers folder (with ``1_Pooling/``) survives quantize and dequantize
  and still loads.

Needs the ``interop`` extra (``pip install -e '.[interop]'``); each part is skipped
without its library.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import run_ok, write_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_weights"
VOCAB = 256


def qz(*args: str) -> str:
    return run_ok(CliRunner(), *args)


def export_and_restore(source: Path, folder: Path, *flags: str,
                       format_name: str = "compressed-tensors") -> tuple[Path, Path]:
    exported, restored = folder / "export", folder / "restored"
    qz("quantize", str(source), "--format", format_name, "-o", str(exported), "-q", *flags)
    qz("dequantize", str(exported), "-o", str(restored), "-q")
    return exported, restored


def tensors_of(folder: Path, framework: str = "pt") -> dict[str, Any]:
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework=framework) as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                found[name] = handle.get_tensor(name)
    return found


def llama_folder(folder: Path, *, tied: bool, with_tokenizer: bool = False) -> Path:
    """A small Llama-shaped BF16 model saved the way transformers saves it; its Linear
    layers meet vLLM's shape rules, and its last dimensions divide by MLX's groups."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    if with_tokenizer:
        save_tokenizer(folder)
    return folder


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>")
    tokenizer.save_pretrained(folder)


def logits(folder: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(torch.arange(3, 35).reshape(1, -1)).logits


# ----------------------------------------------------------------- compressed-tensors


def decompressed_by_compressed_tensors(exported: Path) -> dict[str, Any]:
    """Every quantized weight of an export, as compressed-tensors' own compressor for the
    config's format decompresses it."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    groups = QuantizationConfig.model_validate(config).config_groups
    stored = tensors_of(exported)
    weights = {}
    for name in stored:
        if name.endswith(".weight_scale"):
            module = name.removesuffix(".weight_scale")
            # The group that names the layer, else the one that targets every Linear.
            (key,) = [key for key, group in groups.items() if module in group.targets] or [
                key for key, group in groups.items() if "Linear" in group.targets]
            scheme = groups[key]
            compressor = BaseCompressor.get_value_from_registry(
                config["config_groups"][key]["format"])
            state = {part: stored[f"{module}.{part}"]
                     for part in compressor.compression_param_names(scheme)
                     if f"{module}.{part}" in stored}
            weights[module + ".weight"] = compressor.decompress(state, scheme)["weight"]
    return weights


@pytest.mark.parametrize("flags", [
    ["--per-channel"], ["--block", "128"], ["--block", "64"], ["--block", "32"],
    ["--bits", "4", "--block", "128"], ["--bits", "4", "--per-channel"],
    ["--bits", "4", "--method", "affine", "--block", "32"],
    ["--bits", "4", "--method", "affine", "--per-channel"],
    ["--method", "fp8", "--per-channel"], ["--method", "fp8", "--per-tensor"],
    ["--method", "fp8", "--block", "128"],
    *[["--bits", str(bits), "--method", method, "--block", "64"]
      for bits in (2, 3, 5, 6, 7) for method in ("absmax", "affine")],
    ["--scheme", "W8A8"], ["--scheme", "FP8_DYNAMIC"], ["--scheme", "FP8_BLOCK"],
    ["--scheme", "NVFP4A16"], ["--scheme", "MXFP4A16"], ["--method", "mxfp8"],
    ["--method", "nvfp4", "--clip", "none"], ["--method", "mxfp4", "--clip", "none"],
    ["--bits", "4", "--rule", "*.q_proj.*=int8", "--rule", "*.k_proj.*=int8",
     "--rule", "*.v_proj.*=int8"],
], ids=lambda flags: "-".join(flag.strip("-*.=_") for flag in flags))
def test_ct_bf16_sample_bit_for_bit(tmp_path: Path, flags: list[str]) -> None:
    exported, restored = export_and_restore(SAMPLES / "tiny_llama_sharded", tmp_path, *flags)
    theirs = decompressed_by_compressed_tensors(exported)
    ours = tensors_of(restored)
    # Weight-only layers run Marlin, which takes only the 2 × 4 attention projections of
    # this model; W8A8 and FP8 dynamic run every shape, so the MLPs too. lm_head stays.
    assert len(theirs) == (14 if flags[-1] in ("W8A8", "FP8_DYNAMIC") else 8)
    for name, weight in theirs.items():
        assert weight.dtype == ours[name].dtype == torch.bfloat16
        assert torch.equal(weight.view(torch.int16), ours[name].view(torch.int16)), name


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("flags", [["--block", "128"], ["--bits", "4", "--method", "affine"],
                                   ["--method", "fp8", "--block", "128"]],
                         ids=["int8", "int4-affine", "fp8-block"])
def test_ct_other_dtypes_bit_for_bit(tmp_path: Path, dtype: type, flags: list[str]) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "model"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {
        f"layers.{i}.proj.weight": (rng.standard_normal((128, 256)) * 0.05).astype(dtype)
        for i in range(2)})
    (folder / "config.json").write_text('{"model_type": "llama"}')
    exported, restored = export_and_restore(folder, tmp_path, *flags)
    theirs = decompressed_by_compressed_tensors(exported)
    ours = tensors_of(restored)
    assert len(theirs) == 2
    for name, weight in theirs.items():
        assert weight.dtype == ours[name].dtype
        assert torch.equal(weight.view(torch.uint8), ours[name].view(torch.uint8)), name


# transformers 5 sizes an asymmetric layer's zero point unpacked while compressed-tensors
# packs it, for every producer (llm-compressor#1618): compressed-tensors' own
# decompression of qz's asymmetric export is checked bit for bit above instead.
ASYMMETRIC_LOAD = pytest.mark.xfail(raises=RuntimeError, strict=True,
                                    reason="transformers cannot load packed zero points")


@pytest.mark.parametrize("flags", [
    ["--block", "128"], ["--bits", "4", "--block", "128"],
    pytest.param(["--bits", "4", "--method", "affine", "--block", "64"],
                 marks=ASYMMETRIC_LOAD),
    ["--scheme", "W3A16"], ["--scheme", "NVFP4A16"], ["--scheme", "MXFP4A16"],
    ["--method", "mxfp8"]],
    ids=["int8", "int4", "int4-affine", "int3", "nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_runs_the_ct_export_like_the_dequantized_folder(
        tmp_path: Path, tied: bool, flags: list[str]) -> None:
    pytest.importorskip("compressed_tensors")
    source = llama_folder(tmp_path / "llama", tied=tied)
    exported, restored = export_and_restore(source, tmp_path, *flags)
    config = json.loads((exported / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert ("lm_head.weight" in tensors_of(exported)) is not tied
    ours, theirs = logits(restored), logits(exported)
    assert torch.equal(ours, theirs)
    # And quantization changed the model only a little (3-bit and MXFP4 more: this
    # random model's logits lose about 0.05 of cosine there).
    original = logits(source)
    low_bit = {"W3A16", "MXFP4A16"} & set(flags)
    assert torch.nn.functional.cosine_similarity(original.flatten().float(),
                                                 theirs.flatten().float(), dim=0) > (
        0.93 if low_bit else 0.98)


@pytest.mark.parametrize("preset", ["W8A8", "FP8_DYNAMIC", "FP8_BLOCK"])
def test_transformers_runs_exports_that_quantize_activations(tmp_path: Path,
                                                             preset: str) -> None:
    # compressed-tensors quantizes each layer's inputs on the fly, so the logits are
    # those of the dequantized weights with activations rounded: close, not equal.
    pytest.importorskip("compressed_tensors")
    source = llama_folder(tmp_path / "llama", tied=False)
    exported, restored = export_and_restore(source, tmp_path, "--scheme", preset)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    projection = model.model.layers[0].self_attn.o_proj
    activations = projection.quantization_scheme.input_activations
    assert activations is not None and activations.dynamic is True
    with torch.no_grad():
        theirs = model(torch.arange(3, 35).reshape(1, -1)).logits
    ours = logits(restored)
    assert torch.nn.functional.cosine_similarity(ours.flatten().float(),
                                                 theirs.flatten().float(), dim=0) > 0.999


REFUSAL = "qz: quantized weights, run qz dequantize to restore a model loaders read"


@pytest.mark.parametrize("method", ["absmax", "fp8"])
def test_every_loader_refuses_a_qz_folder_naming_qz(tmp_path: Path, method: str) -> None:
    # Whatever dtype the caller asks for: the model type is read before anything else.
    source = llama_folder(tmp_path / "llama", tied=False, with_tokenizer=True)
    quantized = tmp_path / "llama.int8"
    qz("quantize", str(source), "-o", str(quantized), "-q", "--method", method)
    loads = [lambda: transformers.AutoModelForCausalLM.from_pretrained(quantized),
             lambda: transformers.AutoModelForCausalLM.from_pretrained(
                 quantized, dtype=torch.bfloat16),
             lambda: transformers.AutoModelForCausalLM.from_pretrained(
                 quantized, dtype="auto"),
             lambda: transformers.AutoModel.from_pretrained(quantized, dtype=torch.float32),
             lambda: transformers.AutoConfig.from_pretrained(quantized),
             # A model class named explicitly reads no model type; without a dtype it
             # resolves the config's, which names qz too.
             lambda: transformers.LlamaForCausalLM.from_pretrained(quantized)]
    for load in loads:
        with pytest.raises(Exception, match=re.escape(REFUSAL)):
            load()
    mlx_lm = pytest.importorskip("mlx_lm")
    with pytest.raises(Exception, match=re.escape(REFUSAL)):
        mlx_lm.load(str(quantized))
    # Dequantized, it loads again, as the model it was, from the very config it had.
    restored = tmp_path / "restored"
    qz("dequantize", str(quantized), "-o", str(restored), "-q")
    assert (restored / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert torch.nn.functional.cosine_similarity(
        logits(source).flatten().float(), logits(restored).flatten().float(), dim=0) > (
        0.999 if method == "absmax" else 0.995)


# ------------------------------------------------------------------------------- MLX


def mlx_quantized(exported: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    mx = pytest.importorskip("mlx.core")
    weights: dict[str, Any] = {}
    for path in sorted(exported.glob("*.safetensors")):
        weights.update(mx.load(str(path)))
    config = json.loads((exported / "config.json").read_text())
    return mx, weights, config["quantization"]


@pytest.mark.parametrize(("bits", "block"), [
    *[(bits, block) for bits in ("8", "4") for block in ("32", "64", "128")],
    *[(bits, "64") for bits in ("6", "5", "3", "2")]])
@pytest.mark.parametrize("method", ["affine", "absmax"])
def test_mlx_dequantize_equals_qz_bit_for_bit(tmp_path: Path, block: str, method: str,
                                              bits: str) -> None:
    source = llama_folder(tmp_path / "llama", tied=False)
    exported, restored = export_and_restore(source, tmp_path, "--block", block, "--method",
                                            method, "--bits", bits, format_name="mlx")
    mx, weights, quantization = mlx_quantized(exported)
    assert quantization == {"group_size": int(block), "bits": int(bits), "mode": "affine"}
    ours = tensors_of(restored, "numpy")
    quantized = [name.removesuffix(".scales") for name in weights if name.endswith(".scales")]
    assert len(quantized) == 2 * 7 + 2  # every projection, the embedding and the head
    for module in quantized:
        theirs = mx.dequantize(weights[f"{module}.weight"], weights[f"{module}.scales"],
                               weights[f"{module}.biases"], group_size=int(block),
                               bits=int(bits))
        assert theirs.dtype == mx.bfloat16
        theirs_bits = np.array(theirs.view(mx.uint16))
        assert np.array_equal(theirs_bits, ours[f"{module}.weight"].view(np.uint16)), module


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_mlx_modes_dequantize_as_qz_does_bit_for_bit(tmp_path: Path, mode: str) -> None:
    source = llama_folder(tmp_path / "llama", tied=False)
    exported, restored = export_and_restore(source, tmp_path, "--method", mode,
                                            format_name="mlx")
    mx, weights, quantization = mlx_quantized(exported)
    group, bits = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}[mode]
    assert quantization == {"group_size": group, "bits": bits, "mode": mode}
    ours = tensors_of(restored, "numpy")
    quantized = [name.removesuffix(".scales") for name in weights if name.endswith(".scales")]
    assert len(quantized) == 2 * 7 + 2 and not any(name.endswith(".biases") for name in weights)
    for module in quantized:
        theirs = mx.dequantize(weights[f"{module}.weight"], weights[f"{module}.scales"],
                               mode=mode, dtype=mx.bfloat16)
        assert np.array_equal(np.array(theirs.view(mx.uint16)),
                              ours[f"{module}.weight"].view(np.uint16)), module


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_mlx_modes_error_is_no_worse_than_mlx_quantize(tmp_path: Path, mode: str) -> None:
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(2)
    values = rng.standard_t(4, (256, 512)).astype(np.float32) * 0.02
    folder = tmp_path / "model"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors",
                      {"a.weight": values.astype(ml_dtypes.bfloat16)})
    (folder / "config.json").write_text('{"model_type": "llama"}')
    exported, _ = export_and_restore(folder, tmp_path, "--method", mode, format_name="mlx")
    _, weights, _ = mlx_quantized(exported)
    original = mx.array(values).astype(mx.bfloat16)
    reference = np.array(original.astype(mx.float32), dtype=np.float64)
    ours = mx.dequantize(weights["a.weight"], weights["a.scales"], mode=mode)
    theirs = mx.dequantize(*mx.quantize(original, mode=mode), mode=mode)
    ours_error = ((np.array(ours.astype(mx.float32)) - reference) ** 2).sum()
    theirs_error = ((np.array(theirs.astype(mx.float32)) - reference) ** 2).sum()
    # The searched FP4 scales beat MLX's rule; on MXFP8 both choose the same exponents.
    assert ours_error < theirs_error if mode != "mxfp8" else ours_error <= theirs_error


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mlx_error_is_no_worse_than_mlx_quantize(tmp_path: Path, dtype: str, bits: int) -> None:
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(1)
    values = {"a.weight": rng.standard_normal((256, 512)) * 0.02,
              "b.weight": rng.standard_t(3, (256, 512)) * 0.02}
    folder = tmp_path / "model"
    folder.mkdir()
    numpy_type = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    write_safetensors(folder / "model.safetensors",
                      {name: v.astype(np.float32).astype(numpy_type) for name, v in values.items()})
    (folder / "config.json").write_text('{"model_type": "llama"}')
    exported, _ = export_and_restore(folder, tmp_path, "--bits", str(bits), format_name="mlx")
    _, weights, _ = mlx_quantized(exported)
    for name in values:
        module = name.removesuffix(".weight")
        original = mx.array(values[name].astype(np.float32)).astype(getattr(mx, dtype))
        reference = np.array(original.astype(mx.float32), dtype=np.float64)
        ours = mx.dequantize(weights[name], weights[f"{module}.scales"],
                             weights[f"{module}.biases"], group_size=64, bits=bits)
        theirs = mx.dequantize(*mx.quantize(original, group_size=64, bits=bits), group_size=64,
                               bits=bits)
        ours_error = ((np.array(ours.astype(mx.float32)) - reference) ** 2).sum()
        theirs_error = ((np.array(theirs.astype(mx.float32)) - reference) ** 2).sum()
        assert ours_error <= theirs_error, (name, ours_error, theirs_error)


@pytest.mark.parametrize("flags", [[], ["--bits", "3"], ["--method", "mxfp4"],
                                   ["--method", "nvfp4"], ["--method", "mxfp8"]],
                         ids=["int8", "int3", "mxfp4", "nvfp4", "mxfp8"])
def test_mlx_lm_loads_the_export_and_generates(tmp_path: Path, flags: list[str]) -> None:
    mlx_lm = pytest.importorskip("mlx_lm")
    source = llama_folder(tmp_path / "llama", tied=True, with_tokenizer=True)
    exported = tmp_path / "llama.mlx"
    qz("quantize", str(source), "--format", "mlx", "-o", str(exported), "-q", *flags)
    model, tokenizer = mlx_lm.load(str(exported))
    projection = model.model.layers[0].self_attn.q_proj
    assert type(projection).__name__ == "QuantizedLinear"
    assert projection.mode == (flags[1] if "--method" in flags else "affine")
    text = mlx_lm.generate(model, tokenizer, prompt="w5 w6 w7", max_tokens=4)
    assert isinstance(text, str)


def test_mlx_lm_loads_mixed_schemes(tmp_path: Path) -> None:
    mlx_lm = pytest.importorskip("mlx_lm")
    source = llama_folder(tmp_path / "llama", tied=True, with_tokenizer=True)
    exported = tmp_path / "llama.mlx"
    qz("quantize", str(source), "--format", "mlx", "--bits", "4", "-o", str(exported), "-q",
       "--rule", "*.down_proj.weight=int8,block32", "--rule", "*.q_proj.weight=keep")
    model, tokenizer = mlx_lm.load(str(exported))
    layer = model.model.layers[0]
    assert (layer.mlp.down_proj.bits, layer.mlp.down_proj.group_size) == (8, 32)
    assert (layer.mlp.up_proj.bits, layer.mlp.up_proj.group_size) == (4, 64)
    assert type(layer.self_attn.q_proj).__name__ == "Linear"
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt="w5 w6", max_tokens=2), str)


# -------------------------------------------------------------- sentence-transformers


def test_sentence_transformers_folder_round_trips_and_still_loads(tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    bert = transformers.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=256,
                                   max_position_embeddings=64)
    folder = tmp_path / "encoder"
    transformers.BertModel(bert).save_pretrained(folder)
    save_tokenizer(folder)
    try:  # sentence-transformers 6 moved its modules
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer
    encoder = st.SentenceTransformer(modules=[Transformer(str(folder)), Pooling(128, "mean")])
    saved = tmp_path / "minilm"
    encoder.save(str(saved))
    assert (saved / "1_Pooling" / "config.json").is_file()
    quantized, restored = tmp_path / "minilm.int8", tmp_path / "minilm.dequant"
    qz("quantize", str(saved), "-o", str(quantized), "-q")
    qz("dequantize", str(quantized), "-o", str(restored), "-q")
    for output in (quantized, restored):
        assert (output / "1_Pooling" / "config.json").read_text() == (
            saved / "1_Pooling" / "config.json").read_text()
        assert (output / "modules.json").is_file() and (output / "tokenizer.json").is_file()
    with pytest.raises(Exception, match=re.escape(REFUSAL)):  # the qz folder: refused
        st.SentenceTransformer(str(quantized))
    sentences = ["w4 w5 w6", "w9 w8 w7 w6"]
    before = st.SentenceTransformer(str(saved)).encode(sentences)
    after = st.SentenceTransformer(str(restored)).encode(sentences)
    cosine = (before * after).sum(1) / np.linalg.norm(before, axis=1) / np.linalg.norm(
        after, axis=1)
    assert cosine.min() > 0.999
