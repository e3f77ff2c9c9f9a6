"""Double-texting: a conversation's new run while another is active (reject, enqueue, interrupt).

Concurrent requests are posted from threads at once, through the API, and
run on the real worker.
"""

from __future__ import annotations

import threading
from itertools import pairwise
from typing import Any

import pytest
from django.db import connections
from rest_framework.test import APIClient

from orchestration import double_texting, services
from orchestration.models import Message, MessageRole, OnActive, Run, RunEvent, RunStatus, Step

from .conftest import wait_for_run, wait_until
from .factories import ConversationFactory, WorkflowFactory, token_for
from .test_cancel_replay import active_task_ids


@pytest.fixture
def conversation(user):
    return ConversationFactory.create(owner=user)


def sleep(seconds: float) -> dict[str, Any]:
    return {"skill": "sleep", "args": {"seconds": seconds}}


def post_at_once(user, url: str, bodies: list[dict[str, Any]]) -> list[Any]:
    """POST each body from its own thread, all released at once; the responses, in ``bodies``' order."""
    barrier = threading.Barrier(len(bodies))
    responses: list[Any] = [None] * len(bodies)

    def post(index: int) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
        try:
            barrier.wait()
            responses[index] = client.post(url, bodies[index], format="json")
        finally:
            connections.close_all()

    token_for(user)  # made once, before the threads race to make it
    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return responses


def messages_url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/messages/"


def runs_url(conversation) -> str:
    return f"/api/conversations/{conversation.pk}/runs/"


def running(run_id: int) -> Run:
    return wait_until(lambda: Run.objects.filter(pk=run_id, status=RunStatus.RUNNING).first())


def started_after(later: Run, earlier: Run) -> bool:
    """``later`` started once ``earlier`` had finished: they did not overlap."""
    assert later.started_at is not None
    assert earlier.finished_at is not None
    return later.started_at >= earlier.finished_at


def event_types(run_id: int) -> list[str]:
    return list(RunEvent.objects.filter(run_id=run_id).order_by("seq").values_list("type", flat=True))


@pytest.mark.django_db
@pytest.mark.parametrize("url", [messages_url, runs_url])
def test_it_rejects_an_unknown_on_active(api, conversation, url):
    response = api.post(
        url(conversation), {"content": "hi", "spec": {"skill": "echo"}, "on_active": "queue"}, format="json"
    )

    assert response.status_code == 400
    assert "on_active" in response.json()
    assert not Run.objects.exists()


@pytest.mark.worker
def test_reject_lets_exactly_one_of_concurrent_messages_in(worker, user, conversation):
    bodies = [{"content": f"m{n}", "spec": sleep(2), "on_active": "reject"} for n in range(4)]

    responses = post_at_once(user, messages_url(conversation), bodies)

    codes = sorted(r.status_code for r in responses)
    assert codes == [202, 409, 409, 409], [r.content for r in responses]
    (accepted,) = [r.json() for r in responses if r.status_code == 202]
    run_id = accepted["run"]["id"]
    assert accepted["on_active"] == {"policy": "reject", "outcome": "started", "waiting_for": None, "interrupted": []}
    for refused in (r.json() for r in responses if r.status_code == 409):
        assert refused["active_run"] == run_id
        assert f"active run ({run_id})" in refused["detail"]
    assert list(Run.objects.values_list("pk", flat=True)) == [run_id]  # nothing stored for the others
    assert Message.objects.filter(role=MessageRole.USER).count() == 1


