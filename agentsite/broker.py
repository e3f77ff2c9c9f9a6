"""kombu's Redis transport, with one command client per connection pool instead of one per publish or ack.

The client borrows a pool connection per command, so every thread shares it; the blocking BRPOP client is
kombu's own. ``use_for_redis_urls()`` makes it the transport of ``redis://`` URLs (docs/operations.md,
"Why these defaults").
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
    """Make this module's Transport the one of ``redis://`` URLs; call it before the Celery app connects."""
    kombu.transport.TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
