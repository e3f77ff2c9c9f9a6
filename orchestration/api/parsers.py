from __future__ import annotations

from typing import IO, Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser as DRFJSONParser

# JSON nesting a body may have: deeper ones could overflow the stack when stored (docs/api.md, "Errors").
MAX_DEPTH = 100


class JSONParser(DRFJSONParser):
    """DRF's JSON parser, with a 400 (not a 500) for a body nested too deep."""

    def parse(self, stream: IO[Any], media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError("JSON parse error - the body is nested too deeply") from exc
        if nesting(data) > MAX_DEPTH:
            raise ParseError(f"JSON parse error - the body is nested deeper than {MAX_DEPTH} levels")
        return data


def nesting(value: Any) -> int:
    """How many arrays and objects deep ``value`` goes (0 for a scalar); without recursion."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest
