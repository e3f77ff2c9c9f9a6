"""How urgent a customer's message is, from the words it uses ("low", "normal" or "high").

The cues: docs/skills.md, "classify_intent".
"""

from __future__ import annotations

import re

HIGH = re.compile(
    r"\b(urgent(ly)?|asap|a\.s\.a\.p|immediately|right now|right away|emergency|as soon as possible)\b"
    r"|\bstill (not|no|hasn'?t|haven'?t|isn'?t|waiting|nothing)\b"
    r"|\b(lawyer|solicitor|attorney|legal action|court|sue|suing|small claims|chargeback|ombudsman"
    r"|trading standards|consumer protection)\b"
    r"|\bcharged (me )?(twice|two times|three times|again|double)\b|\bdouble[- ]charged\b"
    r"|\b(multiple|repeated|duplicate) (charges|payments)\b"
    r"|\b(by|before) (today|tonight|tomorrow)\b|\btoday\b.{0,30}\bdeadline\b",
    re.IGNORECASE,
)
LOW = re.compile(
    r"\b(no rush|no hurry|not urgent|whenever (you|it)|when you (get|have) (a|the) (chance|moment|time)"
    r"|just (curious|wondering)|out of curiosity)\b",
    re.IGNORECASE,
)


def urgency_of(text: str) -> str:
    """ "high" when a high cue appears (it wins over a low one), "low" when only a low one does, else "normal"."""
    # Low cues are removed first so that "not urgent" is not read as "urgent".
    if HIGH.search(LOW.sub(" ", text)):
        return "high"
    if LOW.search(text):
        return "low"
    return "normal"
