"""Cancel and replay (dead letters): API and admin, against the real worker."""

from __future__ import annotations

import time

import pytest
from django.test import Client

from agentsite.celery import app
from orchestration.models import Run
from orchestration.services import start_run
from skills.models import Effect

from .conftest import wait_for_run, wait_until
from .test_delivery import effect, running_attempt

pytestmark = pytest.mark.worker


def active_task_ids() -> set[str]:
    replies = app.control.inspect(timeout=1).active() or {}
    return {task["id"] for tasks in replies.values() for task in tasks}


def effect_rows(run: Run, key: str) -> int:
    return Effect.objects.filter(key=f"{run.pk}:{key}").count()


def test_cancel_stops_a_running_run_within_seconds(worker, user, api):
    run = start_run(owner=user, spec={"chain": [effect("a"), effect("slow", seconds=60), effect("c")]})
    slow = running_attempt(run, "slow", 1)
    started = time.monotonic()

    response = api.post(f"/api/runs/{run.pk}/cancel/")

    assert response.status_code == 202, response.data
    assert response.data["status"] == "cancelled"
    assert response.data["error"] == f"cancelled by {user.username}"
    wait_until(lambda: str(slow.task_id) not in active_task_ids(), timeout=5)
    assert time.monotonic() - started < 5
    steps = {s.key: s for s in Run.objects.get(pk=run.pk).steps.all()}
    assert {k: s.status for k, s in steps.items()} == {"a": "succeeded", "slow": "cancelled", "c": "cancelled"}
    assert steps["slow"].error == f"stopped: cancelled by {user.username}"
    assert effect_rows(run, "slow") == 0
    # The worker process that ran it was replaced: the next run works.
    assert wait_for_run(start_run(owner=user, spec=effect("after"))).status == "succeeded"


def test_cancelling_a_finished_run_is_a_conflict(worker, user, api):
    run = wait_for_run(start_run(owner=user, spec=effect("a")))

    response = api.post(f"/api/runs/{run.pk}/cancel/")

    assert response.status_code == 409
    assert response.data == {
        "detail": f"run {run.pk} is already succeeded; only a queued, running or waiting run can be cancelled"
    }


def test_another_users_run_cannot_be_cancelled_or_retried(worker, user, other_user, api):
    run = start_run(owner=other_user, spec=effect("a", seconds=2))

    assert api.post(f"/api/runs/{run.pk}/cancel/").status_code == 404
    assert api.post(f"/api/runs/{run.pk}/retry/").status_code == 404
    assert wait_for_run(run).status == "succeeded"


def test_retry_replays_a_failed_run_from_its_first_unfinished_step(worker, user, api):
    failing_until = time.time() + 2
    spec = {"chain": [effect("a"), {"skill": "flaky", "id": "b", "args": {"until": failing_until}}, effect("c")]}
    run = wait_for_run(start_run(owner=user, spec=spec, input="in"))
    assert run.status == "failed"
    assert api.get("/api/runs/?status=failed").data["results"][0]["id"] == run.pk
    time.sleep(max(0, failing_until - time.time()))

    response = api.post(f"/api/runs/{run.pk}/retry/")

    assert response.status_code == 202, response.data
    assert (response.data["status"], response.data["replays"], response.data["error"]) == ("queued", 1, "")
    run = wait_for_run(run)
    assert run.status == "succeeded"
    assert run.output == "in"
    assert effect_rows(run, "a") == 1  # reused, not run again
    assert effect_rows(run, "c") == 1
    steps = {s.key: s for s in run.steps.all()}
    assert (steps["a"].attempts, steps["b"].attempts, steps["c"].attempts) == (1, 1, 1)
    assert run.events.filter(type="run.replayed").count() == 1


def test_a_cancelled_chord_can_be_replayed_and_keeps_what_it_finished(worker, user, api):
    spec = {"chord": {"header": [effect("x"), effect("y", seconds=2)], "body": effect("z")}}
    run = start_run(owner=user, spec=spec, input="in")
    running_attempt(run, "y", 1)
    wait_until(lambda: run.steps.filter(key="x", status="succeeded").exists())
    api.post(f"/api/runs/{run.pk}/cancel/")
    old_task_id = run.steps.get(key="y").task_id

    assert api.post(f"/api/runs/{run.pk}/retry/").status_code == 202

    run = wait_for_run(run)
    assert run.status == "succeeded", (run.error, list(run.events.values_list("type", "step__key", "data")))
    assert run.output == ["in", "in"]
    assert run.steps.get(key="y").task_id != old_task_id  # its old task id was revoked
    assert (effect_rows(run, "x"), effect_rows(run, "y"), effect_rows(run, "z")) == (1, 1, 1)


def test_retrying_a_run_that_did_not_fail_is_a_conflict(worker, user, api):
    run = wait_for_run(start_run(owner=user, spec=effect("a")))

    response = api.post(f"/api/runs/{run.pk}/retry/")

    assert response.status_code == 409
    assert response.data == {"detail": f"run {run.pk} is succeeded; only a failed or cancelled run can be retried"}


def admin_action(client: Client, action: str, runs: list[Run]) -> list[str]:
    """Apply an admin action to the runs; the messages the admin showed."""
    response = client.post(
        "/admin/orchestration/run/",
        {"action": action, "_selected_action": [r.pk for r in runs]},
        follow=True,
    )
    assert response.status_code == 200
    return [str(m) for m in response.context["messages"]]


def test_admin_cancels_and_replays_many_runs(worker, user, admin_user):
    client = Client()
    client.force_login(admin_user)
    runs = [start_run(owner=user, spec=effect("slow", seconds=30)) for _ in range(3)]
    done = wait_for_run(start_run(owner=user, spec=effect("a")))

    shown = admin_action(client, "cancel_runs", [*runs, done])

    assert shown == [
        "3 run(s) cancelled.",
        f"run {done.pk} is already succeeded; only a queued, running or waiting run can be cancelled",
    ]
    assert {r.status for r in Run.objects.filter(pk__in=[r.pk for r in runs])} == {"cancelled"}

    assert admin_action(client, "replay_runs", runs) == ["3 run(s) replayed."]
    assert {r.status for r in Run.objects.filter(pk__in=[r.pk for r in runs])} <= {"queued", "running"}
    admin_action(client, "cancel_runs", runs)
