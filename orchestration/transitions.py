"""Run and step transitions: the one place where a run or a step changes status.

Each locks its run's row first, changes rows only where they are as it
expects (a late or repeated caller changes nothing), and writes the run's
events in the same transaction; what follows a run's end is ``run_ended``'s receivers'.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.dispatch import Signal
from django.utils import timezone

from . import events, metrics, transitions_pg
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

# Sent inside the transaction that ended a run, after its last event: ``run`` (a RunEnded).
run_ended = Signal()
# Sent inside the transaction that ended a compensation step: ``step`` (a StepRef), ``status`` and ``error``.
compensation_ended = Signal()


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
    step: Step  # with its run and the run's conversation
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


@dataclass(frozen=True)
class RunEnded:
    """A run that just ended, as the receivers of ``run_ended`` need it."""

    id: int
    status: str
    event_seq: int  # its terminal event's
    at: datetime
    webhook_url: str
    followed: bool  # a run is held behind it (double-texting)


class LockedRun:
    """A run's row, locked until the transaction ends, and what one transition writes to it.

    ``event`` numbers events after the run's last; ``write`` stores them and the ``set`` fields.
    """

    def __init__(self, run_id: int, status: str, last_event_seq: int) -> None:
        self.id = run_id
        self._status: str = status
        self._last_event_seq: int | None = last_event_seq
        self._fields: dict[str, Any] = {}
        self._events: list[RunEvent] = []

    @property
    def status(self) -> str:
        self._read_if_written()
        return self._status

    def event(self, type: str, step_id: int | None = None, error: str = "", **data: Any) -> int:
        """Add the run's next event; its seq."""
        if error:
            data["error"] = error
        self._read_if_written()
        assert self._last_event_seq is not None
        self._last_event_seq += 1
        self._events.append(RunEvent(run_id=self.id, seq=self._last_event_seq, step_id=step_id, type=type, data=data))
        return self._last_event_seq

    def set(self, **fields: Any) -> None:
        self._read_if_written()
        self._fields.update(fields)
        self._status = fields.get("status", self._status)

    def write(self) -> None:
        """Store the fields set and the events added; the events are announced to the run's streams once committed."""
        if self._events:
            self._fields["last_event_seq"] = last = self._events[-1].seq
            RunEvent.objects.bulk_create(self._events)
            _announce(self.id, last)
        if self._fields:
            Run.objects.filter(pk=self.id).update(**self._fields)
            self._last_event_seq = None
        self._fields, self._events = {}, []

    def _read_if_written(self) -> None:
        if self._last_event_seq is None:
            self._status, self._last_event_seq = Run.objects.values_list("status", "last_event_seq").get(pk=self.id)


def _announce(run_id: int, last_event_seq: int) -> None:
    """Tell the run's streams, once committed, that its events up to this seq are there."""
    transaction.on_commit(lambda: events.announce(run_id, last_event_seq))


def lock_run(run_id: int) -> LockedRun:
    """Lock the run's row until the transaction ends; call inside one.

    A transition that changes a step locks its run first, as ending a run does (the other order deadlocks).
    """
    runs = Run.objects.filter(pk=run_id)
    if connection.features.has_select_for_update:
        runs = runs.select_for_update(no_key=True)
    status, last_event_seq = runs.values_list("status", "last_event_seq").get()
    return LockedRun(run_id, status, last_event_seq)


def record(run_id: int, type: str, step_id: int | None = None, error: str = "", **data: Any) -> int:
    """Write the run's next event (announced to its streams once committed); its seq."""
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        seq = run.event(type, step_id, error, **data)
        run.write()
    return seq


# --- A run's start --------------------------------------------------------------------


def insert_run(run: Run, steps: list[Step], waiting_for: int | None = None) -> None:
    """Insert a new queued run, its pending steps and its first event (``run.queued``).

    With ``waiting_for`` it is held behind that run, which is told so (``Run.followed``; event ``run.enqueued``).
    """
    queued = [RunEvent(seq=1, type="run.queued", data={"steps": len(steps)})]
    if waiting_for is not None:
        queued.append(RunEvent(seq=2, type="run.enqueued", data={"waiting_for": waiting_for}))
    run.waiting_for_id, run.last_event_seq = waiting_for, len(queued)
    if connection.vendor == "postgresql" and waiting_for is None:
        transitions_pg.insert_run(run, steps, queued)  # the common case, in one statement
    else:
        _insert_run(run, steps, queued, waiting_for)
    _announce(run.pk, run.last_event_seq)
    metrics.run_started(run.workflow.name if run.workflow else None)


