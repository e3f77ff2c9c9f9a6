"""Run events as a live stream: CloudEvents over Server-Sent Events.

A committed event is announced on its run's Redis channel when a stream watches the
run (WATCHED); a stream subscribes before it reads the stored events, and is a bounded
sync response. See docs/design.md, "Changes from the shared contract" (Run events).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from functools import cache
from typing import Any, cast

import redis
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from django.conf import settings

from .models import RunEvent

log = logging.getLogger(__name__)

# The run's last event when it ended; a stream closes after it.
TERMINAL_EVENT_TYPES = frozenset({"run.succeeded", "run.failed", "run.cancelled"})
# How long a stream waits between database reads while Redis cannot announce.
FALLBACK_POLL_SECONDS = 1.0
RECONNECT_MS = 1000
# The streams open now: members "<run id>:<stream>", scored by when the entry
# expires (Unix time), a while after the stream's own end, so a web process
# that died leaves nothing behind for long.
WATCHED = "agentsite:run-events:watched"
WATCHED_MAX_AGE = 0.1  # seconds: how old a process's copy of WATCHED may be when it announces
# Seconds a new stream reads the database again without waiting for announcements:
# longer than a process's copy of WATCHED may be old, with room for the announcing thread's delay.
WATCH_GRACE = 2.5 * WATCHED_MAX_AGE
WATCH_EXPIRES_AFTER_STREAM = 60
# Announcements published in one round trip at most.
PUBLISH_BATCH = 100

_slots = threading.BoundedSemaphore(settings.EVENTS_MAX_STREAMS)


def channel(run_id: int) -> str:
    return f"agentsite:run-events:{run_id}"


@cache
def _redis() -> redis.Redis:
    # One client per process; redis-py's pool reconnects after a fork.
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)


def announce(run_id: int, seq: int) -> None:
    """Tell the run's streams that event ``seq`` is committed; best effort, without waiting for Redis.

    Dropped at once when this process's fresh copy of WATCHED leaves the run out, else queued for the publisher thread.
    """
    if _watched.leaves_out(run_id):
        return
    _announcements().put((run_id, seq))


_pending: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
_publisher_pid = 0  # the process whose publisher thread serves _pending
_publisher_lock = threading.Lock()


def _announcements() -> queue.SimpleQueue[tuple[int, int]]:
    global _pending, _publisher_pid
    if _publisher_pid != os.getpid():  # the first announcement in this process, or in a forked child
        with _publisher_lock:
            if _publisher_pid != os.getpid():
                _pending = queue.SimpleQueue()
                threading.Thread(target=_publish, args=(_pending,), name="agentsite-events", daemon=True).start()
                _publisher_pid = os.getpid()
    return _pending


def _publish(pending: queue.SimpleQueue[tuple[int, int]]) -> None:
    """Publish the watched runs' announcements as they come, those queued meanwhile in one round trip."""
    while True:
        batch = [pending.get()]
        while len(batch) < PUBLISH_BATCH and not pending.empty():
            batch.append(pending.get())
        try:
            runs = _watched.now()
            batch = [(run_id, seq) for run_id, seq in batch if run_id in runs]
            if not batch:
                continue
            with _redis().pipeline(transaction=False) as pipe:
                for run_id, seq in batch:
                    pipe.publish(channel(run_id), seq)
                pipe.execute()
        except redis.RedisError as exc:
            log.debug("%d run event announcements lost: %r", len(batch), exc)


class WatchedRuns:
    """A process's copy of the runs the streams watch (WATCHED), read again once older than WATCHED_MAX_AGE.

    Only the publisher thread reads it again (``now``); any thread may look (``leaves_out``).
    """

    def __init__(self) -> None:
        # The copy and when it was asked for, replaced together as one tuple: any thread may read it.
        self._copy: tuple[float, frozenset[int]] = (float("-inf"), frozenset())

    def now(self) -> frozenset[int]:
        """The watched runs as of at most WATCHED_MAX_AGE ago (as of when the read was sent)."""
        asked_at = time.monotonic()
        last_asked_at, runs = self._copy
        if asked_at - last_asked_at > WATCHED_MAX_AGE:
            members = cast(list[bytes], _redis().zrangebyscore(WATCHED, time.time(), "+inf"))
            runs = frozenset(int(member.split(b":", 1)[0]) for member in members)
            self._copy = (asked_at, runs)
        return runs

    def leaves_out(self, run_id: int) -> bool:
        """Whether the copy is no older than WATCHED_MAX_AGE and ``run_id`` is not in it (no read of Redis)."""
        asked_at, runs = self._copy
        return time.monotonic() - asked_at <= WATCHED_MAX_AGE and run_id not in runs


# This process's copy (a forked child's starts from its parent's, as fresh as it was).
_watched = WatchedRuns()


