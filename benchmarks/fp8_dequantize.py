"""`qz dequantize` of a DeepSeek-style FP8 folder, beside a plain read and write of it.

    python benchmarks/fp8_dequantize.py [--size-gb 1.5] [--repeat 3] [--folder benchmarks/out]

The folder is built the way DeepSeek-V3 ships its weights: two shards of FP8 E4M3 expert
matrices (7168×2048 and 2048×7168) with a float32 ``weight_scale_inv`` per 128×128 block,
BF16 norms, and config.json's ``quantization_config`` (``quant_method: fp8``). qz turns it
into BF16 (twice the bytes). The plain baseline reads every file of the folder and writes
it again, fsynced as qz fsyncs its output; both run as child processes, interleaved, best
of ``--repeat``, with the files in the page cache. The ratio baseline / qz is the figure
(goal: at least 0.5); the peak resident memory of qz (``os.wait4``'s ru_maxrss) must stay
bounded by a chunk, not grow with the folder.
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

from quantize_cli.storage.writer import PlannedTensor, SafetensorsWriter

SHAPES = ((7168, 2048), (2048, 7168))
BLOCK = 128
CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
          "torch_dtype": "bfloat16", "hidden_size": 7168,
          "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK]}}


def make_folder(folder: Path, size_gb: float) -> None:
    """Two shards of FP8 matrices with their block scales, and config.json."""
    rng = np.random.default_rng(0)
    per_matrix = SHAPES[0][0] * SHAPES[0][1]
    count = max(2, math.ceil(size_gb * 1e9 / per_matrix))
    folder.mkdir(parents=True)
    weight_map = {}
    for shard in range(2):
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        planned = []
        for index in range(shard, count, 2):
            shape = SHAPES[index % 2]
            weight = f"model.layers.{index}.mlp.experts.0.down_proj.weight"
            scales = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
            planned += [PlannedTensor(weight, "F8_E4M3", shape),
                        PlannedTensor(weight + "_scale_inv", "F32", scales),
                        PlannedTensor(f"model.layers.{index}.input_layernorm.weight", "BF16",
                                      (7168,))]
        with SafetensorsWriter(folder / name, planned, {"format": "pt"}) as writer:
            for tensor in planned:
                weight_map[tensor.name] = name
                if tensor.dtype == "F8_E4M3":
                    for start in range(0, tensor.shape[0], 1024):
                        rows = min(1024, tensor.shape[0] - start)
                        values = rng.standard_normal((rows, tensor.shape[1]), np.float32) * 100
                        writer.write(tensor.name, np.clip(values, -448, 448).astype(
                            ml_dtypes.float8_e4m3fn))
                elif tensor.dtype == "F32":
                    writer.write(tensor.name, (rng.random(tensor.shape, np.float32) + 0.5)
                                 * np.float32(1e-4))
                else:
                    writer.write(tensor.name, np.ones(tensor.shape, ml_dtypes.bfloat16))
            writer.publish()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))


def timed(command: list[str]) -> tuple[float, float]:
    """Run a child process; return (seconds, peak RSS in MB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return seconds, usage.ru_maxrss / 1024  # Linux reports kilobytes


def copy_folder(source: Path, target: Path) -> None:
    """The baseline: read every file and write it again, fsynced."""
    target.mkdir()
    for path in sorted(source.iterdir()):
        with open(path, "rb") as reading, open(target / path.name, "wb") as writing:
            shutil.copyfileobj(reading, writing, 64 * 1024 * 1024)
            writing.flush()
            os.fsync(writing.fileno())


def main() -> None:
    if sys.argv[1:2] == ["--copy"]:
        copy_folder(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    source = args.folder / f"fp8_{args.size_gb:g}gb"
    if not source.exists():
        print(f"writing {source} …")
        make_folder(source, args.size_gb)
    size = sum(path.stat().st_size for path in source.iterdir())
    copied, restored = source.with_name(source.name + ".copy"), source.with_name(
        source.name + ".bf16")
    plain: list[float] = []
    ours: list[tuple[float, float]] = []
    for _ in range(args.repeat):
        shutil.rmtree(copied, ignore_errors=True)
        plain.append(timed([sys.executable, __file__, "--copy", str(source), str(copied)])[0])
        shutil.rmtree(restored, ignore_errors=True)
        ours.append(timed([sys.executable, "-m", "quantize_cli", "dequantize", str(source),
                           "-o", str(restored), "-q"]))
    written = sum(path.stat().st_size for path in restored.iterdir())
    best_plain, (best_ours, _) = min(plain), min(ours)
    peak = max(rss for _, rss in ours)
    print(f"FP8 folder {size / 1e9:.2f} GB → BF16 {written / 1e9:.2f} GB, best of {args.repeat}")
    print(f"  plain read + write (fsynced):  {best_plain:6.2f} s  "
          f"({size / best_plain / 1e9:.2f} GB/s)")
    print(f"  qz dequantize:                 {best_ours:6.2f} s  "
          f"({size / best_ours / 1e9:.2f} GB/s in, {written / best_ours / 1e9:.2f} GB/s out)"
          f", peak RSS {peak:.0f} MB")
    print(f"  ratio plain / qz: {best_plain / best_ours:.2f} (goal ≥ 0.5)")
    shutil.rmtree(copied, ignore_errors=True)
    shutil.rmtree(restored, ignore_errors=True)


if __name__ == "__main__":
    main()
