"""The compressed-tensors format (what vLLM loads): weight-only INT8 and INT4 written as
``pack-quantized``, FP8 as ``float-quantized``; ``pack-quantized``, ``int-quantized`` and
``float-quantized`` checkpoints read back.

For a quantized Linear weight ``X.weight`` of shape (out, in):

* pack-quantized (INT8, INT4): ``X.weight_packed`` I32 (out, ⌈in · bits / 32⌉): the codes
  plus 2^(bits−1), densely packed into int32 words, little endian, the first code in the
  lowest bits (compressed-tensors' ``pack_to_int32``); ``X.weight_scale`` in the model's
  dtype, (out, 1) per channel or (out, in / group); ``X.weight_shape`` I64 [2]; for
  asymmetric INT4 the zero points plus 8, packed the same way along the output axis,
  ``X.weight_zero_point`` I32 (⌈out / 8⌉, groups).
* float-quantized (FP8 E4M3): ``X.weight`` F8_E4M3 and ``X.weight_scale`` in the model's
  dtype: (1,) per tensor, (out, 1) per channel, (⌈out/128⌉, ⌈in/128⌉) per 128×128 block.

Dequantized: ``(code − zero point) · scale`` computed in the scale's dtype. int-quantized
stores ``X.weight`` as I8 beside ``X.weight_scale`` (and ``X.weight_zero_point``).
config.json gains a ``quantization_config``. Sources: compressed-tensors
``compressors/pack_quantized`` and ``quantization/utils/helpers.py``, vLLM's
``compressed_tensors.py`` and ``marlin_utils.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.quantize import RowResult, dequantize_rows
from ..core.scheme import Scheme
from ..core.search import Storage
from ..errors import SchemeError
from ..storage.dtypes import FLOAT_DTYPES, numpy_dtype
from ..storage.header import Header, TensorEntry
from ..storage.reader import SafetensorsReader
from .base import (
    Codec,
    Deployment,
    QuantizedWeight,
    Role,
    StoredRows,
    StoredTensor,
    StoredWeight,
    pack_nibbles,
    read_groups,
    refuse_bad_scales,
    unpack_nibbles,
)

PACKED, SCALE, SHAPE, ZERO_POINT = "_packed", "_scale", "_shape", "_zero_point"
BLOCK_SIZES = (32, 64, 128)
#: FP8 blocks vLLM runs: 128 × 128.
FP8_BLOCK = 128
#: vLLM's weight-only kernel (Marlin) needs these multiples of the input and output
#: features each GPU holds (``verify_marlin_supports_shape`` in marlin_utils.py).
IN_FEATURES_MULTIPLE, OUT_FEATURES_MULTIPLE = 128, 64
#: Layers whose input features vLLM splits across GPUs (RowParallelLinear); the others
#: (q/k/v, gate/up, fc1, …) split their output features (ColumnParallelLinear).
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "fc2", "wo", "w2",
                "c_proj", "output.dense", "self_attn.dense")
#: llm-compressor always leaves the output head in float: with tied embeddings it is the
#: embedding itself, which vLLM does not quantize.
HEAD = "lm_head"
#: compressed-tensors' own rule for a symmetric INT4 scale: max|x| / 7.5, codes clamped
#: to [-8, 7] (bit range / 2 in ``calculate_qparams``).
SYMMETRIC_INT4_DIVISOR = 7.5
SUPPORTED = ("compressed-tensors (vLLM) loads weight-only INT8 as absmax (symmetric), INT4 "
             "as absmax or affine, per channel or in groups of 32, 64 or 128, and FP8 per "
             "tensor, per channel or in 128×128 blocks")


class CompressedTensors(Codec):
    name = "compressed-tensors"
    summary = ("compressed-tensors: a folder vLLM loads (pack-quantized INT8 and INT4 per "
               "channel or block 32/64/128, FP8), with quantization_config in config.json")
    suffix = "ct-"
    folder_output = True
    mixed_schemes = False
    tensor_parallel = True

    def check_scheme(self, scheme: Scheme) -> None:
        if scheme.method == "fp8":
            if scheme.granularity == "block" and scheme.block_size != FP8_BLOCK:
                raise SchemeError(f"{SUPPORTED}; FP8 block {scheme.block_size} is not "
                                  "supported", hint="use --block 128")
            return
        if scheme.bits == 8 and not scheme.symmetric:
            raise SchemeError(f"{SUPPORTED}; affine is not supported at 8 bits",
                              hint="use --method absmax, or --bits 4")
        if scheme.granularity == "tensor":
            raise SchemeError(f"{SUPPORTED}; per tensor is not supported",
                              hint="use --per-channel or --block 128")
        if scheme.granularity == "block" and scheme.block_size not in BLOCK_SIZES:
            raise SchemeError(f"{SUPPORTED}; block {scheme.block_size} is not supported",
                              hint="use --block 32, 64 or 128")

    def keep_reason(self, entry: TensorEntry, scheme: Scheme,
                    deployment: Deployment) -> str | None:
        if not entry.name.endswith(".weight"):
            return "kept for vLLM: not a layer's .weight"
        module = entry.name.removesuffix(".weight")
        if module == HEAD or module.endswith("." + HEAD):
            return "kept for vLLM: the output head stays in its dtype, as llm-compressor does"
        if _is_embedding(module):
            return "kept for vLLM: an embedding (vLLM quantizes Linear layers only)"
        if len(entry.shape) != 2:
            return f"kept for vLLM: {len(entry.shape)}-D (vLLM quantizes 2-D Linear weights)"
        return _shape_problem(module, entry.shape, scheme, deployment)

    def storage(self, entry: TensorEntry, scheme: Scheme) -> Storage:
        # Scales in the weight's dtype, as compressed-tensors stores them; integer zero
        # points (packed); its own rule for plain symmetric INT4.
        return Storage(scale_dtype=numpy_dtype(entry.dtype),
                       divisor=SYMMETRIC_INT4_DIVISOR if scheme.bits == 4 else None)

    def row_multiple(self, scheme: Scheme) -> int:
        # Packed zero points hold 8 output rows to a word.
        return 8 if scheme.bits == 4 and not scheme.symmetric else scheme.row_multiple

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        out_features, in_features = entry.shape
        scale_shape = (1,) if scheme.granularity == "tensor" else (
            scheme.scale_shape(entry.shape) if scheme.tiles
            else (out_features, scheme.groups_per_row(in_features)))
        scale = StoredTensor(entry.name + SCALE, entry.dtype, scale_shape, "scale")
        if scheme.method == "fp8":
            return [StoredTensor(entry.name, "F8_E4M3", entry.shape, "codes"), scale]
        words = math.ceil(in_features * scheme.bits / 32)
        stored = [StoredTensor(entry.name + PACKED, "I32", (out_features, words), "codes"),
                  scale, StoredTensor(entry.name + SHAPE, "I64", (2,), "shape")]
        if not scheme.symmetric:
            stored.append(StoredTensor(entry.name + ZERO_POINT, "I32",
                                       (math.ceil(out_features / 8), scale_shape[1]),
                                       "zero_point"))
        return stored

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        scale = result.scale.astype(numpy_dtype(entry.dtype))
        if scheme.method == "fp8":
            pieces = [(entry.name, result.codes)]
            if scheme.granularity != "tensor" or first_row == 0:
                pieces.append((entry.name + SCALE, scale))
            return pieces
        words = math.ceil(entry.shape[1] * scheme.bits / 32)
        pieces = [(entry.name + PACKED, _pack(result.codes, scheme.bits, words)),
                  (entry.name + SCALE, scale)]
        if result.zero_point is not None:
            pieces.append((entry.name + ZERO_POINT, _pack_zero_points(result.zero_point)))
        if first_row == 0:
            pieces.append((entry.name + SHAPE, np.array(entry.shape, dtype=np.int64)))
        return pieces

    def shard_metadata(self, metadata: dict[str, str],
                       quantized: Sequence[QuantizedWeight]) -> dict[str, str]:
        return dict(metadata)

    def model_config(self, config: dict[str, Any] | None, scheme: Scheme,
                     quantized: Sequence[QuantizedWeight],
                     kept: Sequence[TensorEntry]) -> dict[str, Any] | None:
        if config is None:
            return None
        # The output head always, and the Linear weights left in float, by module name:
        # loaders must not expect them packed.
        ignore = {HEAD} | {entry.name.removesuffix(".weight") for entry in kept
                           if entry.name.endswith(".weight") and len(entry.shape) == 2
                           and not _is_embedding(entry.name.removesuffix(".weight"))}
        return {**config, "quantization_config": _quantization_config(scheme, sorted(ignore))}

    # ------------------------------------------------------------------------ reading

    def recognises(self, header: Header) -> bool:
        return any(_is_packed(entry) or _is_int_quantized(header, entry)
                   or _is_float_quantized(header, entry) for entry in header.tensors)

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        header = reader.header
        found = []
        for entry in header.tensors:
            if _is_packed(entry):
                weight = entry.name.removesuffix(PACKED)
                shape = _packed_shape(reader, entry)
                if weight + SCALE not in header or shape is None:
                    continue
                bits = 8 if entry.shape[1] * 4 == shape[1] else 4
                tensors: list[tuple[str, Role]] = [(entry.name, "codes"),
                                                   (weight + SCALE, "scale"),
                                                   (weight + SHAPE, "shape")]
                if weight + ZERO_POINT in header:
                    tensors.append((weight + ZERO_POINT, "zero_point"))
                found.append(_stored_weight(header, weight, "pack-quantized", shape,
                                            tensors, bits))
            elif _is_int_quantized(header, entry):
                tensors = [(entry.name, "codes"), (entry.name + SCALE, "scale")]
                if entry.name + ZERO_POINT in header:
                    tensors.append((entry.name + ZERO_POINT, "zero_point"))
                found.append(_stored_weight(header, entry.name, "int-quantized", entry.shape,
                                            tensors, 8))
            elif _is_float_quantized(header, entry):
                found.append(_stored_weight(
                    header, entry.name, "float-quantized", entry.shape,
                    [(entry.name, "codes"), (entry.name + SCALE, "scale")], 8, fp8=True,
                    block=_fp8_block(config)))
        return found

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> StoredRows:
        codes_entry = reader.header[weight.codes]
        columns = weight.row_view[1]
        scheme = weight.scheme
        if codes_entry.dtype == "I32":  # packed: q + 2^(bits-1)
            row_bytes = codes_entry.shape[1] * 4
            packed = np.empty((stop - start, row_bytes), dtype=np.uint8)
            reader.read_into(codes_entry, start * row_bytes, packed)
            offset = 1 << (scheme.bits - 1)
            unsigned = (packed[:, :columns] if scheme.bits == 8
                        else unpack_nibbles(packed, columns))
            codes = (unsigned.astype(np.int16) - offset).astype(np.int8)
        else:
            codes = reader.read_rows(codes_entry, weight.row_view, start, stop)
        found: StoredRows = {"codes": codes, **read_groups(reader, weight, start, stop,
                                                           ("scale",))}
        zero_point = weight.tensor("zero_point")
        if zero_point is not None:
            entry = reader.header[zero_point]
            if entry.dtype == "I32":  # packed: 8 output rows to a word
                found["zero_point"] = _read_packed_zero_points(reader, entry, start, stop)
            else:
                found.update(read_groups(reader, weight, start, stop, ("zero_point",)))
        return found

    def dequantize_rows(self, weight: StoredWeight, rows: StoredRows, dtype: npt.DTypeLike,
                        path: Path) -> np.ndarray:
        refuse_bad_scales(path, weight, rows["scale"])
        return dequantize_rows(rows["codes"], rows["scale"], rows.get("zero_point"),
                               weight.scheme, dtype)


def _is_embedding(module: str) -> bool:
    return "embed" in module.rsplit(".", 1)[-1] or module.endswith((".wte", ".wpe"))


def _shape_problem(module: str, shape: tuple[int, ...], scheme: Scheme,
                   deployment: Deployment) -> str | None:
    """Why vLLM's kernel cannot run this layer on ``deployment.tensor_parallel`` GPUs:
    each GPU holds a slice of the output features (column-parallel layers) or of the
    input features (row-parallel ones), and that slice must meet the kernel's
    multiples. Key and value projections are replicated, not split, when the model has
    fewer key/value heads than GPUs."""
    out_features, in_features = shape
    gpus = deployment.tensor_parallel
    row_parallel = module.endswith(ROW_PARALLEL)
    split = in_features if row_parallel else out_features
    kv_heads = (deployment.config or {}).get("num_key_value_heads")
    if (not row_parallel and module.endswith(("k_proj", "v_proj")) and isinstance(kv_heads, int)
            and 0 < kv_heads < gpus and out_features % kv_heads == 0):
        split_per_gpu = out_features // kv_heads  # one head on each GPU
    elif split % gpus:
        return (f"kept for vLLM: {'input' if row_parallel else 'output'} features {split} do "
                f"not split over {gpus} GPUs")
    else:
        split_per_gpu = split // gpus
    out_part, in_part = (out_features, split_per_gpu) if row_parallel else (split_per_gpu,
                                                                            in_features)
    on = f" per GPU with --tensor-parallel {gpus}" if gpus > 1 else ""
    if in_part % IN_FEATURES_MULTIPLE or out_part % OUT_FEATURES_MULTIPLE:
        return (f"kept for vLLM: shape {out_features}×{in_features}{on}: vLLM's kernel needs "
                f"{in_part} input features a multiple of {IN_FEATURES_MULTIPLE} and "
                f"{out_part} output features a multiple of {OUT_FEATURES_MULTIPLE}")
    block = scheme.block_size
    if block is not None and (in_part % block or (scheme.tiles and out_part % block)):
        what = "features" if scheme.tiles else "input features"
        return (f"kept for vLLM: the {what}{on} are not a whole number of blocks of {block}")
    return None


def _pack(codes: np.ndarray, bits: int, words: int) -> np.ndarray:
    """int codes (rows, in) → the bytes of ``weight_packed``: q + 2^(bits−1), densely
    packed into ``words`` little-endian int32 per row."""
    unsigned = (codes.view(np.uint8) ^ np.uint8(0x80)) if bits == 8 else (
        codes.astype(np.int16) + 8).astype(np.uint8)
    if bits == 8:
        return unsigned
    return pack_nibbles(unsigned, words * 4)


def _pack_zero_points(zero_point: np.ndarray) -> np.ndarray:
    """INT4 zero points (rows, groups), rows a multiple of 8 but for the last chunk, as
    compressed-tensors packs them along the output axis: z + 8, eight rows to a word."""
    rows, groups = zero_point.shape
    padded = np.zeros((math.ceil(rows / 8) * 8, groups), dtype=np.uint32)
    padded[:rows] = (zero_point.astype(np.int16) + 8).astype(np.uint32)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, :, None]
    words: np.ndarray = (padded.reshape(-1, 8, groups) << shifts).sum(axis=1, dtype=np.uint32)
    return words.view(np.int32)


def _read_packed_zero_points(reader: SafetensorsReader, entry: TensorEntry, start: int,
                             stop: int) -> np.ndarray:
    groups = entry.shape[1]
    first, last = start // 8, math.ceil(stop / 8)
    words = np.empty((last - first, groups), dtype=np.uint32)
    reader.read_into(entry, first * groups * 4, words)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, :, None]
    values = ((words[:, None, :] >> shifts) & 0xF).reshape(-1, groups)
    return (values[start - first * 8:stop - first * 8].astype(np.int16) - 8).astype(np.int8)


def _quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json."""
    if scheme.method == "fp8":
        compression = "float-quantized"
        weights: dict[str, Any] = {
            "num_bits": 8, "type": "float", "symmetric": True,
            "strategy": "block" if scheme.tiles else scheme.granularity,
            "group_size": None,
            "block_structure": [scheme.block_size] * 2 if scheme.tiles else None}
    else:
        compression = "pack-quantized"
        group = scheme.granularity == "block"
        weights = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
                   "strategy": "group" if group else "channel",
                   "group_size": scheme.block_size if group else None,
                   "block_structure": None}
    weights.update({"dynamic": False, "actorder": None, "observer": "minmax",
                    "observer_kwargs": {}})
    return {
        "quant_method": "compressed-tensors",
        "format": compression,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None,
                                      "format": compression}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _is_packed(entry: TensorEntry) -> bool:
    return entry.name.endswith(PACKED) and entry.dtype == "I32"


