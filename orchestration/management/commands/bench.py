"""Measure end-to-end run latency and throughput against running workers.

    python manage.py bench [--shape chain3] [--runs 50]

Needs a worker (Procfile's `worker` line) on the same REDIS_URL and database.
Runs are started in-process through services.start_run (the API's code path,
minus HTTP) and waited on in the database, first one at a time (latency),
then all at once (throughput).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentsite.celery import app
from orchestration.models import Run, RunStatus
from orchestration.services import start_run

ECHO = {"skill": "echo"}
SHAPES: dict[str, dict[str, Any]] = {
    "single": ECHO,
    "chain3": {"chain": [ECHO, ECHO, ECHO]},
    "group10": {"group": [ECHO] * 10},
    "chord10": {"chord": {"header": [ECHO] * 10, "body": ECHO}},
}


class Command(BaseCommand):
    help = "Time runs of a spec shape end to end (needs a running worker)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--shape", choices=sorted(SHAPES), default="chain3")
        parser.add_argument("--runs", type=int, default=50)
        parser.add_argument("--timeout", type=float, default=120)

    def handle(self, *args: Any, shape: str, runs: int, timeout: float, **options: Any) -> None:
        if not app.control.ping(timeout=2):
            raise CommandError("no Celery worker answers: start one (Procfile's worker line)")
        owner, _ = User.objects.get_or_create(username="bench")
        spec = SHAPES[shape]
        latencies = [self._one(owner, spec, timeout) for _ in range(runs)]
        started = time.perf_counter()
        ids = [start_run(owner=owner, spec=spec, input={"n": i}).pk for i in range(runs)]
        self._wait(ids, timeout)
        elapsed = time.perf_counter() - started
        failed = Run.objects.filter(pk__in=ids).exclude(status=RunStatus.SUCCEEDED).count()
        p50, p95 = _percentile(latencies, 50), _percentile(latencies, 95)
        self.stdout.write(f"shape={shape} runs={runs}")
        self.stdout.write(
            f"latency one at a time: p50={p50:.1f} ms p95={p95:.1f} ms mean={statistics.mean(latencies):.1f} ms"
        )
        self.stdout.write(
            f"throughput all at once: {runs / elapsed:.1f} runs/s ({elapsed:.2f} s), not succeeded: {failed}"
        )

    def _one(self, owner: User, spec: dict[str, Any], timeout: float) -> float:
        started = time.perf_counter()
        run = start_run(owner=owner, spec=spec, input={"n": 0})
        self._wait([run.pk], timeout)
        return (time.perf_counter() - started) * 1000

    def _wait(self, ids: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while Run.objects.filter(pk__in=ids, status__in=("queued", "running", "waiting")).exists():
            if time.monotonic() > deadline:
                raise CommandError(f"runs still active after {timeout}s")
            time.sleep(0.002)


def _percentile(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]
