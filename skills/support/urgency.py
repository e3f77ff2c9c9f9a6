"""How urgent a customer's message is, from the words it uses ("low", "normal" or "high").

High: the customer says it is urgent, says something is *still* not done, a
deadline is today, money was taken more than once, or they threaten legal
action or a chargeback. Low: they say there is no hurry. Anything else is
normal. Cues, not a model: they are few, and each is easy to explain to the
person who reads the ticket.
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
