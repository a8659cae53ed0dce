"""The MLX format: the layout ``mlx_lm.convert -q`` writes, which ``mlx_lm.load`` runs.

For a quantized Linear or Embedding weight ``X.weight`` of shape (out, in), MLX's modes
(layouts/integers.py and layouts/microscaling.py):

* ``affine``: 2, 3, 4, 5, 6 or 8 bits in groups of g = 32, 64 or 128 along the last
  axis: ``X.weight`` U32 (out, in · b / 32), ``X.scales`` and ``X.biases`` in the
  weight's dtype, (out, in / g); x̂ = scales · q + biases, each operation rounded to the
  weight's dtype;
* ``nvfp4``, ``mxfp4``, ``mxfp8``: ``X.weight`` U32 holding the FP4 or FP8 codes and
  ``X.scales`` U8 holding E4M3 or E8M0 scales, no biases.

config.json gains ``quantization`` = ``quantization_config`` = ``{"group_size": g,
"bits": b, "mode": …}``, with an entry of its own for each layer quantized otherwise
(``--rule``); a layer is quantized when its ``.scales`` exist, so layers left in float
need no entry. Every shard's metadata says ``format: mlx``. MLX quantizes Linear and
Embedding layers whose last dimension divides by the group; norms and other 1-D tensors
stay. Sources: ``mlx/ops.cpp`` (``affine_quantize``, ``fp_quantize``) and
``mlx_lm/utils.py`` (``quantize_model``, ``load_model``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core import Scheme
from ..errors import QuantizedFormatError, located
from ..storage.dtypes import FLOAT_DTYPES
from ..storage.header import Header, TensorEntry
from ..storage.reader import SafetensorsReader
from .base import Deployment, ModelFormat, QuantizedWeight
from .layout import Role, StoredWeight
from .layouts.integers import MLX_BITS, MlxAffine
from .layouts.microscaling import MlxMicroscaled
from .layouts.names import MLX_BIASES, MLX_SCALES, WEIGHT

#: MLX's modes besides affine: the methods of the same name.
FLOAT_MODES = ("nvfp4", "mxfp4", "mxfp8")


class MlxFormat(ModelFormat):
    name = "mlx"
    summary = ("mlx: the layout mlx_lm.convert -q writes, for mlx-lm: affine 2-8 bits in "
               "groups of 32/64/128 (default 64), nvfp4, mxfp4, mxfp8")
    prefix = "mlx-"
    layouts = (MlxAffine(), MlxMicroscaled())
    supported = "MLX stores affine integer codes (2, 3, 4, 5, 6 or 8 bits) and its modes " \
                "nvfp4, mxfp4 and mxfp8"
    default_scheme = Scheme("affine", "block", 64)
    folder_output = True

    def hint(self, scheme: Scheme) -> str | None:
        if scheme.method == "fp8":
            return "use --method mxfp8, or --format qz or compressed-tensors for FP8"
        if scheme.bits not in MLX_BITS:
            return "choose --bits 2, 3, 4, 5, 6 or 8"
        return "use --block 32, 64 or 128"

    def refusal(self, scheme: Scheme, reasons: Sequence[str]) -> str:
        if scheme.activations is not None:
            return f"{scheme.activations} activations are not declared in MLX's config"
        return super().refusal(scheme, reasons)

    def keep_reason(self, entry: TensorEntry, scheme: Scheme,
                    deployment: Deployment) -> str | None:
        if not entry.name.endswith(WEIGHT) or len(entry.shape) != 2:
            return "kept for MLX: MLX quantizes the 2-D weights of Linear and Embedding layers"
        if ".experts." in entry.name:
            return "kept for MLX: mlx-lm stacks expert weights when it loads them"
        assert scheme.block_size is not None
        if entry.shape[-1] % scheme.block_size:
            return (f"kept for MLX: the last dimension, {entry.shape[-1]}, is not a multiple "
                    f"of the group size {scheme.block_size}")
        return None

    def shard_metadata(self, metadata: dict[str, str],
                       quantized: Sequence[QuantizedWeight]) -> dict[str, str]:
        return {**metadata, "format": "mlx"}

    def model_config(self, config: dict[str, Any] | None, scheme: Scheme,
                     quantized: Sequence[QuantizedWeight],
                     kept: Sequence[TensorEntry]) -> dict[str, Any] | None:
        if config is None:
            return None
        quantization: dict[str, Any] = _parameters_of(scheme)
        for weight in quantized:  # layers quantized otherwise than asked (--rule, …)
            if weight.scheme != scheme:
                quantization[weight.entry.name.removesuffix(WEIGHT)] = _parameters_of(
                    weight.scheme)
        return {**config, "quantization": quantization, "quantization_config": quantization}

    # ------------------------------------------------------------------------ reading

    def recognises(self, header: Header) -> bool:
        return any(_module_of_scales(header, entry) is not None for entry in header.tensors)

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        header, path = reader.header, reader.path
        found = []
        for entry in header.tensors:
            module = _module_of_scales(header, entry)
            if module is None:
                continue
            scheme = _scheme(config, module, path)
            codes = header[module + WEIGHT]
            columns = codes.shape[-1] * 32 // scheme.element.bits
            if columns != entry.shape[-1] * (scheme.block_size or 1):
                raise QuantizedFormatError(located(
                    path, codes.name, f"{scheme.element.bits}-bit codes in groups of "
                    f"{scheme.block_size} do not match its shape {list(codes.shape)} and the "
                    f"scales' {list(entry.shape)}"))
            layout = self.layout_for(scheme)
            tensors: list[tuple[str, Role]] = [(codes.name, "codes"), (entry.name, "scale")]
            if module + MLX_BIASES in header:
                tensors.append((module + MLX_BIASES, "bias"))
            affine = scheme.method == "affine"
            dtype = entry.dtype if affine else "BF16"
            label = (f"{scheme.bits}-bit affine block {scheme.block_size}" if affine
                     else scheme.method)
            found.append(StoredWeight(
                name=codes.name, shape=(*codes.shape[:-1], columns), dtype=dtype,
                scheme=scheme, format=self.name, tensors=tuple(tensors),
                description=f"MLX {label}", layout=layout))
        return found

    def float_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in config.items()
                if key not in ("quantization", "quantization_config")}

    def float_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        # A float checkpoint for PyTorch-based loaders again.
        return {**metadata, "format": "pt"} if metadata.get("format") == "mlx" else metadata


def _parameters_of(scheme: Scheme) -> dict[str, Any]:
    mode = scheme.method if scheme.method in FLOAT_MODES else "affine"
    return {"group_size": scheme.block_size, "bits": scheme.element.bits, "mode": mode}


def _module_of_scales(header: Header, entry: TensorEntry) -> str | None:
    """The module whose ``.scales`` this is, when it has packed codes (and, for the
    affine mode, ``.biases`` of the same shape)."""
    if not entry.name.endswith(MLX_SCALES) or len(entry.shape) < 2:
        return None
    module = entry.name.removesuffix(MLX_SCALES)
    codes, biases = module + WEIGHT, module + MLX_BIASES
    if codes not in header or header[codes].dtype != "U32":
        return None
    if entry.dtype in FLOAT_DTYPES:
        return module if biases in header and header[biases].shape == entry.shape else None
    return module if entry.dtype == "U8" else None


def _scheme(config: dict[str, Any] | None, module: str, path: Any) -> Scheme:
    """The scheme of a module, from config.json's ``quantization`` (its per-module entries
    first): the shapes alone only tell the product of bits and group size."""
    quantization = (config or {}).get("quantization") or (config or {}).get(
        "quantization_config")
    if not isinstance(quantization, dict):
        raise QuantizedFormatError(
            located(path, module + MLX_SCALES, "an MLX weight, but config.json has no "
                    "'quantization' entry giving its group size and bits"),
            hint="MLX checkpoints are read as folders with their config.json")
    own = quantization.get(module)
    chosen = own if isinstance(own, dict) else quantization
    block, bits, mode = chosen.get("group_size"), chosen.get("bits"), chosen.get("mode",
                                                                                 "affine")
    valid = type(block) is int and type(bits) is int and block > 0 and (
        (mode == "affine" and bits in MLX_BITS)
        or (mode in FLOAT_MODES and Scheme(mode).block_size == block
        and Scheme(mode).element.bits == bits))
    if not valid:
        raise QuantizedFormatError(located(
            path, module + MLX_SCALES, f"config.json's quantization has no valid group_size, "
            f"bits and mode for it (found {block!r}, {bits!r} and {mode!r}; this qz reads the "
            f"affine mode at {', '.join(map(str, MLX_BITS))} bits and {', '.join(FLOAT_MODES)})"))
    assert isinstance(block, int) and isinstance(bits, int)
    if mode == "affine":
        return Scheme("affine", "block", block, "none", bits)
    return Scheme(mode, clip="none")
