"""A local HTTP server that speaks the OpenAI chat-completions protocol, for tests.

``POST /v1/chat/completions`` answers with a completion whose text comes from
``answer(request_body)`` (by default it echoes the last user message), or
with the scripted ``Reply`` objects queued by ``script()`` first (an error
status, a delay). Every request is kept (``requests``) with its headers, so
a test can check the prompt a skill built.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    status: int = 200
    text: str | None = None  # None: from answer()
    delay: float = 0.0
    raw: bytes | None = None  # a body sent as is


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


def echo_last_user_message(body: dict[str, Any]) -> str:
    users = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
    return users[-1] if users else ""


@dataclass
class FakeLLM:
    answer: Callable[[dict[str, Any]], str] = echo_last_user_message
    model: str = "fake-model"
    requests: list[Received] = field(default_factory=list)
    _script: deque[Reply] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        """The value for LLM_BASE_URL (the client adds /chat/completions)."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order, before answer() again."""
        with self._lock:
            self._script.extend(replies)

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            scripted = self._script.popleft() if self._script else None
        if scripted is not None and (scripted.text is not None or scripted.raw is not None or scripted.status != 200):
            return scripted
        text = self.answer(body)
        return Reply(text=text, delay=scripted.delay if scripted else 0.0)

    def _record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:
        fake: FakeLLM = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        fake._record(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if not self.path.endswith("/chat/completions"):
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        reply = fake._next(body)
        if reply.delay:
            time.sleep(reply.delay)
        if reply.raw is not None:
            self._send(reply.status, reply.raw)
        elif reply.status != 200:
            self._send(reply.status, json.dumps({"error": {"message": f"scripted {reply.status}"}}).encode())
        else:
            completion = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": fake.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            self._send(200, json.dumps(completion).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serving(fake: FakeLLM | None = None) -> Iterator[FakeLLM]:
    """Run a FakeLLM on 127.0.0.1 (a free port) for the block."""
    fake = fake or FakeLLM()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.fake = fake  # type: ignore[attr-defined]
    fake._server = server
    thread = threading.Thread(target=server.serve_forever, name="fake-llm", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
