"""How a switch node picks its case: pure functions of its input (docs/spec.md, "Switch").

The field ``on`` of the input (a dotted path; number segments index lists) is compared
as JSON text with the cases' values; no match, or no such field, takes the default.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Choice:
    """A switch's decision: the field's value as text (None: the input has no such field), and the case."""

    value: str | None
    case: str | None  # the matched case's value; None: no case matched (the default's, if any)


def choose(upstream: Any, on: str, cases: Collection[str]) -> Choice:
    """Which of ``cases`` the field ``on`` of ``upstream`` names, if any."""
    found, value = field_value(upstream, on)
    if not found:
        return Choice(value=None, case=None)
    text = value_text(value)
    return Choice(value=text, case=text if text in cases else None)


def field_value(data: Any, on: str) -> tuple[bool, Any]:
    """``(True, value)`` of the dotted path ``on`` in ``data``; ``(False, None)`` where a segment is missing."""
    for segment in on.split("."):
        if isinstance(data, dict) and segment in data:
            data = data[segment]
        elif isinstance(data, list) and segment.isdigit() and int(segment) < len(data):
            data = data[int(segment)]
        else:
            return False, None
    return True, data


def value_text(value: Any) -> str:
    """The text a value is compared as: a string itself, anything else its (compact, key-sorted) JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def unmatched_error(switch: str, on: str, choice: Choice, cases: Collection[str]) -> str:
    """The run's error when a switch without a default finds no case for its input."""
    known = ", ".join(json.dumps(case) for case in cases)
    if choice.value is None:
        return f'switch {switch}: its input has no field "{on}", and the switch has no default (cases: {known})'
    return f"switch {switch}: no case for {on}={json.dumps(choice.value)} and no default (cases: {known})"