@pytest.mark.worker
def test_enqueue_runs_concurrent_messages_one_after_another(worker, user, conversation):
    bodies = [{"content": f"m{n}", "spec": {"chain": [sleep(0.5), {"skill": "echo"}]}} for n in range(3)]

    responses = post_at_once(user, messages_url(conversation), bodies)

    assert [r.status_code for r in responses] == [202] * 3, [r.content for r in responses]
    admissions = sorted((r.json()["run"]["id"], r.json()["on_active"]) for r in responses)
    (first, _), (second, held2), (third, held3) = admissions
    assert (held2["outcome"], held2["waiting_for"]) == ("enqueued", first)  # in arrival order
    assert (held3["outcome"], held3["waiting_for"]) == ("enqueued", second)
    assert Run.objects.get(pk=third).waiting_for_id == second
    runs = [wait_for_run(Run.objects.get(pk=pk), timeout=30) for pk in (first, second, third)]
    assert [r.status for r in runs] == [RunStatus.SUCCEEDED] * 3
    for before, after in pairwise(runs):
        assert started_after(after, before)
        assert after.waiting_for_id is None  # released
        assert event_types(after.pk)[:3] == ["run.queued", "run.enqueued", "run.released"]
    replies = Message.objects.filter(role=MessageRole.ASSISTANT).order_by("pk")
    assert [m.run_id for m in replies] == [first, second, third]
    user_messages = Message.objects.filter(role=MessageRole.USER)
    assert sorted(user_messages.values_list("run_id", flat=True)) == [first, second, third]


@pytest.mark.worker
def test_interrupt_cancels_the_active_run_and_starts_the_new_one(worker, user, conversation, api):
    first = api.post(messages_url(conversation), {"content": "slow", "spec": sleep(30)}, format="json").json()
    slow_step = wait_until(lambda: Step.objects.filter(run_id=first["run"]["id"], status="running").first())
    wait_until(lambda: str(slow_step.task_id) in active_task_ids(), timeout=10)

    body = {"content": "never mind", "spec": {"skill": "echo"}, "on_active": "interrupt"}
    response = api.post(messages_url(conversation), body, format="json")

    assert response.status_code == 202, response.content
    assert response.json()["on_active"]["outcome"] == "interrupted"
    assert response.json()["on_active"]["interrupted"] == [first["run"]["id"]]
    old = Run.objects.get(pk=first["run"]["id"])
    assert old.status == RunStatus.CANCELLED
    assert f"interrupted by run {response.json()['run']['id']}" in old.error
    assert "run.interrupted" in event_types(old.pk)
    wait_until(lambda: str(slow_step.task_id) not in active_task_ids(), timeout=5)  # terminated
    new = wait_for_run(Run.objects.get(pk=response.json()["run"]["id"]))
    assert new.status == RunStatus.SUCCEEDED
    assert "run.interrupting" in event_types(new.pk)


@pytest.mark.worker
def test_concurrent_interrupts_leave_only_the_last_run(worker, user, conversation):
    spec = {"chain": [sleep(1), {"skill": "echo"}]}
    bodies = [{"content": f"m{n}", "spec": spec, "on_active": "interrupt"} for n in range(3)]

    responses = post_at_once(user, messages_url(conversation), bodies)

    assert [r.status_code for r in responses] == [202] * 3, [r.content for r in responses]
    ids = sorted(r.json()["run"]["id"] for r in responses)
    runs = [wait_for_run(Run.objects.get(pk=pk)) for pk in ids]
    assert [r.status for r in runs] == [RunStatus.CANCELLED, RunStatus.CANCELLED, RunStatus.SUCCEEDED]


@pytest.mark.worker
def test_a_workflows_policy_applies_unless_the_request_overrides_it(worker, user, conversation, api):
    workflow = WorkflowFactory.create(owner=user, spec=sleep(2), on_active=OnActive.REJECT)
    first = api.post(messages_url(conversation), {"content": "a", "workflow": workflow.name}, format="json")
    assert first.status_code == 202

    refused = api.post(messages_url(conversation), {"content": "b", "workflow": workflow.name}, format="json")
    override = {"content": "c", "workflow": workflow.name, "on_active": "enqueue"}
    enqueued = api.post(messages_url(conversation), override, format="json")

    assert refused.status_code == 409
    assert refused.json()["active_run"] == first.json()["run"]["id"]
    assert enqueued.status_code == 202
    assert enqueued.json()["on_active"]["policy"] == "enqueue"
    assert enqueued.json()["run"]["waiting_for"] == first.json()["run"]["id"]
    detail = api.get(f"/api/runs/{enqueued.json()['run']['id']}/").json()
    assert (detail["status"], detail["waiting_for"]) == ("queued", first.json()["run"]["id"])
    assert wait_for_run(Run.objects.get(pk=enqueued.json()["run"]["id"])).status == RunStatus.SUCCEEDED


