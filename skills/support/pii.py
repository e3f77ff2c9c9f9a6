"""``mask_pii``: personal data in the customer's message is replaced before any other step sees it.

``mask(text)`` is the pure function behind the skill, and (through ``masked_ticket``) its intake, so the
raw text of a new message is never stored. What is masked, and why: docs/skills.md, "mask_pii".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skills.registry import SkillContext, skill

from .orders import ORDER_NUMBER
from .ticket import content_of, ticket_of

Counts = dict[str, int]


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] = lambda found: True
    group: int = 0  # the part of the match that is masked (a label stays)


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def luhn_valid(number: str) -> bool:
    """The payment card checksum; an all-zero run is not a card."""
    if not number.isdigit() or not number.strip("0"):
        return False
    total = 0
    for position, char in enumerate(reversed(number)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def iban_valid(found: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to numbers, mod 97 is 1."""
    compact = re.sub(r"\s", "", found).upper()
    rearranged = compact[4:] + compact[:4]
    return 15 <= len(compact) <= 34 and int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def digit_count(low: int, high: int) -> Callable[[str], bool]:
    return lambda found: low <= len(digits(found)) <= high


def card_valid(found: str) -> bool:
    number = digits(found)
    return 13 <= len(number) <= 19 and luhn_valid(number)


NOT_WORD_BEFORE = r"(?<![\w+@/.,-])"  # not inside a word, a longer number, a date or a price
NOT_WORD_AFTER = r"(?![\w@]|[/.,-]\d)"
ID_LABEL = (
    r"\b(?:passport|national\s+id(?:entity)?(?:\s+card)?|identity\s+card|id\s+card|"
    r"driver'?s?\s+licen[cs]e|tax\s+id|personal\s+id)"
    r"(?:\s+(?:number|no\.?|num|nr\.?))?\s*(?:is\s+|:\s*|#\s*)?"
)

# In priority order: where two overlap, the earlier detector wins (a labelled id before a card: some
# national ids, South Africa's, carry a Luhn check digit).
DETECTORS = (
    Detector("email", re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}")),
    Detector(
        "id",
        re.compile(ID_LABEL + r"([A-Z0-9][A-Z0-9-]{4,18}[A-Z0-9])\b", re.IGNORECASE),
        lambda found: any(c.isdigit() for c in found),
        group=1,
    ),
    Detector("id", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), iban_valid),
    Detector("card", re.compile(NOT_WORD_BEFORE + r"\d(?:[ -]?\d){12,18}" + NOT_WORD_AFTER), card_valid),
    Detector("id", re.compile(NOT_WORD_BEFORE + r"(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}" + NOT_WORD_AFTER)),
    Detector(
        "id", re.compile(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
    ),
    Detector(
        "phone",
        re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,6}" + NOT_WORD_AFTER),
        digit_count(8, 15),
    ),
    Detector(
        "phone",
        re.compile(NOT_WORD_BEFORE + r"(?:1[ .-])?(?:\(\d{3}\) ?\d{3}[ .-]|\d{3}([ .-])\d{3}\1)\d{4}" + NOT_WORD_AFTER),
    ),
    Detector(
        "phone",
        re.compile(NOT_WORD_BEFORE + r"0\d{2,4}[ -]?\d{3,4}[ -]?\d{3,4}" + NOT_WORD_AFTER),
        digit_count(10, 11),
    ),
)


def mask(text: str) -> tuple[str, Counts]:
    """``text`` with each email, phone, card and id number replaced by ``[kind]``, and how many of each.

    Order numbers ("order 1042", "#1042") are never masked; masking masked text changes nothing.
    """
    taken = [match.span(1) for match in ORDER_NUMBER.finditer(text)]
    found: list[tuple[int, int, str]] = []
    for detector in DETECTORS:
        for match in detector.pattern.finditer(text):
            start, end = match.span(detector.group)
            if detector.valid(match.group(detector.group)) and not _overlaps((start, end), taken):
                taken.append((start, end))
                found.append((start, end, detector.kind))
    return _replace(text, sorted(found))


def _overlaps(span: tuple[int, int], taken: list[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in taken)


def _replace(text: str, found: list[tuple[int, int, str]]) -> tuple[str, Counts]:
    parts: list[str] = []
    counts: Counts = {}
    position = 0
    for start, end, kind in found:
        parts += [text[position:start], f"[{kind}]"]
        counts[kind] = counts.get(kind, 0) + 1
        position = end
    parts.append(text[position:])
    return "".join(parts), counts


def merge_counts(earlier: Any, counts: Counts) -> Counts:
    """``counts`` added to a ticket's earlier ``pii`` (the intake's), ignoring anything that is not a count."""
    merged = {k: v for k, v in earlier.items() if isinstance(v, int)} if isinstance(earlier, dict) else {}
    for kind, count in counts.items():
        merged[kind] = merged.get(kind, 0) + count
    return merged


def masked_ticket(input: Any) -> dict[str, Any]:
    """The ticket with its content masked and ``pii`` counting what was masked (added to any earlier count)."""
    ticket = ticket_of(input)
    masked, counts = mask(content_of(ticket))
    return {**ticket, "content": masked, "pii": merge_counts(ticket.get("pii"), counts)}


@skill(
    description="Masks emails, phone numbers, payment cards and id numbers in the ticket's content "
    "([email], [phone], [card], [id]) and adds pii: {kind: count}. Order numbers, prices and dates stay.",
    soft_time_limit=5,
    time_limit=10,
    intake=masked_ticket,
)
def mask_pii(ctx: SkillContext, input: Any) -> Any:
    return masked_ticket(input)
