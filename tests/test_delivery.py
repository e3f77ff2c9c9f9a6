"""Nothing twice: redelivery after a killed worker process, duplicates, the redelivery cap.

These kill real pool processes of the session's prefork worker (the pool
replaces them) and count the ``effect`` skill's rows, one per application.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import psutil
import pytest
import redis
from celery.app.task import Context
from django.conf import settings

from agentsite.celery import app
from orchestration import canvas
from orchestration.broker import DELIVERY_HEADER
from orchestration.models import Run, Step
from orchestration.services import start_run
from orchestration.spec import plan
from orchestration.worker import delivery_of
from skills.models import Effect

from .conftest import Worker, wait_for_run, wait_until

pytestmark = pytest.mark.worker


def effect(id: str, seconds: float = 0) -> dict[str, Any]:
    return {"skill": "effect", "id": id, "args": {"seconds": seconds}}


def running_attempt(run: Run, key: str, attempt: int) -> Step:
    return wait_until(lambda: run.steps.filter(key=key, status="running", attempts=attempt).first())


def pool_pid_running(step: Step) -> int:
    """The pid of the pool process executing the step's task (from the worker itself)."""

    def find() -> int | None:
        for tasks in (app.control.inspect(timeout=1).active() or {}).values():
            for task in tasks:
                if task["id"] == str(step.task_id):
                    return int(task["worker_pid"])
        return None

    return wait_until(find)


def effects(run: Run) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in Effect.objects.filter(run_id=run.pk).values_list("key", flat=True):
        step_key = key.split(":", 1)[1]
        counts[step_key] = counts.get(step_key, 0) + 1
    return counts


def test_every_step_message_gets_its_own_delivery_id(worker, user):
    run = wait_for_run(start_run(owner=user, spec={"chain": [effect("a"), effect("b"), effect("c")]}))

    deliveries = list(run.steps.values_list("delivery", flat=True))

    assert run.status == "succeeded"
    assert all(deliveries)
    assert len(set(deliveries)) == 3


def test_a_step_whose_pool_process_is_killed_runs_again_and_its_effect_counts_once(worker, user):
    run = start_run(owner=user, spec={"chain": [effect("a"), effect("b", seconds=1.5), effect("c")]})
    step = running_attempt(run, "b", 1)

    os.kill(pool_pid_running(step), signal.SIGKILL)

    run = wait_for_run(run)
    assert run.status == "succeeded"
    b = run.steps.get(key="b")
    assert (b.attempts, b.redeliveries) == (2, 1)
    assert effects(run) == {"a": 1, "b": 1, "c": 1}
    assert run.events.filter(type="step.running", step=b, data__redelivered=True).count() == 1
    assert run.events.filter(type="step.released", step=b, data__redeliveries=1).count() == 1


def test_a_step_that_keeps_killing_its_worker_fails_after_the_redelivery_cap(worker, user):
    run = start_run(owner=user, spec={"chain": [effect("a"), effect("doomed", seconds=30), effect("c")]})
    lost = settings.STEP_MAX_REDELIVERIES + 1

    for attempt in range(1, lost + 1):
        os.kill(pool_pid_running(running_attempt(run, "doomed", attempt)), signal.SIGKILL)

    run = wait_for_run(run)
    doomed = run.steps.get(key="doomed")
    assert run.status == "failed"
    assert doomed.status == "failed"
    assert doomed.attempts == lost
    assert f"its worker was lost {lost} times" in doomed.error
    assert run.steps.get(key="c").status == "cancelled"
    assert effects(run) == {"a": 1}


def test_a_duplicate_message_for_a_running_step_is_dropped(worker, user):
    spec = {"chain": [effect("a", seconds=1), effect("b")]}
    run = start_run(owner=user, spec=spec)
    step = running_attempt(run, "a", 1)
    options = {p.path: canvas.StepOptions.for_step(p, step.pk, str(step.task_id)) for p in plan(spec) if p.key == "a"}

    # The same step published again (a re-dispatch): a new message, not a redelivery.
    canvas.step_signature(options[step.path]).apply_async(args=(None,))

    run = wait_for_run(run)
    assert run.status == "succeeded"
    assert run.steps.get(key="a").attempts == 1
    assert effects(run) == {"a": 1, "b": 1}


def test_a_copy_of_a_running_steps_own_message_does_not_run_it_again(worker, user):
    spec = {"chain": [effect("a", seconds=1), effect("b")]}
    run = start_run(owner=user, spec=spec)
    step = running_attempt(run, "a", 1)
    options = {p.path: canvas.StepOptions.for_step(p, step.pk, str(step.task_id)) for p in plan(spec) if p.key == "a"}

    # Redis hands an unacknowledged message back when a worker's connection
    # drops, while that worker may still be running it: same delivery id. The
    # copy waits for the step, then passes its stored output on.
    canvas.step_signature(options[step.path]).apply_async(args=(None,), headers={DELIVERY_HEADER: step.delivery})

    run = wait_for_run(run)
    assert run.status == "succeeded"
    assert run.steps.get(key="a").attempts == 1
    assert effects(run) == {"a": 1, "b": 1}
    assert not run.events.filter(type="step.released").exists()


def drop_broker_connections(worker: Worker) -> int:
    """Close the worker's connections to Redis from the server side (a network blip)."""
    ports = {c.laddr.port for c in psutil.Process(worker.process.pid).net_connections(kind="tcp") if c.raddr}
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    peers = [c["id"] for c in client.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports]
    return sum(client.client_kill_filter(_id=peer) for peer in peers)


def test_a_step_running_when_its_worker_loses_the_broker_finishes_and_runs_once(worker, user):
    # The effect is applied at once; the skill returns 2 s later.
    run = start_run(owner=user, spec={"chain": [{**effect("a"), "args": {"after": 2}}, effect("b")]})
    wait_until(lambda: effects(run).get("a"))

    # Celery cancels running acks-late tasks when the broker connection
    # drops, and Redis hands their messages back. Stopped now, the step would
    # run, and apply its effect, again.
    assert drop_broker_connections(worker) > 0

    run = wait_for_run(run)
    assert run.status == "succeeded"
    a = run.steps.get(key="a")
    assert (a.attempts, a.redeliveries) == (1, 0)
    assert effects(run) == {"a": 1, "b": 1}
    assert not run.events.filter(type="step.released").exists()


SHIELD_SCRIPT = """
import os, signal, sys, threading, time
import django
django.setup()
from orchestration.worker import terminated_only_after
# Another thread, like the run events' publisher or the span exporter in a pool process.
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
signal.signal(signal.SIGUSR1, lambda *args: sys.exit("soft time limit"))  # like billiard's
with terminated_only_after():
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    open(sys.argv[1], "w").write("stored")
print("not reached")
"""


def test_sigterm_or_a_soft_time_limit_during_a_steps_store_do_not_cut_it_short(tmp_path):
    marker = tmp_path / "stored"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "agentsite.settings"}

    done = subprocess.run(
        [sys.executable, "-c", SHIELD_SCRIPT, str(marker)],
        env=env,
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert marker.read_text() == "stored", done.stderr
    assert done.returncode == -signal.SIGTERM
    assert "not reached" not in done.stdout


def test_the_delivery_id_is_read_off_the_message_not_a_header_named_headers():
    # Sentry's Celery integration adds a header named "headers" (celery#4875),
    # which Celery then gives as request.headers: without our delivery id.
    request = Context({"id": "task-id", DELIVERY_HEADER: "delivery-id", "headers": {"sentry-trace": "x"}})

    assert delivery_of(request) == "delivery-id"
    assert delivery_of(Context({"id": "task-id"})) == "task-id"
