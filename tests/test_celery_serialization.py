"""Workers read JSON only: a pickled message, which could run any code as it is read, is dropped unread."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from kombu import Producer

from agentsite.celery import app
from orchestration.services import start_run
from orchestration.tasks import run_step

from .conftest import WORKER_LOG, Worker, wait_for_run, wait_until
from .factories import StepFactory

pytestmark = pytest.mark.worker

QUEUE = "default"
NO_RETRY = {"max": 0, "backoff": 1.0, "backoff_max": 60}


class CreatesFile:
    """Unpickling one creates ``path``: the code a pickled message could run in a worker that read it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def publish_pickled(body: Any) -> None:
    """A kombu message of ``body`` in pickle (application/x-python-serialize) on the queue the worker consumes."""
    queue = app.amqp.queues[QUEUE]
    with app.connection_for_write() as connection:
        producer = Producer(connection, exchange=queue.exchange, routing_key=queue.routing_key)
        producer.publish(body, serializer="pickle", declare=[queue])


def took_everything(worker: Worker) -> bool:
    """The queue is empty, no message waits for its acknowledgement, and the worker runs nothing."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    active = app.control.inspect(destination=[worker.name], limit=1, timeout=1).active() or {}
    return broker.llen(QUEUE) == 0 and broker.hlen("unacked") == 0 and not any(active.values())


def test_the_pickled_payload_creates_its_file_when_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    pickle.loads(pickle.dumps(CreatesFile(marker)))  # what the worker must never do

    assert marker.exists()


def test_a_pickled_message_is_dropped_unread_and_the_worker_goes_on(worker, user, tmp_path):
    marker = tmp_path / "unpickled"

    publish_pickled(CreatesFile(marker))
    wait_until(lambda: took_everything(worker))

    after = wait_for_run(start_run(owner=user, spec={"skill": "echo", "args": {"value": "after"}}))
    assert after.status == "succeeded"
    assert not marker.exists()
    assert worker.process.poll() is None
    assert "Refusing to deserialize untrusted content of type pickle" in WORKER_LOG.read_text()


def test_a_pickled_run_step_message_does_not_run_its_step(worker, tmp_path):
    marker = tmp_path / "unpickled"
    step = StepFactory.create(args={"value": "ran"})
    kwargs = {"step_id": step.pk, "retry": NO_RETRY, "finishes_run": True}

    run_step.apply_async(args=(CreatesFile(marker),), kwargs=kwargs, serializer="pickle", queue=QUEUE)
    wait_until(lambda: took_everything(worker))

    step.refresh_from_db()
    assert (step.status, step.attempts) == ("pending", 0)
    assert not marker.exists()
    assert "Received invalid task message: Refusing to deserialize untrusted content" in WORKER_LOG.read_text()
    # The same message in JSON runs the step: the pickled one was refused for its serializer alone.
    run_step.apply_async(args=({},), kwargs=kwargs, serializer="json", queue=QUEUE)
    assert wait_for_run(step.run).status == "succeeded"
    step.refresh_from_db()
    assert (step.status, step.output, step.attempts) == ("succeeded", "ran", 1)
