"""Settings that would break a promise, or leave production open, are refused at start-up."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from agentsite.settings import DEV_SECRET_KEY

# The variables whose absence `check --deploy` reports, with the check that reports it.
HTTPS_SETTINGS_AND_THEIR_CHECKS = {
    "SECURE_SSL_REDIRECT": "security.W008",
    "SESSION_COOKIE_SECURE": "security.W012",
    "CSRF_COOKIE_SECURE": "security.W016",
    "SECURE_HSTS_SECONDS": "security.W004",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "security.W005",
    "SECURE_HSTS_PRELOAD": "security.W021",
}


def manage_check(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        env={**os.environ, **env},
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_in_project(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """``python argv...`` in the project with exactly ``env`` (and PATH): nothing of this test run leaks in."""
    return subprocess.run(
        [sys.executable, *argv],
        env={"PATH": os.environ["PATH"], **env},
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )


def settings_under(env: dict[str, str], *names: str) -> dict[str, Any]:
    """The values agentsite/settings.py gives ``names`` when imported with ``env``."""
    code = f"import json; import agentsite.settings as s; print(json.dumps({{n: getattr(s, n) for n in {names!r}}}))"
    result = run_in_project(env, "-c", code)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def import_settings(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_in_project(env, "-c", "import agentsite.settings")


def production_env_from_readme() -> dict[str, str]:
    """The variables of the README's production block; each ``<...>`` placeholder becomes a fresh secret."""
    readme = (Path(settings.BASE_DIR) / "README.md").read_text()
    block = re.search(r"^### Production settings\n.*?^```sh\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    assert block, 'the README has no "### Production settings" section with a sh block'
    env = {}
    for line in block.group(1).splitlines():
        assignment = line.split(" #", 1)[0].strip()
        if assignment:
            name, _, value = assignment.partition("=")
            env[name] = re.sub(r"<[^>]+>", lambda _: secrets.token_urlsafe(50), value)
    return env


def test_a_visibility_timeout_shorter_than_the_longest_step_is_refused():
    result = manage_check(STEP_MAX_TIME_LIMIT="660", STEP_MAX_BACKOFF="2", BROKER_VISIBILITY_TIMEOUT="600")

    assert result.returncode != 0
    assert "BROKER_VISIBILITY_TIMEOUT=600 must exceed STEP_MAX_TIME_LIMIT plus the longest retry countdown (690s)" in (
        result.stderr
    )


def test_the_derived_visibility_timeout_outlasts_the_longest_step_and_countdown():
    result = manage_check(STEP_MAX_TIME_LIMIT="660", STEP_MAX_BACKOFF="2")

    assert result.returncode == 0, result.stderr
    assert settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] == 3600 + 300 + 600


def test_an_unknown_log_format_is_refused():
    result = manage_check(LOG_FORMAT="yaml")

    assert result.returncode != 0
    assert 'LOG_FORMAT must be "text" or "json", not "yaml"' in result.stderr


@pytest.mark.parametrize("debug", [{}, {"DEBUG": "0"}], ids=["debug-unset", "debug-off"])
@pytest.mark.parametrize("secret_key", [{}, {"SECRET_KEY": ""}, {"SECRET_KEY": "  "}], ids=["unset", "empty", "blank"])
def test_a_missing_secret_key_is_refused_when_debug_is_off(debug, secret_key):
    result = import_settings({**debug, **secret_key})

    assert result.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is missing and DEBUG is off" in result.stderr
    assert "secrets.token_urlsafe(50)" in result.stderr


def test_the_development_secret_key_is_refused_when_debug_is_off():
    result = import_settings({"SECRET_KEY": DEV_SECRET_KEY})

    assert result.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is the development key and DEBUG is off" in result.stderr


def test_debug_runs_on_the_development_key_when_none_is_set():
    assert settings_under({"DEBUG": "1"}, "SECRET_KEY") == {"SECRET_KEY": DEV_SECRET_KEY}
    assert settings_under({"DEBUG": "1", "SECRET_KEY": ""}, "SECRET_KEY") == {"SECRET_KEY": DEV_SECRET_KEY}


def test_https_settings_are_off_by_default_so_plain_http_on_loopback_works():
    off: dict[str, Any] = {
        "SECURE_PROXY_SSL_HEADER": None,
        "SECURE_SSL_REDIRECT": False,
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_HSTS_SECONDS": 0,
        "CSRF_TRUSTED_ORIGINS": [],
    }

    assert settings_under({"SECRET_KEY": "x"}, *off) == off


def test_the_forwarded_proto_header_is_trusted_only_when_asked():
    values = settings_under({"SECRET_KEY": "x", "USE_X_FORWARDED_PROTO": "1"}, "SECURE_PROXY_SSL_HEADER")

    assert values == {"SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"]}


def test_the_production_settings_in_the_readme_pass_the_deploy_check():
    result = run_in_project(production_env_from_readme(), "manage.py", "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(("name", "check"), HTTPS_SETTINGS_AND_THEIR_CHECKS.items())
def test_the_deploy_check_fails_without_each_production_setting(name, check):
    env = production_env_from_readme()
    del env[name]

    result = run_in_project(env, "manage.py", "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode != 0
    assert check in result.stderr


def test_the_deploy_check_fails_on_a_weak_secret_key():
    env = production_env_from_readme() | {"SECRET_KEY": "short"}

    result = run_in_project(env, "manage.py", "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode != 0
    assert "security.W009" in result.stderr


def test_plain_http_is_redirected_to_https_except_health_probes(client, settings):
    settings.SECURE_SSL_REDIRECT = True

    assert client.get("/healthz").status_code == 200
    redirected = client.get("/api/runs/")
    assert redirected.status_code == 301
    assert redirected["Location"] == "https://testserver/api/runs/"
    assert client.get("/api/runs/", headers={"X-Forwarded-Proto": "https"}).status_code == 301


def test_a_request_the_trusted_proxy_received_over_https_is_served_with_hsts(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = settings.SECURE_HSTS_PRELOAD = True

    answer = client.get("/api/runs/", headers={"X-Forwarded-Proto": "https"})

    assert answer.status_code == 401
    assert answer["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
