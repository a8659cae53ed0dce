"""The on-disk formats qz writes and reads, one module each (qz.py,
compressed_tensors.py, mlx.py; fine_grained_fp8.py and gpt_oss.py, which qz only reads)
behind the interface of ``base.py``, each listing the layouts (``layouts/``) it stores
weights in; refused.py names the quantizations qz does not read. This registry is the one
place that knows them by name: ``--format`` picks a format, reading detects one from a
file's header, ``--scheme`` names a preset, and default output names get (and lose) their
suffix here.
"""

from __future__ import annotations

import re

from ..core import Scheme
from ..core.elements import INTEGER_BITS, METHOD_INFO
from ..core.scheme import ACTIVATIONS, CLIPS, Activations, ClipChoice, Granularity, Method
from ..errors import SchemeError
from ..storage.header import Header
from .base import Deployment, ModelFormat, QuantizedWeight
from .compressed_tensors import CompressedTensors
from .fine_grained_fp8 import FineGrainedFp8
from .gpt_oss import GptOssMxfp4
from .layout import Layout, Role, StoredTensor, StoredWeight
from .mlx import MlxFormat
from .presets import PRESETS, preset, preset_of
from .qz import QzFormat
from .refused import Refused, declared_method, refused

#: Every format, by name; the first is the default, and detection tries them in order
#: (qz first: its metadata decides, while its tensors alone could pass for int-quantized
#: compressed-tensors).
FORMATS: dict[str, ModelFormat] = {fmt.name: fmt
                                   for fmt in (QzFormat(), CompressedTensors(), MlxFormat())}
DEFAULT_FORMAT = next(iter(FORMATS))
#: Every format qz reads: those it writes, then other tools' (their names are the
#: ``quant_method`` config.json gives them, as ``compressed-tensors`` and ``qz`` are).
READERS: dict[str, ModelFormat] = {**FORMATS, **{
    fmt.name: fmt for fmt in (FineGrainedFp8(), GptOssMxfp4())}}
#: What default output names of dequantized checkpoints end with.
DEQUANTIZED_SUFFIX = "dequant"


def format_named(name: str) -> ModelFormat:
    """The format called ``name`` (a ``--format`` value).

    >>> format_named("compressed-tensors").folder_output
    True
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise SchemeError(f"unknown format {name!r} (choose from {', '.join(FORMATS)})") from None


def detect(header: Header) -> ModelFormat | None:
    """The format a file's header says it is in (any format qz reads); None for a plain
    float file."""
    return next((fmt for fmt in READERS.values() if fmt.recognises(header)), None)


def scheme_for(fmt: ModelFormat, *, preset_name: str | None = None,
               method: Method | None = None, granularity: Granularity | None = None,
               block_size: int | None = None, bits: int | None = None,
               clip: ClipChoice = "auto", activations: Activations | None = None) -> Scheme:
    """The scheme asked for: a ``--scheme`` preset, or the format's default scheme with
    the choices given (``None``: the default's).

    >>> scheme_for(format_named("mlx"), block_size=32).describe()
    'affine block 32'
    >>> scheme_for(format_named("qz"), preset_name="W4A16_ASYM").describe()
    'int4 affine block 128, mse clip'
    """
    base = preset(preset_name) if preset_name is not None else fmt.default_scheme
    return base.varied(method=method, granularity=granularity, block_size=block_size,
                       bits=bits, clip=clip,
                       activations="unchanged" if activations is None else activations)


def output_suffix(fmt: ModelFormat, scheme: Scheme, target_bits: float | None = None) -> str:
    """The suffix of default output names. It says the format and the scheme, so that two
    different exports of one model never collide: the element (``int8``, ``int4``,
    ``fp8``, ``nvfp4``, …), then what differs from the format's default scheme (the
    method, ``channel``, ``tensor`` or ``g64`` for blocks of 64, the activations, a scale
    search asked for or turned off); compressed-tensors names llm-compressor's presets;
    ``4.5bit`` for the mixed schemes of ``--target-bits 4.5``.

    >>> qz, ct = format_named("qz"), format_named("compressed-tensors")
    >>> output_suffix(qz, Scheme()), output_suffix(qz, Scheme("affine", "block", 64, bits=4))
    ('int8', 'int4-affine-g64')
    >>> output_suffix(ct, Scheme("absmax", "channel")), output_suffix(ct, Scheme("nvfp4"))
    ('ct-int8-channel', 'ct-nvfp4a16')
    """
    default = fmt.default_scheme
    if target_bits is not None:
        words = [f"{target_bits:g}bit"] + (
            [scheme.method] if scheme.method != default.method else [])
        return fmt.prefix + "-".join(words)
    preset = preset_of(scheme) if fmt.names_presets else None
    if preset is not None:
        words = [preset.lower().replace("_", "-")]
    else:
        words = [scheme.label.lower()]
        if not scheme.element.is_float and scheme.method != default.method:
            words.append(scheme.method)
        if not scheme.info.microscaling and (scheme.granularity, scheme.block_size) != (
                default.granularity, default.block_size):
            words.append(f"g{scheme.block_size}" if scheme.granularity == "block"
                         else scheme.granularity)
        if scheme.activations is not None:
            words.append(f"{scheme.activations}act")
    if scheme.clip != scheme.varied(clip="auto").clip:
        words.append(f"clip-{scheme.clip}")
    return fmt.prefix + "-".join(words)


def _suffix_pattern() -> re.Pattern[str]:
    """Every suffix :func:`output_suffix` makes, and dequantize's."""
    prefixes = "|".join(re.escape(fmt.prefix) for fmt in FORMATS.values() if fmt.prefix)
    first = sorted({f"int{bits}" for bits in INTEGER_BITS}
                   | {info.label.lower() for info in METHOD_INFO.values() if info.label}
                   | {name.lower().replace("_", "-") for name in PRESETS})
    then = sorted({*METHOD_INFO, "channel", "tensor", *(f"{a}act" for a in ACTIVATIONS),
                   *(f"clip-{clip}" for clip in CLIPS)})
    words = "|".join(re.escape(word) for word in sorted(first, key=len, reverse=True))
    qualifiers = "|".join([*(re.escape(word) for word in then), r"g\d+"])
    return re.compile(rf"\.(?:(?:{prefixes})?(?:{words}|\d+(?:\.\d+)?bit)"
                      rf"(?:-(?:{qualifiers}))*|{DEQUANTIZED_SUFFIX})$")


_SUFFIX = _suffix_pattern()


def strip_suffix(stem: str) -> str:
    """``stem`` without the suffixes :func:`output_suffix` (or dequantize) gave it, so
    that names do not stack up.

    >>> strip_suffix("llama.4.5bit"), strip_suffix("llama.ct-int4-affine-g64.dequant")
    ('llama', 'llama')
    >>> strip_suffix("llama.v2"), strip_suffix("model.int8-channel")
    ('llama.v2', 'model')
    """
    while True:
        shorter = _SUFFIX.sub("", stem)
        if shorter == stem:
            return stem
        stem = shorter


__all__ = ["DEFAULT_FORMAT", "DEQUANTIZED_SUFFIX", "FORMATS", "PRESETS", "READERS",
           "Deployment", "Layout", "ModelFormat", "QuantizedWeight", "Refused", "Role",
           "StoredTensor", "StoredWeight", "declared_method", "detect", "format_named",
           "output_suffix", "refused", "scheme_for", "strip_suffix"]
