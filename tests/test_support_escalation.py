"""escalate_to_human: a ticket that needs a person waits for one; the answer is merged over the ticket."""

from __future__ import annotations

from typing import Any

import pytest

from orchestration.models import Run
from orchestration.services import start_run
from skills.support.escalation import escalation_reasons

from .conftest import wait_for_run
from .test_human_in_the_loop import sweep_after, waiting

DRAFT = "Sorry about the double charge: the duplicate is refunded within 5 days."
ANGRY = {
    "content": "You charged me TWICE. This is outrageous!!!",
    "intent": "billing",
    "confidence": 0.91,
    "route": "billing",
    "sentiment": {"compound": -0.82, "label": "negative", "angry": True},
    "reply": DRAFT,
}
CALM = {**ANGRY, "sentiment": {"compound": 0.1, "label": "neutral", "angry": False}}


def spec_for(ticket: dict[str, Any], **args: Any) -> dict[str, Any]:
    return {
        "chain": [
            {"skill": "echo", "args": {"value": ticket}},
            {"skill": "escalate_to_human", "id": "ask", "args": args},
        ]
    }


@pytest.mark.parametrize(
    ("ticket", "args", "reasons"),
    [
        (CALM, {}, []),
        (ANGRY, {}, ["angry customer (sentiment -0.82)"]),
        ({**CALM, "route": "escalate", "confidence": 0.3}, {}, ["uncertain intent (billing, confidence 0.30)"]),
        ({**CALM, "confidence": 0.5}, {"min_confidence": 0.6}, ["uncertain intent (billing, confidence 0.50)"]),
        (CALM, {"always": True, "reason": "complaint"}, ["complaint"]),
        ({"content": "hello"}, {}, []),
    ],
)
def test_who_is_escalated_and_why(ticket, args, reasons):
    assert escalation_reasons(ticket, args) == reasons


@pytest.mark.worker
def test_a_calm_confident_ticket_passes_on_without_waiting(worker, user):
    run = wait_for_run(start_run(owner=user, spec=spec_for(CALM)))

    assert run.status == "succeeded"
    assert run.output == {**CALM, "escalated": False}


@pytest.mark.worker
def test_an_angry_customer_waits_for_a_person_whose_reply_replaces_the_draft(worker, user, api):
    run = waiting(start_run(owner=user, spec=spec_for(ANGRY)))

    prompt = api.get(f"/api/runs/{run.pk}/").data["awaiting_input"]["prompt"]
    assert "angry customer" in prompt
    assert DRAFT in prompt
    assert ANGRY["content"] in prompt
    mine = "I am sorry. I refunded the second charge myself; you will see it in 2 days."
    response = api.post(f"/api/runs/{run.pk}/resume/", {"payload": {"reply": mine}}, format="json")

    assert response.status_code == 202, response.data
    run = wait_for_run(run)
    assert run.status == "succeeded"
    assert run.output == {
        **ANGRY,
        "reply": mine,
        "escalated": True,
        "escalation": {"reasons": ["angry customer (sentiment -0.82)"]},
        "human_review": "answered",
    }


@pytest.mark.worker
def test_an_unanswered_escalation_sends_the_draft_after_its_timeout(worker, user):
    run = waiting(start_run(owner=user, spec=spec_for(CALM, always=True, reason="complaint", timeout=1)))

    sweep_after(run)

    run = wait_for_run(Run.objects.get(pk=run.pk))
    assert run.status == "succeeded"
    assert run.output == {
        **CALM,
        "escalated": True,
        "escalation": {"reasons": ["complaint"]},
        "human_review": "timed out",
    }


@pytest.mark.worker
def test_a_bad_timeout_is_named(worker, user):
    run = wait_for_run(start_run(owner=user, spec=spec_for(ANGRY, timeout="soon")))

    assert run.status == "failed"
    assert "escalate_to_human: args.timeout must be a positive number of seconds, not 'soon'" in run.error
