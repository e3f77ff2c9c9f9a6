"""Runs: POST /api/conversations/{id}/runs/ starts one; /api/runs/ lists and shows them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from orchestration.api.serializers import RunDetailSerializer, RunSerializer
from orchestration.models import Run

from .conftest import wait_for_run
from .factories import ConversationFactory, RunFactory, StepFactory, WorkflowFactory

pytestmark = pytest.mark.django_db


CHORD = {
    "chord": {
        "header": [{"skill": "echo", "args": {"value": "a"}}, {"skill": "echo", "args": {"value": "b"}}],
        "body": {"skill": "echo", "id": "collect"},
    }
}


@pytest.fixture
def conversation(user):
    return ConversationFactory.create(owner=user)


def runs_url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/runs/"


def listed_ids(client: APIClient, **params) -> list[int]:
    response = client.get("/api/runs/", params)
    assert response.status_code == 200, response.content
    return [r["id"] for r in response.json()["results"]]


# --- POST /api/conversations/{id}/runs/ -------------------------------------------


def test_it_starts_a_run_from_a_spec(api, user, conversation):
    response = api.post(runs_url(conversation), {"spec": CHORD, "input": {"q": 1}}, format="json")

    assert response.status_code == 202, response.content
    data = response.json()
    assert (data["status"], data["conversation"], data["workflow"]) == ("queued", conversation.pk, None)
    assert data["input"] == {"q": 1}
    run = Run.objects.get(pk=data["id"])
    assert (run.owner, run.spec) == (user, CHORD)
    assert list(run.steps.values_list("status", flat=True)) == ["pending"] * 3


def test_it_starts_a_run_from_a_named_workflow(api, conversation):
    workflow = WorkflowFactory.create(spec=CHORD)

    response = api.post(runs_url(conversation), {"workflow": workflow.name}, format="json")

    assert response.status_code == 202, response.content
    assert response.json()["workflow"] == workflow.name
    run = Run.objects.get(pk=response.json()["id"])
    assert (run.spec, run.input) == (CHORD, None)


def test_it_accepts_a_null_input_like_an_omitted_one(api, conversation):
    response = api.post(runs_url(conversation), {"spec": {"skill": "echo"}, "input": None}, format="json")

    assert response.status_code == 202, response.content
    assert Run.objects.get(pk=response.json()["id"]).input is None


def test_it_starts_the_default_workflow_when_given_neither(api, conversation, settings):
    settings.DEFAULT_WORKFLOW = WorkflowFactory.create().name

    response = api.post(runs_url(conversation), {"input": {"q": 1}}, format="json")

    assert response.status_code == 202
    assert response.json()["workflow"] == settings.DEFAULT_WORKFLOW


def test_it_rejects_a_nul_character_in_json_naming_where(api, conversation):
    body = {"spec": {"skill": "echo", "args": {"value": "a\u0000b"}}, "input": {"q": "\u0000"}}

    response = api.post(runs_url(conversation), body, format="json")

    assert response.status_code == 400, response.content
    assert response.json() == {
        "spec": ["spec.args.value: strings must not contain the NUL character"],
        "input": ["input.q: strings must not contain the NUL character"],
    }


def test_it_rejects_an_unpaired_surrogate_in_json_naming_where(api, conversation):
    """JSON may escape one ("\\ud800"), but no database stores it: 400, not a failed insert."""
    body = '{"spec": {"skill": "echo", "args": {"value": "a\\ud800b"}}, "input": {"\\udfff": 1}}'

    response = api.post(runs_url(conversation), body, content_type="application/json")

    assert response.status_code == 400, response.content
    assert response.json() == {
        "spec": ["spec.args.value: strings must not contain an unpaired surrogate (U+D800)"],
        "input": ["input: strings must not contain an unpaired surrogate (U+DFFF)"],
    }
    assert not Run.objects.exists()


def test_it_answers_404_for_another_users_conversation(api, other_user):
    theirs = ConversationFactory.create(owner=other_user)

    response = api.post(runs_url(theirs), {"spec": {"skill": "echo"}}, format="json")

    assert response.status_code == 404
    assert not Run.objects.exists()


def test_it_lets_staff_start_a_run_that_the_conversation_owner_owns(staff_api, conversation, user):
    response = staff_api.post(runs_url(conversation), {"spec": {"skill": "echo"}}, format="json")

    assert response.status_code == 202
    assert Run.objects.get(pk=response.json()["id"]).owner == user


def test_a_started_run_succeeds_with_the_expected_output(worker, api, user):
    conversation = ConversationFactory.create(owner=user)
    spec = {"chain": [{"skill": "echo"}, CHORD]}

    response = api.post(runs_url(conversation), {"spec": spec, "input": {"q": 1}}, format="json")
    run = wait_for_run(Run.objects.get(pk=response.json()["id"]))

    assert run.status == "succeeded", run.error
    detail = api.get(f"/api/runs/{run.pk}/").json()
    assert detail["status"] == "succeeded"
    assert detail["output"] == ["a", "b"]
    assert detail["started_at"]
    assert detail["finished_at"]
    assert detail["duration_ms"] >= 0
    steps = {s["key"]: s for s in detail["steps"]}
    assert steps["spec.chain[0]"]["output"] == {"q": 1}
    assert steps["collect"]["output"] == ["a", "b"]
    for step in detail["steps"]:
        assert (step["status"], step["attempts"]) == ("succeeded", 1)
        assert step["started_at"] <= step["finished_at"]
        assert step["duration_ms"] >= 0


def test_a_failing_run_is_listed_as_failed(worker, api, user):
    conversation = ConversationFactory.create(owner=user)
    spec = {"chain": [{"skill": "fail", "args": {"message": "boom"}}, {"skill": "echo"}]}

    response = api.post(runs_url(conversation), {"spec": spec}, format="json")
    run = wait_for_run(Run.objects.get(pk=response.json()["id"]))

    assert listed_ids(api, status="failed") == [run.pk]
    detail = api.get(f"/api/runs/{run.pk}/").json()
    assert "boom" in detail["error"]
    assert [(s["status"], s["attempts"]) for s in detail["steps"]] == [("failed", 1), ("cancelled", 0)]


# --- GET /api/runs/ ---------------------------------------------------------------


def test_it_lists_only_the_users_runs_newest_first(api, user, other_user):
    older, newer = RunFactory.create(owner=user), RunFactory.create(owner=user)
    RunFactory.create(owner=other_user)

    assert listed_ids(api) == [newer.pk, older.pk]


def test_it_lists_every_run_to_staff(staff_api, user, other_user):
    runs = [RunFactory.create(owner=user), RunFactory.create(owner=other_user)]

    assert {r.pk for r in runs} <= set(listed_ids(staff_api))


def test_it_filters_runs_by_status(api, user):
    failed = RunFactory.create(owner=user, status="failed")
    RunFactory.create(owner=user, status="succeeded")
    RunFactory.create(owner=user)

    assert listed_ids(api, status="failed") == [failed.pk]


def test_it_rejects_an_unknown_status_filter(api):
    response = api.get("/api/runs/", {"status": "exploded"})

    assert response.status_code == 400
    assert list(response.json()) == ["status"]


def test_it_filters_runs_by_conversation_and_workflow(api, user):
    workflow = WorkflowFactory.create()
    run = RunFactory.create(owner=user, workflow=workflow)
    RunFactory.create(owner=user, workflow=WorkflowFactory.create())

    assert listed_ids(api, conversation=run.conversation_id) == [run.pk]
    assert listed_ids(api, workflow__name=workflow.name) == [run.pk]


def test_it_shows_status_output_error_and_timings_in_the_list(api, user):
    started = timezone.now()
    run = RunFactory.create(
        owner=user,
        status="failed",
        error="step x failed: boom",
        started_at=started,
        finished_at=started + timedelta(seconds=2),
    )

    [data] = api.get("/api/runs/").json()["results"]

    assert data["id"] == run.pk
    assert (data["status"], data["error"], data["duration_ms"]) == ("failed", "step x failed: boom", 2000)
    assert "steps" not in data


def test_it_pages_runs(api, user):
    RunFactory.create_batch(3, owner=user)

    data = api.get("/api/runs/", {"page_size": 2}).json()

    assert data["count"] == 3
    assert len(data["results"]) == 2
    assert data["next"]
    assert len(api.get(data["next"]).json()["results"]) == 1


def test_it_caps_the_page_size_at_200(api, user):
    owner_conversation = ConversationFactory.create(owner=user)
    Run.objects.bulk_create(Run(owner=user, conversation=owner_conversation, spec={}) for _ in range(205))

    assert len(api.get("/api/runs/", {"page_size": 1000}).json()["results"]) == 200
    assert len(api.get("/api/runs/").json()["results"]) == 50


def test_the_list_makes_a_fixed_number_of_queries(api, user, django_assert_max_num_queries):
    for _ in range(20):
        run = RunFactory.create(owner=user, workflow=WorkflowFactory.create())
        StepFactory.create_batch(2, run=run)

    # Token lookup (with its user), the count, the page with its workflows.
    with django_assert_max_num_queries(3):
        response = api.get("/api/runs/")

    assert len(response.json()["results"]) == 20


# --- GET /api/runs/{id}/ ----------------------------------------------------------


def test_it_shows_a_run_with_its_steps(api, user):
    workflow = WorkflowFactory.create()
    run = RunFactory.create(owner=user, spec=CHORD, workflow=workflow)
    started = timezone.now()
    done = StepFactory.create(
        run=run,
        key="a",
        status="succeeded",
        attempts=2,
        output="a",
        started_at=started,
        finished_at=started + timedelta(milliseconds=1500),
    )
    waiting = StepFactory.create(run=run, key="b")

    response = api.get(f"/api/runs/{run.pk}/")

    assert response.status_code == 200
    data = response.json()
    assert data["spec"] == CHORD
    assert data["workflow"] == workflow.name
    first, second = data["steps"]
    assert (first["id"], first["status"], first["attempts"], first["output"]) == (done.pk, "succeeded", 2, "a")
    assert first["started_at"]
    assert first["finished_at"]
    assert first["duration_ms"] == 1500
    assert (second["id"], second["status"], second["attempts"]) == (waiting.pk, "pending", 0)
    assert (second["started_at"], second["finished_at"], second["duration_ms"]) == (None, None, None)
    for field in ("skill", "queue", "soft_time_limit", "time_limit", "retries", "error"):
        assert field in first


def test_the_detail_makes_a_fixed_number_of_queries(api, user, django_assert_max_num_queries):
    run = RunFactory.create(owner=user, workflow=WorkflowFactory.create())
    StepFactory.create_batch(30, run=run)

    # Token lookup (with its user), the run with its workflow, its steps.
    with django_assert_max_num_queries(3):
        response = api.get(f"/api/runs/{run.pk}/")

    assert len(response.json()["steps"]) == 30


def test_it_answers_404_for_another_users_run(api, other_user):
    theirs = RunFactory.create(owner=other_user)

    assert api.get(f"/api/runs/{theirs.pk}/").status_code == 404


def test_it_shows_staff_any_run(staff_api, other_user):
    theirs = RunFactory.create(owner=other_user)

    assert staff_api.get(f"/api/runs/{theirs.pk}/").status_code == 200


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_runs_are_read_only(api, user, method):
    run = RunFactory.create(owner=user)

    response = getattr(api, method)(f"/api/runs/{run.pk}/", {"status": "succeeded"}, format="json")

    assert response.status_code == 405
    run.refresh_from_db()
    assert run.status == "queued"


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/api/runs/"), ("get", "/api/runs/{run}/"), ("post", "/api/conversations/{conversation}/runs/")],
)
def test_it_needs_authentication(anon, user, method, path):
    run = RunFactory.create(owner=user)

    url = path.format(run=run.pk, conversation=run.conversation_id)
    response = getattr(anon, method)(url, {"spec": {"skill": "echo"}}, format="json")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert Run.objects.count() == 1


def test_run_serializers_build_their_fields_once_and_bind_copies():
    """The fields come from one build per process (FieldsBuiltOnce); each serializer binds copies of its own."""
    first, second = RunFactory.create(), RunFactory.create()
    StepFactory.create(run=first, key="a")
    StepFactory.create_batch(2, run=second)

    one, other = RunSerializer(first), RunSerializer(second)
    details = [RunDetailSerializer(run).data for run in (first, second)]

    assert (one.data["id"], other.data["id"]) == (first.pk, second.pk)
    assert one.fields["status"] is not other.fields["status"]
    assert (one.fields["status"].parent, other.fields["status"].parent) == (one, other)
    assert [len(detail["steps"]) for detail in details] == [1, 2]
    assert details[0]["steps"][0]["key"] == "a"
