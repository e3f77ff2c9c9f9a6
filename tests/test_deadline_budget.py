"""A run's deadline as its steps' time budget (orchestration/budget.py)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import before_task_publish
from django.utils import timezone

from orchestration import broker, budget, services
from orchestration.canvas import StepOptions, step_signature
from orchestration.models import Run
from orchestration.services import start_run
from skills.registry import SkillContext

from .conftest import wait_for_run
from .test_cancel_replay import effect_rows
from .test_delivery import effect

# How far past its deadline a run cut by its budget may end: the step's outcome is stored, the run failed.
MARGIN = 1.5


def sleep(id: str, seconds: float, **fields: Any) -> dict[str, Any]:
    return {"skill": "sleep", "id": id, "args": {"seconds": seconds}, **fields}


def overrun(run: Run) -> float:
    """Seconds the run took beyond its deadline (negative: it ended before)."""
    assert run.finished_at is not None
    return (run.finished_at - run.deadline).total_seconds()


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """The headers and kwargs of the step messages this process publishes, as they leave it."""
    seen: list[dict[str, Any]] = []

    def keep(sender: str | None = None, headers: Any = None, body: Any = None, **kwargs: Any) -> None:
        if sender == budget.STEP_TASK:
            seen.append({"headers": dict(headers), "kwargs": body[1]})

    before_task_publish.connect(keep, weak=False)  # after orchestration.budget's receiver: it sees the capped headers
    yield seen
    before_task_publish.disconnect(keep)


@pytest.mark.worker
def test_a_chain_step_is_cut_by_what_remains_of_the_run_deadline(worker, user):
    run = start_run(owner=user, spec={"chain": [sleep("first", 2), sleep("second", 5)]}, deadline=3)

    run = wait_for_run(run)

    steps = {s.key: s for s in run.steps.all()}
    assert (steps["first"].status, steps["second"].status) == ("succeeded", "timed_out")
    assert steps["second"].error.startswith("timed out after ")
    assert steps["second"].error.endswith(": the run's 3s deadline was reached")
    assert run.status == "failed"
    assert run.error == f"step second timed out: {steps['second'].error}"
    assert overrun(run) < MARGIN  # not the 2 + 5 s of its steps


@pytest.mark.worker
def test_a_skill_that_sleeps_through_the_budget_is_killed_within_the_grace(worker, user):
    stuck = {"skill": "sleep", "id": "stuck", "args": {"seconds": 60, "shield": True}}
    run = start_run(owner=user, spec=stuck, deadline=2)

    run = wait_for_run(run)

    step = run.steps.get()
    assert step.status == "timed_out"
    assert step.error.startswith("killed at the hard time limit (")
    assert step.error.endswith("s), past the run's 2s deadline")
    # The hard limit is the soft one plus the grace; Celery's pool checks limits once a second.
    assert overrun(run) < budget.HARD_GRACE + 1 + MARGIN


@pytest.mark.worker
def test_a_step_that_waited_in_the_queue_gets_only_what_is_left(worker, user):
    # One member more than the worker has processes: the last waits until one is free.
    members = [sleep(f"m{i}", 2.5) for i in range(worker.concurrency + 1)]
    run = start_run(owner=user, spec={"group": members}, deadline=3)

    run = wait_for_run(run)

    cut = [s for s in run.steps.all() if s.status == "timed_out"]
    assert run.status == "failed"
    # At least the last started about 2.5 s in, with a soft limit of about 3 s from its publish:
    # the budget stopped it (one more, if a pool process was being replaced).
    assert 1 <= len(cut) < len(members)
    assert all(s.error.endswith(": the run's 3s deadline was reached") for s in cut)
    assert overrun(run) < MARGIN


@pytest.mark.worker
@pytest.mark.parametrize("capped", [True, False], ids=["expires-in-queue", "reaches-the-step"])
def test_a_step_that_starts_with_no_time_left_fails_fast_without_running_its_skill(worker, user, monkeypatch, capped):
    # The run's message is published only after its deadline (as by the sweeper, or a broker that held it).
    monkeypatch.setattr(broker, "publish_run", lambda *args: None)
    run = start_run(owner=user, spec={"chain": [effect("a"), effect("b")]}, deadline=1)
    monkeypatch.undo()
    time.sleep(max(0, (run.deadline - timezone.now()).total_seconds()) + 0.1)
    if capped:
        broker.republish(run)
    else:  # a message published without the cap (by an older release) reaches run_step
        before_task_publish.disconnect(budget.cap_step_message)
        try:
            broker.republish(run)
        finally:
            before_task_publish.connect(budget.cap_step_message)

    run = wait_for_run(run, timeout=10)

    a, b = run.steps.order_by("pk")
    assert (a.status, a.error) == ("timed_out", "no time left of the run's 1s deadline")
    assert a.attempts == (0 if capped else 1)
    assert (b.status, b.error) == ("cancelled", "not run: the run failed")
    assert (run.status, run.error) == ("failed", "step a timed out: no time left of the run's 1s deadline")
    assert effect_rows(run, "a") == effect_rows(run, "b") == 0


@pytest.mark.worker
def test_the_published_limits_and_ttl_are_capped_by_the_deadline(worker, user, published):
    run = start_run(owner=user, spec=sleep("s", 0.1, soft_time_limit=30, time_limit=40, ttl=600), deadline=5)

    assert wait_for_run(run).status == "succeeded"

    (message,) = published
    hard, soft = message["headers"]["timelimit"]
    assert soft == pytest.approx(5, abs=0.5)
    assert hard == pytest.approx(soft + budget.HARD_GRACE)
    expires = datetime.fromisoformat(message["headers"]["expires"])
    assert expires.timestamp() == pytest.approx(run.deadline.timestamp(), abs=0.001)
    assert message["kwargs"]["deadline"] == {"at": pytest.approx(run.deadline.timestamp()), "seconds": 5}


@pytest.mark.worker
def test_a_run_with_ample_time_keeps_its_steps_limits(worker, user, published):
    run = start_run(owner=user, spec={"chain": [sleep("a", 0.2, ttl=60), sleep("b", 0.2)]}, input="x", deadline=600)

    run = wait_for_run(run)

    assert (run.status, run.output) == ("succeeded", "x")
    (message,) = published
    assert message["headers"]["timelimit"] == [40, 30]  # the sleep skill's own
    expires = datetime.fromisoformat(message["headers"]["expires"])
    assert expires < run.deadline - timedelta(seconds=500)  # its own ttl of 60 s


@pytest.mark.worker
def test_a_replayed_run_gets_a_fresh_budget(worker, user, monkeypatch):
    monkeypatch.setattr(broker, "publish_run", lambda *args: None)
    run = start_run(owner=user, spec=effect("a"), input="x", deadline=2)
    monkeypatch.undo()
    time.sleep(max(0, (run.deadline - timezone.now()).total_seconds()) + 0.1)
    broker.republish(run)
    assert wait_for_run(run, timeout=10).status == "failed"

    services.replay_run(run)

    run = wait_for_run(run, timeout=10)
    assert (run.status, run.output, run.replays) == ("succeeded", "x", 1)
    assert effect_rows(run, "a") == 1


# --- The cap itself, and the budget as skills see it --------------------------------


def test_each_step_signature_carries_the_run_deadline():
    deadline = budget.Deadline(at=1_800_000_000.5, seconds=30)
    options = StepOptions(7, "t7", "default", 5, 10, None, 0, 1, 1, deadline=deadline.as_kwarg())

    sig = step_signature(options)

    assert sig.kwargs["deadline"] == {"at": 1_800_000_000.5, "seconds": 30}
    assert budget.Deadline.of_kwargs(sig.kwargs) == deadline


def test_a_retry_counts_what_is_left_from_its_eta():
    now = time.time()
    deadline = budget.Deadline(at=now + 10, seconds=60)
    eta = datetime.fromtimestamp(now + 4, tz=UTC).isoformat()

    capped = budget.capped_headers({"timelimit": [40, 30], "eta": eta, "expires": None}, deadline, now)

    assert capped["timelimit"] == pytest.approx([6 + budget.HARD_GRACE, 6])
    assert datetime.fromisoformat(capped["expires"]).timestamp() == pytest.approx(deadline.at)


def test_a_spent_budget_still_publishes_positive_limits():
    # Celery reads a limit of 0 as none at all; the message expires at the deadline anyway.
    now = time.time()

    capped = budget.capped_headers({"timelimit": [40, 30]}, budget.Deadline(at=now - 5, seconds=3), now)

    assert capped["timelimit"] == [budget.MIN_LIMIT + budget.HARD_GRACE, budget.MIN_LIMIT]


def test_an_earlier_ttl_is_kept():
    now = time.time()
    ttl = datetime.fromtimestamp(now + 2, tz=UTC).isoformat()

    capped = budget.capped_headers({"timelimit": [4, 3], "expires": ttl}, budget.Deadline(at=now + 60, seconds=60), now)

    assert capped == {"timelimit": [4, 3], "expires": ttl}


def test_a_message_without_a_deadline_is_not_capped():
    headers: dict[str, Any] = {"timelimit": [40, 30], "expires": None}

    budget.cap_step_message(sender=budget.STEP_TASK, headers=headers, body=((), {"step_id": 1}, {}))

    assert headers == {"timelimit": [40, 30], "expires": None}


def test_a_skill_sees_how_much_time_is_left():
    def context(deadline: datetime | None) -> SkillContext:
        return SkillContext(1, 1, "a", None, {}, {}, 1, deadline=deadline)

    assert context(None).remaining() is None
    assert context(datetime.now(tz=UTC) + timedelta(seconds=30)).remaining() == pytest.approx(30, abs=1)
    assert context(datetime.now(tz=UTC) - timedelta(seconds=30)).remaining() == 0


def test_a_step_started_right_after_its_publish_is_cut_by_the_deadline_too():
    """The published soft limit is the deadline's, rounded up: the step finds a little more left than it."""
    left = 0.2
    start = budget.StepBudget(budget.Deadline(at=time.time() + left, seconds=3), left=left, published_soft=left - 0.004)

    try:
        with pytest.raises(budget.DeadlineReached, match="the run's 3s deadline was reached"), start.enforced():
            time.sleep(2)
    finally:
        budget.restore_pool_soft_limit()


def test_the_pool_soft_limit_is_set_aside_while_the_budget_timer_is_armed():
    """Two soft timeouts a moment apart would land the second outside the skill: only the budget's comes."""
    pool_soft_limits: list[int] = []

    def pool_soft_limit(signum: int, frame: Any) -> None:  # as billiard's handler, which raises into the task
        pool_soft_limits.append(signum)
        raise SoftTimeLimitExceeded()

    def skill_signalled_by_the_pool() -> None:
        os.kill(os.getpid(), budget.POOL_SOFT_SIGNAL)
        time.sleep(2)

    original = signal.signal(budget.POOL_SOFT_SIGNAL, pool_soft_limit)
    left = 0.3
    start = budget.StepBudget(budget.Deadline(at=time.time() + left, seconds=3), left=left, published_soft=left)
    try:
        with pytest.raises(budget.DeadlineReached), start.enforced():
            skill_signalled_by_the_pool()
        assert pool_soft_limits == []
        budget.restore_pool_soft_limit()
        assert signal.getsignal(budget.POOL_SOFT_SIGNAL) is pool_soft_limit
    finally:
        budget.restore_pool_soft_limit()
        signal.signal(budget.POOL_SOFT_SIGNAL, original)
