"""GPTQ: integer codes chosen for the error of a layer's output, not of its weight.

Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023), Algorithm 1. A linear layer's output
error over inputs X is ‖X(W − Ŵ)ᵀ‖², a quadratic form in H = XᵀX / n (the inputs'
second moment, measured by ``qz calibrate``). The columns of W are rounded one at a
time; each column's rounding error, divided by its diagonal entry of the upper Cholesky
factor U of H⁻¹, is pushed onto the columns not yet rounded through U's row, so that
they compensate it. Blocks of 128 columns keep the updates in BLAS (a block's errors
reach the columns after it in one matrix product).

qz fixes the group parameters (scales, zero points) before rounding, by its own scale
search weighted by the inputs' mean squares (search.py), so a GPTQ output is an
ordinary checkpoint of its scheme. With act-order the columns of largest mean square go
first (they gain most from the others' compensation); the groups stay those of the
original column order ("static groups"), so the layout is unchanged too. Rows are
independent: a run of rows is rounded at a time, and memory is a chunk of rows and H.

With H = I, U = I and no error is pushed: GPTQ is plain rounding with the same
parameters (tests/test_gptq.py checks it, and that a direct transcription of
Algorithm 1 gives the same codes). GPTQ is greedy, not optimal: qz keeps, per row, the
best by the output error of GPTQ, of rounding with the weighted scales, and of its
codes without calibration, so calibration never makes a row worse.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .params import Storage
from .quantize import dequantize_rows, quantize_rows
from .rows import RowResult
from .scheme import Scheme
from .stats import ErrorStats, compare, output_error
from .threads import get_num_threads, map_tiles
from .values import as_float32

#: Columns per block of updates (the paper's B).
BLOCK_COLUMNS = 128
#: Damping added to H's diagonal, as a fraction of its mean (the paper's λ = 1%).
DAMPING = 0.01


@dataclass(frozen=True)
class GptqPlan:
    """What GPTQ needs of a layer's inputs: the column order (act-order; None for the
    natural one) and the upper Cholesky factor of the damped inverse second moment, in
    that order."""

    order: np.ndarray | None
    inverse_factor: np.ndarray  # (columns, columns) float32, upper triangular


def plan_gptq(hessian: np.ndarray, act_order: bool = False,
              damping: float = DAMPING) -> GptqPlan:
    """The plan for a layer whose inputs have second moment ``hessian`` (XᵀX / n).

    Columns no input ever reached (a zero diagonal) get a unit diagonal: their codes
    cannot change the output, and H stays invertible.

    >>> plan = plan_gptq(np.eye(3))
    >>> bool(np.allclose(plan.inverse_factor, np.eye(3) / np.sqrt(1.01)))
    True
    """
    moment = np.array(hessian, dtype=np.float64, copy=True)
    diagonal = np.diagonal(moment).copy()
    dead = diagonal <= 0
    moment[dead, dead] = 1.0
    order = np.argsort(-np.diagonal(moment), kind="stable") if act_order else None
    if order is not None:
        moment = moment[np.ix_(order, order)]
    mean = float(np.mean(np.diagonal(moment))) if moment.size else 1.0
    # H⁻¹ = UᵀU with U upper: with J the reversal of the columns and J H J = M Mᵀ
    # (Cholesky), U = J M⁻¹ J; one factorisation and one inverse of a triangle.
    # Calibration on few tokens can leave H singular: more damping until it is not.
    for attempt in range(6):
        damped = moment + np.eye(len(moment)) * damping * mean * 10 ** attempt
        try:
            lower = np.linalg.cholesky(damped[::-1, ::-1])
        except np.linalg.LinAlgError:
            continue
        factor = _lower_inverse(lower)[::-1, ::-1]
        return GptqPlan(order, np.ascontiguousarray(np.triu(factor), dtype=np.float32))
    raise np.linalg.LinAlgError("the inputs' second moment is not positive definite")


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower triangular matrix, by halves: [[A, 0], [B, C]]⁻¹ is
    [[A⁻¹, 0], [−C⁻¹·B·A⁻¹, C⁻¹]]. Matrix products (BLAS) do the work, a third of what
    numpy's general inverse spends (numpy has no triangular inverse of its own).

    >>> a = np.array([[2.0, 0.0], [1.0, 4.0]])
    >>> bool(np.allclose(_lower_inverse(a) @ a, np.eye(2)))
    True
    """
    size = len(lower)
    if size <= 128:
        return np.linalg.inv(lower)
    half = size // 2
    first = _lower_inverse(lower[:half, :half])
    second = _lower_inverse(lower[half:, half:])
    inverse = np.zeros_like(lower)
    inverse[:half, :half] = first
    inverse[half:, half:] = second
    inverse[half:, :half] = -(second @ (lower[half:, :half] @ first))
    return inverse


