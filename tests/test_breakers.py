"""Circuit breakers (skills/breakers.py): shared by every worker process through Redis.

The ``fragile`` diagnostics skill has a breaker (3 consecutive failed
attempts, 5 s cool-down) and a fallback; each call writes one skills.Effect
row, so a test proves whether the skill was called.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from orchestration.models import Run, RunEvent
from orchestration.services import start_run
from skills import breakers
from skills.models import Effect
from skills.registry import Breaker, Skill, SkillContext, registry

from .conftest import wait_for_run
from .test_metrics import scrape

FRAGILE = registry.get("fragile")
COOL_DOWN = 5  # fragile's reset_timeout
FALLBACK = {"fallback": True}
OPEN_ERROR = re.compile(r'circuit open for skill "fragile" \(3 failures; retry after [1-5]s\)')
DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens there


@pytest.fixture(autouse=True)
def closed_breaker() -> Any:
    """Each test starts, and leaves, fragile's circuit as new: closed, no failure counted."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    reset = lambda: client.delete(*client.keys(f"{breakers.namespace('fragile')}:*") or ["-"])  # noqa: E731
    reset()
    yield
    reset()
    client.close()


def fragile(fail: bool = False, seconds: float = 0, **options: Any) -> dict[str, Any]:
    return {"skill": "fragile", "args": {"fail": fail, "seconds": seconds}, **options}


def run(user: Any, spec: Any, input: Any = None) -> Run:
    return wait_for_run(start_run(owner=user, spec=spec, input=input), 30)


def calls(run: Run) -> int:
    return Effect.objects.filter(run_id=run.pk).count()


def breaker() -> dict[str, Any]:
    """fragile's breaker as Redis has it, read from this (the test) process."""
    assert FRAGILE is not None
    return breakers.states([FRAGILE])["fragile"]


def trip(user: Any) -> Run:
    """Open fragile's circuit: three optional steps fail at once, in three of the worker's pool processes."""
    tripping = run(user, {"group": [fragile(fail=True, seconds=0.5, optional=True, id=f"f{i}") for i in range(3)]})
    assert tripping.status == "succeeded"
    assert tripping.output == [FALLBACK] * 3
    assert calls(tripping) == 3
    starts = [s.started_at for s in tripping.steps.all() if s.started_at]
    ends = [s.finished_at for s in tripping.steps.all() if s.finished_at]
    # They overlapped, so they ran in different pool processes (one runs one step at a time).
    assert len(starts) == len(ends) == 3
    assert max(starts) < min(ends)
    return tripping


@pytest.mark.worker
def test_failures_counted_by_several_worker_processes_open_the_circuit_for_all(worker, user):
    trip(user)

    state = breaker()
    assert state["state"] == "open"
    assert state["failures"] == 3
    assert datetime.fromisoformat(state["opened_at"]) is not None


@pytest.mark.worker
def test_soft_time_limits_count_as_failures(worker, user):
    slow = fragile(seconds=2, optional=True, soft_time_limit=0.2, time_limit=3)
    r = run(user, {"group": [{**slow, "id": f"s{i}"} for i in range(3)]})

    assert r.status == "succeeded"
    assert {s.error for s in r.steps.all()} == {"timed out after 0.2s (soft limit)"}
    assert breaker()["state"] == "open"


@pytest.mark.worker
def test_a_required_step_fails_fast_while_open_without_calling_the_skill(worker, user):
    trip(user)

    r = run(user, {"skill": "fragile", "id": "f", "retries": 2})

    assert r.status == "failed"
    assert calls(r) == 0
    step = r.steps.get()
    assert step.status == "failed"
    assert step.attempts == 1  # no retry
    assert OPEN_ERROR.fullmatch(step.error)
    assert OPEN_ERROR.search(r.error)
    failed = RunEvent.objects.get(run=r, type="step.failed")
    assert OPEN_ERROR.fullmatch(failed.data["error"])


