"""The first stage of ``classify_intent``: precise regular expressions kept in the database (IntentRule).

``SEED_RULES`` are the rules a new database starts with (migration 0004_intentrule, through ``seed_rules``).
How rules are read, ranked and written: docs/skills.md, "classify_intent".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from skills.patterns import compiled_pattern

RULE_CONFIDENCE = 0.95

# (pattern, intent, priority, note). Specific problems (a charge, a login) outrank the
# tone of a message (complaint), which outranks greetings; the model handles the rest.
SEED_RULES: list[tuple[str, str, int, str]] = [
    (
        r"\bcharged (me )?(twice|two times|double|three times)\b"
        r"|\bdouble[- ]charged\b|\bduplicate (charge|payment)s?\b",
        "billing",
        100,
        "a repeated charge: 'you charged me twice'",
    ),
    (
        r"\bunauthori[sz]ed (charge|transaction|payment)s?\b",
        "billing",
        100,
        "a charge the customer did not make",
    ),
    (
        r"\b(card|payment) (was |got |keeps getting |is being )?(declined|rejected)\b",
        "billing",
        100,
        "a payment that did not go through",
    ),
    (
        r"\bwhere is my refund\b"
        r"|\brefund (still )?(hasn'?t|has not|didn'?t|did not|never) (arrived|come|shown up|show up)\b",
        "billing",
        100,
        "a refund that is late",
    ),
    (
        r"\b(vat|tax) invoice\b|\bcopy of (my|the) (invoice|receipt)\b",
        "billing",
        100,
        "asks for an invoice or receipt",
    ),
    (
        r"\bpassword reset\b|\breset (my |the )?password\b|\bforgot (my )?password\b",
        "technical",
        100,
        "a password reset",
    ),
    (
        r"\b(can'?t|cannot|can not|unable to|couldn'?t) (log|sign) ?(in|into|on)\b"
        r"|\blog ?in (is )?(not working|fails|failed)\b",
        "technical",
        100,
        "a login that fails",
    ),
    (
        r"\bapp (keeps |always )?(crash(es|ing)?|freez(es|ing)|froze)\b",
        "technical",
        100,
        "the mobile app crashes",
    ),
    (
        r"\b(verification|confirmation|security|2fa|two[- ]factor|sms) code\b",
        "technical",
        100,
        "a login or verification code",
    ),
    (
        r"\berror (code|message)\b|\b(500|502|503|404) error\b",
        "technical",
        100,
        "an error shown by the site or the app",
    ),
    (
        r"\b(page|site|website|checkout) (won'?t|will not|doesn'?t|does not) load\b|\b(site|website) is down\b",
        "technical",
        100,
        "the website does not work",
    ),
    (
        r"\b(worst|terrible|horrible|appalling|disgraceful|pathetic)"
        r" (customer )?(service|experience|company|support)\b",
        "complaint",
        80,
        "an angry verdict on the shop",
    ),
    (
        r"\b(speak|talk) (to|with) (a |your |the )?(manager|supervisor)\b",
        "complaint",
        80,
        "asks for a manager",
    ),
    (
        r"\b(file|make|lodge|raise) a (formal )?complaint\b|\bi want to complain\b",
        "complaint",
        80,
        "says it is a complaint",
    ),
    (
        r"\bnever (order|shop|buy)(ing)? (from|with|here)\b",
        "complaint",
        80,
        "'I will never order from you again'",
    ),
    (
        r"\b(bulk|wholesale|volume) (order|orders|pricing|price|prices|discount|discounts|purchase|buying)\b"
        r"|\bbuy(ing)? in bulk\b",
        "sales",
        100,
        "buying in quantity",
    ),
    (
        r"\bprice match\b|\bquote for \d+\b|\bbusiness account\b|\breseller\b",
        "sales",
        100,
        "price matching, quotes, business buyers",
    ),
    (
        r"\b(return|returns|refund) policy\b|\bhow (do|can) i return\b",
        "faq",
        90,
        "how returns work",
    ),
    (
        r"\b(opening|business|store|customer service) hours\b",
        "faq",
        90,
        "when the shop is open",
    ),
    (
        r"\b(ship|deliver)(ping)? (internationally|abroad|overseas|worldwide)\b",
        "faq",
        90,
        "shipping abroad",
    ),
    (
        r"^\W*(hi|hello|hey|hiya|good (morning|afternoon|evening))( there)?\W*$",
        "general",
        10,
        "a greeting and nothing else",
    ),
    (
        r"^\W*(thanks|thank you|thx|cheers|many thanks)( (so|very) much| a lot)?\W*$",
        "general",
        10,
        "a thank-you and nothing else",
    ),
    (
        r"\bare you an? (bot|robot|human|real person|ai)\b",
        "general",
        10,
        "asks who they are talking to",
    ),
]


@dataclass(frozen=True)
class RuleMatch:
    rule_id: int
    intent: str
    pattern: str


def seed_rules(rule_model: Any) -> int:
    """Create the SEED_RULES that ``rule_model`` (IntentRule, or its migration-time twin) lacks; how many were new.

    Rules are identified by pattern: a second run adds nothing and keeps an operator's changes to seeded rules.
    """
    created = 0
    for pattern, intent, priority, note in SEED_RULES:
        _, new = rule_model.objects.get_or_create(
            pattern=pattern, defaults={"intent": intent, "priority": priority, "note": note}
        )
        created += new
    return created


def matching_rule(text: str, rules: Iterable[tuple[int, str, str]]) -> RuleMatch | None:
    """The first of ``rules`` (id, pattern, intent; highest priority first) whose pattern is found in ``text``.

    A pattern that no longer compiles (edited outside the admin) is skipped.
    """
    for rule_id, pattern, intent in rules:
        try:
            compiled = compiled_pattern(pattern)
        except re.error:
            continue
        if compiled.search(text):
            return RuleMatch(rule_id=rule_id, intent=intent, pattern=pattern)
    return None
