"""Every API read makes a fixed number of queries, however many rows it shows.

Each test runs once with a few rows and once with many, and expects the same
exact count both times: a query per run, step or message (an N+1) fails it,
and so does any new query, which should then be a deliberate change here.
Counts include the token lookup (one query, with its user); a user's and a
staff member's reads cost the same (the owner filter is a WHERE, not a query).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from orchestration.models import Run, RunStatus

from .conftest import wait_for_run
from .factories import ConversationFactory, MessageFactory, RunFactory, StepFactory, WorkflowFactory

pytestmark = pytest.mark.django_db

FEW, MANY = 3, 30


@pytest.fixture(params=["user", "staff"])
def reader(request: pytest.FixtureRequest, api: APIClient, staff_api: APIClient) -> APIClient:
    """The runs' owner, then a staff member; both see every row the tests seed."""
    return api if request.param == "user" else staff_api


def seed_runs(owner: Any, count: int, **fields: Any) -> list[Run]:
    """``count`` runs of ``owner`` with two steps each; by default each has a workflow of its own."""
    runs = []
    for _ in range(count):
        workflow = fields.get("workflow") or WorkflowFactory.create()
        run = RunFactory.create(owner=owner, **{**fields, "workflow": workflow})
        StepFactory.create_batch(2, run=run)
        runs.append(run)
    return runs


def get(client: APIClient, url: str, queries: int, assert_num_queries: Any, **params: Any) -> Any:
    """GET ``url`` expecting exactly ``queries`` queries and a 200; the body."""
    with assert_num_queries(queries):
        response = client.get(url, params)
    assert response.status_code == 200, response.content
    return response.json()


# --- GET /api/runs/ ---------------------------------------------------------------


@pytest.mark.parametrize("size", [FEW, MANY])
def test_the_run_list_makes_three_queries(reader, user, size, django_assert_num_queries):
    seed_runs(user, size)

    # The token, the count, the page with its workflows.
    data = get(reader, "/api/runs/", 3, django_assert_num_queries)

    assert len(data["results"]) == size
    assert all(r["workflow"] for r in data["results"])


@pytest.mark.parametrize("size", [FEW, MANY])
def test_the_run_list_by_status_makes_three_queries(reader, user, size, django_assert_num_queries):
    seed_runs(user, size, status=RunStatus.FAILED)
    seed_runs(user, 2)

    # The token, the count, the page.
    data = get(reader, "/api/runs/", 3, django_assert_num_queries, status="failed")

    assert len(data["results"]) == size


@pytest.mark.parametrize("size", [FEW, MANY])
def test_the_run_list_by_conversation_makes_four_queries(reader, user, size, django_assert_num_queries):
    conversation = ConversationFactory.create(owner=user)
    seed_runs(user, size, conversation=conversation)
    seed_runs(user, 2)

    # The token, the filter's check that the conversation exists, the count, the page.
    data = get(reader, "/api/runs/", 4, django_assert_num_queries, conversation=conversation.pk)

    assert len(data["results"]) == size


@pytest.mark.parametrize("size", [FEW, MANY])
def test_the_run_list_by_workflow_makes_four_queries(reader, user, size, django_assert_num_queries):
    workflow = WorkflowFactory.create()
    seed_runs(user, size, workflow=workflow)
    seed_runs(user, 2)

    # The token, the workflow's id by its name, the count, the page.
    data = get(reader, "/api/runs/", 4, django_assert_num_queries, workflow__name=workflow.name)

    assert {r["workflow"] for r in data["results"]} == {workflow.name}
    assert len(data["results"]) == size


def test_the_run_list_by_an_unknown_workflow_stops_at_its_name(api, user, django_assert_num_queries):
    seed_runs(user, FEW)

    # The token, the workflow's id by its name: no workflow, no runs to count.
    data = get(api, "/api/runs/", 2, django_assert_num_queries, workflow__name="no-such-workflow")

    assert data["count"] == 0


# --- GET /api/runs/{id}/ ----------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 20])
def test_the_run_detail_makes_three_queries(reader, user, steps, django_assert_num_queries):
    run = RunFactory.create(owner=user, workflow=WorkflowFactory.create())
    StepFactory.create_batch(steps, run=run)

    # The token, the run with its workflow, its steps.
    data = get(reader, f"/api/runs/{run.pk}/", 3, django_assert_num_queries)

    assert len(data["steps"]) == steps
    assert [s["id"] for s in data["steps"]] == sorted(s["id"] for s in data["steps"])


# --- /api/conversations/ ----------------------------------------------------------


@pytest.mark.parametrize("size", [FEW, MANY])
def test_the_conversation_list_makes_three_queries(reader, user, size, django_assert_num_queries):
    for conversation in ConversationFactory.create_batch(size, owner=user):
        seed_runs(user, 1, conversation=conversation)

    # The token, the count, the page.
    data = get(reader, "/api/conversations/", 3, django_assert_num_queries)

    assert len(data["results"]) == size


def test_the_conversation_detail_makes_two_queries(reader, user, django_assert_num_queries):
    conversation = ConversationFactory.create(owner=user)

    # The token, the conversation.
    data = get(reader, f"/api/conversations/{conversation.pk}/", 2, django_assert_num_queries)

    assert data["id"] == conversation.pk


@pytest.mark.parametrize("size", [2, 20])
def test_the_message_list_makes_four_queries(reader, user, size, django_assert_num_queries):
    conversation = ConversationFactory.create(owner=user)
    for run in seed_runs(user, size, conversation=conversation):
        MessageFactory.create(conversation=conversation, run=run)

    # The token, the conversation, the count, the page.
    data = get(reader, f"/api/conversations/{conversation.pk}/messages/", 4, django_assert_num_queries)

    assert len(data["results"]) == size
    assert all(m["run"] for m in data["results"])


# --- POST /api/conversations/{id}/runs/ ---------------------------------------------


def test_starting_a_run_sets_no_savepoint(api, user, worker):
    """The run's rows go in without a savepoint's two extra round trips; on PostgreSQL in one statement."""
    conversation = ConversationFactory.create(owner=user)
    body = {"spec": {"chain": [{"skill": "echo"}, {"skill": "echo"}]}, "input": "hi", "on_active": "allow"}

    with CaptureQueriesContext(connection) as queries:
        response = api.post(f"/api/conversations/{conversation.pk}/runs/", body, format="json")

    assert response.status_code == 202, response.content
    statements = [query["sql"] for query in queries.captured_queries]
    inserts = [sql for sql in statements if "INSERT INTO" in sql]
    assert any("orchestration_step" in sql for sql in inserts)
    assert not [sql for sql in statements if "SAVEPOINT" in sql.upper()]
    if connection.vendor == "postgresql":  # the run, its steps and its first event: one WITH
        assert [sql.strip().split(" (")[0] for sql in inserts] == ["WITH run_ AS"]
    assert wait_for_run(Run.objects.get(pk=response.json()["id"])).status == RunStatus.SUCCEEDED
