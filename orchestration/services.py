"""Starting runs: validate, insert the run and its steps, enqueue on commit."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import transaction
from kombu.exceptions import OperationalError

from . import canvas, state
from .models import Conversation, Message, MessageRole, Run, Step, Workflow
from .spec import PlannedStep, plan

log = logging.getLogger(__name__)


class EnqueueError(Exception):
    """The broker refused the run's canvas; the run was failed."""


def start_run(
    *,
    owner: Any,
    spec: Any,
    input: Any = None,
    conversation: Conversation | None = None,
    workflow: Workflow | None = None,
) -> Run:
    """Insert a queued run with its pending steps; enqueue once committed.

    Raises SpecError for an invalid spec (nothing is written) and, from the
    outermost transaction's commit, EnqueueError when the broker is down.
    """
    planned = plan(spec)
    with transaction.atomic():
        run = Run.objects.create(owner=owner, conversation=conversation, workflow=workflow, spec=spec, input=input)
        steps = Step.objects.bulk_create(_step_row(run, p) for p in planned)
        state.record(run.pk, "run.queued", steps=len(steps))
        options = {
            p.path: canvas.StepOptions.for_step(p, s.pk, str(s.task_id)) for p, s in zip(planned, steps, strict=True)
        }
        transaction.on_commit(lambda: enqueue(run.pk, spec, input, options))
    return run


def post_message(*, conversation: Conversation, content: str, spec: Any, workflow: Workflow | None) -> Message:
    """Store a user message and start the run that answers it."""
    with transaction.atomic():
        message = Message.objects.create(conversation=conversation, role=MessageRole.USER, content=content)
        message.run = start_run(
            owner=conversation.owner,
            spec=spec,
            input={"content": content, "conversation_id": conversation.pk},
            conversation=conversation,
            workflow=workflow,
        )
        message.save(update_fields=["run"])
    return message


def default_workflow() -> Workflow | None:
    return Workflow.objects.filter(name=settings.DEFAULT_WORKFLOW).first()


def enqueue(run_id: int, spec: Any, input: Any, steps: dict[str, canvas.StepOptions]) -> None:
    """Publish the run's canvas; a run that cannot be published is failed."""
    try:
        canvas.build(spec, steps, run_id).apply_async(args=(input,))
    except Exception as exc:
        log.exception("could not enqueue run %s", run_id)
        state.fail_run(run_id, f"could not enqueue: {exc}")
        if isinstance(exc, OperationalError):
            raise EnqueueError("the task broker is unavailable; the run was not started") from exc
        raise


def _step_row(run: Run, p: PlannedStep) -> Step:
    return Step(
        run=run,
        key=p.key,
        path=p.path,
        skill=p.skill,
        args=p.args,
        optional=p.optional,
        soft_time_limit=p.soft_time_limit,
        time_limit=p.time_limit,
        ttl=p.ttl,
        retries=p.retries,
        queue=p.queue,
    )
