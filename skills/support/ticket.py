"""The ticket: what the support skills pass along a run.

Each support skill takes a ticket and returns it with its findings added under its own keys; ``ticket_of``
merges back the list a chord's body gets. See docs/skills.md, "The support skills".
"""

from __future__ import annotations

from typing import Any

from skills.registry import SkillError

Ticket = dict[str, Any]


def ticket_of(input: Any) -> Ticket:
    """The ticket a skill was given: an object as is (copied), a string as its content, a list merged in order."""
    if isinstance(input, str):
        return {"content": input}
    if isinstance(input, dict):
        return dict(input)
    if isinstance(input, list) and input and all(isinstance(item, dict) for item in input):
        merged: Ticket = {}
        for item in input:
            merged.update(item)
        return merged
    raise SkillError(f"expected a ticket (an object with content, a string, or a list of objects), got {_kind(input)}")


def content_of(ticket: Ticket) -> str:
    """The customer's text; a clear error when the ticket has none."""
    content = ticket.get("content")
    if not isinstance(content, str):
        raise SkillError('the ticket has no "content" string (the customer\'s message)')
    return content


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an empty list" if not value else "a list with a non-object"
    return type(value).__name__