@pytest.mark.django_db
def test_a_workflow_stores_its_policy(api):
    strict = {"name": "strict", "spec": {"skill": "echo"}, "on_active": "reject"}
    response = api.post("/api/workflows/", strict, format="json")
    bad = api.post("/api/workflows/", {**strict, "name": "lax", "on_active": "sometimes"}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["on_active"] == "reject"
    assert bad.status_code == 400
    assert "on_active" in bad.json()


@pytest.mark.worker
def test_post_runs_follows_the_policy_too(worker, user, conversation, api):
    first = api.post(runs_url(conversation), {"spec": sleep(2), "input": {"n": 1}}, format="json")
    refused = api.post(runs_url(conversation), {"spec": sleep(2), "on_active": "reject"}, format="json")
    queued = api.post(runs_url(conversation), {"spec": {"skill": "echo"}, "input": {"n": 2}}, format="json")

    assert first.status_code == 202
    assert first.json()["on_active"]["outcome"] == "started"
    assert (refused.status_code, refused.json()["active_run"]) == (409, first.json()["id"])
    assert queued.json()["on_active"]["outcome"] == "enqueued"
    done = wait_for_run(Run.objects.get(pk=queued.json()["id"]))
    assert (done.status, done.output) == (RunStatus.SUCCEEDED, {"n": 2})
    assert started_after(done, Run.objects.get(pk=first.json()["id"]))


@pytest.mark.worker
def test_an_idempotent_repeat_says_the_run_was_enqueued(worker, user, conversation, api):
    api.post(messages_url(conversation), {"content": "a", "spec": sleep(1)}, format="json")
    body = {"content": "b", "spec": {"skill": "echo"}}

    first = api.post(messages_url(conversation), body, format="json", HTTP_IDEMPOTENCY_KEY="k1")
    repeat = api.post(messages_url(conversation), body, format="json", HTTP_IDEMPOTENCY_KEY="k1")

    assert repeat.headers["Idempotent-Replayed"] == "true"
    assert repeat.json()["run"]["id"] == first.json()["run"]["id"]
    assert repeat.json()["on_active"]["outcome"] == first.json()["on_active"]["outcome"] == "enqueued"
    assert Run.objects.count() == 2


@pytest.mark.worker
def test_cancelling_a_held_run_moves_the_next_one_up(worker, user, conversation, api):
    ids = [api.post(runs_url(conversation), {"spec": sleep(1.5)}, format="json").json()["id"] for _ in range(3)]

    assert api.post(f"/api/runs/{ids[1]}/cancel/").status_code == 202

    assert wait_until(lambda: Run.objects.get(pk=ids[2]).waiting_for_id == ids[0])  # still one at a time
    first, last = (wait_for_run(Run.objects.get(pk=pk)) for pk in (ids[0], ids[2]))
    assert (first.status, last.status) == (RunStatus.SUCCEEDED, RunStatus.SUCCEEDED)
    assert started_after(last, first)


@pytest.mark.worker
def test_the_sweeper_leaves_held_runs_alone_and_releases_lost_ones(
    worker, user, conversation, api, settings, monkeypatch
):
    settings.RUN_STALL_AFTER = 0  # every run without a leased step looks stalled at once
    first = api.post(runs_url(conversation), {"spec": sleep(30)}, format="json").json()["id"]
    held = api.post(runs_url(conversation), {"spec": {"skill": "echo"}, "input": "later"}, format="json").json()["id"]
    running(first)
    wait_until(lambda: Step.objects.filter(run_id=first, status="running").exists())

    report = services.sweep()

    assert held not in report.resumed  # not stalled: held
    assert report.released == []
    assert Run.objects.get(pk=held).waiting_for_id == first

    # The predecessor ends but its release is lost (as if the process died after the commit).
    with monkeypatch.context() as patched:
        patched.setattr(double_texting, "release_after", lambda run_id: None)
        services.cancel_run(Run.objects.get(pk=first), by="test")
    assert Run.objects.get(pk=held).waiting_for_id == first

    assert services.sweep().released == [held]
    done = wait_for_run(Run.objects.get(pk=held))
    assert (done.status, done.output) == (RunStatus.SUCCEEDED, "later")
