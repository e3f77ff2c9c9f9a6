"""Run and step transitions: the one place where status changes.

Each function makes one transition with a conditional UPDATE (so a late or
repeated caller changes nothing) and writes the matching RunEvent in the same
transaction. They take ids (or a StepRef: a step's ids and the labels of its
metrics), never model instances, so tasks can call them. A function called
inside another's transaction joins it, without a savepoint (nothing here
catches an error inside a transaction and goes on). Each transition is
counted in ``orchestration.metrics`` once its transaction commits.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, cast

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from . import events, metrics, rows, state_pg, state_sqlite, webhooks
from .models import (
    ACTIVE_RUN_STATUSES,
    Compensation,
    Conversation,
    Message,
    MessageRole,
    Run,
    RunEvent,
    RunStatus,
    Step,
    StepStatus,
)

FINISHED_STEP_STATUSES = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)
UNFINISHED_STEP_STATUSES = (StepStatus.PENDING, StepStatus.RUNNING)
REPLAYABLE_RUN_STATUSES = (RunStatus.FAILED, RunStatus.CANCELLED)
# The common claim and store on these databases without the ORM's cost
# (docs/performance.md); elsewhere, and in every other case, the ORM's transactions.
_FAST_TRANSITIONS = {"postgresql": state_pg, "sqlite": state_sqlite}


class ClaimOutcome(Enum):
    """What one delivery of a step's task message may do."""

    RUN = "run"  # it holds the step: call the skill
    STORED = "stored"  # the step finished before: pass its stored output on
    DUPLICATE = "duplicate"  # another message holds the step: change nothing
    BUSY = "busy"  # a copy of the running holder's own message: ask again shortly
    RUN_ENDED = "run_ended"  # the run is over: stop this branch
    WAITING = "waiting"  # the step waits to be resumed (wait_step): stop this branch


@dataclass(frozen=True)
class Claim:
    step: Step
    outcome: ClaimOutcome


@dataclass(frozen=True)
class StepRef:
    """A step as its transitions need it: its ids, and its skill and first start for the metrics."""

    id: int
    run_id: int
    skill: str
    started_at: datetime | None
    compensates: int | None = None  # a compensation step (orchestration/saga.py): the step it undoes

    @classmethod
    def of(cls, step: Step) -> StepRef:
        return cls(step.pk, step.run_id, step.skill, step.started_at, step.compensates_id)

    @classmethod
    def load(cls, step_id: int) -> StepRef:
        fields = ("run_id", "skill", "started_at", "compensates_id")
        return cls(step_id, *Step.objects.values_list(*fields).get(pk=step_id))


def record(run_id: int, type: str, step_id: int | None = None, error: str = "", **data: Any) -> int:
    """Write the run's next event, and announce it to its streams once committed; its seq.

    Taking the next ``seq`` locks the run's row until the transaction ends,
    so a run's events commit in ``seq`` order (orchestration.events relies
    on it to resume a stream).
    """
    if error:
        data["error"] = error
    with transaction.atomic(savepoint=False):
        seq = _insert_event(run_id, step_id, type, data)
    transaction.on_commit(lambda: events.announce(run_id, seq))
    return seq


def first_event(type: str, **data: Any) -> rows.Insert:
    """A new run's first event (seq 1), its INSERT built before the run's transaction (services.prepare_run)."""
    return rows.Insert.of([RunEvent(seq=1, type=type, data=data)], later={"run_id"})


def insert_run(run: rows.Insert, steps: rows.Insert, first_event: rows.Insert, waiting_for: int | None) -> None:
    """Insert a new run (``last_event_seq`` 1), its steps and its ``first_event``; announce that once committed.

    Seq 1 without ``record``'s lock on the run's row: no other event of a
    run that is being inserted exists. On PostgreSQL one statement
    (rows.insert_family), its own transaction outside one.
    """
    rows.insert_family(run, [steps, first_event], link="run_id", waiting_for_id=waiting_for)
    run_id = run.rows[0].pk
    transaction.on_commit(lambda: events.announce(run_id, 1))


