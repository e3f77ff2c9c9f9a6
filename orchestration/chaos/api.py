"""A small JSON client for the service's HTTP API (standard library only, thread-safe)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .processes import ScenarioError


@dataclass(frozen=True)
class Reply:
    """An HTTP answer; ``status`` 0 means no answer at all (refused, reset, timed out)."""

    status: int
    body: Any

    def __str__(self) -> str:
        return f"{self.status} {json.dumps(self.body)[:300]}"


class Api:
    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def get(self, path: str, timeout: float = 10) -> Reply:
        return self.request("GET", path, None, timeout)

    def post(self, path: str, body: Any, timeout: float = 30) -> Reply:
        return self.request("POST", path, body, timeout)

    def request(self, method: str, path: str, body: Any, timeout: float) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Token {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Reply(response.status, _decode(response.read()))
        except urllib.error.HTTPError as error:
            return Reply(error.code, _decode(error.read()))
        except OSError as error:  # URLError, connection reset, timeout
            return Reply(0, f"no answer: {error}")

    def create_conversation(self, title: str) -> int:
        reply = self.post("/api/conversations/", {"title": title})
        if reply.status != 201:
            raise ScenarioError(f"POST /api/conversations/ answered {reply}")
        return int(reply.body["id"])

    def start_run(self, conversation: int, spec: dict[str, Any], input: Any = None) -> Reply:
        """POST a run, started at once even beside the conversation's other runs; a 202's body is the run."""
        body = {"spec": spec, "input": input, "on_active": "allow"}
        return self.post(f"/api/conversations/{conversation}/runs/", body)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:300]
