"""Start-up time: how long commands that read only headers take, against a bare
``python -c "import numpy"`` measured in the same run.

    python benchmarks/startup.py [--repeat 15]

Each command runs as a fresh process, interleaved with the others, ``--repeat`` times;
the table gives the median and best wall time and the median's excess over numpy's
(target: within 0.25 s). ``qz`` is the installed console script when there is one, else
``python -m quantize_cli``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_weights" / "tiny_llama_bf16.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    script = shutil.which("qz")
    qz = [script] if script else [sys.executable, "-m", "quantize_cli"]
    commands = {
        'python -c "import numpy"': [sys.executable, "-c", "import numpy"],
        "qz --help": [*qz, "--help"],
        "qz inspect (BF16 sample)": [*qz, "inspect", str(SAMPLE)],
        "qz quantize --dry-run": [*qz, "quantize", str(SAMPLE), "--dry-run", "-q"],
        "qz explain": [*qz, "explain", "1.6", "-0.7", "6.2"],
    }
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(args.repeat):
        for label, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times[label].append(time.perf_counter() - start)
    baseline = statistics.median(times['python -c "import numpy"'])
    print(f"{'command':28} {'median':>8} {'best':>8} {'over numpy':>11}")
    for label, measured in times.items():
        median = statistics.median(measured)
        print(f"{label:28} {median:7.3f}s {min(measured):7.3f}s {median - baseline:+10.3f}s")


if __name__ == "__main__":
    main()
