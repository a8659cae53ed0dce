"""How each model format names the tensors of a quantized weight (its companions)."""

from __future__ import annotations

# qz: the codes keep the weight's name; companions add a suffix (compressed-tensors'
# naming convention: weight → weight_scale, weight_zero_point).
QZ_SCALE, QZ_ZERO_POINT, QZ_GLOBAL_SCALE = "_scale", "_zero_point", "_global_scale"

# compressed-tensors: X.weight → X.weight_packed (packed codes), X.weight_scale, …
CT_PACKED, CT_SCALE, CT_ZERO_POINT = "_packed", "_scale", "_zero_point"
CT_SHAPE, CT_GLOBAL_SCALE = "_shape", "_global_scale"

# MLX: X.weight holds the packed codes, beside X.scales and X.biases.
MLX_SCALES, MLX_BIASES = ".scales", ".biases"
WEIGHT = ".weight"


def module_of(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``model.layers.0.mlp.up_proj``."""
    return name.removesuffix(WEIGHT)
