"""Human in the loop: a step waits for input holding no worker, and a resume (API, admin, timeout) goes on."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from agentsite.celery import app
from orchestration.models import Run
from orchestration.services import start_run
from orchestration.tasks import sweep as sweep_task
from skills.registry import NO_DEFAULT, SkillContext, SkillError

from .conftest import wait_for_run, wait_until
from .factories import token_for
from .test_cancel_replay import effect_rows
from .test_delivery import effect

APPROVE = "Approve the refund?"


def ask(**args: Any) -> dict[str, Any]:
    return {"skill": "ask_human", "id": "ask", "args": {"prompt": APPROVE, **args}}


def waiting(run: Run) -> Run:
    """The run once it waits (fails the test if it does not within the default time)."""
    wait_until(lambda: Run.objects.filter(pk=run.pk, status="waiting").exists())
    run.refresh_from_db()
    return run


def tasks_on_worker(worker: Any) -> set[str]:
    """The ids of the tasks the worker runs or holds reserved."""
    inspect = app.control.inspect(destination=[worker.name], timeout=1)
    replies = [inspect.active() or {}, inspect.reserved() or {}]
    return {task["id"] for reply in replies for tasks in reply.values() for task in tasks}


def events_of(run: Run) -> list[tuple[str, dict[str, Any]]]:
    return [(e.type, e.data) for e in run.events.order_by("seq")]


@pytest.mark.worker
def test_a_waiting_run_holds_no_worker_and_goes_on_with_the_payload(worker, user, api):
    run = waiting(start_run(owner=user, spec={"chain": [effect("a"), ask(), effect("c")]}, input={"order": 7}))

    detail = api.get(f"/api/runs/{run.pk}/").data
    steps = {s.key: s for s in run.steps.all()}
    assert detail["status"] == "waiting"
    assert detail["awaiting_input"] == {"step": "ask", "prompt": APPROVE, "timeout_at": run.deadline.isoformat()}
    assert {k: s.status for k, s in steps.items()} == {"a": "succeeded", "ask": "running", "c": "pending"}
    wait_until(lambda: not {str(s.task_id) for s in steps.values()} & tasks_on_worker(worker))
    page = Client()
    page.force_login(user)
    assert APPROVE in page.get(f"/runs/{run.pk}/").content.decode()

    response = api.post(f"/api/runs/{run.pk}/resume/", {"payload": {"approved": True}}, format="json")

    assert response.status_code == 202, response.data
    assert response.data["status"] == "running"
    run = wait_for_run(run)
    assert (run.status, run.output) == ("succeeded", {"approved": True})
    steps = {s.key: s for s in run.steps.all()}
    assert (steps["ask"].status, steps["ask"].output) == ("succeeded", {"approved": True})
    assert (steps["c"].status, steps["c"].output) == ("succeeded", {"approved": True})
    assert (effect_rows(run, "a"), effect_rows(run, "c")) == (1, 1)  # "a" was passed on, not run again
    types = [t for t, _ in events_of(run)]
    assert types.index("run.waiting") < types.index("run.resumed") < types.index("run.succeeded")
    assert ("run.resumed", {"step": "ask", "by": user.username}) in events_of(run)
    assert api.get(f"/api/runs/{run.pk}/").data["awaiting_input"] is None


@pytest.mark.worker
def test_a_waiting_last_step_resumed_ends_its_run_with_the_payload(worker, user, api):
    run = waiting(start_run(owner=user, spec={"chain": [effect("a"), ask()]}))

    response = api.post(f"/api/runs/{run.pk}/resume/", {"payload": "yes"}, format="json")

    assert response.status_code == 202, response.data
    assert response.data["status"] == "succeeded"
    run.refresh_from_db()
    assert run.output == "yes"
    assert run.steps.get(key="ask").output == "yes"


@pytest.mark.worker
def test_a_waiting_step_in_a_group_joins_its_chord_once_resumed(worker, user, api):
    run = start_run(owner=user, spec={"chain": [{"group": [ask(), effect("b")]}, effect("c")]}, input="in")
    run = waiting(run)
    wait_until(lambda: run.steps.filter(key="b", status="succeeded").exists())
    halted_task = run.steps.get(key="ask").task_id

    response = api.post(f"/api/runs/{run.pk}/resume/", {"payload": "yes"}, format="json")

    assert response.status_code == 202, response.data
    run = wait_for_run(run)
    assert (run.status, run.output) == ("succeeded", ["yes", "in"])
    # The halted task's stored failure must not count in the chord published on
    # resume: the answered step runs on as a new task (else, when b reported
    # first, the chord saw that failure and never ran its body).
    assert run.steps.get(key="ask").task_id != halted_task
    assert (effect_rows(run, "b"), effect_rows(run, "c")) == (1, 1)


@pytest.mark.worker
def test_resuming_a_run_that_is_not_waiting_is_a_conflict(worker, user, api):
    run = wait_for_run(start_run(owner=user, spec=effect("a")))

    response = api.post(f"/api/runs/{run.pk}/resume/", {"payload": 1}, format="json")

    assert response.status_code == 409
    assert response.data == {"detail": f"run {run.pk} is succeeded; only a waiting run can be resumed"}


@pytest.mark.worker
def test_a_resume_without_a_payload_is_refused(worker, user, api):
    run = waiting(start_run(owner=user, spec={"chain": [ask(), effect("c")]}))

    response = api.post(f"/api/runs/{run.pk}/resume/", {}, format="json")

    assert response.status_code == 400
    assert response.data == {"payload": ["This field is required."]}
    assert api.post(f"/api/runs/{run.pk}/resume/", {"payload": None}, format="json").status_code == 202
    assert wait_for_run(run).output is None


@pytest.mark.worker
def test_of_two_concurrent_resumes_exactly_one_wins(worker, user):
    run = waiting(start_run(owner=user, spec={"chain": [ask(), effect("c")]}))
    barrier = threading.Barrier(2)
    answers: dict[int, int] = {}

    def resume(payload: int) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
        try:
            barrier.wait()
            answers[payload] = client.post(
                f"/api/runs/{run.pk}/resume/", {"payload": payload}, format="json"
            ).status_code
        finally:
            connection.close()

    threads = [threading.Thread(target=resume, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(answers.values()) == [202, 409]
    winner = next(payload for payload, code in answers.items() if code == 202)
    assert wait_for_run(run).output == winner
    assert [t for t, _ in events_of(run)].count("run.resumed") == 1


def sweep_after(run: Run) -> dict[str, Any]:
    """Run the sweep task (as beat would) once the run's wait has timed out."""
    step = run.steps.get(key="ask")
    due = step.lease_until
    assert due is not None
    time.sleep(max(0.0, (due - timezone.now()).total_seconds()) + 0.05)
    return sweep_task()


