"""The compressed-tensors format (what vLLM loads, and transformers through
compressed-tensors): a model folder whose config.json has a ``quantization_config`` with
one config group per scheme, each naming its layers, its weights' arguments, the
activations the runtime quantizes, and the layout (``format``) of its weights.

The layouts (layouts/): ``pack-quantized`` (weight-only integers, INT2 to INT8),
``int-quantized`` (W8A8), ``float-quantized`` (FP8, FP8_DYNAMIC, FP8_BLOCK),
``nvfp4-pack-quantized``, ``mxfp4-pack-quantized`` and ``mxfp8-quantized``. This module
holds what is about the model: which layers vLLM can run quantized (Linear layers whose
shapes meet its kernels' multiples, on each GPU of a tensor-parallel deployment), which
layers it fuses (and which must therefore share a scheme and NVFP4's global scale), and
config.json. Sources: compressed-tensors ``quantization/quant_scheme.py`` and
``quant_config.py``, llm-compressor's ``entrypoints/model_free`` (what it writes for each
preset), vLLM's ``compressed_tensors.py`` and ``marlin_utils.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..core import Scheme
from ..errors import QuantizedFormatError, SchemeError, located
from ..storage.header import Header, TensorEntry
from ..storage.reader import SafetensorsReader
from .base import Deployment, ModelFormat, QuantizedWeight
from .layout import StoredWeight
from .layouts.fp8 import CtFloat
from .layouts.integers import CtInt, CtPacked
from .layouts.microscaling import CtMxfp4, CtMxfp8, CtNvfp4
from .layouts.names import (
    CT_GROUP_INDEX,
    CT_PACKED,
    CT_SCALE,
    activation_tensors,
    module_of,
)
from .presets import preset_of

#: vLLM's weight-only kernel (Marlin, for integer, FP8 and FP4 weights) needs these
#: multiples of the input and output features each GPU holds
#: (``verify_marlin_supports_shape`` in marlin_utils.py). Layers that quantize their
#: activations too (W8A8, FP8 dynamic) run ``cutlass_scaled_mm``, which takes any shape
#: (it falls back to a Triton kernel off multiples of 16) on the GPUs that run those
#: activations natively; an Ampere GPU runs FP8 weights through Marlin, with these rules.
IN_FEATURES_MULTIPLE, OUT_FEATURES_MULTIPLE = 128, 64
#: Layers whose input features vLLM splits across GPUs (RowParallelLinear); the others
#: (q/k/v, gate/up, fc1, …) split their output features (ColumnParallelLinear).
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "fc2", "wo", "w2",
                "c_proj", "output.dense", "self_attn.dense")
#: llm-compressor always leaves the output head in float: with tied embeddings it is the
#: embedding itself, which vLLM does not quantize.
HEAD = "lm_head"
#: Layers vLLM loads as one (QKVParallelLinear, MergedColumnParallelLinear): they must
#: share a scheme and NVFP4's global scale (llm-compressor's ``DEFAULT_FUSED_MAPPINGS``).
FUSED = (re.compile(r"^(?P<key>.+?\.(?:attn|attention|self_attn|self_attention))"
                    r"\.[qkv]_proj\.weight$"),
         re.compile(r"^(?P<key>.+?\.(?:mlp|feed_forward))\.(?:gate|up)_proj\.weight$"),
         re.compile(r"^(?P<key>.+?)\.w[13]\.weight$"))
#: The weight bits vLLM's WNA16 kernels run (``WNA16_SUPPORTED_BITS``).
VLLM_WEIGHT_BITS = (4, 8)


class CompressedTensors(ModelFormat):
    name = "compressed-tensors"
    summary = ("compressed-tensors: a folder vLLM loads (INT2-INT8 weight-only or W8A8, "
               "FP8, NVFP4, MXFP4, MXFP8), with quantization_config in config.json")
    prefix = "ct-"
    layouts = (CtPacked(), CtInt(), CtFloat(), CtNvfp4(), CtMxfp4(), CtMxfp8())
    supported = ("compressed-tensors (vLLM) loads integer weights per channel or in groups "
                 "of 32, 64 or 128 (INT8 absmax only), W8A8, FP8 per tensor, per channel or "
                 "in 128×128 blocks, NVFP4, MXFP4 and MXFP8")
    folder_output = True
    tensor_parallel = True
    names_presets = True

    def hint(self, scheme: Scheme) -> str | None:
        if scheme.element.is_float:
            return "use --block 128" if scheme.method == "fp8" else None
        if scheme.bits == 8 and not scheme.symmetric:
            return "use --method absmax, or fewer --bits"
        if scheme.granularity == "tensor":
            return "use --per-channel or --block 128"
        return "use --block 32, 64 or 128"

    def keep_reason(self, entry: TensorEntry, scheme: Scheme,
                    deployment: Deployment) -> str | None:
        if not entry.name.endswith(".weight"):
            return "kept for vLLM: not a layer's .weight"
        module = module_of(entry.name)
        if module == HEAD or module.endswith("." + HEAD):
            return "kept for vLLM: the output head stays in its dtype, as llm-compressor does"
        if _is_embedding(module):
            return "kept for vLLM: an embedding (vLLM quantizes Linear layers only)"
        if len(entry.shape) != 2:
            return f"kept for vLLM: {len(entry.shape)}-D (vLLM quantizes 2-D Linear weights)"
        return _shape_problem(module, entry.shape, scheme, deployment)

    def fused_with(self, name: str) -> str | None:
        for pattern in FUSED:
            found = pattern.match(name)
            if found is not None:
                return found.group("key")
        return None

    def check_model(self, decided: Mapping[str, Scheme | None]) -> None:
        fused: dict[str, list[tuple[str, Scheme | None]]] = {}
        for name, scheme in decided.items():
            key = self.fused_with(name)
            if key is not None:
                fused.setdefault(key, []).append((name, scheme))
        for members in fused.values():
            schemes = {scheme for _, scheme in members}
            if len(schemes) > 1:
                (first, one), (second, other) = _two_differing(members)
                raise SchemeError(
                    f"vLLM loads {first} and {second} as one layer, so they need one scheme, "
                    f"not {_said(one)} and {_said(other)}",
                    hint="give layers that are fused (q/k/v, gate/up) the same --rule")

    def notes(self, schemes: Sequence[Scheme]) -> list[str]:
        notes = []
        if any(not s.element.is_float and not s.symmetric for s in schemes):
            notes.append("asymmetric integer weights (packed zero points) load in vLLM and "
                         "compressed-tensors, but not in transformers")
        odd = sorted({s.bits for s in schemes
                      if not s.element.is_float and s.bits not in VLLM_WEIGHT_BITS})
        if odd:
            notes.append(f"vLLM's kernels run 4- and 8-bit integer weights, not "
                         f"{', '.join(map(str, odd))}-bit: compressed-tensors and transformers "
                         "read them")
        return notes

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
        ignore = {HEAD} | {module_of(entry.name) for entry in kept
                           if entry.name.endswith(".weight") and len(entry.shape) == 2
                           and not _is_embedding(module_of(entry.name))}
        by_scheme: dict[Scheme, list[str]] = {}
        for weight in quantized:
            by_scheme.setdefault(weight.scheme, []).append(module_of(weight.entry.name))
        if not by_scheme:
            by_scheme[scheme] = []
        mixed = len(by_scheme) > 1
        groups = {}
        for number, (group_scheme, modules) in enumerate(sorted(
                by_scheme.items(), key=lambda item: -len(item[1]))):
            name = preset_of(group_scheme) or f"group_{number}"
            groups[name] = self._config_group(group_scheme,
                                              sorted(modules) if mixed else ["Linear"])
        formats = {group["format"] for group in groups.values()}
        return {**config, "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": sorted(ignore),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }}

    def _config_group(self, scheme: Scheme, targets: list[str]) -> dict[str, Any]:
        """One config group: the layers, the weights' and inputs' arguments (the fields
        and values llm-compressor writes for the same preset), and the layout."""
        return {"targets": targets, "weights": _weight_arguments(scheme),
                "input_activations": _activation_arguments(scheme),
                "output_activations": None, "format": self.layout_for(scheme).name}

    # ------------------------------------------------------------------------ reading

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        """The weights every layout finds, each with the tensors of its layer that a
        float model does not have: the activations' static scales (``input_scale`` of
        FP8, ``input_global_scale`` of NVFP4, …) and a group index that only restates
        the groups. A group index that reorders them (GPTQ's activation order) is
        refused: compressed-tensors no longer reads it, so no reference would say what
        the weight is."""
        header = reader.header
        found = []
        for weight in super().find(reader, config):
            extra = activation_tensors(header, weight)
            group_index = weight.name + CT_GROUP_INDEX
            if group_index in header:
                _check_group_index(reader, weight, group_index)
                extra += ((group_index, "group_index"),)
            found.append(replace(weight, tensors=weight.tensors + extra))
        return found

    def recognises(self, header: Header) -> bool:
        for entry in header.tensors:
            if not entry.name.endswith(".weight" + CT_SCALE):
                continue
            weight = entry.name.removesuffix(CT_SCALE)
            codes = next((header[name] for name in (weight, weight + CT_PACKED)
                          if name in header), None)
            if codes is not None and codes.dtype in ("I8", "I32", "U8", "F8_E4M3"):
                return True
        return False


def _check_group_index(reader: SafetensorsReader, weight: StoredWeight, name: str) -> None:
    """Refuse a group index that is not the plain one (column j in group j // size)."""
    entry = reader.header[name]
    columns = weight.shape[-1]
    size = weight.scheme.block_size or columns
    plain = entry.dtype in ("I32", "I64") and entry.shape == (columns,) and np.array_equal(
        reader.read_tensor(entry), np.arange(columns) // size)
    if not plain:
        raise QuantizedFormatError(located(
            reader.path, name, "reorders the weight's groups (GPTQ's activation order), "
                               "which qz does not read"),
            hint="start from the model's float release, or an export without activation "
                 "order")


def _is_embedding(module: str) -> bool:
    return "embed" in module.rsplit(".", 1)[-1] or module.endswith((".wte", ".wpe"))


def _two_differing(members: list[tuple[str, Scheme | None]]
                   ) -> tuple[tuple[str, Scheme | None], tuple[str, Scheme | None]]:
    first = members[0]
    second = next(member for member in members if member[1] != first[1])
    return first, second


def _said(scheme: Scheme | None) -> str:
    return "kept in float" if scheme is None else scheme.describe()


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
    weight_only = scheme.activations is None
    if weight_only and (in_part % IN_FEATURES_MULTIPLE or out_part % OUT_FEATURES_MULTIPLE):
        return (f"kept for vLLM: shape {out_features}×{in_features}{on}: vLLM's weight-only "
                f"kernel needs {in_part} input features a multiple of {IN_FEATURES_MULTIPLE} and "
                f"{out_part} output features a multiple of {OUT_FEATURES_MULTIPLE}")
    block = scheme.block_size
    if block is not None and (in_part % block or (scheme.tiles and out_part % block)):
        what = "features" if scheme.tiles else "input features"
        return (f"kept for vLLM: the {what}{on} are not a whole number of blocks of {block}")
    return None


def _arguments(**fields: Any) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs``, every field as llm-compressor writes it."""
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
            "strategy": None, "block_structure": None, "dynamic": False, "actorder": None,
            "scale_dtype": None, "zp_dtype": None, "observer": None, "observer_kwargs": {},
            **fields}


def _weight_arguments(scheme: Scheme) -> dict[str, Any]:
    info = scheme.info
    if info.microscaling:
        return _arguments(
            num_bits=scheme.element.bits, type="float", group_size=scheme.block_size,
            strategy="tensor_group" if info.global_scale else "group",
            scale_dtype="torch.float8_e4m3fn" if scheme.scale_type == "e4m3" else "torch.uint8")
    if scheme.method == "fp8":
        return _arguments(type="float", strategy="block" if scheme.tiles else scheme.granularity,
                          block_structure=[scheme.block_size] * 2 if scheme.tiles else None)
    group = scheme.granularity == "block"
    return _arguments(num_bits=scheme.bits, symmetric=scheme.symmetric,
                      strategy="group" if group else scheme.granularity,
                      group_size=scheme.block_size if group else None,
                      zp_dtype=None if scheme.symmetric else "torch.int8")


def _activation_arguments(scheme: Scheme) -> dict[str, Any] | None:
    """Dynamic activations: per token, or per group of 128 beside FP8 tiles (what
    llm-compressor's W8A8, FP8_DYNAMIC and FP8_BLOCK presets declare)."""
    if scheme.activations is None:
        return None
    kind = "float" if scheme.activations == "fp8" else "int"
    if scheme.tiles:
        return _arguments(type=kind, strategy="group", group_size=128, dynamic=True)
    return _arguments(type=kind, strategy="token", dynamic=True)