def _insert_run(run: Run, steps: list[Step], events: list[RunEvent], waiting_for: int | None) -> None:
    with transaction.atomic(savepoint=False):
        run.save(force_insert=True)
        if waiting_for is not None:
            Run.objects.filter(pk=waiting_for).update(followed=True)
        for row in [*steps, *events]:
            row.run = run  # type: ignore[attr-defined]
        Step.objects.bulk_create(steps)
        RunEvent.objects.bulk_create(events)


# --- A step's claim ---------------------------------------------------------------


def claim_step(step_id: int, delivery: str, resuming: bool = False) -> Claim:
    """Decide what one delivery of a step's message may do, and record it (docs/design.md, "A step's claim").

    ``resuming``: the holder's own delivery, retrying after a database outage.
    """
    if connection.vendor == "postgresql" and (held := transitions_pg.claim(step_id, delivery, timezone.now())):
        step, last_event_seq = held  # the common case, in one statement
        _announce(step.run_id, last_event_seq)
        return Claim(step=step, outcome=ClaimOutcome.RUN)
    with transaction.atomic(savepoint=False):
        steps = Step.objects.select_related("run", "run__conversation")
        if connection.features.has_select_for_update:
            steps = steps.select_for_update(of=("run",), no_key=True)
        step = steps.get(pk=step_id)
        run = LockedRun(step.run_id, step.run.status, step.run.last_event_seq)
        outcome = _claim_outcome(run, step, delivery, resuming)
        if outcome is ClaimOutcome.RUN:
            outcome = _hold(run, step, delivery)
        elif outcome is ClaimOutcome.STORED:
            outcome = _take_over(step, delivery)
        step.run.status = run.status
        run.write()
    return Claim(step=step, outcome=outcome)


def _claim_outcome(run: LockedRun, step: Step, delivery: str, resuming: bool) -> ClaimOutcome:
    if step.status in FINISHED_STEP_STATUSES:
        return ClaimOutcome.STORED
    if run.status not in ACTIVE_RUN_STATUSES and step.compensates_id is None:
        return ClaimOutcome.RUN_ENDED  # a compensation step runs once its run ended
    if step.status == StepStatus.RUNNING and step.wait is not None:
        return ClaimOutcome.WAITING
    if step.status == StepStatus.PENDING or (resuming and step.delivery == delivery):
        return ClaimOutcome.RUN
    if step.delivery != delivery:
        return ClaimOutcome.DUPLICATE
    if step.lease_until is not None and step.lease_until > timezone.now():
        return ClaimOutcome.BUSY
    # Past its hard time limit and grace: the process that held it is gone.
    if not _release(run, step.pk, delivery, counted=True):
        return ClaimOutcome.RUN_ENDED  # it gave up, and failed the run
    step.refresh_from_db(fields=["status", "redeliveries", "error"])
    return ClaimOutcome.RUN


def _hold(run: LockedRun, step: Step, delivery: str) -> ClaimOutcome:
    """The delivery holds the step (running), and its run starts if it was queued."""
    now = timezone.now()
    redelivered = step.status == StepStatus.PENDING and step.delivery == delivery
    attempts, started_at = step.attempts + 1, step.started_at or now
    lease_until = now + timedelta(seconds=step.time_limit + settings.STEP_LEASE_GRACE)
    held = Step.objects.filter(pk=step.pk, status=step.status, delivery=step.delivery).update(
        status=StepStatus.RUNNING, delivery=delivery, attempts=attempts, started_at=started_at, lease_until=lease_until
    )
    if not held:
        return ClaimOutcome.DUPLICATE
    step.status, step.delivery, step.attempts = StepStatus.RUNNING, delivery, attempts
    step.started_at, step.lease_until = started_at, lease_until
    if run.status == RunStatus.QUEUED:  # only a run's first step starts it
        run.set(status=RunStatus.RUNNING, started_at=now)
        run.event("run.running")
    run.event("step.running", step.pk, attempt=attempts, redelivered=redelivered)
    return ClaimOutcome.RUN


