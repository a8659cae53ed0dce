"""Hand-checked unit tests of the quantization math, with exact expected numbers."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from quantize_cli import Scheme, dequantize, error_stats, quantize
from quantize_cli.core import qparams_from_range, quantize_rows, value_range
from quantize_cli.errors import NonFiniteValuesError, SchemeError

WORKED_EXAMPLE = [1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2]


def test_worked_example_of_the_tutorial_holds() -> None:
    x = np.array(WORKED_EXAMPLE, dtype=np.float32)
    qt = quantize(x, Scheme("absmax", "tensor"))
    assert qt.codes.tolist() == [33, -14, -70, 35, -59, 10, 47, 127]
    assert qt.codes.dtype == np.int8
    assert qt.scale.dtype == np.float32 and qt.scale.shape == (1,)
    assert qt.scale[0] == np.float32(np.float32(6.2) / np.float32(127))
    assert round(1 / float(qt.scale[0]), 1) == 20.5  # the tutorial's multiplier 127/6.2
    assert qt.zero_point is None


def test_worked_example_is_the_same_as_one_block_and_one_channel() -> None:
    x = np.array([WORKED_EXAMPLE], dtype=np.float32)
    for scheme in (Scheme("absmax", "block", 8), Scheme("absmax", "channel")):
        assert quantize(x, scheme).codes.tolist() == [[33, -14, -70, 35, -59, 10, 47, 127]]


def test_affine_by_hand() -> None:
    # lo = -1.0, hi = 2.0 → s = 3/255; z = rint(-128 + 1/(3/255)) = rint(-43.0) = -43.
    x = np.array([-1.0, 0.0, 0.5, 1.0, 2.0], dtype=np.float32)
    qt = quantize(x, Scheme("affine", "tensor"))
    assert qt.scale[0] == np.float32(3 / 255)
    assert qt.zero_point is not None and qt.zero_point.tolist() == [-43]
    # 0.5/s = 42.5 → 42.5 - 43 = -0.5 → rint → -0 (half to even): code 0.
    assert qt.codes.tolist() == [-128, -43, 0, 42, 127]
    restored = dequantize(qt)
    assert restored[1] == 0.0  # zero is exactly representable
    assert np.all(np.abs(restored - x) <= qt.scale[0] / 2 + 1e-7)


def test_affine_of_only_positive_values_maps_zero_to_minus_128() -> None:
    # The range always includes 0: lo = 0, hi = 5.1, s = 0.02, z = -128.
    qt = quantize(np.array([1.0, 5.1, 2.55], np.float32), Scheme("affine", "tensor"))
    assert qt.zero_point.tolist() == [-128]  # type: ignore[union-attr]
    assert qt.scale[0] == np.float32(5.1 / 255)
    assert qt.codes.tolist() == [-78, 127, 0]  # 2.55/0.02 = 127.5 - 128 = -0.5 → -0


def test_rounding_is_half_to_even() -> None:
    # s = 127/127 = 1; x/s lands exactly on .5 ties.
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 127.0], dtype=np.float32)
    assert quantize(x, Scheme("absmax", "tensor")).codes.tolist() == [0, 2, 2, 0, -2, 127]


def test_absmax_never_uses_minus_128() -> None:
    x = np.array([-5.0, 5.0, -4.99], dtype=np.float32)
    assert quantize(x, Scheme("absmax", "tensor")).codes.tolist() == [-127, 127, -127]


def test_block_scales_and_short_tail_block() -> None:
    # Rows of 10 with block 4: blocks [0:4], [4:8], and a tail [8:10] with its own scale.
    x = np.arange(20, dtype=np.float32).reshape(2, 10)
    qt = quantize(x, Scheme("absmax", "block", 4))
    assert qt.scale.shape == (2, 3)
    expected = np.array([[3, 7, 9], [13, 17, 19]], dtype=np.float32) / np.float32(127)
    np.testing.assert_array_equal(qt.scale, expected.astype(np.float32))
    assert qt.codes[0].tolist() == [0, 42, 85, 127, 73, 91, 109, 127, 113, 127]


def test_one_outlier_spoils_only_its_own_block() -> None:
    x = np.full((1, 256), 0.01, dtype=np.float32)
    x[0, 0] = 10.0
    qt = quantize(x, Scheme("absmax", "block", 128))
    restored = dequantize(qt)
    assert np.all(restored[0, 128:] == pytest.approx(0.01, rel=1e-2))
    assert np.all(restored[0, 1:128] == 0.0)  # 0.01 is below half a step of 10/127


@pytest.mark.parametrize(
    "scheme,shape,scale_shape",
    [
        (Scheme("absmax", "tensor"), (4, 3, 5), (1,)),
        (Scheme("absmax", "channel"), (4, 3, 5), (4, 1, 1)),
        (Scheme("affine", "block", 2), (4, 3, 5), (4, 3, 3)),
        (Scheme("affine", "block", 128), (7, 300), (7, 3)),
        (Scheme("absmax", "block", 128), (64,), (1,)),
        (Scheme("absmax", "channel"), (6,), (6,)),
    ],
)
def test_scale_shapes_follow_the_design(scheme: Scheme, shape: tuple[int, ...],
                                        scale_shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    qt = quantize(x, scheme)
    assert qt.scale.shape == scale_shape
    assert qt.codes.shape == shape
    if not scheme.symmetric:
        assert qt.zero_point is not None and qt.zero_point.shape == scale_shape


@pytest.mark.parametrize("method", ["absmax", "affine"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_all_zero_groups_have_scale_zero_and_round_trip_exactly(method: str,
                                                                 granularity: str) -> None:
    x = np.zeros((3, 130), dtype=np.float32)
    x[1, :5] = [1.0, -2.0, 0.5, 0.0, 3.0]  # one non-zero group among zero groups
    with np.errstate(all="raise"):  # not even a suppressed warning
        qt = quantize(x, Scheme(method, granularity, 64 if granularity == "block" else None))  # type: ignore[arg-type]
        restored = dequantize(qt)
    if granularity != "tensor":
        assert (qt.scale == 0).sum() >= 2
        zero_rows = [0, 2]
        assert np.all(qt.codes[zero_rows] == 0)
        assert np.all(restored[zero_rows] == 0.0)
        if qt.zero_point is not None:
            assert np.all(qt.zero_point[zero_rows] == 0)
    assert np.all(np.abs(restored - x) <= qt.scale.max() / 2 + 1e-6)


def test_all_zero_tensor() -> None:
    qt = quantize(np.zeros((4, 4), np.float32), Scheme("affine", "tensor"))
    assert qt.scale.tolist() == [0.0] and qt.zero_point.tolist() == [0]  # type: ignore[union-attr]
    assert np.all(dequantize(qt) == 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_non_finite_input_is_an_error_with_count_and_first_index(bad: float,
                                                                  granularity: str) -> None:
    x = np.ones((4, 6), dtype=np.float32)
    x[2, 3] = bad
    x[3, 1] = bad
    scheme = Scheme("absmax", granularity, 4 if granularity == "block" else None)  # type: ignore[arg-type]
    with pytest.raises(NonFiniteValuesError) as caught:
        quantize(x, scheme, name="w")
    assert caught.value.count == 2
    assert caught.value.first_index == (2, 3)
    assert str(caught.value) == (
        "tensor 'w': 2 non-finite values (NaN or ±inf), first at index [2, 3]"
    )


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("method", ["absmax", "affine"])
@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_non_finite_16_bit_input_is_found_in_its_bits(dtype: type, method: str,
                                                      bad: float) -> None:
    x = np.ones((2, 256), dtype=np.float32)
    x[1, 200] = bad
    with pytest.raises(NonFiniteValuesError) as caught:
        quantize(x.astype(dtype), Scheme(method, "block", 128))  # type: ignore[arg-type]
    assert (caught.value.count, caught.value.first_index) == (1, (1, 200))


def test_subnormal_values_keep_the_error_bound() -> None:
    x = np.array([1e-45, -1e-45, 0.0, 3e-45], dtype=np.float32)
    qt = quantize(x, Scheme("absmax", "tensor"))
    assert qt.scale[0] == np.finfo(np.float32).tiny  # floored, never 0 for a non-zero range
    assert np.all(np.abs(dequantize(qt) - x) <= qt.scale[0] / 2)


def test_extreme_magnitudes_do_not_overflow() -> None:
    x = np.array([3e38, -3e38, 1.0], dtype=np.float32)
    for method in ("absmax", "affine"):
        qt = quantize(x, Scheme(method, "tensor"))  # type: ignore[arg-type]
        assert np.isfinite(qt.scale).all()
        assert qt.codes[0] == 127
        restored = dequantize(qt)
        assert np.isfinite(restored).all()
        assert np.all(np.abs(restored.astype(np.float64) - x) <= float(qt.scale[0]) / 2 * 1.0001)


def test_float32_limit() -> None:
    top = np.finfo(np.float32).max
    qt = quantize(np.array([top, -top, 1.0], np.float32), Scheme("absmax", "tensor"))
    restored = dequantize(qt)
    assert np.isfinite(restored).all() and restored[0] <= top
    assert abs(float(restored[0]) - float(top)) <= float(qt.scale[0]) / 2
    with pytest.raises(SchemeError, match="close to the float32 limit"):
        quantize(np.array([3.401674e38, -3.0e38], np.float32), Scheme("affine", "tensor"))


def test_float64_beyond_float32_range_is_refused() -> None:
    with pytest.raises(NonFiniteValuesError):
        quantize(np.array([1e300, 1.0]), Scheme("absmax", "tensor"))


def test_bfloat16_and_float16_inputs() -> None:
    x = np.array([[1.0, -0.5, 0.25, 2.0]], dtype=np.float32)
    for dtype in (ml_dtypes.bfloat16, np.float16, np.float64):
        qt = quantize(x.astype(dtype), Scheme("absmax", "channel"))
        assert qt.codes.tolist() == [[64, -32, 16, 127]]


def test_integer_input_is_refused() -> None:
    with pytest.raises(SchemeError):
        quantize(np.arange(4), Scheme())


def test_channel_granularity_needs_an_axis() -> None:
    with pytest.raises(SchemeError):
        quantize(np.float32(3.0), Scheme("absmax", "channel"))


@pytest.mark.parametrize("bad", [0, -4, 3.5, True])
def test_block_size_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(SchemeError, match="block size must be a positive integer"):
        Scheme("absmax", "block", bad)  # type: ignore[arg-type]


def test_no_block_size_means_the_default_one() -> None:
    assert Scheme("absmax", "block", None) == Scheme() and Scheme().block_size == 128


def test_unknown_method_is_refused() -> None:
    with pytest.raises(SchemeError, match="unknown method 'foo'"):
        Scheme("foo")  # type: ignore[arg-type]


def test_qparams_from_range_hand_values() -> None:
    scale, zero_point = qparams_from_range(np.array([-0.5]), np.array([2.0]), "affine")
    assert scale[0] == np.float32(2.5 / 255)
    assert zero_point is not None and zero_point[0] == -77  # rint(-128 + 51) = -77
    scale, zero_point = qparams_from_range(np.array([-3.4]), np.array([6.2]), "absmax")
    assert scale[0] == np.float32(6.2 / 127) and zero_point is None


def test_value_range_rejects_non_finite() -> None:
    with pytest.raises(NonFiniteValuesError):
        value_range(np.array([[1.0, np.nan]], np.float32))


def test_quantize_rows_statistics_match_error_stats() -> None:
    x = np.random.default_rng(3).standard_normal((50, 300)).astype(np.float32)
    scheme = Scheme("affine", "block", 64)
    result = quantize_rows(x, scheme, with_stats=True)
    qt = quantize(x, scheme)
    expected = error_stats(x, dequantize(qt))
    assert result.stats is not None
    assert result.stats.count == expected.count
    # The kernel measures the error as (x/s + z - q)·s in float32, where x/s carries a
    # rounding of up to 2^-24·128 steps: about 1e-5 of a step, not of the value.
    assert result.stats.max_abs_error == pytest.approx(expected.max_abs_error, rel=1e-4)
    assert result.stats.sqnr_db == pytest.approx(expected.sqnr_db, rel=1e-5)
    assert result.stats.cosine_similarity == pytest.approx(expected.cosine_similarity, rel=1e-7)


def test_error_statistics_by_hand() -> None:
    stats = error_stats([3.0, 4.0], [3.0, 3.0])
    assert stats.mse == 0.5
    assert stats.max_abs_error == 1.0
    assert stats.sqnr_db == pytest.approx(10 * math.log10(25 / 1))
    assert stats.cosine_similarity == pytest.approx(21 / (5 * math.sqrt(18)))
    exact = error_stats([1.0, 2.0], [1.0, 2.0])
    assert exact.sqnr_db == math.inf and exact.cosine_similarity == pytest.approx(1.0)
    assert error_stats([0.0], [0.0]).cosine_similarity == 1.0


def test_stats_merge_equals_stats_of_the_whole() -> None:
    x = np.arange(10.0)
    x_hat = x + np.linspace(-0.3, 0.3, 10)
    whole = error_stats(x, x_hat)
    merged = error_stats(x[:4], x_hat[:4]).merge(error_stats(x[4:], x_hat[4:]))
    assert merged.count == whole.count
    assert merged.mse == pytest.approx(whole.mse)
    assert merged.max_abs_error == whole.max_abs_error
    assert merged.sqnr_db == pytest.approx(whole.sqnr_db)


def test_dequantize_refuses_scales_that_overflow() -> None:
    from quantize_cli import QuantizedTensor
    from quantize_cli.errors import DtypeRangeError

    damaged = QuantizedTensor(codes=np.array([[127, 1]], np.int8),
                              scale=np.array([[1e37]], np.float32), zero_point=None,
                              scheme=Scheme("absmax", "channel"))
    with pytest.raises(DtypeRangeError, match="exceed the range of float32"):
        dequantize(damaged)
