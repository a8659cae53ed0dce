"""Regenerate the bundled sample checkpoints (deterministic: fixed seeds).

    pip install -e '.[samples]'
    python sample_weights/make_samples.py

Writes, beside this script:

* digits_mlp.safetensors: a 64-256-128-10 ReLU MLP trained with scikit-learn on its
  bundled 8×8 digits data set, with the held-out evaluation images and labels;
* tiny_llama_bf16.safetensors: a transformer-shaped BF16 checkpoint (random weights);
* tiny_llama_sharded/: the same tensors split into two shards with an index, a
  config.json and a tokenizer stand-in, as a Hugging Face model folder;
* tiny_llama_fp8/: the same model as DeepSeek-V3 and the Qwen3 -FP8 releases ship
  theirs: each projection in FP8 E4M3 with a weight_scale_inv per 128×128 block.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from quantize_cli.storage.writer import PlannedTensor, SafetensorsWriter

HERE = Path(__file__).resolve().parent
SEED = 20261126

DTYPE_CODES = {
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int64): "I64",
}


def save(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    planned = [PlannedTensor(name, DTYPE_CODES[array.dtype], array.shape)
               for name, array in tensors.items()]
    with SafetensorsWriter(path, planned, metadata) as writer:
        for name, array in tensors.items():
            writer.write(name, array)
        writer.publish()


def make_digits_mlp() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    images = digits.data.astype(np.uint8)  # pixel values 0..16
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    model = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=400, random_state=0)
    model.fit(train_x / 16.0, train_y)
    accuracy = float(model.score(test_x / 16.0, test_y))
    tensors: dict[str, np.ndarray] = {}
    for layer, (weight, bias) in enumerate(zip(model.coefs_, model.intercepts_, strict=True)):
        # scikit-learn stores (in, out); checkpoints conventionally store (out, in).
        tensors[f"layers.{layer}.weight"] = np.ascontiguousarray(weight.T, dtype=np.float32)
        tensors[f"layers.{layer}.bias"] = bias.astype(np.float32)
    tensors["eval.images"] = np.ascontiguousarray(test_x, dtype=np.uint8)
    tensors["eval.labels"] = test_y.astype(np.int64)
    save(HERE / "digits_mlp.safetensors", tensors, {
        "description": "64-256-128-10 ReLU MLP trained on scikit-learn's digits",
        "input": "eval.images / 16.0, flattened 8x8",
        "activation": "relu",
        "eval_accuracy": f"{accuracy:.6f}",
    })
    print(f"digits_mlp: held-out accuracy {accuracy:.4f} on {len(test_y)} images")


def tiny_llama_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    vocab, hidden, intermediate, layers = 256, 128, 344, 2  # 344 = 2·128 + 88: a tail block
    bf16 = ml_dtypes.bfloat16

    def weight(rows: int, columns: int) -> np.ndarray:
        return (rng.standard_normal((rows, columns)) * 0.02).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.standard_normal(hidden) * 0.05).astype(bf16)

    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": weight(vocab, hidden).astype(bf16),
        "model.position_ids": np.arange(64, dtype=np.int64).reshape(1, 64),
    }
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = norm()
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            values = weight(hidden, hidden)
            if projection == "q_proj":
                values[:, 7] *= 12.0  # an outlier input channel, as in real attention
            tensors[f"{prefix}.self_attn.{projection}.weight"] = values.astype(bf16)
            if projection != "o_proj":
                bias = (rng.standard_normal(hidden) * 0.01).astype(bf16)
                tensors[f"{prefix}.self_attn.{projection}.bias"] = bias
        tensors[f"{prefix}.post_attention_layernorm.weight"] = norm()
        for projection, shape in (("gate_proj", (intermediate, hidden)),
                                  ("up_proj", (intermediate, hidden)),
                                  ("down_proj", (hidden, intermediate))):
            values = weight(*shape)
            if projection == "down_proj":
                # A few large outliers: they spoil their own block, not the whole row.
                rows = rng.integers(0, shape[0], 4)
                columns = rng.integers(0, shape[1], 4)
                values[rows, columns] = rng.choice([-1.0, 1.0], 4) * 0.8
            tensors[f"{prefix}.mlp.{projection}.weight"] = values.astype(bf16)
    tensors["model.norm.weight"] = norm()
    tensors["lm_head.weight"] = weight(vocab, hidden).astype(bf16)
    return tensors


def make_tiny_llama() -> None:
    tensors = tiny_llama_tensors()
    save(HERE / "tiny_llama_bf16.safetensors", tensors, {"format": "pt"})

    folder = HERE / "tiny_llama_sharded"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save(folder / shard, {name: tensors[name] for name in shard_names}, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, shard))
    total = sum(array.nbytes for array in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128,
              "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 256, "torch_dtype": "bfloat16", "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "stand-in"}}) + "\n")


def fine_grained_fp8(weights: dict[str, np.ndarray], block: int = 128
                     ) -> dict[str, np.ndarray]:
    """Every ``*_proj.weight`` as DeepSeek's ``weight_quant`` stores it: per block of
    ``block`` × ``block`` (partial at the edges), s = max|x| / 448, the E4M3 value of
    x / s, and s as ``weight_scale_inv`` (float32); the other tensors as they are."""
    tensors: dict[str, np.ndarray] = {}
    for name, array in weights.items():
        if not name.endswith("_proj.weight"):
            tensors[name] = array
            continue
        values = array.astype(np.float32)
        rows, columns = values.shape
        scale = np.empty((-(-rows // block), -(-columns // block)), np.float32)
        codes = np.empty(values.shape, ml_dtypes.float8_e4m3fn)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
                scale[i, j] = np.abs(values[tile]).max() / np.float32(448)
                codes[tile] = (values[tile] / scale[i, j]).astype(ml_dtypes.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = codes, scale
    return tensors


def make_tiny_llama_fp8(block: int = 128) -> None:
    tensors = fine_grained_fp8(tiny_llama_tensors(), block)
    folder = HERE / "tiny_llama_fp8"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    save(folder / "model.safetensors", tensors, {"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128,
              "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 256, "torch_dtype": "bfloat16", "model_type": "llama",
              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "fmt": "e4m3", "weight_block_size": [block, block]}}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    make_digits_mlp()
    make_tiny_llama()
    make_tiny_llama_fp8()