def _is_int_quantized(header: Header, entry: TensorEntry) -> bool:
    scale = entry.name + SCALE
    return (entry.name.endswith(".weight") and entry.dtype == "I8" and scale in header
            and header[scale].dtype in FLOAT_DTYPES)


def _is_float_quantized(header: Header, entry: TensorEntry) -> bool:
    scale = entry.name + SCALE
    return (entry.name.endswith(".weight") and entry.dtype == "F8_E4M3" and scale in header
            and header[scale].dtype in FLOAT_DTYPES)


def _fp8_block(config: dict[str, Any] | None) -> int | None:
    """The FP8 block size config.json declares, if any."""
    try:
        weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]  # type: ignore[index]
        structure = weights.get("block_structure")
        return int(structure[0]) if structure else None
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _packed_shape(reader: SafetensorsReader, packed: TensorEntry) -> tuple[int, int] | None:
    """The original shape of a packed weight (from ``X.weight_shape``), if it is
    consistent with the packed tensor for 8 or 4 bits."""
    name = packed.name.removesuffix(PACKED) + SHAPE
    if name not in reader.header:
        return None
    stored = reader.header[name]
    if stored.dtype not in ("I64", "I32") or stored.shape != (2,) or len(packed.shape) != 2:
        return None
    rows, columns = (int(v) for v in reader.read_tensor(stored))
    words = packed.shape[1]
    if rows == packed.shape[0] and columns > 0 and words in (columns // 4 if columns % 4 == 0
                                                             else -1, math.ceil(columns / 8)):
        return rows, columns
    return None


