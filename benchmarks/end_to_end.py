"""End-to-end speed of `qz quantize` and `qz dequantize` on a BF16 checkpoint, against
the I/O floor, as ratios measured in one run.

    python benchmarks/end_to_end.py [--size-gb 1.0] [--repeat 3] [--folder benchmarks/out]

The checkpoint holds BF16 tensors of 11008×4096 (a Llama-7B MLP weight, 90 MB each).
Measured, each the best of ``--repeat`` runs, alternating:

* the I/O floor: a plain Python loop that reads the input file in 64 MB pieces and writes
  an output file of the size qz writes, then fsyncs it (qz fsyncs before publishing);
* ``quantize_checkpoint`` (absmax block 128): reading, BF16 decoding, quantizing, error
  statistics, hashing the input (SHA-256, recorded in the output), writing, fsync,
  publishing — and the same without error statistics, and without the hash;
* ``dequantize_checkpoint`` back to BF16.

The input is read once before timing, so every run reads it from the page cache, and
each run writes a new file (the previous output is deleted before the clock starts).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from quantize_cli.core import Scheme
from quantize_cli.jobs import dequantize_checkpoint, quantize_checkpoint
from quantize_cli.storage.writer import PlannedTensor, SafetensorsWriter

PIECE = 64 * 1024 * 1024
SHAPE = (11008, 4096)


def make_checkpoint(path: Path, size_gb: float) -> None:
    count = max(1, round(size_gb * 1e9 / (SHAPE[0] * SHAPE[1] * 2)))
    rng = np.random.default_rng(0)
    planned = [PlannedTensor(f"model.layers.{i}.mlp.up_proj.weight", "BF16", SHAPE)
               for i in range(count)]
    with SafetensorsWriter(path, planned, {"format": "pt"}) as writer:
        for tensor in planned:
            values = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(0.02)
            writer.write(tensor.name, values.astype(ml_dtypes.bfloat16))
        writer.publish()


def copy_floor(source: Path, target: Path, output_size: int) -> None:
    """Read all of ``source``; write ``output_size`` bytes to ``target``; fsync."""
    buffer = bytearray(PIECE)
    view = memoryview(buffer)
    written = 0
    with open(source, "rb", buffering=0) as reader, open(target, "wb", buffering=0) as out:
        while True:
            count = reader.readinto(buffer)
            if not count:
                break
            if written < output_size:
                size = min(count, output_size - written)
                out.write(view[:size])
                written += size
        while written < output_size:  # only if the output were larger than the input
            size = min(PIECE, output_size - written)
            out.write(view[:size])
            written += size
        os.fsync(out.fileno())


def timed(work: Callable[[], object], output: Path) -> float:
    output.unlink(missing_ok=True)
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()

    args.folder.mkdir(parents=True, exist_ok=True)
    source = args.folder / f"bf16_{args.size_gb:g}gb.safetensors"
    if not source.exists():
        print(f"writing {source} …")
        make_checkpoint(source, args.size_gb)
    quantized = args.folder / "e2e.int8.safetensors"
    restored = args.folder / "e2e.dequant.safetensors"
    floor_file = args.folder / "e2e.floor.bin"
    input_bytes = source.stat().st_size
    copy_floor(source, floor_file, 0)  # warm the page cache with the input

    scheme = Scheme("absmax", "block", 128)
    quantize_checkpoint(source, quantized, scheme)  # the output whose size the floor writes
    output_size = quantized.stat().st_size
    dequantize_input = args.folder / "e2e.input.int8.safetensors"
    quantized.rename(dequantize_input)
    runs = {
        "I/O floor (read input, write output-sized file, fsync)":
            (lambda: copy_floor(source, floor_file, output_size), floor_file),
        "qz quantize": (lambda: quantize_checkpoint(source, quantized, scheme), quantized),
        "qz quantize, no error statistics":
            (lambda: quantize_checkpoint(source, quantized, scheme, error_stats=False),
             quantized),
        "qz quantize, no input hash":
            (lambda: quantize_checkpoint(source, quantized, scheme, hash_source=False),
             quantized),
        "qz dequantize (to BF16)":
            (lambda: dequantize_checkpoint(dequantize_input, restored), restored),
    }
    seconds = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):  # alternate, so that drift hits every variant alike
        for label, (work, output) in runs.items():
            seconds[label] = min(seconds[label], timed(work, output))

    print(f"\ninput {input_bytes / 1e9:.2f} GB BF16, output {output_size / 1e9:.2f} "
          f"GB, best of {args.repeat}; GB/s of input read\n")
    for label, value in seconds.items():
        print(f"  {label:<58} {value:6.2f} s  {input_bytes / value / 1e9:5.2f} GB/s")
    floor = seconds["I/O floor (read input, write output-sized file, fsync)"]
    quantize = seconds["qz quantize"]
    print(f"\n  qz quantize runs at {100 * floor / quantize:.0f}% of the I/O floor's throughput "
          f"({100 * floor / seconds['qz quantize, no input hash']:.0f}% without the input hash)")
    no_stats = seconds["qz quantize, no error statistics"]
    print(f"  error statistics add {100 * (quantize / no_stats - 1):.0f}% to quantize time")
    dequantize_rate = output_size / seconds["qz dequantize (to BF16)"]
    print(f"  dequantize takes {seconds['qz dequantize (to BF16)'] / quantize:.2f}× the time of "
          f"quantize (reading {dequantize_rate / 1e9:.2f} GB/s of INT8)")
    for path in (quantized, restored, floor_file, dequantize_input):
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
