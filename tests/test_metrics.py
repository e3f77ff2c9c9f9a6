"""GET /metrics: counts of runs and steps from every process, queue gauges read from Redis, and who may scrape.

Runs cross the session's real prefork worker, whose pool processes count
into the same directory as this process. Counters add up over the session,
so each test compares a scrape taken after its runs with one taken before.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any

import pytest
import redis
from django.db import transaction
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from agentsite import metrics
from agentsite.celery import app
from orchestration import broker, transitions
from orchestration.models import RunStatus, StepStatus
from orchestration.services import start_run
from skills.registry import registry

from .conftest import wait_for_run, wait_until
from .factories import RunFactory, WorkflowFactory

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

IDLE_QUEUE = "metrics-test-idle"  # no worker consumes it


def scrape(client: Any, **extra: Any) -> Samples:
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape_once_counted(client: Any, before: Samples, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until the worker's count shows (it counts just after the commit this test waited for)."""

    def counted() -> Samples | None:
        samples = scrape(client)
        return samples if grew(before, samples, name, **labels) >= expected else None

    return wait_until(counted)


@pytest.mark.worker
def test_it_counts_runs_and_steps_that_crossed_the_worker(client, worker, user):
    workflow = WorkflowFactory.create(spec={"chain": [{"skill": "echo", "id": "a"}, {"skill": "echo", "id": "b"}]})
    before = scrape(client)

    named = wait_for_run(start_run(owner=user, spec=workflow.spec, workflow=workflow))
    adhoc = wait_for_run(start_run(owner=user, spec={"chain": [{"skill": "echo"}, {"skill": "fail"}]}))
    after = scrape_once_counted(client, before, "agentsite_runs_finished_total", 1, workflow="adhoc", status="failed")

    assert (named.status, adhoc.status) == (RunStatus.SUCCEEDED, RunStatus.FAILED)
    assert grew(before, after, "agentsite_runs_started_total", workflow=workflow.name) == 1
    assert grew(before, after, "agentsite_runs_started_total", workflow="adhoc") == 1
    assert grew(before, after, "agentsite_runs_finished_total", workflow=workflow.name, status="succeeded") == 1
    assert grew(before, after, "agentsite_runs_finished_total", workflow="adhoc", status="failed") == 1
    assert grew(before, after, "agentsite_steps_finished_total", skill="echo", status="succeeded") == 3
    assert grew(before, after, "agentsite_steps_finished_total", skill="fail", status="failed") == 1
    assert grew(before, after, "agentsite_step_duration_seconds_count", skill="echo") == 3
    assert grew(before, after, "agentsite_step_duration_seconds_bucket", skill="echo", le="+Inf") == 3
    assert grew(before, after, "agentsite_step_duration_seconds_sum", skill="echo") > 0


@pytest.mark.worker
def test_it_counts_retries_and_timeouts(client, worker, user):
    spec = {
        "chain": [
            {"skill": "flaky", "args": {"failures": 2}, "retries": 2},
            {"skill": "sleep", "args": {"seconds": 5}, "soft_time_limit": 0.5, "time_limit": 3},
        ]
    }
    before = scrape(client)

    run = wait_for_run(start_run(owner=user, spec=spec))
    after = scrape_once_counted(client, before, "agentsite_steps_finished_total", 1, skill="sleep", status="timed_out")

    assert run.status == RunStatus.FAILED
    assert grew(before, after, "agentsite_step_retries_total", skill="flaky") == 2
    assert grew(before, after, "agentsite_steps_finished_total", skill="flaky", status="succeeded") == 1
    assert grew(before, after, "agentsite_step_timeouts_total", skill="sleep") == 1
    assert grew(before, after, "agentsite_step_duration_seconds_count", skill="sleep") == 1


