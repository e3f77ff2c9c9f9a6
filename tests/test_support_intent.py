"""classify_intent: rules from the database, then the offline model, then the LLM; urgency; held-out accuracy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from orchestration.services import start_run
from skills.models import IntentRule
from skills.registry import SkillContext, SkillError
from skills.support.intent import classify_intent, evaluate, heldout_rows, offline_decision
from skills.support.intent_model import TRAINING_FILE, labelled_rows
from skills.support.rules import seed_rules
from skills.support.urgency import urgency_of

from .conftest import wait_for_run, worker_instead
from .llm_server import FakeLLM, Reply, serving

# Clear messages no seeded rule catches, so the model decides (none is in the training set).
MODEL_EXAMPLES = [
    ("How many days does delivery to Wales take?", "faq"),
    ("The app shows an empty screen when I open my orders.", "technical"),
    ("I returned the lamp two weeks ago and the refund is not in my account.", "billing"),
    ("I'm really disappointed, the courier was rude and the box was crushed.", "complaint"),
    ("Is this jacket available in a medium in navy?", "sales"),
    ("Thanks, have a nice evening!", "general"),
]


def context(**args: Any) -> SkillContext:
    return SkillContext(
        run_id=3, step_id=5, step_key="intent", conversation_id=None, state={}, args=args, attempt=1, soft_time_limit=30
    )


def classify(content: str, **args: Any) -> dict[str, Any]:
    return classify_intent(context(**args), {"content": content, "conversation_id": 1})


@pytest.fixture
def rules(db: None) -> None:
    """The seeded rules (a flushed database has lost those of the migration)."""
    seed_rules(IntentRule)


def answering(intent: str, confidence: float) -> FakeLLM:
    return FakeLLM(answer=lambda body: json.dumps({"intent": intent, "confidence": confidence}))


@pytest.mark.parametrize(
    ("content", "intent"),
    [
        ("You charged me twice for order 1042!", "billing"),
        ("I was double-charged for my shoes", "billing"),
        ("I need a password reset, the email never came", "technical"),
        ("I can't log in since this morning", "technical"),
        ("I want to speak to a manager right now", "complaint"),
        ("Do you offer bulk pricing for schools?", "sales"),
        ("What's your return policy on sale items?", "faq"),
        ("Hello!", "general"),
    ],
)
def test_a_seeded_rule_decides_with_high_confidence(rules, content, intent):
    assert classify(content) == {
        "content": content,
        "conversation_id": 1,
        "intent": intent,
        "confidence": 0.95,
        "urgency": urgency_of(content),
        "route": intent,
        "intent_source": "rules",
    }


def test_a_rule_added_in_the_database_takes_effect_at_the_next_message(rules):
    content = "The parcel smells of fish"
    assert classify(content)["intent_source"] == "model"

    IntentRule.objects.create(pattern=r"\bsmells? of\b", intent="complaint", priority=150)

    assert (classify(content)["intent"], classify(content)["intent_source"]) == ("complaint", "rules")


def test_an_edited_rule_takes_effect(rules):
    rule = IntentRule.objects.get(pattern__contains="double[- ]charged")
    rule.intent = "complaint"
    rule.save()

    assert classify("you charged me twice")["intent"] == "complaint"


def test_a_disabled_rule_is_not_used(rules):
    IntentRule.objects.filter(pattern__contains="password reset").update(enabled=False)

    assert classify("I need a password reset")["intent_source"] == "model"


def test_the_highest_priority_rule_wins(rules):
    IntentRule.objects.create(pattern="charged twice", intent="complaint", priority=1)
    assert classify("charged twice!")["intent"] == "billing"

    IntentRule.objects.create(pattern="charged twice", intent="complaint", priority=1000)
    assert classify("charged twice!")["intent"] == "complaint"


def test_a_pattern_broken_outside_the_admin_is_skipped(rules):
    IntentRule.objects.create(pattern="(unclosed", intent="faq", priority=1000)

    assert classify("I can't log in")["intent"] == "technical"


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [("(unclosed", "not a valid regular expression"), ("x*", "matches an empty message")],
)
def test_clean_refuses_a_bad_pattern(pattern, problem):
    with pytest.raises(ValidationError, match=problem) as raised:
        IntentRule(pattern=pattern, intent="faq").full_clean()
    assert list(raised.value.message_dict) == ["pattern"]


def test_every_seeded_pattern_is_valid(rules):
    for rule in IntentRule.objects.all():
        rule.full_clean()


def test_the_admin_lists_and_finds_rules(rules, admin_client):
    response = admin_client.get("/admin/skills/intentrule/", {"q": "manager"})

    assert response.status_code == 200
    assert [rule.intent for rule in response.context["cl"].result_list] == ["complaint"]


def test_a_rule_added_in_the_admin_is_used(rules, admin_client):
    form = {"pattern": r"\bgift receipt\b", "intent": "faq", "priority": 120, "enabled": "on", "note": "asks for one"}

    response = admin_client.post("/admin/skills/intentrule/add/", form)

    assert response.status_code == 302
    assert classify("Can you put a gift receipt in the box?")["intent_source"] == "rules"


def test_the_admin_refuses_an_invalid_pattern(rules, admin_client):
    form = {"pattern": "(refund", "intent": "billing", "priority": 100, "enabled": "on", "note": ""}

    response = admin_client.post("/admin/skills/intentrule/add/", form)

    assert response.status_code == 200
    assert "not a valid regular expression" in response.content.decode()
    assert not IntentRule.objects.filter(pattern="(refund").exists()


@pytest.mark.parametrize(("content", "intent"), MODEL_EXAMPLES)
def test_the_model_classifies_clear_messages(rules, content, intent):
    ticket = classify(content)

    assert (ticket["intent"], ticket["intent_source"]) == (intent, "model")
    assert 0.5 <= ticket["confidence"] <= 1
    assert ticket["route"] == intent


def test_under_min_confidence_the_route_is_escalate(rules):
    content, intent = MODEL_EXAMPLES[0]
    ticket = classify(content, min_confidence=0.99)

    assert (ticket["intent"], ticket["route"], ticket["intent_source"]) == (intent, "escalate", "model")
    assert ticket["confidence"] < 0.99


def test_an_unsure_model_escalates_at_the_default_threshold(rules):
    content = "about the thing from before"
    ticket = classify(content)

    assert ticket["confidence"] < 0.5
    assert ticket["route"] == "escalate"


@pytest.mark.parametrize("value", [1.5, -0.1, "high", True])
def test_a_bad_min_confidence_is_named(rules, value):
    with pytest.raises(SkillError, match=r"args\.min_confidence must be a number from 0 to 1") as raised:
        classify("hello", min_confidence=value)
    assert not raised.value.transient


def test_a_ticket_without_content_is_refused(rules):
    with pytest.raises(SkillError, match='the ticket has no "content" string'):
        classify_intent(context(), {"conversation_id": 1})


@pytest.mark.parametrize(
    ("content", "urgency"),
    [
        ("This is urgent, my order is wrong", "high"),
        ("please fix this ASAP", "high"),
        ("Cancel it immediately", "high"),
        ("My parcel has still not arrived", "high"),
        ("I will be contacting my lawyer", "high"),
        ("I'm going to file a chargeback", "high"),
        ("You charged me again for the same order", "high"),
        ("There are repeated charges on my card", "high"),
        ("No rush, but do you sell gift cards?", "low"),
        ("Just curious, where are you based?", "low"),
        ("It's not urgent, whenever you can", "low"),
        ("Not urgent but I was charged twice", "high"),
        ("Where is my order?", "normal"),
    ],
)
def test_urgency_comes_from_cues(content, urgency):
    assert urgency_of(content) == urgency


def test_the_llm_decides_when_the_model_is_unsure(rules, settings):
    content = MODEL_EXAMPLES[4][0]
    assert offline_decision(content).confidence < 0.999
    with serving(answering("sales", 0.9995)) as fake:
        settings.LLM_BASE_URL, settings.LLM_MODEL = fake.base_url, "fake-model"
        ticket = classify(content, min_confidence=0.999)

    assert (ticket["intent"], ticket["confidence"], ticket["route"], ticket["intent_source"]) == (
        "sales",
        0.9995,
        "sales",
        "llm",
    )
    [request] = fake.requests
    system, user = request.body["messages"]
    assert '{"intent": "<one of the six>"' in system["content"]
    assert user == {"role": "user", "content": content}
    assert request.headers["idempotency-key"] == "3:intent"


def test_an_unsure_llm_still_escalates(rules, settings):
    with serving(answering("billing", 0.4)) as fake:
        settings.LLM_BASE_URL, settings.LLM_MODEL = fake.base_url, "fake-model"
        ticket = classify("about the thing from before")

    assert (ticket["intent"], ticket["confidence"], ticket["route"], ticket["intent_source"]) == (
        "billing",
        0.4,
        "escalate",
        "llm",
    )


def test_a_confident_answer_does_not_ask_the_llm(rules, fake_llm):
    assert classify("I can't log in")["intent_source"] == "rules"
    assert classify(MODEL_EXAMPLES[0][0])["intent_source"] == "model"
    assert fake_llm.requests == []


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(status=503), "the LLM answered HTTP 503"),
        (Reply(text="It is probably billing."), "the LLM's answer is not a JSON object"),
        (Reply(text='{"intent": "refunds", "confidence": 0.9}'), "the LLM answered an unknown intent 'refunds'"),
        (Reply(text='{"intent": "billing", "confidence": "high"}'), "confidence that is not a number from 0 to 1"),
    ],
)
def test_on_an_llm_failure_the_models_answer_stands(rules, fake_llm, reply, error):
    content, intent = MODEL_EXAMPLES[1]
    offline = offline_decision(content)
    fake_llm.script(reply)

    ticket = classify(content, min_confidence=0.999)

    assert (ticket["intent"], ticket["confidence"], ticket["intent_source"]) == (intent, offline.confidence, "model")
    assert ticket["route"] == "escalate"
    assert error in ticket["llm_error"]


def test_an_answer_in_a_code_fence_is_read(rules, fake_llm):
    fake_llm.script(Reply(text='```json\n{"intent": "faq", "confidence": 1}\n```'))

    ticket = classify("about the thing from before")

    assert (ticket["intent"], ticket["confidence"], ticket["intent_source"]) == ("faq", 1.0, "llm")


def test_evaluate_counts_accuracy_per_intent_and_per_source(rules):
    rows = [
        {"text": "I was charged twice", "intent": "billing"},
        {"text": "Hello!", "intent": "faq"},
        {"text": MODEL_EXAMPLES[4][0], "intent": "sales"},
        {"text": MODEL_EXAMPLES[1][0], "intent": "technical"},
    ]

    report = evaluate(rows, threshold=0.5)

    assert (report["n"], report["accuracy"], report["escalated"]) == (4, 0.75, 0.0)
    assert report["by_source"] == {"rules": {"n": 2, "accuracy": 0.5}, "model": {"n": 2, "accuracy": 1.0}}
    assert report["per_intent"]["faq"] == {"precision": 0.0, "recall": 0.0, "n": 1}
    assert report["per_intent"]["general"] == {"precision": 0.0, "recall": 0.0, "n": 0}
    assert report["per_intent"]["billing"] == {"precision": 1.0, "recall": 1.0, "n": 1}


def test_the_heldout_set_is_not_in_the_training_set():
    training = {row["text"].casefold() for row in labelled_rows(TRAINING_FILE)}
    heldout = heldout_rows()

    assert len(heldout) >= 120
    assert not [row["text"] for row in heldout if row["text"].casefold() in training]


def test_heldout_accuracy_stays_above_its_floor(rules):
    report = evaluate(heldout_rows())

    print(json.dumps(report, indent=1))  # the figure, for whoever runs this with -s
    assert report["n"] >= 120
    assert report["accuracy"] >= 0.75
    assert all(figures["recall"] >= 0.4 for figures in report["per_intent"].values())


@pytest.mark.worker
def test_it_classifies_a_real_message_on_a_worker(worker, user):
    seed_rules(IntentRule)
    content = "You charged me twice for order 1042, fix it immediately"

    run = wait_for_run(start_run(owner=user, spec={"skill": "classify_intent"}, input={"content": content}))

    assert run.status == "succeeded", run.error
    assert run.output == {
        "content": content,
        "intent": "billing",
        "confidence": 0.95,
        "urgency": "high",
        "route": "billing",
        "intent_source": "rules",
    }


@pytest.mark.worker
def test_a_worker_with_an_llm_asks_it_when_unsure(worker, user):
    seed_rules(IntentRule)
    content = MODEL_EXAMPLES[4][0]
    spec = {"skill": "classify_intent", "args": {"min_confidence": 0.999}}
    with serving(answering("sales", 1.0)) as fake:
        env = {"LLM_BASE_URL": fake.base_url, "LLM_MODEL": "fake-model"}
        with worker_instead(worker, "intent-llm", env):
            run = wait_for_run(start_run(owner=user, spec=spec, input={"content": content}), timeout=60)

    assert run.status == "succeeded", run.error
    output = run.output or {}
    assert (output["intent"], output["route"], output["intent_source"]) == ("sales", "sales", "llm")
    assert len(fake.requests) == 1


@pytest.mark.worker
def test_a_bad_min_confidence_fails_the_step_at_once(worker, user):
    spec = {"skill": "classify_intent", "args": {"min_confidence": 2}}

    run = wait_for_run(start_run(owner=user, spec=spec, input={"content": "hello"}))

    assert run.status == "failed"
    assert "classify_intent: args.min_confidence must be a number from 0 to 1, not 2" in run.error
