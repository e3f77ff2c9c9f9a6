"""Liveness and readiness probes, for load balancers and orchestrators (docs/operations.md, "Health checks").

``/healthz`` (liveness) answers while the process serves requests and checks nothing else; ``/readyz``
(readiness) checks the database, the broker and at least one worker, 503 naming what fails. Both are open
(no authentication) and say nothing secret: no URLs, no credentials, no stack traces.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache

from agentsite.celery import app

logger = logging.getLogger(__name__)

# Socket connect and read timeouts, and how long the worker ping waits for replies.
CHECK_TIMEOUT = 1.0
# The probe answers by then, even if a check still hangs (its thread ends on its own).
DEADLINE = 2.5
# A broadcast ping always waits its whole window, so its result is reused this long.
WORKERS_TTL = 5.0

Check = dict[str, Any]

# Userinfo in URLs and password=... in connection strings.
_SECRETS = re.compile(r"(?<=://)[^@/\s]+(?=@)|(?<=password=)\S+", re.IGNORECASE)
_workers_cache: dict[str, tuple[float, Check]] = {}


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process is up and answers."""
    return JsonResponse({"status": "ok"})


@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: 200 when the database, the broker and a worker answer, else 503 naming what fails."""
    broker_url = settings.CELERY_BROKER_URL  # read per request: tests and reconfiguration change it
    checks = run_checks(
        {
            "database": check_database,
            "broker": partial(check_broker, broker_url),
            "workers": partial(check_workers, broker_url),
        }
    )
    for check in checks.values():
        if not check["ok"]:
            logger.warning("readyz: %s", check["error"])
    ready = all(check["ok"] for check in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    return JsonResponse(body, status=200 if ready else 503)


def run_checks(checks: dict[str, Callable[[], Check]]) -> dict[str, Check]:
    """Run the checks in parallel, each in a daemon thread; a check still running at DEADLINE fails as timed out.

    The result of each check gets its ``ms``; a check that raises fails with ``error`` naming it.
    """
    results: dict[str, Check] = {}
    threads = [
        threading.Thread(target=_record, args=(results, name, check), name=f"readyz-{name}", daemon=True)
        for name, check in checks.items()
    ]
    deadline = time.monotonic() + DEADLINE
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {name: results.get(name) or _too_late(name) for name in checks}


def _record(results: dict[str, Check], name: str, check: Callable[[], Check]) -> None:
    start = time.perf_counter()
    try:
        result = check()
    except Exception as exc:  # noqa: BLE001 - a probe reports every failure, it never raises
        result = {"ok": False, "error": f"{name} unavailable: {describe(exc)}"}
    results[name] = {**result, "ms": round((time.perf_counter() - start) * 1000, 1)}


def _too_late(name: str) -> Check:
    return {"ok": False, "error": f"{name} unavailable: no answer within {DEADLINE:g}s", "ms": DEADLINE * 1000}


def check_database() -> Check:
    """A trivial query on this thread's own connection of the default database, closed afterwards."""
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()
    return {"ok": True}


def check_broker(broker_url: str) -> Check:
    client = redis.Redis.from_url(broker_url, socket_connect_timeout=CHECK_TIMEOUT, socket_timeout=CHECK_TIMEOUT)
    try:
        client.ping()
    finally:
        client.close()
    return {"ok": True}


def check_workers(broker_url: str) -> Check:
    """How many workers answer a broadcast ping; a result is reused for WORKERS_TTL seconds."""
    expires, cached = _workers_cache.get(broker_url, (0.0, {}))
    if time.monotonic() < expires:
        return {**cached, "cached": True}
    result = ping_workers(broker_url)
    _workers_cache[broker_url] = (time.monotonic() + WORKERS_TTL, result)
    return result


def ping_workers(broker_url: str) -> Check:
    # Without socket timeouts a broker that accepts and never answers hangs the ping for good.
    timeouts = {"socket_connect_timeout": CHECK_TIMEOUT, "socket_timeout": CHECK_TIMEOUT}
    with app.connection_for_write(broker_url, connect_timeout=CHECK_TIMEOUT, transport_options=timeouts) as conn:
        replies = app.control.ping(timeout=CHECK_TIMEOUT, connection=conn) or []
    count = sum(answer == {"ok": "pong"} for reply in replies for answer in reply.values())
    if not count:
        error = f"workers unavailable: no worker answered within {CHECK_TIMEOUT:g}s"
        return {"ok": False, "count": 0, "cached": False, "error": error}
    return {"ok": True, "count": count, "cached": False}


def describe(exc: BaseException) -> str:
    """One line about a failure, without credentials."""
    if isinstance(exc, TimeoutError | redis.TimeoutError):
        return f"timed out after {CHECK_TIMEOUT:g}s"
    lines = str(exc).strip().splitlines()
    return _SECRETS.sub("***", lines[0] if lines else type(exc).__name__)[:200]
