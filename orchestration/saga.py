"""Saga compensation: a failed run undoes the effects of its compensable steps, newest first, one at a time.

docs/design.md, "Saga compensation", has the details.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from skills.registry import Skill, registry

from . import broker, canvas, transitions
from .models import Run, RunStatus, Step, StepStatus
from .transitions import RunEnded, StepRef

log = logging.getLogger(__name__)

KEY_PREFIX = "compensate/"  # "/" is in no spec step id (orchestration.spec.STEP_ID) nor path


def on_run_ended(sender: Any, run: RunEnded, **kwargs: Any) -> None:
    """transitions.run_ended: a failed run's rollback starts (a cancelled run is left as it is)."""
    if run.status == RunStatus.FAILED:
        plan(run.id, run.at)


def plan(run_id: int, now: datetime) -> None:
    """Create the run's compensation steps and publish the first once committed; nothing if none is due.

    A declared compensating skill that is not registered makes its step fail at once, naming it.
    """
    done = Step.objects.filter(run_id=run_id, status=StepStatus.SUCCEEDED, compensates__isnull=True)
    rows = done.order_by("-finished_at", "-id").values_list("pk", "key", "skill", "args")
    compensable = [row for row in rows if _declared(row[2])]
    if not compensable:
        return
    prefix = _prefix(run_id)
    steps = [_compensation_step(run_id, prefix, n, *row, now) for n, row in enumerate(compensable, start=1)]
    transitions.start_compensation(run_id, steps)
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


def on_compensation_ended(sender: Any, step: StepRef, status: str, error: str, **kwargs: Any) -> None:
    """transitions.compensation_ended: its step is marked, then the next one goes (or the rollback ends)."""
    transitions.compensated(step, status, error)
    _next(step.run_id)


def _next(run_id: int) -> None:
    """Publish the run's next pending compensation step once committed; with none left, end its rollback."""
    ours = Step.objects.filter(run_id=run_id, path__startswith=f"{_prefix(run_id)}.")
    pending = ours.filter(status=StepStatus.PENDING).order_by("id").values_list("pk", flat=True).first()
    if pending is not None:
        transaction.on_commit(lambda: publish(pending))
        return
    failed = dict(ours.exclude(status=StepStatus.SUCCEEDED).values_list("key", "error"))
    transitions.end_compensation(run_id, failed)


def publish(step_id: int) -> None:
    """Publish a compensation step, with its compensated step's output as its input; failed if the broker is down."""
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
    if error := broker.publish_step(canvas.step_signature(options), upstream):
        # The sweeper resumes active runs only: fail it, visibly, and go on (the run may then be replayed).
        log.warning("run %s: compensation step %s not published: %s", step.run_id, step.pk, error)
        transitions.fail_step(step.pk, f"not published: {error}")
