"""Small text helpers the support skills share: words, content words, sentences."""

from __future__ import annotations

import re

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")

# Function words carry no topic: a reply is grounded by what is left.
_STOP_WORDS = """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your yours
    yourself yourselves i'm you're we're it's that's don't can't won't let's i'll we'll you'll i've we've
    please thanks thank hi hello dear also get got may might must us"""
STOP_WORDS = frozenset(_STOP_WORDS.split())


def words(text: str) -> list[str]:
    """Lower-case words (letters and digits, with an apostrophe suffix: "don't", "customer's")."""
    return WORD.findall(text.lower())


def stem(word: str) -> str:
    """A crude suffix strip, enough to match "refunds"/"refunded"/"refunding" with "refund", "charged" with "charge"."""
    for suffix in ("ing", "ed", "es", "s", "'s", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> list[str]:
    """The stemmed words of ``text`` that are not stop words, in order."""
    return [stem(w) for w in words(text) if w not in STOP_WORDS]


def sentences(text: str) -> list[str]:
    """``text`` split after . ! ? and at line breaks; empty pieces dropped."""
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]
