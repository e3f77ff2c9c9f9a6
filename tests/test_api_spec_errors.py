"""Every invalid spec is a 400 that names its place, on every endpoint that takes one.

A spec reaches the service through POST /api/workflows/ (stored), and through
POST /api/conversations/{id}/runs/ and .../messages/ (run at once). Each case
runs against all three, and nothing may be written when the spec is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from orchestration.models import Message, Run, Workflow

from .factories import ConversationFactory, WorkflowFactory

pytestmark = pytest.mark.django_db

ECHO = {"skill": "echo"}


def nested_chains(levels: int) -> dict[str, Any]:
    """A step wrapped in ``levels`` one-member chains: it sits at depth levels + 1."""
    node: dict[str, Any] = ECHO
    for _ in range(levels):
        node = {"chain": [node]}
    return node


@pytest.fixture
def conversation(user):
    return ConversationFactory.create(owner=user)


@pytest.fixture(params=["workflows", "runs", "messages"])
def post_spec(request, api: APIClient, conversation) -> Callable[[Any], Any]:
    """POST a spec to one of the endpoints that accept one."""

    def post(spec: Any) -> Any:
        if request.param == "workflows":
            return api.post("/api/workflows/", {"name": "refused", "spec": spec}, format="json")
        if request.param == "runs":
            return api.post(f"/api/conversations/{conversation.pk}/runs/", {"spec": spec, "input": {}}, format="json")
        return api.post(
            f"/api/conversations/{conversation.pk}/messages/", {"content": "hi", "spec": spec}, format="json"
        )

    return post


def assert_nothing_written() -> None:
    assert not Run.objects.exists()
    assert not Message.objects.exists()
    assert not Workflow.objects.filter(name="refused").exists()


def spec_error(response: Any) -> str:
    assert response.status_code == 400, response.content
    body = response.json()
    assert list(body) == ["spec"], body
    [message] = body["spec"]
    return message


@pytest.mark.parametrize(
    ("spec", "place", "complaint"),
    [
        pytest.param([ECHO], "spec", "expected an object, got a list", id="root-not-an-object"),
        pytest.param("echo", "spec", "expected an object, got a string", id="root-a-string"),
        pytest.param({"chain": ["echo"]}, "spec.chain[0]", "expected an object, got a string", id="node-a-string"),
        pytest.param({"group": [ECHO, 3]}, "spec.group[1]", "expected an object, got a number", id="node-a-number"),
        pytest.param(
            {"chain": [ECHO], "group": [ECHO]},
            "spec",
            'expected a step ("skill") or exactly one of "chain", "group", "chord", "switch"',
            id="two-node-keys",
        ),
        pytest.param(
            {"chain": [{"parallel": [ECHO]}]},
            "spec.chain[0]",
            'expected a step ("skill") or exactly one of "chain", "group", "chord", "switch"',
            id="unknown-node-type",
        ),
        pytest.param({}, "spec", 'expected a step ("skill")', id="empty-object"),
        pytest.param({"skill": "echo", "group": [ECHO]}, "spec.group", "unknown step field", id="step-and-group"),
        pytest.param({"chain": ECHO}, "spec.chain", "expected a list of nodes, got an object", id="chain-not-a-list"),
        pytest.param({"chain": []}, "spec.chain", "must not be empty", id="empty-chain"),
        pytest.param({"chain": [ECHO, {"group": []}]}, "spec.chain[1].group", "must not be empty", id="empty-group"),
        pytest.param(
            {"chord": {"header": [], "body": ECHO}}, "spec.chord.header", "must not be empty", id="empty-chord-header"
        ),
        pytest.param(
            {"chord": {"header": [ECHO]}}, "spec.chord", 'expected an object with "header" and "body"', id="no-body"
        ),
        pytest.param(
            {"chord": [ECHO]}, "spec.chord", 'expected an object with "header" and "body"', id="chord-not-an-object"
        ),
        pytest.param({"skill": 5}, "spec.skill", "expected a skill name, got a number", id="skill-not-a-string"),
        pytest.param(
            {"chain": [ECHO, {"skill": "echo", "soft_time_limit": 10, "time_limit": 10}]},
            "spec.chain[1].soft_time_limit",
            "must be less than time_limit (10 >= 10)",
            id="soft-equals-hard",
        ),
        pytest.param(
            {"skill": "echo", "soft_time_limit": 9, "time_limit": 3},
            "spec.soft_time_limit",
            "must be less than time_limit (9 >= 3)",
            id="soft-above-hard",
        ),
        pytest.param(
            {"group": [{"skill": "echo", "soft_time_limit": 5, "time_limit": 71}]},
            "spec.group[0].time_limit",
            "71s exceeds the maximum of skill echo (70s)",
            id="hard-above-skill-maximum",
        ),
        pytest.param(
            {"skill": "echo", "soft_time_limit": 61, "time_limit": 69},
            "spec.soft_time_limit",
            "61s exceeds the maximum of skill echo (60s)",
            id="soft-above-skill-maximum",
        ),
        pytest.param(
            {"skill": "echo", "time_limit": "10"},
            "spec.time_limit",
            "must be seconds, 0 < s <= 604800",
            id="hard-a-string",
        ),
        pytest.param(
            {"skill": "echo", "soft_time_limit": 0},
            "spec.soft_time_limit",
            "must be seconds, 0 < s <= 604800",
            id="soft-zero",
        ),
        pytest.param({"skill": "echo", "args": [1]}, "spec.args", "must be a JSON object, got a list", id="args-list"),
        pytest.param(
            {"chain": [ECHO, {"skill": "echo", "args": "x"}]},
            "spec.chain[1].args",
            "must be a JSON object, got a string",
            id="args-string",
        ),
        pytest.param({"skill": "echo", "timeout": 5}, "spec.timeout", "unknown step field", id="unknown-step-field"),
        pytest.param(
            {"skill": "echo", "retries": "3"}, "spec.retries", "must be an integer from 0 to 10", id="retries-str"
        ),
        pytest.param(
            {"skill": "echo", "retries": 11}, "spec.retries", "must be an integer from 0 to 10", id="retries-11"
        ),
        pytest.param(
            {"skill": "echo", "retries": -1}, "spec.retries", "must be an integer from 0 to 10", id="retries-neg"
        ),
        pytest.param(
            {"skill": "echo", "retries": True}, "spec.retries", "must be an integer from 0 to 10", id="retries-bool"
        ),
        pytest.param({"skill": "echo", "retries": 1.5}, "spec.retries", "must be an integer", id="retries-float"),
        pytest.param(
            {"skill": "echo", "ttl": "5"},
            "spec.ttl",
            "must be seconds, 0 < s <= 604800",
            id="ttl-str",
        ),
        pytest.param(
            {"skill": "echo", "ttl": 0},
            "spec.ttl",
            "must be seconds, 0 < s <= 604800",
            id="ttl-zero",
        ),
        pytest.param(
            {"skill": "echo", "ttl": -5},
            "spec.ttl",
            "must be seconds, 0 < s <= 604800",
            id="ttl-neg",
        ),
        pytest.param(
            {"skill": "echo", "ttl": True},
            "spec.ttl",
            "must be seconds, 0 < s <= 604800",
            id="ttl-bool",
        ),
        pytest.param({"skill": "echo", "optional": "yes"}, "spec.optional", "must be true or false", id="optional-str"),
        pytest.param({"skill": "echo", "optional": 1}, "spec.optional", "must be true or false", id="optional-int"),
        pytest.param(
            {"chain": [{"skill": "echo", "id": "a"}, {"group": [ECHO, {"skill": "echo", "id": "a"}]}]},
            "spec.chain[1].group[1].id",
            'duplicate step id "a"',
            id="duplicate-step-id",
        ),
        pytest.param(
            {"skill": "echo", "id": "two words"}, "spec.id", "must be 1-100 characters", id="step-id-with-space"
        ),
        pytest.param({"skill": "echo", "id": 7}, "spec.id", "must be 1-100 characters", id="step-id-a-number"),
    ],
)
def test_it_rejects_a_bad_spec_naming_the_place(post_spec, spec, place, complaint):
    message = spec_error(post_spec(spec))

    assert message.startswith(f"{place}: "), message
    assert complaint in message
    assert_nothing_written()


def test_it_rejects_unknown_skill_with_its_exact_path(post_spec):
    spec = {"chain": [ECHO, {"chord": {"header": [{"skill": "serch"}], "body": ECHO}}]}

    message = spec_error(post_spec(spec))

    assert message.startswith('spec.chain[1].chord.header[0].skill: unknown skill "serch"'), message
    assert_nothing_written()


def test_it_suggests_a_close_skill_name(post_spec):
    message = spec_error(post_spec({"skill": "ecko"}))

    assert message == 'spec.skill: unknown skill "ecko" (did you mean "echo"?)'


def test_it_rejects_more_than_the_maximum_number_of_steps(post_spec):
    spec = {"group": [ECHO] * (settings.SPEC_MAX_STEPS + 1)}

    message = spec_error(post_spec(spec))

    assert message == f"spec.group[{settings.SPEC_MAX_STEPS}]: more than {settings.SPEC_MAX_STEPS} steps"
    assert_nothing_written()


def test_it_accepts_exactly_the_maximum_number_of_steps(api):
    spec = {"group": [ECHO] * settings.SPEC_MAX_STEPS}

    response = api.post("/api/workflows/", {"name": "wide", "spec": spec}, format="json")

    assert response.status_code == 201, response.content


def test_it_rejects_nesting_deeper_than_the_maximum(post_spec):
    levels = settings.SPEC_MAX_DEPTH  # the step ends up one level too deep

    message = spec_error(post_spec(nested_chains(levels)))

    assert message == "spec" + ".chain[0]" * levels + f": nested deeper than {settings.SPEC_MAX_DEPTH} levels"
    assert_nothing_written()


def test_it_accepts_nesting_at_the_maximum_depth(api):
    spec = nested_chains(settings.SPEC_MAX_DEPTH - 1)

    response = api.post("/api/workflows/", {"name": "deep", "spec": spec}, format="json")

    assert response.status_code == 201, response.content


@pytest.mark.parametrize("path", ["/api/workflows/", "runs", "messages"])
def test_it_rejects_malformed_json_saying_where(api, conversation, path):
    url = path if path.startswith("/") else f"/api/conversations/{conversation.pk}/{path}/"

    response = api.post(url, data='{"spec": {"skill": "echo",}}', content_type="application/json")

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("JSON parse error")
    assert "line 1 column 27" in detail
    assert_nothing_written()


def test_it_rejects_a_deeply_nested_json_body(api, conversation):
    api.raise_request_exception = False
    depth = 100_000
    body = '{"spec": ' + "[" * depth + "]" * depth + "}"

    response = api.post(f"/api/conversations/{conversation.pk}/runs/", data=body, content_type="application/json")

    assert response.status_code == 400
    assert response.json()["detail"].startswith("JSON parse error")


@pytest.mark.parametrize("path", ["runs", "messages"])
def test_it_rejects_both_workflow_and_spec(api, conversation, path):
    workflow = WorkflowFactory.create()
    body = {"content": "hi", "workflow": workflow.name, "spec": ECHO, "input": {}}

    response = api.post(f"/api/conversations/{conversation.pk}/{path}/", body, format="json")

    assert response.status_code == 400
    assert response.json() == {"spec": ["give either workflow or spec, not both"]}
    assert_nothing_written()


@pytest.mark.parametrize("path", ["runs", "messages"])
def test_it_rejects_an_unknown_workflow_name(api, conversation, path):
    response = api.post(
        f"/api/conversations/{conversation.pk}/{path}/", {"content": "hi", "workflow": "nope"}, format="json"
    )

    assert response.status_code == 400
    assert response.json() == {"workflow": ['unknown workflow "nope"']}
    assert_nothing_written()


@pytest.mark.parametrize("path", ["runs", "messages"])
def test_it_treats_another_users_workflow_as_unknown(api, conversation, other_user, path):
    theirs = WorkflowFactory.create(owner=other_user)
    body = {"content": "hi", "workflow": theirs.name}

    response = api.post(f"/api/conversations/{conversation.pk}/{path}/", body, format="json")

    assert response.status_code == 400
    assert response.json() == {"workflow": [f'unknown workflow "{theirs.name}"']}


@pytest.mark.parametrize("path", ["runs", "messages"])
def test_it_rejects_a_null_spec(api, conversation, path):
    body = {"content": "hi", "spec": None}

    response = api.post(f"/api/conversations/{conversation.pk}/{path}/", body, format="json")

    assert response.status_code == 400
    assert list(response.json()) == ["spec"]
    assert_nothing_written()


@pytest.mark.django_db(transaction=True)
def test_it_rejects_a_ttl_too_large_to_schedule(api, conversation):
    # Transactional, so the on-commit enqueue runs inside the request as in production.
    api.raise_request_exception = False
    spec = {"skill": "echo", "ttl": 1e15}

    response = api.post(f"/api/conversations/{conversation.pk}/runs/", {"spec": spec}, format="json")

    assert response.status_code == 400
    assert response.json()["spec"][0].startswith("spec.ttl: ")
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("spec", "place", "complaint"),
    [
        pytest.param(
            {"chain": [ECHO, ECHO, {"switch": {"on": "route", "cases": []}}]},
            "spec.chain[2].switch.cases",
            "expected an object of value: node, got a list",
            id="switch-cases-not-an-object",
        ),
        pytest.param(
            {"switch": {"on": "route", "cases": {}}}, "spec.switch.cases", "must not be empty", id="switch-no-cases"
        ),
        pytest.param(
            {"switch": {"on": "", "cases": {"a": ECHO}}},
            "spec.switch.on",
            'expected a field path such as "route" or "ticket.route", got ""',
            id="switch-empty-on",
        ),
        pytest.param(
            {"switch": {"on": "route", "cases": {"a": ECHO}, "else": ECHO}},
            "spec.switch.else",
            'unknown switch field (expected "on", "cases", "default")',
            id="switch-unknown-field",
        ),
        pytest.param(
            {"switch": {"on": "route", "cases": {"a": {"skill": "ecko"}}}},
            "spec.switch.cases.a.skill",
            'unknown skill "ecko" (did you mean "echo"?)',
            id="switch-case-unknown-skill",
        ),
    ],
)
def test_it_rejects_a_bad_switch_naming_the_place(post_spec, spec, place, complaint):
    assert spec_error(post_spec(spec)) == f"{place}: {complaint}"
    assert_nothing_written()