@pytest.mark.worker
def test_an_optional_step_is_skipped_with_the_skills_fallback_and_the_run_goes_on(worker, user):
    trip(user)

    r = run(user, {"chain": [fragile(optional=True, id="f"), {"skill": "echo", "id": "next"}]}, "in")

    assert r.status == "succeeded"
    assert r.output == FALLBACK
    assert calls(r) == 0
    skipped = r.steps.get(key="f")
    assert (skipped.status, skipped.output) == ("skipped", FALLBACK)
    assert OPEN_ERROR.fullmatch(skipped.error)
    assert OPEN_ERROR.fullmatch(RunEvent.objects.get(run=r, type="step.skipped").data["error"])
    assert r.steps.get(key="next").output == FALLBACK


@pytest.mark.worker
def test_after_the_cool_down_a_failed_trial_opens_it_again_and_a_successful_one_closes_it(worker, user):
    trip(user)
    first_opened = breaker()["opened_at"]
    time.sleep(COOL_DOWN + 1)

    failed_trial = run(user, fragile(fail=True))
    assert (failed_trial.status, calls(failed_trial)) == ("failed", 1)
    assert failed_trial.steps.get().error == "fragile: failing on purpose"
    assert breaker()["state"] == "open"
    assert breaker()["opened_at"] > first_opened
    assert run(user, fragile()).status == "failed"  # fast again: not called

    time.sleep(COOL_DOWN + 1)
    trial = run(user, fragile(), "in")

    assert (trial.status, trial.output, calls(trial)) == ("succeeded", "in", 1)
    assert breaker() == {"state": "closed", "failures": 0, "fail_max": 3, "reset_timeout": COOL_DOWN, "opened_at": None}


@pytest.mark.worker
def test_the_skill_list_and_the_metrics_show_the_open_circuit(worker, user, api):
    trip(user)

    skills = {skill["name"]: skill for skill in api.get("/api/skills/").json()}
    samples = scrape(Client())

    assert skills["fragile"]["breaker"] == breaker()
    assert skills["fragile"]["breaker"]["state"] == "open"
    assert skills["fragile"]["fallback"] == FALLBACK
    assert skills["echo"]["breaker"] is None
    assert samples[("agentsite_breaker_open", frozenset({("skill", "fragile")}))] == 1
    assert samples[("agentsite_breaker_failures", frozenset({("skill", "fragile")}))] == 3


@pytest.fixture
def redis_down(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's breakers point at a Redis that does not answer (made again, on first use)."""
    settings.REDIS_URL = DEAD_REDIS
    monkeypatch.setattr(breakers._Process, "client", None)
    monkeypatch.setattr(breakers._Process, "breakers", {})
    monkeypatch.setattr(breakers._Process, "storages", {})


def context() -> SkillContext:
    return SkillContext(run_id=0, step_id=0, step_key="k", conversation_id=None, state={}, args={}, attempt=1)


@pytest.mark.django_db
def test_while_redis_is_down_the_breaker_fails_open_and_calls_the_skill(redis_down, caplog):
    assert FRAGILE is not None

    assert breakers.call(FRAGILE, context(), "in") == "in"
    assert Effect.objects.count() == 1
    assert "Redis unavailable" in caplog.text
    assert breakers.states([FRAGILE])["fragile"]["state"] == "unknown"


def test_a_skill_without_a_breaker_makes_no_redis_call(redis_down, caplog):
    echo = registry.get("echo")
    assert echo is not None
    assert echo.breaker is None

    assert breakers.call(echo, context(), "in") == "in"
    assert breakers._Process.client is None
    assert not caplog.records


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"breaker": Breaker(fail_max=0)}, "fail_max >= 1"),
        ({"breaker": Breaker(reset_timeout=0)}, "reset_timeout > 0"),
        ({"fallback": {"at": object()}}, "fallback must be a JSON value"),
    ],
)
def test_it_refuses_a_bad_breaker_or_fallback(options, problem):
    assert FRAGILE is not None
    fields = {**FRAGILE.__dict__, "name": "bad", **options}

    with pytest.raises(ImproperlyConfigured, match=problem):
        Skill(**fields).check()
