"""Peak memory of `qz quantize` and `qz dequantize` on BF16 checkpoints of 1 and 3 GB.

    python benchmarks/memory.py [--sizes-gb 1 3] [--folder benchmarks/out]

Each checkpoint holds BF16 tensors of 8192×16384 (256 MiB each, the largest tensor the
bound is stated for), as many as it takes to reach the size. qz runs as a child process
(`python -m quantize_cli`), and its peak resident set size comes from the kernel
(``os.wait4``'s ru_maxrss). The bound to meet is 300 MB + 1.5 × the largest tensor in
float32 (here 300 + 1.5 × 537 = 1105 MB); with chunked streaming the peak should not
depend on the tensor size or on the checkpoint size, which a third checkpoint, one tensor
of 16384×32768 (1 GiB of BF16), checks.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from quantize_cli.storage.writer import PlannedTensor, SafetensorsWriter

SHAPE = (8192, 16384)
TENSOR_BYTES = SHAPE[0] * SHAPE[1] * 2


def make_checkpoint(path: Path, size_gb: float, shape: tuple[int, int] = SHAPE) -> None:
    count = max(1, math.ceil(size_gb * 1e9 / (shape[0] * shape[1] * 2)))
    rng = np.random.default_rng(0)
    planned = [PlannedTensor(f"model.layers.{i}.mlp.down_proj.weight", "BF16", shape)
               for i in range(count)]
    planned.append(PlannedTensor("model.norm.weight", "BF16", (shape[1],)))
    with SafetensorsWriter(path, planned, {"format": "pt"}) as writer:
        for tensor in planned:
            rows = tensor.shape[0] if len(tensor.shape) > 1 else 1
            for start in range(0, rows, 1024):  # generate in pieces: bounded memory here too
                piece_rows = min(1024, rows - start)
                piece = rng.standard_normal((piece_rows, tensor.shape[-1]), dtype=np.float32)
                writer.write(tensor.name, (piece * np.float32(0.02)).astype(ml_dtypes.bfloat16))
        writer.publish()


def run(*args: str) -> tuple[float, float]:
    """Run qz in a child process; return (seconds, peak RSS in MB)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "quantize_cli", *args],
                               stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"qz {' '.join(args)} failed")
    return seconds, usage.ru_maxrss / 1024  # Linux reports kilobytes


def main() -> None:
    if sys.argv[1:2] == ["--make"]:
        path, size, rows, columns = sys.argv[2:6]
        make_checkpoint(Path(path), float(size), (int(rows), int(columns)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 3.2])
    parser.add_argument("--folder", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)

    largest_f32_mb = TENSOR_BYTES * 2 / 1e6
    bound = 300 + 1.5 * largest_f32_mb
    print(f"tensors {SHAPE[0]}×{SHAPE[1]} BF16 ({TENSOR_BYTES / 2**20:.0f} MiB; "
          f"{largest_f32_mb:.0f} MB as float32); bound 300 + 1.5 × {largest_f32_mb:.0f} = "
          f"{bound:.0f} MB\n")
    _, baseline = run("--version")
    print(f"  python + qz imports alone: peak RSS {baseline:.0f} MB\n")
    cases = [(size, SHAPE) for size in args.sizes_gb] + [(1.0, (16384, 32768))]
    for size, shape in cases:
        label = f"{size:g}gb" if shape == SHAPE else f"{shape[0]}x{shape[1]}"
        source = args.folder / f"memory_{label}.safetensors"
        if not source.exists():
            print(f"writing {source} …")
            # In a child process: a child's peak RSS starts from its parent's, so this
            # process must stay small for the measurements to be qz's own.
            subprocess.run([sys.executable, __file__, "--make", str(source), str(size),
                            str(shape[0]), str(shape[1])], check=True)
        quantized = args.folder / f"memory_{label}.int8.safetensors"
        restored = args.folder / f"memory_{label}.dequant.safetensors"
        print(f"checkpoint {source.stat().st_size / 1e9:.2f} GB, tensors {shape[0]}×{shape[1]}")
        for label, command in (
            ("quantize (absmax block 128)", ["quantize", str(source), "-o", str(quantized),
                                             "--force", "-q"]),
            ("quantize (affine per tensor, mse)", ["quantize", str(source), "-o", str(quantized),
                                              "--method", "affine", "--per-tensor", "--force",
                                              "-q"]),
            ("dequantize (to BF16)", ["dequantize", str(quantized), "-o", str(restored),
                                      "--force", "-q"]),
        ):
            seconds, peak = run(*command)
            verdict = "within" if peak <= bound else "OVER"
            print(f"  {label:<30} peak RSS {peak:6.0f} MB ({verdict} the bound)  {seconds:5.1f} s")
        quantized.unlink(missing_ok=True)
        restored.unlink(missing_ok=True)
        print()


if __name__ == "__main__":
    main()
