"""The compressed-tensors format (what vLLM loads): weight-only INT8 written as
``pack-quantized``; ``pack-quantized`` and ``int-quantized`` checkpoints read back.

For a quantized Linear weight ``X.weight`` of shape (out, in), pack-quantized stores:

* ``X.weight_packed`` I32 (out, in / 4): the codes plus 128 as bytes, four to an int32,
  little endian (compressed-tensors' ``pack_to_int32`` for 8 bits);
* ``X.weight_scale`` in the model's dtype, (out, 1) per channel or (out, in / group);
* ``X.weight_shape`` I64 [2]: (out, in).

Dequantized: ``code · scale`` computed in the scale's dtype. int-quantized stores
``X.weight`` as I8 beside ``X.weight_scale`` (and ``X.weight_zero_point``). config.json
gains a ``quantization_config``. Sources: compressed-tensors
``compressors/pack_quantized`` and vLLM's ``compressed_tensors.py`` and
``marlin_utils.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.quantize import RowResult, dequantize_rows, quantize_rows
from ..core.scheme import Scheme
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
    read_groups,
    refuse_bad_scales,
)

PACKED, SCALE, SHAPE, ZERO_POINT = "_packed", "_scale", "_shape", "_zero_point"
BLOCK_SIZES = (32, 64, 128)
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
SUPPORTED = ("compressed-tensors (vLLM) loads weight-only INT8 only as absmax (symmetric), "
             "per channel or in groups of 32, 64 or 128")


class CompressedTensors(Codec):
    name = "compressed-tensors"
    summary = ("compressed-tensors: a folder vLLM loads (pack-quantized, absmax, per "
               "channel or block 32/64/128), with quantization_config in config.json")
    suffix = "ct-int8"
    folder_output = True
    mixed_schemes = False
    tensor_parallel = True

    def check_scheme(self, scheme: Scheme) -> None:
        if not scheme.symmetric:
            raise SchemeError(f"{SUPPORTED}; affine is not supported",
                              hint="use --method absmax")
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

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        out_features, in_features = entry.shape
        groups = scheme.groups_per_row(in_features)
        return [
            StoredTensor(entry.name + PACKED, "I32", (out_features, in_features // 4), "codes"),
            StoredTensor(entry.name + SCALE, entry.dtype, (out_features, groups), "scale"),
            StoredTensor(entry.name + SHAPE, "I64", (2,), "shape"),
        ]

    def quantize_rows(self, entry: TensorEntry, rows: np.ndarray, scheme: Scheme, *,
                      tensor_range: tuple[float, float] | None,
                      with_stats: bool) -> RowResult:
        # Scales are stored in the weight's dtype, as compressed-tensors does; the codes
        # are made with the stored (rounded up) scale.
        return quantize_rows(rows, scheme, tensor_range=tensor_range, with_stats=with_stats,
                             scale_dtype=numpy_dtype(entry.dtype))

    def encode(self, entry: TensorEntry, scheme: Scheme, result: RowResult,
               first_row: int) -> list[tuple[str, np.ndarray]]:
        pieces = [(entry.name + PACKED, _pack(result.codes)),
                  (entry.name + SCALE, result.scale.astype(numpy_dtype(entry.dtype)))]
        if first_row == 0:
            pieces.append((entry.name + SHAPE, np.array(entry.shape, dtype=np.int64)))
        return pieces

    def shard_metadata(self, metadata: dict[str, str],
                       quantized: Sequence[QuantizedWeight]) -> dict[str, str]:
        return dict(metadata)

    def model_config(self, config: dict[str, Any] | None, scheme: Scheme,
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
                   for entry in header.tensors)

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        header = reader.header
        found = []
        for entry in header.tensors:
            if _is_packed(entry):
                weight = entry.name.removesuffix(PACKED)
                shape = _packed_shape(reader, entry)
                if weight + SCALE in header and shape is not None:
                    tensors: list[tuple[str, Role]] = [(entry.name, "codes"),
                                                       (weight + SCALE, "scale"),
                                                       (weight + SHAPE, "shape")]
                    found.append(_stored_weight(header, weight, "pack-quantized", shape,
                                                tensors))
            elif _is_int_quantized(header, entry):
                tensors = [(entry.name, "codes"), (entry.name + SCALE, "scale")]
                if entry.name + ZERO_POINT in header:
                    tensors.append((entry.name + ZERO_POINT, "zero_point"))
                found.append(_stored_weight(header, entry.name, "int-quantized", entry.shape,
                                            tensors))
        return found

    def read_rows(self, reader: SafetensorsReader, weight: StoredWeight, start: int,
                  stop: int) -> StoredRows:
        codes_entry = reader.header[weight.codes]
        columns = weight.row_view[1]
        if codes_entry.dtype == "I32":  # packed: q + 128 as bytes
            packed = np.empty((stop - start, columns), dtype=np.uint8)
            reader.read_into(codes_entry, start * columns, packed)
            codes = np.bitwise_xor(packed, np.uint8(0x80)).view(np.int8)
        else:
            codes = reader.read_rows(codes_entry, weight.row_view, start, stop)
        return {"codes": codes, **read_groups(reader, weight, start, stop)}

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
    if block is not None and in_part % block:
        return (f"kept for vLLM: {in_part} input features{on} are not a whole number of "
                f"blocks of {block}")
    return None


def _pack(codes: np.ndarray) -> np.ndarray:
    """int8 codes (rows, in) → the bytes of ``weight_packed``: q + 128 as uint8."""
    return np.bitwise_xor(codes.view(np.uint8), np.uint8(0x80))


def _quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json."""
    group = scheme.granularity == "block"
    weights = {
        "num_bits": 8, "type": "int", "symmetric": True,
        "strategy": "group" if group else "channel",
        "group_size": scheme.block_size if group else None,
        "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None,
                                      "format": "pack-quantized"}},
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


def _packed_shape(reader: SafetensorsReader, packed: TensorEntry) -> tuple[int, int] | None:
    """The original shape of a packed weight (from ``X.weight_shape``), if it is
    consistent with the packed tensor."""
    name = packed.name.removesuffix(PACKED) + SHAPE
    if name not in reader.header:
        return None
    stored = reader.header[name]
    if stored.dtype not in ("I64", "I32") or stored.shape != (2,) or len(packed.shape) != 2:
        return None
    rows, columns = (int(v) for v in reader.read_tensor(stored))
    if rows > 0 and columns > 0 and (rows, columns) == (packed.shape[0], packed.shape[1] * 4):
        return rows, columns
    return None


def _stored_weight(header: Header, name: str, compression: str, shape: tuple[int, ...],
                   tensors: list[tuple[str, Role]]) -> StoredWeight:
    scale = header[name + SCALE]
    columns = shape[-1] if shape else 1
    groups = scale.shape[-1] if scale.shape else 1
    if scale.numel == 1:
        scheme = Scheme("absmax", "tensor", clip="none")
    else:
        granularity = "channel" if groups == 1 else "block"
        scheme = Scheme("absmax", granularity,  # type: ignore[arg-type]
                        max(1, columns // groups) if groups > 1 else None)
    if any(role == "zero_point" for _, role in tensors):
        scheme = Scheme("affine", scheme.granularity, scheme.block_size, "none")
    return StoredWeight(name=name, shape=shape, dtype=scale.dtype, scheme=scheme,
                        format=CompressedTensors.name, tensors=tuple(tensors),
                        description=f"compressed-tensors {compression} INT8 {scheme.describe()}")
