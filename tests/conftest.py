"""Fixtures: API clients, and a real Celery worker in its own process.

The worker is a prefork ``celery worker`` subprocess (soft and hard time
limits need prefork), started once per session against the test database and
the project's own Redis database (REDIS_URL, set in pyproject.toml). Tests
that use it run with a transactional database, so the worker sees committed
rows. Both count metrics into files of a directory of the session's own,
which /metrics reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient

from agentsite.celery import app
from agentsite.metrics import start_process
from orchestration.chaos.processes import database_url
from orchestration.models import ACTIVE_RUN_STATUSES, Run
from orchestration.services import cancel_run

from .factories import UserFactory, token_for
from .llm_server import FakeLLM, serving
from .otlp import OtlpReceiver
from .sentry_receiver import SentryReceiver

WORKER_CONCURRENCY = 4
# One log per database, overwritten by each session that uses it.
DB_NAME = Path(str(connection.settings_dict["NAME"])).stem
WORKER_LOG = Path(settings.BASE_DIR) / "var" / f"test-worker-{connection.vendor}-{DB_NAME}.log"


@dataclass(frozen=True)
class Worker:
    name: str
    concurrency: int
    process: subprocess.Popen[bytes]


def _wait_until_ready(worker: Worker, log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            raise RuntimeError(f"the test worker exited; see {log_path}")
        if app.control.ping(destination=[worker.name], timeout=0.5):
            return
    raise RuntimeError(f"the test worker did not answer within {timeout}s; see {log_path}")


@pytest.fixture(scope="session", autouse=True)
def metrics_files() -> None:
    """This process and the test worker count into a fresh directory, apart from the service's."""
    directory = WORKER_LOG.with_name(f"test-prometheus-{connection.vendor}-{DB_NAME}")
    shutil.rmtree(directory, ignore_errors=True)
    settings.PROMETHEUS_MULTIPROC_DIR = str(directory)
    start_process("pytest")  # it sets PROMETHEUS_MULTIPROC_DIR for the worker too


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """Where the test worker exports its spans (tests/otlp.py)."""
    receiver = OtlpReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def sentry_receiver() -> Iterator[SentryReceiver]:
    """Where a worker reports errors, as to Sentry (tests/sentry_receiver.py)."""
    receiver = SentryReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def celery_worker_process(
    django_db_setup: None, django_db_blocker: Any, metrics_files: None, otlp_receiver: OtlpReceiver
) -> Iterator[Worker]:
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    # Tracing on, exported to the receiver in this process every 0.1 s; JSON logs
    # (tests/test_tracing.py reads both). The test process itself traces nothing
    # unless a test instruments it.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with running_worker(f"test-{os.getpid()}@localhost", WORKER_CONCURRENCY, env, WORKER_LOG) as worker:
        yield worker


@contextmanager
def running_worker(name: str, concurrency: int, env: dict[str, str], log_path: Path) -> Iterator[Worker]:
    """A prefork worker subprocess on this session's broker and database, with ``env`` on top of ours."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")} | env
    env |= {"DATABASE_URL": database_url(connection.settings_dict), "PYTHONUNBUFFERED": "1", "LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "celery", "-A", "agentsite", "worker", "--pool=prefork"]
    command += [f"--concurrency={concurrency}", "--loglevel=INFO", "-n", name]
    command += ["--without-gossip", "--without-mingle"]
    log_path.parent.mkdir(exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=settings.BASE_DIR)
    worker = Worker(name=name, concurrency=concurrency, process=process)
    try:
        _wait_until_ready(worker, log_path)
        yield worker
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def worker_instead(session_worker: Worker, label: str, env: dict[str, str]) -> Iterator[Worker]:
    """A one-process worker with ``env`` on top of ours takes the default queue from the session's for the block.

    For a test that needs a worker configured otherwise (Sentry on, an LLM configured).
    """
    app.control.cancel_consumer("default", destination=[session_worker.name], reply=True)
    log_path = WORKER_LOG.with_name(f"{WORKER_LOG.stem}-{label}.log")
    try:
        with running_worker(f"{label}-{os.getpid()}@localhost", 1, env, log_path) as replacement:
            yield replacement
    finally:
        app.control.add_consumer("default", destination=[session_worker.name], reply=True)


@pytest.fixture
def worker(celery_worker_process: Worker, transactional_db: None) -> Iterator[Worker]:
    """A real worker, and a database whose committed rows it can see."""
    yield celery_worker_process
    _settle(celery_worker_process)


def _settle(worker: Worker, timeout: float = 30) -> None:
    """Let the runs a test left behind end, and the worker go idle.

    The database is flushed after each test; a worker still writing steps
    then would deadlock with it on PostgreSQL.
    """
    deadline = time.monotonic() + timeout
    active = Run.objects.filter(status__in=ACTIVE_RUN_STATUSES)
    while active.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for run in active:
        cancel_run(run, by="test teardown")
    inspect = app.control.inspect(destination=[worker.name], limit=1, timeout=2)
    while any((inspect.active() or {}).values()) and time.monotonic() < deadline + 10:
        time.sleep(0.05)


def wait_until(condition: Any, timeout: float = 15) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; fail the test otherwise."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s; see {WORKER_LOG}")
        time.sleep(0.05)
    return value


def wait_for_run(run: Run, timeout: float = 30) -> Run:
    """Poll the database until the run is terminal; fail the test otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.is_terminal:
            return run
        time.sleep(0.05)
    pytest.fail(f"run {run.pk} still {run.status} after {timeout}s; see {WORKER_LOG}")


@pytest.fixture(autouse=True)
def fast_password_hasher(settings: Any) -> None:
    """The default hasher costs ~0.3 s per user; tests don't need its strength."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def user() -> Any:
    return UserFactory()


@pytest.fixture
def other_user() -> Any:
    return UserFactory()


@pytest.fixture
def staff_user() -> Any:
    return UserFactory(is_staff=True)


@pytest.fixture
def api(user: Any) -> APIClient:
    """An API client authenticated with ``user``'s token."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return client


@pytest.fixture
def staff_api(staff_user: Any) -> APIClient:
    """An API client authenticated with ``staff_user``'s token."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(staff_user)}")
    return client


@pytest.fixture
def anon() -> APIClient:
    return APIClient()


@pytest.fixture
def fake_llm(settings: Any) -> Iterator[FakeLLM]:
    """A local OpenAI-compatible chat-completions server, and settings that point this process's LLM client at it."""
    with serving() as server:
        settings.LLM_BASE_URL = server.base_url
        settings.LLM_MODEL = "fake-model"
        settings.LLM_API_KEY = "sk-test"
        settings.LLM_TIMEOUT = 5
        yield server
