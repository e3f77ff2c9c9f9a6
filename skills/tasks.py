"""The step runtime: the one Celery task that executes any step.

Thin by design: claim the step by id, call its skill, persist the outcome
through ``orchestration.state``, return the output to the canvas. Failures
that the task cannot see itself (the hard time limit kills the process, the
queue TTL expires) reach ``StepTask.on_failure`` and ``signals.py`` in the
worker's main process.
"""

from __future__ import annotations

import random
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from orchestration import state
from orchestration.models import Step, StepStatus

from .registry import SkillContext, registry


class StepHalted(Exception):
    """The step ended the run (or found it ended): stop this canvas branch."""


class StepTask(Task):
    # Expected outcomes: recorded, not logged as worker errors.
    throws = (StepHalted,)

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        step_id = kwargs.get("step_id")
        if step_id is None or isinstance(exc, StepHalted):
            return
        if isinstance(exc, TimeLimitExceeded):
            error = f"killed at the hard time limit ({exc.args[0] if exc.args else '?'}s)"
            state.fail_step(step_id, error, StepStatus.TIMED_OUT)
        else:
            state.fail_step(step_id, f"internal error: {exc!r}")


@shared_task(bind=True, base=StepTask, name="agentsite.run_step", acks_late=True)
def run_step(self: Task, upstream: Any, *, step_id: int, retry: dict[str, float]) -> Any:
    claim = state.claim_step(step_id)
    step = claim.step
    if not claim.acquired:
        return _unclaimed(step)
    skill = registry.get(step.skill)
    if skill is None:
        state.fail_step(step.pk, f'skill "{step.skill}" is not registered on this worker')
        raise StepHalted(step.skill)
    try:
        output = skill.func(_context(step), upstream)
    except Exception as exc:  # noqa: BLE001 - every skill failure is recorded
        return _handle_failure(self, step, exc, retry)
    state.succeed_step(step.pk, step.run_id, output)
    return output


def _unclaimed(step: Step) -> Any:
    """A redelivered step that already finished returns its stored output.

    Any other unclaimable step belongs to a run that has ended: it is
    cancelled (if it was still waiting for an attempt) and its branch stops.
    """
    if step.status in state.FINISHED_STEP_STATUSES:
        return step.output
    reason = f"not run: the run {step.run.status}"
    state.cancel_step(step.pk, step.run_id, reason)
    raise StepHalted(reason)


def _handle_failure(task: Task, step: Step, exc: Exception, retry: dict[str, float]) -> Any:
    timed_out = isinstance(exc, SoftTimeLimitExceeded)
    error = f"timed out after {step.soft_time_limit:g}s (soft limit)" if timed_out else _message(exc)
    if step.attempts <= retry["max"]:
        countdown = backoff(step.attempts, retry["backoff"], retry["backoff_max"])
        state.retry_step(step.pk, step.run_id, error, countdown)
        raise task.retry(countdown=countdown, max_retries=int(retry["max"]), exc=exc)
    if step.optional:
        state.skip_step(step.pk, step.run_id, error)
        return None
    state.fail_step(step.pk, error, StepStatus.TIMED_OUT if timed_out else StepStatus.FAILED)
    raise StepHalted(error) from exc


def backoff(attempt: int, factor: float, maximum: float) -> float:
    """Exponential backoff with jitter: about factor * 2**(attempt-1), capped."""
    return min(maximum, factor * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _context(step: Step) -> SkillContext:
    conversation = step.run.conversation
    return SkillContext(
        run_id=step.run_id,
        step_id=step.pk,
        step_key=step.key,
        conversation_id=conversation.pk if conversation else None,
        state=dict(conversation.state) if conversation else {},
        args=step.args,
        attempt=step.attempts,
    )


def _message(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


@shared_task(name="agentsite.finish_run", acks_late=True, soft_time_limit=30, time_limit=60)
def finish_run(output: Any, *, run_id: int) -> None:
    """The canvas's last link: the run succeeded with the spec's output."""
    state.succeed_run(run_id, output)


@shared_task(name="agentsite.collect", acks_late=True, soft_time_limit=30, time_limit=60)
def collect(outputs: list[Any]) -> list[Any]:
    """A chord body that passes its header's outputs on as one list.

    The canvas uses it where Celery would otherwise unroll a one-member group
    or merge a group into its parent group (orchestration/canvas.py).
    """
    return outputs