def _insert_event(run_id: int, step_id: int | None, type: str, data: dict[str, Any]) -> int:
    """Take the run's next seq and insert the event with it; the seq.

    On PostgreSQL that is one statement (a data-modifying WITH), a round
    trip fewer per event; elsewhere an UPDATE ... RETURNING, then the INSERT.
    """
    quote = connection.ops.quote_name
    take_seq = (
        f"UPDATE {quote(Run._meta.db_table)} SET last_event_seq = last_event_seq + 1 WHERE id = %s"
        " RETURNING last_event_seq"
    )
    with connection.cursor() as cursor:
        if connection.vendor != "postgresql":
            cursor.execute(take_seq, [run_id])
            seq = int(cursor.fetchone()[0])
            RunEvent.objects.create(run_id=run_id, seq=seq, step_id=step_id, type=type, data=data)
            return seq
        data_field = cast(models.JSONField, RunEvent._meta.get_field("data"))
        time_field = cast(models.DateTimeField, RunEvent._meta.get_field("created_at"))
        # INSERT ... SELECT FROM next, not VALUES with a subquery: the row, and
        # its id from the sequence, are made only once the run's row is locked,
        # so a run's events' ids run in the order of their seqs.
        cursor.execute(
            f"WITH next AS ({take_seq}) INSERT INTO {quote(RunEvent._meta.db_table)}"
            " (run_id, seq, step_id, type, data, created_at)"
            " SELECT %s, last_event_seq, %s, %s, %s, %s FROM next RETURNING seq",
            [
                run_id,
                run_id,
                step_id,
                type,
                data_field.get_db_prep_value(data, connection),
                time_field.get_db_prep_value(timezone.now(), connection),
            ],
        )
        return int(cursor.fetchone()[0])


def claim_step(step_id: int, delivery: str, resuming: bool = False) -> Claim:
    """Decide what one delivery of a step's message may do, and record it.

    ``delivery`` identifies the task message (it survives redelivery, not
    re-publishing). The message that claims a pending step holds it
    (``Step.delivery``) and may pass on its stored output once it finished.
    While the step runs, no message may claim it, except the holder itself
    retrying after a database outage (``resuming``). A copy of the holder's
    own message (Redis hands back unacknowledged messages when a worker's
    connection drops, and that worker stops their tasks) is BUSY: it asks
    again shortly, by when the worker has released the step
    (``release_lost_step``) or it finished. Once the step's lease ran out its
    holder is gone for sure, and the copy takes the step over. A finished step
    whose holder was cleared (a replay, or the sweeper resuming a stalled
    run) is taken over by the first message that asks. Any other message is
    a duplicate and changes nothing, so a step runs once at a time and its
    successor is not run twice. A compensation step (orchestration/saga.py)
    runs although its run ended: that is when it runs (the ORM path; the
    fast paths, state_pg and state_sqlite, claim steps of active runs only).
    """
    if fast := _FAST_TRANSITIONS.get(connection.vendor):  # the common case without the ORM
        claimed = fast.claim(step_id, delivery, timezone.now())
        if claimed is not None:
            return Claim(step=claimed[0], outcome=ClaimOutcome.RUN)
    with transaction.atomic(savepoint=False):
        step = Step.objects.select_related("run", "run__conversation").get(pk=step_id)
        if step.status in FINISHED_STEP_STATUSES:
            outcome = _take_over(step, delivery)
        elif step.run.status not in ACTIVE_RUN_STATUSES and step.compensates_id is None:
            outcome = ClaimOutcome.RUN_ENDED
        elif step.status == StepStatus.RUNNING and step.wait is not None:
            outcome = ClaimOutcome.WAITING
        elif step.status == StepStatus.PENDING or (resuming and step.delivery == delivery):
            outcome = _hold(step, delivery)
        elif step.delivery == delivery:
            outcome = _hold_own_copy(step, delivery)
        else:
            outcome = ClaimOutcome.DUPLICATE
    return Claim(step=step, outcome=outcome)


def _hold_own_copy(step: Step, delivery: str) -> ClaimOutcome:
    if step.lease_until is not None and step.lease_until > timezone.now():
        return ClaimOutcome.BUSY
    # Past its hard time limit and grace: the process that held it is gone.
    release_lost_step(step.pk, delivery)
    step.refresh_from_db(fields=["status", "redeliveries", "error"])
    if step.status != StepStatus.PENDING:
        return ClaimOutcome.RUN_ENDED  # it gave up, and failed the run
    return _hold(step, delivery)


