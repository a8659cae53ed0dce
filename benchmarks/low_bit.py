"""4-bit quantization: the SQNR of the error-optimal search against plain rounding, and
what the search costs in time.

    python benchmarks/low_bit.py [--repeat 3]

An 11008×4096 float32 matrix of Gaussian and one of Student-t(4) values, 4 bits, blocks
of 128. For each scheme and search (clip none, mse, weighted) it prints the SQNR (dB) of
what qz stores and the best of ``--repeat`` times, with the ratio to plain rounding
measured in the same run (no error statistics, 2 threads):

* absmax (qz: codes [-8, 7], signed float32 scales);
* affine with a fractional zero point (qz's own 4-bit format);
* affine with an integer zero point (what compressed-tensors packs);
* absmax with compressed-tensors' rule (max|x| / 7.5, scales in BF16 rounded up).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import ml_dtypes
import numpy as np

from quantize_cli.core import Scheme, dequantize_rows, quantize_rows
from quantize_cli.core.search import Storage

SHAPE = (11008, 4096)
SCHEMES = {
    "absmax (qz)": ("absmax", Storage(negative_scales=True)),
    "affine, fractional zero point (qz)": ("affine", Storage(zero_point="float")),
    "affine, integer zero point (compressed-tensors)": ("affine", Storage()),
    "absmax, max|x|/7.5, BF16 scales (compressed-tensors)": (
        "absmax", Storage(scale_dtype=np.dtype(ml_dtypes.bfloat16), divisor=7.5)),
}


def sqnr(x: np.ndarray, approximation: np.ndarray) -> float:
    signal = float(np.dot(x.ravel().astype(np.float64), x.ravel().astype(np.float64)))
    error = (x - approximation).ravel().astype(np.float64)
    return 10 * np.log10(signal / float(np.dot(error, error)))


def best_time(run: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = {"Gaussian": rng.standard_normal(SHAPE).astype(np.float32),
            "Student-t(4)": rng.standard_t(4, SHAPE).astype(np.float32)}
    print(f"{SHAPE[0]}×{SHAPE[1]} float32, 4 bits, blocks of 128; SQNR in dB, time as the "
          f"best of {args.repeat} (× plain rounding)\n")
    for label, (method, storage) in SCHEMES.items():
        print(label)
        for name, x in data.items():
            cells = []
            plain_time = 0.0
            for clip in ("none", "mse", "weighted"):
                scheme = Scheme(method, "block", 128, clip, bits=4)  # type: ignore[arg-type]
                result = quantize_rows(x, scheme, storage=storage)
                restored = dequantize_rows(result,
                                           scheme)
                seconds = best_time(partial(quantize_rows, x, scheme, storage=storage),
                                    args.repeat)
                plain_time = plain_time or seconds
                cells.append(f"{clip} {sqnr(x, restored):6.2f} dB {seconds:5.2f} s "
                             f"({seconds / plain_time:3.1f}×)")
            print(f"  {name:<13} " + " | ".join(cells))
        print()


if __name__ == "__main__":
    main()
