"""Strict JSON for the files qz reads (headers, indexes, config.json): a duplicate key is
refused rather than silently resolved (Python's json keeps the last value), and so are
the non-standard constants NaN and Infinity."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def loads_strict(text: str, what: str, fail: Callable[[str], Exception]) -> Any:
    """Parse ``text``; every problem raises ``fail(rule)``, with ``what`` naming the
    document in the rule.

    >>> loads_strict('{"a": 1}', "config", ValueError)
    {'a': 1}
    >>> loads_strict('{"a": 1, "a": 2}', "config", ValueError)
    Traceback (most recent call last):
    ValueError: duplicate key 'a' in config
    """

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise fail(f"duplicate key {key!r} in {what}")
            result[key] = value
        return result

    def refuse_constant(token: str) -> Any:
        raise fail(f"{what} is not valid JSON ({token} is not JSON)")

    try:
        return json.loads(text, object_pairs_hook=refuse_duplicates,
                          parse_constant=refuse_constant)
    except json.JSONDecodeError as error:
        raise fail(f"{what} is not valid JSON: {error.msg} at line {error.lineno} column "
                   f"{error.colno}") from None
    except RecursionError:
        raise fail(f"{what} JSON is nested too deeply") from None
