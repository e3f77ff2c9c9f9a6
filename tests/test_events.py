"""Run events: numbered per run, streamed as Server-Sent Events of CloudEvents.

The streams are read over real HTTP from pytest-django's live server (a
threaded WSGI server, like gunicorn's gthread workers) while the session's
worker runs the steps, so live events cross Redis pub/sub.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from django.conf import settings
from django.utils import timezone

from orchestration import events
from orchestration.models import Run, RunEvent
from orchestration.services import start_run

from .conftest import wait_for_run
from .factories import token_for

pytestmark = pytest.mark.worker

STREAM_TIMEOUT = 30


def effect(id: str, seconds: float = 0) -> dict[str, Any]:
    return {"skill": "effect", "id": id, "args": {"seconds": seconds}}


@dataclass
class Received:
    """What one client read from a stream: its events, when each came, how it ended."""

    status: int = 0
    content_type: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)  # {"id": ..., "data": {...}}
    arrived: list[Any] = field(default_factory=list)
    closed: bool = False
    body: Any = None

    @property
    def ids(self) -> list[int]:
        return [int(event["id"]) for event in self.events]

    @property
    def types(self) -> list[str]:
        return [event["data"]["type"] for event in self.events]


def read_stream(url: str, user: Any, headers: dict[str, str] | None = None) -> Received:
    """GET an events stream and parse it (SSE: fields per line, a blank line ends an event)."""
    headers = {"Authorization": f"Token {token_for(user)}", "Accept": "text/event-stream", **(headers or {})}
    received = Received()
    with requests.get(url, headers=headers, stream=True, timeout=STREAM_TIMEOUT) as response:
        received.status, received.content_type = response.status_code, response.headers.get("Content-Type", "")
        if response.status_code != 200:
            received.body = response.json()
            return received
        fields: dict[str, str] = {}
        for raw in response.iter_lines(chunk_size=1):  # each byte as it comes
            line = raw.decode()
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            if "data" in fields:
                received.events.append({"id": fields.get("id"), "data": json.loads(fields["data"])})
                received.arrived.append(timezone.now())
            fields = {}
        received.closed = True
    return received


def events_url(live_server: Any, run: Run) -> str:
    return f"{live_server.url}/api/runs/{run.pk}/events/"


def test_a_runs_events_stream_as_cloudevents_numbered_from_one_and_end_after_the_run(worker, user, live_server):
    run = start_run(owner=user, spec={"chain": [effect("a", 0.2), effect("b", 0.2)]}, input="hi")

    received = read_stream(events_url(live_server, run), user)

    run = wait_for_run(run)
    stored = list(run.events.order_by("seq").values_list("seq", "type"))
    assert (received.status, received.content_type) == (200, "text/event-stream")
    assert received.closed
    assert received.ids == [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
    assert received.types == [f"agentsite.{type}" for _, type in stored]
    assert received.types[-1] == "agentsite.run.succeeded"
    first, step_event = received.events[0]["data"], received.events[2]["data"]
    assert first["specversion"] == "1.0"
    assert first["source"] == f"/api/runs/{run.pk}/"
    assert first["subject"] == str(run.pk)
    assert first["id"] == f"{run.pk}-1"
    assert first["time"]
    assert first["data"]["run_id"] == run.pk
    assert step_event["type"] == "agentsite.step.running"
    assert step_event["data"]["step"]["key"] == "a"


def test_two_clients_see_the_same_events_live(worker, user, live_server):
    run = start_run(owner=user, spec={"chain": [effect("a", 1), effect("b", 1)]})
    results: list[Received] = []
    clients = [
        threading.Thread(target=lambda: results.append(read_stream(events_url(live_server, run), user)))
        for _ in range(2)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(STREAM_TIMEOUT + 5)

    run = wait_for_run(run)
    assert len(results) == 2
    first, second = results
    assert first.closed
    assert second.closed
    assert first.events == second.events
    assert first.types[-1] == "agentsite.run.succeeded"
    # Live: both had the first step's events while the run still had a second to go.
    for received in results:
        assert received.arrived[received.types.index("agentsite.step.succeeded")] < run.finished_at


def test_a_stream_resumes_after_last_event_id(worker, user, live_server):
    run = wait_for_run(start_run(owner=user, spec={"chain": [effect("a"), effect("b")]}))
    everything = read_stream(events_url(live_server, run), user)

    resumed = read_stream(events_url(live_server, run), user, headers={"Last-Event-ID": "3"})
    by_query = read_stream(events_url(live_server, run) + "?after=3", user)

    assert resumed.ids == by_query.ids == everything.ids[3:]
    assert resumed.events == everything.events[3:]
    assert resumed.closed


def test_a_stream_resumed_after_a_finished_runs_last_event_ends_at_once(worker, user, live_server):
    run = wait_for_run(start_run(owner=user, spec={"chain": [effect("a")]}))
    last = run.events.order_by("-seq").values_list("seq", flat=True).first()
    started = time.monotonic()

    resumed = read_stream(events_url(live_server, run), user, headers={"Last-Event-ID": str(last)})

    assert resumed.closed
    assert resumed.events == []
    assert time.monotonic() - started < settings.EVENTS_KEEPALIVE_SECONDS  # not held with keepalives


def test_a_bad_last_event_id_is_a_400_that_names_it(worker, user, live_server):
    run = wait_for_run(start_run(owner=user, spec=effect("a")))

    received = read_stream(events_url(live_server, run), user, headers={"Last-Event-ID": "seven"})

    assert received.status == 400
    assert received.body == {"Last-Event-ID": ["must be an event id (a whole number >= 0), not 'seven'"]}


def test_another_users_run_has_no_events_for_you(worker, user, other_user, live_server):
    run = wait_for_run(start_run(owner=user, spec=effect("a")))

    assert read_stream(events_url(live_server, run), other_user).status == 404
    assert requests.get(events_url(live_server, run), timeout=5).status_code == 401


def test_streams_beyond_the_per_process_limit_get_a_503(worker, user, live_server, settings):
    run = start_run(owner=user, spec=effect("slow", 3))
    streams = [
        requests.get(
            events_url(live_server, run),
            headers={"Authorization": f"Token {token_for(user)}"},
            stream=True,
            timeout=STREAM_TIMEOUT,
        )
        for _ in range(settings.EVENTS_MAX_STREAMS)
    ]
    try:
        extra = requests.get(
            events_url(live_server, run), headers={"Authorization": f"Token {token_for(user)}"}, timeout=5
        )
        assert extra.status_code == 503
        assert "retry" in extra.json()["detail"]
        assert extra.headers["Retry-After"] == "2"
    finally:
        for stream in streams:
            stream.close()
    wait_for_run(run)
    # The slots come back once the streams are closed.
    deadline = time.monotonic() + 10
    while read_stream(events_url(live_server, run), user).status == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert read_stream(events_url(live_server, run), user).status == 200


def test_a_chords_events_are_numbered_without_gaps_in_commit_order(worker, user):
    header = [effect(f"h{n}", 0.1) for n in range(8)]
    run = wait_for_run(start_run(owner=user, spec={"chord": {"header": header, "body": effect("body")}}))

    seqs = list(RunEvent.objects.filter(run=run).order_by("id").values_list("seq", flat=True))

    assert run.status == "succeeded"
    assert sorted(seqs) == list(range(1, len(seqs) + 1))
    assert seqs == sorted(seqs)  # taken in the order the events were written
    assert run.last_event_seq == len(seqs)


def test_a_runs_events_are_announced_only_while_a_stream_watches_it():
    run_id = 2_000_000_001  # announcing needs no run
    listener = events._redis().pubsub(ignore_subscribe_messages=True)
    listener.subscribe(events.channel(run_id))

    def announced(seq: int) -> bool:
        events.announce(run_id, seq)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            if (message := listener.get_message(timeout=0.1)) is not None:
                return int(message["data"]) == seq
        return False

    try:
        # A stream that ended long ago (its entry expired) watches nothing; the next stream clears it away.
        events._redis().zadd(events.WATCHED, {f"{run_id}:gone": time.time() - 1})
        time.sleep(events.WATCH_GRACE)
        assert not announced(1)

        stream, watch = events._subscribe(run_id)
        assert events._redis().zscore(events.WATCHED, f"{run_id}:gone") is None
        time.sleep(events.WATCH_GRACE)  # every process's copy of the watched runs has it by now
        assert announced(2)

        stream.close()
        events._unwatch(watch)
        time.sleep(events.WATCH_GRACE)
        assert not announced(3)
    finally:
        listener.close()


def test_an_announcement_a_fresh_copy_of_the_watched_runs_leaves_out_wakes_no_thread(monkeypatch):
    run_id = 2_000_000_002
    handed: list[tuple[int, int]] = []
    monkeypatch.setattr(events, "_announcements", lambda: SimpleNamespace(put=handed.append))

    events._watched.now()  # a copy read just now, without the run
    events.announce(run_id, 1)
    monkeypatch.setattr(events._watched, "_copy", (time.monotonic() - 2 * events.WATCHED_MAX_AGE, frozenset()))
    events.announce(run_id, 2)  # too old a copy to decide on: the publisher thread reads WATCHED again
    monkeypatch.setattr(events._watched, "_copy", (time.monotonic(), frozenset({run_id})))
    events.announce(run_id, 3)

    assert handed == [(run_id, 2), (run_id, 3)]
