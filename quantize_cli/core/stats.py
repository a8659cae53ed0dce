"""Error statistics between original and dequantized values, mergeable across chunks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .threads import TILE_ELEMENTS, map_tiles
from .values import FLOAT32_SAFE_MAGNITUDES


def decibels(signal: float, error: float) -> float:
    """10·log10(signal / error): ``inf`` for no error, ``-inf`` for no signal.

    >>> decibels(100.0, 1.0), decibels(1.0, 0.0)
    (20.0, inf)
    """
    if error == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / error)


@dataclass(frozen=True)
class ErrorStats:
    """Sums from which every reported statistic derives; ``merge`` adds two chunks.

    Keeping sums (in float64) rather than finished statistics is what lets a tensor that is
    processed in row chunks report exactly one set of numbers.

    >>> s = error_stats(np.array([1.0, -2.0]), np.array([1.0, -1.5]))
    >>> s.mse, s.max_abs_error
    (0.125, 0.5)
    """

    count: int = 0
    signal_energy: float = 0.0  # sum of x**2
    error_energy: float = 0.0  # sum of (x - x_hat)**2
    dequantized_energy: float = 0.0  # sum of x_hat**2
    cross_energy: float = 0.0  # sum of x * x_hat
    max_abs_error: float = 0.0

    def merge(self, other: ErrorStats) -> ErrorStats:
        return ErrorStats(
            count=self.count + other.count,
            signal_energy=self.signal_energy + other.signal_energy,
            error_energy=self.error_energy + other.error_energy,
            dequantized_energy=self.dequantized_energy + other.dequantized_energy,
            cross_energy=self.cross_energy + other.cross_energy,
            max_abs_error=max(self.max_abs_error, other.max_abs_error),
        )

    @staticmethod
    def total(parts: Iterable[ErrorStats | None]) -> ErrorStats:
        """The statistics of all ``parts`` together (None parts count for nothing).

        >>> ErrorStats.total([ErrorStats(count=2), None, ErrorStats(count=3)]).count
        5
        """
        merged = ErrorStats()
        for part in parts:
            if part is not None:
                merged = merged.merge(part)
        return merged

    @property
    def mse(self) -> float:
        """Mean squared error; 0 for an empty tensor."""
        return self.error_energy / self.count if self.count else 0.0

    @property
    def sqnr_db(self) -> float:
        """10·log10(Σx² / Σ(x - x̂)²) in dB; ``inf`` when the round trip is exact."""
        return decibels(self.signal_energy, self.error_energy)

    @property
    def cosine_similarity(self) -> float:
        """Σx·x̂ / (‖x‖·‖x̂‖); 1 when both sides are all zeros (identical vectors)."""
        norms = math.sqrt(self.signal_energy) * math.sqrt(self.dequantized_energy)
        if norms == 0.0:
            return 1.0 if self.signal_energy == self.dequantized_energy else 0.0
        return self.cross_energy / norms


def error_stats(original: npt.ArrayLike, dequantized: npt.ArrayLike) -> ErrorStats:
    """Error statistics of ``dequantized`` against ``original`` (same shape).

    >>> error_stats([3.0, 4.0], [3.0, 4.0]).sqnr_db
    inf
    """
    x = np.asarray(original, dtype=np.float64).ravel()
    x_hat = np.asarray(dequantized, dtype=np.float64).ravel()
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {x.shape} and {x_hat.shape}")
    if x.size == 0:
        return ErrorStats()
    dequantized_energy = float(np.dot(x_hat, x_hat))
    cross_energy = float(np.dot(x, x_hat))
    signal_energy = float(np.dot(x, x))
    error = x - x_hat
    return ErrorStats(
        count=int(x.size),
        signal_energy=signal_energy,
        error_energy=float(np.dot(error, error)),
        dequantized_energy=dequantized_energy,
        cross_energy=cross_energy,
        max_abs_error=float(max(error.max(), -error.min())),
    )


@dataclass(frozen=True)
class OutputError:
    """The error of a layer's output rather than of its weight: for a weight W, its
    quantized Ŵ and the second moment of the layer's inputs H = XᵀX / n (calibration),
    ``signal`` = tr(W H Wᵀ) and ``error`` = tr((W − Ŵ) H (W − Ŵ)ᵀ), the mean squared
    output and output error per token, summed over output channels; ``merge`` adds row
    chunks.

    >>> OutputError(100.0, 1.0).merge(OutputError(100.0, 1.0)).sqnr_db
    20.0
    """

    signal: float = 0.0
    error: float = 0.0

    def merge(self, other: OutputError) -> OutputError:
        return OutputError(self.signal + other.signal, self.error + other.error)

    @property
    def sqnr_db(self) -> float:
        """10·log10(signal / error) in dB; ``inf`` when the output is exact."""
        return decibels(self.signal, self.error)


def output_error(values: np.ndarray, restored: np.ndarray, hessian: np.ndarray) -> OutputError:
    """:class:`OutputError` of rows ``values`` (rows, columns) dequantized as ``restored``,
    for the inputs' second moment ``hessian`` (columns, columns), through BLAS.

    >>> output_error(np.array([[1.0, 0.0]]), np.array([[0.5, 0.0]]), np.eye(2)).sqnr_db
    6.020599913279624
    """
    weights = np.asarray(values, np.float32)
    difference = weights - np.asarray(restored, np.float32)
    moment = np.asarray(hessian, np.float32)
    signal = float(np.einsum("ij,ij->", weights @ moment, weights, dtype=np.float64))
    error = float(np.einsum("ij,ij->", difference @ moment, difference, dtype=np.float64))
    return OutputError(max(signal, 0.0), max(error, 0.0))


def compare(original: np.ndarray, approximation: np.ndarray) -> ErrorStats:
    """:func:`error_stats` of two float32 arrays of the same shape, computed tile by tile
    on every thread while each tile is in cache (the whole-array version makes float64
    copies of both sides on one thread). A tile's sums are taken in float32 by BLAS and
    added in float64, as the quantize kernels do; a tile of extreme magnitudes, or whose
    squared differences underflow, is summed in float64. Non-finite values make the sums
    non-finite, which the caller checks.

    >>> compare(np.array([[1.0, -2.0]], np.float32), np.array([[1.0, -1.5]], np.float32)).mse
    0.125
    """
    if original.shape != approximation.shape:
        raise ValueError(f"shapes differ: {original.shape} and {approximation.shape}")
    flat_original = original.reshape(-1)
    flat_approximation = approximation.reshape(-1)
    tile = TILE_ELEMENTS

    def work(tiles: slice) -> ErrorStats:
        span = slice(tiles.start * tile, min(tiles.stop * tile, flat_original.size))
        x, x_hat = flat_original[span], flat_approximation[span]
        error = x - x_hat  # exact where the two are within a factor of 2 (Sterbenz)
        largest_error = float(np.abs(error).max()) if error.size else 0.0
        largest = float(np.abs(x).max()) if x.size else 0.0
        error_energy = float(np.dot(error, error))
        if not (FLOAT32_SAFE_MAGNITUDES[0] < largest < FLOAT32_SAFE_MAGNITUDES[1]) or (
                largest_error and not error_energy):
            x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
            error = x - x_hat
            error_energy = float(np.dot(error, error))
        return ErrorStats(
            count=int(x.size), signal_energy=float(np.dot(x, x)), error_energy=error_energy,
            dequantized_energy=float(np.dot(x_hat, x_hat)), cross_energy=float(np.dot(x, x_hat)),
            max_abs_error=largest_error)

    return ErrorStats.total(map_tiles(work, -(-flat_original.size // tile), 1))
