"""PostgreSQL: a run's creation, a step's claim and the store of its output, each one statement (docs/performance.md).

Only for speed: ``orchestration.transitions`` is the definition and calls these first on PostgreSQL;
each returns None, changing nothing, where it does not apply. tests/test_transitions_pg.py compares the two.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, models
from psycopg.types.json import Jsonb

from .models import (
    ACTIVE_RUN_STATUSES,
    Conversation,
    Message,
    MessageRole,
    Run,
    RunEvent,
    RunStatus,
    Step,
    StepStatus,
    Workflow,
    column_of,
    inserted_fields,
    saved_value,
)


def _table(model: type[models.Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


STEP, RUN, EVENT, MESSAGE = _table(Step), _table(Run), _table(RunEvent), _table(Message)
CONVERSATION, WORKFLOW = _table(Conversation), _table(Workflow)
STEP_FIELDS = [field.attname for field in Step._meta.concrete_fields]

# The statuses, as parameters: the statements hold no status literal.
STATUSES = {
    "pending": StepStatus.PENDING,
    "running": StepStatus.RUNNING,
    "succeeded": StepStatus.SUCCEEDED,
    "cancelled": StepStatus.CANCELLED,
    "queued": RunStatus.QUEUED,
    "run_running": RunStatus.RUNNING,
    "run_succeeded": RunStatus.SUCCEEDED,
    "active": list(ACTIVE_RUN_STATUSES),
}

# The step's run, locked before the step (as every transition does); ``step_`` refers to
# it so it runs first, and ``run_`` reads the run's fields from it, as locked.
_LOCK_RUN = f"""run_lock AS (
    SELECT id, status, started_at, last_event_seq FROM {RUN}
    WHERE id = (SELECT run_id FROM {STEP} WHERE id = %(step_id)s){{active}} FOR UPDATE
)"""

# transitions._hold, for a pending step of an active run this delivery did not hold before.
CLAIM = f"""
WITH {_LOCK_RUN.format(active=" AND status = ANY(%(active)s)")},
step_ AS (
    UPDATE {STEP} AS s
    SET status = %(running)s, delivery = %(delivery)s, attempts = s.attempts + 1,
        started_at = COALESCE(s.started_at, %(now)s),
        lease_until = %(now)s + make_interval(secs => s.time_limit + %(grace)s)
    WHERE s.id = %(step_id)s AND s.status = %(pending)s AND s.delivery <> %(delivery)s
      AND s.run_id = (SELECT id FROM run_lock)
    RETURNING {", ".join(f"s.{name}" for name in STEP_FIELDS)}
),
run_ AS (
    UPDATE {RUN} AS r
    SET status = CASE WHEN old.status = %(queued)s THEN %(run_running)s ELSE old.status END,
        started_at = CASE WHEN old.status = %(queued)s THEN %(now)s ELSE old.started_at END,
        last_event_seq = old.last_event_seq + CASE WHEN old.status = %(queued)s THEN 2 ELSE 1 END
    FROM (SELECT * FROM run_lock WHERE id = (SELECT run_id FROM step_)) AS old
    WHERE r.id = old.id
    RETURNING r.id, r.status, r.conversation_id, r.last_event_seq, old.status = %(queued)s AS started
),
events_ AS (
    INSERT INTO {EVENT} (run_id, seq, step_id, type, data, created_at)
    SELECT run_.id, run_.last_event_seq - 1, NULL, 'run.running', '{{}}'::jsonb, %(now)s FROM run_ WHERE run_.started
    UNION ALL
    SELECT run_.id, run_.last_event_seq, step_.id, 'step.running',
           jsonb_build_object('attempt', step_.attempts, 'redelivered', false), %(now)s
    FROM run_, step_
)
SELECT step_.*, run_.status, run_.last_event_seq, c.id, c.state
FROM step_ CROSS JOIN run_ LEFT JOIN {CONVERSATION} AS c ON c.id = run_.conversation_id
"""

# transitions._finish_step as a success, for a step this delivery holds; its run goes on.
STORE = f"""
WITH {_LOCK_RUN.format(active="")},
step_ AS (
    UPDATE {STEP} SET status = %(succeeded)s, output = %(output)s, error = '',
        finished_at = %(now)s, lease_until = %(now)s, cached = %(cached)s
    WHERE id = %(step_id)s AND status = %(running)s AND delivery = %(delivery)s
      AND run_id = (SELECT id FROM run_lock)
    RETURNING run_id
),
run_ AS (
    UPDATE {RUN} SET last_event_seq = last_event_seq + 1
    WHERE id = (SELECT run_id FROM step_) RETURNING id, last_event_seq
)
INSERT INTO {EVENT} (run_id, seq, step_id, type, data, created_at)
SELECT id, last_event_seq, %(step_id)s, 'step.succeeded', %(data)s::jsonb, %(now)s FROM run_
RETURNING seq
"""

# The same for the spec's last step, and then transitions._end_run with ``succeeded``
# if the run is still active; a run with a webhook takes the ORM's way.
STORE_LAST = f"""
WITH {_LOCK_RUN.format(active="")},
step_ AS (
    UPDATE {STEP} AS s SET status = %(succeeded)s, output = %(output)s, error = '',
        finished_at = %(now)s, lease_until = %(now)s, cached = %(cached)s
    WHERE s.id = %(step_id)s AND s.status = %(running)s AND s.delivery = %(delivery)s
      AND s.run_id = (SELECT id FROM run_lock)
      AND NOT EXISTS (SELECT 1 FROM {RUN} AS r WHERE r.id = s.run_id AND r.webhook_url <> '')
    RETURNING s.run_id
),
run_ AS (
    UPDATE {RUN} AS r
    SET status = CASE WHEN old.active THEN %(run_succeeded)s ELSE r.status END,
        output = CASE WHEN old.active THEN %(output)s ELSE r.output END,
        error = CASE WHEN old.active THEN '' ELSE r.error END,
        started_at = CASE WHEN old.active THEN COALESCE(r.started_at, %(now)s) ELSE r.started_at END,
        finished_at = CASE WHEN old.active THEN %(now)s ELSE r.finished_at END,
        last_event_seq = r.last_event_seq + CASE WHEN old.active THEN 2 ELSE 1 END
    FROM (SELECT id, status = ANY(%(active)s) AS active FROM run_lock WHERE id = (SELECT run_id FROM step_)) AS old
    WHERE r.id = old.id
    RETURNING r.id, r.conversation_id, r.workflow_id, r.last_event_seq, old.active, r.followed
),
cancelled_ AS (
    UPDATE {STEP} SET status = %(cancelled)s, error = 'not run: the run succeeded',
        finished_at = %(now)s, lease_until = %(now)s
    WHERE run_id = (SELECT id FROM run_ WHERE active) AND status = %(pending)s
),
events_ AS (
    INSERT INTO {EVENT} (run_id, seq, step_id, type, data, created_at)
    SELECT id, last_event_seq - CASE WHEN active THEN 1 ELSE 0 END, %(step_id)s, 'step.succeeded', %(data)s::jsonb,
           %(now)s
    FROM run_
    UNION ALL
    SELECT id, last_event_seq, NULL, 'run.succeeded', '{{}}'::jsonb, %(now)s FROM run_ WHERE active
),
reply_ AS (
    INSERT INTO {MESSAGE} (conversation_id, role, content, run_id, created_at)
    SELECT conversation_id, %(assistant)s, %(reply)s, id, %(now)s FROM run_ WHERE active AND conversation_id IS NOT NULL
)
SELECT run_.last_event_seq, run_.active, w.name, run_.followed
FROM run_ LEFT JOIN {WORKFLOW} AS w ON w.id = run_.workflow_id
"""


@dataclass(frozen=True)
class Stored:
    """What storing the last step's output changed."""

    last_event_seq: int
    run_succeeded: bool
    workflow: str | None
    followed: bool