@pytest.mark.worker
def test_no_label_holds_an_id(client, worker, user):
    workflow = WorkflowFactory.create(
        spec={"chain": [{"skill": "echo"}, {"group": [{"skill": "echo"}, {"skill": "fail"}]}]}
    )
    before = scrape(client)
    runs = [wait_for_run(start_run(owner=user, spec=workflow.spec, workflow=workflow)) for _ in range(2)]
    after = scrape_once_counted(
        client, before, "agentsite_runs_finished_total", 2, workflow=workflow.name, status="failed"
    )

    ids = {str(run.pk) for run in runs}
    ids |= {str(i) for run in runs for step in run.steps.all() for i in (step.pk, step.task_id)}
    statuses = {*RunStatus.values, *StepStatus.values}
    for name, labels in after:
        if not name.startswith("agentsite_"):
            continue
        found = dict(labels)
        assert set(found) <= {"workflow", "status", "skill", "queue", "le", "result"}, name
        assert found.get("result", "miss") in {"l1", "l2", "miss"}  # the skill cache's lookups
        assert not set(found.values()) & ids, (name, found)
        assert found.get("status", "succeeded") in statuses
        assert registry.get(found.get("skill", "echo")) is not None
        assert found.get("queue", "default") in broker.queues()
    changed = {dict(labels).get("workflow") for (name, labels), v in after.items() if v != before.get((name, labels))}
    assert changed - {None} == {workflow.name}


def test_a_transition_rolled_back_is_not_counted(client, transactional_db):
    workflow = WorkflowFactory.create()
    run = RunFactory.create(workflow=workflow)
    before = scrape(client)

    with transaction.atomic():
        transitions.fail_run(run.pk, "rolled back")
        transaction.set_rollback(True)
    rolled_back = scrape(client)
    transitions.fail_run(run.pk, "committed")
    committed = scrape(client)

    labels = {"workflow": workflow.name, "status": "failed"}
    assert grew(before, rolled_back, "agentsite_runs_finished_total", **labels) == 0
    assert grew(before, committed, "agentsite_runs_finished_total", **labels) == 1


@pytest.fixture
def idle_queue(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A queue /metrics watches and no worker consumes; emptied afterwards."""
    monkeypatch.setattr(broker, "queues", lambda: ["default", IDLE_QUEUE])
    client = redis.Redis.from_url(app.conf.broker_url)
    client.delete(IDLE_QUEUE)
    yield client
    client.delete(IDLE_QUEUE)


def test_it_shows_the_depth_of_a_queue_and_the_age_of_its_oldest_message(client, idle_queue):
    empty = scrape(client)
    assert empty[("agentsite_queue_messages", frozenset({("queue", IDLE_QUEUE)}))] == 0
    assert empty[("agentsite_queue_oldest_message_age_seconds", frozenset({("queue", IDLE_QUEUE)}))] == 0

    published = time.time()
    for _ in range(3):
        app.send_task("agentsite.metrics-test", queue=IDLE_QUEUE)
    time.sleep(1.5)
    samples = scrape(client)
    waited = time.time() - published

    assert value(samples, "agentsite_broker_up") == 1
    assert value(samples, "agentsite_queue_messages", queue=IDLE_QUEUE) == 3
    assert 1.5 <= value(samples, "agentsite_queue_oldest_message_age_seconds", queue=IDLE_QUEUE) <= waited
    assert ("agentsite_broker_unacked_messages", frozenset()) in samples


def test_a_broker_outage_leaves_the_queue_gauges_out(client, settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"  # nothing listens there

    samples = scrape(client)

    assert value(samples, "agentsite_broker_up") == 0
    assert not {name for name, _ in samples if re.match("agentsite_(queue|broker_unacked)", name)}


def test_it_answers_loopback_without_a_token(client):
    assert client.get("/metrics").status_code == 200  # the test client comes from 127.0.0.1


def test_it_refuses_other_networks_without_the_token(client, settings):
    settings.METRICS_TOKEN = "s3cret"
    outside = {"REMOTE_ADDR": "203.0.113.7"}

    assert client.get("/metrics", **outside).status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong", **outside).status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Token s3cret", **outside).status_code == 403
    assert scrape(client, HTTP_AUTHORIZATION="Bearer s3cret", **outside)


def test_it_refuses_everyone_without_a_token_when_no_network_is_allowed(client, settings):
    settings.METRICS_ALLOWED_NETWORKS = []

    response = client.get("/metrics")

    assert response.status_code == 403
    assert b"agentsite" not in response.content


def test_a_process_that_starts_deletes_the_files_of_its_own_role_only(tmp_path, settings, monkeypatch):
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)  # restored after the test
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    settings.PROMETHEUS_MULTIPROC_DIR = str(tmp_path)
    names = ["counter_web-1.db", "histogram_web-2.db", "counter_webby-3.db", "counter_worker-w1@h-4.db"]
    for name in names:
        (tmp_path / name).touch()

    metrics.start_process("web")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["counter_webby-3.db", "counter_worker-w1@h-4.db"]
