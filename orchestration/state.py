"""Run and step transitions: the one place where status changes.

Each function makes one transition with a conditional UPDATE (so a late or
repeated caller changes nothing) and writes the matching RunEvent in the same
transaction. They take ids, never model instances, so tasks can call them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from .models import (
    ACTIVE_RUN_STATUSES,
    Message,
    MessageRole,
    Run,
    RunEvent,
    RunStatus,
    Step,
    StepStatus,
)

FINISHED_STEP_STATUSES = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a step for execution."""

    step: Step
    acquired: bool  # False: the step must not run (see step.status)


def record(run_id: int, type: str, step_id: int | None = None, error: str = "", **data: Any) -> None:
    if error:
        data["error"] = error
    RunEvent.objects.create(run_id=run_id, step_id=step_id, type=type, data=data)


def claim_step(step_id: int) -> Claim:
    """Mark a step running (attempt + 1) unless it finished or its run ended.

    A step already ``running`` may be claimed again: that is a retry or the
    redelivery of a message whose worker died.
    """
    now = timezone.now()
    with transaction.atomic():
        claimed = Step.objects.filter(
            pk=step_id,
            status__in=(StepStatus.PENDING, StepStatus.RUNNING),
            run__status__in=ACTIVE_RUN_STATUSES,
        ).update(
            status=StepStatus.RUNNING, attempts=F("attempts") + 1, started_at=Coalesce(F("started_at"), Value(now))
        )
        step = Step.objects.select_related("run", "run__conversation").get(pk=step_id)
        if claimed:
            if step.run.status == RunStatus.QUEUED:  # only a run's first step starts it
                _start_run(step.run_id, now)
            record(step.run_id, "step.running", step_id, attempt=step.attempts)
    return Claim(step=step, acquired=bool(claimed))


def _start_run(run_id: int, now: Any) -> None:
    if Run.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(status=RunStatus.RUNNING, started_at=now):
        record(run_id, "run.running")


def succeed_step(step_id: int, run_id: int, output: Any) -> None:
    _finish_step(step_id, run_id, StepStatus.SUCCEEDED, output=output)


def skip_step(step_id: int, run_id: int, error: str) -> None:
    """An optional step that failed: it yields null and the run goes on."""
    _finish_step(step_id, run_id, StepStatus.SKIPPED, error=error)


def cancel_step(step_id: int, run_id: int, reason: str) -> None:
    """A step that was waiting (queued or between attempts) when its run ended."""
    _finish_step(step_id, run_id, StepStatus.CANCELLED, error=reason)


def retry_step(step_id: int, run_id: int, error: str, countdown: float) -> None:
    Step.objects.filter(pk=step_id, status=StepStatus.RUNNING).update(error=error)
    record(run_id, "step.retrying", step_id, error=error, countdown=round(countdown, 3))


def fail_step(step_id: int, error: str, status: str = StepStatus.FAILED) -> bool:
    """Fail (or time out) a step and with it the run. False if already final or gone."""
    row = Step.objects.filter(pk=step_id).values_list("run_id", "key").first()
    if row is None:
        return False
    run_id, key = row
    with transaction.atomic():
        changed = _finish_step(step_id, run_id, status, error=error)
        if changed:
            fail_run(run_id, f"step {key} {status.replace('_', ' ')}: {error}")
    return changed


def _finish_step(step_id: int, run_id: int, status: str, output: Any = None, error: str = "") -> bool:
    with transaction.atomic():
        changed = Step.objects.filter(pk=step_id, status__in=(StepStatus.PENDING, StepStatus.RUNNING)).update(
            status=status, output=output, error=error, finished_at=timezone.now()
        )
        if changed:
            record(run_id, f"step.{status}", step_id, error=error)
    return bool(changed)


def fail_run(run_id: int, error: str) -> bool:
    """End an active run as failed; steps that never started are cancelled."""
    return _end_run(run_id, RunStatus.FAILED, error=error)


def succeed_run(run_id: int, output: Any) -> bool:
    """End a running run with its output; its conversation gets the reply."""
    with transaction.atomic():
        ended = _end_run(run_id, RunStatus.SUCCEEDED, output=output)
        if ended:
            _append_reply(run_id, output)
    return ended


def _end_run(run_id: int, status: str, output: Any = None, error: str = "") -> bool:
    now = timezone.now()
    with transaction.atomic():
        ended = Run.objects.filter(pk=run_id, status__in=ACTIVE_RUN_STATUSES).update(
            status=status,
            output=output,
            error=error,
            started_at=Coalesce(F("started_at"), Value(now)),
            finished_at=now,
        )
        if not ended:
            return False
        Step.objects.filter(run_id=run_id, status=StepStatus.PENDING).update(
            status=StepStatus.CANCELLED, error=f"not run: the run {status}", finished_at=now
        )
        record(run_id, f"run.{status}", error=error)
    return True


def _append_reply(run_id: int, output: Any) -> None:
    conversation_id = Run.objects.values_list("conversation_id", flat=True).get(pk=run_id)
    if conversation_id is not None:
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
