"""The codecs one by one: what a quantized weight becomes in each format (names, dtypes,
shapes, bytes), how a format is recognised, and that reading gives back exactly what was
encoded. Hand-checked numbers; files are built with struct + json (conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import raw_safetensors, write_safetensors
from quantize_cli.core import RowResult, Scheme, quantize_rows
from quantize_cli.errors import QuantizedFormatError, SchemeError
from quantize_cli.formats import (
    FORMATS,
    Deployment,
    ModelFormat,
    QuantizedWeight,
    detect,
    format_named,
)
from quantize_cli.storage.header import TensorEntry
from quantize_cli.storage.reader import SafetensorsReader

QZ, CT, MLX = format_named("qz"), format_named("compressed-tensors"), format_named("mlx")
ONE = Deployment()
X = np.array([[1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2]], dtype=np.float32)


def entry(name: str = "layer.weight", dtype: str = "F32",
          shape: tuple[int, ...] = (1, 8)) -> TensorEntry:
    size = int(np.prod(shape)) * {"F32": 4, "BF16": 2, "F16": 2}[dtype]
    return TensorEntry(name, dtype, shape, 0, size)


Stored = list[tuple[str, str, tuple[int, ...], str]]


def quantized(fmt: ModelFormat, tensor: TensorEntry, rows: np.ndarray,
              scheme: Scheme) -> RowResult:
    """``rows`` quantized as ``fmt`` stores ``scheme``."""
    storage = fmt.layout_for(scheme).storage(tensor.dtype, scheme)
    return quantize_rows(rows, scheme, storage=storage, with_stats=True)


def encoded(fmt: ModelFormat, tensor: TensorEntry, scheme: Scheme,
            result: RowResult) -> dict[str, np.ndarray]:
    return dict(fmt.layout_for(scheme).encode(tensor, scheme, result, 0))


def stored(codec_name: str, scheme: Scheme, tensor: TensorEntry) -> Stored:
    return [(t.name, t.dtype, t.shape, t.role)
            for t in format_named(codec_name).stored_tensors(tensor, scheme)]


def test_registry_names_and_unknown_format() -> None:
    assert list(FORMATS) == ["qz", "compressed-tensors", "mlx"]
    with pytest.raises(SchemeError, match="unknown format 'gguf' \\(choose from qz, "
                                          "compressed-tensors, mlx\\)"):
        format_named("gguf")


# --------------------------------------------------------------------------------- qz


@pytest.mark.parametrize("scheme,expected", [
    (Scheme("absmax", "tensor"), [("w", "I8", (4, 300), "codes"),
                                  ("w_scale", "F32", (1,), "scale")]),
    (Scheme("affine", "channel"), [("w", "I8", (4, 300), "codes"),
                                   ("w_scale", "F32", (4, 1), "scale"),
                                   ("w_zero_point", "I8", (4, 1), "zero_point")]),
    (Scheme("absmax", "block", 128), [("w", "I8", (4, 300), "codes"),
                                      ("w_scale", "F32", (4, 3), "scale")]),
])
def test_qz_stored_tensors(scheme: Scheme, expected: Stored) -> None:
    assert stored("qz", scheme, entry("w", "BF16", (4, 300))) == expected


def test_qz_encodes_codes_and_scales_of_each_chunk() -> None:
    scheme = Scheme("affine", "block", 4)
    result = quantize_rows(X, scheme)
    pieces = encoded(QZ, entry(), scheme, result)
    assert pieces["layer.weight"].tolist() == result.codes.tolist()
    assert pieces["layer.weight_scale"].shape == (1, 2)
    assert pieces["layer.weight_zero_point"].dtype == np.int8


def test_qz_per_tensor_scale_goes_with_the_first_rows_only() -> None:
    scheme = Scheme("absmax", "tensor", clip="none")
    result = quantize_rows(X, scheme)
    layout = QZ.layout_for(scheme)
    assert [name for name, _ in layout.encode(entry(), scheme, result, first_row=0)] == [
        "layer.weight", "layer.weight_scale"]
    assert [name for name, _ in layout.encode(entry(), scheme, result, first_row=5)] == [
        "layer.weight"]


def test_qz_metadata_describes_every_quantized_tensor() -> None:
    metadata = QZ.shard_metadata({"format": "pt"}, [
        QuantizedWeight(entry("b", "BF16"), Scheme("absmax", "tensor")),
        QuantizedWeight(entry("a"), Scheme("affine", "block", 64))])
    assert metadata["format"] == "pt" and metadata["qz.format_version"] == "1"
    assert metadata["qz.tensors"] == (
        '{"a":{"block":64,"dtype":"F32","granularity":"block","method":"affine"},'
        '"b":{"block":null,"clip":"mse","dtype":"BF16","granularity":"tensor",'
        '"method":"absmax"}}')


def test_qz_reads_back_what_it_encoded(tmp_path: Path) -> None:
    scheme = Scheme("affine", "channel")
    result = quantize_rows(X, scheme)
    metadata = QZ.shard_metadata({}, [QuantizedWeight(entry(), scheme)])
    path = write_safetensors(tmp_path / "q.safetensors", encoded(QZ, entry(), scheme, result),
                             metadata)
    with SafetensorsReader(path) as reader:
        assert detect(reader.header) is QZ and QZ.version(reader.header) == "1"
        (weight,) = QZ.find(reader, None)
        assert (weight.name, weight.shape, weight.dtype, weight.scheme) == (
            "layer.weight", (1, 8), "F32", Scheme("affine", "channel"))
        assert weight.description == "INT8 affine channel"
        rows = weight.read_rows(reader, 0, 1)
    assert rows.codes.tolist() == result.codes.tolist()
    values = weight.dequantize_rows(rows, np.float32, path)
    # s = 9.6/255, z = -38: every value within s/2.
    assert np.abs(values - X).max() <= 9.6 / 255 / 2


# ----------------------------------------------------------------- compressed-tensors


def test_ct_stored_tensors_and_packed_bytes() -> None:
    scheme = Scheme("absmax", "block", 64)
    assert stored("compressed-tensors", scheme, entry("l.weight", "BF16", (64, 256))) == [
        ("l.weight_packed", "I32", (64, 64), "codes"),
        ("l.weight_scale", "BF16", (64, 4), "scale"),
        ("l.weight_shape", "I64", (2,), "shape")]
    rows = np.array([[-1.0, -0.5, 0.0, 1.0]], np.float32)
    result = quantize_rows(rows, Scheme("absmax", "channel"))
    pieces = encoded(CT, entry("l.weight", "F32", (1, 4)), Scheme("absmax", "channel"), result)
    # codes -127, -64, 0, 127 are stored as q + 128: 1, 64, 128, 255.
    assert pieces["l.weight_packed"].tolist() == [[1, 64, 128, 255]]
    assert pieces["l.weight_shape"].tolist() == [1, 4]


def test_ct_scales_are_the_better_of_qz_and_compressed_tensors_rules() -> None:
    # Per channel, plain rounding keeps the better of qz's rule (s = max|x| / 127 rounded
    # up to BF16, no code clipped) and compressed-tensors' (max|x| / 127.5 to the nearest
    # BF16, codes in [-128, 127]); both scales are BF16 values.
    rng = np.random.default_rng(5)
    rows = (rng.standard_t(3, (64, 384)) * 0.02).astype(ml_dtypes.bfloat16)
    result = quantized(CT, entry("l.weight", "BF16", (64, 384)), rows,
                       Scheme("absmax", "channel"))
    values = rows.astype(np.float32)
    magnitude = np.abs(values).max(axis=1, keepdims=True)
    ours = (magnitude / np.float32(127)).astype(ml_dtypes.bfloat16).astype(np.float32)
    bfloat16 = np.dtype(ml_dtypes.bfloat16)  # nextafter in BF16 needs both operands BF16
    ours = np.where(ours < magnitude / np.float32(127), np.nextafter(
        ours.astype(bfloat16), np.array(np.inf, bfloat16)).astype(np.float32), ours)
    theirs = (magnitude / np.float32(127.5)).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(result.scale.astype(ml_dtypes.bfloat16).astype(np.float32),
                          result.scale)
    assert np.isin(result.scale, np.concatenate([ours, theirs])).all()

    def errors(scale: np.ndarray) -> np.ndarray:
        codes = np.clip(np.rint(values / scale), -128, 127)
        return ((values - codes * scale) ** 2).sum(axis=1)

    chosen = errors(result.scale)
    assert (chosen <= errors(ours)).all() and (chosen <= errors(theirs)).all()
    assert (result.scale == theirs).any() and (result.scale == ours).any()
    assert int(result.codes.min()) >= -128 and int(result.codes.max()) <= 127


@pytest.mark.parametrize("scheme,fragment", [
    (Scheme("affine", "channel"), "affine is not supported"),
    (Scheme("absmax", "tensor"), "per tensor is not supported"),
    (Scheme("absmax", "block", 48), "block 48 is not supported"),
])
def test_ct_refuses_what_vllm_cannot_load(scheme: Scheme, fragment: str) -> None:
    with pytest.raises(SchemeError, match=fragment):
        CT.check_scheme(scheme)


@pytest.mark.parametrize("name,shape,reason", [
    ("l.bias", (128, 128), "not a layer's .weight"),
    ("lm_head.weight", (256, 128), "the output head stays in its dtype"),
    ("model.embed_tokens.weight", (128, 128), "an embedding"),
    ("conv.weight", (128, 128, 3), "3-D"),
    ("l.weight", (64, 344), "needs 344 input features a multiple of 128"),
    ("l.weight", (32, 128), "and 32 output features a multiple of 64"),
])
def test_ct_keeps_what_vllm_cannot_quantize(name: str, shape: tuple[int, ...],
                                            reason: str) -> None:
    kept = CT.keep_reason(entry(name, "BF16", shape), Scheme("absmax", "channel"), ONE)
    assert kept is not None and kept.startswith("kept for vLLM: ") and reason in kept
    assert CT.keep_reason(entry("l.weight", "BF16", (64, 128)), Scheme(), ONE) is None


def test_ct_tensor_parallel_splits_the_right_side() -> None:
    # On 4 GPUs a column-parallel layer keeps every input feature and a quarter of its
    # outputs; a row-parallel one the other way round.
    scheme = Scheme("absmax", "block", 128)
    four = Deployment(tensor_parallel=4)
    up, down = entry("m.up_proj.weight", "BF16", (1024, 256)), entry(
        "m.down_proj.weight", "BF16", (256, 1024))
    assert CT.keep_reason(up, scheme, four) is None  # 256 outputs per GPU
    assert CT.keep_reason(down, scheme, four) is None  # 256 inputs per GPU
    odd = CT.keep_reason(entry("m.down_proj.weight", "BF16", (256, 642)), scheme, four)
    assert odd == "kept for vLLM: input features 642 do not split over 4 GPUs"
    assert CT.keep_reason(entry("m.o_proj.weight", "BF16", (256, 768)), scheme, four) == (
        "kept for vLLM: shape 256×768 per GPU with --tensor-parallel 4: vLLM's "
        "weight-only kernel needs 192 input features a multiple of 128 and 256 output "
        "features a multiple of 64")
    # Two key/value heads on four GPUs: each GPU holds a whole head of 128.
    gqa = Deployment(tensor_parallel=4, config={"num_key_value_heads": 2})
    assert CT.keep_reason(entry("m.k_proj.weight", "BF16", (256, 256)), scheme, gqa) is None


def test_ct_config_ignores_the_head_and_linear_weights_left_in_float() -> None:
    config = CT.model_config({"model_type": "llama"}, Scheme("absmax", "block", 128), [], [
        entry("model.embed_tokens.weight", "BF16", (256, 128)),
        entry("model.layers.0.mlp.down_proj.weight", "BF16", (128, 344)),
        entry("model.norm.weight", "BF16", (128,))])
    assert config is not None and config["model_type"] == "llama"
    quantization = config["quantization_config"]
    assert quantization["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj"]
    # A scheme that is one of llm-compressor's presets gives its group that name.
    assert quantization["config_groups"]["W8A16"]["weights"]["group_size"] == 128
    assert CT.model_config(None, Scheme(), [], []) is None  # no config.json: none is invented


def test_ct_reads_pack_quantized_and_int_quantized(tmp_path: Path) -> None:
    codes = np.array([[-128, -1, 0, 127], [2, 4, 6, 8]], np.int8)
    scale = np.array([[0.5], [0.25]], ml_dtypes.bfloat16)
    path = tmp_path / "ct.safetensors"
    path.write_bytes(raw_safetensors({
        "p.weight_packed": ("I32", [2, 1], (codes.view(np.uint8) ^ 0x80).tobytes()),
        "p.weight_scale": ("BF16", [2, 1], scale.tobytes()),
        "p.weight_shape": ("I64", [2], np.array([2, 4], np.int64).tobytes()),
        "i.weight": ("I8", [2, 4], codes.tobytes()),
        "i.weight_scale": ("BF16", [2, 1], scale.tobytes()),
        "i.weight_zero_point": ("I8", [2, 1], np.array([[1], [2]], np.int8).tobytes())}))
    with SafetensorsReader(path) as reader:
        assert detect(reader.header) is CT and CT.version(reader.header) is None
        weights = {weight.name: weight for weight in CT.find(reader, None)}
        packed = weights["p.weight"]
        assert packed.description == "compressed-tensors pack-quantized INT8 absmax channel"
        assert (packed.shape, packed.dtype) == ((2, 4), "BF16")
        assert weights["i.weight"].scheme == Scheme("affine", "channel")
        restored = {name: weight.dequantize_rows(weight.read_rows(reader, 0, 2), np.float32,
                                                 path)
                    for name, weight in weights.items()}
    assert restored["p.weight"].tolist() == [[-64.0, -0.5, 0.0, 63.5], [0.5, 1.0, 1.5, 2.0]]
    assert restored["i.weight"].tolist() == [[-64.5, -1.0, -0.5, 63.0], [0.0, 0.5, 1.0, 1.5]]


def test_a_qz_file_is_not_taken_for_compressed_tensors(tmp_path: Path) -> None:
    # A qz file with a ".weight" I8 tensor and its F32 scale looks like int-quantized;
    # the qz metadata decides, because detection tries qz first.
    scheme = Scheme("absmax", "channel")
    metadata = QZ.shard_metadata({}, [QuantizedWeight(entry(), scheme)])
    path = write_safetensors(tmp_path / "q.safetensors",
                             encoded(QZ, entry(), scheme, quantize_rows(X, scheme)), metadata)
    with SafetensorsReader(path) as reader:
        assert CT.recognises(reader.header) and detect(reader.header) is QZ


# ------------------------------------------------------------------------ qz config


def test_qz_config_makes_loaders_refuse_and_dequantize_restores_it() -> None:
    original = {"architectures": ["LlamaForCausalLM"], "dtype": "bfloat16",
                "model_type": "llama", "vocab_size": 256}
    config = QZ.model_config(original, Scheme(), [QuantizedWeight(entry(), Scheme())], [])
    assert config is not None
    assert config["model_type"] == config["dtype"] == config["torch_dtype"] == (
        "qz: quantized weights, run qz dequantize to restore a model loaders read")
    assert config["quantization_config"] == {"quant_method": "qz", "format_version": "1",
                                             "replaced": {"model_type": "llama",
                                                          "dtype": "bfloat16"}}
    # Back in place: the keys in their order, what qz added gone.
    restored = QZ.float_config(config)
    assert list(restored.items()) == list(original.items())
    assert QZ.model_config(None, Scheme(), [], []) is None


# ------------------------------------------------------------------------------- mlx


def test_mlx_stored_tensors_and_what_it_keeps() -> None:
    scheme = MLX.default_scheme
    assert scheme == Scheme("affine", "block", 64)
    assert stored("mlx", scheme, entry("m.q_proj.weight", "BF16", (64, 256))) == [
        ("m.q_proj.weight", "U32", (64, 64), "codes"),
        ("m.q_proj.scales", "BF16", (64, 4), "scale"),
        ("m.q_proj.biases", "BF16", (64, 4), "bias")]
    assert MLX.keep_reason(entry("m.w.weight", "BF16", (64, 344)), scheme, ONE) == (
        "kept for MLX: the last dimension, 344, is not a multiple of the group size 64")
    assert "Linear and Embedding" in (MLX.keep_reason(entry("m.norm.weight", "BF16", (64,)),
                                                      scheme, ONE) or "")
    with pytest.raises(SchemeError, match="per channel is not supported"):
        MLX.check_scheme(Scheme("affine", "channel"))
    with pytest.raises(SchemeError, match="MLX packs 2, 3, 4, 5, 6, 8 bits, not 7"):
        MLX.check_scheme(Scheme("affine", "block", 64, bits=7))


def test_mlx_round_trip_through_a_file(tmp_path: Path) -> None:
    rows = (np.random.default_rng(0).standard_normal((4, 128)) * 0.1).astype(ml_dtypes.bfloat16)
    tensor = entry("m.w.weight", "BF16", (4, 128))
    scheme = Scheme("affine", "block", 64)
    result = quantized(MLX, tensor, rows, scheme)
    assert result.stats is not None and result.stats.sqnr_db > 40
    pieces = encoded(MLX, tensor, scheme, result)
    pieces["m.w.weight"] = pieces["m.w.weight"].view(np.uint32)  # the codes, four to a word
    path = write_safetensors(tmp_path / "model.safetensors", pieces,
                             MLX.shard_metadata({"format": "pt"}, []))
    config = MLX.model_config({"model_type": "llama"}, scheme, [], [])
    assert config is not None and config["quantization"] == {
        "group_size": 64, "bits": 8, "mode": "affine"} == config["quantization_config"]
    with SafetensorsReader(path) as reader:
        assert reader.header.metadata == {"format": "mlx"} and detect(reader.header) is MLX
        (weight,) = MLX.find(reader, config)
        assert (weight.name, weight.shape, weight.dtype) == ("m.w.weight", (4, 128), "BF16")
        restored = weight.dequantize_rows(weight.read_rows(reader, 0, 4), np.float32, path)
    error = restored - rows.astype(np.float32)
    assert 10 * np.log10((rows.astype(np.float32) ** 2).sum() / (error ** 2).sum()) == \
        pytest.approx(result.stats.sqnr_db, abs=1e-4)
    assert MLX.float_config(config) == {"model_type": "llama"}
    assert MLX.float_metadata({"format": "mlx"}) == {"format": "pt"}


def test_mlx_symmetric_zero_group_is_coded_as_the_grids_zero() -> None:
    """An all-zero group on MLX's symmetric grid s·(q − 2^(b−1)) is coded 2^(b−1) (8 at
    4 bits), with scale 0, beside a group that the search quantizes normally."""
    from quantize_cli.core.offset import quantize_offset_rows

    rows = np.zeros((1, 64), np.float32)
    rows[0, 32:] = np.linspace(-1.0, 1.0, 32)
    result = quantize_offset_rows(rows.astype(ml_dtypes.bfloat16),
                                  Scheme("absmax", "block", 32, bits=4))
    assert result.codes[0, :32].tolist() == [8] * 32
    assert float(result.scale[0, 0]) == 0.0
    assert result.codes[0, 32] != 8 and float(result.scale[0, 1]) != 0.0


def test_mlx_needs_its_config_to_read(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors({
        "w.weight": ("U32", [1, 16], bytes(64)),
        "w.scales": ("F16", [1, 1], np.float16([1]).tobytes()),
        "w.biases": ("F16", [1, 1], np.float16([0]).tobytes())}))
    with SafetensorsReader(path) as reader, pytest.raises(
            QuantizedFormatError, match=r"config.json has no 'quantization' entry"):
        MLX.find(reader, None)


def test_json_of_the_ct_config_is_what_compressed_tensors_reads() -> None:
    config = CT.model_config({}, Scheme("absmax", "channel"), [], [])
    assert config is not None
    assert json.loads(json.dumps(config))["quantization_config"]["format"] == "pack-quantized"
