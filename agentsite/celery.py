"""The Celery app. Configuration comes from Django settings (CELERY_*)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")

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
