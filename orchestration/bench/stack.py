"""The benchmark's processes: agentsite's web and worker as the Procfile says, and the raw Celery worker.

Import only after ``django.setup()`` with the benchmark's environment
(``child.py`` does).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from rest_framework.authtoken.models import Token

from agentsite.celery import app
from orchestration.chaos.api import Api
from orchestration.chaos.processes import (
    ScenarioError,
    Service,
    Supervisor,
    group_members,
    procfile_command,
    procfile_service,
    wait_until,
)

from . import raw

WORKER = "bench@localhost"
RAW_WORKER = "raw@localhost"
# Celery's own line for every task that succeeded (celery.app.trace.LOG_SUCCESS).
SUCCEEDED = re.compile(rb"Task (\S+)\[[^\]]+\] succeeded in ([0-9.e-]+)s")


class BenchStack:
    """Web and worker (Procfile), the raw worker, and an API user with a conversation."""

    def __init__(self, supervisor: Supervisor, env: dict[str, str]) -> None:
        self.supervisor = supervisor
        self.env = env
        self.directory = supervisor.directory
        self.procfile = Path(settings.BASE_DIR) / "Procfile"
        self.url = f"http://127.0.0.1:{env['PORT']}"
        self.api = Api(self.url)
        self.user: User | None = None
        self.conversation = 0

    def start(self) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        self.user = User.objects.create_user("bench")
        self.api.token = Token.objects.create(user=self.user).key
        self.web = self._procfile("web", [])
        if not wait_until(lambda: not self.web.alive() or self.api.get("/healthz", 1).status == 200, 60, 0.2):
            raise ScenarioError("web did not answer /healthz within 60 s; see web.log")
        self.worker = self._procfile("worker", ["--hostname", WORKER])
        concurrency = self.env["WORKER_CONCURRENCY"]
        argv = [sys.executable, "-m", "celery", "-A", "orchestration.bench.raw", "worker", "--pool=prefork"]
        argv += [f"--concurrency={concurrency}", "--loglevel=INFO", "--hostname", RAW_WORKER]
        # Without DJANGO_SETTINGS_MODULE: Celery's Django fixup would load our
        # settings and signal handlers into the raw worker (and our queues).
        raw_env = {name: value for name, value in self.env.items() if name != "DJANGO_SETTINGS_MODULE"}
        self.raw_worker = self.supervisor.start("raw-worker", argv, raw_env, Path(settings.BASE_DIR))
        self._wait_ping(app, WORKER, self.worker)
        self._wait_ping(raw.app, RAW_WORKER, self.raw_worker)
        reply = self.api.post("/api/conversations/", {"title": "bench"})
        if reply.status != 201:
            raise ScenarioError(f"POST /api/conversations/ answered {reply}")
        self.conversation = int(reply.body["id"])

    def _procfile(self, process: str, extra: list[str]) -> Service:
        command = procfile_command(self.procfile, process)
        return procfile_service(self.supervisor, process, command, extra, self.env, Path(settings.BASE_DIR))

    def _wait_ping(self, celery_app: object, name: str, service: Service) -> None:
        ping = celery_app.control.ping  # type: ignore[attr-defined]
        if not wait_until(lambda: not service.alive() or bool(ping([name], timeout=0.5)), 60):
            raise ScenarioError(f"worker {name} did not answer a ping within 60 s; see {service.name}.log")
        if not service.alive():
            raise ScenarioError(f"worker {name} exited; see {service.name}.log")

    def runs_path(self) -> str:
        return f"/api/conversations/{self.conversation}/runs/"

    def worker_rss_mb(self) -> float:
        """Resident memory of agentsite's worker: main process and pool children, in MB."""
        return sum(_rss_kb(pid) for pid in group_members(self.worker.pid)) / 1024

    def log_size(self, service: Service) -> int:
        return (self.directory / f"{service.name}.log").stat().st_size

    def task_runtimes(self, service: Service, task: str, start: int = 0, end: int | None = None) -> list[float]:
        """Celery's runtime (ms) of each ``task`` that succeeded, from bytes ``start:end`` of the service's log."""
        with (self.directory / f"{service.name}.log").open("rb") as log:
            log.seek(start)
            text = log.read() if end is None else log.read(end - start)
        return [float(seconds) * 1000 for name, seconds in SUCCEEDED.findall(text) if name.decode() == task]


def _rss_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0
