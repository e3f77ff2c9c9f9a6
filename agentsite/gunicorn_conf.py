"""gunicorn settings of the Procfile's web line (``--config python:agentsite.gunicorn_conf``).

Only hooks: those that keep the Prometheus counts of every gunicorn process
(``agentsite/metrics.py``), and one that keeps the loaded app out of the
garbage collector's full passes; everything else is on the command line.
"""

from __future__ import annotations

import gc
from typing import Any

from agentsite.metrics import process_exited, start_process


def on_starting(server: Any) -> None:
    """In the master, before it forks its workers: they count into files of the role "web"."""
    start_process("web")


def post_worker_init(worker: Any) -> None:
    """The worker loaded the app: load the URLconf and its views too, then ``gc.freeze`` what is loaded.

    Full collections then skip those objects (docs/operations.md, "Why these defaults").
    """
    from django.urls import get_resolver  # the app is loaded: Django is set up

    get_resolver().url_patterns  # noqa: B018 - loads the URLconf
    gc.freeze()


def child_exit(server: Any, worker: Any) -> None:
    process_exited("web", worker.pid)
