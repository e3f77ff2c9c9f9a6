"""The sweeper: deadlines, and runs whose messages were lost."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from agentsite.celery import app
from orchestration import broker
from orchestration.models import Run
from orchestration.services import start_run, sweep
from orchestration.tasks import sweep as sweep_task

from .conftest import wait_for_run, wait_until
from .factories import ConversationFactory, WorkflowFactory
from .test_cancel_replay import active_task_ids, effect_rows
from .test_delivery import effect, running_attempt

pytestmark = pytest.mark.worker


def test_a_run_past_its_deadline_fails_and_its_running_step_is_stopped(worker, user):
    run = start_run(owner=user, spec={"chain": [effect("a"), effect("slow", seconds=60), effect("c")]}, deadline=60)
    slow = running_attempt(run, "slow", 1)
    # Shortened once the step runs: its message's budget (orchestration/budget.py) would have cut it at a 1 s deadline.
    run.deadline = run.created_at + timedelta(seconds=1)
    run.save(update_fields=["deadline"])
    time.sleep(max(0, (run.deadline - timezone.now()).total_seconds()) + 0.05)

    report = sweep()

    assert report.expired == [run.pk]
    run.refresh_from_db()
    assert (run.status, run.error) == ("failed", "deadline exceeded: the run did not finish within 1s")
    steps = {s.key: s for s in run.steps.all()}
    assert {k: s.status for k, s in steps.items()} == {"a": "succeeded", "slow": "timed_out", "c": "cancelled"}
    assert steps["slow"].error == "stopped: deadline exceeded: the run did not finish within 1s"
    wait_until(lambda: str(slow.task_id) not in active_task_ids(), timeout=5)
    assert effect_rows(run, "slow") == 0


def test_the_deadline_comes_from_the_request_then_the_workflow_then_the_setting(worker, user, settings):
    settings.RUN_DEFAULT_DEADLINE = 600
    workflow = WorkflowFactory.create(spec=effect("a"), deadline=60)

    def allowed(run: Run) -> float:
        return (run.deadline - run.created_at).total_seconds()

    assert allowed(start_run(owner=user, spec=effect("a"), workflow=workflow, deadline=5)) == pytest.approx(5, abs=1)
    assert allowed(start_run(owner=user, spec=effect("a"), workflow=workflow)) == pytest.approx(60, abs=1)
    assert allowed(start_run(owner=user, spec=effect("a"))) == pytest.approx(600, abs=1)


@pytest.mark.parametrize("deadline", [0, -1, 10**9, "soon"])
def test_a_bad_deadline_is_a_400(worker, user, api, deadline):
    conversation = ConversationFactory.create(owner=user)

    response = api.post(
        f"/api/conversations/{conversation.pk}/runs/", {"spec": effect("a"), "deadline": deadline}, format="json"
    )

    assert response.status_code == 400
    assert list(response.data) == ["deadline"]


def test_a_run_whose_publish_was_lost_is_published_by_the_sweeper(worker, user, settings, monkeypatch):
    settings.RUN_STALL_AFTER = 1
    # The web process dies between committing the run and publishing it.
    monkeypatch.setattr(broker, "publish_run", lambda *args: None)
    run = start_run(owner=user, spec={"chain": [effect("a"), effect("b")]}, input="x")
    monkeypatch.undo()
    assert sweep().resumed == []  # not stalled yet
    time.sleep(1.1)

    assert sweep().resumed == [run.pk]

    run = wait_for_run(run)
    assert (run.status, run.output) == ("succeeded", "x")
    assert (effect_rows(run, "a"), effect_rows(run, "b")) == (1, 1)
    assert sweep().resumed == []  # finished runs are left alone


def test_a_run_with_a_step_in_progress_is_not_stalled(worker, user, settings):
    settings.RUN_STALL_AFTER = 1
    run = start_run(owner=user, spec={"chain": [effect("a", seconds=3), effect("b")]})
    running_attempt(run, "a", 1)
    time.sleep(1.5)

    assert run.pk not in sweep().resumed

    run = wait_for_run(run)
    assert run.status == "succeeded"
    assert run.steps.get(key="a").attempts == 1


def test_celery_beat_runs_the_sweeper_on_a_worker(worker, user):
    entry: dict[str, Any] = app.conf.beat_schedule["sweep"]
    overdue = start_run(owner=user, spec=effect("a", seconds=30))
    Run.objects.filter(pk=overdue.pk).update(deadline=timezone.now() - timedelta(seconds=1))

    result = app.send_task(entry["task"], **entry["options"]).get(timeout=20)

    assert entry["task"] == sweep_task.name
    assert result["expired"] == [overdue.pk]
    assert wait_for_run(overdue).status == "failed"


def test_a_worker_started_without_queues_consumes_the_sweep_queue(worker):
    replies = app.control.inspect(destination=[worker.name], timeout=5).active_queues() or {}

    assert {q["name"] for q in replies[worker.name]} == {"default", "sweep"}