def _hold(step: Step, delivery: str) -> ClaimOutcome:
    _lock_run(step.run_id)
    now = timezone.now()
    redelivered = step.status == StepStatus.PENDING and step.delivery == delivery
    held = Step.objects.filter(pk=step.pk, status=step.status, delivery=step.delivery).update(
        status=StepStatus.RUNNING,
        delivery=delivery,
        attempts=F("attempts") + 1,
        started_at=Coalesce(F("started_at"), Value(now)),
        lease_until=now + timedelta(seconds=step.time_limit + settings.STEP_LEASE_GRACE),
    )
    if not held:
        return ClaimOutcome.DUPLICATE
    step.status, step.delivery = StepStatus.RUNNING, delivery
    step.attempts += 1
    step.started_at = step.started_at or now
    if step.run.status == RunStatus.QUEUED:  # only a run's first step starts it
        _start_run(step.run_id, now)
    record(step.run_id, "step.running", step.pk, attempt=step.attempts, redelivered=redelivered)
    return ClaimOutcome.RUN


def release_lost_step(step_id: int, delivery: str, counted: bool = True) -> bool:
    """The process running this delivery of the step is gone; its message may come back.

    The step is pending again, still held by that delivery, so the returning
    message runs it. A ``counted`` loss (the process died) is a redelivery:
    after STEP_MAX_REDELIVERIES the step fails instead, and its run with it,
    so a step that keeps killing its worker does not loop. False if the
    delivery no longer held a running step (it finished, or was taken over).
    """
    held = Step.objects.filter(pk=step_id, status=StepStatus.RUNNING, delivery=delivery)
    with transaction.atomic(savepoint=False):
        row = held.values_list("run_id", "redeliveries", "skill").first()
        if row is None:
            return False
        run_id, redeliveries, skill = row
        _lock_run(run_id)
        if counted and redeliveries >= settings.STEP_MAX_REDELIVERIES:
            lost = redeliveries + 1
            error = f"gave up: its worker was lost {lost} times while running it (crash or out of memory?)"
            return fail_step(step_id, error)
        error = "its worker process was lost" if counted else "stopped by its worker: the broker connection was lost"
        released = held.update(status=StepStatus.PENDING, redeliveries=F("redeliveries") + int(counted), error=error)
        if released:
            record(run_id, "step.released", step_id, error=error, redeliveries=redeliveries + int(counted))
            if counted:
                metrics.step_redelivered(skill)
    return bool(released)


def _take_over(step: Step, delivery: str) -> ClaimOutcome:
    if step.delivery == delivery:
        return ClaimOutcome.STORED
    if not step.delivery and Step.objects.filter(pk=step.pk, delivery="").update(delivery=delivery):
        return ClaimOutcome.STORED
    return ClaimOutcome.DUPLICATE


def _start_run(run_id: int, now: Any) -> None:
    if Run.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(status=RunStatus.RUNNING, started_at=now):
        record(run_id, "run.running")


def succeed_step(step: StepRef, output: Any, delivery: str, finishes_run: bool = False, cached: bool = False) -> bool:
    """Store a step's output; False if ``delivery`` no longer holds it.

    With ``finishes_run`` (the spec's last step) the run succeeds with that
    output in the same transaction. ``cached``: the output came from the
    skill result cache (Step.cached, and ``{"cached": true}`` in the event).
    A compensation step's end moves its run's rollback on (orchestration/saga.py).
    """
    fast = _FAST_TRANSITIONS.get(connection.vendor)
    if fast and step.compensates is None:  # without the ORM, unless a webhook
        now = timezone.now()
        stored = fast.store(step.id, step.run_id, output, delivery, now, finishes_run, cached)
        if stored is not None:
            metrics.step_finished(step.skill, StepStatus.SUCCEEDED, step.started_at, now)
            if stored.run_succeeded:
                metrics.run_finished(stored.workflow, RunStatus.SUCCEEDED)
                if stored.followed:
                    _run_ended(step.run_id)
            return True
    return _finish_step(step, StepStatus.SUCCEEDED, output, delivery=delivery, finishes_run=finishes_run, cached=cached)


