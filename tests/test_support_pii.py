"""mask_pii: personal data is masked; order numbers, prices and dates are not; intake never stores the raw text."""

from __future__ import annotations

import json

import pytest
from django.apps import apps

from orchestration.models import Message, Run
from orchestration.services import start_run
from orchestration.spec import first_skill
from skills.registry import SkillContext, SkillError
from skills.support.pii import luhn_valid, mask, mask_pii

from .conftest import wait_for_run
from .factories import ConversationFactory, WorkflowFactory

RAW_EMAIL = "jane.doe+billing@example.co.uk"
MESSAGE = (
    f"I am {RAW_EMAIL}, call me on +1 (555) 010-2030 about order 1042: you charged my card 4111 1111 1111 1111 twice"
)


def context() -> SkillContext:
    return SkillContext(run_id=1, step_id=1, step_key="mask", conversation_id=None, state={}, args={}, attempt=1)


@pytest.mark.parametrize(
    ("text", "masked", "counts"),
    [
        # emails
        ("write to jane.doe@example.com today", "write to [email] today", {"email": 1}),
        (f"{RAW_EMAIL}.", "[email].", {"email": 1}),
        ("a@b.io and x_y@mail.example.org", "[email] and [email]", {"email": 2}),
        # phones, international and local
        ("call +1 (555) 010-2030 now", "call [phone] now", {"phone": 1}),
        ("+44 20 7946 0958", "[phone]", {"phone": 1}),
        ("+49 30 1234567 or +33 1 23 45 67 89", "[phone] or [phone]", {"phone": 2}),
        ("ring 020 7946 0958 or 07700 900123", "ring [phone] or [phone]", {"phone": 2}),
        ("US: 555-010-2030, (555) 010-2030, 555.010.2030", "US: [phone], [phone], [phone]", {"phone": 3}),
        ("toll free 1-800-555-0199", "toll free [phone]", {"phone": 1}),
        ("555 010 2030", "[phone]", {"phone": 1}),
        # payment cards (Luhn-valid), in the usual groupings
        ("card 4111 1111 1111 1111", "card [card]", {"card": 1}),
        ("4111-1111-1111-1111 and 5500005555555559", "[card] and [card]", {"card": 2}),
        ("amex 3782 822463 10005", "amex [card]", {"card": 1}),
        # id numbers
        ("SSN 123-45-6789", "SSN [id]", {"id": 1}),
        ("IBAN GB82 WEST 1234 5698 7654 32", "IBAN [id]", {"id": 1}),
        ("to DE89370400440532013000 please", "to [id] please", {"id": 1}),
        ("my NI number is AB 12 34 56 C", "my NI number is [id]", {"id": 1}),
        ("passport number is X12345678", "passport number is [id]", {"id": 1}),
        ("Passport no. 533401987, national id: 8001015009087", "Passport no. [id], national id: [id]", {"id": 2}),
        ("driver's licence: SMITH751212J99AB", "driver's licence: [id]", {"id": 1}),
        # several kinds at once
        (
            MESSAGE,
            MESSAGE.replace(RAW_EMAIL, "[email]")
            .replace("+1 (555) 010-2030", "[phone]")
            .replace("4111 1111 1111 1111", "[card]"),
            {"email": 1, "phone": 1, "card": 1},
        ),
    ],
)
def test_it_masks_personal_data(text, masked, counts):
    assert mask(text) == (masked, counts)


@pytest.mark.parametrize(
    "text",
    [
        "Where is order 1042?",
        "order #20931 and #1042",
        "order number 5512 never arrived",
        "it cost $1,042.50, then 1042.00 EUR, then 12,999",
        "delivered on 2024-03-15 at 10:30, or 15/03/2024, or 03.15.2024",
        "tracking 1234567890123",  # 13 digits, fails Luhn: not a card
        "4111 1111 1111 1112",  # a card's shape with a wrong check digit
        "0000 0000 0000 0000",
        "ref 12345678901234567",
        "a bare 5550102030 is as likely a tracking number",
        "call me at 555 0100",  # too short to be sure
        "version 1.2.3, 3-4 days, 12-15 items",
        "ISBN 978-3-16-148410-0",
        "IBAN GB82 WEST 1234 5698 7654 33",  # mod-97 fails
        "SSN 000-12-3456 is never issued, nor 666-12-3456",
        "my passport expired, my licence is valid",
        "+12 3 is not a number",
        "[email] [phone] [card] [id]",  # masking masked text changes nothing
        "I was CHARGED TWICE!!! This is outrageous",
    ],
)
def test_it_leaves_what_is_not_personal_data(text):
    assert mask(text) == (text, {})


@pytest.mark.parametrize(
    ("number", "valid"),
    [("4111111111111111", True), ("79927398713", True), ("79927398710", False), ("0000000000000", False)],
)
def test_luhn(number, valid):
    assert luhn_valid(number) is valid


