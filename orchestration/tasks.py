"""The orchestration's own tasks: the sweeper (celery beat, see CELERY_BEAT_SCHEDULE), webhooks, switches."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from celery import Task, shared_task, signature
from celery.exceptions import Ignore
from django.conf import settings
from django.db import InterfaceError, OperationalError

from . import canvas, routing, services, state, webhooks

log = logging.getLogger(__name__)


@shared_task(name="agentsite.sweep", acks_late=True, soft_time_limit=120, time_limit=150)
def sweep() -> dict[str, Any]:
    """Fail overdue runs, time out waits, resume stalled runs, release lost held ones, forget expired keys."""
    report = services.sweep()
    if report.expired or report.resumed or report.webhooks_resumed or report.released:
        log.warning(
            "sweep: expired runs %s, resumed runs %s, resent webhooks %s, released held runs %s",
            report.expired,
            report.resumed,
            report.webhooks_resumed,
            report.released,
        )
    if report.waits_timed_out:
        log.info("sweep: waits timed out in runs %s", report.waits_timed_out)
    return asdict(report)


@shared_task(
    name=webhooks.DELIVER_TASK,
    acks_late=True,
    soft_time_limit=60,
    time_limit=90,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=20,
)
def deliver_webhook(delivery_id: int) -> None:
    """One attempt to POST a run's completion event (orchestration.webhooks)."""
    webhooks.deliver(delivery_id)


class SwitchTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A bug (or a database outage beyond its retries): the run fails rather than waiting for nothing."""
        routes = [*kwargs.get("cases", {}).values(), kwargs.get("default")]
        steps = [step for route in routes if route for step in route["steps"]]
        if steps:
            state.fail_run(state.run_of_step(steps[0]), f"switch {kwargs.get('switch')}: internal error: {exc!r}")


@shared_task(
    bind=True,
    base=SwitchTask,
    name=canvas.SWITCH_TASK,
    acks_late=True,
    soft_time_limit=30,
    time_limit=60,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=1,
    retry_backoff_max=settings.STEP_DB_BACKOFF_MAX,
    max_retries=settings.STEP_DB_RETRIES,
)
def switch(
    self: Task, upstream: Any, *, switch: str, on: str, cases: dict[str, Any], default: dict[str, Any] | None
) -> Any:
    """A switch node (orchestration/canvas.py): route ``upstream`` to the case its field ``on`` names.

    ``cases`` (by value) and ``default`` are routes: the case's ``path``, its
    prebuilt ``canvas`` and the ids of its ``steps``. This task is replaced by
    the chosen canvas, which gets ``upstream`` and takes the switch's place in
    its chain or chord; the steps of the other cases are skipped. With no case
    and no default the run fails. A run that ended stops here.
    """
    choice = routing.choose(upstream, on, cases)
    route = default if choice.case is None else cases[choice.case]
    routes = [*cases.values(), *([default] if default is not None else [])]
    run_id = state.run_of_step(routes[0]["steps"][0])
    if route is None:
        error = routing.unmatched_error(switch, on, choice, cases)
        state.fail_unrouted(run_id, switch, on, choice.value, error)
        raise Ignore()
    untaken = [step for other in routes if other is not route for step in other["steps"]]
    if not state.route_switch(run_id, switch, on, choice.value, choice.case, route["path"], untaken):
        raise Ignore()
    case = signature(route["canvas"], app=self.app)
    return self.replace(canvas.replacement(case, upstream, joined=bool(self.request.group)))
