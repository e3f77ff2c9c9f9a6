"""quality_check: the draft is scored for grounding in its articles, tone and length; the conversation remembers it."""

from __future__ import annotations

from typing import Any

import pytest

from orchestration.double_texting import OnActive
from orchestration.models import Conversation
from orchestration.services import prepare_run, start_conversation_run, start_run
from skills.registry import SkillContext, SkillError
from skills.support.quality import length, quality_check, quality_of

from .conftest import wait_for_run
from .factories import ConversationFactory

DOUBLE_CHARGE = {
    "slug": "double-charge",
    "title": "Charged twice for one order",
    "category": "billing",
    "score": 0.82,
    "text": "If you see two charges for one order, the second is usually a pending authorisation that your bank "
    "releases within 3 to 5 business days. If both charges have settled, we refund the duplicate automatically "
    "within 5 business days of the order shipping. You can see refunds under Account > Billing > Payments. "
    "Contact us with the order number if the duplicate is still there after 7 days.",
}
RETURNS = {
    "slug": "returns",
    "title": "Returning an item",
    "category": "returns",
    "score": 0.31,
    "text": "Items can be returned within 30 days of delivery in their original packaging. Start a return from "
    "Account > Orders, print the label and drop the parcel at any post office.",
}
SOURCES = "\n\nSources: Charged twice for one order (double-charge)"
COPIED = (
    "Hi Jane,\n\nIf both charges have settled, we refund the duplicate automatically within 5 business days of "
    "the order shipping. If you see two charges for one order, the second is usually a pending authorisation "
    "that your bank releases within 3 to 5 business days. You can see refunds under Account > Billing > Payments."
    + SOURCES
)
PARAPHRASED = (
    "Hi Jane, sorry about the double charge on order 1042. The second charge is usually a pending authorisation "
    "that your bank releases within 3 to 5 business days. If both charges settled, we refund the duplicate "
    "automatically within 5 business days, and you can see it under Account > Billing > Payments." + SOURCES
)
OFF_TOPIC = (
    "Hi Jane, our new smartwatch has a brighter display, a longer battery life and comes in three colours. "
    "It ships worldwide and includes a two year warranty with free upgrades for premium members of our club."
)
RUDE = (
    "Obviously this is your fault: you should have read the billing page. The second charge is a pending "
    "authorisation that your bank releases within 3 to 5 business days. Deal with it and stop writing to us."
)


def context(conversation_id: int | None = None, **args: Any) -> SkillContext:
    return SkillContext(
        run_id=1, step_id=1, step_key="qa", conversation_id=conversation_id, state={}, args=args, attempt=1
    )


