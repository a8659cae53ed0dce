"""``--rule GLOB=SCHEME``: per-tensor overrides of the scheme, by name pattern.

SCHEME is ``keep`` (leave the tensor in its dtype) or a comma-separated list of choices,
each changing one thing of the command line's scheme: bits (``int2`` … ``int8``), method
(``absmax``, ``affine``, ``fp8``, ``nvfp4``, ``mxfp4``, ``mxfp8``) and granularity
(``tensor``, ``channel``, ``block64``).
``'*.mlp.down_proj.weight=int8'`` keeps the command line's method and granularity and
gives those tensors 8 bits. Rules change how the tensors qz selects are quantized, never
which are selected (``--include`` does that); when several rules match a name, the last
one given wins, as later options do. The dry run's reason column and the provenance
record which rule decided each tensor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..core.scheme import BITS, GRANULARITIES, METHODS, Scheme
from ..errors import SchemeError

KEEP = "keep"
_BLOCK = re.compile(r"block(\d+)")
_BITS = re.compile(r"int(\d+)")
SYNTAX = (f"SCHEME is 'keep' or choices separated by commas: int{BITS[0]} to int{BITS[-1]}, "
          f"{', '.join(METHODS)}, tensor, channel or blockN (e.g. 'int4,block32')")


@dataclass(frozen=True)
class Rule:
    """One ``--rule``: the tensors whose names match ``pattern`` get ``scheme``, or stay in
    their dtype (``scheme`` None)."""

    text: str
    pattern: str
    scheme: Scheme | None

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern)


def parse_rule(text: str, base: Scheme) -> Rule:
    """A rule from its text; what it does not say comes from ``base``.

    >>> parse_rule("*.mlp.*=int4,block32", Scheme()).scheme.describe()
    'int4 absmax block 32, mse clip'
    >>> parse_rule("lm_head.weight=keep", Scheme()).scheme is None
    True

    Raises:
        SchemeError: the text is not GLOB=SCHEME, or names a choice qz does not have.
    """
    pattern, equals, scheme_text = text.rpartition("=")
    if not equals or not pattern or not scheme_text:
        raise SchemeError(f"--rule {text!r} is not GLOB=SCHEME", hint=SYNTAX)
    choices = [choice.strip().lower() for choice in scheme_text.split(",")]
    if choices == [KEEP]:
        return Rule(text, pattern, None)
    changes: dict[str, object] = {}
    for choice in choices:
        key: str
        value: object
        block, bits = _BLOCK.fullmatch(choice), _BITS.fullmatch(choice)
        if choice in METHODS:
            key, value = "method", choice
        elif choice in GRANULARITIES and choice != "block":
            key, value = "granularity", choice
        elif block is not None:
            key, value = "block_size", int(block.group(1))
        elif bits is not None:
            key, value = "bits", int(bits.group(1))
        else:
            raise SchemeError(f"--rule {text!r}: {choice!r} is not a choice qz knows",
                              hint=SYNTAX)
        where = {"granularity", "block_size"}
        if key in changes or (key in where and where & changes.keys()):
            what = "granularity" if key in where else key
            raise SchemeError(f"--rule {text!r} gives the {what} twice", hint=SYNTAX)
        changes[key] = value
    if "block_size" in changes:
        changes["granularity"] = "block"
    try:
        return Rule(text, pattern, base.varied(**changes))  # type: ignore[arg-type]
    except SchemeError as error:
        raise SchemeError(f"--rule {text!r}: {error.message}", hint=error.hint) from None


def parse_rules(texts: Sequence[str], base: Scheme) -> tuple[Rule, ...]:
    """Every ``--rule``, in the order given."""
    return tuple(parse_rule(text, base) for text in texts)


def rule_for(name: str, rules: Sequence[Rule]) -> Rule | None:
    """The rule that decides ``name``: the last one that matches it."""
    return next((rule for rule in reversed(rules) if rule.matches(name)), None)
