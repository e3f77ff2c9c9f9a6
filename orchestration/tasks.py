"""Periodic tasks (celery beat, see CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from celery import shared_task
from django.db import InterfaceError, OperationalError

from . import services, webhooks

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
