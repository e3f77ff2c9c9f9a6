"""Completion webhooks, against a real HTTP receiver on loopback and the session's worker."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from typing import Any

import pytest
from django.utils import timezone

from agentsite import outbound
from orchestration import webhooks
from orchestration.models import Conversation, Run, WebhookDelivery
from orchestration.services import start_run

from .conftest import wait_for_run, wait_until

pytestmark = pytest.mark.worker

SECRET = "test-webhook-secret"  # pyproject.toml's WEBHOOK_SECRET for the tests and their worker


@dataclass
class Receiver:
    """An HTTP server that records each POST and answers with the next of ``answers`` (then 200)."""

    answers: list[int] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def record(self, headers: dict[str, str], body: bytes) -> int:
        self.received.append({"headers": headers, "body": body, "at": timezone.now()})
        return self.answers.pop(0) if self.answers else 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = state.record(dict(self.headers), body)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"thanks" if status < 300 else b"try later")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/agentsite"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def start_via_api(api: Any, conversation: Conversation, **body: Any) -> Run:
    response = api.post(f"/api/conversations/{conversation.pk}/runs/", body, format="json")
    assert response.status_code == 202, response.data
    return Run.objects.get(pk=response.data["id"])


def verify(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does with the Agentsite-Signature header."""
    parts = dict(part.split("=", 1) for part in headers[webhooks.SIGNATURE_HEADER].split(","))
    expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


def delivery_of(run: Run, status: str) -> WebhookDelivery:
    return wait_until(lambda: run.webhook_deliveries.filter(status=status).first())


def test_a_run_that_ends_posts_a_signed_cloudevent_to_its_webhook(worker, user, api, receiver):
    conversation = Conversation.objects.create(owner=user)

    run = wait_for_run(start_via_api(api, conversation, spec={"skill": "echo"}, input="hi", webhook=receiver.url))

    delivery = delivery_of(run, "delivered")
    [request] = receiver.received
    event = json.loads(request["body"])
    assert request["headers"]["Content-Type"] == "application/cloudevents+json"
    assert verify(request["headers"], request["body"])
    assert event["specversion"] == "1.0"
    assert event["type"] == "agentsite.run.succeeded"
    assert event["source"] == f"/api/runs/{run.pk}/"
    assert event["subject"] == str(run.pk)
    assert event["id"] == f"{run.pk}-{run.last_event_seq}" == delivery.event_id
    assert event["data"]["output"] == "hi"
    assert event["data"]["status"] == "succeeded"
    assert (delivery.attempts, delivery.response_status, delivery.url) == (1, 200, receiver.url)


def test_a_failing_receiver_gets_the_same_event_again_with_backoff(worker, user, receiver):
    receiver.answers = [500, 502]
    run = wait_for_run(start_run(owner=user, spec={"skill": "fail"}, webhook_url=receiver.url))

    delivery = delivery_of(run, "delivered")

    assert run.status == "failed"
    assert len(receiver.received) == 3
    assert len({request["body"] for request in receiver.received}) == 1  # the same bytes, the same event id
    assert json.loads(receiver.received[0]["body"])["type"] == "agentsite.run.failed"
    assert all(verify(request["headers"], request["body"]) for request in receiver.received)
    gaps = [(b["at"] - a["at"]).total_seconds() for a, b in pairwise(receiver.received)]
    assert gaps[0] >= 0.5  # backoff: ~1 s, then ~2 s (jittered down to half)
    assert gaps[1] >= 1.0
    assert (delivery.attempts, delivery.response_status, delivery.error) == (3, 200, "")


def test_a_receiver_that_keeps_failing_leaves_a_failed_delivery_that_says_why(worker, user, receiver):
    receiver.answers = [503] * 10
    run = wait_for_run(start_run(owner=user, spec={"skill": "echo"}, webhook_url=receiver.url))

    delivery = delivery_of(run, "failed")

    assert delivery.attempts == 3  # WEBHOOK_MAX_ATTEMPTS for the tests
    assert delivery.error == "gave up after 3 attempts: HTTP 503: try later"
    assert len(receiver.received) == 3


def test_a_run_takes_its_conversations_webhook_unless_it_names_one(worker, user, api, receiver):
    response = api.post("/api/conversations/", {"title": "hooked", "webhook_url": receiver.url}, format="json")
    assert response.status_code == 201, response.data
    conversation = Conversation.objects.get(pk=response.data["id"])

    inherited = wait_for_run(start_via_api(api, conversation, spec={"skill": "echo"}))
    own = wait_for_run(start_via_api(api, conversation, spec={"skill": "echo"}, webhook=receiver.url + "?own=1"))

    assert inherited.webhook_url == receiver.url
    assert own.webhook_url == receiver.url + "?own=1"
    delivery_of(inherited, "delivered")
    delivery_of(own, "delivered")


def test_the_sweeper_sends_a_delivery_whose_message_was_lost(worker, user, receiver, settings):
    run = wait_for_run(start_run(owner=user, spec={"skill": "echo"}))
    lost = WebhookDelivery.objects.create(
        run=run,
        url=receiver.url,
        event_id=f"{run.pk}-99",
        body='{"lost": true}',
        next_attempt_at=timezone.now() - timedelta(seconds=settings.WEBHOOK_STALL_AFTER + 1),
    )

    assert webhooks.resume_lost(timezone.now()) == [lost.pk]

    wait_until(lambda: WebhookDelivery.objects.filter(pk=lost.pk, status="delivered").exists())
    assert receiver.received[0]["body"] == b'{"lost": true}'


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9/hook", "resolves to 127.0.0.1, which is not a public address"),
        ("http://10.1.2.3/hook", "resolves to 10.1.2.3, which is not a public address"),
        ("http://[::1]/hook", "resolves to ::1, which is not a public address"),
        ("http://user:pw@example.com/hook", "the URL must not carry credentials"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_a_webhook_to_where_the_server_may_not_call_is_a_400_that_says_why(api, user, settings, url, why):
    settings.OUTBOUND_ALLOW_PRIVATE = False
    conversation = Conversation.objects.create(owner=user)

    response = api.post(
        f"/api/conversations/{conversation.pk}/runs/", {"spec": {"skill": "echo"}, "webhook": url}, format="json"
    )

    assert response.status_code == 400
    assert why in response.data["webhook"][0]
    assert not Run.objects.exists()


@pytest.mark.django_db
def test_a_webhook_is_refused_when_the_server_has_no_webhook_secret(api, user, settings):
    settings.WEBHOOK_SECRET = ""
    conversation = Conversation.objects.create(owner=user)

    response = api.post(
        f"/api/conversations/{conversation.pk}/runs/",
        {"spec": {"skill": "echo"}, "webhook": "http://127.0.0.1:9/"},
        format="json",
    )

    assert response.status_code == 400
    assert response.data["webhook"] == ["webhooks are not enabled on this server (WEBHOOK_SECRET is not set)"]


def test_outbound_calls_refuse_other_schemes_and_do_not_follow_redirects(settings):
    settings.OUTBOUND_ALLOW_PRIVATE = False
    with pytest.raises(outbound.UnsafeURL, match="only http and https"):
        outbound.check_url("file:///etc/passwd")
    with pytest.raises(outbound.UnsafeURL, match="not a public address"):
        outbound.post("http://169.254.169.254/latest/meta-data/", b"{}", {}, timeout=1)
