"""Flower as the Procfile runs it: authentication, bounded task memory, and the admin's links to it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
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


def start_flower(**extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m agentsite.flower`` run to its end (it ends at once when it refuses to start)."""
    return subprocess.run(
        [sys.executable, "-m", "agentsite.flower"], env=flower_env(**extra), capture_output=True, text=True, timeout=30
    )


def flower_env(**extra: str) -> dict[str, str]:
    """This test run's environment with DEBUG off and no FLOWER_* variable but ``extra``'s."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLOWER_")}
    return {**env, "DEBUG": "0", **extra}


@contextmanager
def running_flower(log_name: str, **extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m agentsite.flower`` (the Procfile's line) on a free port; its URL and process."""
    port = free_port()
    env = flower_env(FLOWER_PORT=str(port), FLOWER_MAX_TASKS="50", **extra)
    log = Path(settings.BASE_DIR) / "var" / log_name
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agentsite.flower"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://{env.get('FLOWER_ADDRESS', '127.0.0.1')}:{port}/"
    try:
        wait_until(lambda: _answers(url) or process.poll() is not None, timeout=30)
        assert process.poll() is None, log.read_text()
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def flower_process() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Flower as production runs it: credentials set, FLOWER_ADDRESS not."""
    with running_flower("test-flower.log", FLOWER_BASIC_AUTH=":".join(AUTH)) as started:
        yield started


@pytest.fixture
def flower(flower_process: tuple[str, subprocess.Popen[bytes]]) -> str:
    return flower_process[0]


def listening_addresses(process: subprocess.Popen[bytes]) -> set[str]:
    """The addresses Flower accepts connections on (``agentsite.flower`` execs it in the same process)."""
    connections = psutil.Process(process.pid).net_connections(kind="inet")
    return {connection.laddr.ip for connection in connections if connection.status == psutil.CONN_LISTEN}


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
    except requests.ConnectionError:
        return False
    return True


def test_the_procfile_starts_flower_through_the_safe_wrapper():
    procfile = (Path(settings.BASE_DIR) / "Procfile").read_text().splitlines()

    assert "flower: python -m agentsite.flower" in procfile


def test_flower_keeps_a_bounded_number_of_tasks():
    argv = command("127.0.0.1", 5555, 10000)

    assert "--max_tasks=10000" in argv


@pytest.mark.parametrize("credentials", [{}, {"FLOWER_BASIC_AUTH": ""}, {"FLOWER_BASIC_AUTH": " "}])
def test_flower_refuses_to_start_without_credentials_when_debug_is_off(credentials):
    refused = start_flower(**credentials)

    assert refused.returncode == 1
    assert "refusing to start without FLOWER_BASIC_AUTH" in refused.stderr


@pytest.mark.parametrize("credentials", ["ops", "ops:", ":secret", "ops:secret,admin"])
def test_flower_refuses_credentials_that_are_not_user_and_password(credentials):
    refused = start_flower(FLOWER_BASIC_AUTH=credentials)

    assert refused.returncode == 1
    assert "FLOWER_BASIC_AUTH must be user:password" in refused.stderr


def test_with_debug_on_flower_starts_without_credentials_where_flower_address_says():
    # 127.0.0.2 is loopback too, and not the default: Flower binds where it is told.
    with running_flower("test-flower-debug.log", DEBUG="1", FLOWER_ADDRESS="127.0.0.2") as (url, process):
        assert listening_addresses(process) == {"127.0.0.2"}
        assert requests.get(url, timeout=10).status_code == 200


@pytest.mark.parametrize("path", ["", "workers", "tasks", "broker", "api/workers", "api/tasks", "api/task/types"])
def test_flower_pages_and_api_answer_only_with_credentials(flower, path):
    assert requests.get(f"{flower}{path}", timeout=10).status_code == 401
    assert requests.get(f"{flower}{path}", auth=("ops", "wrong"), timeout=10).status_code == 401

    assert requests.get(f"{flower}{path}", auth=AUTH, timeout=10).status_code == 200


def test_flower_api_lists_workers_and_tasks_with_credentials(flower):
    workers = requests.get(f"{flower}api/workers", auth=AUTH, timeout=10)
    tasks = requests.get(f"{flower}api/tasks", auth=AUTH, timeout=10)

    assert isinstance(workers.json(), dict)
    assert isinstance(tasks.json(), dict)


def test_flower_listens_on_loopback_only_by_default(flower_process):
    _, process = flower_process

    assert listening_addresses(process) == {"127.0.0.1"}


def test_the_admin_links_to_flower_and_each_steps_task(admin_client, user, settings):
    settings.FLOWER_URL = "http://flower.internal:5555/"
    run = start_run(owner=user, spec={"chain": [{"skill": "echo"}, {"skill": "echo"}]})

    index = admin_client.get(reverse("admin:index")).content.decode()
    page = admin_client.get(reverse("admin:orchestration_run_change", args=[run.pk])).content.decode()

    assert 'href="http://flower.internal:5555/"' in index
    for task_id in run.steps.values_list("task_id", flat=True):
        assert f'href="http://flower.internal:5555/task/{task_id}"' in page
