"""The benchmark's phases; each returns its figures as a dict.

Latency ends at the completion time a run stored, not when a poll saw it; throughput is
a batch sent at once. How each figure is measured: docs/performance.md, "What each figure is".
"""

from __future__ import annotations

import csv
import logging
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery.result import AsyncResult, GroupResult
from django.db import connection
from django.db.models import Max

from orchestration.chaos.processes import ScenarioError, Service
from orchestration.models import ACTIVE_RUN_STATUSES, Run, RunStatus, Step, StepStatus
from orchestration.services import start_run

from . import raw
from .cpu import CpuMeter
from .shapes import SHAPES, percentile
from .stack import BenchStack

log = logging.getLogger("bench")
POSTERS = 8
SEQUENTIAL_SHAPES = ("single", "chain3")
RUN_TIMEOUT = 300
INPUT = {"question": "hello"}


@dataclass
class ShapeSamples:
    latency_ms: list[float] = field(default_factory=list)
    runs: int = 0
    seconds: float = 0.0
    cpu_seconds: Counter[str] = field(default_factory=Counter)  # by role, over the batches

    def add_batch(self, runs: int, seconds: float) -> None:
        self.runs += runs
        self.seconds += seconds

    def cpu_ms_per_run(self) -> dict[str, float]:
        """CPU per run of the batches, by role, and their total."""
        per_run = {role: seconds * 1000 / self.runs for role, seconds in self.cpu_seconds.items()} if self.runs else {}
        return {**{role: round(ms, 2) for role, ms in per_run.items()}, "total": round(sum(per_run.values()), 2)}

    @property
    def per_s(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0


# --- shapes: ours against raw, interleaved -----------------------------------


@dataclass
class TaskRuntimes:
    """Celery's runtime (ms) of one task's runs, from a worker's log: one at a time, and in batches."""

    task: str
    worker: Service
    alone: list[float] = field(default_factory=list)
    loaded: list[float] = field(default_factory=list)

    def during(self, stack: BenchStack, into: list[float], measure: Callable[..., None], *args: Any) -> None:
        """Run ``measure(*args)``; add the runtimes of our task that the worker logged meanwhile to ``into``."""
        start = stack.log_size(self.worker)
        measure(*args)
        into += stack.task_runtimes(self.worker, self.task, start, stack.log_size(self.worker))

    def overhead(self, raw: TaskRuntimes, which: str) -> float:
        ours, theirs = getattr(self, which), getattr(raw, which)
        return round(percentile(ours, 50) - percentile(theirs, 50), 2)


def shapes_phase(stack: BenchStack, shapes: list[str], rounds: int, batch: int, latency_runs: int) -> dict[str, Any]:
    """Each round measures every shape, ours then raw, so drift on a noisy machine hits both."""
    ours = {shape: ShapeSamples() for shape in shapes}
    theirs = {shape: ShapeSamples() for shape in shapes}
    step = TaskRuntimes("agentsite.run_step", stack.worker.service)
    noop = TaskRuntimes("bench.noop", stack.raw_worker)
    meter = stack.cpu_meter()
    for round_ in range(1, rounds + 1):
        for shape in shapes:
            spec = SHAPES[shape]
            # One run at a time, a step of a sequential shape runs alone; a group's run at once.
            alone = shape in SEQUENTIAL_SHAPES
            step.during(stack, step.alone if alone else [], _ours_latency, stack, spec, ours[shape], latency_runs)
            with _cpu_used(meter, ours[shape]):
                step.during(stack, step.loaded, _ours_batch, stack, spec, ours[shape], batch)
            noop.during(stack, noop.alone if alone else [], _raw_latency, shape, theirs[shape], latency_runs)
            with _cpu_used(meter, theirs[shape]):
                noop.during(stack, noop.loaded, _raw_batch, shape, theirs[shape], batch)
            log.info("round %s %s: ours %.1f/s, raw %.1f/s", round_, shape, ours[shape].per_s, theirs[shape].per_s)
    return {
        "shapes": {shape: _shape_figures(ours[shape], theirs[shape]) for shape in shapes},
        # Our bookkeeping per step: what a step task takes beyond a no-op Celery task.
        "step_overhead_ms_p50": step.overhead(noop, "alone"),
        "step_overhead_loaded_ms_p50": step.overhead(noop, "loaded"),
        "step_runtime_ms_p50": round(percentile(step.alone, 50), 2),
        "raw_task_runtime_ms_p50": round(percentile(noop.alone, 50), 2),
    }


@contextmanager
def _cpu_used(meter: CpuMeter, samples: ShapeSamples) -> Iterator[None]:
    before = meter.read()
    yield
    samples.cpu_seconds.update(meter.used(before, meter.read()))


def _shape_figures(ours: ShapeSamples, theirs: ShapeSamples) -> dict[str, Any]:
    return {
        "ours_per_s": round(ours.per_s, 1),
        "raw_per_s": round(theirs.per_s, 1),
        "ratio": round(ours.per_s / theirs.per_s, 2) if theirs.per_s else 0.0,
        "ours_p50_ms": round(percentile(ours.latency_ms, 50), 1),
        "ours_p99_ms": round(percentile(ours.latency_ms, 99), 1),
        "raw_p50_ms": round(percentile(theirs.latency_ms, 50), 1),
        "raw_p99_ms": round(percentile(theirs.latency_ms, 99), 1),
        "ours_cpu_ms_per_run": ours.cpu_ms_per_run(),
        "raw_cpu_ms_per_run": theirs.cpu_ms_per_run(),
    }


def _ours_latency(stack: BenchStack, spec: dict[str, Any], samples: ShapeSamples, runs: int) -> None:
    for _ in range(runs):
        sent = time.time()
        ids = [stack.start_run(spec, INPUT)]
        samples.latency_ms.append((_finished(ids) - sent) * 1000)


def _ours_batch(stack: BenchStack, spec: dict[str, Any], samples: ShapeSamples, runs: int) -> None:
    sent = time.time()
    with ThreadPoolExecutor(POSTERS) as posters:
        ids = list(posters.map(lambda _: stack.start_run(spec, INPUT), range(runs)))
    samples.add_batch(runs, _finished(ids) - sent)


def _finished(ids: list[int]) -> float:
    """Wait until these runs ended; when the last one ended (epoch seconds). They must all have succeeded."""
    wait_runs_ended(ids)
    runs = Run.objects.filter(pk__in=ids)
    failed = runs.exclude(status=RunStatus.SUCCEEDED).values_list("pk", "status", "error").first()
    if failed:
        raise ScenarioError(f"run {failed[0]} ended {failed[1]}: {failed[2]}")
    last = runs.aggregate(last=Max("finished_at"))["last"]
    return float(last.timestamp())


def wait_runs_ended(ids: list[int], timeout: float = RUN_TIMEOUT) -> None:
    active = Run.objects.filter(pk__in=ids, status__in=ACTIVE_RUN_STATUSES)
    interval = 0.01 if len(ids) == 1 else 0.05  # a poll is a query: it takes CPU from the steps
    deadline = time.monotonic() + timeout
    while active.exists():
        if time.monotonic() > deadline:
            raise ScenarioError(f"{active.count()} of {len(ids)} runs still active after {timeout:g} s")
        time.sleep(interval)


def _raw_latency(shape: str, samples: ShapeSamples, runs: int) -> None:
    for _ in range(runs):
        sent = time.time()
        result = raw.canvas(shape).apply_async()
        samples.latency_ms.append((_raw_done([result]) - sent) * 1000)


def _raw_batch(shape: str, samples: ShapeSamples, runs: int) -> None:
    sent = time.time()
    results = [raw.canvas(shape).apply_async() for _ in range(runs)]
    samples.add_batch(runs, _raw_done(results) - sent)


def _raw_done(results: Sequence[AsyncResult | GroupResult]) -> float:
    """Wait for these canvases' results; when the last one was stored (epoch seconds)."""
    for result in results:
        result.get(timeout=RUN_TIMEOUT)
    return max(_done_at(result) for result in results)


def _done_at(result: AsyncResult | GroupResult) -> float:
    if isinstance(result, GroupResult):
        return max(_done_at(child) for child in result.results or [])
    done = result.date_done
    if done is None:
        raise ScenarioError(f"raw task {result.id} has no completion time")
    if isinstance(done, str):
        done = datetime.fromisoformat(done)
    if done.tzinfo is None:  # Celery stores UTC
        done = done.replace(tzinfo=UTC)
    return float(done.timestamp())


# --- worker memory over many runs --------------------------------------------


def memory_phase(stack: BenchStack, runs: int, shape: str, batch: int = 500) -> dict[str, Any]:
    """Worker RSS before and after ``runs`` runs, sent in batches (started in-process, as the API does)."""
    assert stack.user is not None
    before = stack.worker_rss_mb()
    done = 0
    while done < runs:
        count = min(batch, runs - done)
        ids = [start_run(owner=stack.user, spec=SHAPES[shape], input={"n": done + i}).pk for i in range(count)]
        wait_runs_ended(ids)
        done += count
    after = stack.worker_rss_mb()
    log.info("memory: worker RSS %.1f MB before, %.1f MB after %s %s runs", before, after, runs, shape)
    return {"worker_rss_before_mb": round(before, 1), "worker_rss_mb": round(after, 1), "memory_runs": runs}


# --- API run creation at a fixed rate (locust) -------------------------------


# Requests per second per locust user; their schedules spread evenly over the period (locustfile.py).
USER_RATE = 10


def api_phase(stack: BenchStack, rate: int, seconds: int) -> dict[str, Any]:
    """``rate`` run creations per second for ``seconds`` by locust, then wait for those runs to end."""
    assert stack.api.token is not None
    prefix = stack.directory / "locust"
    started = Run.objects.aggregate(last=Max("pk"))["last"] or 0
    users = max(1, math.ceil(rate / USER_RATE))
    env = {
        **stack.env,
        "BENCH_TOKEN": stack.api.token,
        "BENCH_RUNS_PATH": stack.runs_path(),
        "BENCH_USER_RATE": str(rate / users),
        "BENCH_USERS": str(users),
    }
    argv = [sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")), "--headless"]
    argv += ["--host", stack.api.base_url, "--users", str(users), "--spawn-rate", str(users)]
    argv += ["--run-time", f"{seconds}s"]
    argv += ["--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    with (stack.directory / "locust.log").open("ab") as output:
        subprocess.run(argv, env=env, stdout=output, stderr=subprocess.STDOUT, check=True, timeout=seconds + 120)
    row = _aggregated_row(Path(f"{prefix}_stats.csv"))
    wait_runs_ended(list(Run.objects.filter(pk__gt=started).values_list("pk", flat=True)))
    return {
        "post_rps": round(float(row["Requests/s"]), 1),
        "post_p50_ms": float(row["50%"]),
        "post_p99_ms": float(row["99%"]),
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "seconds": seconds,
        "users": users,
    }


def _aggregated_row(path: Path) -> dict[str, str]:
    with path.open(newline="") as stats:
        for row in csv.DictReader(stats):
            if row["Name"] == "Aggregated":
                return row
    raise ScenarioError(f"no Aggregated row in {path}")


# --- reads with many steps stored --------------------------------------------


def reads_phase(stack: BenchStack, steps: int, requests: int, steps_per_run: int = 10) -> dict[str, Any]:
    """Store ``steps`` more steps (finished runs of ``steps_per_run``), then time list and detail requests."""
    assert stack.user is not None
    seeded = _seed(stack, steps, steps_per_run)
    total = Step.objects.count()
    detail_ids = seeded[:: max(1, len(seeded) // requests)][:requests]
    lists = _timed(lambda i: stack.api.get("/api/runs/"), requests)
    filtered = _timed(lambda i: stack.api.get("/api/runs/?status=succeeded"), requests)
    details = _timed(lambda i: stack.api.get(f"/api/runs/{detail_ids[i % len(detail_ids)]}/"), requests)
    return {
        "steps_stored": total,
        "list_p50_ms": round(percentile(lists, 50), 1),
        "list_p99_ms": round(percentile(lists, 99), 1),
        "list_filtered_p99_ms": round(percentile(filtered, 99), 1),
        "detail_p50_ms": round(percentile(details, 50), 1),
        "detail_p99_ms": round(percentile(details, 99), 1),
    }


def _seed(stack: BenchStack, steps: int, steps_per_run: int, chunk: int = 500) -> list[int]:
    """Bulk-insert finished runs with their steps; their ids."""
    ids: list[int] = []
    now = datetime.now(UTC)
    spec = {"chain": [{"skill": "echo"}] * steps_per_run}
    for offset in range(0, steps // steps_per_run, chunk):
        count = min(chunk, steps // steps_per_run - offset)
        runs = Run.objects.bulk_create(
            Run(
                owner=stack.user,
                conversation_id=stack.conversation,
                spec=spec,
                input={"n": offset + i},
                output={"n": offset + i},
                status=RunStatus.SUCCEEDED,
                started_at=now,
                finished_at=now,
            )
            for i in range(count)
        )
        Step.objects.bulk_create(
            Step(
                run=run,
                key=str(k),
                path=f"chain.{k}",
                skill="echo",
                soft_time_limit=10,
                time_limit=15,
                queue="default",
                status=StepStatus.SUCCEEDED,
                output=run.output,
                attempts=1,
                started_at=now,
                finished_at=now,
            )
            for run in runs
            for k in range(steps_per_run)
        )
        ids += [run.pk for run in runs]
    # Fresh planner statistics, as autovacuum would gather (docs/performance.md, "What changed, measured").
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return ids


def _timed(request: Callable[[int], Any], count: int) -> list[float]:
    """Milliseconds of each of ``count`` requests; each must answer 200."""
    times = []
    for i in range(count):
        started = time.perf_counter()
        reply = request(i)
        times.append((time.perf_counter() - started) * 1000)
        if reply.status != 200:
            raise ScenarioError(f"a read answered {reply}")
    return times
