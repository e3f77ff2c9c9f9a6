"""SQLite: a step's common transitions as a few plain statements in one transaction.

The same two transitions as ``orchestration.state_pg`` (a pending step's
claim, a held step's output stored), with the same rows, locks and events.
SQLite has no data-modifying ``WITH``, and no round trips to save; what
costs here is the ORM building each query (measured: the ORM's claim and
store took most of a worker's CPU).

SQLite has one write lock, and ``BEGIN IMMEDIATE`` (settings) takes it for
the whole transaction, so no row changes under a transaction: reading a row
and then updating it there is as safe as PostgreSQL's row locks. Every
writer of the database queues for that lock, so as little as can be is done
while holding it (docs/performance.md): the rows are read before it (a WAL
snapshot, no lock), parameters and JSON made before it, the step built after
it; under it, each update checks the row is still as read, and the run's
status and events' seq are read there.

Each function covers the common case only and returns None where it does
not apply, changing nothing: ``orchestration.state`` then makes the
transition the general way. Called by ``orchestration.state`` only.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from .models import ACTIVE_RUN_STATUSES, RunStatus, Step, StepStatus
from .state_pg import CLAIMED_FIELDS, Stored, announce, claimed_step, db_json

# An event to insert: its step (None: the run's own), type and data (JSON).
_Event = tuple[int | None, str, str]

# Read before the write lock; the claim checks under it that the step and the run are still as read.
_CLAIM_READ = f"""
SELECT {", ".join(f"s.{name}" for name in CLAIMED_FIELDS)}, s.status, s.delivery,
       r.status, r.conversation_id, c.state
FROM orchestration_step AS s
JOIN orchestration_run AS r ON r.id = s.run_id
LEFT JOIN orchestration_conversation AS c ON c.id = r.conversation_id
WHERE s.id = %s
"""

# The step as read, still pending: any claim or release in between changed its attempts or delivery.
_HOLD = """
UPDATE orchestration_step SET status = 'running', delivery = %s, attempts = %s, started_at = %s, lease_until = %s
WHERE id = %s AND status = 'pending' AND delivery = %s AND attempts = %s
"""

_RUN_STATE = "SELECT status, last_event_seq, followed FROM orchestration_run WHERE id = %s"

_RUN_STARTED = "UPDATE orchestration_run SET status = 'running', started_at = %s, last_event_seq = %s WHERE id = %s"

_RUN_EVENTS = "UPDATE orchestration_run SET last_event_seq = %s WHERE id = %s"

_STORE_STEP = """
UPDATE orchestration_step SET status = 'succeeded', output = %s, error = '', finished_at = %s, lease_until = %s,
    cached = %s
WHERE id = %s AND status = 'running' AND delivery = %s
"""

# What does not change once a run exists.
_RUN_FIXED = """
SELECT r.webhook_url, r.conversation_id, w.name
FROM orchestration_run AS r LEFT JOIN orchestration_workflow AS w ON w.id = r.workflow_id
WHERE r.id = %s
"""

_RUN_SUCCEEDED = """
UPDATE orchestration_run SET status = 'succeeded', output = %s, error = '', started_at = COALESCE(started_at, %s),
    finished_at = %s, last_event_seq = %s
WHERE id = %s
"""

_CANCEL_PENDING = """
UPDATE orchestration_step SET status = 'cancelled', error = 'not run: the run succeeded', finished_at = %s,
    lease_until = %s
