"""Periodic tasks (celery beat, see CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from . import services

log = logging.getLogger(__name__)


@shared_task(name="agentsite.sweep", acks_late=True, soft_time_limit=120, time_limit=150)
def sweep() -> dict[str, Any]:
    """Fail runs past their deadline, resume stalled ones, forget expired keys."""
    report = services.sweep()
    if report.expired or report.resumed:
        log.warning("sweep: expired runs %s, resumed runs %s", report.expired, report.resumed)
    return {"expired": report.expired, "resumed": report.resumed, "keys_purged": report.keys_purged}