def _take_over(step: Step, delivery: str) -> ClaimOutcome:
    """A finished step passes its output on to its holder, or to the first message after a replay or resume."""
    if step.delivery == delivery:
        return ClaimOutcome.STORED
    if not step.delivery and Step.objects.filter(pk=step.pk, delivery="").update(delivery=delivery):
        return ClaimOutcome.STORED
    return ClaimOutcome.DUPLICATE


def release_lost_step(step_id: int, delivery: str, counted: bool = True) -> bool:
    """The process running this delivery of the step is gone: the step is pending again, for its returning message.

    A ``counted`` loss past STEP_MAX_REDELIVERIES fails the step and its run; False if it held no running step.
    """
    run_id = Step.objects.filter(pk=step_id).values_list("run_id", flat=True).first()
    if run_id is None:
        return False
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        released = _release(run, step_id, delivery, counted)
        run.write()
    return released


def _release(run: LockedRun, step_id: int, delivery: str, counted: bool) -> bool:
    held = Step.objects.filter(pk=step_id, status=StepStatus.RUNNING, delivery=delivery)
    row = held.values_list("redeliveries", "key", "skill", "started_at", "compensates_id").first()
    if row is None:
        return False
    redeliveries, key, skill, started_at, compensates = row
    if counted and redeliveries >= settings.STEP_MAX_REDELIVERIES:
        error = f"gave up: its worker was lost {redeliveries + 1} times while running it (crash or out of memory?)"
        _fail_step(run, StepRef(step_id, run.id, skill, started_at, compensates), key, error, StepStatus.FAILED)
        return False
    error = "its worker process was lost" if counted else "stopped by its worker: the broker connection was lost"
    held.update(status=StepStatus.PENDING, redeliveries=redeliveries + int(counted), error=error)
    run.event("step.released", step_id, error=error, redeliveries=redeliveries + int(counted))
    if counted:
        metrics.step_redelivered(skill)
    return True


# --- A step's end -----------------------------------------------------------------


def succeed_step(step: StepRef, output: Any, delivery: str, finishes_run: bool = False, cached: bool = False) -> bool:
    """Store a step's output; False if ``delivery`` no longer holds it.

    ``finishes_run`` (the spec's last step): the run succeeds with it; ``cached``: it came from the skill result cache.
    """
    fast = connection.vendor == "postgresql" and step.compensates is None
    if fast and _store_in_one_statement(step, output, delivery, finishes_run, cached):
        return True
    return _end_step(step, StepStatus.SUCCEEDED, output, delivery=delivery, finishes_run=finishes_run, cached=cached)


def _store_in_one_statement(step: StepRef, output: Any, delivery: str, finishes_run: bool, cached: bool) -> bool:
    """succeed_step's common case on PostgreSQL (transitions_pg); False where it does not apply, changing nothing."""
    now = timezone.now()
    if not finishes_run:
        seq = transitions_pg.store(step.id, output, delivery, now, cached)
        if seq is None:
            return False
        _announce(step.run_id, seq)
    else:
        stored = transitions_pg.store_last(step.id, output, delivery, now, cached, reply_text(output))
        if stored is None:
            return False
        _announce(step.run_id, stored.last_event_seq)
        if stored.run_succeeded:
            metrics.run_finished(stored.workflow, RunStatus.SUCCEEDED)
            ended = RunEnded(step.run_id, RunStatus.SUCCEEDED, stored.last_event_seq, now, "", stored.followed)
            run_ended.send(sender=Run, run=ended)
    metrics.step_finished(step.skill, StepStatus.SUCCEEDED, step.started_at, now)
    return True


def skip_step(
    step: StepRef, error: str, delivery: str, finishes_run: bool = False, timed_out: bool = False, output: Any = None
) -> bool:
    """An optional step that failed (or whose circuit is open) yields ``output`` and the run goes on."""
    skipped = _end_step(step, StepStatus.SKIPPED, output, error=error, delivery=delivery, finishes_run=finishes_run)
    if skipped and timed_out:
        metrics.step_timed_out(step.skill)
    return skipped


def cancel_step(step: StepRef, reason: str) -> None:
    """A step that was waiting (queued or between attempts) when its run ended."""
    _end_step(step, StepStatus.CANCELLED, error=reason)


def _end_step(
    step: StepRef,
    status: str,
    output: Any = None,
    error: str = "",
    delivery: str | None = None,
    finishes_run: bool = False,
    cached: bool = False,
) -> bool:
    with transaction.atomic(savepoint=False):
        run = lock_run(step.run_id)
        ended = _finish_step(run, step, status, output, error, delivery=delivery, cached=cached)
        if ended and finishes_run:
            _end_run(run, RunStatus.SUCCEEDED, output=output)
        run.write()
    return ended


