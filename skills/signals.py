"""Worker signals for step failures that the step task itself cannot see."""

from __future__ import annotations

from typing import Any

from celery.signals import task_revoked

from orchestration import state
from orchestration.models import Step, StepStatus

from . import budget


@task_revoked.connect
def fail_revoked_step(sender: Any = None, request: Any = None, expired: bool = False, **kwargs: Any) -> None:
    """A step that expired in the queue (its ttl) or was revoked fails its run.

    A step already final (e.g. cancelled with its run) is left as it is.
    """
    if getattr(sender, "name", None) != "agentsite.run_step":
        return
    step_id = (request.kwargs or {}).get("step_id")
    if step_id is None:
        return
    if expired and (error := budget.expired_error(request.kwargs)):
        # It waited in the queue until its run's deadline (skills/budget.py caps expires by it).
        state.fail_step(step_id, error, StepStatus.TIMED_OUT, task_id=request.id)
        return
    if expired:
        ttl = Step.objects.filter(pk=step_id).values_list("ttl", flat=True).first() or 0
        error = f"expired: waited in the queue longer than its ttl ({ttl:g}s)"
    else:
        error = "revoked" + (" and terminated" if kwargs.get("terminated") else "") + " outside agentsite"
    state.fail_step(step_id, error, task_id=request.id)
