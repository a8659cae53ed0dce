"""Text for people: strings from files made safe to show, names shortened to fit, and
numbers written the way every view writes them."""

from __future__ import annotations

import math
import unicodedata

from ..core import Scheme


def display_text(value: str) -> str:
    """``value`` with control and format characters shown as escapes.

    >>> display_text("w\\x1b[31m")
    'w\\\\x1b[31m'
    """
    if value.isprintable():
        return value
    return "".join(
        char if char.isprintable() or char == " " else _escape(char) for char in value
    )


def _escape(char: str) -> str:
    if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def shorten_name(name: str, width: int, ellipsis: bool = True) -> str:
    """A tensor name in at most ``width`` characters: the words of its leading parts
    become their initials, from the left (layer numbers and the last two parts stay, as
    they tell the tensors apart), then the middle gives way to an ellipsis.

    >>> shorten_name("model.layers.11.self_attn.q_proj.weight", 24)
    'm.l.11.s.q_proj.weight'
    >>> shorten_name("model.layers.11.self_attn.q_proj.weight", 16)
    'm.l.11.…j.weight'
    """
    if len(name) <= width:
        return name
    parts = name.split(".")
    for index in range(len(parts) - 2):
        if not parts[index].isdigit() and len(parts[index]) > 1:
            parts[index] = parts[index][0]
            if len(".".join(parts)) <= width:
                return ".".join(parts)
    return shorten_middle(".".join(parts), width) if ellipsis else ".".join(parts)


def shorten_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, the middle replaced by an ellipsis.

    >>> shorten_middle("model.layers.11.self_attn.q_proj.weight", 24)
    'model.layer…_proj.weight'
    """
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "scalar"


def db_text(value: float) -> str:
    return "exact" if math.isinf(value) and value > 0 else f"{value:.2f}"


def sqnr_text(value: float) -> str:
    """An SQNR in a sentence: "42.10 dB", or "exact"."""
    text = db_text(value)
    return text if text == "exact" else f"{text} dB"


def precision(scheme: Scheme) -> str:
    """What a scheme stores: I8 (as qz 1.0 said), I4, F8, NVFP4, …"""
    if scheme.element.is_float:
        return scheme.label if scheme.info.microscaling else "F8"
    return f"I{scheme.bits}"
