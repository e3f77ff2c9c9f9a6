"""A client for any OpenAI-compatible chat-completions API (``LLM_BASE_URL``).

Optional: skills check ``configured()`` and answer offline without it. Each call's timeout ends before
the step's soft time limit and the run's deadline. See docs/skills.md, "The LLM client".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings

from skills.registry import SkillContext, SkillError


class LLMError(SkillError):
    """The LLM call failed; ``transient`` when a later attempt may succeed (timeout, 429, 5xx, connection)."""


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    usage: dict[str, Any]


def configured() -> bool:
    """Whether an LLM is configured (LLM_BASE_URL and LLM_MODEL)."""
    return bool(settings.LLM_BASE_URL and settings.LLM_MODEL)


def chat(
    ctx: SkillContext, messages: list[dict[str, str]], *, max_tokens: int = 400, temperature: float = 0.2
) -> Completion:
    """One chat completion: ``messages`` are ``{"role", "content"}`` dicts; raises LLMError.

    Sends the step's idempotency key as ``Idempotency-Key``, so a server that honours it answers a retry once.
    """
    if not configured():
        raise LLMError("no LLM is configured (LLM_BASE_URL, LLM_MODEL)", transient=False)
    timeout = ctx.time_for_call(settings.LLM_TIMEOUT)
    if timeout <= 0:
        raise LLMError("no time left for the LLM call", transient=False)
    body = {"model": settings.LLM_MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    headers = {"Idempotency-Key": ctx.idempotency_key}
    if settings.LLM_API_KEY:
        headers["Authorization"] = f"Bearer {settings.LLM_API_KEY}"
    url = settings.LLM_BASE_URL.rstrip("/") + "/chat/completions"
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException as exc:
        raise LLMError(f"the LLM did not answer within {timeout:.1f}s", transient=True) from exc
    except httpx.HTTPError as exc:
        raise LLMError(f"the LLM could not be reached: {exc}", transient=True) from exc
    return _completion(response)


def _completion(response: httpx.Response) -> Completion:
    if response.status_code != 200:
        transient = response.status_code == 429 or response.status_code >= 500
        raise LLMError(f"the LLM answered HTTP {response.status_code}: {response.text[:200]}", transient=transient)
    try:
        payload = response.json()
        text = payload["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LLMError(f"the LLM's answer is not a chat completion: {response.text[:200]}", transient=False) from exc
    if not isinstance(text, str) or not text.strip():
        raise LLMError("the LLM answered with no text", transient=False)
    return Completion(text=text.strip(), model=str(payload.get("model", "")), usage=payload.get("usage") or {})
