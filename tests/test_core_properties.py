"""Invariants of the quantization math, checked on generated arrays (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantize_cli import QuantizedTensor, Scheme, dequantize, quantize
from quantize_cli.core import quantize_rows
from quantize_cli.errors import DtypeRangeError, NonFiniteValuesError

# Values within half a step of float32's maximum are refused by affine (see
# test_core.py::test_float32_limit); every other finite value must satisfy the bounds.
finite_float32 = st.floats(-3.0000000054977558e38, 3.0000000054977558e38, width=32)
# Mostly ordinary weights, sometimes subnormals, zeros and huge values.
values = st.one_of(
    finite_float32,
    st.floats(-4.0, 4.0, width=32),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-40, 3e38, -3e38, 0.5, 1.5]),
)
arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40),
    elements=values,
)
schemes = st.builds(
    Scheme,
    method=st.sampled_from(["absmax", "affine"]),
    granularity=st.sampled_from(["tensor", "channel", "block"]),
    block_size=st.sampled_from([1, 3, 8, 32, 128]),
    clip=st.just("none"),  # the rounding rule itself; clipping has its own tests
)


def element_scale(qt: QuantizedTensor) -> np.ndarray:
    """The scale that applies to each element, broadcast to the codes' shape."""
    scheme, scale = qt.scheme, qt.scale
    if scheme.granularity == "block":
        assert scheme.block_size is not None
        scale = np.repeat(scale, scheme.block_size, axis=-1)[..., : qt.shape[-1]]
    return np.broadcast_to(scale, qt.shape)


@settings(deadline=None)
@given(arrays, schemes)
def test_error_is_at_most_half_a_step(x: np.ndarray, scheme: Scheme) -> None:
    qt = quantize(x, scheme)
    restored = dequantize(qt).astype(np.float64)
    step = element_scale(qt).astype(np.float64)
    # float32 rounding of x/s, of s itself and of q·s: a few ulps on top of s/2.
    tolerance = step * 1e-5 + np.abs(x.astype(np.float64)) * 3e-7
    assert np.all(np.abs(x - restored) <= step / 2 + tolerance)


@settings(deadline=None)
@given(arrays, schemes)
def test_codes_in_range_and_scales_finite(x: np.ndarray, scheme: Scheme) -> None:
    qt = quantize(x, scheme)
    lowest, highest = scheme.code_range
    assert qt.codes.dtype == np.int8
    assert qt.codes.min() >= lowest and qt.codes.max() <= highest
    assert qt.scale.dtype == np.float32
    assert np.isfinite(qt.scale).all() and (qt.scale >= 0).all()
    assert qt.scale.shape == scheme.scale_shape(x.shape)
    if qt.zero_point is not None:
        assert qt.zero_point.dtype == np.int8 and qt.zero_point.shape == qt.scale.shape


@settings(deadline=None)
@given(arrays, schemes)
def test_deterministic(x: np.ndarray, scheme: Scheme) -> None:
    first, second = quantize(x, scheme), quantize(x.copy(), scheme)
    assert first.codes.tobytes() == second.codes.tobytes()
    assert first.scale.tobytes() == second.scale.tobytes()


@settings(deadline=None)
@given(arrays, schemes, st.sampled_from([np.float32, np.float16, np.float64]))
def test_round_trip_preserves_shape_and_dtype(x: np.ndarray, scheme: Scheme,
                                               dtype: type) -> None:
    quantized = quantize(x, scheme)
    try:
        restored = dequantize(quantized, dtype=dtype)
    except DtypeRangeError:  # float16 cannot hold these values: refused, never inf
        assert np.abs(dequantize(quantized)).max() > np.finfo(np.float16).max
        return
    assert restored.shape == x.shape and restored.dtype == np.dtype(dtype)


@settings(deadline=None)
@given(arrays, schemes.filter(lambda s: s.method == "absmax"))
def test_requantizing_dequantized_values_changes_nothing(x: np.ndarray,
                                                         scheme: Scheme) -> None:
    # absmax is idempotent on values, up to the last bit of a rounded scale (codes may
    # differ where a group of subnormals collapses to zero). affine is not: its rounded
    # zero point shifts the dequantized range by up to s/2, so a second pass picks a
    # slightly different grid (e.g. [-1.5, 1.5] → z = rint(-0.5) = 0 → [-128s, 127s]).
    restored = dequantize(quantize(x, scheme))
    np.testing.assert_allclose(dequantize(quantize(restored, scheme)), restored,
                               rtol=2.0**-22, atol=0)


