"""Record what llm-compressor writes for each preset qz spells the same way, for
tests/test_presets.py to compare qz's compressed-tensors exports against.

Run with llm-compressor installed (the ``[bench]`` extra), from the repository root:

    python tests/golden/llm-compressor/record.py

It builds a small Llama-shaped BF16 model folder (random values: only names, shapes and
config.json matter here), runs ``llmcompressor.model_free_ptq`` on it with each preset,
and writes ``PRESET.json`` beside this script: the model it was given (config.json and
every tensor's shape) and what came out (``quantization_config`` and every tensor's dtype
and shape), with llm-compressor's version.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

PRESETS = ["W8A16", "W4A16", "W4A16_ASYM", "W2A16", "W3A16", "W8A8", "FP8_DYNAMIC",
           "FP8_BLOCK", "NVFP4A16", "MXFP4A16"]
HERE = Path(__file__).resolve().parent
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
          "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 512, "torch_dtype": "bfloat16",
          "tie_word_embeddings": False, "max_position_embeddings": 64, "rms_norm_eps": 1e-06}


def shapes() -> dict[str, list[int]]:
    hidden, inner, vocab = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = hidden // CONFIG["num_attention_heads"] * CONFIG["num_key_value_heads"]
    found = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden],
             "lm_head.weight": [vocab, hidden]}
    for layer in range(CONFIG["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        found.update({f"{prefix}.input_layernorm.weight": [hidden],
                      f"{prefix}.post_attention_layernorm.weight": [hidden],
                      f"{prefix}.self_attn.q_proj.weight": [hidden, hidden],
                      f"{prefix}.self_attn.k_proj.weight": [kv, hidden],
                      f"{prefix}.self_attn.v_proj.weight": [kv, hidden],
                      f"{prefix}.self_attn.o_proj.weight": [hidden, hidden],
                      f"{prefix}.mlp.gate_proj.weight": [inner, hidden],
                      f"{prefix}.mlp.up_proj.weight": [inner, hidden],
                      f"{prefix}.mlp.down_proj.weight": [hidden, inner]})
    return found


def main() -> None:
    import llmcompressor
    import torch
    from llmcompressor import model_free_ptq
    from safetensors import safe_open
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "model"
        model.mkdir()
        save_file({name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.02)
                   .to(torch.bfloat16) for name, shape in shapes().items()},
                  str(model / "model.safetensors"), metadata={"format": "pt"})
        (model / "config.json").write_text(json.dumps(CONFIG))
        for preset in PRESETS:
            output = Path(folder) / preset
            model_free_ptq(str(model), str(output), scheme=preset, ignore=["lm_head"])
            config = json.loads((output / "config.json").read_text())
            tensors = {}
            for path in sorted(output.glob("*.safetensors")):
                with safe_open(str(path), "pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 - a safetensors handle
                        piece = handle.get_slice(name)
                        tensors[name] = [piece.get_dtype(), list(piece.get_shape())]
            record = {"llmcompressor": llmcompressor.__version__,
                      "call": f'model_free_ptq(MODEL, OUT, scheme="{preset}", '
                              'ignore=["lm_head"])',
                      "model": {"config": CONFIG, "shapes": shapes()},
                      "quantization_config": config["quantization_config"],
                      "tensors": tensors}
            (HERE / f"{preset}.json").write_text(json.dumps(record, indent=1, sort_keys=True)
                                                 + "\n")
            print(f"recorded {preset}")


if __name__ == "__main__":
    main()
