"""Saga compensation: a failed run undoes the effects of its compensable steps.

A skill may name a compensating skill (``@skill(compensate="release")``).
When a run fails (``state._end_run``; a cancelled run is left as it is: the
issue asks for a rollback on failure), each of its steps that succeeded with
such a skill gets a compensation step (``Step.compensates``), in the same
transaction, in reverse order of the steps' completion. They run one at a
time, each published when the one before it ended (with its skill's own time
limits, retries and queue; not capped by the run's deadline, which may be
what failed it), and each gets its compensated step's output as its input
and that step's args as its own. A compensation that succeeded makes its
step ``compensated``; one that failed (after its retries) is recorded and the
others still run. The run stays ``failed``; ``Run.compensation`` says how
the rollback went (``running``, ``done``, ``failed``), with the events
``run.compensating``, ``step.compensated``, ``step.compensation_failed`` and
``run.compensated`` or ``run.compensation_failed``.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from kombu.exceptions import OperationalError as BrokerUnavailable

from skills.registry import Skill, registry

from . import canvas, state
from .models import Compensation, Run, Step, StepStatus

log = logging.getLogger(__name__)

KEY_PREFIX = "compensate/"  # "/" is in no spec step id (orchestration.spec.STEP_ID) nor path


def plan(run_id: int, now: datetime) -> None:
    """The run just failed: create its compensation steps, and publish the first once committed.

    Called inside the transaction that failed the run. Nothing happens when no
    step of it succeeded with a skill that declares a compensation. A declared
    compensating skill that is not registered makes its compensation step
    fail at once, with an error naming it (the others still run).
    """
    done = Step.objects.filter(run_id=run_id, status=StepStatus.SUCCEEDED, compensates__isnull=True)
    rows = done.order_by("-finished_at", "-id").values_list("pk", "key", "skill", "args")
    compensable = [row for row in rows if _declared(row[2])]
    if not compensable:
        return
    prefix = _prefix(run_id)
    steps = Step.objects.bulk_create(
        [_compensation_step(run_id, prefix, n, *row, now) for n, row in enumerate(compensable, start=1)]
    )
    Run.objects.filter(pk=run_id).update(compensation=Compensation.RUNNING)
    state.record(run_id, "run.compensating", steps=[s.key for s in steps])
    for step in steps:
        if step.status == StepStatus.FAILED:
            state.record(run_id, "step.failed", step.pk, error=step.error)
            state.record(run_id, "step.compensation_failed", step.compensates_id, error=step.error, by=step.pk)
    _next(run_id)


def _declared(skill_name: str) -> str | None:
    """The name of the skill that compensates ``skill_name``'s steps, as declared; None if none."""
    skill = registry.get(skill_name)
    return skill.compensate if skill is not None else None


def _prefix(run_id: int) -> str:
    """The path prefix of the run's latest rollback: each replay's failure has its own steps."""
    replays = Run.objects.values_list("replays", flat=True).get(pk=run_id)
    return f"compensation@replay{replays}" if replays else "compensation"


def _compensation_step(
    run_id: int, prefix: str, n: int, pk: int, key: str, skill: str, args: dict[str, Any], now: datetime
) -> Step:
    step = Step(
        run_id=run_id,
        key=f"{KEY_PREFIX}{key}{prefix.removeprefix('compensation')}",
        path=f"{prefix}.{n}",
        skill=_declared(skill) or "",
        args=args,
        compensates_id=pk,
        soft_time_limit=0,
        time_limit=0,
        queue=canvas.CONTROL_QUEUE,
    )
    try:
        compensating = registry.compensation_of(skill)
    except ImproperlyConfigured as exc:
        step.status, step.error, step.finished_at = StepStatus.FAILED, str(exc), now
        return step
    assert compensating is not None  # the caller kept only skills that declare one
    step.soft_time_limit, step.time_limit = compensating.soft_time_limit, compensating.time_limit
    step.retries, step.queue = compensating.retries, compensating.queue
    return step


def step_ended(step: state.StepRef, status: str, error: str) -> None:
    """A compensation step ended with ``status``: its compensated step, the next one, or the run's rollback.

    Called inside the transaction that ended it (``state._finish_step``), once per step.
    """
    assert step.compensates is not None
    if status == StepStatus.SUCCEEDED:
        Step.objects.filter(pk=step.compensates, status=StepStatus.SUCCEEDED).update(status=StepStatus.COMPENSATED)
        state.record(step.run_id, "step.compensated", step.compensates, by=step.id)
    else:
        state.record(step.run_id, "step.compensation_failed", step.compensates, error=error, by=step.id, status=status)
    _next(step.run_id)


def _next(run_id: int) -> None:
    """Publish the run's next pending compensation step once committed; with none left, end its rollback."""
    ours = Step.objects.filter(run_id=run_id, path__startswith=f"{_prefix(run_id)}.")
    pending = ours.filter(status=StepStatus.PENDING).order_by("id").values_list("pk", flat=True).first()
    if pending is not None:
        transaction.on_commit(lambda: publish(pending))
        return
    failed = dict(ours.exclude(status=StepStatus.SUCCEEDED).values_list("key", "error"))
    outcome = Compensation.FAILED if failed else Compensation.DONE
    if not Run.objects.filter(pk=run_id, compensation=Compensation.RUNNING).update(compensation=outcome):
        return
    if failed:
        state.record(run_id, "run.compensation_failed", error=f"{len(failed)} compensation(s) failed", failed=failed)
    else:
        state.record(run_id, "run.compensated")


def publish(step_id: int) -> None:
    """Publish a compensation step, with its compensated step's output as its input.

    With the broker unavailable the step fails (not published), and the next one is tried.
    """
    step = Step.objects.select_related("compensates").get(pk=step_id)
    skill: Skill | None = registry.get(step.skill)
    options = canvas.StepOptions(
        step_id=step.pk,
        task_id=str(step.task_id),
        queue=step.queue,
        soft_time_limit=step.soft_time_limit,
        time_limit=step.time_limit,
        ttl=None,
        retries=step.retries,
        backoff=skill.backoff if skill else 1.0,
        backoff_max=skill.backoff_max if skill else 1.0,
    )
    upstream = step.compensates.output if step.compensates else None
    try:
        canvas.step_signature(options).apply_async(args=(upstream,))
    except BrokerUnavailable as exc:
        # The sweeper resumes active runs only: fail it, visibly, and go on (the run may then be replayed).
        log.warning("run %s: compensation step %s not published: %s", step.run_id, step.pk, exc)
        state.fail_step(step.pk, f"not published: the task broker is unavailable: {exc}")