def skip_step(
    step: StepRef, error: str, delivery: str, finishes_run: bool = False, timed_out: bool = False, output: Any = None
) -> bool:
    """An optional step that failed (or whose circuit is open): it yields ``output`` (its skill's fallback,
    null by default) and the run goes on (or, the last step, succeeds with it)."""
    skipped = _finish_step(step, StepStatus.SKIPPED, output, error=error, delivery=delivery, finishes_run=finishes_run)
    if skipped and timed_out:
        metrics.step_timed_out(step.skill)
    return skipped


def cancel_step(step: StepRef, reason: str) -> None:
    """A step that was waiting (queued or between attempts) when its run ended."""
    _finish_step(step, StepStatus.CANCELLED, error=reason)


def retry_step(step: StepRef, error: str, countdown: float, timed_out: bool = False) -> None:
    """The attempt failed (``timed_out``: at its soft limit); the step waits ``countdown`` seconds for the next."""
    lease = timezone.now() + timedelta(seconds=countdown + settings.STEP_LEASE_GRACE)
    with transaction.atomic(savepoint=False):
        _lock_run(step.run_id)
        retried = Step.objects.filter(pk=step.id, status=StepStatus.RUNNING).update(
            status=StepStatus.PENDING, error=error, lease_until=lease
        )
        record(step.run_id, "step.retrying", step.id, error=error, countdown=round(countdown, 3))
        if retried:
            metrics.step_retried(step.skill, timed_out)


def wait_step(step: StepRef, delivery: str, wait: dict[str, Any]) -> bool:
    """The held step's skill asked to wait (skills.registry.Wait): the step waits, its run too.

    The step stays ``running`` with ``wait`` set and no worker holding it
    (its message is acknowledged: a message that asks for it finds it
    WAITING and stops), its lease until the wait times out: after
    ``wait["timeout"]`` seconds, capped by the run's deadline, or at the
    deadline. ``wait`` gains ``timeout_at``. Only resume_waiting or the
    sweeper (a timeout, or the deadline) move it on. False if ``delivery``
    no longer holds the step, or it waits already; a run that ended
    meanwhile cancels it (False too).
    """
    now = timezone.now()
    deadline = Run.objects.values_list("deadline", flat=True).get(pk=step.run_id)
    timeout = wait.get("timeout")
    until = deadline if timeout is None else min(deadline, now + timedelta(seconds=timeout))
    wait = {**wait, "timeout_at": until.isoformat()}
    held = Step.objects.filter(pk=step.id, status=StepStatus.RUNNING, delivery=delivery, wait__isnull=True)
    with transaction.atomic(savepoint=False):
        _lock_run(step.run_id)
        if not held.update(wait=wait, lease_until=until, error=""):
            return False
        if not Run.objects.filter(pk=step.run_id, status__in=ACTIVE_RUN_STATUSES).update(status=RunStatus.WAITING):
            _finish_step(step, StepStatus.CANCELLED, error="not run: the run ended")
            return False
        key = Step.objects.values_list("key", flat=True).get(pk=step.id)
        record(step.run_id, "run.waiting", step.id, step=key, prompt=wait["prompt"], timeout_at=wait["timeout_at"])
    return True


def resume_waiting(
    run_id: int, payload: Any, by: str, final_paths: Collection[str], step_id: int | None = None
) -> str | None:
    """A waiting run's first waiting step (or step ``step_id``) succeeds with ``payload``; its key, or None.

    Its run is ``running`` again unless another of its steps still waits, and
    its finished steps may be passed on by the canvas published again (as
    after a replay). When that step is the spec's last (its path is one of
    ``final_paths``: a spec ending with a switch has one per case) the run
    succeeds with the payload instead. None, changing
    nothing, if the run is not waiting (or that step does not wait): of
    concurrent calls exactly one resumes a step (the run's row is locked
    first, then checked).
    """
    now = timezone.now()
    waiting = Step.objects.filter(run_id=run_id, status=StepStatus.RUNNING, wait__isnull=False).order_by("id")
    answered = waiting if step_id is None else waiting.filter(pk=step_id)
    with transaction.atomic(savepoint=False):
        if not Run.objects.filter(pk=run_id, status=RunStatus.WAITING).update(republished_at=now):
            return None
        row = answered.values_list("pk", "key", "path", "skill", "started_at", "wait").first()
        if row is None:
            return None
        step_id, key, path, skill, started_at, wait = row
        output = answered_output(wait or {}, payload)
        # A fresh task id, as a replay gives: the task that asked to wait ended
        # halted, and a chord it belongs to would count that stored failure
        # against the canvas published now.
        Step.objects.filter(pk=step_id).update(
            status=StepStatus.SUCCEEDED,
            output=output,
            error="",
            finished_at=now,
            lease_until=now,
            task_id=uuid.uuid4(),
        )
        Step.objects.filter(run_id=run_id, status__in=FINISHED_STEP_STATUSES).update(delivery="")
        if not waiting.exists():
            Run.objects.filter(pk=run_id).update(status=RunStatus.RUNNING)
        record(run_id, "step.succeeded", step_id, resumed=True)
        record(run_id, "run.resumed", step_id, step=key, by=by)
        metrics.step_finished(skill, StepStatus.SUCCEEDED, started_at, now)
        if path in final_paths:
            succeed_run(run_id, output)
    return str(key)


