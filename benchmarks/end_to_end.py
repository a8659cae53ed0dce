"""End-to-end speed of the ``qz`` commands on a BF16 checkpoint, against plain Python I/O,
as ratios measured in one run.

    python benchmarks/end_to_end.py [--size-gb 1.5] [--repeat 3] [--folder benchmarks/out]

The checkpoint holds BF16 tensors of 11008×4096 (a Llama-7B MLP weight, 90 MB each). Every
variant runs as a fresh process, as a user runs it (start-up included), each the best of
``--repeat`` runs, alternating so that drift hits every variant alike:

* baseline: ``python`` reading the input file in 64 MB pieces and writing a file of the
  size qz writes, without fsync (and the same with fsync, which qz does before it
  publishes);
* ``qz quantize`` with the defaults (absmax block 128, error statistics, the input's
  SHA-256), and with ``--no-stats``, ``--no-hash`` and both;
* ``qz diff`` of the input and the quantized file;
* ``qz dequantize`` back to BF16, against the baseline that reads the quantized file and
  writes a file of the restored size.

The input is read once before timing, so every run reads it from the page cache, and
each run writes a new file (the previous output is deleted before the clock starts). The
user and system CPU time of each best run is printed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from quantize_cli.storage.writer import PlannedTensor, SafetensorsWriter

SHAPE = (11008, 4096)
#: Reads the file argv[1] in 64 MB pieces and writes argv[3] bytes to argv[2]; fsyncs
#: when argv[4] is "fsync".
BASELINE = """
import os, sys
piece = bytearray(64 << 20)
view = memoryview(piece)
size, written = int(sys.argv[3]), 0
with open(sys.argv[1], "rb", buffering=0) as source, open(sys.argv[2], "wb", buffering=0) as out:
    while count := source.readinto(piece):
        if written < size:
            written += out.write(view[:min(count, size - written)])
    while written < size:
        written += out.write(view[:min(len(piece), size - written)])
    if sys.argv[4] == "fsync":
        os.fsync(out.fileno())
"""


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


def run(command: list[str], output: Path | None) -> tuple[float, float, float]:
    """Wall, user and system seconds of a fresh process running ``command``."""
    if output is not None:
        output.unlink(missing_ok=True)
    before = os.times()
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = os.times()
    return (wall, after.children_user - before.children_user,
            after.children_system - before.children_system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()

    args.folder.mkdir(parents=True, exist_ok=True)
    source = args.folder / f"bf16_{args.size_gb:g}gb.safetensors"
    if not source.exists():
        print(f"writing {source} …")
        make_checkpoint(source, args.size_gb)
    script = shutil.which("qz")
    qz = [script] if script else [sys.executable, "-m", "quantize_cli"]
    quantized = args.folder / "e2e.int8.safetensors"
    restored = args.folder / "e2e.dequant.safetensors"
    baseline_file = args.folder / "e2e.baseline.bin"
    kept = args.folder / "e2e.input.int8.safetensors"  # dequantize's and diff's input
    subprocess.run([*qz, "quantize", str(source), "-o", str(kept), "-q", "--force"],
                   check=True)
    subprocess.run([*qz, "dequantize", str(kept), "-o", str(restored), "-q", "--force"],
                   check=True)
    input_size, quantized_size = source.stat().st_size, kept.stat().st_size
    restored_size = restored.stat().st_size

    def baseline(read: Path, size: int, sync: str) -> list[str]:
        return [sys.executable, "-c", BASELINE, str(read), str(baseline_file), str(size), sync]

    quantize = [*qz, "quantize", str(source), "-o", str(quantized), "-q"]
    runs: dict[str, tuple[list[str], Path | None]] = {
        "baseline: read input, write output-sized file": (
            baseline(source, quantized_size, "no"), baseline_file),
        "baseline, with fsync": (baseline(source, quantized_size, "fsync"), baseline_file),
        "qz quantize (defaults: statistics and hash)": (quantize, quantized),
        "qz quantize --no-hash": ([*quantize, "--no-hash"], quantized),
        "qz quantize --no-stats": ([*quantize, "--no-stats"], quantized),
        "qz quantize --no-stats --no-hash": ([*quantize, "--no-stats", "--no-hash"],
                                             quantized),
        "qz diff input quantized": ([*qz, "diff", str(source), str(kept)], None),
        "baseline: read quantized, write restored-sized file": (
            baseline(kept, restored_size, "no"), baseline_file),
        "qz dequantize (to BF16)": (
            [*qz, "dequantize", str(kept), "-o", str(restored), "-q"], restored),
    }
    run(baseline(source, 0, "no"), baseline_file)  # the input into the page cache
    best = {label: (float("inf"), 0.0, 0.0) for label in runs}
    for _ in range(args.repeat):
        for label, (command, output) in runs.items():
            measured = run(command, output)
            if measured[0] < best[label][0]:
                best[label] = measured

    print(f"\ninput {input_size / 1e9:.2f} GB BF16, quantized {quantized_size / 1e9:.2f} GB; "
          f"best of {args.repeat}\n")
    print(f"  {'':54} {'wall':>7} {'user':>7} {'system':>7}")
    for label, (wall, user, system) in best.items():
        print(f"  {label:54} {wall:6.2f}s {user:6.2f}s {system:6.2f}s")
    floor = best["baseline: read input, write output-sized file"][0]
    print()
    for label in runs:
        if label.startswith("qz quantize") or label.startswith("qz diff"):
            print(f"  {label:54} {floor / best[label][0]:5.2f}× the baseline's speed")
    dequantize_floor = best["baseline: read quantized, write restored-sized file"][0]
    print(f"  {'qz dequantize (to BF16)':54} "
          f"{dequantize_floor / best['qz dequantize (to BF16)'][0]:5.2f}× its baseline's speed")
    quantize_time = best["qz quantize (defaults: statistics and hash)"][0]
    print(f"  qz diff takes {best['qz diff input quantized'][0] / quantize_time:.2f}× the time "
          f"of qz quantize")
    for path in (quantized, restored, baseline_file, kept):
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