def _finish_step(
    run: LockedRun,
    step: StepRef,
    status: str,
    output: Any = None,
    error: str = "",
    delivery: str | None = None,
    task_id: str | None = None,
    cached: bool = False,
) -> bool:
    """End an unfinished step with ``status`` (only while ``delivery`` holds it, or it has ``task_id``)."""
    steps = Step.objects.filter(pk=step.id, status__in=UNFINISHED_STEP_STATUSES)
    if delivery is not None:
        steps = steps.filter(status=StepStatus.RUNNING, delivery=delivery)
    if task_id is not None:
        steps = steps.filter(task_id=task_id)
    now = timezone.now()
    if not steps.update(status=status, output=output, error=error, finished_at=now, lease_until=now, cached=cached):
        return False
    # Only a cache hit says so: the events of every other step stay as they were.
    run.event(f"step.{status}", step.id, error=error, **({"cached": True} if cached else {}))
    metrics.step_finished(step.skill, status, step.started_at, now)
    if step.compensates is not None:
        run.write()
        compensation_ended.send(sender=Step, step=step, status=status, error=error)
    return True


def retry_step(step: StepRef, error: str, countdown: float, timed_out: bool = False) -> None:
    """The attempt failed (``timed_out``: at its soft limit); the step waits ``countdown`` seconds for the next."""
    lease = timezone.now() + timedelta(seconds=countdown + settings.STEP_LEASE_GRACE)
    with transaction.atomic(savepoint=False):
        run = lock_run(step.run_id)
        retried = Step.objects.filter(pk=step.id, status=StepStatus.RUNNING).update(
            status=StepStatus.PENDING, error=error, lease_until=lease
        )
        run.event("step.retrying", step.id, error=error, countdown=round(countdown, 3))
        run.write()
    if retried:
        metrics.step_retried(step.skill, timed_out)


def fail_step(step_id: int, error: str, status: str = StepStatus.FAILED, task_id: str | None = None) -> bool:
    """Fail (or time out) a step and with it the run; False if it was final or gone.

    With ``task_id``, only while the step has that task id: news of an earlier replay's task changes nothing.
    """
    steps = Step.objects.filter(pk=step_id)
    if task_id is not None:
        steps = steps.filter(task_id=task_id)
    row = steps.values_list("run_id", "key", "skill", "started_at", "compensates_id").first()
    if row is None:
        return False
    run_id, key, skill, started_at, compensates = row
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        failed = _fail_step(run, StepRef(step_id, run_id, skill, started_at, compensates), key, error, status, task_id)
        run.write()
    return failed


def _fail_step(run: LockedRun, step: StepRef, key: str, error: str, status: str, task_id: str | None = None) -> bool:
    if not _finish_step(run, step, status, error=error, task_id=task_id):
        return False
    _end_run(run, RunStatus.FAILED, error=f"step {key} {status.replace('_', ' ')}: {error}")
    return True


def run_of_step(step_id: int) -> int:
    return Step.objects.values_list("run_id", flat=True).get(pk=step_id)


# --- Waiting for a person ---------------------------------------------------------------


