"""``GET /metrics``: Prometheus metrics of every web and worker process of this machine, and of the queues.

Each process counts into files of PROMETHEUS_MULTIPROC_DIR; a scrape adds them up, with what the apps read at
scrape time (``read_at_scrape``: the queues, the circuit breakers). Open to METRICS_ALLOWED_NETWORKS and to
``Authorization: Bearer <METRICS_TOKEN>``, else 403 (docs/operations.md, "Metrics").
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry, exposition, multiprocess, values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Socket connect and read timeouts for the broker, per scrape.
BROKER_TIMEOUT = 1.0
# Where kombu's Redis transport keeps the messages workers took and have not
# acknowledged (its default; agentsite sets no other).
UNACKED_KEY = "unacked"
# The message header that says when it was published (Unix time): the queue age gauge reads it.
PUBLISHED_HEADER = "agentsite_published"

# Collectors made anew for each scrape (``read_at_scrape``).
_read_at_scrape: list[Callable[[], Collector]] = []


def read_at_scrape(make: Callable[[], Collector]) -> None:
    """Add ``make()``'s collector to every scrape; called by the apps in their ready()."""
    _read_at_scrape.append(make)


def start_process(role: str) -> None:
    """Count this process's metrics, and its children's, in files of PROMETHEUS_MULTIPROC_DIR named by ``role``.

    Call it before the process forks or counts anything; it first deletes what earlier processes of ``role`` left.
    """
    directory = Path(settings.PROMETHEUS_MULTIPROC_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    own = re.compile(rf"[a-z_]+_{re.escape(role)}-\d+\.db")
    for path in directory.glob("*.db"):
        if own.fullmatch(path.name):
            path.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue(lambda: f"{role}-{os.getpid()}")


def process_exited(role: str, pid: int) -> None:
    """A process started by a ``role`` process exited (gunicorn's child_exit): drop its live gauges, if any."""
    multiprocess.mark_process_dead(f"{role}-{pid}", str(settings.PROMETHEUS_MULTIPROC_DIR))


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if not allowed(request):
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    encoder, content_type = exposition.choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry()), content_type=content_type)


def allowed(request: HttpRequest) -> bool:
    """From an allowed network, or with the bearer token."""
    token = settings.METRICS_TOKEN
    if token and secrets.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
        return True
    try:
        address = ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in settings.METRICS_ALLOWED_NETWORKS)


def registry() -> CollectorRegistry:
    """What one scrape shows: every process's counts, and what the apps read at scrape time."""
    registry = CollectorRegistry()
    directory = Path(settings.PROMETHEUS_MULTIPROC_DIR)
    if directory.is_dir():  # absent until a web or worker process started
        multiprocess.MultiProcessCollector(registry, path=str(directory))
    for make in _read_at_scrape:
        registry.register(make())
    return registry


class QueueCollector(Collector):
    """Depth and oldest-message age of each queue, and the unacknowledged messages, read from Redis.

    A queue is kombu's one list of that name (no priority sub-queues), its tail the oldest message.
    """

    def __init__(self, broker_url: str, queues: list[str]) -> None:
        self.broker_url = broker_url
        self.queues = queues

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("agentsite_broker_up", "1 if the broker (Redis) answered this scrape, else 0.")
        try:
            replies = self.read()
        except (redis.RedisError, OSError) as exc:
            logger.warning("metrics: broker unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self.families(replies)

    def families(self, replies: list[Any]) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "agentsite_queue_messages", "Messages waiting in the queue for a worker.", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "agentsite_queue_oldest_message_age_seconds",
            "How long the queue's oldest message has waited since it was published (0 if the queue is empty).",
            labels=["queue"],
        )
        now = time.time()
        for queue, length, oldest in zip(self.queues, replies[0:-1:2], replies[1:-1:2], strict=True):
            depth.add_metric([queue], length)
            published = published_at(oldest)
            if published is not None:
                age.add_metric([queue], max(0.0, now - published))
            elif not length:
                age.add_metric([queue], 0.0)
        unacked = GaugeMetricFamily(
            "agentsite_broker_unacked_messages",
            "Messages workers took and have not acknowledged: running or reserved, or held for a retry countdown.",
        )
        unacked.add_metric([], replies[-1])
        return depth, age, unacked

    def read(self) -> list[Any]:
        """For each queue its length and its oldest message; then the unacknowledged count. One round trip."""
        client = redis.Redis.from_url(
            self.broker_url, socket_connect_timeout=BROKER_TIMEOUT, socket_timeout=BROKER_TIMEOUT
        )
        try:
            with client.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    pipe.llen(queue)
                    pipe.lindex(queue, -1)
                pipe.hlen(UNACKED_KEY)
                return list(pipe.execute())
        finally:
            client.close()


def published_at(message: bytes | None) -> float | None:
    """When a raw kombu message was published (PUBLISHED_HEADER), or None if it does not say."""
    if message is None:
        return None
    try:
        return float(json.loads(message)["headers"][PUBLISHED_HEADER])
    except (ValueError, TypeError, KeyError):
        return None
