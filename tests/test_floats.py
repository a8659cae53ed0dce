"""Float elements: FP8 with float scales and the microscaling types NVFP4, MXFP4 and
MXFP8. Hand-checked numbers on the tutorial's vector, the E2M1 grid's ties, and the
search's promise (never worse than the plain rule, nor than the other tools' rules)."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize_cli import Scheme, dequantize, error_stats, quantize
from quantize_cli.core import PLAIN, Storage, dequantize_rows, quantize_rows
from quantize_cli.core.floats import global_scale
from quantize_cli.errors import SchemeError

X = np.array([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2], dtype=np.float32)


def test_mxfp4_worked_example() -> None:
    # Plain rule: the smallest power of two s with max|x| / s ≤ 6 is 2 (6.2 / 2 = 3.1);
    # x / 2 rounds to the nearest E2M1 value, 0.25 to 0 (ties to even).
    plain = quantize(X, Scheme("mxfp4", clip="none"))
    assert plain.scale.astype(np.float32).tolist() == [2.0]
    assert plain.scale.view(np.uint8).tolist() == [128]  # E8M0: 2^(128 - 127)
    assert plain.codes.astype(np.float32).tolist() == [1, -0.5, -1.5, 1, -1.5, 0, 1, 3]
    assert dequantize(plain).tolist() == [2, -1, -3, 2, -3, 0, 2, 6]
    # The search also measures s = 1 (clipping 6.2 to 6), which is better here.
    searched = quantize(X, Scheme("mxfp4"))
    assert searched.scale.astype(np.float32).tolist() == [1.0]
    assert dequantize(searched).tolist() == [1.5, -0.5, -3, 1.5, -3, 0.5, 2, 6]
    assert round(error_stats(X, dequantize(plain)).sqnr_db, 2) == 18.95
    assert round(error_stats(X, dequantize(searched)).sqnr_db, 2) == 22.53


def test_nvfp4_worked_example() -> None:
    # g = 448 · 6 / 6.2 in float32; the group's E4M3 scale is g · 6.2 / 6 = 448, and the
    # step is 448 / g = 6.2 / 6.
    quantized = quantize(X, Scheme("nvfp4"))
    g = np.float32(2688) / np.float32(6.2)
    assert quantized.global_scale == float(g) == global_scale(float(np.float32(6.2)))
    assert quantized.scale.astype(np.float32).tolist() == [448.0]
    assert quantized.codes.astype(np.float32).tolist() == [1.5, -0.5, -3, 1.5, -3, 0.5, 2, 6]
    step = np.float32(448) / g
    assert dequantize(quantized).tolist() == (quantized.codes.astype(np.float32) * step).tolist()


def test_e2m1_rounds_half_to_even() -> None:
    # With s = 1, each value is rounded to the E2M1 grid, ties to the even mantissa.
    values = np.array([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -0.25, -5.0, 0.0, 0.0,
                        0.0, 0.0, 0.0, 6.0]], np.float32)
    result = quantize_rows(values, Scheme("mxfp4", clip="none"))
    assert result.scale.astype(np.float32).tolist() == [[1.0]]
    assert result.codes.astype(np.float32).tolist()[0][:10] == [
        0, 1, 1, 2, 2, 4, 4, 6, -0.0, -4]


def test_an_all_zero_group_is_exact() -> None:
    zeros = np.zeros((2, 32), np.float32)
    for method in ("nvfp4", "mxfp4", "mxfp8"):
        quantized = quantize(zeros, Scheme(method))
        assert not dequantize(quantized).any(), method
    assert global_scale(0.0) == 1.0


def test_methods_fix_their_groups_and_bits() -> None:
    assert (Scheme("nvfp4").block_size, Scheme("mxfp4").block_size) == (16, 32)
    assert Scheme("mxfp8").bits == 8 and Scheme("mxfp4").bits == 4
    assert Scheme("nvfp4").clip == "mse" and Scheme("fp8", "channel").clip == "none"
    with pytest.raises(SchemeError, match="nvfp4 quantizes groups of 16 values, not block 32"):
        Scheme("nvfp4", "block", 32)
    with pytest.raises(SchemeError, match="mxfp4 quantizes groups of 32 values, not channel"):
        Scheme("mxfp4", "channel")
    with pytest.raises(SchemeError, match="mxfp8 has 8 bits"):
        Scheme("mxfp8", bits=4)


def errors(rows: np.ndarray, scheme: Scheme, storage: Storage = PLAIN) -> np.ndarray:
    restored = dequantize_rows(quantize_rows(rows, scheme, storage=storage), scheme)
    size = scheme.block_size or 1
    padded = np.zeros((rows.shape[0], -(-rows.shape[1] // size) * size))
    padded[:, :rows.shape[1]] = (rows.astype(np.float64) - restored) ** 2
    return padded.reshape(rows.shape[0], -1, size).sum(axis=-1)


@settings(deadline=None, max_examples=80)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 70)),
                  elements=st.floats(-40, 40, width=32)),
       st.sampled_from(["nvfp4", "mxfp4", "mxfp8"]), st.booleans())
def test_the_search_is_never_worse_than_the_plain_rule(rows: np.ndarray, method: str,
                                                       global_scale: bool) -> None:
    storage = Storage(global_scale=global_scale)
    searched = errors(rows, Scheme(method), storage)
    plain = errors(rows, Scheme(method, clip="none"), storage)
    assert (searched <= plain).all()


def test_mx_scales_are_never_worse_than_the_other_tools_rules() -> None:
    # compressed-tensors takes 2^(⌊log2 max|x|⌋ − 2) after rounding max|x| to a power of
    # two (one mantissa bit), MLX 2^round(log2(max|x| / 6)): every group of the search is
    # at least as good as either.
    rows = (np.random.default_rng(3).standard_t(3, (64, 32)) * 0.02).astype(np.float32)
    ours = errors(rows, Scheme("mxfp4"))[:, 0]
    magnitude = np.abs(rows).max(axis=1).astype(np.float64)
    # Rounding to a power of two with one mantissa bit: up when the mantissa is ≥ 1.75.
    mantissa, exponent = np.frexp(magnitude)  # magnitude = mantissa · 2^exponent, [0.5, 1)
    ct = np.where(mantissa >= 0.875, exponent, exponent - 1) - 2
    mlx = np.round(np.log2(magnitude / 6))
    for exponents in (ct, mlx):
        step = (2.0 ** exponents)[:, None]
        codes = np.clip(rows / step, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
        theirs = ((rows - codes * step) ** 2).sum(axis=1)
        assert (ours <= theirs + 1e-12).all()