def test_a_long_message_is_masked_quickly():
    hostile = "+" + "1 " * 20_000 + "a." * 20_000 + "(555) " * 10_000 + "4" * 20_000

    masked, _ = mask(hostile)  # the test's timeout (pyproject) fails it if a pattern backtracks badly

    assert masked


def test_the_skill_masks_the_content_and_adds_to_earlier_counts():
    ticket = {"content": "mail a@b.io or c@d.io", "conversation_id": 3, "pii": {"email": 1, "phone": 2}}

    assert mask_pii(context(), ticket) == {
        "content": "mail [email] or [email]",
        "conversation_id": 3,
        "pii": {"email": 3, "phone": 2},
    }


def test_a_ticket_without_content_is_refused():
    with pytest.raises(SkillError, match='the ticket has no "content" string'):
        mask_pii(context(), {"intent": "billing"})


@pytest.mark.parametrize(
    ("spec", "first"),
    [
        ({"skill": "mask_pii"}, "mask_pii"),
        ({"chain": [{"chain": [{"skill": "mask_pii"}, {"skill": "echo"}]}, {"skill": "echo"}]}, "mask_pii"),
        ({"chain": [{"skill": "echo"}, {"skill": "mask_pii"}]}, "echo"),
        ({"group": [{"skill": "mask_pii"}, {"skill": "echo"}]}, None),
        ({"chord": {"header": [{"skill": "mask_pii"}], "body": {"skill": "echo"}}}, None),
    ],
)
def test_the_first_step_of_a_spec(spec, first):
    assert first_skill(spec) == first


@pytest.mark.worker
def test_it_runs_as_a_step(worker, user):
    # echo first: the run's input is stored as given, and the step itself masks it.
    spec = {"chain": [{"skill": "echo"}, {"skill": "mask_pii", "id": "mask"}]}

    run = wait_for_run(start_run(owner=user, spec=spec, input={"content": MESSAGE}))

    assert run.status == "succeeded", run.error
    output = run.output or {}
    assert output["pii"] == {"email": 1, "phone": 1, "card": 1}
    assert RAW_EMAIL not in output["content"]
    assert "order 1042" in output["content"]


def database_text() -> str:
    """Every row of every table, as text."""
    rows = [list(model._default_manager.values()) for model in apps.get_models()]
    return json.dumps(rows, default=str)


@pytest.mark.worker
def test_a_message_is_masked_before_it_is_stored(worker, api, user):
    conversation = ConversationFactory.create(owner=user)
    spec = {"chain": [{"chain": [{"skill": "mask_pii"}, {"skill": "sentiment"}]}, {"skill": "echo", "id": "reply"}]}

    response = api.post(
        f"/api/conversations/{conversation.pk}/messages/", {"content": MESSAGE, "spec": spec}, format="json"
    )

    assert response.status_code == 202, response.content
    assert "[email]" in response.json()["message"]["content"]
    run = wait_for_run(Run.objects.get(pk=response.json()["run"]["id"]))
    assert run.status == "succeeded", run.error
    stored = Message.objects.get(run=run, role="user")
    assert stored.content == mask(MESSAGE)[0]
    assert run.input == {
        "content": mask(MESSAGE)[0],
        "conversation_id": conversation.pk,
        "pii": {"email": 1, "phone": 1, "card": 1},
    }
    assert (run.output or {})["pii"] == {
        "email": 1,
        "phone": 1,
        "card": 1,
    }  # the step adds nothing to the intake's count
    everything = database_text()
    for raw in (RAW_EMAIL, "010-2030", "4111 1111 1111 1111"):
        assert raw not in everything


@pytest.mark.worker
def test_a_message_for_a_run_that_does_not_mask_is_stored_as_sent(worker, api, user):
    conversation = ConversationFactory.create(owner=user)

    response = api.post(
        f"/api/conversations/{conversation.pk}/messages/",
        {"content": MESSAGE, "spec": {"chain": [{"skill": "echo"}, {"skill": "mask_pii"}]}},
        format="json",
    )

    run = wait_for_run(Run.objects.get(pk=response.json()["run"]["id"]))
    assert run.status == "succeeded", run.error
    assert run.input == {"content": MESSAGE, "conversation_id": conversation.pk}
    assert (run.output or {})["content"] == mask(MESSAGE)[0]


@pytest.mark.django_db
def test_a_message_for_a_named_workflow_that_masks_is_stored_masked(api, user):
    conversation = ConversationFactory.create(owner=user)
    workflow = WorkflowFactory.create(owner=user, spec={"chain": [{"skill": "mask_pii"}, {"skill": "echo"}]})

    response = api.post(
        f"/api/conversations/{conversation.pk}/messages/",
        {"content": f"I am {RAW_EMAIL}", "workflow": workflow.name},
        format="json",
    )

    assert response.status_code == 202, response.content
    run = Run.objects.get(pk=response.json()["run"]["id"])
    assert run.input == {"content": "I am [email]", "conversation_id": conversation.pk, "pii": {"email": 1}}
    assert Message.objects.get(run=run).content == "I am [email]"
