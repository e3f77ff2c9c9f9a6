"""Settings that would break a promise are refused at start-up."""

from __future__ import annotations

import os
import subprocess
import sys

from django.conf import settings


def manage_check(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        env={**os.environ, **env},
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )


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
