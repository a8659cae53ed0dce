"""SQNR gained by `--clip mse` over plain rounding (`--clip none`), and what it costs.

    python benchmarks/clip_gain.py

For each method and granularity, on the bundled sample checkpoints and on heavy-tailed
random weights (Student-t with 5 degrees of freedom, 2048×2048, σ-scaled to 0.02), prints
the pooled SQNR with and without the search, the gain in dB, and the time of quantizing
with the search as a multiple of the time without (same run, best of 3).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from quantize_cli import Scheme, dequantize, quantize
from quantize_cli.core import ErrorStats, error_stats
from quantize_cli.storage.reader import SafetensorsReader

SAMPLES = Path(__file__).resolve().parent.parent / "sample_weights"
SCHEMES = [("tensor", None), ("channel", None), ("block", 128)]


def weights_of(path: Path) -> list[np.ndarray]:
    """The tensors qz quantizes by default (float, ≥ 2-D, ≥ 1024 elements)."""
    with SafetensorsReader(path) as reader:
        return [reader.read_tensor(entry).astype(np.float32) for entry in reader.header.tensors
                if entry.dtype in ("F32", "BF16", "F16") and len(entry.shape) >= 2
                and entry.numel >= 1024]


def pooled(tensors: list[np.ndarray], scheme: Scheme) -> tuple[float, float]:
    """(pooled SQNR in dB, seconds to quantize all tensors, best of 3)."""
    total = ErrorStats()
    for values in tensors:
        total = total.merge(error_stats(values, dequantize(quantize(values, scheme))))
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for values in tensors:
            quantize(values, scheme)
        best = min(best, time.perf_counter() - start)
    return total.sqnr_db, best


def main() -> None:
    rng = np.random.default_rng(0)
    corpora = {
        "tiny_llama_bf16": weights_of(SAMPLES / "tiny_llama_bf16.safetensors"),
        "digits_mlp": weights_of(SAMPLES / "digits_mlp.safetensors"),
        "Student-t(5) 2048×2048": [
            (rng.standard_t(5, (2048, 2048)) * 0.02 / math.sqrt(5 / 3)).astype(np.float32)],
    }
    print(f"{'weights':<24} {'scheme':<18} {'none dB':>8} {'mse dB':>8} {'gain':>7} {'time':>6}")
    for name, tensors in corpora.items():
        for method in ("absmax", "affine"):
            for granularity, block in SCHEMES:
                plain, plain_time = pooled(tensors, Scheme(method, granularity, block))  # type: ignore[arg-type]
                searched, searched_time = pooled(
                    tensors, Scheme(method, granularity, block, "mse"))  # type: ignore[arg-type]
                label = f"{method} {granularity}" + (f" {block}" if block else "")
                print(f"{name:<24} {label:<18} {plain:8.2f} {searched:8.2f} "
                      f"{searched - plain:+7.2f} {searched_time / plain_time:5.1f}×")


if __name__ == "__main__":
    main()
