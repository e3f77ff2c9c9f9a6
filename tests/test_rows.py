"""INSERTs built before the transaction that runs them (orchestration/rows.py) store what the ORM would."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext

from orchestration import services
from orchestration.models import Run, RunEvent, Step
from orchestration.rows import Insert

from .factories import ConversationFactory, RunFactory

pytestmark = pytest.mark.django_db


def stored(row: Any) -> dict[str, Any]:
    """The row as the database has it, but for its id."""
    fields = [field.name for field in type(row)._meta.concrete_fields if not field.primary_key]
    return model_to_dict(type(row).objects.get(pk=row.pk), fields=fields)


def test_the_rows_are_stored_as_bulk_create_stores_them():
    run = RunFactory.create()
    given = {"key": "a", "path": "0", "skill": "echo", "args": {"x": [1, "é"]}, "soft_time_limit": 1.5}
    given |= {"time_limit": 3, "ttl": None, "retries": 2, "queue": "steps", "optional": True}
    ours, theirs = Step(run=run, **given), Step(run=run, **{**given, "key": "b"})

    Insert.of([ours]).execute()
    Step.objects.bulk_create([theirs])

    assert ours.pk is not None
    assert not ours._state.adding
    assert stored(ours) == {**stored(theirs), "key": "a", "task_id": ours.task_id}


def test_the_later_columns_are_given_when_it_runs_and_the_rows_get_their_ids_in_order():
    run = RunFactory.create()
    steps = [Step(key=key, path=key, skill="echo", soft_time_limit=1, time_limit=2, retries=0) for key in "abc"]
    insert = Insert.of(steps, later={"run_id"})

    insert.execute(run_id=run.pk)

    assert [step.run_id for step in steps] == [run.pk] * 3
    assert [Step.objects.get(pk=step.pk).key for step in steps] == ["a", "b", "c"]


def test_a_run_goes_in_with_its_prepared_inserts_alone(user):
    """The run (its first event's seq already taken), its steps and that event: no other statement.

    On PostgreSQL one statement that is its own transaction; elsewhere three INSERTs in one.
    """
    conversation = ConversationFactory.create(owner=user)
    new = services.prepare_run(owner=user, conversation=conversation, spec={"chain": [{"skill": "echo"}] * 3})

    with CaptureQueriesContext(connection) as queries:
        run = services.insert_run(new)

    statements = [query["sql"] for query in queries.captured_queries]
    if connection.vendor == "postgresql":
        assert len(statements) == 1
        assert statements[0].startswith("WITH parent AS (INSERT INTO")
    else:
        tables = [Run._meta.db_table, Step._meta.db_table, RunEvent._meta.db_table]
        assert [sql.split(" (")[0] for sql in statements] == [
            f"INSERT INTO {connection.ops.quote_name(t)}" for t in tables
        ]
    assert list(run.events.values_list("seq", "type", "data")) == [(1, "run.queued", {"steps": 3})]
    first_event = new.inserts[2].rows[0]
    assert isinstance(first_event, RunEvent)
    assert run.events.get().created_at == first_event.created_at  # to the microsecond
    assert Run.objects.get(pk=run.pk).last_event_seq == 1
    assert [(step.pk, step.run_id) for step in new.steps] == list(run.steps.order_by("key").values_list("pk", "run_id"))
    assert [stored(step) for step in new.steps] == [stored(Step.objects.get(pk=step.pk)) for step in new.steps]
    assert not any(step._state.adding for step in new.steps)


def test_a_family_insert_stores_what_separate_inserts_store(user):
    """The run's and its steps' columns are the same whichever way they went in (a held run: waiting_for given)."""
    conversation = ConversationFactory.create(owner=user)
    ahead = RunFactory.create(owner=user, conversation=conversation)
    spec = {"chain": [{"skill": "echo", "args": {"x": "é"}}, {"skill": "echo", "retries": 2}]}
    ours = services.prepare_run(owner=user, conversation=conversation, spec=spec, input={"q": 1})
    theirs = services.prepare_run(owner=user, conversation=conversation, spec=spec, input={"q": 1})

    services.insert_run(ours, waiting_for=ahead.pk)
    run_insert, steps_insert, _ = theirs.inserts
    run_insert.execute(waiting_for_id=ahead.pk)
    steps_insert.execute(run_id=theirs.run.pk)

    differ = {"deadline", "created_at", "trace_id"}
    assert {k: v for k, v in stored(ours.run).items() if k not in differ} == {
        k: v for k, v in stored(theirs.run).items() if k not in differ
    }
    assert stored(ours.run)["waiting_for"] == ahead.pk
    for mine, other in zip(ours.steps, theirs.steps, strict=True):
        assert {**stored(mine), "run": None, "task_id": None} == {**stored(other), "run": None, "task_id": None}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the one-statement insert is PostgreSQL's")
def test_a_runs_insert_is_one_statement_for_runs_of_any_shape(user):
    """Its text does not grow with the steps; psycopg parses it once (it caches statements of 50 parameters at most)."""
    from psycopg._queries import MAX_CACHED_STATEMENT_PARAMS

    conversation = ConversationFactory.create(owner=user)
    executed: list[tuple[str, int]] = []

    def note(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        executed.append((sql, len(params)))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(note):
        for spec in ({"skill": "echo"}, {"chain": [{"skill": "echo"}] * 3}, {"group": [{"skill": "echo"}] * 10}):
            services.insert_run(services.prepare_run(owner=user, conversation=conversation, spec=spec))

    assert len({sql for sql, _ in executed}) == 1
    assert len(executed) == 3
    assert max(count for _, count in executed) <= MAX_CACHED_STATEMENT_PARAMS
