"""``--scheme NAME``: llm-compressor's preset names (compressed-tensors'
``quantization/quant_scheme.py``), as shorthand for a method, bits, granularity and
activations, for users who know them from there.

``W{N}A16`` (N = 2 … 8) are symmetric integers in groups of 128, ``W4A16_ASYM`` the
affine ones; ``W8A8`` INT8 per channel with INT8 activations (dynamic, per token);
``FP8_DYNAMIC`` FP8 per channel with FP8 activations per token; ``FP8_BLOCK`` FP8 in
128 × 128 blocks with FP8 activations per group of 128; ``NVFP4A16`` and ``MXFP4A16``
the weight-only microscaling types. ``FP8`` and ``NVFP4`` need static activation scales,
measured on calibration data, which qz does not take: they are refused by name.
"""

from __future__ import annotations

from ..core import Scheme
from ..errors import SchemeError

PRESETS: dict[str, Scheme] = {
    **{f"W{bits}A16": Scheme("absmax", "block", 128, bits=bits) for bits in range(2, 9)},
    "W4A16_ASYM": Scheme("affine", "block", 128, bits=4),
    "W8A8": Scheme("absmax", "channel", activations="int8"),
    "FP8_DYNAMIC": Scheme("fp8", "channel", activations="fp8"),
    "FP8_BLOCK": Scheme("fp8", "block", 128, activations="fp8"),
    "NVFP4A16": Scheme("nvfp4"),
    "MXFP4A16": Scheme("mxfp4"),
}
#: Presets whose activations need calibration, and what they need.
CALIBRATED = {"FP8": "static FP8 scales of every layer's inputs",
              "NVFP4": "static global scales of every layer's inputs"}
#: Another spelling llm-compressor accepts.
ALIASES = {"INT8": "W8A8"}


def preset(name: str) -> Scheme:
    """The scheme a preset names (case does not matter).

    >>> preset("w4a16").describe()
    'int4 absmax block 128, mse clip'

    Raises:
        SchemeError: the name is no preset, or one that needs calibration.
    """
    key = ALIASES.get(name.upper(), name.upper())
    if key in CALIBRATED:
        raise SchemeError(f"--scheme {name} needs {CALIBRATED[key]}, which qz's exports do "
                          "not carry (its calibration is for the weights)",
                          hint=f"--scheme {key}_DYNAMIC quantizes activations at run time"
                          if key == "FP8" else "--scheme NVFP4A16 keeps activations in "
                          "16 bits")
    if key not in PRESETS:
        raise SchemeError(f"unknown --scheme {name!r} (choose from "
                          f"{', '.join([*PRESETS, *ALIASES])})")
    return PRESETS[key]


def preset_of(scheme: Scheme) -> str | None:
    """The preset that is exactly ``scheme`` (its scale search aside), if one is.

    >>> preset_of(Scheme("fp8", "channel", activations="fp8"))
    'FP8_DYNAMIC'
    """
    for name, known in PRESETS.items():
        if known.varied(clip=scheme.clip) == scheme:
            return name
    return None