def route_switch(
    run_id: int, switch: str, field: str, value: str | None, case: str | None, path: str, untaken: list[int]
) -> bool:
    """A switch sends its input to the case at ``path`` (``case`` its value; None: the default).

    The pending steps of the cases not taken (``untaken``) are skipped, with
    the error "not routed: <field>=<value>", each with its event; the run
    gets one ``switch.routed`` event per switch (a canvas published again,
    after a resume or a replay, routes the same stored input the same way,
    and changes nothing). False, changing nothing, if the run is not active.
    """
    rows = Step.objects.filter(pk__in=untaken, status=StepStatus.PENDING)
    error = f"not routed: {field}={value}" if value is not None else f"not routed: {field} is missing"
    with transaction.atomic(savepoint=False):
        if not _lock_active(run_id):
            return False
        if not RunEvent.objects.filter(run_id=run_id, type="switch.routed", data__switch=switch).exists():
            record(run_id, "switch.routed", switch=switch, field=field, value=value, case=case, path=path)
        for row in rows.values_list("pk", "run_id", "skill", "started_at", "compensates_id"):
            _finish_step(StepRef(*row), StepStatus.SKIPPED, error=error)
    return True


def fail_unrouted(run_id: int, switch: str, field: str, value: str | None, error: str) -> bool:
    """A switch without a default found no case for its input: its run fails with ``error``.

    False, changing nothing, if the run is not active.
    """
    with transaction.atomic(savepoint=False):
        if not _lock_active(run_id):
            return False
        record(run_id, "switch.unmatched", switch=switch, field=field, value=value)
        return fail_run(run_id, error)


def run_of_step(step_id: int) -> int:
    return Step.objects.values_list("run_id", flat=True).get(pk=step_id)


def _lock_run(run_id: int) -> None:
    """Lock the run's row until the transaction ends: a transition that changes a step locks its run first.

    Whatever ends a run locks its row and then its steps (``_end_run``), and
    so do the one-statement claim and store (state_pg). A transition that
    updated a step and then took its run's next event seq locked them the
    other way round, and the two could deadlock. SQLite needs no row lock:
    a transaction there holds the database's one write lock (settings).
    """
    if connection.features.has_select_for_update:
        list(Run.objects.select_for_update(no_key=True).filter(pk=run_id).values_list("pk"))


def _lock_active(run_id: int) -> bool:
    """Lock the run's row (until the transaction ends) if it is active; whether it is."""
    active = Run.objects.select_for_update().filter(pk=run_id, status__in=ACTIVE_RUN_STATUSES)
    return active.values_list("pk", flat=True).first() is not None


def answered_output(wait: dict[str, Any], payload: Any) -> Any:
    """A resumed step's output: the payload, merged over the wait's ``base`` when both are objects."""
    base = wait.get("base")
    if isinstance(base, dict) and isinstance(payload, dict):
        return {**base, **payload}
    return payload


