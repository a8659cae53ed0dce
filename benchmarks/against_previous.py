"""qz against an earlier qz on the same folder, path by path, as processes, alternated:
the check that a change made no path slower.

    python benchmarks/against_previous.py OLD_CHECKOUT [--folder benchmarks/out/llama_1.34gb]
        [--repeat 2]

OLD_CHECKOUT is a working tree of an earlier commit (``git worktree add ../qz-old REV``);
its ``python -m quantize_cli`` runs from there with this environment's packages. The
folder is the one benchmarks/peer_speed.py writes. Paths that the earlier qz does not
offer are skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: (label, options): the paths both versions spell the same way.
PATHS = [
    ("INT8 (the default)", []),
    ("compressed-tensors INT8 g128", ["--format", "compressed-tensors", "--block", "128"]),
    ("compressed-tensors INT4 g128", ["--format", "compressed-tensors", "--bits", "4",
                                      "--block", "128"]),
    ("compressed-tensors FP8 per channel", ["--format", "compressed-tensors", "--method",
                                            "fp8", "--per-channel"]),
    ("MLX 4-bit g64", ["--format", "mlx", "--bits", "4", "--block", "64"]),
    ("MLX 8-bit g64", ["--format", "mlx", "--bits", "8", "--block", "64"]),
    ("MLX 4-bit g64 --clip none", ["--format", "mlx", "--bits", "4", "--block", "64",
                                   "--clip", "none"]),
]


def timed(checkout: Path, source: Path, output: Path, options: list[str]) -> float:
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "quantize_cli", "quantize", str(source),
                             "-o", str(output), "-q", *options], cwd=checkout,
                            env={**os.environ, "PYTHONPATH": str(checkout)},
                            capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(output, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"failed in {checkout}: {result.stderr.strip()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("--folder", type=Path, default=Path("benchmarks/out/llama_1.34gb"))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    new, old = Path(__file__).resolve().parent.parent, args.old.resolve()
    source = args.folder.resolve()
    output = source.with_name("previous-out")
    print(f"{'path':36} {'earlier':>8} {'now':>8} {'now ÷ earlier':>14}")
    for label, options in PATHS:
        earlier, now = [], []
        for _ in range(args.repeat):
            earlier.append(timed(old, source, output, options))
            now.append(timed(new, source, output, options))
        print(f"{label:36} {min(earlier):7.2f}s {min(now):7.2f}s "
              f"{min(earlier) / min(now):13.2f}×", flush=True)


if __name__ == "__main__":
    main()
