"""The skill result cache: a skill declared with ``cache_ttl`` is not called again for the same input and args.

A lookup tries this process's memory (L1), then Redis (L2); only an output the skill returned is stored.
A Redis that does not answer makes a miss. See docs/skills.md, "The result cache".
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import redis
from cachetools import TLRUCache
from django.conf import settings
from prometheus_client import Counter

from .registry import Skill, SkillContext, Wait

log = logging.getLogger(__name__)

KEY_VERSION = "v1"
KEY_PREFIX = f"agentsite:skill-cache:{KEY_VERSION}:"

LOOKUPS = Counter(
    "agentsite_skill_cache_lookups",
    "Result cache lookups of skills with a cache_ttl, by skill and result: l1 or l2 (a hit), miss.",
    ["skill", "result"],
)


def key(skill: str, input: Any, args: dict[str, Any]) -> str:
    """The cache key of a call of ``skill`` with this input and args, stable across processes."""
    canonical = json.dumps({"args": args, "input": input}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{KEY_PREFIX}{skill}:{hashlib.sha256(canonical.encode()).hexdigest()}"


class MemoryCache:
    """L1: at most ``maxsize`` entries, each until its own TTL; the least recently used go first when full."""

    def __init__(self, maxsize: int, timer: Any = time.monotonic) -> None:
        # An entry is (expires_at, output): TLRUCache asks ttu for its expiry.
        self._entries: TLRUCache = TLRUCache(maxsize, ttu=lambda key, entry, now: entry[0], timer=timer)
        self._timer = timer
        self._lock = threading.Lock()  # cachetools is not thread-safe (a threads pool, the publisher)

    def get(self, key: str) -> tuple[bool, Any]:
        """(True, output) if the key is held and not expired, else (False, None)."""
        with self._lock:
            entry = self._entries.get(key)
        return (False, None) if entry is None else (True, entry[1])

    def put(self, key: str, output: Any, ttl: float) -> None:
        with self._lock:
            self._entries[key] = (self._timer() + ttl, output)

    def __len__(self) -> int:
        with self._lock:
            self._entries.expire()
            return len(self._entries)


_memory = MemoryCache(settings.SKILL_CACHE_L1_SIZE)

Caller = Callable[[Skill, SkillContext, Any], Any]


def _direct(skill: Skill, ctx: SkillContext, input: Any) -> Any:
    return skill.func(ctx, input)


def call(skill: Skill, ctx: SkillContext, input: Any, call: Caller = _direct) -> tuple[Any, bool]:
    """The skill's output for this input, and whether it came from the cache.

    On a miss (or without ``cache_ttl``) ``call`` calls the skill; an exception it raises passes through, unstored.
    """
    if skill.cache_ttl is None:
        return call(skill, ctx, input), False
    cache_key = key(skill.name, input, ctx.args)
    found, output = lookup(skill.name, cache_key)
    if found:
        return output, True
    output = call(skill, ctx, input)
    if not isinstance(output, Wait):  # a request to wait is not an output
        remember(cache_key, output, skill.cache_ttl)
    return output, False


def lookup(skill: str, cache_key: str) -> tuple[bool, Any]:
    """(True, output) from L1, else from L2 (which then fills L1 for what is left of its TTL), else (False, None)."""
    found, output = _memory.get(cache_key)
    if found:
        LOOKUPS.labels(skill, "l1").inc()
        return True, output
    try:
        pipeline = _redis().pipeline(transaction=False)
        pipeline.get(cache_key)
        pipeline.pttl(cache_key)
        value, ttl_ms = pipeline.execute()
    except redis.RedisError as exc:
        log.warning("skill cache: %s not looked up in Redis (%r); calling the skill", cache_key, exc)
        value = None
    if value is None:
        LOOKUPS.labels(skill, "miss").inc()
        return False, None
    output = json.loads(value)
    if ttl_ms > 0:
        _memory.put(cache_key, output, ttl_ms / 1000)
    LOOKUPS.labels(skill, "l2").inc()
    return True, output


def remember(cache_key: str, output: Any, ttl: float) -> None:
    """Store a skill's successful output in L1 and L2 for ``ttl`` seconds (in L1 only while Redis is down)."""
    _memory.put(cache_key, output, ttl)
    try:
        _redis().set(cache_key, json.dumps(output, separators=(",", ":")), px=max(1, round(ttl * 1000)))
    except redis.RedisError as exc:
        log.warning("skill cache: %s not stored in Redis (%r)", cache_key, exc)


@cache
def _redis() -> redis.Redis:
    # One client per process; redis-py's pool reconnects after a fork. Short
    # timeouts: a Redis that does not answer costs a step a second at most.
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)