def fail_step(step_id: int, error: str, status: str = StepStatus.FAILED, task_id: str | None = None) -> bool:
    """Fail (or time out) a step and with it the run. False if already final or gone.

    With ``task_id``, only while the step still has that task id: news about
    a task of an earlier replay changes nothing.
    """
    steps = Step.objects.filter(pk=step_id)
    if task_id is not None:
        steps = steps.filter(task_id=task_id)
    row = steps.values_list("run_id", "key", "skill", "started_at", "compensates_id").first()
    if row is None:
        return False
    run_id, key, skill, started_at, compensates = row
    ref = StepRef(step_id, run_id, skill, started_at, compensates)
    with transaction.atomic(savepoint=False):
        # The task id is checked again as the step changes: a replay may give it a new one in between.
        changed = _finish_step(ref, status, error=error, task_id=task_id)
        if changed:
            fail_run(run_id, f"step {key} {status.replace('_', ' ')}: {error}")
    return changed


def _finish_step(
    step: StepRef,
    status: str,
    output: Any = None,
    error: str = "",
    delivery: str | None = None,
    finishes_run: bool = False,
    task_id: str | None = None,
    cached: bool = False,
) -> bool:
    steps = Step.objects.filter(pk=step.id, status__in=UNFINISHED_STEP_STATUSES)
    if delivery is not None:
        steps = steps.filter(status=StepStatus.RUNNING, delivery=delivery)
    if task_id is not None:
        steps = steps.filter(task_id=task_id)
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        _lock_run(step.run_id)
        changed = steps.update(
            status=status, output=output, error=error, finished_at=now, lease_until=now, cached=cached
        )
        if changed:
            # Only a cache hit says so: the events of every other step stay as they were.
            record(step.run_id, f"step.{status}", step.id, error=error, **({"cached": True} if cached else {}))
            metrics.step_finished(step.skill, status, step.started_at, now)
            if finishes_run:
                succeed_run(step.run_id, output)
            if step.compensates is not None:
                from . import saga  # it imports this module

                saga.step_ended(step, status, error)
    return bool(changed)


def fail_run(run_id: int, error: str) -> bool:
    """End an active run as failed; steps that never started are cancelled.

    Its compensable steps that succeeded are compensated (orchestration/saga.py).
    """
    return _end_run(run_id, RunStatus.FAILED, error=error) is not None


def succeed_run(run_id: int, output: Any) -> bool:
    """End a running run with its output; its conversation gets the reply."""
    return _end_run(run_id, RunStatus.SUCCEEDED, output=output) is not None


def cancel_run(run_id: int, reason: str) -> list[str] | None:
    """Cancel an active run and all its unfinished steps.

    Returns the task ids to revoke (and terminate, if running), or None when
    the run had already ended.
    """
    return _end_run(run_id, RunStatus.CANCELLED, error=reason, running=StepStatus.CANCELLED)


def expire_run(run_id: int) -> list[str] | None:
    """Fail an active run that passed its deadline; its running steps time out.

    Returns the task ids to revoke and terminate, or None if it had ended.
    """
    run = Run.objects.filter(pk=run_id).values("created_at", "deadline").first()
    if run is None:
        return None
    allowed = (run["deadline"] - run["created_at"]).total_seconds()
    error = f"deadline exceeded: the run did not finish within {round(allowed, 1):g}s"
    return _end_run(run_id, RunStatus.FAILED, error=error, running=StepStatus.TIMED_OUT)


