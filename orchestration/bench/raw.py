"""The raw Celery side of the benchmark: no-op tasks in plain Celery canvases, no Django.

Broker and result backend are the Redis at BENCH_RAW_REDIS_URL, the tasks have a queue of
their own, all else is Celery's defaults. Its worker runs with agentsite's pool and concurrency:
``celery -A orchestration.bench.raw worker --pool=prefork --concurrency=N``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, chain, chord, group
from celery.canvas import Signature

QUEUE = "bench-raw"
REDIS_URL = os.environ.get("BENCH_RAW_REDIS_URL", "redis://127.0.0.1:6379/12")

# Not the current app: a process that loads agentsite too (the bench, the tests)
# keeps publishing agentsite's canvases through agentsite's app.
app = Celery("bench-raw", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
# kombu's own Redis transport, not agentsite's (agentsite/broker.py), also when
# the bench process that imports this has loaded agentsite.
app.conf.broker_transport = "kombu.transport.redis:Transport"
app.conf.update(task_default_queue=QUEUE, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@app.task(name="bench.noop")
def noop(*args: Any) -> Any:
    """Pass the upstream value on, as the ``echo`` skill does."""
    return args[0] if args else None


def canvas(shape: str) -> Signature:
    """The plain Celery canvas for a benchmark shape (see ``shapes.SHAPES``)."""
    if shape == "single":
        return noop.s()
    if shape == "chain3":
        return chain(noop.s(), noop.s(), noop.s())
    if shape == "group10":
        return group(noop.s() for _ in range(10))
    if shape == "chord10":
        return chord((noop.s() for _ in range(10)), noop.s())
    raise ValueError(f"unknown shape {shape!r}")
