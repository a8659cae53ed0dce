"""The one exception family for failures a user can cause or fix.

Every error carries a message that names the file, the tensor (where there is one) and the
rule that was broken, plus an optional hint. The command line prints ``Error: <message>``
(and ``Hint: <hint>``) on one line each to stderr and exits with code 1; nothing in the
library prints or exits.
"""

from __future__ import annotations

from pathlib import Path


class QzError(Exception):
    """Base class of every error qz reports to a user (exit code 1 on the command line)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


def located(path: str | Path | None, tensor: str | None, rule: str) -> str:
    """Build the standard message shape ``FILE: tensor 'NAME': RULE``.

    >>> located("m.safetensors", "w", "contains NaN")
    "m.safetensors: tensor 'w': contains NaN"
    """
    parts = []
    if path is not None:
        parts.append(str(path))
    if tensor is not None:
        parts.append(f"tensor {tensor!r}")
    parts.append(rule)
    return ": ".join(parts)


class InputError(QzError):
    """The input cannot be read or breaks the safetensors format or qz's rules."""


class HeaderError(InputError):
    """The safetensors header is malformed (length, UTF-8, JSON, schema, duplicates)."""


class LayoutError(InputError):
    """The data section does not match the header (overlap, hole, truncation, size)."""


class NonFiniteValuesError(InputError):
    """A tensor selected for quantization holds NaN or infinity."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        count: int = 0,
        first_index: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message, hint)
        self.count = count
        self.first_index = first_index

    @classmethod
    def build(
        cls,
        tensor: str | None,
        count: int,
        first_index: tuple[int, ...],
        path: str | Path | None = None,
    ) -> NonFiniteValuesError:
        plural = "" if count == 1 else "s"
        rule = (
            f"{count} non-finite value{plural} (NaN or ±inf), "
            f"first at index {list(first_index)}"
        )
        return cls(
            located(path, tensor, rule),
            hint="qz never turns NaN or infinity into codes; repair the tensor or --exclude it",
            count=count,
            first_index=first_index,
        )


class CheckpointError(InputError):
    """A sharded checkpoint's index and shards disagree, or a shard is missing."""


class SchemeError(QzError):
    """The requested quantization scheme is invalid or cannot apply to a tensor."""


class DtypeRangeError(QzError):
    """Dequantized values do not fit the requested output dtype (e.g. float16)."""


class QuantizedFormatError(InputError):
    """A file claiming to be qz-quantized is inconsistent with qz's format."""


class OutputError(QzError):
    """The output cannot be written (exists, is the input, disk full, not writable)."""


class InternalCheckError(QzError):
    """qz's own check of what it produced failed: a bug, reported instead of published."""