WHERE run_id = %s AND status = 'pending'
"""

_REPLY = """
INSERT INTO orchestration_message (conversation_id, role, content, run_id, created_at)
VALUES (%s, 'assistant', %s, %s, %s)
"""


def claim(step_id: int, delivery: str, now: datetime) -> tuple[Step, list[int]] | None:
    """Hold a pending step of an active run, not held by this delivery before; the step and its events' seqs.

    None if the step is in any other state (state.claim_step decides then).
    """
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_READ, [step_id])
        row = cursor.fetchone()
    if row is None:
        return None
    count = len(CLAIMED_FIELDS)
    fields = dict(zip(CLAIMED_FIELDS, row[:count], strict=True))
    status, held_by, run_status, conversation_id, conversation_state = row[count:]
    if status != StepStatus.PENDING or held_by == delivery or run_status not in ACTIVE_RUN_STATUSES:
        return None
    read_attempts = fields["attempts"]
    # As the ORM reads them: SQLite keeps a UUID as hex, a boolean as 0 or 1.
    fields["task_id"], fields["optional"] = uuid.UUID(fields["task_id"]), bool(fields["optional"])
    fields["attempts"] += 1
    fields["started_at"] = _aware(fields["started_at"]) or now
    fields["lease_until"] = now + timedelta(seconds=fields["time_limit"] + settings.STEP_LEASE_GRACE)
    at = _at(now)
    held = [delivery, fields["attempts"], _at(fields["started_at"]), _at(fields["lease_until"]), step_id]
    running = (step_id, "step.running", json.dumps({"attempt": fields["attempts"], "redelivered": False}))
    run_id = fields["run_id"]
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:
        cursor.execute(_RUN_STATE, [run_id])
        run = cursor.fetchone()
        if run is None or run[0] not in ACTIVE_RUN_STATUSES:  # deleted or ended since read
            return None
        run_status, last_seq, _ = run
        cursor.execute(_HOLD, [*held, held_by, read_attempts])
        if cursor.rowcount != 1:
            return None
        if run_status == RunStatus.QUEUED:  # only a run's first step starts it
            run_status = RunStatus.RUNNING
            seqs = _insert_events(cursor, run_id, last_seq, [(None, "run.running", "{}"), running], at)
            cursor.execute(_RUN_STARTED, [at, seqs[-1], run_id])
        else:
            seqs = _insert_events(cursor, run_id, last_seq, [running], at)
            cursor.execute(_RUN_EVENTS, [seqs[-1], run_id])
    announce(run_id, seqs)
    return claimed_step(fields, delivery, run_status, conversation_id, conversation_state), seqs


def store(
    step_id: int, run_id: int, output: Any, delivery: str, now: datetime, finishes_run: bool, cached: bool = False
) -> Stored | None:
    """Store the output of a step this delivery holds; None if it does not hold it (or the run has a webhook).

    ``cached``: the output came from the skill result cache (state.succeed_step).
    """
    stored_output, at = db_json(output), _at(now)
    succeeded = (step_id, "step.succeeded", json.dumps({"cached": True} if cached else {}))
    if finishes_run:
        with connection.cursor() as cursor:
            cursor.execute(_RUN_FIXED, [run_id])
            fixed = cursor.fetchone()
        if fixed is None:  # deleted meanwhile: the general way finds no step either
            return None
        webhook_url, conversation_id, workflow = fixed
        if webhook_url:  # its delivery row is built from the ended run: the general way
            return None
        from .state import reply_text  # state imports this module

        reply = reply_text(output) if conversation_id is not None else None
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:
        cursor.execute(_STORE_STEP, [stored_output, at, at, cached, step_id, delivery])
        if cursor.rowcount != 1:
            return None
        cursor.execute(_RUN_STATE, [run_id])
        run_status, last_seq, followed = cursor.fetchone()
        run_succeeds = finishes_run and run_status in ACTIVE_RUN_STATUSES
        if not run_succeeds:
            seqs = tuple(_insert_events(cursor, run_id, last_seq, [succeeded], at))
            cursor.execute(_RUN_EVENTS, [seqs[-1], run_id])
        else:
            seqs = tuple(_insert_events(cursor, run_id, last_seq, [succeeded, (None, "run.succeeded", "{}")], at))
            cursor.execute(_RUN_SUCCEEDED, [stored_output, at, at, seqs[-1], run_id])
            cursor.execute(_CANCEL_PENDING, [at, at, run_id])
            if reply is not None:
                cursor.execute(_REPLY, [conversation_id, reply, run_id, at])
        announce(run_id, seqs)
    if not finishes_run:
        return Stored(seqs)
    return Stored(seqs, run_succeeds, workflow, bool(followed) and run_succeeds)


def _insert_events(cursor: Any, run_id: int, last_seq: int, events: list[_Event], at: Any) -> list[int]:
    """Insert the run's next events, numbered after its ``last_seq``; their seqs (the caller moves the run's on).

    ``at``: their creation time as ``_at`` gives it.
    """
    seqs = [last_seq + n for n in range(1, len(events) + 1)]
    rows = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(events))
    params: list[Any] = []
    for seq, (step_id, type, data) in zip(seqs, events, strict=True):
        params += [run_id, seq, step_id, type, data, at]
    cursor.execute(
        f"INSERT INTO orchestration_runevent (run_id, seq, step_id, type, data, created_at) VALUES {rows}", params
    )
    return seqs


def _at(value: datetime) -> Any:
    """A datetime as SQLite stores it for Django (UTC, no offset)."""
    return connection.ops.adapt_datetimefield_value(value)


def _aware(value: Any) -> datetime | None:
    """A datetime column read with a plain cursor, as the ORM would give it (aware, UTC)."""
    if value is None or timezone.is_aware(value):
        return value
    return timezone.make_aware(value, UTC)
