"""``quality_check``: is the drafted reply grounded, civil and of a sensible length?

It scores the ticket's ``reply`` against the ``articles`` it cites (grounding, tone, length, their weighted
``score``, ``passed``) and remembers it in the conversation's state. See docs/skills.md, "quality_check".
"""

from __future__ import annotations

import re
from typing import Any

from skills.registry import SkillContext, SkillError, skill

from .sentiment import analyzer
from .text import content_words, sentences, words
from .ticket import Ticket, ticket_of

WEIGHTS = {"grounding": 0.5, "tone": 0.3, "length": 0.2}
MIN_SCORE = 0.6
MIN_WORDS, MAX_WORDS = 20, 180
SUPPORTED_SENTENCE = 0.5  # share of a sentence's content words the articles must have
RUDE_PENALTY = 0.4
# compose_reply ends its reply with this line: it names the articles, it is not a claim to ground.
SOURCES_LINE = re.compile(r"(?:^|\n)[ \t]*sources?:[^\n]*\s*\Z", re.IGNORECASE)
RUDE = (
    "your fault",
    "you should have",
    "you failed to",
    "you didn't read",
    "you did not read",
    "as i already said",
    "as i said before",
    "obviously",
    "calm down",
    "not our problem",
    "stupid",
    "idiot",
    "deal with it",
)


def grounding(reply: str, articles: list[dict[str, Any]]) -> float:
    known = set(content_words(" ".join(f"{a.get('title', '')} {a.get('text', '')}" for a in articles)))
    said = content_words(reply)
    if not known or not said:
        return 0.0
    word_share = sum(w in known for w in said) / len(said)
    claims = [cw for s in sentences(reply) if len(cw := content_words(s)) >= 3]
    if not claims:
        return round(word_share, 4)
    supported = sum(sum(w in known for w in cw) / len(cw) >= SUPPORTED_SENTENCE for cw in claims)
    return round((word_share + supported / len(claims)) / 2, 4)


def tone(reply: str) -> float:
    compound = analyzer().polarity_scores(reply)["compound"]
    lowered = " ".join(words(reply))
    rude = sum(phrase in lowered for phrase in RUDE)
    return round(max(0.0, 1.0 - max(0.0, -compound) / 2 - RUDE_PENALTY * rude), 4)


def length(reply: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> float:
    count = len(words(reply))
    if count < min_words:
        return round(count / min_words, 4)
    return round(max(0.0, 1.0 - max(0, count - max_words) / max_words), 4)


def quality_of(reply: str, articles: list[dict[str, Any]], args: dict[str, Any]) -> dict[str, Any]:
    """``{"score", "grounding", "tone", "length", "passed"}`` for ``reply`` against ``articles``."""
    body = SOURCES_LINE.sub("", reply)
    parts = {
        "grounding": grounding(body, articles),
        "tone": tone(body),
        "length": length(body, _whole(args, "min_words", MIN_WORDS), _whole(args, "max_words", MAX_WORDS)),
    }
    score = round(sum(WEIGHTS[name] * value for name, value in parts.items()), 4)
    return {"score": score, **parts, "passed": score >= _min_score(args)}


def cited_articles(ticket: Ticket) -> list[dict[str, Any]]:
    """The articles the reply cites (``cited`` slugs), or all of them when it names none."""
    articles = ticket.get("articles") or []
    if not isinstance(articles, list) or not all(isinstance(a, dict) for a in articles):
        raise SkillError('quality_check: "articles" must be a list of objects', transient=False)
    cited = ticket.get("cited")
    if isinstance(cited, list) and cited:
        return [a for a in articles if a.get("slug") in cited]
    return articles


def _min_score(args: dict[str, Any]) -> float:
    value = args.get("min_score", MIN_SCORE)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise SkillError(f"quality_check: args.min_score must be a number from 0 to 1, not {value!r}", transient=False)
    return float(value)


def _whole(args: dict[str, Any], name: str, default: int) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SkillError(f"quality_check: args.{name} must be a positive whole number, not {value!r}", transient=False)
    return value


@skill(
    description="Adds quality: {score, grounding, tone, length, passed} for the drafted reply against the "
    "articles it cites (passed at score >= args.min_score, default 0.6), and remembers it and the intent "
    "in the conversation's state.",
    soft_time_limit=5,
    time_limit=10,
)
def quality_check(ctx: SkillContext, input: Any) -> Any:
    ticket = ticket_of(input)
    reply = ticket.get("reply")
    if not isinstance(reply, str):
        raise SkillError('quality_check: the ticket has no "reply" string (compose_reply\'s draft)', transient=False)
    quality = quality_of(reply, cited_articles(ticket), ctx.args)
    ctx.remember(quality=quality, last_intent=ticket.get("intent"))
    return {**ticket, "quality": quality}
