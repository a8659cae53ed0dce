"""What a compressed-tensors ``quantization_config`` says about its weights, for reading
checkpoints whose shapes alone leave a choice open (a group size, the bits of packed
codes, an FP8 block, whether activations are quantized)."""

from __future__ import annotations

import math
from typing import Any

from ...core import Scheme

#: FP8 blocks vLLM runs: 128 × 128.
FP8_BLOCK = 128


def config_groups(config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The config groups of a model's config.json (none when it has no such entry)."""
    quantization = (config or {}).get("quantization_config")
    groups = quantization.get("config_groups") if isinstance(quantization, dict) else None
    if not isinstance(groups, dict):
        return []
    return [group for group in groups.values() if isinstance(group, dict)]


def _weights(group: dict[str, Any]) -> dict[str, Any]:
    weights = group.get("weights")
    return weights if isinstance(weights, dict) else {}


def declared_bits(config: dict[str, Any] | None) -> set[int]:
    """The weights' bits every config group declares."""
    return {bits for group in config_groups(config)
            if isinstance(bits := _weights(group).get("num_bits"), int)}


def declared_group_size(config: dict[str, Any] | None) -> int | None:
    """The group size of the groups that declare one, if they agree."""
    sizes = {size for group in config_groups(config)
             if isinstance(size := _weights(group).get("group_size"), int)}
    return sizes.pop() if len(sizes) == 1 else None


def declared_fp8_block(config: dict[str, Any] | None) -> int:
    """The FP8 block size config.json declares (128 when it does not say)."""
    for group in config_groups(config):
        structure = _weights(group).get("block_structure")
        if isinstance(structure, list) and structure and isinstance(structure[0], int):
            return structure[0]
    return FP8_BLOCK


def declared_activations(config: dict[str, Any] | None, kind: str) -> str | None:
    """``kind`` ("int8", "fp8") when a config group quantizes activations, else None."""
    declares = any(isinstance(group.get("input_activations"), dict)
                   for group in config_groups(config))
    return kind if declares else None


def scheme_from_scales(method: str, shape: tuple[int, ...], scale_shape: tuple[int, ...],
                       bits: int, config: dict[str, Any] | None,
                       activations: str | None = None) -> Scheme:
    """The scheme of a compressed-tensors weight from the shape of its scales: one scale
    per tensor, per row (channel), or per group along the rows (the group size from
    config.json when it declares one, else from the shapes)."""
    if math.prod(scale_shape) == 1:
        return Scheme(method, "tensor", clip="none", bits=bits,  # type: ignore[arg-type]
                      activations=activations)  # type: ignore[arg-type]
    if scale_shape == (shape[0], 1):
        return Scheme(method, "channel", clip="none", bits=bits,  # type: ignore[arg-type]
                      activations=activations)  # type: ignore[arg-type]
    size = declared_group_size(config) or max(1, shape[-1] // scale_shape[-1])
    return Scheme(method, "block", size, "none", bits, activations)  # type: ignore[arg-type]