@pytest.mark.worker
def test_a_wait_past_its_timeout_takes_its_default(worker, user):
    run = waiting(start_run(owner=user, spec={"chain": [ask(timeout=1, default={"approved": False}), effect("c")]}))

    report = sweep_after(run)

    assert report["waits_timed_out"] == [run.pk]
    run = wait_for_run(run)
    assert (run.status, run.output) == ("succeeded", {"approved": False})
    assert ("run.resumed", {"step": "ask", "by": "timeout"}) in events_of(run)


@pytest.mark.worker
def test_a_wait_past_its_timeout_without_a_default_times_out_and_fails_its_run(worker, user):
    run = waiting(start_run(owner=user, spec={"chain": [ask(timeout=1), effect("c")]}))

    report = sweep_after(run)

    assert report["waits_timed_out"] == [run.pk]
    run.refresh_from_db()
    assert (run.status, run.error) == ("failed", "step ask timed out: no input within 1s")
    steps = {s.key: s.status for s in run.steps.all()}
    assert steps == {"ask": "timed_out", "c": "cancelled"}


@pytest.mark.worker
def test_the_runs_deadline_bounds_its_wait(worker, user):
    run = waiting(start_run(owner=user, spec={"chain": [ask(timeout=600, default=1), effect("c")]}, deadline=1))
    step = run.steps.get(key="ask")
    assert step.lease_until == run.deadline
    assert step.wait == {"prompt": APPROVE, "timeout": 600, "default": 1, "timeout_at": run.deadline.isoformat()}

    report = sweep_after(run)

    assert (report["expired"], report["waits_timed_out"]) == ([run.pk], [])
    run.refresh_from_db()
    assert (run.status, run.error) == ("failed", "deadline exceeded: the run did not finish within 1s")
    assert run.steps.get(key="ask").status == "timed_out"


