"""GPTQ and the other ways of quantizing for a layer's output (core/gptq.py), against a
direct transcription of the published algorithm, the identity case, and the promise that
calibration never makes a row's output error worse."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize_cli.core import Scheme, dequantize_rows, quantize_rows
from quantize_cli.core.gptq import (
    _Grid,
    gptq_codes,
    plan_gptq,
    quantize_rows_calibrated,
)
from quantize_cli.core.params import Storage
from quantize_cli.core.stats import output_error

SCHEMES = [Scheme("absmax", "block", 32, bits=4), Scheme("affine", "block", 32, bits=4),
           Scheme("absmax", "channel", bits=3), Scheme("absmax", "tensor", bits=8)]


def layer(rows: int, columns: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight and the second moment of correlated inputs of uneven scales."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((columns, columns)) * 0.3 + np.eye(columns)
    inputs = rng.standard_normal((4 * columns, columns)) @ mixing * np.exp(
        rng.standard_normal(columns))
    weight = (rng.standard_normal((rows, columns)) * 0.05).astype(np.float32)
    return weight, inputs.T @ inputs / len(inputs)


def algorithm_1(weight: np.ndarray, factor: np.ndarray, grid: _Grid) -> np.ndarray:
    """GPTQ as the paper's Algorithm 1 writes it, one column at a time, without the
    lazy batches: Q:,i = quant(W:,i); E:,i = (W:,i − Q:,i) / U_ii; W:,i: −= E:,i · U_i,i:."""
    weight = weight.astype(np.float32).copy()
    codes = np.zeros_like(weight)
    for i in range(weight.shape[1]):
        codes[:, i], restored = grid.column(weight[:, i], i)
        error = (weight[:, i] - restored) / factor[i, i]
        weight[:, i:] -= np.outer(error, factor[i, i:])
    return codes


def test_gptq_is_algorithm_1() -> None:
    # One block of columns: the same operations in the same order, the same codes.
    weight, moment = layer(16, 96)
    scheme = Scheme("absmax", "block", 32, bits=4)
    plan = plan_gptq(moment)
    grid = _Grid(quantize_rows(weight, scheme), scheme, Storage())
    ours = gptq_codes(weight, plan, grid)
    assert np.array_equal(ours, algorithm_1(weight, plan.inverse_factor, grid))
    # Several blocks: the blocks' updates reach the later columns in one product, which
    # only reorders the sums; the codes agree but for rounding ties.
    weight, moment = layer(32, 300, seed=1)
    plan = plan_gptq(moment)
    grid = _Grid(quantize_rows(weight, scheme), scheme, Storage())
    agree = gptq_codes(weight, plan, grid) == algorithm_1(weight, plan.inverse_factor, grid)
    assert agree.mean() > 0.999


def test_the_plan_is_the_upper_cholesky_factor_of_the_damped_inverse() -> None:
    _, moment = layer(4, 200, seed=2)
    damped = moment + np.eye(200) * 0.01 * np.mean(np.diagonal(moment))
    expected = np.linalg.cholesky(np.linalg.inv(damped)).T  # upper: H⁻¹ = UᵀU
    factor = plan_gptq(moment).inverse_factor
    assert np.allclose(factor, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert np.array_equal(factor, np.triu(factor))


def test_with_h_the_identity_gptq_is_plain_rounding() -> None:
    weight, _ = layer(24, 160, seed=3)
    for scheme in SCHEMES:
        parameters = quantize_rows(weight, scheme, storage=Storage())
        codes = gptq_codes(weight, plan_gptq(np.eye(160), act_order=True),
                           _Grid(parameters, scheme, Storage()))
        assert np.array_equal(codes, parameters.codes), scheme.describe()


def test_act_order_keeps_the_groups_and_lowers_the_output_error() -> None:
    weight, moment = layer(64, 256, seed=4)
    scheme = Scheme("absmax", "block", 64, bits=4)
    plain = quantize_rows(weight, scheme)
    errors = {}
    for act_order in (False, True):
        result = quantize_rows_calibrated(weight, scheme, moment, plan_gptq(moment, act_order),
                                          storage=Storage(), with_stats=True)
        assert result.scale.shape == plain.scale.shape  # the same layout
        assert result.output is not None
        errors[act_order] = result.output.error
    plain_error = output_error(weight, dequantize_rows(plain, scheme), moment).error
    assert errors[True] < errors[False] < 0.7 * plain_error


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 12), st.integers(8, 96), st.integers(0, 2**32 - 1),
       st.sampled_from(range(len(SCHEMES))), st.booleans(), st.booleans())
def test_calibration_never_makes_a_row_worse(rows: int, columns: int, seed: int, which: int,
                                             act_order: bool, gptq: bool) -> None:
    scheme = SCHEMES[which]
    weight, moment = layer(rows, columns, seed)
    plain = quantize_rows(weight, scheme)
    result = quantize_rows_calibrated(weight, scheme, moment,
                                      plan_gptq(moment, act_order) if gptq else None,
                                      storage=Storage())
    for row in range(rows):
        ours = output_error(weight[row:row + 1], dequantize_rows(result, scheme)[row:row + 1],
                            moment).error
        theirs = output_error(weight[row:row + 1], dequantize_rows(plain, scheme)[row:row + 1],
                              moment).error
        assert ours <= theirs * (1 + 1e-5) + 1e-12
