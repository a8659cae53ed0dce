"""How each model format names the tensors of a quantized weight (its companions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...storage.header import Header
    from ..layout import Role, StoredWeight

# qz: the codes keep the weight's name; companions add a suffix (compressed-tensors'
# naming convention: weight → weight_scale, weight_zero_point).
QZ_SCALE, QZ_ZERO_POINT, QZ_GLOBAL_SCALE = "_scale", "_zero_point", "_global_scale"

# compressed-tensors: X.weight → X.weight_packed (packed codes), X.weight_scale, …
CT_PACKED, CT_SCALE, CT_ZERO_POINT = "_packed", "_scale", "_zero_point"
CT_SHAPE, CT_GLOBAL_SCALE, CT_GROUP_INDEX = "_shape", "_global_scale", "_g_idx"

# Fine-grained FP8 (DeepSeek, Qwen3 -FP8): X.weight beside X.weight_scale_inv.
SCALE_INVERSE = "_scale_inv"
# gpt-oss: MXFP4 experts as X_blocks (E2M1 codes) and X_scales (E8M0 exponents).
GPT_OSS_BLOCKS, GPT_OSS_SCALES = "_blocks", "_scales"

# MLX: X.weight holds the packed codes, beside X.scales and X.biases.
MLX_SCALES, MLX_BIASES = ".scales", ".biases"
WEIGHT = ".weight"


def module_of(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``model.layers.0.mlp.up_proj``."""
    return name.removesuffix(WEIGHT)


#: The tensors of a layer that describe its activations, not its weight: static scales
#: measured on calibration data (compressed-tensors' FP8 and NVFP4, fine-grained FP8
#: with ``activation_scheme: static``). A float model has none.
ACTIVATION_TENSORS = (".input_scale", ".input_global_scale", ".input_zero_point",
                      ".output_scale", ".output_zero_point")


def activation_tensors(header: Header, weight: StoredWeight) -> tuple[tuple[str, Role], ...]:
    """The activation tensors of ``weight``'s layer that ``header`` holds."""
    module = module_of(weight.name)
    return tuple((module + suffix, "activation_scale") for suffix in ACTIVATION_TENSORS
                 if module + suffix in header)