@settings(deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 30), st.integers(1, 300)),
               elements=st.floats(-10, 10, width=32)),
    schemes.filter(lambda s: s.granularity != "tensor"),
    st.integers(1, 29),
)
def test_row_chunks_give_the_bytes_of_the_whole(x: np.ndarray, scheme: Scheme,
                                                 split: int) -> None:
    whole = quantize_rows(x, scheme)
    split = min(split, x.shape[0])
    parts = [quantize_rows(x[:split], scheme), quantize_rows(x[split:], scheme)]
    assert np.concatenate([p.codes for p in parts]).tobytes() == whole.codes.tobytes()
    assert np.concatenate([p.scale for p in parts]).tobytes() == whole.scale.tobytes()


@settings(deadline=None)
@given(arrays, st.sampled_from(["absmax", "affine"]))
def test_negating_input_negates_absmax_codes(x: np.ndarray, method: str) -> None:
    if method == "absmax":
        scheme = Scheme("absmax", "channel")
        assert np.array_equal(quantize(-x, scheme).codes, -quantize(x, scheme).codes)
    else:  # affine keeps 0.0 exact: it always maps to the zero point
        qt = quantize(np.concatenate([x.ravel(), [0.0]]).astype(np.float32),
                      Scheme("affine", "tensor"))
        assert dequantize(qt)[-1] == 0.0


@settings(deadline=None)
@given(arrays, schemes, st.sampled_from(["bfloat16", "float16"]))
def test_16_bit_inputs_give_the_bytes_of_their_float32_values(x: np.ndarray, scheme: Scheme,
                                                               dtype: str) -> None:
    # Ranges are read from the 16-bit patterns directly; they must agree with float32.
    import ml_dtypes

    with np.errstate(over="ignore"):  # float16 overflow to inf is the case tested below
        narrow = x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    widened = narrow.astype(np.float32)
    if not np.isfinite(widened).all():  # float16 overflow: refused like any infinity
        with pytest.raises(NonFiniteValuesError):
            quantize(narrow, scheme)
        return
    direct, reference = quantize(narrow, scheme), quantize(widened, scheme)
    assert direct.codes.tobytes() == reference.codes.tobytes()
    assert direct.scale.tobytes() == reference.scale.tobytes()


def _mlx_group_errors(rows: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, float]:
    """Per group of 32, the squared error of MLX's dequantization of qz's codes, and the
    error energy qz reports."""
    from quantize_cli.core.offset import dequantize_offset, quantize_offset_rows

    result = quantize_offset_rows(rows, scheme, with_stats=True)
    assert result.bias is not None and result.stats is not None
    restored = dequantize_offset(result.codes, result.scale, result.bias, 32, rows.dtype)
    error = (rows.astype(np.float32) - restored.astype(np.float32)).astype(np.float64)
    return (error.reshape(rows.shape[0], -1, 32) ** 2).sum(-1), result.stats.error_energy


@settings(deadline=None, max_examples=150)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([32, 64, 96])),
                  elements=st.floats(-4.0, 4.0, width=32)),
       st.sampled_from(["absmax", "affine"]), st.sampled_from([2, 3, 4, 8]),
       st.sampled_from(["bfloat16", "float16"]))
def test_mlx_search_returns_what_it_measured_and_never_loses(
        x: np.ndarray, method: str, bits: int, dtype: str) -> None:
    """MLX's search chooses among candidate grids per group: the codes, scale and bias it
    returns must be the very ones whose error it reports, and no group may end worse than
    with plain rounding (a symmetric winner once came back with codes rounded on its
    offset instead of its own grid)."""
    import ml_dtypes

    rows = x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    searched, reported = _mlx_group_errors(rows, Scheme(method, "block", 32, bits=bits))
    plain, _ = _mlx_group_errors(rows, Scheme(method, "block", 32, bits=bits, clip="none"))
    assert reported == pytest.approx(float(searched.sum()), rel=1e-5, abs=1e-30)
    assert (searched <= plain).all()