def wait_step(step: StepRef, delivery: str, wait: dict[str, Any]) -> bool:
    """The held step's skill asked to wait (skills.registry.Wait): the step and its run wait, no worker held.

    False if ``delivery`` no longer holds the step or it waits already; a run that ended meanwhile cancels it.
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        run = lock_run(step.run_id)
        deadline, key = Step.objects.filter(pk=step.id).values_list("run__deadline", "key").get()
        timeout = wait.get("timeout")
        until = deadline if timeout is None else min(deadline, now + timedelta(seconds=timeout))
        wait = {**wait, "timeout_at": until.isoformat()}
        held = Step.objects.filter(pk=step.id, status=StepStatus.RUNNING, delivery=delivery, wait__isnull=True)
        if not held.update(wait=wait, lease_until=until, error=""):
            return False
        if run.status not in ACTIVE_RUN_STATUSES:
            _finish_step(run, step, StepStatus.CANCELLED, error="not run: the run ended")
            run.write()
            return False
        run.set(status=RunStatus.WAITING)
        run.event("run.waiting", step.id, step=key, prompt=wait["prompt"], timeout_at=wait["timeout_at"])
        run.write()
    return True


def resume_waiting(
    run_id: int, payload: Any, by: str, final_paths: Collection[str], step_id: int | None = None
) -> str | None:
    """A waiting run's first waiting step (or step ``step_id``) succeeds with ``payload``; its key, or None.

    A step at one of ``final_paths`` (the spec's last) ends the run; None, changing nothing, if nothing waits.
    """
    now = timezone.now()
    waiting = Step.objects.filter(run_id=run_id, status=StepStatus.RUNNING, wait__isnull=False).order_by("id")
    answered = waiting if step_id is None else waiting.filter(pk=step_id)
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        if run.status != RunStatus.WAITING:
            return None
        row = answered.values_list("pk", "key", "path", "skill", "started_at", "wait").first()
        if row is None:
            return None
        step_id, key, path, skill, started_at, wait = row
        output = answered_output(wait or {}, payload)
        # A fresh task id, as a replay gives: the task that asked to wait ended
        # halted, and a chord it belongs to would count that stored failure.
        Step.objects.filter(pk=step_id).update(
            status=StepStatus.SUCCEEDED,
            output=output,
            error="",
            finished_at=now,
            lease_until=now,
            task_id=uuid.uuid4(),
        )
        _clear_finished_holders(run_id)
        run.set(republished_at=now)
        if not waiting.exists():
            run.set(status=RunStatus.RUNNING)
        run.event("step.succeeded", step_id, resumed=True)
        run.event("run.resumed", step_id, step=key, by=by)
        metrics.step_finished(skill, StepStatus.SUCCEEDED, started_at, now)
        if path in final_paths:
            _end_run(run, RunStatus.SUCCEEDED, output=output)
        run.write()
    return str(key)


def answered_output(wait: dict[str, Any], payload: Any) -> Any:
    """A resumed step's output: the payload, merged over the wait's ``base`` when both are objects."""
    base = wait.get("base")
    if isinstance(base, dict) and isinstance(payload, dict):
        return {**base, **payload}
    return payload


def _clear_finished_holders(run_id: int) -> None:
    """The run's finished steps pass their outputs on to the first message that asks (a canvas published again)."""
    Step.objects.filter(run_id=run_id, status__in=FINISHED_STEP_STATUSES).update(delivery="")


# --- Switches ---------------------------------------------------------------------


def route_switch(
    run_id: int, switch: str, field: str, value: str | None, case: str | None, path: str, untaken: list[int]
) -> bool:
    """A switch sends its input to the case at ``path``; the pending steps of the other cases are skipped.

    ``case``: the chosen value (None: the default). False, changing nothing, if the run is not active.
    """
    error = f"not routed: {field}={value}" if value is not None else f"not routed: {field} is missing"
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        if run.status not in ACTIVE_RUN_STATUSES:
            return False
        if not RunEvent.objects.filter(run_id=run_id, type="switch.routed", data__switch=switch).exists():
            run.event("switch.routed", switch=switch, field=field, value=value, case=case, path=path)
        pending = Step.objects.filter(pk__in=untaken, status=StepStatus.PENDING)
        for row in pending.values_list("pk", "run_id", "skill", "started_at", "compensates_id"):
            _finish_step(run, StepRef(*row), StepStatus.SKIPPED, error=error)
        run.write()
    return True


def fail_unrouted(run_id: int, switch: str, field: str, value: str | None, error: str) -> bool:
    """A switch without a default found no case for its input: its run fails with ``error``; False if not active."""
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        if run.status not in ACTIVE_RUN_STATUSES:
            return False
        run.event("switch.unmatched", switch=switch, field=field, value=value)
        _end_run(run, RunStatus.FAILED, error=error)
        run.write()
    return True


# --- A run's end ------------------------------------------------------------------


def fail_run(run_id: int, error: str) -> bool:
    """End an active run as failed; steps that never started are cancelled."""
    return _end(run_id, RunStatus.FAILED, error=error) is not None


def succeed_run(run_id: int, output: Any) -> bool:
    """End an active run with its output; its conversation gets the reply."""
    return _end(run_id, RunStatus.SUCCEEDED, output=output) is not None


def cancel_run(run_id: int, reason: str) -> list[str] | None:
    """Cancel an active run and its unfinished steps; the task ids to revoke, or None if it had ended."""
    return _end(run_id, RunStatus.CANCELLED, error=reason, running=StepStatus.CANCELLED)


def expire_run(run_id: int) -> list[str] | None:
    """Fail an active run past its deadline, its running steps timed out; the task ids to revoke, or None."""
    row = Run.objects.filter(pk=run_id).values_list("created_at", "deadline").first()
    if row is None:
        return None
    allowed = (row[1] - row[0]).total_seconds()
    error = f"deadline exceeded: the run did not finish within {round(allowed, 1):g}s"
    return _end(run_id, RunStatus.FAILED, error=error, running=StepStatus.TIMED_OUT)


def _end(run_id: int, status: str, output: Any = None, error: str = "", running: str | None = None) -> list[str] | None:
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        task_ids = _end_run(run, status, output, error, running)
        run.write()
    return task_ids


def _end_run(
    run: LockedRun, status: str, output: Any = None, error: str = "", running: str | None = None
) -> list[str] | None:
    """End the locked run if it is active, then send ``run_ended``; the task ids of the steps it ended, or None.

    Pending steps are cancelled, running ones end as ``running`` if given; a success gives the conversation the reply.
    """
    if run.status not in ACTIVE_RUN_STATUSES:
        return None
    now = timezone.now()
    run.set(
        status=status, output=output, error=error, finished_at=now, started_at=Coalesce(F("started_at"), Value(now))
    )
    task_ids = _end_steps(run.id, status, error, running, now)
    seq = run.event(f"run.{status}", error=error)
    run.write()
    conversation_id, workflow, webhook_url, followed = Run.objects.values_list(
        "conversation_id", "workflow__name", "webhook_url", "followed"
    ).get(pk=run.id)
    if status == RunStatus.SUCCEEDED and conversation_id is not None:
        Message.objects.create(
            conversation_id=conversation_id, role=MessageRole.ASSISTANT, content=reply_text(output), run_id=run.id
        )
    metrics.run_finished(workflow, status)
    run_ended.send(sender=Run, run=RunEnded(run.id, status, seq, now, webhook_url, followed))
    return task_ids


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


def reply_text(output: Any) -> str:
    """The assistant message for a run's output: its text, else its JSON."""
    if isinstance(output, str):
        return output
    if isinstance(output, dict):
        for name in ("reply", "content", "text"):
            if isinstance(output.get(name), str):
                return str(output[name])
    return json.dumps(output, ensure_ascii=False)


# --- Replays, the sweeper, held runs ------------------------------------------------------


def replay_run(run_id: int, deadline: datetime) -> bool:
    """Make a failed or cancelled run queued again, keeping its finished steps' outputs (the rest get new task ids).

    False if the run is not failed or cancelled, or its rollback is still running.
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        compensation = Run.objects.values_list("compensation", flat=True).get(pk=run_id)
        if run.status not in REPLAYABLE_RUN_STATUSES or compensation == Compensation.RUNNING:
            return False
        run.set(
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
        kept = Step.objects.filter(run_id=run_id, status__in=FINISHED_STEP_STATUSES).update(delivery="")
        redo = list(
            Step.objects.filter(run_id=run_id, compensates__isnull=True).exclude(status__in=FINISHED_STEP_STATUSES)
        )
        for step in redo:
            step.status, step.output, step.error, step.delivery, step.wait = StepStatus.PENDING, None, "", "", None
            step.attempts = step.redeliveries = 0
            step.started_at = step.finished_at = step.lease_until = None
            step.task_id = uuid.uuid4()
        Step.objects.bulk_update(redo, fields=[*_RESET_STEP_FIELDS, "task_id"])
        run.event("run.replayed", kept=kept, redo=len(redo))
        run.write()
        metrics.run_started(Run.objects.values_list("workflow__name", flat=True).get(pk=run_id))
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
    """Make a stalled run's canvas publishable again (the sweeper): running steps past their lease are pending again.

    False if the run ended meanwhile, or a lost step gave up and failed it.
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        lost = list(Step.objects.filter(run_id=run_id, status=StepStatus.RUNNING, lease_until__lt=now))
        for step in lost:
            if step.redeliveries >= settings.STEP_MAX_REDELIVERIES:
                error = f"gave up: its worker was lost {step.redeliveries + 1} times while running it"
                _fail_step(run, StepRef.of(step), step.key, error, StepStatus.FAILED)
                run.write()
                return False
        if run.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
            return False
        Step.objects.filter(pk__in=[s.pk for s in lost], status=StepStatus.RUNNING).update(
            status=StepStatus.PENDING,
            delivery="",
            redeliveries=F("redeliveries") + 1,
            error="its worker was lost; resumed by the sweeper",
        )
        for step in lost:
            metrics.step_redelivered(step.skill)
        _clear_finished_holders(run_id)
        run.set(republished_at=now)
        run.event("run.resumed", lost_steps=[s.key for s in lost])
        run.write()
    return True


def release_run(run_id: int, after: int) -> bool:
    """Release a run held behind ``after``, which ended, with its deadline and stall clock started over.

    False if it is no longer held behind ``after``.
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        created_at, deadline, waiting_for = Run.objects.values_list("created_at", "deadline", "waiting_for_id").get(
            pk=run_id
        )
        if run.status != RunStatus.QUEUED or waiting_for != after:
            return False
        run.set(waiting_for=None, republished_at=now, deadline=now + (deadline - created_at))
        run.event("run.released", after=after)
        run.write()
    return True


def move_up(run_id: int, ended: int, ahead: int) -> bool:
    """A run held behind ``ended`` (which ended before it started) waits for ``ahead`` instead."""
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        waiting_for = Run.objects.values_list("waiting_for_id", flat=True).get(pk=run_id)
        if run.status != RunStatus.QUEUED or waiting_for != ended:
            return False
        Run.objects.filter(pk=ahead).update(followed=True)
        run.set(waiting_for=ahead)
        run.event("run.enqueued", waiting_for=ahead, moved_up_from=ended)
        run.write()
    return True


def mark_unpublished(run_id: int, error: str) -> None:
    """The run's canvas could not be published: it looks stalled at once, so the next sweep publishes it."""
    due = timezone.now() - timedelta(seconds=settings.RUN_STALL_AFTER + 1)
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        if run.status == RunStatus.QUEUED:
            run.set(republished_at=due)
        run.event("run.publish_failed", error=error)
        run.write()


# --- Compensation (saga) -------------------------------------------------------------


def start_compensation(run_id: int, steps: list[Step]) -> list[Step]:
    """The failed run's rollback starts with these compensation steps (some may be failed already); them, saved."""
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        saved = Step.objects.bulk_create(steps)
        run.set(compensation=Compensation.RUNNING)
        run.event("run.compensating", steps=[s.key for s in saved])
        for step in saved:
            if step.status == StepStatus.FAILED:
                run.event("step.failed", step.pk, error=step.error)
                run.event("step.compensation_failed", step.compensates_id, error=step.error, by=step.pk)
        run.write()
    return saved


def compensated(step: StepRef, status: str, error: str) -> None:
    """A compensation step ended: its step is ``compensated`` if it succeeded, else the failure is recorded."""
    assert step.compensates is not None
    with transaction.atomic(savepoint=False):
        run = lock_run(step.run_id)
        if status == StepStatus.SUCCEEDED:
            Step.objects.filter(pk=step.compensates, status=StepStatus.SUCCEEDED).update(status=StepStatus.COMPENSATED)
            run.event("step.compensated", step.compensates, by=step.id)
        else:
            run.event("step.compensation_failed", step.compensates, error=error, by=step.id, status=status)
        run.write()


def end_compensation(run_id: int, failed: dict[str, str]) -> bool:
    """The run's rollback is over: ``done``, or ``failed`` naming what failed; False if none was running."""
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        if Run.objects.values_list("compensation", flat=True).get(pk=run_id) != Compensation.RUNNING:
            return False
        run.set(compensation=Compensation.FAILED if failed else Compensation.DONE)
        if failed:
            run.event("run.compensation_failed", error=f"{len(failed)} compensation(s) failed", failed=failed)
        else:
            run.event("run.compensated")
        run.write()
    return True


# --- Conversations ----------------------------------------------------------------


def update_conversation_state(conversation_id: int, run_id: int, step_id: int, values: dict[str, Any]) -> None:
    """Merge ``values`` into the conversation's state (top-level keys replaced), with a run event naming them.

    The row is locked while it is read and written, so concurrent runs of one conversation lose no key.
    """
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().only("state").get(pk=conversation_id)
        conversation.state = {**conversation.state, **values}
        conversation.save(update_fields=["state", "updated_at"])
        record(run_id, "conversation.state_updated", step_id, keys=sorted(values))