def _end_run(
    run_id: int, status: str, output: Any = None, error: str = "", running: str | None = None
) -> list[str] | None:
    """End an active run; a run that succeeded gives its conversation the reply.

    Its pending steps are cancelled; with ``running``, its running steps end
    with that status too (they are to be terminated). Returns the task ids of
    the steps it ended, or None if the run was not active.
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        ended = Run.objects.filter(pk=run_id, status__in=ACTIVE_RUN_STATUSES).update(
            status=status,
            output=output,
            error=error,
            started_at=Coalesce(F("started_at"), Value(now)),
            finished_at=now,
        )
        if not ended:
            return None
        # The metrics' label, where the reply goes, whether a webhook waits and
        # a run is held behind it: one query whatever the outcome.
        workflow, conversation_id, webhook_url, followed = Run.objects.values_list(
            "workflow__name", "conversation_id", "webhook_url", "followed"
        ).get(pk=run_id)
        task_ids = _end_steps(run_id, status, error, running, now)
        seq = record(run_id, f"run.{status}", error=error)
        if status == RunStatus.FAILED:
            from . import saga  # it imports this module

            saga.plan(run_id, now)
        if status == RunStatus.SUCCEEDED and conversation_id is not None:
            _append_reply(conversation_id, run_id, output)
        if webhook_url:
            webhooks.schedule(run_id, seq)
        if followed:
            _run_ended(run_id)
        metrics.run_finished(workflow, status)
    return task_ids


def _run_ended(run_id: int) -> None:
    """A run that a run was held behind ended: once committed, the held run starts."""
    from . import double_texting  # it imports this module

    double_texting.release_on_commit(run_id)


def _end_steps(run_id: int, status: str, error: str, running: str | None, now: datetime) -> list[str]:
    """End the unfinished steps of a run that ended with ``status``; their task ids."""
    waiting = (StepStatus.PENDING, StepStatus.RUNNING) if running else (StepStatus.PENDING,)
    steps = Step.objects.filter(run_id=run_id, status__in=waiting)
    # A run that succeeded has no step left to revoke (each is upstream of its last one): no query for them.
    fields = ("task_id", "skill", "status", "started_at")
    ending = [] if status == RunStatus.SUCCEEDED else list(steps.values_list(*fields))
    reason = error if running else f"not run: the run {status}"
    steps.filter(status=StepStatus.PENDING).update(
        status=StepStatus.CANCELLED, error=f"not run: the run {status}", finished_at=now, lease_until=now
    )
    if running:
        steps.filter(status=StepStatus.RUNNING).update(
            status=running, error=f"stopped: {reason}", finished_at=now, lease_until=now
        )
    for _, skill, was, started_at in ending:
        ended_as = running if running and was == StepStatus.RUNNING else StepStatus.CANCELLED
        metrics.step_finished(skill, ended_as, started_at, now)
    return [str(task_id) for task_id, *_ in ending]


def replay_run(run_id: int, deadline: datetime) -> bool:
    """Make a failed or cancelled run queued again, keeping finished steps.

    Steps that succeeded (or were skipped) keep their output and are passed on
    by the first message that asks; every other step is pending again with a
    fresh task id (its old one may be revoked, or have a failed result that a
    chord would count); compensated steps run again, compensation steps are
    kept as a record. False if the run is not failed or cancelled, or is
    still being rolled back (orchestration/saga.py).
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        replayable = Run.objects.filter(pk=run_id, status__in=REPLAYABLE_RUN_STATUSES)
        replayed = replayable.exclude(compensation=Compensation.RUNNING).update(
            status=RunStatus.QUEUED,
            output=None,
            error="",
            started_at=None,
            finished_at=None,
            deadline=deadline,
            replays=F("replays") + 1,
            republished_at=now,
            waiting_for=None,  # a run that ended while held is published at once when replayed
            compensation=Compensation.NONE,
        )
        if not replayed:
            return False
        metrics.run_started(Run.objects.values_list("workflow__name", flat=True).get(pk=run_id))
        kept = Step.objects.filter(run_id=run_id, status__in=FINISHED_STEP_STATUSES).update(delivery="")
        spec_steps = Step.objects.filter(run_id=run_id, compensates__isnull=True)
        redo = list(spec_steps.exclude(status__in=FINISHED_STEP_STATUSES))
        for step in redo:
            step.status, step.output, step.error, step.delivery, step.wait = StepStatus.PENDING, None, "", "", None
            step.attempts = step.redeliveries = 0
            step.started_at = step.finished_at = step.lease_until = None
            step.task_id = uuid.uuid4()
        Step.objects.bulk_update(redo, fields=[*_RESET_STEP_FIELDS, "task_id"])
        record(run_id, "run.replayed", kept=kept, redo=len(redo))
    return True


_RESET_STEP_FIELDS = [
    "status",
    "output",
    "error",
    "delivery",
    "attempts",
    "redeliveries",
    "started_at",
    "finished_at",
    "lease_until",
    "wait",
]


