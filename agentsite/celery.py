"""The Celery app. Configuration comes from Django settings (CELERY_*)."""

from __future__ import annotations

import gc
import logging
import os
import time
import uuid
from typing import Any

from celery import Celery
from celery.signals import (
    before_task_publish,
    celeryd_after_setup,
    celeryd_init,
    task_postrun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)
from celery.worker.consumer import Consumer as CeleryConsumer

from agentsite import broker, telemetry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")

# The message header that tells one published step message from another.
DELIVERY_HEADER = "agentsite_delivery"
# The message header that says when it was published (Unix time), for /metrics.
PUBLISHED_HEADER = "agentsite_published"

broker.use_for_redis_urls()
app = Celery("agentsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@celeryd_init.connect
def note_chosen_queues(sender: str, instance: Any, options: dict[str, Any], **kwargs: Any) -> None:
    instance.agentsite_queues_chosen = bool(options.get("queues"))


@celeryd_init.connect
def keep_metrics_in_files(sender: str, **kwargs: Any) -> None:
    """The worker's main process, before its pool forks: every process counts into files (agentsite/metrics.py)."""
    from agentsite.metrics import start_process

    start_process(f"worker-{sender}")


def routed_queues() -> list[str]:
    """The queues a skill or a periodic task routes to (a worker started without -Q consumes them)."""
    from skills.registry import registry

    periodic = {entry.get("options", {}).get("queue") for entry in app.conf.beat_schedule.values()}
    return sorted({*registry.queues(), *periodic} - {None})


@celeryd_after_setup.connect
def consume_skill_queues(sender: str, instance: Any, **kwargs: Any) -> None:
    """A worker started without -Q consumes every queue a skill or a periodic task routes to."""
    if getattr(instance, "agentsite_queues_chosen", False):
        return  # the operator chose the queues with -Q
    for name in routed_queues():
        instance.app.amqp.queues.select_add(name)


@task_postrun.connect
def close_old_db_connections(**kwargs: Any) -> None:
    """Drop connections that are broken or older than CONN_MAX_AGE, like the end of a request does.

    After each task only, not before it too as a request does: a connection
    that grew too old while idle serves one more task, and the check cost a
    busy worker 1% of its CPU each time (docs/performance.md).
    """
    from django.db import close_old_connections

    close_old_connections()


@worker_init.connect
@worker_process_init.connect
def freeze_startup_objects(**kwargs: Any) -> None:
    """Keep what the worker loaded at startup out of the garbage collector's full passes.

    In the main process once Django and the tasks are loaded (its pool
    processes inherit that), and in each pool process once it is set up.
    About 200,000 objects (Django, the skills, the intent model): a full
    collection walked them all, a pause of 40 to 150 ms that a step in that
    process waited out (docs/performance.md). Objects made later are
    collected as before.
    """
    gc.freeze()


@worker_process_init.connect
def start_tracing(**kwargs: Any) -> None:
    """Trace this pool process's tasks when OTEL_* says so (after the fork: the span exporter's thread)."""
    telemetry.start_worker_tracing()


@worker_process_shutdown.connect
def flush_spans(**kwargs: Any) -> None:
    telemetry.stop_tracing()


@task_postrun.connect
def forget_step_labels(**kwargs: Any) -> None:
    """A step's log labels end with its task, after Celery logged its outcome (skills/tasks.py sets them)."""
    telemetry.unbind_step()


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


@before_task_publish.connect
def stamp_publish_time(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Every message says when it was published (a retry: when it was published again).

    /metrics reads it off the oldest message of each queue: how long work waits for a worker.
    """
    if headers is not None:
        headers[PUBLISHED_HEADER] = time.time()


class Consumer(CeleryConsumer):
    """Celery's consumer, kept alive through a broker restart.

    When the broker connection drops, Celery 5.7 closes the broken
    connection after ``collect()`` detached its transport. Anything then
    done through that connection's channel raises AttributeError, which
    Celery treats as unrecoverable: the worker exits. Two things do that:

    - closing the channel, which tries to restore the unacknowledged
      messages (seen in 3 of 5 Redis restarts in the chaos suite);
    - acknowledging a message received on the old connection, when its task
      finished as the connection was lost (seen in the chaos suite too).

    Both are logged and skipped, and the consumer reconnects as usual. A
    finished step's outcome is in the database already; a message the broker
    kept comes back and passes the stored output on, one it lost is the
    sweeper's.
    Installed with ``worker_consumer``.
    """

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            connection.close = _after_connection_loss(connection.close, "broker connection not closed cleanly")  # type: ignore[method-assign]
        super().on_connection_error_after_connected(exc)

    def call_soon_ack(self, p: Any, *args: Any, **kwargs: Any) -> Any:
        return super().call_soon_ack(  # type: ignore[misc]  # not in the stubs
            _after_connection_loss(p, "message of a lost connection not acknowledged"), *args, **kwargs
        )


def _after_connection_loss(operation: Any, failure: str) -> Any:
    """``operation`` on a broker connection; AttributeError (a detached transport) is logged, not raised."""

    def quietly(*args: Any, **kwargs: Any) -> Any:
        try:
            return operation(*args, **kwargs)
        except AttributeError as exc:
            logging.getLogger(__name__).warning("%s: %r", failure, exc)
            return None

    return quietly
