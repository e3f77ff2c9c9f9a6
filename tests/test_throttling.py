"""Throttling: per-user, anonymous and run-creation rates, counted in Redis and shared by every process.

The suite runs with rates too high to matter (pyproject.toml); these tests set
low ones. DRF reads the rates into ``SimpleRateThrottle.THROTTLE_RATES`` once,
at import, so that is what they patch; each throttle reads it when a request
makes it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from rest_framework.throttling import SimpleRateThrottle

from orchestration.chaos.processes import database_url
from orchestration.models import Run

from .factories import ConversationFactory, token_for

pytestmark = pytest.mark.django_db

ECHO = {"skill": "echo"}
RATES = {"anon": "2/min", "user": "5/min", "run_create": "2/min"}


def clear_throttle_counts() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(cache.make_key("throttle_*")))
    if keys:
        client.delete(*keys)


@pytest.fixture(autouse=True)
def low_rates(monkeypatch):
    """Low rates, and no counts left from earlier tests (user ids repeat across them)."""
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", RATES)
    clear_throttle_counts()
    yield
    clear_throttle_counts()


@pytest.fixture
def conversation(user):
    return ConversationFactory.create(owner=user)


def statuses(client, url: str, times: int) -> list[int]:
    return [client.get(url).status_code for _ in range(times)]


def start_run(client, conversation) -> int:
    return client.post(f"/api/conversations/{conversation.pk}/runs/", {"spec": ECHO}, format="json").status_code


def post_message(client, conversation) -> int:
    body = {"content": "hi", "spec": ECHO}
    return client.post(f"/api/conversations/{conversation.pk}/messages/", body, format="json").status_code


def manage_shell(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a process of its own, configured from this environment plus ``env``."""
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
        env={**os.environ, **env},
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_user_over_the_rate_gets_429_with_retry_after_and_a_json_detail(api):
    assert statuses(api, "/api/conversations/", 5) == [200] * 5

    response = api.get("/api/conversations/")

    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= 60
    assert response.json()["detail"].startswith("Request was throttled. Expected available in")


def test_each_user_has_a_count_of_their_own(api, staff_api):
    assert statuses(api, "/api/runs/", 6)[-1] == 429

    assert staff_api.get("/api/runs/").status_code == 200


def test_anonymous_clients_are_throttled_by_address_whatever_x_forwarded_for_says(anon):
    assert statuses(anon, "/api/docs/", 2) == [200, 200]

    assert anon.get("/api/docs/").status_code == 429
    assert anon.get("/api/docs/", HTTP_X_FORWARDED_FOR="203.0.113.7").status_code == 429
    assert anon.get("/api/docs/", REMOTE_ADDR="198.51.100.9").status_code == 200


def test_starting_runs_has_its_own_stricter_rate_shared_by_runs_and_messages(api, conversation):
    assert [start_run(api, conversation), post_message(api, conversation)] == [202, 202]

    assert start_run(api, conversation) == 429
    assert post_message(api, conversation) == 429
    assert Run.objects.count() == 2
    assert api.get(f"/api/conversations/{conversation.pk}/messages/").status_code == 200


def test_reads_do_not_use_up_the_run_creation_rate(api, conversation):
    assert statuses(api, f"/api/conversations/{conversation.pk}/messages/", 3) == [200] * 3

    assert start_run(api, conversation) == 202


def test_throttles_let_requests_through_while_redis_is_down(api, conversation, settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}
    }

    assert [start_run(api, conversation) for _ in range(3)] == [202] * 3


REQUESTS_IN_A_SECOND_PROCESS = """
from django.test import Client
client = Client(HTTP_AUTHORIZATION="Token {token}")
print(*[client.get("/api/conversations/").status_code for _ in range(3)])
"""


@pytest.mark.django_db(transaction=True)  # the second process must see the user and token
def test_the_counts_are_shared_across_processes_through_redis(api, user):
    assert statuses(api, "/api/conversations/", 3) == [200] * 3

    # A separate process, reading the rate from the environment as a web process does.
    script = REQUESTS_IN_A_SECOND_PROCESS.format(token=token_for(user))
    result = manage_shell(
        script,
        DATABASE_URL=database_url(connection.settings_dict),
        REDIS_URL=settings.REDIS_URL,
        THROTTLE_USER_RATE=RATES["user"],
        ALLOWED_HOSTS="testserver",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["200", "200", "429"]
    assert api.get("/api/conversations/").status_code == 429


def test_an_empty_rate_in_the_environment_turns_that_throttle_off(api, conversation, monkeypatch):
    script = "from django.conf import settings; print(settings.THROTTLE_RATES)"
    result = manage_shell(script, THROTTLE_RUN_CREATE_RATE="", THROTTLE_USER_RATE="7/hour")
    assert result.returncode == 0, result.stderr
    rates = result.stdout.strip()
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {**RATES, "run_create": None})

    assert "'run_create': None" in rates
    assert "'user': '7/hour'" in rates
    assert [start_run(api, conversation) for _ in range(3)] == [202] * 3
