"""Everything the engine says to the broker: publish a run's canvas or one step, send a task, revoke.

A canvas not published (the broker is down) leaves its run for the sweeper. The worker
hooks here give each step message its delivery id and pick the queues a worker consumes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from celery.canvas import Signature
from django.db import transaction
from kombu.exceptions import OperationalError as BrokerUnavailable

from agentsite.celery import app
from skills.registry import registry

from . import canvas, transitions
from .budget import Deadline
from .models import Run, Step
from .spec import PlannedStep, plan

log = logging.getLogger(__name__)

# The message header that tells one published step message from another (a step's delivery).
DELIVERY_HEADER = "agentsite_delivery"


def publish_new_run(run: Run, planned: list[PlannedStep], steps: list[Step]) -> None:
    """Publish a run just inserted, once its transaction commits."""
    options = _options(run, {p.path: (s.pk, str(s.task_id)) for p, s in zip(planned, steps, strict=True)}, planned)
    run_id, spec, input = run.pk, run.spec, run.input
    transaction.on_commit(lambda: publish_run(run_id, spec, input, options))


def republish(run: Run) -> None:
    """Publish an existing run's canvas again (a replay, a resume, the sweeper, a held run's release).

    Raises SpecError when its spec is no longer valid.
    """
    planned = plan(run.spec)
    rows = {path: (pk, str(task_id)) for pk, path, task_id in run.steps.values_list("pk", "path", "task_id")}
    publish_run(run.pk, run.spec, run.input, _options(run, rows, planned))


def _options(
    run: Run, rows: Mapping[str, tuple[int, str]], planned: list[PlannedStep]
) -> dict[str, canvas.StepOptions]:
    budget = Deadline.of_run(run.created_at, run.deadline).as_kwarg()
    return {p.path: canvas.StepOptions.for_step(p, *rows[p.path], budget) for p in planned}


def publish_run(run_id: int, spec: Any, input: Any, steps: dict[str, canvas.StepOptions]) -> None:
    """Publish the run's canvas; a broker outage leaves it queued for the sweeper, any other error fails it."""
    try:
        canvas.build(spec, steps, run_id).apply_async(args=(input,))
    except BrokerUnavailable as exc:
        log.warning("run %s not published, the sweeper will: %s", run_id, exc)
        transitions.mark_unpublished(run_id, f"the task broker is unavailable: {exc}")
    except Exception as exc:
        log.exception("could not enqueue run %s", run_id)
        transitions.fail_run(run_id, f"could not enqueue: {exc}")
        raise


def publish_step(step: Signature, upstream: Any) -> str:
    """Publish one step's signature with ``upstream`` as its input; "" if sent, else why not."""
    try:
        step.apply_async(args=(upstream,))
    except BrokerUnavailable as exc:
        return f"the task broker is unavailable: {exc}"
    return ""


def send_task(name: str, args: tuple[Any, ...], queue: str, countdown: float = 0) -> bool:
    """Send a task by name; False (logged) when the broker is unavailable."""
    try:
        app.send_task(name, args=args, countdown=countdown, queue=queue)
    except BrokerUnavailable as exc:
        log.warning("%s%r not sent: %r", name, args, exc)
        return False
    return True


def revoke(task_ids: list[str]) -> None:
    """Drop queued messages of these tasks and terminate them where running (best effort: a late step stops itself)."""
    if not task_ids:
        return
    try:
        app.control.revoke(task_ids, terminate=True, signal="SIGTERM")
    except BrokerUnavailable as exc:
        log.warning("could not revoke %d tasks: %s", len(task_ids), exc)


def revoke_on_commit(task_ids: list[str] | None) -> None:
    if task_ids:
        transaction.on_commit(lambda: revoke(task_ids))


# --- Queues ---------------------------------------------------------------------------


def routed_queues() -> list[str]:
    """The queues a skill or a periodic task routes to."""
    periodic = {entry.get("options", {}).get("queue") for entry in app.conf.beat_schedule.values()}
    return sorted({*registry.queues(), *periodic} - {None})


def queues() -> list[str]:
    """The queues workers consume: the default one and the routed ones."""
    return sorted({app.conf.task_default_queue, *routed_queues()})


# --- Worker hooks (connected in orchestration.apps) -----------------------------------------


def note_chosen_queues(sender: str, instance: Any, options: dict[str, Any], **kwargs: Any) -> None:
    """celeryd_init: whether the operator chose the worker's queues (-Q)."""
    instance.agentsite_queues_chosen = bool(options.get("queues"))


def consume_routed_queues(sender: str, instance: Any, **kwargs: Any) -> None:
    """celeryd_after_setup: a worker started without -Q consumes every routed queue too."""
    if getattr(instance, "agentsite_queues_chosen", False):
        return
    for name in routed_queues():
        instance.app.amqp.queues.select_add(name)


def mark_step_delivery(sender: str | None = None, headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """before_task_publish: every new step message gets a delivery id (DELIVERY_HEADER) of its own.

    A redelivery or a retry copying its headers keeps it; a re-published step or a retry after a failure gets a new one.
    """
    if sender == canvas.STEP_TASK and headers is not None:
        headers.setdefault(DELIVERY_HEADER, uuid.uuid4().hex)
