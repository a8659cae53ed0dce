"""--clip mse: the search never makes a group worse, finds a known optimum, and is the
same whether a tensor is processed whole or in chunks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import read_with_safetensors, to_array, write_safetensors
from quantize_cli import Scheme, dequantize, quantize
from quantize_cli.cli.main import qz
from quantize_cli.core import clip
from quantize_cli.jobs import quantize_checkpoint


def group_squared_errors(x: np.ndarray, scheme: Scheme) -> np.ndarray:
    """Σ(x - x̂)² per group, exactly, in float64 (rows of the block view)."""
    error = (x.astype(np.float64) - dequantize(quantize(x, scheme)).astype(np.float64)) ** 2
    if scheme.granularity == "tensor":
        return np.array([error.sum()])
    if scheme.granularity == "channel":
        return error.reshape(error.shape[0], -1).sum(axis=1)
    assert scheme.block_size is not None
    width = -(-x.shape[-1] // scheme.block_size) * scheme.block_size
    padded = np.zeros((*error.shape[:-1], width))
    padded[..., : x.shape[-1]] = error
    return padded.reshape(-1, scheme.block_size).sum(axis=1)


@settings(deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 200)),
               elements=st.one_of(st.floats(-1, 1, width=32),
                                  st.floats(-1e4, 1e4, width=32))),
    st.sampled_from(["absmax", "affine"]),
    st.sampled_from(["tensor", "channel", "block"]),
)
def test_mse_clip_never_increases_a_groups_error(x: np.ndarray, method: str,
                                                 granularity: str) -> None:
    block = 32 if granularity == "block" else None
    plain = group_squared_errors(x, Scheme(method, granularity, block))  # type: ignore[arg-type]
    clipped = group_squared_errors(x, Scheme(method, granularity, block, "mse"))  # type: ignore[arg-type]
    # float32 rounding of the squares the search compares: a few parts in 10^7.
    assert np.all(clipped <= plain * (1 + 1e-6) + 1e-30)


def test_known_optimum_by_hand() -> None:
    # 127 values of ±1 and one outlier of 4. Unclipped, s = 4/127: ±1 is 31.75 steps and
    # rounds to ±32, an error of 0.25 steps = 0.00787 each, 127 · 0.00787² = 0.00787 in
    # all. Any shrink clips the outlier by at least 4·(1 - 0.8) = 0.8 (0.64 squared), so
    # the full range must win here — and the search must say so.
    x = np.ones((1, 1, 128), np.float32)
    x[0, 0, 1::2] = -1
    x[0, 0, 0] = 4.0
    magnitude = np.abs(x).max(-1)
    candidates = list(clip.COARSE_FACTORS)
    errors = [float(clip.group_errors(x, -magnitude, magnitude,
                                      np.full((1, 1), f, np.float32), "absmax")[0, 0])
              for f in candidates]
    assert errors[0] == pytest.approx(127 * (0.25 * 4 / 127) ** 2, rel=1e-5)
    assert int(np.argmin(errors)) == 0
    assert float(clip.search_factors(x, -magnitude, magnitude, "absmax")[0, 0]) == 1.0
    # With f = 0.25 the outlier clips to 1.0 exactly, every ±1 is exact (127 steps), and
    # the only error is 4 - 1 = 3, squared 9.
    exact = clip.group_errors(x, -magnitude, magnitude, np.full((1, 1), 0.25, np.float32),
                              "absmax")
    assert exact[0, 0] == pytest.approx(9.0)


def test_search_lands_near_the_brute_force_optimum() -> None:
    # Heavy-tailed weights (Student-t, 5 degrees of freedom), one scale for the tensor: a
    # fine scan of the shrink factor finds the optimum; the eight-point search must come
    # within 2% of its error.
    from quantize_cli.core.quantize import tensor_errors, value_range

    x = (np.random.default_rng(4).standard_t(5, (1024, 1024)) * 0.02).astype(np.float32)
    full = value_range(x)
    factors = [float(f) for f in np.arange(0.2, 1.0001, 0.01)]
    scan = dict(zip(factors, tensor_errors(x, full, "absmax", factors), strict=True))
    optimum = min(scan, key=scan.__getitem__)
    chosen = clip.search_tensor_factor(lambda fs: tensor_errors(x, full, "absmax", fs))
    assert 0.25 < optimum < 0.75  # an interior optimum, far from the full range
    assert tensor_errors(x, full, "absmax", [chosen])[0] <= scan[optimum] * 1.02


def test_small_groups_rarely_clip() -> None:
    # MSE punishes clipping a large value hard: 64 outliers at ±8 among 4096 values in
    # [-1, 1] are kept whole, as a scan confirms.
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 1, 4096)).astype(np.float32)
    x[0, 0, :64] = np.where(np.arange(64) % 2, 8.0, -8.0)
    magnitude = np.abs(x).max(-1)
    assert float(clip.search_factors(x, -magnitude, magnitude, "absmax")[0, 0]) == 1.0


def test_heavy_tails_per_tensor_gain_several_db() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_t(5, (1024, 1024)) * 0.02).astype(np.float32)

    def sqnr(scheme: Scheme) -> float:
        error = x - dequantize(quantize(x, scheme))
        signal, noise = (x.astype(np.float64) ** 2).sum(), (error.astype(np.float64) ** 2).sum()
        return float(10 * np.log10(signal / noise))

    gain = (sqnr(Scheme("absmax", "tensor", None, "mse"))
            - sqnr(Scheme("absmax", "tensor", None, "none")))
    assert gain > 3.0


def test_chunked_per_tensor_search_gives_the_same_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    source = write_safetensors(tmp_path / "m.safetensors", {
        "w": (rng.standard_t(5, (64, 256)) * 0.02).astype(np.float32)})
    scheme = Scheme("affine", "tensor", None, "mse")
    quantize_checkpoint(source, tmp_path / "whole.safetensors", scheme)
    quantize_checkpoint(source, tmp_path / "chunked.safetensors", scheme, chunk_bytes=4096)
    assert (tmp_path / "whole.safetensors").read_bytes() == \
        (tmp_path / "chunked.safetensors").read_bytes()
    # and the library function agrees with the streamed file
    _, tensors = read_with_safetensors(tmp_path / "whole.safetensors")
    library = quantize(to_array(*read_with_safetensors(source)[1]["w"]), scheme)
    assert to_array(*tensors["w"]).tobytes() == library.codes.tobytes()


def test_cli_clip_auto_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    source = write_safetensors(tmp_path / "m.safetensors", {
        "w": (rng.standard_t(3, (256, 256)) * 0.02).astype(np.float32)})
    runner = CliRunner()
    per_tensor = json.loads(runner.invoke(qz, ["quantize", str(source), "--per-tensor",
                                               "--json", "-"]).stdout)
    assert per_tensor["tensors"][0]["scheme"]["clip"] == "mse"
    assert per_tensor["output"] == str(tmp_path / "m.int8-tensor.safetensors")
    metadata, _ = read_with_safetensors(Path(per_tensor["output"]))
    assert json.loads(metadata["qz.tensors"])["w"]["clip"] == "mse"
    block = json.loads(runner.invoke(qz, ["quantize", str(source), "--json", "-"]).stdout)
    assert block["tensors"][0]["scheme"]["clip"] == "none"
    none = json.loads(runner.invoke(qz, ["quantize", str(source), "--per-tensor", "--clip",
                                         "none", "--json", "-"]).stdout)
    assert none["output"] == str(tmp_path / "m.int8-tensor-clip-none.safetensors")
    assert none["tensors"][0]["stats"]["sqnr_db"] < per_tensor["tensors"][0]["stats"]["sqnr_db"]
    result = runner.invoke(qz, ["dequantize", str(tmp_path / "m.int8.safetensors")])
    assert result.exit_code == 0, result.stderr
