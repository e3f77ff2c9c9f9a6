"""``http_fetch``: GET a public URL and add what it answered to the ticket.

Through the SSRF guard (``agentsite.outbound.fetch``), ending before the step's soft time limit; the body
is cut at ``args.max_bytes``. Which failures are retried: docs/skills.md, "http_fetch".
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from django.conf import settings

from agentsite import outbound
from skills.registry import SkillContext, SkillError, skill

from .ticket import Ticket, ticket_of

TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript", "application/xhtml")
RETRY_STATUSES = frozenset({408, 429})


@skill(
    description="GETs args.url (or the ticket's url) through the SSRF guard and adds under args.into "
    "(default 'fetched'): url, status, content_type, text (or json), bytes, truncated.",
    soft_time_limit=20,
    time_limit=30,
    retries=2,
    backoff=1.0,
    backoff_max=10,
)
def http_fetch(ctx: SkillContext, input: Any) -> Any:
    ticket = ticket_of(input)
    url = url_of(ctx.args, ticket)
    into = _into(ctx.args.get("into", "fetched"))
    max_bytes = max_bytes_of(ctx.args.get("max_bytes"))
    timeout = ctx.time_for_call(settings.OUTBOUND_TIMEOUT)
    if timeout <= 0:
        raise SkillError("http_fetch: no time left for the request", transient=False)
    response = get(url, timeout, max_bytes)
    return {**ticket, into: fetched(url, response, max_bytes)}


def url_of(args: dict[str, Any], ticket: Ticket) -> str:
    url = args.get("url", ticket.get("url"))
    if not isinstance(url, str) or not url:
        raise SkillError("http_fetch: no URL to fetch (args.url or the ticket's url)", transient=False)
    return url


def max_bytes_of(value: Any) -> int:
    """``args.max_bytes``, capped by OUTBOUND_MAX_BYTES (its default)."""
    cap = int(settings.OUTBOUND_MAX_BYTES)
    if value is None:
        return cap
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SkillError(f"http_fetch: args.max_bytes must be a positive integer, not {value!r}", transient=False)
    return min(value, cap)


def get(url: str, timeout: float, max_bytes: int) -> httpx.Response:
    """The response to GET ``url``, its body cut after ``max_bytes + 1`` bytes; SkillError on any failure."""
    try:
        response = outbound.fetch(url, timeout=timeout, max_bytes=max_bytes + 1, truncate=True)
    except outbound.UnsafeURL as exc:
        raise SkillError(f"http_fetch: refused {url}: {exc}", transient=False) from exc
    except outbound.TooManyRedirects as exc:
        raise SkillError(f"http_fetch: {url}: {exc}", transient=False) from exc
    except (outbound.DeadlineExceeded, httpx.TimeoutException) as exc:
        raise SkillError(f"http_fetch: {url} did not answer within {timeout:.1f}s", transient=True) from exc
    except (outbound.OutboundError, httpx.HTTPError) as exc:
        raise SkillError(f"http_fetch: {url} could not be fetched: {exc}", transient=True) from exc
    _check_status(url, response)
    return response


def _check_status(url: str, response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    transient = status >= 500 or status in RETRY_STATUSES
    reason = response.reason_phrase or "error"
    raise SkillError(f"http_fetch: {url} answered HTTP {status} {reason}", transient=transient)


def fetched(url: str, response: httpx.Response, max_bytes: int) -> dict[str, Any]:
    """What the ticket gets: the body decoded as text, or parsed as ``json`` when it is whole JSON."""
    content_type = response.headers.get("content-type", "")
    if content_type and not content_type.lower().startswith(TEXT_TYPES) and "+json" not in content_type.lower():
        raise SkillError(f"http_fetch: {url} is {content_type}, not text", transient=False)
    body = response.content[:max_bytes]
    truncated = len(response.content) > max_bytes
    result: dict[str, Any] = {"url": url, "status": response.status_code, "content_type": content_type}
    result.update(_decoded(body, response.encoding or "utf-8", _is_json(content_type) and not truncated))
    return {**result, "bytes": len(body), "truncated": truncated}


def _decoded(body: bytes, encoding: str, as_json: bool) -> dict[str, Any]:
    try:
        text = body.decode(encoding, errors="replace")
    except LookupError:  # a charset Python does not know
        text = body.decode("utf-8", errors="replace")
    if as_json:
        try:
            return {"json": json.loads(text)}
        except ValueError:
            pass  # it said JSON but is not: the text, as for any other body
    return {"text": text}


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _into(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise SkillError(f"http_fetch: args.into must be the name of a ticket key, not {value!r}", transient=False)
    return value
