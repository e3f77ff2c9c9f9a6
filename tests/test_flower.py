"""Flower as the Procfile runs it: authentication, bounded task memory, and the admin's links to it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.urls import reverse

from agentsite.flower import command
from orchestration.services import start_run

from .conftest import wait_until

AUTH = ("ops", "flower-test-password")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DEBUG": "0", **extra}
    env.pop("FLOWER_BASIC_AUTH", None)
    return {**env, **extra}


@pytest.fixture(scope="module")
def flower() -> Iterator[str]:
    port = free_port()
    env = flower_env(FLOWER_BASIC_AUTH=":".join(AUTH), FLOWER_PORT=str(port), FLOWER_MAX_TASKS="50")
    log = Path(settings.BASE_DIR) / "var" / "test-flower.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agentsite.flower"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: _answers(url) or process.poll() is not None, timeout=30)
        assert process.poll() is None, log.read_text()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
    except requests.ConnectionError:
        return False
    return True


def test_the_procfile_starts_flower_through_the_safe_wrapper():
    procfile = (Path(settings.BASE_DIR) / "Procfile").read_text().splitlines()

    assert "flower: python -m agentsite.flower" in procfile


def test_flower_keeps_a_bounded_number_of_tasks_and_listens_on_loopback():
    argv = command("127.0.0.1", 5555, 10000)

    assert "--max_tasks=10000" in argv
    assert "--address=127.0.0.1" in argv


def test_flower_refuses_to_start_without_credentials_unless_debug():
    refused = subprocess.run(
        [sys.executable, "-m", "agentsite.flower"], env=flower_env(), capture_output=True, text=True, timeout=30
    )

    assert refused.returncode != 0
    assert "refusing to start without FLOWER_BASIC_AUTH" in refused.stderr


def test_flower_and_its_api_answer_only_with_credentials(flower):
    assert requests.get(flower, timeout=10).status_code == 401
    assert requests.get(f"{flower}api/tasks", timeout=10).status_code == 401
    assert requests.get(flower, auth=("ops", "wrong"), timeout=10).status_code == 401

    assert requests.get(flower, auth=AUTH, timeout=10).status_code == 200
    tasks = requests.get(f"{flower}api/tasks", auth=AUTH, timeout=10)
    assert tasks.status_code == 200
    assert isinstance(tasks.json(), dict)


def test_the_admin_links_to_flower_and_each_steps_task(admin_client, user, settings):
    settings.FLOWER_URL = "http://flower.internal:5555/"
    run = start_run(owner=user, spec={"chain": [{"skill": "echo"}, {"skill": "echo"}]})

    index = admin_client.get(reverse("admin:index")).content.decode()
    page = admin_client.get(reverse("admin:orchestration_run_change", args=[run.pk])).content.decode()

    assert 'href="http://flower.internal:5555/"' in index
    for task_id in run.steps.values_list("task_id", flat=True):
        assert f'href="http://flower.internal:5555/task/{task_id}"' in page
