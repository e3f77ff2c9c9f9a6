"""gunicorn settings of the Procfile's web line (``--config python:agentsite.gunicorn_conf``).

Only the hooks that keep the Prometheus counts of every gunicorn process
(``agentsite/metrics.py``); everything else is on the command line.
"""

from __future__ import annotations

from typing import Any

from agentsite.metrics import process_exited, start_process


def on_starting(server: Any) -> None:
    """In the master, before it forks its workers: they count into files of the role "web"."""
    start_process("web")


def child_exit(server: Any, worker: Any) -> None:
    process_exited("web", worker.pid)
