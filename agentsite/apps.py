from __future__ import annotations

from celery import signals
from django.apps import AppConfig

from . import worker


class AgentsiteConfig(AppConfig):
    """The project's infrastructure: the hooks every Celery process runs."""

    name = "agentsite"

    def ready(self) -> None:
        signals.celeryd_init.connect(worker.keep_metrics_in_files)
        signals.worker_init.connect(worker.freeze_startup_objects)
        signals.worker_process_init.connect(worker.freeze_startup_objects)
        signals.worker_process_init.connect(worker.start_tracing)
        signals.worker_process_shutdown.connect(worker.flush_spans)
        signals.task_postrun.connect(worker.close_old_db_connections)
        signals.before_task_publish.connect(worker.stamp_publish_time)
