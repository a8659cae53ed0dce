"""Quantized checkpoints qz does not read (GPTQ, AWQ, bitsandbytes, and any other method
a config.json names), recognised by config.json's ``quantization_config`` or by the
names of their tensors, so that every command refuses them by name, with what to do
instead, rather than take their packed integers or scales for weights.

GPTQ and AWQ are refused rather than read: their integers are packed in orders of their
own (AWQ interleaves each word), GPTQ's act-order permutes the groups, and the reference
loaders (gptqmodel, autoawq) need a GPU to run, so no test on this machine could prove a
reading bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..storage.header import Header

FLOAT_RELEASE = "start from the model's float release (its model card links it)"


@dataclass(frozen=True)
class Refused:
    """A quantization qz does not read: what it is, in words, and what to do instead."""

    what: str  # "a GPTQ checkpoint (4-bit, groups of 128, act-order)"
    hint: str


def declared_method(config: dict[str, Any] | None) -> str | None:
    """The quantization method config.json declares: ``quantization_config``'s
    ``quant_method`` (lower case), ``mlx`` for MLX's ``quantization``, None for none.

    >>> declared_method({"quantization_config": {"quant_method": "GPTQ", "bits": 4}})
    'gptq'
    """
    if not config:
        return None
    declared = config.get("quantization_config")
    if isinstance(declared, dict) and isinstance(declared.get("quant_method"), str):
        return str(declared["quant_method"]).lower()
    if isinstance(config.get("quantization"), dict):
        return "mlx"
    return None


def refused(config: dict[str, Any] | None, headers: Iterable[Header],
            readable: Iterable[str]) -> Refused | None:
    """The quantization of a checkpoint qz does not read, from its config.json (a method
    not in ``readable``) or, without one, from its tensors' names; None when qz reads it
    (or it is not quantized).

    >>> refused({"quantization_config": {"quant_method": "awq", "bits": 4,
    ...                                  "group_size": 128}}, [], ["qz"]).what
    'an AWQ checkpoint (4-bit, groups of 128)'
    """
    method = declared_method(config)
    settings = (config or {}).get("quantization_config") or {}
    if method is not None and method not in readable:
        return _refusal(method, settings)
    for header in headers:
        found = _by_tensor_names(header)
        if found is not None:
            return _refusal(found, settings)
    return None


def _refusal(method: str, settings: dict[str, Any]) -> Refused:
    if method in ("gptq", "awq"):
        bits = settings.get("bits") or settings.get("w_bit")
        group = settings.get("group_size") or settings.get("q_group_size")
        details = [f"{bits}-bit"] if isinstance(bits, int) else []
        if isinstance(group, int):
            details.append(f"groups of {group}" if group > 0 else "per channel")
        if settings.get("desc_act"):
            details.append("act-order")
        label = method.upper()
        what = f"{'an' if label == 'AWQ' else 'a'} {label} checkpoint" + (
            f" ({', '.join(details)})" if details else "")
        return Refused(what, f"qz does not read {label}'s packed integers: {FLOAT_RELEASE}")
    if method == "bitsandbytes":
        kind = ("4-bit " + str(settings.get("bnb_4bit_quant_type", "nf4")).upper()
                if settings.get("load_in_4bit") else "8-bit" if settings.get("load_in_8bit")
                else "")
        return Refused(f"a bitsandbytes checkpoint{f' ({kind})' if kind else ''}",
                       "only bitsandbytes decodes its quantization state: load it with "
                       f"transformers, call model.dequantize() and save_pretrained(); or "
                       f"{FLOAT_RELEASE}")
    return Refused(f"quantized with {method!r} (config.json's quantization_config), which "
                   "qz does not read", FLOAT_RELEASE)


def _by_tensor_names(header: Header) -> str | None:
    """The method a file's tensor names give away, when config.json does not say."""
    for entry in header.tensors:
        name = entry.name
        if name.endswith(".qweight") and name.removesuffix("qweight") + "qzeros" in header:
            return "gptq" if name.removesuffix("qweight") + "g_idx" in header else "awq"
        if name.endswith((".weight.absmax", ".weight.quant_map")) or ".quant_state." in name:
            return "bitsandbytes"
        if name.endswith(".SCB") and name.removesuffix("SCB") + "weight" in header:
            return "bitsandbytes"
    return None
