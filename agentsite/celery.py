"""The Celery app. Configuration comes from Django settings (CELERY_*)."""

from __future__ import annotations

import os
import uuid
from typing import Any

from celery import Celery
from celery.signals import before_task_publish, celeryd_after_setup, task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")

# The message header that tells one published step message from another.
DELIVERY_HEADER = "agentsite_delivery"

app = Celery("agentsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@celeryd_after_setup.connect
def consume_skill_queues(sender: str, instance: Any, **kwargs: Any) -> None:
    """A worker started without -Q consumes every queue a skill routes to."""
    from skills.registry import registry

    queues = instance.app.amqp.queues
    if queues.consume_from is not queues:
        return  # the operator chose the queues with -Q
    for name in registry.queues():
        queues.select_add(name)


@task_prerun.connect
@task_postrun.connect
def close_old_db_connections(**kwargs: Any) -> None:
    """Drop connections that are broken or older than CONN_MAX_AGE, like a request does."""
    from django.db import close_old_connections

    close_old_connections()


@before_task_publish.connect
def mark_step_delivery(sender: str | None = None, headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Give every new step message an id of its own (DELIVERY_HEADER).

    A redelivered message keeps its id, and so does a retry that copies the
    request's headers (after a database outage); a re-published or
    duplicated step gets a new one, and so does a retry after the skill
    failed (skills/tasks.py), so the step runtime can tell them apart.
    """
    if sender == "agentsite.run_step" and headers is not None:
        headers.setdefault(DELIVERY_HEADER, uuid.uuid4().hex)