@pytest.mark.worker
def test_a_waiting_run_can_be_cancelled_and_its_replay_asks_again(worker, user, api):
    run = waiting(start_run(owner=user, spec={"chain": [effect("a"), ask(), effect("c")]}))

    assert api.post(f"/api/runs/{run.pk}/cancel/").status_code == 202
    assert run.steps.get(key="ask").status == "cancelled"
    assert api.post(f"/api/runs/{run.pk}/retry/").status_code == 202
    run = waiting(run)
    assert (run.steps.get(key="ask").wait or {}).get("prompt") == APPROVE
    assert api.post(f"/api/runs/{run.pk}/resume/", {"payload": 2}, format="json").status_code == 202
    assert wait_for_run(run).output == 2
    assert effect_rows(run, "a") == 1


@pytest.mark.worker
def test_staff_resume_a_waiting_run_from_the_admin(worker, user, admin_user):
    client = Client()
    client.force_login(admin_user)
    run = waiting(start_run(owner=user, spec={"chain": [ask(), effect("c")]}))

    page = client.get(f"/admin/orchestration/run/{run.pk}/change/")
    form = client.get(f"/admin/orchestration/run/{run.pk}/resume/")
    response = client.post(f"/admin/orchestration/run/{run.pk}/resume/", {"payload": '{"ok": true}'}, follow=True)

    assert APPROVE in page.content.decode()
    assert f"/admin/orchestration/run/{run.pk}/resume/" in page.content.decode()
    assert form.status_code == 200
    assert APPROVE in form.content.decode()
    assert [str(m) for m in response.context["messages"]] == [f"Run {run.pk} resumed: step ask got the payload."]
    assert wait_for_run(run).output == {"ok": True}
    again = client.post(f"/admin/orchestration/run/{run.pk}/resume/", {"payload": "1"}, follow=True)
    assert [str(m) for m in again.context["messages"]] == [
        f"run {run.pk} is succeeded; only a waiting run can be resumed"
    ]


def context(**args: Any) -> SkillContext:
    return SkillContext(run_id=1, step_id=1, step_key="ask", conversation_id=None, state={}, args=args, attempt=1)


def test_a_wait_keeps_its_default_only_when_declared():
    assert context().wait("ok?", timeout=5).record() == {"prompt": "ok?", "timeout": 5.0}
    assert context().wait("ok?", timeout=5, default=None).record() == {"prompt": "ok?", "timeout": 5.0, "default": None}
    assert context().wait("ok?").default is NO_DEFAULT


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"prompt": ""}, "wait: the prompt must be a non-empty string"),
        ({"prompt": "ok?", "timeout": 0}, "wait: the timeout must be a positive number of seconds, not 0"),
        ({"prompt": "ok?", "default": 1}, "wait: a default is taken when the wait times out, so it needs a timeout"),
    ],
)
def test_it_refuses_a_wait_that_contradicts_itself(kwargs, error):
    with pytest.raises(SkillError, match=error):
        context().wait(**kwargs)