def resume_run(run_id: int) -> bool:
    """Make a stalled run's canvas publishable again (for the sweeper).

    Running steps whose lease ran out lost their worker: they are pending
    again (a redelivery, capped like one), and finished steps may be passed
    on by the re-published canvas. False if the run ended meanwhile, or a lost
    step gave up and failed it.
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        _lock_run(run_id)
        lost = list(Step.objects.filter(run_id=run_id, status=StepStatus.RUNNING, lease_until__lt=now))
        for step in lost:
            if step.redeliveries >= settings.STEP_MAX_REDELIVERIES:
                fail_step(step.pk, f"gave up: its worker was lost {step.redeliveries + 1} times while running it")
                return False
        Step.objects.filter(pk__in=[s.pk for s in lost], status=StepStatus.RUNNING).update(
            status=StepStatus.PENDING,
            delivery="",
            redeliveries=F("redeliveries") + 1,
            error="its worker was lost; resumed by the sweeper",
        )
        for step in lost:
            metrics.step_redelivered(step.skill)
        Step.objects.filter(run_id=run_id, status__in=FINISHED_STEP_STATUSES).update(delivery="")
        resumed = Run.objects.filter(pk=run_id, status__in=(RunStatus.QUEUED, RunStatus.RUNNING)).update(
            republished_at=now
        )
        if resumed:
            record(run_id, "run.resumed", lost_steps=[s.key for s in lost])
    return bool(resumed)


def release_run(run_id: int, after: int) -> bool:
    """Release a run held behind ``after``, which ended: it is to be published now.

    Its deadline starts over (a run's time counts from when it may start),
    and so does the sweeper's stall clock. False if it is no longer held
    behind ``after`` (released meanwhile, or ended).
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        row = Run.objects.filter(pk=run_id).values_list("created_at", "deadline").first()
        if row is None:
            return False
        created_at, deadline = row
        released = Run.objects.filter(pk=run_id, status=RunStatus.QUEUED, waiting_for_id=after).update(
            waiting_for=None, republished_at=now, deadline=now + (deadline - created_at)
        )
        if released:
            record(run_id, "run.released", after=after)
    return bool(released)


def hold_behind(run_id: int, ahead: int) -> None:
    """The new run ``run_id`` is held behind ``ahead`` (double-texting): ``ahead``'s end is to release it.

    ``Run.followed`` tells that end so without a query: on PostgreSQL the
    statement that ends ``ahead`` waits for this transaction (the admission
    locked ``ahead``'s row) and then reads the flag from the row it updates.
    """
    _followed(ahead)
    record(run_id, "run.enqueued", waiting_for=ahead)


def _followed(run_id: int) -> None:
    Run.objects.filter(pk=run_id).update(followed=True)


def move_up(run_id: int, ended: int, ahead: int) -> bool:
    """A run held behind ``ended`` (which ended before it started) waits for ``ahead`` instead."""
    with transaction.atomic(savepoint=False):
        moved = Run.objects.filter(pk=run_id, status=RunStatus.QUEUED, waiting_for_id=ended).update(
            waiting_for_id=ahead
        )
        if moved:
            _followed(ahead)
            record(run_id, "run.enqueued", waiting_for=ahead, moved_up_from=ended)
    return bool(moved)


def mark_unpublished(run_id: int, error: str) -> None:
    """The run's canvas could not be published: the next sweep publishes it.

    Setting ``republished_at`` back by RUN_STALL_AFTER makes the run look
    stalled at once (its steps have no lease yet).
    """
    due = timezone.now() - timedelta(seconds=settings.RUN_STALL_AFTER + 1)
    with transaction.atomic(savepoint=False):
        Run.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(republished_at=due)
        record(run_id, "run.publish_failed", error=error)


def update_conversation_state(conversation_id: int, run_id: int, step_id: int, values: dict[str, Any]) -> None:
    """Merge ``values`` into the conversation's state (top-level keys replaced), with a run event naming them.

    The row is locked while it is read and written, so concurrent runs of one
    conversation lose no key; writing the same values twice (a retried step)
    leaves the same state.
    """
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().only("state").get(pk=conversation_id)
        conversation.state = {**conversation.state, **values}
        conversation.save(update_fields=["state", "updated_at"])
        record(run_id, "conversation.state_updated", step_id, keys=sorted(values))


def _append_reply(conversation_id: int, run_id: int, output: Any) -> None:
    Message.objects.create(
        conversation_id=conversation_id, role=MessageRole.ASSISTANT, content=reply_text(output), run_id=run_id
    )


def reply_text(output: Any) -> str:
    """The assistant message for a run's output: its text, else its JSON."""
    if isinstance(output, str):
        return output
    if isinstance(output, dict):
        for field in ("reply", "content", "text"):
            if isinstance(output.get(field), str):
                return str(output[field])
    return json.dumps(output, ensure_ascii=False)
