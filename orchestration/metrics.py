"""Prometheus counters and histograms of runs and steps (docs/operations.md, "Metrics").

``orchestration.transitions`` counts each transition here, once its transaction
commits. Labels are bounded: workflow names (``adhoc`` for a run without one),
skill names, statuses; never a run, step or task id.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from django.db import transaction
from prometheus_client import Counter, Histogram

from .models import StepStatus

# The workflow label of a run started from a spec rather than a named workflow.
ADHOC = "adhoc"
# Steps take from milliseconds (echo) to an hour (STEP_MAX_TIME_LIMIT).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

RUNS_STARTED = Counter("agentsite_runs_started", "Runs accepted or replayed, by workflow.", ["workflow"])
RUNS_FINISHED = Counter(
    "agentsite_runs_finished", "Runs that ended (succeeded, failed, cancelled), by workflow.", ["workflow", "status"]
)
STEPS_FINISHED = Counter(
    "agentsite_steps_finished",
    "Steps that ended (succeeded, failed, timed_out, skipped, cancelled), by skill.",
    ["skill", "status"],
)
STEP_DURATION = Histogram(
    "agentsite_step_duration_seconds",
    "From a step's first start to its end (retries included), for steps that ran and did not end cancelled.",
    ["skill"],
    buckets=DURATION_BUCKETS,
)
STEP_RETRIES = Counter("agentsite_step_retries", "Failed attempts of a step that will be tried again.", ["skill"])
STEP_TIMEOUTS = Counter(
    "agentsite_step_timeouts",
    "Attempts stopped by their soft or hard time limit or their run's deadline, retried or not.",
    ["skill"],
)
STEP_REDELIVERIES = Counter(
    "agentsite_step_redeliveries", "Attempts cut short by a lost worker process, to be run again.", ["skill"]
)


def run_started(workflow: str | None) -> None:
    _on_commit(lambda: RUNS_STARTED.labels(workflow or ADHOC).inc())


def run_finished(workflow: str | None, status: str) -> None:
    _on_commit(lambda: RUNS_FINISHED.labels(workflow or ADHOC, status).inc())


def step_finished(skill: str, status: str, started_at: datetime | None, now: datetime) -> None:
    def count() -> None:
        STEPS_FINISHED.labels(skill, status).inc()
        if started_at is not None and status != StepStatus.CANCELLED:
            STEP_DURATION.labels(skill).observe((now - started_at).total_seconds())
        if status == StepStatus.TIMED_OUT:
            STEP_TIMEOUTS.labels(skill).inc()

    _on_commit(count)


def step_retried(skill: str, timed_out: bool) -> None:
    def count() -> None:
        STEP_RETRIES.labels(skill).inc()
        if timed_out:
            STEP_TIMEOUTS.labels(skill).inc()

    _on_commit(count)


def step_timed_out(skill: str) -> None:
    """A timeout that neither failed nor retried its step (an optional step, skipped)."""
    _on_commit(lambda: STEP_TIMEOUTS.labels(skill).inc())


def step_redelivered(skill: str) -> None:
    _on_commit(lambda: STEP_REDELIVERIES.labels(skill).inc())


def _on_commit(count: Callable[[], None]) -> None:
    # robust: a count that fails is logged by Django; it never fails the change it counts.
    transaction.on_commit(count, robust=True)
