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


def test_a_run_goes_in_with_three_prepared_inserts(user):
    """The run (its first event's seq already taken), its steps and that event: no other statement."""
    conversation = ConversationFactory.create(owner=user)
    new = services.prepare_run(owner=user, conversation=conversation, spec={"chain": [{"skill": "echo"}] * 2})

    with CaptureQueriesContext(connection) as queries:
        run = services.insert_run(new)

    statements = [query["sql"].split(" (")[0] for query in queries.captured_queries]
    assert statements == [f"INSERT INTO {connection.ops.quote_name(table)}" for table in TABLES]
    assert list(run.events.values_list("seq", "type", "data")) == [(1, "run.queued", {"steps": 2})]
    assert Run.objects.get(pk=run.pk).last_event_seq == 1
    assert list(run.steps.order_by("pk").values_list("key", flat=True)) == [step.key for step in new.steps]


TABLES = [Run._meta.db_table, Step._meta.db_table, RunEvent._meta.db_table]