def claim(step_id: int, delivery: str, now: datetime) -> tuple[Step, int] | None:
    """Hold a pending step of an active run, not held by this delivery before; the step and its run's last seq.

    The step comes with its run (id, status, conversation) and the run's conversation (id, state).
    """
    params = {**STATUSES, "step_id": step_id, "delivery": delivery, "now": now, "grace": settings.STEP_LEASE_GRACE}
    row = _one(CLAIM, params)
    if row is None:
        return None
    count = len(STEP_FIELDS)
    run_status, last_seq, conversation_id, conversation_state = row[count:]
    step = _from_db(Step, STEP_FIELDS, row[:count])
    step.run = _from_db(Run, ["id", "conversation_id", "status"], [step.run_id, conversation_id, run_status])
    if conversation_id is not None:
        step.run.conversation = _from_db(Conversation, ["id", "state"], [conversation_id, conversation_state])
    return step, last_seq


def store(step_id: int, output: Any, delivery: str, now: datetime, cached: bool) -> int | None:
    """Store the output of a step this delivery holds; the seq of its event, or None if it does not hold it."""
    row = _one(STORE, _store_params(step_id, output, delivery, now, cached))
    return None if row is None else int(row[0])


def store_last(step_id: int, output: Any, delivery: str, now: datetime, cached: bool, reply: str) -> Stored | None:
    """Store the output of the spec's last step and end its run with it (``reply`` for its conversation).

    None if the delivery does not hold the step, or the run has a webhook.
    """
    row = _one(STORE_LAST, {**_store_params(step_id, output, delivery, now, cached), "reply": reply})
    return None if row is None else Stored(int(row[0]), bool(row[1]), row[2], bool(row[3]))


