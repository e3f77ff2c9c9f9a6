"""Circuit breakers: a skill that keeps failing is not called for a while.

A skill declared with ``breaker=Breaker(fail_max, reset_timeout)`` has a pybreaker breaker per process
whose state is in Redis, shared by every worker; ``call`` raises ``CircuitOpen`` while it is open, and
calls the skill (fails open) while Redis does not answer. See docs/skills.md, "Circuit breakers".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pybreaker
import redis
from django.conf import settings
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .registry import Skill, SkillContext

log = logging.getLogger(__name__)

# Socket connect and read timeouts of the breakers' Redis calls: a Redis that
# does not answer delays a step by about this much per call, then fails open.
REDIS_TIMEOUT = 0.5
# The state names of the API and the metrics (pybreaker's, with an underscore).
STATES = {pybreaker.STATE_CLOSED: "closed", pybreaker.STATE_OPEN: "open", pybreaker.STATE_HALF_OPEN: "half_open"}
FIELDS = ("state", "fail_counter", "opened_at")
FIELDS_UNREAD = (None, None, None)


class CircuitOpen(Exception):
    """The skill was not called: its circuit is open."""


def namespace(skill: str) -> str:
    return f"agentsite:breaker:{skill}"


def call(skill: Skill, ctx: SkillContext, input: Any) -> Any:
    """Call the skill through its breaker, if it has one; raises ``CircuitOpen`` without calling it while open."""
    if skill.breaker is None:
        return skill.func(ctx, input)
    breaker = _breaker(skill)
    if breaker is None:  # Redis does not answer: fail open
        return skill.func(ctx, input)
    try:
        return breaker.call(skill.func, ctx, input)
    except pybreaker.CircuitBreakerError:
        raise CircuitOpen(_open_message(skill, breaker)) from None


def _open_message(skill: Skill, breaker: pybreaker.CircuitBreaker) -> str:
    assert skill.breaker is not None
    opened_at = _Process.storages[skill.name].opened_at
    elapsed = (datetime.now(UTC) - opened_at).total_seconds() if opened_at else 0.0
    retry_after = max(0, math.ceil(skill.breaker.reset_timeout - elapsed))
    return f'circuit open for skill "{skill.name}" ({breaker.fail_counter} failures; retry after {retry_after}s)'


class _Process:
    """This process's Redis client and breakers (one per skill), made on first use."""

    client: redis.Redis | None = None
    breakers: dict[str, pybreaker.CircuitBreaker] = {}
    storages: dict[str, pybreaker.CircuitRedisStorage] = {}


def _client() -> redis.Redis:
    if _Process.client is None:
        _Process.client = redis.Redis.from_url(
            settings.REDIS_URL, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
        )
    return _Process.client


def _breaker(skill: Skill) -> pybreaker.CircuitBreaker | None:
    """This process's breaker of the skill; None (and a warning) if Redis does not answer now."""
    breaker = _Process.breakers.get(skill.name)
    if breaker is not None:
        return breaker
    assert skill.breaker is not None
    try:
        # The storage initialises its keys (SETNX) when made: the one Redis error pybreaker does not catch.
        storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, _client(), namespace=namespace(skill.name))
    except redis.RedisError as exc:
        log.warning("circuit breaker of skill %s: Redis unavailable (%s); calling the skill", skill.name, exc)
        return None
    breaker = pybreaker.CircuitBreaker(
        fail_max=skill.breaker.fail_max,
        reset_timeout=skill.breaker.reset_timeout,
        state_storage=storage,
        listeners=[_LogStateChange()],
        name=skill.name,
        # The attempt that trips the circuit fails with its own error, not pybreaker's.
        throw_new_error_on_trip=False,
    )
    _Process.breakers[skill.name], _Process.storages[skill.name] = breaker, storage
    return breaker


class _LogStateChange(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        if old_state is not None:
            log.warning("circuit of skill %s: %s -> %s", cb.name, old_state.name, new_state.name)


class _RedisErrorsAsWarnings(logging.Filter):
    """pybreaker logs each Redis error it survives with a traceback at ERROR; here they are warnings without one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info:
            exc = record.exc_info[1]
            record.msg, record.args = "circuit breaker: Redis unavailable (%s); failing open", (exc,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


logging.getLogger(pybreaker.__name__).addFilter(_RedisErrorsAsWarnings())


def states(skills: Iterable[Skill]) -> dict[str, dict[str, Any]]:
    """The breakers of these skills as Redis has them now, by skill name (skills without a breaker are left out).

    Each is ``{"state", "failures", "fail_max", "reset_timeout", "opened_at"}``; state "unknown" while Redis is down.
    """
    guarded = [skill for skill in skills if skill.breaker is not None]
    if not guarded:
        return {}
    try:
        replies = _read(skill.name for skill in guarded)
    except (redis.RedisError, OSError) as exc:
        log.warning("circuit breakers: Redis unavailable (%s)", type(exc).__name__)
        return {skill.name: _state(skill, None) for skill in guarded}
    width = len(FIELDS)
    return {skill.name: _state(skill, replies[i * width : (i + 1) * width]) for i, skill in enumerate(guarded)}


def _read(names: Iterable[str]) -> list[Any]:
    base = pybreaker.CircuitRedisStorage.BASE_NAMESPACE
    with _client().pipeline(transaction=False) as pipe:
        for name in names:
            for field in FIELDS:
                pipe.get(f"{namespace(name)}:{base}:{field}")
        return list(pipe.execute())


def _state(skill: Skill, reply: list[Any] | None) -> dict[str, Any]:
    """One breaker's state from its keys' values (``reply``; None: Redis did not answer)."""
    assert skill.breaker is not None
    raw_state, failures, opened_at = (value.decode() if value is not None else None for value in reply or FIELDS_UNREAD)
    state = "unknown" if reply is None else STATES.get(raw_state or pybreaker.STATE_CLOSED, "unknown")
    return {
        "state": state,
        "failures": int(failures or 0),
        "fail_max": skill.breaker.fail_max,
        "reset_timeout": float(skill.breaker.reset_timeout),
        "opened_at": (
            datetime.fromtimestamp(int(opened_at), UTC).isoformat()
            if opened_at and state in ("open", "half_open")
            else None
        ),
    }


class BreakerCollector(Collector):
    """``agentsite_breaker_open`` and ``_failures`` per skill with a breaker, read from Redis at scrape time."""

    def __init__(self, skills: Iterable[Skill]) -> None:
        self.skills = list(skills)

    def collect(self) -> Iterable[Metric]:
        found = states(self.skills)
        if not found:
            return
        opened = GaugeMetricFamily(
            "agentsite_breaker_open",
            "1 while the skill's circuit is open or half-open (its steps are not called, or only as a trial), else 0.",
            labels=["skill"],
        )
        failures = GaugeMetricFamily(
            "agentsite_breaker_failures",
            "Consecutive failed attempts counted by the skill's breaker.",
            labels=["skill"],
        )
        for name, state in found.items():
            if state["state"] == "unknown":
                continue
            opened.add_metric([name], int(state["state"] != "closed"))
            failures.add_metric([name], state["failures"])
        yield opened
        yield failures
