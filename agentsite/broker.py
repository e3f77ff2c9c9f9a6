"""kombu's Redis transport, with one command client per connection pool.

kombu makes a new ``redis.Redis`` for every publish and every acknowledgement
(``Channel.conn_or_acquire``), and redis-py's constructor copies its ~170
response callbacks into a fresh case-insensitive dict each time: measured
with cProfile on a worker running 3-step chains, 2.7 clients a task and 17%
of the worker's CPU. A client holds no connection of its own (each command
takes one from the pool and gives it back), so one client per pool serves
every thread. The blocking client kombu keeps for BRPOP is unchanged.

``use_for_redis_urls()`` (called where the Celery app is made) makes it the
transport of ``redis://`` URLs, so the URL itself stays what Flower, the
health check and the logs expect.
"""

from __future__ import annotations

from typing import Any

import kombu.transport
from kombu.transport import redis


class Channel(redis.Channel):
    _command_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]  # not in kombu's stubs
        client = self._command_client
        # A new pool (after a connection error, or a fork) gets a new client.
        if client is None or client.connection_pool is not self.pool:
            client = self._command_client = super()._create_client()  # type: ignore[misc]
        return client


class Transport(redis.Transport):
    Channel = Channel


def use_for_redis_urls() -> None:
    kombu.transport.TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
