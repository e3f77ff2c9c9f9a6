"""/healthz (liveness) and /readyz (readiness), against the real database, Redis and worker.

Failures are provoked for real: a broker URL on a closed port or on a socket
that never answers, a Redis database no worker listens on, and the default
database's settings pointing where no database is.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from django.db import connections

from agentsite import health


@pytest.fixture(autouse=True)
def fresh_worker_ping() -> None:
    """Each test pings the workers itself instead of reusing another test's result."""
    health._workers_cache.clear()


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A local port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def redis_url_on_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


def redis_db_without_workers(url: str) -> int:
    """A database of the test Redis on which no Celery worker listens for broadcasts.

    Pub/sub ignores database numbers, so kombu prefixes its broadcast channels
    with the database (``/11.celery.pidbox``): a database with no such channel
    is one a broadcast ping reaches no worker through.
    """
    client = redis.Redis.from_url(url)
    in_use = int(client.connection_pool.connection_kwargs.get("db", 0))
    for db in range(15, -1, -1):
        if db != in_use and not client.pubsub_channels(f"/{db}.*"):
            return db
    pytest.skip("a Celery worker listens on every database of the test Redis")


@contextmanager
def default_database_at(**where: str) -> Iterator[None]:
    """Point the default database's settings elsewhere; connections opened meanwhile go there."""
    db = connections["default"].settings_dict
    saved = {key: db[key] for key in where}
    db.update(where)
    try:
        yield
    finally:
        db.update(saved)


def get_readyz(client: Any) -> tuple[Any, dict[str, Any], float]:
    start = time.monotonic()
    response = client.get("/readyz")
    return response, response.json(), time.monotonic() - start


def test_healthz_answers_ok_without_authentication(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.worker
def test_readyz_answers_ok_when_database_broker_and_a_worker_answer(client, worker):
    response, body, _ = get_readyz(client)

    assert response.status_code == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "broker", "workers"}
    assert all(check["ok"] is True and check["ms"] >= 0 for check in body["checks"].values())
    assert body["checks"]["workers"]["count"] >= 1
    assert response["Cache-Control"].startswith("max-age=0")


@pytest.mark.worker
def test_readyz_reuses_the_worker_ping_for_a_few_seconds(client, worker):
    _, first, _ = get_readyz(client)
    _, second, elapsed = get_readyz(client)

    assert first["checks"]["workers"]["cached"] is False
    assert second["checks"]["workers"] == {**first["checks"]["workers"], "cached": True, "ms": pytest.approx(0, abs=5)}
    assert elapsed < health.CHECK_TIMEOUT  # the database and the broker are still checked, quickly


def test_readyz_answers_503_naming_the_broker_when_it_refuses_connections(
    client, settings, transactional_db, closed_port
):
    settings.CELERY_BROKER_URL = f"redis://agent:s3cret@127.0.0.1:{closed_port}/0"

    response, body, elapsed = get_readyz(client)

    assert response.status_code == 503
    assert body["status"] == "unavailable"
    assert body["checks"]["database"]["ok"] is True
    broker = body["checks"]["broker"]
    assert broker["ok"] is False
    assert broker["error"].startswith("broker unavailable: ")
    assert "refused" in broker["error"]
    assert body["checks"]["workers"]["ok"] is False
    assert "s3cret" not in response.content.decode()
    assert "Traceback" not in response.content.decode()
    assert elapsed < 3


def test_readyz_answers_503_within_seconds_when_the_broker_hangs(client, settings, transactional_db, silent_port):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{silent_port}/0"

    response, body, elapsed = get_readyz(client)

    assert response.status_code == 503
    assert body["checks"]["broker"] == {
        "ok": False,
        "error": f"broker unavailable: timed out after {health.CHECK_TIMEOUT:g}s",
        "ms": pytest.approx(health.CHECK_TIMEOUT * 1000, rel=0.5),
    }
    assert body["checks"]["workers"]["ok"] is False
    assert elapsed < 3


@pytest.mark.worker
def test_readyz_answers_503_naming_the_workers_when_none_answers(client, settings, worker):
    settings.CELERY_BROKER_URL = redis_url_on_db(
        settings.CELERY_BROKER_URL, redis_db_without_workers(settings.CELERY_BROKER_URL)
    )

    response, body, elapsed = get_readyz(client)

    assert response.status_code == 503
    assert body["status"] == "unavailable"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"]["ok"] is True
    assert body["checks"]["workers"] == {
        "ok": False,
        "count": 0,
        "cached": False,
        "error": f"workers unavailable: no worker answered within {health.CHECK_TIMEOUT:g}s",
        "ms": pytest.approx(health.CHECK_TIMEOUT * 1000, rel=0.5),
    }
    assert elapsed < 3


def test_readyz_answers_503_naming_the_database_when_it_is_unreachable(client, transactional_db, tmp_path, closed_port):
    # The default alias itself points where no database is: a directory that
    # does not exist (SQLite) or a closed port (PostgreSQL).
    if connections["default"].vendor == "sqlite":
        nowhere = {"NAME": str(tmp_path / "missing" / "db.sqlite3")}
    else:
        nowhere = {"HOST": "127.0.0.1", "PORT": str(closed_port)}
    with default_database_at(**nowhere):
        response, body, elapsed = get_readyz(client)

    assert response.status_code == 503
    database = body["checks"]["database"]
    assert database["ok"] is False
    assert database["error"].startswith("database unavailable: ")
    assert body["checks"]["broker"]["ok"] is True
    assert elapsed < 3
    # The database is back: the failed connection poisoned nothing.
    assert get_readyz(client)[1]["checks"]["database"]["ok"] is True


def test_readyz_answers_503_within_seconds_when_the_database_hangs(client, transactional_db, silent_port):
    if connections["default"].vendor == "sqlite":
        pytest.skip("SQLite has no server that could accept a connection and never answer")
    with default_database_at(HOST="127.0.0.1", PORT=str(silent_port)):
        response, body, elapsed = get_readyz(client)

    assert response.status_code == 503
    assert body["checks"]["database"] == {
        "ok": False,
        "error": f"database unavailable: no answer within {health.DEADLINE:g}s",
        "ms": health.DEADLINE * 1000,
    }
    assert elapsed < 3
