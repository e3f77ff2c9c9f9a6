"""GET /api/skills/: the registered skills with their queues, limits and retries."""

from __future__ import annotations

import pytest

from skills.registry import registry

pytestmark = pytest.mark.django_db

DIAGNOSTICS = ("echo", "sleep", "fail", "flaky")
FIELDS = {
    "name",
    "description",
    "queue",
    "soft_time_limit",
    "time_limit",
    "max_soft_time_limit",
    "max_time_limit",
    "retries",
    "backoff",
    "backoff_max",
    "optional",
    "cache_ttl",
    "fallback",
    "compensate",
    "breaker",
}


def skills_by_name(api) -> dict[str, dict]:
    response = api.get("/api/skills/")
    assert response.status_code == 200
    return {skill["name"]: skill for skill in response.json()}


def test_it_lists_the_diagnostics_skills(api):
    skills = skills_by_name(api)

    assert set(DIAGNOSTICS) <= set(skills)


@pytest.mark.parametrize("name", DIAGNOSTICS)
def test_it_describes_each_skill_with_its_queue_limits_and_retries(api, name):
    skill = skills_by_name(api)[name]
    declared = registry.get(name)
    assert declared is not None

    assert set(skill) == FIELDS
    assert skill["description"]
    assert skill["queue"] == declared.queue
    assert skill["soft_time_limit"] == declared.soft_time_limit
    assert skill["time_limit"] == declared.time_limit
    assert skill["max_soft_time_limit"] == declared.max_soft_time_limit
    assert skill["max_time_limit"] == declared.max_time_limit
    assert skill["retries"] == declared.retries
    assert skill["cache_ttl"] == declared.cache_ttl


def test_it_shows_echos_declared_limits(api):
    echo = skills_by_name(api)["echo"]

    assert echo["queue"] == "default"
    assert (echo["soft_time_limit"], echo["time_limit"]) == (5, 10)
    assert (echo["max_soft_time_limit"], echo["max_time_limit"]) == (60, 70)
    assert echo["retries"] == 0


def test_it_shows_that_flaky_retries(api):
    assert skills_by_name(api)["flaky"]["retries"] == 3


def test_it_shows_a_skills_cache_ttl(api):
    skills = skills_by_name(api)

    counted_echo = registry.get("counted_echo")
    assert counted_echo is not None

    assert skills["counted_echo"]["cache_ttl"] == counted_echo.cache_ttl == 5
    assert skills["echo"]["cache_ttl"] is None


def test_it_shows_no_breaker_for_a_skill_without_one(api):
    assert skills_by_name(api)["echo"]["breaker"] is None


def test_it_shows_a_skills_breaker_and_fallback(api):
    fragile = skills_by_name(api)["fragile"]

    assert fragile["fallback"] == {"fallback": True}
    assert fragile["breaker"]["fail_max"] == 3
    assert fragile["breaker"]["reset_timeout"] == 5
    assert fragile["breaker"]["state"] in ("closed", "open", "half_open")


def test_it_lists_every_registered_skill_once_in_name_order(api):
    names = [skill["name"] for skill in api.get("/api/skills/").json()]

    assert names == sorted(s.name for s in registry)


def test_it_needs_authentication(anon):
    response = anon.get("/api/skills/")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