def _store_params(step_id: int, output: Any, delivery: str, now: datetime, cached: bool) -> dict[str, Any]:
    output_field = Step._meta.get_field("output")
    assert isinstance(output_field, models.JSONField)
    return {
        **STATUSES,
        "assistant": MessageRole.ASSISTANT,
        "step_id": step_id,
        "delivery": delivery,
        "now": now,
        "output": output_field.get_db_prep_value(output, connection),
        "cached": cached,
        "data": json.dumps({"cached": True} if cached else {}),
    }


def _one(sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _from_db(model: type[models.Model], names: list[str], values: Any) -> Any:
    """An instance from a plain cursor's values, converted as the ORM converts them (JSON columns come as text)."""
    by_attname = {field.attname: field for field in model._meta.concrete_fields}
    fields = [by_attname[name] for name in names]
    converted = [
        field.from_db_value(value, None, connection) if isinstance(field, models.JSONField) else value  # type: ignore[arg-type]
        for field, value in zip(fields, values, strict=True)
    ]
    return model.from_db(DEFAULT_DB_ALIAS, names, converted)


# --- A run's creation ---------------------------------------------------------------

_RUN_FIELDS = inserted_fields(Run)
_CHILD_FIELDS: dict[type[models.Model], list[models.Field[Any, Any]]] = {
    Step: inserted_fields(Step),
    RunEvent: inserted_fields(RunEvent),
}


def _child_insert(model: type[models.Model], rows: str) -> str:
    """INSERT of ``model``'s rows given as one JSON parameter, their ``run_id`` the new run's."""
    fields = _CHILD_FIELDS[model]
    names = ", ".join(column_of(field) for field in fields)
    values = ", ".join("(SELECT id FROM run_)" if field.attname == "run_id" else column_of(field) for field in fields)
    records = f"jsonb_populate_recordset(NULL::{_table(model)}, {rows}::jsonb)"
    return f"INSERT INTO {_table(model)} ({names}) SELECT {values} FROM {records}"


# transitions.insert_run for a run not held behind another: the run, its steps and first events.
INSERT_RUN = f"""
WITH run_ AS (
    INSERT INTO {RUN} ({", ".join(column_of(field) for field in _RUN_FIELDS)})
    VALUES ({", ".join(f"%(run_{field.attname})s" for field in _RUN_FIELDS)})
    RETURNING id
),
steps_ AS ({_child_insert(Step, "%(steps)s")} RETURNING id),
events_ AS ({_child_insert(RunEvent, "%(events)s")})
SELECT (SELECT id FROM run_), ARRAY(SELECT id FROM steps_ ORDER BY id)
"""


def insert_run(run: Run, steps: list[Step], events: list[RunEvent]) -> None:
    """Insert a new run, its steps and its events in one statement; each row gets its id, as a save gives it."""
    params = {f"run_{field.attname}": saved_value(run, field) for field in _RUN_FIELDS}
    params["steps"] = _json_rows(steps)
    params["events"] = _json_rows(events)
    row = _one(INSERT_RUN, params)
    assert row is not None
    run_id, step_ids = row
    for instance, pk in [(run, run_id), *zip(steps, step_ids, strict=True)]:
        instance.pk = pk
        instance._state.adding, instance._state.db = False, DEFAULT_DB_ALIAS
    for child in [*steps, *events]:
        child.run = run  # type: ignore[attr-defined]


def _json_rows(rows: list[Any]) -> str:
    """The rows' columns (but run_id, which the statement sets) as one JSON text for jsonb_populate_recordset."""
    fields = [field for field in _CHILD_FIELDS[type(rows[0])] if field.attname != "run_id"]
    return json.dumps([{column_of(field): _json_value(saved_value(row, field)) for field in fields} for row in rows])


def _json_value(value: Any) -> Any:
    """A column's saved value as JSON that PostgreSQL reads back as that value."""
    if isinstance(value, Jsonb):
        return value.obj
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value
