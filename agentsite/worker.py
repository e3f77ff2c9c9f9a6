"""What every Celery process of the project does besides its tasks: metrics files, tracing, connections.

The signal handlers here are connected in ``agentsite.apps.AgentsiteConfig.ready``.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from django.db import close_old_connections

from agentsite import metrics, telemetry


def keep_metrics_in_files(sender: str, **kwargs: Any) -> None:
    """celeryd_init, before the pool forks: every process of the worker counts into files (agentsite/metrics.py)."""
    metrics.start_process(f"worker-{sender}")


def close_old_db_connections(**kwargs: Any) -> None:
    """task_postrun: drop connections that are broken or older than CONN_MAX_AGE, as a request's end does."""
    close_old_connections()


def freeze_startup_objects(**kwargs: Any) -> None:
    """worker_init and worker_process_init: keep what was loaded at start out of the collector's full passes."""
    gc.freeze()


def start_tracing(**kwargs: Any) -> None:
    """worker_process_init: trace the pool process's tasks when OTEL_* says so (its exporter thread starts here)."""
    telemetry.start_worker_tracing()


def flush_spans(**kwargs: Any) -> None:
    telemetry.stop_tracing()


def stamp_publish_time(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """before_task_publish: the message says when it was published, for the queue age gauge of /metrics."""
    if headers is not None:
        headers[metrics.PUBLISHED_HEADER] = time.time()


class Consumer(CeleryConsumer):
    """Celery's consumer, kept alive through a broker restart (``CELERY_WORKER_CONSUMER``).

    Closing a lost connection's channel, or acking one of its messages, raises AttributeError: logged, not fatal.
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
