"""The shared ``support`` workflow answers customers offline, and eval_support measures it."""

from __future__ import annotations

import importlib
import io
import json
from typing import Any

import pytest
from django.apps import apps
from django.core.management import call_command

from orchestration.models import Message, Run, RunEvent, Workflow
from orchestration.spec import plan
from skills.models import Article, IntentRule
from skills.support.articles import load_articles
from skills.support.rules import seed_rules

from .conftest import wait_for_run, wait_until

pytestmark = pytest.mark.django_db

SUPPORT = importlib.import_module("orchestration.migrations.0015_support_workflow")
README_MESSAGE = "I was charged twice for order 1042, my email is jane@example.com"


@pytest.fixture
def support(db: None) -> Workflow:
    """The support workflow, its intent rules and its articles as the migrations seed them.

    A transactional test before this one may have flushed them.
    """
    seed_rules(IntentRule)
    load_articles(Article)
    Workflow.objects.filter(name=SUPPORT.NAME, owner=None).delete()
    SUPPORT.create(apps, None)
    return Workflow.objects.get(name=SUPPORT.NAME, owner=None)


def ask(api: Any, content: str) -> Run:
    """Post ``content`` to a new conversation with the support workflow; the run it started."""
    conversation = api.post("/api/conversations/", {"title": "support"}, format="json").json()
    response = api.post(
        f"/api/conversations/{conversation['id']}/messages/",
        {"content": content, "workflow": SUPPORT.NAME},
        format="json",
    )
    assert response.status_code == 202, response.content
    return Run.objects.get(pk=response.json()["run"]["id"])


def ticket_of(run: Run) -> dict[str, Any]:
    """The ticket a finished support run answered with."""
    assert run.status == "succeeded", run.error
    assert isinstance(run.output, dict), run.output
    return run.output


def steps_by_key(run: Run) -> dict[str, Any]:
    return {step.key: step for step in run.steps.all()}


def test_the_support_workflow_is_a_valid_shared_workflow(api, support):
    response = api.get("/api/workflows/support/")

    assert response.status_code == 200, response.content
    assert response.json()["spec"] == SUPPORT.SPEC
    assert len(plan(SUPPORT.SPEC)) == 3 + 7 * 4  # planning validates; each of the 7 cases has 4 steps


@pytest.mark.worker
def test_the_readme_example_gets_a_reply_citing_the_billing_article(worker, api, support):
    run = wait_for_run(ask(api, README_MESSAGE), timeout=60)

    ticket = ticket_of(run)
    assert (ticket["intent"], ticket["route"]) == ("billing", "billing")
    assert ticket["cited"][0] == "duplicate-charge"
    duplicate = Article.objects.get(slug="duplicate-charge")
    assert duplicate.category == "billing"
    assert f"{duplicate.title} (duplicate-charge)" in ticket["reply"].splitlines()[-1]
    assert ticket["escalated"] is False
    assert ticket["quality"]["passed"] is True
    user_message, reply = Message.objects.filter(run=run).order_by("pk")
    assert user_message.content == "I was charged twice for order 1042, my email is [email]"
    assert reply.content == ticket["reply"]
    steps = steps_by_key(run)
    ran = {"mask", "intent", "billing.search", "billing.sentiment", "billing.reply", "billing.review", "quality"}
    assert {key for key, step in steps.items() if step.status == "succeeded"} == ran
    assert {step.status for key, step in steps.items() if key not in ran} == {"skipped"}
    routed = RunEvent.objects.get(run=run, type="switch.routed")
    assert routed.data["value"] == "billing"
    assert "jane@example.com" not in json.dumps([run.input, run.output, [s.output for s in steps.values()]])


# One message per intent, as a customer writes it, and the articles its answer may rest on
# (the two databases rank close articles in a different order).
ANSWERED = [
    ("billing", "My card shows the same payment twice for one order", {"duplicate-charge"}),
    ("technical", "I forgot my password and the reset email never arrives", {"password-reset"}),
    ("faq", "How long does standard delivery take?", {"shipping-times"}),
    ("sales", "Do you offer a discount if I buy 50 units for my company?", {"discount-codes", "business-accounts"}),
    ("general", "Hello, are you open on weekends?", {"contact-hours"}),
]


@pytest.mark.worker
@pytest.mark.parametrize(("intent", "content", "articles"), ANSWERED)
def test_each_intent_gets_a_grounded_offline_reply(worker, api, support, intent, content, articles):
    run = wait_for_run(ask(api, content), timeout=60)

    ticket = ticket_of(run)
    assert ticket["intent"] == intent
    assert ticket["reply_source"] == "offline"
    assert ticket["cited"][0] in articles, ticket["reply"]
    assert ticket["reply"].splitlines()[-1].startswith("Sources: ")
    assert ticket["quality"]["grounding"] >= 0.5, ticket["quality"]
    assert steps_by_key(run)[f"{intent}.reply"].status == "succeeded"


@pytest.mark.worker
def test_a_complaint_waits_for_a_person_who_approves_the_draft(worker, api, support):
    content = "This is the third time my parcel arrived damaged. Terrible service, I want to complain to a manager."
    run = ask(api, content)
    wait_until(lambda: Run.objects.get(pk=run.pk).status == "waiting", timeout=60)
    waiting = api.get(f"/api/runs/{run.pk}/").json()
    assert waiting["awaiting_input"]["step"] == "complaint.review"
    assert "complaint" in waiting["awaiting_input"]["prompt"]

    response = api.post(f"/api/runs/{run.pk}/resume/", {"payload": {}}, format="json")

    assert response.status_code == 202, response.content
    run = wait_for_run(run, timeout=30)
    ticket = ticket_of(run)
    assert ticket["intent"] == "complaint"
    assert (ticket["escalated"], ticket["human_review"]) == (True, "answered")
    assert ticket["reply"].splitlines()[-1].startswith("Sources: ")
    assert "quality" in ticket


def test_eval_support_prints_intent_accuracy_and_retrieval_hit_rate(support):
    out = io.StringIO()

    call_command("eval_support", "--json", stdout=out)

    figures = json.loads(out.getvalue())
    assert figures["intent"]["n"] >= 120
    assert figures["intent"]["accuracy"] >= 0.75
    assert figures["retrieval"]["n"] >= 50
    assert figures["retrieval"]["k"] == 3
    assert figures["retrieval"]["hit_rate"] >= 0.85
    assert 0 < figures["retrieval"]["mrr"] <= figures["retrieval"]["hit_rate"]


def test_eval_support_prints_a_readable_report(support):
    out = io.StringIO()

    call_command("eval_support", stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[0].startswith("intent accuracy: 0.")
    assert lines[-1].startswith("retrieval hit rate@3: 0.")
