"""The error of qz's MLX export against ``mlx.core.quantize`` on the same weights.

    python benchmarks/mlx_error.py        (needs MLX: pip install -e '.[interop]')

Both are dequantized by ``mlx.core.dequantize`` and compared with the original weights
(a 2048×4096 matrix of Gaussian and of Student-t(3) values, in each float dtype), 8 bits,
groups of 64. Prints the MSE of each and their ratio (below 1: qz is better).
"""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import numpy as np

from quantize_cli.core.offset import quantize_offset_rows
from quantize_cli.core.scheme import Scheme

SHAPE = (2048, 4096)
GROUP = 64


def main() -> None:
    rng = np.random.default_rng(0)
    weights = {"Gaussian": rng.standard_normal(SHAPE) * 0.02,
               "Student-t(3)": rng.standard_t(3, SHAPE) * 0.02}
    scheme = Scheme("affine", "block", GROUP)
    print(f"{SHAPE[0]}×{SHAPE[1]}, 8 bits, groups of {GROUP}; MSE after mx.dequantize\n")
    print(f"  {'weights':<13} {'dtype':<9} {'mx.quantize':>12} {'qz':>12} {'qz / mx':>8}")
    for name, values in weights.items():
        for dtype in ("bfloat16", "float16", "float32"):
            numpy_type = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
            stored = values.astype(np.float32).astype(numpy_type)
            reference = stored.astype(np.float64)
            original = mx.array(stored.astype(np.float32)).astype(getattr(mx, dtype))
            theirs = mx.dequantize(*mx.quantize(original, group_size=GROUP, bits=8),
                                   group_size=GROUP, bits=8)
            ours = quantize_offset_rows(stored, scheme)
            packed = mx.array(ours.codes.view(np.uint32))
            scales = mx.array(ours.scale.astype(np.float32)).astype(getattr(mx, dtype))
            biases = mx.array(ours.bias.astype(np.float32)).astype(getattr(mx, dtype))
            mine = mx.dequantize(packed, scales, biases, group_size=GROUP, bits=8)
            errors = [float(((np.array(x.astype(mx.float32)) - reference) ** 2).mean())
                      for x in (theirs, mine)]
            print(f"  {name:<13} {dtype:<9} {errors[0]:12.3e} {errors[1]:12.3e} "
                  f"{errors[1] / errors[0]:8.3f}")


if __name__ == "__main__":
    main()
