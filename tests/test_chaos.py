"""The chaos suite's kill-pool-child scenario, scaled down, as a test.

It runs ``manage.py chaos`` in a subprocess, which starts its own
redis-server, SQLite database, web, worker and beat: the test's Redis and
database settings (pytest-env, bin/test) are left out of its environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

ISOLATED_FROM = ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")


def chaos(*args: str, timeout: float = 90) -> tuple[int, str, str]:
    """Run ``manage.py chaos``; past ``timeout`` it gets SIGTERM, which stops every process it started."""
    env = {name: value for name, value in os.environ.items() if name not in ISOLATED_FROM}
    command = [sys.executable, "manage.py", "chaos", *args]
    with subprocess.Popen(
        command, cwd=settings.BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.communicate(timeout=25)
            pytest.fail(f"manage.py chaos {' '.join(args)} took more than {timeout}s")
    return process.returncode, stdout, stderr


@pytest.mark.chaos
def test_killed_pool_children_lose_no_run_and_apply_each_effect_once() -> None:
    returncode, stdout, stderr = chaos("--scenario", "kill-pool-child", "--runs", "3", "--json")

    assert stdout.strip(), f"no report; stderr: {stderr}"
    [outcome] = json.loads(stdout)["scenarios"]
    assert outcome["status"] == "PASS", outcome["problems"]
    assert (outcome["runs"], outcome["succeeded"], outcome["lost"]) == (3, 3, 0)
    assert outcome["duplicated_effects"] == 0
    assert outcome["extra"]["kills"] == 3
    assert returncode == 0, stderr
