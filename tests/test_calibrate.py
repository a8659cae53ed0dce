"""`qz calibrate` and `qz quantize --calibration`: the statistics of a tiny model equal
XᵀX computed directly from its layers' inputs, one file serves several quantize runs,
and the reports give the layers' output error. Needs torch and transformers (the
``calibrate`` extra, which ``interop`` includes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import read_with_safetensors, run_fail, run_ok

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ["the", "model", "reads", "text", "and", "every", "layer", "sees", "its", "inputs",
         "quantized", "weights", "keep", "outputs", "close", "to", "float", "ones"]


def tiny_bert(folder: Path) -> Path:
    """A two-layer BERT with a word-level vocabulary, as save_pretrained writes it."""
    torch.manual_seed(0)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    config = transformers.BertConfig(vocab_size=len(vocabulary), hidden_size=64,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def text_file(path: Path, words: int = 3000) -> Path:
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(WORDS, words)))
    return path


def direct_moments(folder: Path, windows: list[list[int]]) -> dict[str, dict[str, Any]]:
    """XᵀX / n and max |x| of every linear layer's input, from hooks on a plain forward
    pass of the whole model over the windows (float64)."""
    model = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    found: dict[str, dict[str, Any]] = {}

    def hook_for(name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            flat = args[0].reshape(-1, args[0].shape[-1]).double()
            entry = found.setdefault(name, {"product": 0, "largest": 0, "tokens": 0})
            entry["product"] = entry["product"] + flat.T @ flat
            entry["largest"] = torch.maximum(torch.as_tensor(entry["largest"]),
                                             flat.abs().amax(dim=0))
            entry["tokens"] += flat.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("encoder."):
            module.register_forward_pre_hook(hook_for(name))
    with torch.no_grad():
        model(input_ids=torch.tensor(windows))
    return found


def test_statistics_equal_the_inputs_second_moment_computed_directly(tmp_path: Path) -> None:
    model = tiny_bert(tmp_path / "bert")
    stats = tmp_path / "stats.safetensors"
    stdout = run_ok(CliRunner(), "calibrate", str(model), "--text",
                    str(text_file(tmp_path / "text.txt")), "-o", str(stats), "--sequences",
                    "12", "--length", "32")
    assert "Ran 12 sequences of 32 tokens (384 tokens)" in stdout
    assert "recorded the inputs of 12 linear layers (8 distinct)" in stdout
    metadata, stored = read_with_safetensors(stats)
    record = json.loads(metadata["qz.calibration"])
    assert (record["tokens"], record["sequences"], record["length"]) == (384, 12, 32)
    # q, k and v read one input, named after the first of them.
    assert record["layers"]["encoder.layer.1.attention.self.value"] == (
        "encoder.layer.1.attention.self.query")
    from quantize_cli.jobs.calibrate import _windows

    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    windows = _windows(tokenizer, (tmp_path / "text.txt").read_text(), 12, 32,
                       tmp_path / "text.txt")
    direct = direct_moments(model, windows)
    for layer, entry in record["layers"].items():
        expected = direct[layer]
        moment = expected["product"].numpy() / expected["tokens"]
        _, shape, data = stored[entry + ".second_moment"]
        ours = np.frombuffer(data, np.float32).reshape(shape)
        assert np.allclose(ours, moment, rtol=1e-5, atol=1e-6 * np.abs(moment).max()), layer
        _, _, data = stored[entry + ".mean_square"]
        assert np.allclose(np.frombuffer(data, np.float32), np.diagonal(moment), rtol=1e-5)
        _, _, data = stored[entry + ".max_abs"]
        assert np.allclose(np.frombuffer(data, np.float32), expected["largest"].numpy(),
                           rtol=1e-6)


def test_one_statistics_file_serves_several_quantize_runs(tmp_path: Path) -> None:
    model = tiny_bert(tmp_path / "bert")
    stats = tmp_path / "stats.safetensors"
    run_ok(CliRunner(), "calibrate", str(model), "--text", str(text_file(tmp_path / "t.txt")),
           "-o", str(stats), "--sequences", "12", "--length", "32", "-q")
    outputs = {}
    for name, flags in (("int4", ["--bits", "4", "--block", "32"]),
                        ("int4-act-order", ["--bits", "4", "--block", "32", "--act-order"]),
                        ("mlx", ["--format", "mlx", "--bits", "4", "--block", "32"]),
                        ("ct", ["--format", "compressed-tensors", "--bits", "4", "--block",
                                "32"])):
        report = json.loads(run_ok(CliRunner(), "quantize", str(model), "-o",
                                   str(tmp_path / name), "--calibration", str(stats),
                                   "--json", "-", *flags))
        calibrated = [t for t in report["tensors"] if t["output_stats"] is not None]
        assert calibrated, name
        outputs[name] = report["totals"]["pooled_output"]["sqnr_db"]
        assert all(t["name"].startswith("encoder.") for t in calibrated)
    assert all(sqnr > 10 for sqnr in outputs.values())
    # Without calibration, no output error; with it, never worse than without (per row).
    plain = json.loads(run_ok(CliRunner(), "quantize", str(model), "-o", str(tmp_path / "p"),
                              "--bits", "4", "--block", "32", "--json", "-"))
    assert plain["totals"]["pooled_output"] is None
    metadata, _ = read_with_safetensors(tmp_path / "int4-act-order" / "model.safetensors")
    assert "--calibration stats.safetensors --act-order" in metadata["qz.command"]
    assert json.loads(metadata["qz.options"])["calibration"]["file"] == "stats.safetensors"


def test_calibration_options_and_files_are_checked(tmp_path: Path) -> None:
    model = tiny_bert(tmp_path / "bert")
    stderr = run_fail(CliRunner(), 2, "quantize", str(model), "--act-order")
    assert "--act-order applies to GPTQ, which needs --calibration" in stderr
    stderr = run_fail(CliRunner(), 1, "quantize", str(model), "--calibration",
                      str(model / "model.safetensors"))
    assert stderr.startswith(f"Error: {model / 'model.safetensors'}: is not a calibration "
                             "statistics file of this qz version\n")
    short = tmp_path / "short.txt"
    short.write_text("the model")
    stderr = run_fail(CliRunner(), 1, "calibrate", str(model), "--text", str(short))
    assert "holds 2 tokens, fewer than one window of 64" in stderr


def test_a_causal_language_model_is_calibrated_block_by_block(tmp_path: Path) -> None:
    # Llama's blocks take position embeddings and masks as keyword arguments, captured
    # once at the first block and given to every block.
    folder = tiny_bert(tmp_path / "tokenizer-source")
    model = tmp_path / "llama"
    model.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (model / name).write_bytes((folder / name).read_bytes())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS) + 5, hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(model)
    stats = tmp_path / "stats.safetensors"
    run_ok(CliRunner(), "calibrate", str(model), "--text", str(text_file(tmp_path / "t.txt")),
           "-o", str(stats), "--sequences", "8", "--length", "32", "-q")
    metadata, _ = read_with_safetensors(stats)
    layers = json.loads(metadata["qz.calibration"])["layers"]
    assert layers["model.layers.1.self_attn.v_proj"] == "model.layers.1.self_attn.q_proj"
    assert layers["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert layers["model.layers.1.mlp.down_proj"] == "model.layers.1.mlp.down_proj"
    assert len(layers) == 14  # lm_head reads what the final norm makes: not calibrated
    report = json.loads(run_ok(CliRunner(), "quantize", str(model), "--bits", "4", "--block",
                               "32", "--calibration", str(stats), "--json", "-"))
    assert report["totals"]["pooled_output"]["sqnr_db"] > report["totals"]["pooled"]["sqnr_db"]


def test_layers_share_an_input_only_while_it_is_the_same_tensor() -> None:
    """Inputs are matched by address: a temporary freed after the first layer reads it
    must not make the next layer's new input (same size, often the same address) look
    shared."""
    from quantize_cli.jobs.calibrate import _shared_inputs
    from quantize_cli.jobs.reports import NoProgress

    class Block(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
            self.third = torch.nn.Linear(64, 64)

        def forward(self, x: Any) -> Any:
            self.first(x * 2)  # its input is freed as soon as the layer has run
            shared = x * 3
            return self.second(shared) + self.third(shared)

    hidden = torch.randn(4, 256, 64)
    for _ in range(20):  # an address is reused often, not always: ask many times
        inputs = _shared_inputs([("block", Block())], ([hidden], {}), torch,
                                NoProgress())
        assert inputs == {"block.first": "block.first", "block.second": "block.second",
                          "block.third": "block.second"}
