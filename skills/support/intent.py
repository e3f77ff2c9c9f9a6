"""``classify_intent``: what a customer's message is about, how sure we are, how urgent it is, and where it goes.

Three stages, cheapest and most trusted first: the database's rules (``rules``), the offline model
(``intent_model``), then the LLM when one is configured and the model is unsure (``llm``).
What the ticket gains: docs/skills.md, "classify_intent".
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from skills.models import Intent, IntentRule
from skills.registry import SkillContext, SkillError, skill

from . import llm
from .intent_model import HELDOUT_FILE, labelled_rows, predict
from .rules import RULE_CONFIDENCE, matching_rule
from .ticket import content_of, ticket_of
from .urgency import urgency_of

DEFAULT_MIN_CONFIDENCE = 0.5  # escalate_to_human's default floor too
ESCALATE = "escalate"
LLM_SYSTEM_PROMPT = (
    "You classify one customer-support message of an online shop. Choose exactly one intent:\n"
    "- faq: how things work: shipping times, order status and tracking, returns and exchanges, "
    "accounts, vouchers, policies\n"
    "- technical: the website or app fails: logins, passwords, codes, errors, crashes, pages that do not work\n"
    "- billing: money already involved: charges, double charges, refunds owed, invoices, receipts, payments\n"
    "- complaint: the customer is dissatisfied or angry about the service, staff, delivery or quality\n"
    "- sales: before buying: products, stock, sizes, comparisons, recommendations, discounts, bulk or business orders\n"
    "- general: greetings, thanks, chit-chat, anything else\n"
    'Answer with a JSON object and nothing else: {"intent": "<one of the six>", "confidence": <a number from 0 to 1>}'
)
JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


@dataclass(frozen=True)
class Decision:
    intent: str
    confidence: float
    source: str  # "rules", "model" or "llm"


@skill(
    description="Adds intent (faq, technical, billing, complaint, sales, general), confidence, urgency, "
    "route (the intent, or escalate under args.min_confidence, default 0.5) and intent_source: "
    "precise rules from the database first, then an offline model, then the LLM if one is configured "
    "and the model is unsure.",
    soft_time_limit=30,
    time_limit=40,
    max_soft_time_limit=60,
    max_time_limit=75,
    retries=1,
    backoff=2,
)
def classify_intent(ctx: SkillContext, input: Any) -> Any:
    ticket = ticket_of(input)
    text = content_of(ticket)
    threshold = min_confidence(ctx.args)
    decision = offline_decision(text)
    extra: dict[str, str] = {}
    if decision.confidence < threshold and llm.configured():
        decision, extra = llm_decision(ctx, text, decision)
    ctx.log.info("intent %s (%.2f) from %s", decision.intent, decision.confidence, decision.source)
    return {
        **ticket,
        "intent": decision.intent,
        "confidence": decision.confidence,
        "urgency": urgency_of(text),
        "route": decision.intent if decision.confidence >= threshold else ESCALATE,
        "intent_source": decision.source,
        **extra,
    }


def min_confidence(args: dict[str, Any]) -> float:
    value = args.get("min_confidence", DEFAULT_MIN_CONFIDENCE)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise SkillError(
            f"classify_intent: args.min_confidence must be a number from 0 to 1, not {value!r}", transient=False
        )
    return float(value)


def offline_decision(text: str) -> Decision:
    """The rules' answer if one matches, else the model's: no network, deterministic."""
    if rule := matching_rule(text, enabled_rules()):
        return Decision(rule.intent, RULE_CONFIDENCE, "rules")
    prediction = predict(text)
    return Decision(prediction.intent, prediction.confidence, "model")


def enabled_rules() -> list[tuple[int, str, str]]:
    """The enabled IntentRules, read afresh (an operator's edit counts at the next message), highest priority first."""
    rules = IntentRule.objects.filter(enabled=True).order_by("-priority", "id")
    return list(rules.values_list("id", "pattern", "intent"))


def llm_decision(ctx: SkillContext, text: str, fallback: Decision) -> tuple[Decision, dict[str, str]]:
    """The LLM's answer; on failure ``fallback`` and ``{"llm_error": why}``."""
    messages = [{"role": "system", "content": LLM_SYSTEM_PROMPT}, {"role": "user", "content": text}]
    try:
        return parsed_llm_answer(llm.chat(ctx, messages, max_tokens=60, temperature=0).text), {}
    except llm.LLMError as exc:
        ctx.log.warning("classify_intent keeps the model's answer: %s", exc)
        return fallback, {"llm_error": str(exc)}


def parsed_llm_answer(text: str) -> Decision:
    """The LLM's ``{"intent", "confidence"}`` (a code fence or words around it are tolerated); LLMError otherwise."""
    found = JSON_OBJECT.search(text)
    try:
        answer = json.loads(found.group(0)) if found else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise _unreadable(f"the LLM's answer is not a JSON object: {text[:200]!r}")
    intent, confidence = answer.get("intent"), answer.get("confidence")
    if intent not in Intent.values:
        raise _unreadable(f"the LLM answered an unknown intent {intent!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 <= confidence <= 1:
        raise _unreadable(f"the LLM answered a confidence that is not a number from 0 to 1: {confidence!r}")
    return Decision(intent, round(float(confidence), 4), "llm")


def _unreadable(message: str) -> llm.LLMError:
    # Asking again would most likely get the same answer: not transient.
    return llm.LLMError(message, transient=False)


def heldout_rows() -> list[dict[str, str]]:
    """The held-out labelled examples (data/intents_heldout.jsonl), never used in training."""
    return labelled_rows(HELDOUT_FILE)


def evaluate(rows: list[dict[str, str]], threshold: float = DEFAULT_MIN_CONFIDENCE) -> dict[str, Any]:
    """How the offline classifier (the database's rules, then the model; no LLM) does on labelled ``rows``.

    Returns n, accuracy, escalated (the share under ``threshold``), accuracy_not_escalated, per_intent, by_source.
    """
    decisions = [offline_decision(row["text"]) for row in rows]
    right = [decision.intent == row["intent"] for decision, row in zip(decisions, rows, strict=True)]
    confident = [hit for hit, decision in zip(right, decisions, strict=True) if decision.confidence >= threshold]
    return {
        "n": len(rows),
        "accuracy": _share(sum(right), len(rows)),
        "escalated": _share(len(rows) - len(confident), len(rows)),
        "accuracy_not_escalated": _share(sum(confident), len(confident)),
        "per_intent": _per_intent([row["intent"] for row in rows], [d.intent for d in decisions]),
        "by_source": _by_source(decisions, right),
    }


def _per_intent(truth: list[str], predicted: list[str]) -> dict[str, dict[str, float | int]]:
    hits = Counter(t for t, p in zip(truth, predicted, strict=True) if t == p)
    actual, guessed = Counter(truth), Counter(predicted)
    return {
        intent: {
            "precision": _share(hits[intent], guessed[intent]),
            "recall": _share(hits[intent], actual[intent]),
            "n": actual[intent],
        }
        for intent in Intent.values
    }


def _by_source(decisions: list[Decision], right: list[bool]) -> dict[str, dict[str, float | int]]:
    tally: dict[str, list[bool]] = defaultdict(list)
    for decision, hit in zip(decisions, right, strict=True):
        tally[decision.source].append(hit)
    return {source: {"n": len(hits), "accuracy": _share(sum(hits), len(hits))} for source, hits in tally.items()}


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0
