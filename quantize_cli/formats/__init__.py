"""The on-disk formats qz writes and reads, one module each (qz.py,
compressed_tensors.py, mlx.py) behind the interface of ``base.py``, each listing the
layouts (``layouts/``) it stores weights in. This registry is the one place that knows
them by name: ``--format`` picks a format, reading detects one from a file's header,
``--scheme`` names a preset, and default output names get (and lose) their suffix here.
"""

from __future__ import annotations

import re

from ..core import Scheme
from ..core.elements import INTEGER_BITS, METHOD_INFO
from ..core.scheme import Activations, ClipChoice, Granularity, Method
from ..errors import SchemeError
from ..storage.header import Header
from .base import Deployment, ModelFormat, QuantizedWeight
from .compressed_tensors import CompressedTensors
from .layout import Layout, Role, StoredTensor, StoredWeight
from .mlx import MlxFormat
from .presets import PRESETS, preset
from .qz import QzFormat

#: Every format, by name; the first is the default, and detection tries them in order
#: (qz first: its metadata decides, while its tensors alone could pass for int-quantized
#: compressed-tensors).
FORMATS: dict[str, ModelFormat] = {fmt.name: fmt
                                   for fmt in (QzFormat(), CompressedTensors(), MlxFormat())}
DEFAULT_FORMAT = next(iter(FORMATS))
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
    """The format a file's header says it is in; None for a plain float file."""
    return next((fmt for fmt in FORMATS.values() if fmt.recognises(header)), None)


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
    """The suffix of default output names: ``int8``, ``ct-int4``, ``mlx-nvfp4``, …, and
    ``4.5bit`` for the mixed schemes of ``--target-bits 4.5``.

    >>> output_suffix(format_named("compressed-tensors"), Scheme("nvfp4"))
    'ct-nvfp4'
    """
    if target_bits is not None:
        return f"{fmt.prefix}{target_bits:g}bit"
    return fmt.prefix + scheme.label.lower()


def _suffix_pattern() -> re.Pattern[str]:
    prefixes = "|".join(re.escape(fmt.prefix) for fmt in FORMATS.values() if fmt.prefix)
    labels = sorted({f"int{bits}" for bits in INTEGER_BITS}
                    | {info.label.lower() for info in METHOD_INFO.values() if info.label})
    return re.compile(rf"\.(?:(?:{prefixes})?(?:{'|'.join(labels)}|\d+(?:\.\d+)?bit)"
                      rf"|{DEQUANTIZED_SUFFIX})$")


_SUFFIX = _suffix_pattern()


def strip_suffix(stem: str) -> str:
    """``stem`` without a suffix :func:`output_suffix` (or dequantize) gave it, so that
    names do not stack up.

    >>> strip_suffix("llama.4.5bit"), strip_suffix("llama.ct-int4"), strip_suffix("llama")
    ('llama', 'llama', 'llama')
    """
    return _SUFFIX.sub("", stem)


__all__ = ["DEFAULT_FORMAT", "DEQUANTIZED_SUFFIX", "FORMATS", "PRESETS", "Deployment",
           "Layout", "ModelFormat", "QuantizedWeight", "Role", "StoredTensor", "StoredWeight",
           "detect", "format_named", "output_suffix", "scheme_for", "strip_suffix"]
