"""The on-disk formats qz writes and reads, one module each, behind the codec interface
of ``base.py``. A format is registered here: ``--format`` picks a codec by name for
writing, and reading detects it from a file's header."""

from __future__ import annotations

from ..errors import SchemeError
from ..storage.header import Header
from .base import (
    Codec,
    Deployment,
    QuantizedWeight,
    Role,
    StoredRows,
    StoredTensor,
    StoredWeight,
)
from .compressed_tensors import CompressedTensors
from .mlx import MlxFormat
from .qz import QzFormat

#: Every format, by name; the first is the default, and detection tries them in order
#: (qz first: its metadata decides, while its tensors alone could pass for int-quantized
#: compressed-tensors).
FORMATS: dict[str, Codec] = {codec.name: codec
                             for codec in (QzFormat(), CompressedTensors(), MlxFormat())}
DEFAULT_FORMAT = next(iter(FORMATS))


def codec_for(name: str) -> Codec:
    """The codec of the format called ``name`` (a ``--format`` value).

    >>> codec_for("compressed-tensors").folder_output
    True
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise SchemeError(f"unknown format {name!r} (choose from {', '.join(FORMATS)})") from None


def detect(header: Header) -> Codec | None:
    """The format a file's header says it is in; None for a plain float file."""
    return next((codec for codec in FORMATS.values() if codec.recognises(header)), None)


__all__ = ["DEFAULT_FORMAT", "FORMATS", "Codec", "Deployment", "QuantizedWeight", "Role",
           "StoredRows", "StoredTensor", "StoredWeight", "codec_for", "detect"]
