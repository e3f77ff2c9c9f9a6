"""PostgreSQL: a step's common transitions as one statement each.

Every step makes two transitions: its claim (a pending step becomes running,
and a queued run with it) and, once its skill returned, its output stored
(and, the spec's last step, the run's success). Through the ORM each is a
transaction of five to nine round trips; here each is one statement that
PostgreSQL runs as its own transaction (data-modifying ``WITH``), so the
same rows change, under the same locks, with the same events, in one round
trip (docs/performance.md).

Each function covers the common case only and returns None where it does
not apply, changing nothing: ``orchestration.state`` then makes the
transition the general way. Called by ``orchestration.state`` only.

``orchestration.state_sqlite`` makes the same transitions on SQLite and
shares what does not depend on the database: the claimed fields and the
step built from them (``claimed_step``), ``Stored``, ``announce`` and
``db_json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, cast

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, models, transaction

from . import events
from .models import ACTIVE_RUN_STATUSES, Conversation, Run, Step, StepStatus

_ACTIVE = "(" + ", ".join(f"'{status}'" for status in ACTIVE_RUN_STATUSES) + ")"

# The step's fields a claimed step is built from (besides its run's).
CLAIMED_FIELDS = (
    "id",
    "run_id",
    "key",
    "path",
    "skill",
    "args",
    "optional",
    "soft_time_limit",
    "time_limit",
    "ttl",
    "retries",
    "queue",
    "task_id",
    "attempts",
    "redeliveries",
    "started_at",
    "lease_until",
)

# The step's run's row, locked before the step's: whatever ends a run (cancel,
# fail, interrupt, the last step) locks the run's row and then updates its
# steps, and a statement that locked a step first and then its run
# deadlocked with it. ``step_`` refers to it, so it runs first; ``run_``
# reads the run's fields from it (the row as locked), not again.
_LOCK_RUN = """run_lock AS (
    SELECT id, status, started_at, last_event_seq FROM orchestration_run
    WHERE id = (SELECT run_id FROM orchestration_step WHERE id = %(step_id)s){active} FOR UPDATE
)"""

# A pending step of an active run that this delivery did not hold before (not
# a redelivery): hold it (and start its
# run, if queued) and write the events, as state._hold does. The run's row is
# locked (FOR UPDATE, run_lock) before its seq is taken, which orders its events.
CLAIM = f"""
WITH {_LOCK_RUN.format(active=f" AND status IN {_ACTIVE}")},
step_ AS (
    UPDATE orchestration_step AS s
    SET status = 'running', delivery = %(delivery)s, attempts = s.attempts + 1,
        started_at = COALESCE(s.started_at, %(now)s),
        lease_until = %(now)s + make_interval(secs => s.time_limit + %(grace)s)
    WHERE s.id = %(step_id)s AND s.status = 'pending' AND s.delivery <> %(delivery)s
      AND s.run_id = (SELECT id FROM run_lock)
    RETURNING {", ".join(f"s.{name}" for name in CLAIMED_FIELDS)}
),
run_ AS (
    UPDATE orchestration_run AS r
    SET status = CASE WHEN old.status = 'queued' THEN 'running' ELSE old.status END,
        started_at = CASE WHEN old.status = 'queued' THEN %(now)s ELSE old.started_at END,
        last_event_seq = old.last_event_seq + CASE WHEN old.status = 'queued' THEN 2 ELSE 1 END
    FROM (SELECT * FROM run_lock WHERE id = (SELECT run_id FROM step_)) AS old
    WHERE r.id = old.id
    RETURNING r.id, r.status, r.conversation_id, r.last_event_seq, old.status = 'queued' AS started
),
events_ AS (
    INSERT INTO orchestration_runevent (run_id, seq, step_id, type, data, created_at)
    SELECT run_.id, run_.last_event_seq - 1, NULL, 'run.running', '{{}}'::jsonb, %(now)s FROM run_ WHERE run_.started
    UNION ALL
    SELECT run_.id, run_.last_event_seq, step_.id, 'step.running',
           jsonb_build_object('attempt', step_.attempts, 'redelivered', false), %(now)s
    FROM run_, step_
)
SELECT step_.*, run_.status, run_.last_event_seq, run_.started, c.id, c.state
FROM step_ CROSS JOIN run_ LEFT JOIN orchestration_conversation AS c ON c.id = run_.conversation_id
"""

# The held step succeeded, and its run goes on: state._finish_step without finishes_run.
STORE = f"""
WITH {_LOCK_RUN.format(active="")},
step_ AS (
    UPDATE orchestration_step SET status = 'succeeded', output = %(output)s, error = '',
        finished_at = %(now)s, lease_until = %(now)s, cached = %(cached)s
    WHERE id = %(step_id)s AND status = 'running' AND delivery = %(delivery)s
      AND run_id = (SELECT id FROM run_lock)
    RETURNING run_id
),
run_ AS (
    UPDATE orchestration_run SET last_event_seq = last_event_seq + 1
    WHERE id = (SELECT run_id FROM step_) RETURNING id, last_event_seq
)
INSERT INTO orchestration_runevent (run_id, seq, step_id, type, data, created_at)
SELECT id, last_event_seq, %(step_id)s, 'step.succeeded', %(data)s::jsonb, %(now)s FROM run_
RETURNING seq
"""

# The held step, the spec's last, succeeded: so does its run, if still active
# (state._finish_step with finishes_run, then state._end_run). Runs with a
# webhook take the general way (its delivery row is built from the ended run).
STORE_LAST = f"""
WITH {_LOCK_RUN.format(active="")},
step_ AS (
    UPDATE orchestration_step AS s SET status = 'succeeded', output = %(output)s, error = '',
        finished_at = %(now)s, lease_until = %(now)s, cached = %(cached)s
    WHERE s.id = %(step_id)s AND s.status = 'running' AND s.delivery = %(delivery)s
      AND s.run_id = (SELECT id FROM run_lock)
      AND NOT EXISTS (SELECT 1 FROM orchestration_run AS r WHERE r.id = s.run_id AND r.webhook_url <> '')
    RETURNING s.run_id
),
run_ AS (
    UPDATE orchestration_run AS r
    SET status = CASE WHEN old.active THEN 'succeeded' ELSE r.status END,
        output = CASE WHEN old.active THEN %(output)s ELSE r.output END,
        error = CASE WHEN old.active THEN '' ELSE r.error END,
        started_at = CASE WHEN old.active THEN COALESCE(r.started_at, %(now)s) ELSE r.started_at END,
        finished_at = CASE WHEN old.active THEN %(now)s ELSE r.finished_at END,
        last_event_seq = r.last_event_seq + CASE WHEN old.active THEN 2 ELSE 1 END
    FROM (SELECT id, status IN {_ACTIVE} AS active FROM run_lock WHERE id = (SELECT run_id FROM step_)) AS old
    WHERE r.id = old.id
    RETURNING r.id, r.conversation_id, r.workflow_id, r.last_event_seq, old.active, r.followed
),
cancelled_ AS (
    UPDATE orchestration_step SET status = 'cancelled', error = 'not run: the run succeeded',
        finished_at = %(now)s, lease_until = %(now)s
    WHERE run_id = (SELECT id FROM run_ WHERE active) AND status = 'pending'
),
events_ AS (
    INSERT INTO orchestration_runevent (run_id, seq, step_id, type, data, created_at)
    SELECT id, last_event_seq - CASE WHEN active THEN 1 ELSE 0 END, %(step_id)s, 'step.succeeded', %(data)s::jsonb,
           %(now)s
    FROM run_
    UNION ALL
    SELECT id, last_event_seq, NULL, 'run.succeeded', '{{}}'::jsonb, %(now)s FROM run_ WHERE active
),
reply_ AS (
    INSERT INTO orchestration_message (conversation_id, role, content, run_id, created_at)
    SELECT conversation_id, 'assistant', %(reply)s, id, %(now)s FROM run_ WHERE active AND conversation_id IS NOT NULL
)
SELECT run_.last_event_seq, run_.active, w.name, run_.followed
FROM run_ LEFT JOIN orchestration_workflow AS w ON w.id = run_.workflow_id
"""


@dataclass(frozen=True)
class Stored:
    """What storing a step's output changed: the seqs of its events, and the run's outcome."""

    seqs: tuple[int, ...]
    run_succeeded: bool = False
    workflow: str | None = None
    followed: bool = False  # a run is held behind it (double-texting): its end releases that run


def claim(step_id: int, delivery: str, now: datetime) -> tuple[Step, list[int]] | None:
    """Hold a pending step of an active run, not held by this delivery before; the step and its events' seqs.

    None if the step is in any other state (state.claim_step decides then).
    The step comes with its run and the run's conversation, as
    ``Step.objects.select_related("run", "run__conversation")`` gives it.
    """
    params = {"step_id": step_id, "delivery": delivery, "now": now, "grace": settings.STEP_LEASE_GRACE}
    with connection.cursor() as cursor:
        cursor.execute(CLAIM, params)
        row = cursor.fetchone()
    if row is None:
        return None
    count = len(CLAIMED_FIELDS)
    fields = dict(zip(CLAIMED_FIELDS, row[:count], strict=True))
    run_status, last_seq, started, conversation_id, conversation_state = row[count:]
    step = claimed_step(fields, delivery, run_status, conversation_id, conversation_state)
    seqs = [last_seq - 1, last_seq] if started else [last_seq]
    announce(step.run_id, seqs)
    return step, seqs


# What a step held by a fast claim has in the fields CLAIMED_FIELDS leaves out:
# it was pending in an active run, so it has no output, wait or end yet, and
# compensates nothing (compensation steps run once their run ended).
_HELD = {
    "status": StepStatus.RUNNING,
    "output": None,
    "error": "",
    "cached": False,
    "wait": None,
    "compensates_id": None,
    "finished_at": None,
}


def claimed_step(
    fields: dict[str, Any], delivery: str, run_status: str, conversation_id: int | None, conversation_state: Any
) -> Step:
    """The held step from its CLAIMED_FIELDS, with its run and the run's conversation, as the ORM would give it.

    Built as the ORM builds the rows it reads (``from_db``), which skips
    computing every field's default first: 60% of the cost of
    ``Step(**fields)`` (docs/performance.md). The run and the conversation
    have only the fields read here; any other loads when first used.
    """
    values = {**fields, **_HELD, "args": _json(fields["args"]), "delivery": delivery}
    names = _step_fields()
    step = Step.from_db(DEFAULT_DB_ALIAS, names, [values[name] for name in names])
    # from_db takes a subset of fields in the model's order.
    run = Run.from_db(DEFAULT_DB_ALIAS, ["id", "conversation_id", "status"], [step.run_id, conversation_id, run_status])
    conversation = None
    if conversation_id is not None:
        state = _json(conversation_state)
        conversation = Conversation.from_db(DEFAULT_DB_ALIAS, ["id", "state"], [conversation_id, state])
    run.conversation = conversation
    step.run = run
    return step


@cache
def _step_fields() -> list[str]:
    return [field.attname for field in Step._meta.concrete_fields]


def store(
    step_id: int, run_id: int, output: Any, delivery: str, now: datetime, finishes_run: bool, cached: bool = False
) -> Stored | None:
    """Store the output of a step this delivery holds; None if it does not hold it (or the run has a webhook).

    ``cached``: the output came from the skill result cache (state.succeed_step).
    """
    params = {
        "step_id": step_id,
        "delivery": delivery,
        "now": now,
        "output": db_json(output),
        "cached": cached,
        "data": json.dumps({"cached": True} if cached else {}),
    }
    if finishes_run:
        from .state import reply_text  # state imports this module

        params["reply"] = reply_text(output)
    with connection.cursor() as cursor:
        cursor.execute(STORE_LAST if finishes_run else STORE, params)
        row = cursor.fetchone()
    if row is None:
        return None
    if not finishes_run:
        stored = Stored((int(row[0]),))
    else:
        last_seq, run_succeeded, workflow, followed = row
        seqs = (last_seq - 1, last_seq) if run_succeeded else (last_seq,)
        stored = Stored(seqs, run_succeeded, workflow, followed)
    announce(run_id, stored.seqs)
    return stored


def announce(run_id: int, seqs: list[int] | tuple[int, ...]) -> None:
    """Announce the run's events ``seqs`` to its streams once the transaction commits (at once outside one).

    One announcement, of the last: a stream reads every event after the last
    one it sent whenever an announcement comes (orchestration.events).
    """
    last = max(seqs)
    transaction.on_commit(lambda: events.announce(run_id, last))


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def db_json(value: Any) -> Any:
    """``value`` as a JSON column's query parameter."""
    field = cast(models.JSONField, Step._meta.get_field("output"))
    return field.get_db_prep_value(value, connection)
