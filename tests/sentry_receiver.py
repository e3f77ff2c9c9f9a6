"""A stand-in for Sentry, so tests can read the events a worker subprocess reports.

It is a real HTTP server on 127.0.0.1: a process whose SENTRY_DSN is
``receiver.dsn`` sends its envelopes to it as it would to sentry.io, through
the SDK's own transport, and the receiver keeps each event with the bytes it
arrived in.
"""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import brotli
from sentry_sdk.envelope import Envelope

# The SDK compresses with brotli where it is installed (as with the test tools), else gzip.
DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "br": brotli.decompress,
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
}


@dataclass(frozen=True)
class ReceivedEvent:
    event: dict[str, Any]
    raw: bytes  # the envelope as sent, decompressed

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.event.get("tags") or {})

    def exception_types(self) -> list[str]:
        return [value.get("type", "") for value in (self.event.get("exception") or {}).get("values", [])]


class SentryReceiver:
    def __init__(self) -> None:
        self._events: list[ReceivedEvent] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.receiver = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="sentry-receiver", daemon=True)

    @property
    def dsn(self) -> str:
        """The value for SENTRY_DSN (project 1, any public key)."""
        host, port = self._server.server_address[:2]
        return f"http://public@{host!s}:{port}/1"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def events(self) -> list[ReceivedEvent]:
        with self._lock:
            return list(self._events)

    def receive(self, raw: bytes) -> None:
        events = [
            ReceivedEvent(event=dict(event), raw=raw)
            for item in Envelope.deserialize(raw).items
            if item.type in ("event", "transaction") and (event := item.get_event()) is not None
        ]
        with self._lock:
            self._events += events


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self._read_body()
        encoding = self.headers.get("Content-Encoding", "")
        if encoding in DECOMPRESS:
            body = DECOMPRESS[encoding](body)
        self.server.receiver.receive(body)  # type: ignore[attr-defined]
        answer = json.dumps({"id": "0" * 32}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b""  # the SDK streams its envelope in chunks, without a length
        while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return body

    def log_message(self, format: str, *args: Any) -> None:
        pass