def _stored_weight(header: Header, name: str, compression: str, shape: tuple[int, ...],
                   tensors: list[tuple[str, Role]], bits: int, fp8: bool = False,
                   block: int | None = None) -> StoredWeight:
    scale = header[name + SCALE]
    columns = shape[-1] if shape else 1
    groups = scale.shape[-1] if scale.shape else 1
    method = "fp8" if fp8 else (
        "affine" if any(role == "zero_point" for _, role in tensors) else "absmax")
    if scale.numel == 1:
        scheme = Scheme(method, "tensor", clip="none", bits=bits)  # type: ignore[arg-type]
    elif fp8 and scale.shape != (shape[0], 1):
        scheme = Scheme("fp8", "block", block or FP8_BLOCK, "none")
    elif groups == 1:
        scheme = Scheme(method, "channel", clip="none", bits=bits)  # type: ignore[arg-type]
    else:
        scheme = Scheme(method, "block", max(1, columns // groups), "none",  # type: ignore[arg-type]
                        bits)
    kind = "FP8" if fp8 else f"INT{bits}"
    label = scheme.describe().removeprefix("int4 ").removeprefix("fp8 ")
    return StoredWeight(name=name, shape=shape, dtype=scale.dtype, scheme=scheme,
                        format=CompressedTensors.name, tensors=tuple(tensors),
                        description=f"compressed-tensors {compression} {kind} {label}")
