"""``escalate_to_human``: a person reviews the drafted reply when the agent should not answer alone.

When the spec says so, the intent is uncertain or the customer is angry, the step waits (``ctx.wait``)
for a person to approve or replace the draft; any other ticket passes on with ``escalated: false``.
See docs/skills.md, "escalate_to_human".
"""

from __future__ import annotations

from typing import Any

from skills.registry import SkillContext, SkillError, skill

from .ticket import Ticket, ticket_of

MIN_CONFIDENCE = 0.5  # classify_intent routes to "escalate" below this too
DEFAULT_TIMEOUT = 1800.0
DRAFT_IN_PROMPT = 1500  # characters of the draft shown in the prompt


@skill(
    description="Waits for a person to approve or rewrite the drafted reply when the ticket is a "
    "complaint (args.always), its intent is uncertain, or the customer is angry; "
    "otherwise passes the ticket on (escalated: false).",
    soft_time_limit=10,
    time_limit=20,
)
def escalate_to_human(ctx: SkillContext, input: Any) -> Any:
    ticket = ticket_of(input)
    reasons = escalation_reasons(ticket, ctx.args)
    if not reasons:
        return {**ticket, "escalated": False}
    base = {**ticket, "escalated": True, "escalation": {"reasons": reasons}, "human_review": "answered"}
    timeout = _timeout(ctx.args.get("timeout", DEFAULT_TIMEOUT))
    return ctx.wait(prompt(ticket, reasons), timeout, default={"human_review": "timed out"}, base=base)


def escalation_reasons(ticket: Ticket, args: dict[str, Any]) -> list[str]:
    """Why a person should look at this ticket; empty when the agent may answer alone."""
    reasons = []
    if args.get("always"):
        reasons.append(str(args.get("reason") or "always escalated on this route"))
    confidence = ticket.get("confidence")
    threshold = float(args.get("min_confidence", MIN_CONFIDENCE))
    if ticket.get("route") == "escalate" or (isinstance(confidence, int | float) and confidence < threshold):
        reasons.append(f"uncertain intent ({ticket.get('intent', 'unknown')}, confidence {_number(confidence)})")
    sentiment = ticket.get("sentiment")
    if isinstance(sentiment, dict) and sentiment.get("angry"):
        reasons.append(f"angry customer (sentiment {_number(sentiment.get('compound'))})")
    return reasons


def prompt(ticket: Ticket, reasons: list[str]) -> str:
    """What the reviewer reads: why, the customer's message and the draft."""
    draft = str(ticket.get("reply") or "(no draft)")
    if len(draft) > DRAFT_IN_PROMPT:
        draft = draft[:DRAFT_IN_PROMPT] + "..."
    return (
        f"Review the reply before it is sent ({'; '.join(reasons)}).\n"
        f"Customer: {ticket.get('content', '')}\n"
        f"Draft: {draft}\n"
        'Answer {} to send the draft, or {"reply": "..."} to send your own.'
    )


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise SkillError(f"escalate_to_human: args.timeout must be a positive number of seconds, not {value!r}")
    return float(value)


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "unknown"
