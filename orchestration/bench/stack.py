"""The benchmark's processes: the chaos suite's stack (web and worker as the Procfile says) and the raw Celery worker.

Import only after ``django.setup()`` with the benchmark's environment
(``child.py`` does).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from django.conf import settings

from orchestration.chaos.processes import ScenarioError, Service, Supervisor, group_members, wait_until
from orchestration.chaos.stack import Stack

from . import raw
from .cpu import CpuMeter

RAW_WORKER = "raw@localhost"
# Celery's own line for every task that succeeded (celery.app.trace.LOG_SUCCESS).
SUCCEEDED = re.compile(rb"Task (\S+)\[[^\]]+\] succeeded in ([0-9.e-]+)s")


class BenchStack(Stack):
    """Web and a worker (no beat: nothing here needs the sweeper), the raw worker, an API user and a conversation."""

    role = "bench"

    def __init__(self, supervisor: Supervisor, env: dict[str, str]) -> None:
        super().__init__(supervisor, "bench", env, redis=None, postgres=None)
        self.directory = supervisor.directory

    def start(self) -> None:
        self.make_user()
        self.start_web()
        self.web = self.expected_up[-1]
        self.start_worker()
        self.raw_worker = self._start_raw_worker()
        self.conversation = self.api.create_conversation(self.name)

    def _start_raw_worker(self) -> Service:
        argv = [sys.executable, "-m", "celery", "-A", "orchestration.bench.raw", "worker", "--pool=prefork"]
        argv += [f"--concurrency={self.env['WORKER_CONCURRENCY']}", "--loglevel=INFO", "--hostname", RAW_WORKER]
        # Without DJANGO_SETTINGS_MODULE: Celery's Django fixup would load our
        # settings and signal handlers into the raw worker (and our queues).
        env = {name: value for name, value in self.env.items() if name != "DJANGO_SETTINGS_MODULE"}
        service = self.supervisor.start("raw-worker", argv, env, Path(settings.BASE_DIR))
        if not wait_until(lambda: not service.alive() or bool(raw.app.control.ping([RAW_WORKER], timeout=0.5)), 60):
            raise ScenarioError(f"the raw worker did not answer a ping within 60 s; see {service.name}.log")
        if not service.alive():
            raise ScenarioError(f"the raw worker exited; see {service.name}.log")
        return service

    def cpu_meter(self) -> CpuMeter:
        """CPU of web, worker, raw worker, the database and Redis servers, and this process (the client)."""
        return CpuMeter.for_groups(
            {"web": self.web.pid, "worker": self.worker.service.pid, "raw_worker": self.raw_worker.pid}
        )

    def runs_path(self) -> str:
        return f"/api/conversations/{self.conversation}/runs/"

    def worker_rss_mb(self) -> float:
        """Resident memory of agentsite's worker: main process and pool children, in MB."""
        return sum(_rss_kb(pid) for pid in group_members(self.worker.service.pid)) / 1024

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
