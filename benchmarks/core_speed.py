"""Speed of the numpy core, as ratios measured in one run.

    python benchmarks/core_speed.py [--rows 11008] [--columns 4096] [--repeat 5]

Compares qz's tiled, threaded kernels with a straightforward numpy implementation of the
same scheme (included below, and checked to give identical codes), on an 11008×4096
float32 matrix (a Llama-7B MLP weight). Throughput is GB/s of float32 input; every number
is the best of ``--repeat`` runs. With the ``gguf`` package installed, gguf-py's numpy
Q8_0 quantizer (absmax, block 32) is measured as well.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from quantize_cli.core import Scheme, get_num_threads, quantize_rows, set_num_threads


def straightforward_absmax_block(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The textbook version: reshape to blocks, one numpy expression per step."""
    groups = x.reshape(x.shape[0], -1, block)
    scale = (np.abs(groups).max(axis=-1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    codes = np.clip(np.rint(groups / safe[..., None]), -127, 127).astype(np.int8)
    return codes.reshape(x.shape), scale


def straightforward_affine_block(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    groups = x.reshape(x.shape[0], -1, block)
    low = np.minimum(groups.min(axis=-1), 0).astype(np.float64)
    high = np.maximum(groups.max(axis=-1), 0).astype(np.float64)
    scale = ((high - low) / 255).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    zero = np.where(scale > 0, np.clip(np.rint(-128 - low / safe), -128, 127), 0)
    codes = np.clip(np.rint(groups / safe[..., None] + zero[..., None].astype(np.float32)),
                    -128, 127).astype(np.int8)
    return codes.reshape(x.shape), scale


def best_seconds(work: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=11008)
    parser.add_argument("--columns", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.columns)) * 0.02).astype(np.float32)
    gigabytes = x.nbytes / 1e9
    threads = get_num_threads()
    print(f"matrix {args.rows}×{args.columns} float32 ({gigabytes:.2f} GB), "
          f"{threads} threads available, best of {args.repeat}\n")

    rows: list[tuple[str, float]] = []

    def measure(label: str, work: Callable[[], object]) -> float:
        seconds = best_seconds(work, args.repeat)
        rows.append((label, seconds))
        print(f"  {label:<46} {gigabytes / seconds:6.2f} GB/s")
        return seconds

    for method, baseline in (("absmax", straightforward_absmax_block),
                             ("affine", straightforward_affine_block)):
        scheme = Scheme(method, "block", 128)  # type: ignore[arg-type]
        expected_codes, _ = baseline(x, 128)
        assert np.array_equal(quantize_rows(x, scheme).codes, expected_codes), method
        print(f"{method} block 128")
        plain = measure("straightforward numpy", partial(baseline, x, 128))
        set_num_threads(1)
        measure("qz, 1 thread", partial(quantize_rows, x, scheme))
        set_num_threads(threads)
        fast = measure(f"qz, {threads} threads", partial(quantize_rows, x, scheme))
        with_stats = measure(f"qz, {threads} threads, with error statistics",
                             partial(quantize_rows, x, scheme, with_stats=True))
        print(f"  → qz is {plain / fast:.1f}× the straightforward version; error "
              f"statistics add {100 * (with_stats / fast - 1):.0f}%\n")

    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize as gguf_quantize
    except ImportError:
        print("gguf not installed: `pip install gguf` to compare with gguf-py's Q8_0")
        return
    print("gguf-py numpy Q8_0 (absmax, block 32, fp16 scales)")
    gguf_seconds = measure("gguf.quants.quantize(Q8_0)",
                           lambda: gguf_quantize(x, GGMLQuantizationType.Q8_0))
    scheme = Scheme("absmax", "block", 32)
    qz_seconds = measure(f"qz absmax block 32, {threads} threads",
                         lambda: quantize_rows(x, scheme))
    print(f"  → qz is {gguf_seconds / qz_seconds:.1f}× gguf-py's Q8_0")


if __name__ == "__main__":
    main()