def cloudevent(event: RunEvent) -> CloudEvent:
    """The CloudEvents 1.0 envelope of a stored event."""
    attributes = {
        "type": f"agentsite.{event.type}",
        "source": f"/api/runs/{event.run_id}/",
        "id": f"{event.run_id}-{event.seq}",
        "time": event.created_at,
        "subject": str(event.run_id),
        "datacontenttype": "application/json",
    }
    step = {"id": event.step.pk, "key": event.step.key} if event.step is not None else None
    return CloudEvent(attributes, {"run_id": event.run_id, "seq": event.seq, "step": step, **event.data})


def sse_message(event: RunEvent) -> str:
    """One Server-Sent Event: ``id`` is the event's seq, ``data`` its CloudEvent JSON."""
    return f"id: {event.seq}\ndata: {JSONFormat().write(cloudevent(event)).decode()}\n\n"


def events_after(run_id: int, seq: int) -> list[RunEvent]:
    return list(RunEvent.objects.filter(run_id=run_id, seq__gt=seq).select_related("step").order_by("seq"))


class NoStreamSlot(Exception):
    """This web process already serves EVENTS_MAX_STREAMS streams."""


class EventStream:
    """The body of one events response: an iterator of SSE messages.

    Holds one of the process's stream slots from creation until Django closes it (``close``), iterated or not.
    """

    def __init__(self, run_id: int, after: int) -> None:
        if not _slots.acquire(blocking=False):
            raise NoStreamSlot()
        self._released = False
        self._messages = _stream(run_id, after)

    def __iter__(self) -> Iterator[str]:
        return self._messages

    def close(self) -> None:
        self._messages.close()
        if not self._released:
            self._released = True
            _slots.release()


def _stream(run_id: int, after: int) -> Generator[str, None, None]:
    yield f"retry: {RECONNECT_MS}\n\n"
    if after and _ended_by(run_id, after):
        return  # a client resuming after the run's last event: nothing more will come
    announcements, watch = _subscribe(run_id)
    started = time.monotonic()
    deadline, announced_from = started + settings.EVENTS_STREAM_SECONDS, started + WATCH_GRACE
    try:
        while True:
            for event in events_after(run_id, after):
                yield sse_message(event)
                after = event.seq
                if event.type in TERMINAL_EVENT_TYPES and not events_after(run_id, after):
                    return
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                return
            if now < announced_from:  # an event committed so far may not have been announced to this stream
                _wait(announcements, min(left, announced_from - now))
            elif not _wait(announcements, min(left, settings.EVENTS_KEEPALIVE_SECONDS)):
                yield ": keepalive\n\n"
    finally:
        if announcements is not None:
            announcements.close()
            _unwatch(watch)


def _ended_by(run_id: int, seq: int) -> bool:
    """Whether the run's latest event is at or before ``seq`` and ended the run."""
    latest = RunEvent.objects.filter(run_id=run_id).order_by("-seq").values_list("seq", "type").first()
    return latest is not None and latest[0] <= seq and latest[1] in TERMINAL_EVENT_TYPES


def _subscribe(run_id: int) -> tuple[Any, str]:
    """Subscribe to the run's announcements, then watch the run (WATCHED); (None, "") if Redis cannot."""
    pubsub = _redis().pubsub(ignore_subscribe_messages=True)
    watch = f"{run_id}:{uuid.uuid4().hex}"
    now = time.time()
    try:
        pubsub.subscribe(channel(run_id))
        with _redis().pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(WATCHED, "-inf", now)  # the entries of streams long gone
            pipe.zadd(WATCHED, {watch: now + settings.EVENTS_STREAM_SECONDS + WATCH_EXPIRES_AFTER_STREAM})
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("run %s: events stream without announcements (Redis: %r); polling", run_id, exc)
        pubsub.close()
        return None, ""
    return pubsub, watch


def _unwatch(watch: str) -> None:
    try:
        _redis().zrem(WATCHED, watch)
    except redis.RedisError as exc:  # the entry expires by itself
        log.debug("events stream %s not unwatched: %r", watch, exc)


def _wait(announcements: Any, seconds: float) -> bool:
    """Wait up to ``seconds`` for an announcement; False if none came."""
    if announcements is None:
        time.sleep(min(seconds, FALLBACK_POLL_SECONDS))
        return True
    deadline = time.monotonic() + seconds
    try:
        # None is a timeout, or the subscription's own confirmation (skipped).
        while (left := deadline - time.monotonic()) > 0:
            if announcements.get_message(timeout=left) is not None:
                while announcements.get_message(timeout=0) is not None:
                    pass  # several announcements: one read of the database serves them all
                return True
    except redis.RedisError:
        time.sleep(min(left, FALLBACK_POLL_SECONDS))
        return True
    return False
