"""sentiment: VADER's compound and label for the customer's message, and whether they are angry."""

from __future__ import annotations

import pytest

from orchestration.services import start_run
from skills.registry import SkillContext, SkillError
from skills.support.sentiment import analyzer, sentiment, sentiment_of, shouting

from .conftest import wait_for_run


def context(**args) -> SkillContext:
    return SkillContext(run_id=1, step_id=1, step_key="mood", conversation_id=None, state={}, args=args, attempt=1)


@pytest.mark.parametrize(
    ("text", "label", "angry"),
    [
        ("You charged me TWICE. This is outrageous!!!", "negative", True),
        ("WHERE IS MY ORDER!!!", "neutral", True),  # VADER: 0.0; shouting with !!! says otherwise
        ("why has nobody answered me, THREE DAYS!!", "neutral", True),
        ("This is unacceptable, I want a refund now.", "negative", True),  # -0.40, and outrage
        ("Worst service ever. I hate this company.", "negative", True),  # -0.83
        ("I am a bit disappointed that the parcel is late.", "negative", False),
        ("I am sorry to bother you, the PDF invoice is missing.", "negative", False),
        ("My parcel arrived today.", "neutral", False),
        ("How do I change the email on my account?", "neutral", False),
        ("THANK YOU SO MUCH!!!", "positive", False),  # shouting, but happy
        ("I love the new app, great job", "positive", False),
        ("", "neutral", False),
    ],
)
def test_it_reads_the_mood_of_real_messages(text, label, angry):
    found = sentiment_of(text)

    assert (found["label"], found["angry"]) == (label, angry)
    assert -1 <= found["compound"] <= 1


def test_the_compound_is_vaders():
    text = "Worst service ever. I hate this company."

    assert sentiment_of(text)["compound"] == round(analyzer().polarity_scores(text)["compound"], 4)


@pytest.mark.parametrize(
    ("text", "shouts"),
    [("You charged me TWICE", True), ("the PDF and the API", False), ("I AM VERY UPSET", True), ("ok", False)],
)
def test_shouting(text, shouts):
    assert shouting(text) is shouts


def test_the_analyzer_is_loaded_once():
    assert analyzer() is analyzer()


def test_a_lower_angry_at_takes_more_to_anger():
    text = "Worst service ever. I hate this company."

    assert sentiment(context(angry_at=-0.9), {"content": text})["sentiment"]["angry"] is False
    assert sentiment(context(), {"content": text})["sentiment"]["angry"] is True


def test_it_adds_sentiment_to_the_ticket():
    ticket = {"content": "I love the new app, great job", "intent": "general"}

    out = sentiment(context(), ticket)

    assert out == {
        **ticket,
        "sentiment": {"compound": out["sentiment"]["compound"], "label": "positive", "angry": False},
    }


@pytest.mark.parametrize("angry_at", ["low", True, -2, 1.5])
def test_a_bad_angry_at_is_named(angry_at):
    with pytest.raises(SkillError, match=r"sentiment: args.angry_at must be a number from -1 to 1") as raised:
        sentiment(context(angry_at=angry_at), {"content": "hello"})
    assert raised.value.transient is False


def test_a_ticket_without_content_is_refused():
    with pytest.raises(SkillError, match='the ticket has no "content" string'):
        sentiment(context(), {"reply": "hello"})


@pytest.mark.worker
def test_it_runs_as_a_step_in_a_chord_header(worker, user):
    ticket = {"content": "You charged me TWICE. This is outrageous!!!", "conversation_id": None}
    spec = {"chord": {"header": [{"skill": "sentiment"}, {"skill": "extract_order"}], "body": {"skill": "echo"}}}

    run = wait_for_run(start_run(owner=user, spec=spec, input=ticket))

    assert run.status == "succeeded", run.error
    merged: dict = {}
    for part in run.output or []:
        merged.update(part)
    assert merged["sentiment"]["label"] == "negative"
    assert merged["sentiment"]["angry"] is True
    assert merged["order_id"] is None


@pytest.mark.worker
def test_a_bad_angry_at_fails_the_step_at_once(worker, user):
    run = wait_for_run(
        start_run(owner=user, spec={"skill": "sentiment", "args": {"angry_at": "low"}}, input={"content": "hi"})
    )

    assert run.status == "failed"
    assert "sentiment: args.angry_at must be a number from -1 to 1, not 'low'" in run.error
