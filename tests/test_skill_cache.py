"""The skill result cache (skills/cache.py): its key, its in-process layer, and cache hits through a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from orchestration.models import Run, RunEvent, Step
from orchestration.services import start_run
from skills import cache
from skills.models import Effect
from skills.registry import SkillContext, registry

from .conftest import wait_for_run
from .test_metrics import grew, scrape, scrape_once_counted

_counted = registry.get("counted_echo")
assert _counted is not None
assert _counted.cache_ttl is not None
COUNTED = _counted
TTL = _counted.cache_ttl


def counted(**args: Any) -> dict[str, Any]:
    return {"skill": "counted_echo", "id": "c", "args": args}


def run(user: Any, spec: Any, input: Any) -> Run:
    return wait_for_run(start_run(owner=user, spec=spec, input=input))


def step_of(run: Run) -> Step:
    return run.steps.get(key="c")


def calls(*runs: Run) -> int:
    """How many times counted_echo really ran in these runs."""
    return Effect.objects.filter(run_id__in=[r.pk for r in runs]).count()


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def unique_input() -> dict[str, str]:
    # Redis outlives each test (and the worker's L1 the whole session): a fresh input is a fresh key.
    return {"q": uuid.uuid4().hex}


def context(args: dict[str, Any]) -> SkillContext:
    return SkillContext(run_id=1, step_id=1, step_key="c", conversation_id=None, state={}, args=args, attempt=1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- The key ----------------------------------------------------------------------


def test_the_key_ignores_the_order_of_keys_and_whitespace():
    one = cache.key("counted_echo", {"a": 1, "b": [1, 2]}, {"x": "y", "z": None})
    other = cache.key("counted_echo", {"b": [1, 2], "a": 1}, {"z": None, "x": "y"})

    assert one == other
    assert one.startswith("agentsite:skill-cache:v1:counted_echo:")
    assert len(one.rsplit(":", 1)[1]) == 64  # hex SHA-256


def test_the_key_differs_by_skill_input_and_args():
    keys = {
        cache.key("counted_echo", "in", {}),
        cache.key("echo", "in", {}),
        cache.key("counted_echo", "other", {}),
        cache.key("counted_echo", "in", {"value": 1}),
        cache.key("counted_echo", {"input": "in"}, {}),
    }

    assert len(keys) == 5


def test_the_key_is_the_same_in_another_process():
    code = "import django; django.setup(); from skills import cache; print(cache.key('s', {'é': [1, 2.5]}, {'b': 1}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert other.stdout.strip() == cache.key("s", {"é": [1, 2.5]}, {"b": 1})


# --- The in-process layer (L1) ----------------------------------------------------


def test_memory_forgets_an_entry_once_its_ttl_is_over():
    clock = Clock()
    memory = cache.MemoryCache(10, timer=clock)
    memory.put("k", {"out": 1}, ttl=5)

    clock.now += 4.9
    assert memory.get("k") == (True, {"out": 1})
    clock.now += 0.2
    assert memory.get("k") == (False, None)


def test_memory_keeps_each_entry_for_its_own_ttl():
    clock = Clock()
    memory = cache.MemoryCache(10, timer=clock)
    memory.put("short", 1, ttl=1)
    memory.put("long", 2, ttl=60)

    clock.now += 2
    assert memory.get("short") == (False, None)
    assert memory.get("long") == (True, 2)


def test_memory_is_bounded_and_drops_the_least_recently_used_first():
    memory = cache.MemoryCache(2, timer=Clock())
    memory.put("a", 1, ttl=60)
    memory.put("b", 2, ttl=60)
    memory.get("a")
    memory.put("c", 3, ttl=60)

    assert len(memory) == 2
    assert memory.get("b") == (False, None)
    assert memory.get("a") == (True, 1)
    assert memory.get("c") == (True, 3)


def test_memory_holds_a_cached_null_output():
    memory = cache.MemoryCache(2, timer=Clock())
    memory.put("k", None, ttl=60)

    assert memory.get("k") == (True, None)


# --- Declaration ------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1])
def test_a_skill_with_a_ttl_that_is_not_positive_is_refused(ttl):
    with pytest.raises(ImproperlyConfigured, match="cache_ttl must be a positive"):
        replace(COUNTED, cache_ttl=ttl).check()


# --- Lookup and store in this process (a real Redis) -------------------------------


@pytest.mark.django_db
def test_a_skill_without_cache_ttl_is_always_called():
    echo = registry.get("echo")
    assert echo is not None
    assert echo.cache_ttl is None
    args = {"value": uuid.uuid4().hex}

    assert cache.call(echo, context(args), None) == (args["value"], False)
    assert cache.call(echo, context(args), None) == (args["value"], False)
    assert not redis_client().exists(cache.key("echo", None, args))


def test_a_redis_hit_fills_memory_for_what_is_left_of_its_ttl(monkeypatch):
    key = cache.key("counted_echo", unique_input(), {})
    redis_client().set(key, json.dumps({"out": 1}), px=3000)
    clock = Clock()
    memory = cache.MemoryCache(10, timer=clock)
    monkeypatch.setattr(cache, "_memory", memory)

    assert cache.lookup("counted_echo", key) == (True, {"out": 1})
    redis_client().delete(key)
    clock.now += 2.5
    assert cache.lookup("counted_echo", key) == (True, {"out": 1})  # from memory now
    clock.now += 0.6
    assert memory.get(key) == (False, None)


@pytest.mark.django_db
def test_without_redis_a_step_calls_its_skill_and_does_not_fail(monkeypatch, settings, caplog):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    monkeypatch.setattr(cache, "_memory", cache.MemoryCache(10))
    cache._redis.cache_clear()
    args = {"value": uuid.uuid4().hex}
    try:
        first = cache.call(COUNTED, context(args), None)
        second = cache.call(COUNTED, context(args), None)
    finally:
        cache._redis.cache_clear()

    assert first == (args["value"], False)
    assert second == (args["value"], True)  # from this process's memory
    assert Effect.objects.count() == 1
    assert "not looked up in Redis" in caplog.text
    assert "not stored in Redis" in caplog.text


# --- Through a real worker ------------------------------------------------------------


@pytest.mark.worker
def test_the_same_input_and_args_again_is_a_cache_hit_without_calling_the_skill(worker, user, api):
    input = unique_input()
    first = run(user, counted(value={"answer": 42}), input)
    second = run(user, counted(value={"answer": 42}), input)

    assert (first.status, second.status) == ("succeeded", "succeeded")
    assert second.output == first.output == {"answer": 42}
    assert (step_of(first).cached, step_of(second).cached) == (False, True)
    assert calls(first, second) == 1
    hit = RunEvent.objects.get(run=second, type="step.succeeded")
    miss = RunEvent.objects.get(run=first, type="step.succeeded")
    assert (hit.data, miss.data) == ({"cached": True}, {})
    detail = api.get(f"/api/runs/{second.pk}/").json()
    assert [(s["key"], s["cached"]) for s in detail["steps"]] == [("c", True)]


@pytest.mark.worker
def test_a_cache_hit_passes_its_output_on_in_a_chain(worker, user):
    input = unique_input()
    spec = {"chain": [counted(), {"skill": "echo", "id": "next"}]}
    first = run(user, spec, input)
    second = run(user, spec, input)

    assert second.status == "succeeded"
    assert second.output == first.output == input
    assert step_of(second).cached
    assert calls(first, second) == 1


@pytest.mark.worker
def test_other_args_are_a_miss(worker, user):
    input = unique_input()
    first = run(user, counted(value=1), input)
    second = run(user, counted(value=2), input)

    assert (first.output, second.output) == (1, 2)
    assert (step_of(first).cached, step_of(second).cached) == (False, False)
    assert calls(first, second) == 2


@pytest.mark.worker
def test_a_failure_is_never_cached(worker, user):
    input = unique_input()
    first = run(user, counted(fail=True), input)
    second = run(user, counted(fail=True), input)

    assert (first.status, second.status) == ("failed", "failed")
    assert (step_of(first).cached, step_of(second).cached) == (False, False)
    assert calls(first, second) == 2
    assert not redis_client().exists(cache.key("counted_echo", input, {"fail": True}))


@pytest.mark.worker
def test_an_output_is_called_for_again_once_its_ttl_is_over(worker, user):
    input = unique_input()
    first = run(user, counted(), input)
    time.sleep(TTL + 0.5)
    second = run(user, counted(), input)

    assert second.status == "succeeded"
    assert step_of(second).cached is False
    assert calls(first, second) == 2


@pytest.mark.worker
def test_the_worker_stores_the_output_under_the_key_this_process_computes(worker, user):
    input = unique_input()
    run(user, counted(value=["x", {"b": 1, "a": 2}]), input)

    key = cache.key("counted_echo", input, {"value": ["x", {"a": 2, "b": 1}]})
    client = redis_client()
    assert json.loads(client.get(key) or b"null") == ["x", {"a": 2, "b": 1}]
    assert 0 < client.pttl(key) <= TTL * 1000


@pytest.mark.worker
def test_the_worker_counts_hits_and_misses_per_skill(worker, user, client):
    name = "agentsite_skill_cache_lookups_total"
    before = scrape(client)
    input = unique_input()
    run(user, counted(), input)
    run(user, counted(), input)

    after = scrape_once_counted(client, before, name, 1, skill="counted_echo", result="miss")
    hits = grew(before, after, name, skill="counted_echo", result="l1")
    hits += grew(before, after, name, skill="counted_echo", result="l2")
    assert grew(before, after, name, skill="counted_echo", result="miss") == 1
    assert hits == 1