class _Grid:
    """How one column of a run of rows is rounded with the fixed group parameters of
    ``result``: its codes, and the values they stand for (parameters converted once, as
    float32 per row and group)."""

    def __init__(self, result: RowResult, scheme: Scheme, storage: Storage) -> None:
        self.block = scheme.block_size if scheme.granularity == "block" else None
        self.lowest, self.highest = storage.code_range(scheme)
        self.scale = result.scale.astype(np.float32)
        self.divisor = np.where(self.scale == 0, np.float32(1), self.scale)
        self.dtype: np.dtype | None = None  # MLX's offset: x̂ = T(T(q·s) + b) (offset.py)
        self.shift: np.ndarray | None = None
        if result.bias is not None:
            self.lowest, self.highest = 0, scheme.levels
            self.dtype = result.scale.dtype
            self.shift = result.bias.astype(np.float32)
        elif result.zero_point is not None:
            self.shift = result.zero_point.astype(np.float32)

    def rows(self, tile: slice) -> _Grid:
        """The grid of a run of the rows (one scale per tensor serves every run)."""
        part = _Grid.__new__(_Grid)
        part.__dict__.update(self.__dict__)
        if self.scale.shape[0] > 1:
            part.scale, part.divisor = self.scale[tile], self.divisor[tile]
            part.shift = None if self.shift is None else self.shift[tile]
        return part

    def column(self, values: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        group = 0 if self.block is None else index // self.block
        scale, divisor = self.scale[:, group], self.divisor[:, group]
        shift = None if self.shift is None else self.shift[:, group]
        if self.dtype is not None:
            assert shift is not None
            codes = np.clip(np.rint((values - shift) / divisor), self.lowest, self.highest)
            product = (codes * scale).astype(self.dtype).astype(np.float32)
            return codes, (product + shift).astype(self.dtype).astype(np.float32)
        if shift is None:
            codes = np.clip(np.rint(values / divisor), self.lowest, self.highest)
            return codes, codes * scale
        codes = np.clip(np.rint(values / divisor + shift), self.lowest, self.highest)
        return codes, (codes - shift) * scale


def gptq_codes(values: np.ndarray, plan: GptqPlan, grid: _Grid) -> np.ndarray:
    """The codes GPTQ chooses for float32 rows ``values`` (rows, columns), as float32
    integers in the original column order."""
    weights = np.array(values if plan.order is None else values[:, plan.order],
                       dtype=np.float32, copy=True)
    rows, columns = weights.shape
    factor = plan.inverse_factor
    chosen = np.empty((rows, columns), dtype=np.float32)
    for start in range(0, columns, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, columns)
        block = weights[:, start:stop]
        errors = np.empty((rows, stop - start), dtype=np.float32)
        for offset in range(stop - start):
            position = start + offset
            original = position if plan.order is None else int(plan.order[position])
            codes, restored = grid.column(block[:, offset], original)
            chosen[:, position] = codes
            error = (block[:, offset] - restored) / factor[position, position]
            block[:, offset:] -= np.outer(error, factor[position, position:stop])
            errors[:, offset] = error
        weights[:, stop:] -= errors @ factor[start:stop, stop:]
    if plan.order is None:
        return chosen
    restored_order = np.empty_like(chosen)
    restored_order[:, plan.order] = chosen
    return restored_order


def quantize_rows_calibrated(rows: np.ndarray, scheme: Scheme, hessian: np.ndarray,
                             plan: GptqPlan | None, *, storage: Storage,
                             tensor_range: tuple[float, float] | None = None,
                             with_stats: bool = False) -> RowResult:
    """Quantize a run of rows for the layer's output error, given the inputs' second
    moment ``hessian`` (H = XᵀX / n): each row gets the best, by that error, of qz's
    codes without calibration, of the scale search weighted by the inputs' mean squares
    (H's diagonal), and of GPTQ's codes with those scales (``plan``; None: no GPTQ, and
    float elements have none). Rows are independent, so no row's output error is ever
    worse than without calibration. With ``with_stats``, the weight error and the output
    error (:class:`OutputError`) of the result.

    >>> x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    >>> plain = quantize_rows(x, Scheme(bits=4), with_stats=True)
    >>> result = quantize_rows_calibrated(x, Scheme(bits=4), np.eye(64),
    ...                                   plan_gptq(np.eye(64)), storage=Storage(),
    ...                                   with_stats=True)
    >>> result.output.error <= plain.stats.error_energy
    True
    """
    values = as_float32(rows)
    moment = np.asarray(hessian, np.float32)
    candidates = [quantize_rows(rows, scheme, tensor_range=tensor_range, storage=storage)]
    if not scheme.element.is_float:
        weighted = quantize_rows(rows, scheme, tensor_range=tensor_range, storage=storage,
                                 importance=np.diagonal(moment).copy())
        candidates.append(weighted)
        if plan is not None:
            grid = _Grid(weighted, scheme, storage)
            chosen = np.empty(values.shape, dtype=weighted.codes.dtype)

            def work(tile: slice) -> None:  # rows are independent: a tile per thread
                chosen[tile] = gptq_codes(values[tile], plan, grid.rows(tile))

            map_tiles(work, values.shape[0], max(1, -(-values.shape[0] // get_num_threads())))
            candidates.append(replace(weighted, codes=chosen, code_bounds=None))
    errors = []
    for candidate in candidates:
        difference = values - dequantize_rows(candidate, scheme, np.float32)
        errors.append(np.einsum("ij,ij->i", difference @ moment, difference,
                                dtype=np.float64))
    best = np.argmin(np.stack(errors), axis=0)
    result = _rows_of(candidates, best, scheme)
    if not with_stats:
        return result
    restored = dequantize_rows(result, scheme, np.float32)
    stats: ErrorStats = compare(values, restored)
    return replace(result, stats=stats, output=output_error(values, restored, moment))


def _rows_of(candidates: list[RowResult], best: np.ndarray, scheme: Scheme) -> RowResult:
    """The result whose row r is candidate ``best[r]``'s row r (codes and the row's group
    parameters; one scale per tensor is the same in every candidate)."""
    first = candidates[0]
    if (best == 0).all():
        return first

    def pick(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        if arrays[0] is None or arrays[0].shape[0] != best.shape[0]:
            return arrays[0]  # absent, or one per tensor
        stacked = np.stack(arrays)  # type: ignore[arg-type]
        chosen: np.ndarray = stacked[best, np.arange(best.shape[0])]
        return chosen

    codes = pick([candidate.codes for candidate in candidates])
    scale = pick([candidate.scale for candidate in candidates])
    assert codes is not None and scale is not None
    return replace(first, codes=codes, scale=scale,
                   zero_point=pick([candidate.zero_point for candidate in candidates]),
                   bias=pick([candidate.bias for candidate in candidates]),
                   code_bounds=None, stats=None)
