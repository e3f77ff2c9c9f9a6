"""The regular expressions of IntentRule: compiled once, checked before they are saved."""

from __future__ import annotations

import re
from functools import lru_cache


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a rule (it does not compile, or matches the empty message); None if it can."""
    try:
        compiled = compiled_pattern(pattern)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    if compiled.search(""):
        return "it matches an empty message, so it would match every message"
    return None


@lru_cache(maxsize=512)
def compiled_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)
