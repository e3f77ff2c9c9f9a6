"""``sentiment``: how the customer feels, from VADER, and whether they are angry.

The label's cut-offs and the anger cues VADER underrates: docs/skills.md, "sentiment".
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from skills.registry import SkillContext, SkillError, skill

from .text import words
from .ticket import content_of, ticket_of

POSITIVE_AT = 0.05
NEGATIVE_AT = -0.05
ANGRY_AT = -0.6
# Capitals that are not shouting.
ACRONYMS = frozenset(
    {"API", "ATM", "CEO", "DHL", "EUR", "FAQ", "GBP", "PDF", "PIN", "SMS", "UPS", "URL", "USA", "USD", "VAT"}
)
OUTRAGE = frozenset(
    {"unacceptable", "outrageous", "ridiculous", "scam", "furious", "disgusting", "disgraceful", "fraud", "livid"}
)
CAPITAL_WORD = re.compile(r"\b[A-Z]{3,}\b")


@cache
def analyzer() -> SentimentIntensityAnalyzer:
    """One analyzer per process: building it reads VADER's lexicon file."""
    return SentimentIntensityAnalyzer()


def shouting(text: str) -> bool:
    """A word of three or more capitals (not an acronym), or a text that is mostly capitals."""
    letters = [c for c in text if c.isalpha()]
    mostly_capitals = len(letters) >= 10 and sum(c.isupper() for c in letters) / len(letters) > 0.6
    return mostly_capitals or any(word not in ACRONYMS for word in CAPITAL_WORD.findall(text))


def label_of(compound: float) -> str:
    if compound >= POSITIVE_AT:
        return "positive"
    return "negative" if compound <= NEGATIVE_AT else "neutral"


def is_angry(text: str, compound: float, angry_at: float = ANGRY_AT) -> bool:
    """VADER's score at or below ``angry_at``, or anger cues it underrates (shouting!!, outrage words)."""
    if compound <= angry_at:
        return True
    if compound < POSITIVE_AT and shouting(text) and "!!" in text:
        return True
    return compound <= NEGATIVE_AT and not OUTRAGE.isdisjoint(words(text))


def sentiment_of(text: str, angry_at: float = ANGRY_AT) -> dict[str, Any]:
    """``{"compound", "label", "angry"}`` for ``text`` (the ticket's ``sentiment``)."""
    compound = round(float(analyzer().polarity_scores(text)["compound"]), 4)
    return {"compound": compound, "label": label_of(compound), "angry": is_angry(text, compound, angry_at)}


def angry_threshold(args: dict[str, Any]) -> float:
    value = args.get("angry_at", ANGRY_AT)
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1 <= value <= 1:
        raise SkillError(f"sentiment: args.angry_at must be a number from -1 to 1, not {value!r}", transient=False)
    return float(value)


@skill(
    description="Adds sentiment: {compound (VADER, -1..1), label (positive/neutral/negative), angry} "
    "for the customer's message; angry at compound <= args.angry_at (default -0.6) or on shouting with !!.",
    soft_time_limit=5,
    time_limit=10,
)
def sentiment(ctx: SkillContext, input: Any) -> Any:
    ticket = ticket_of(input)
    return {**ticket, "sentiment": sentiment_of(content_of(ticket), angry_threshold(ctx.args))}