def ticket(reply: str, articles: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": "I was charged twice for order 1042", "intent": "billing", "articles": articles, "reply": reply}


def test_a_reply_copied_from_its_article_scores_high():
    quality = quality_of(COPIED, [DOUBLE_CHARGE], {})

    assert quality["grounding"] > 0.95
    assert quality["length"] == 1.0
    assert quality["score"] > 0.85
    assert quality["passed"] is True


def test_a_faithful_paraphrase_passes():
    quality = quality_of(PARAPHRASED, [DOUBLE_CHARGE], {})

    assert 0.6 < quality["grounding"] < 0.95
    assert quality["tone"] > 0.7
    assert quality["passed"] is True


def test_a_reply_with_no_articles_is_not_grounded():
    quality = quality_of(COPIED, [], {})

    assert quality["grounding"] == 0.0
    assert quality["passed"] is False


def test_a_reply_about_something_else_fails():
    quality = quality_of(OFF_TOPIC, [DOUBLE_CHARGE], {})

    assert quality["grounding"] < 0.1
    assert quality["tone"] == 1.0
    assert quality["passed"] is False


def test_a_blaming_reply_fails_on_tone():
    quality = quality_of(RUDE, [DOUBLE_CHARGE], {})

    assert quality["tone"] == 0.0
    assert quality["passed"] is False


def test_the_score_is_the_weighted_mean():
    quality = quality_of(PARAPHRASED, [DOUBLE_CHARGE], {})

    expected = 0.5 * quality["grounding"] + 0.3 * quality["tone"] + 0.2 * quality["length"]
    assert quality["score"] == pytest.approx(expected, abs=1e-4)


def test_the_sources_line_is_neither_grounding_nor_length():
    assert quality_of(COPIED, [DOUBLE_CHARGE], {}) == quality_of(COPIED.removesuffix(SOURCES), [DOUBLE_CHARGE], {})


@pytest.mark.parametrize(
    ("count", "score"), [(0, 0.0), (10, 0.5), (20, 1.0), (100, 1.0), (180, 1.0), (270, 0.5), (360, 0.0), (500, 0.0)]
)
def test_length_is_one_within_the_range_and_falls_off_outside(count, score):
    assert length(" ".join(["word"] * count)) == score


def test_the_skill_scores_against_the_cited_articles_only():
    cites_returns = {**ticket(COPIED, [DOUBLE_CHARGE, RETURNS]), "cited": ["returns"]}
    cites_both = {**ticket(COPIED, [DOUBLE_CHARGE, RETURNS]), "cited": ["double-charge", "returns"]}

    assert quality_check(context(), cites_returns)["quality"]["passed"] is False
    assert quality_check(context(), cites_both)["quality"]["passed"] is True


def test_the_skill_adds_quality_to_the_ticket():
    given = ticket(PARAPHRASED, [DOUBLE_CHARGE])

    out = quality_check(context(), given)

    assert out == {**given, "quality": quality_of(PARAPHRASED, [DOUBLE_CHARGE], {})}


def test_min_score_decides_what_passes():
    assert quality_check(context(min_score=0.95), ticket(PARAPHRASED, [DOUBLE_CHARGE]))["quality"]["passed"] is False
    assert quality_check(context(min_score=0.3), ticket(OFF_TOPIC, [DOUBLE_CHARGE]))["quality"]["passed"] is True


@pytest.mark.parametrize(
    ("given", "args", "error"),
    [
        ({"content": "hi"}, {}, 'quality_check: the ticket has no "reply" string'),
        ({"reply": "hi", "articles": "faq"}, {}, 'quality_check: "articles" must be a list of objects'),
        ({"reply": "hi"}, {"min_score": 2}, "quality_check: args.min_score must be a number from 0 to 1, not 2"),
        ({"reply": "hi"}, {"max_words": 0}, "quality_check: args.max_words must be a positive whole number, not 0"),
    ],
)
def test_bad_input_is_named(given, args, error):
    with pytest.raises(SkillError, match=error) as raised:
        quality_check(context(**args), given)
    assert raised.value.transient is False


@pytest.mark.worker
def test_the_conversation_remembers_the_quality_and_the_intent(worker, user):
    conversation = ConversationFactory.create(owner=user)
    given = {**ticket(PARAPHRASED, [DOUBLE_CHARGE]), "conversation_id": conversation.pk}

    new = prepare_run(owner=user, conversation=conversation, spec={"skill": "quality_check"}, input=given)
    run, _ = start_conversation_run(conversation=conversation, on_active=OnActive.ENQUEUE, new=new)
    run = wait_for_run(run)

    assert run.status == "succeeded", run.error
    quality = (run.output or {})["quality"]
    assert quality == quality_of(PARAPHRASED, [DOUBLE_CHARGE], {})
    state = Conversation.objects.get(pk=conversation.pk).state
    assert state["quality"] == quality
    assert state["last_intent"] == "billing"


@pytest.mark.worker
def test_it_ends_a_chain_of_support_skills(worker, user):
    draft = {**ticket(OFF_TOPIC, [DOUBLE_CHARGE]), "content": "Mail me at jane@example.com, you charged me TWICE!!!"}
    spec = {"chain": [{"skill": "mask_pii"}, {"skill": "sentiment"}, {"skill": "quality_check"}]}

    run = wait_for_run(start_run(owner=user, spec=spec, input=draft))

    assert run.status == "succeeded", run.error
    output = run.output or {}
    assert output["content"] == "Mail me at [email], you charged me TWICE!!!"
    assert output["sentiment"]["angry"] is True
    assert output["quality"]["passed"] is False
