"""Error reports to Sentry, without what users wrote and without secrets.

An event says what failed and where (exception type, stack trace, logger and message template, a step's
tags); data is removed and the text left is scrubbed of tokens and email addresses, in the reporting
process before anything is sent (docs/operations.md, "Error reports (Sentry)").
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.django import DjangoIntegration

from agentsite import telemetry

FILTERED = "[Filtered]"
# Values under these keys are data or secrets, wherever they are in an event
# (compared lowercased, "-" read as "_").
FILTERED_KEYS = frozenset(
    {
        # credentials
        "authorization",
        "proxy_authorization",
        "cookie",
        "cookies",
        "set_cookie",
        "x_api_key",
        "api_key",
        "apikey",
        "token",
        "access_token",
        "refresh_token",
        "secret",
        "password",
        "passwd",
        "sessionid",
        "csrftoken",
        "x_csrftoken",
        # what users wrote, what steps take and give, and what carries either
        "prompt",
        "prompts",
        "content",
        "messages",
        "input",
        "output",
        "upstream",
        "state",
        "args",
        "kwargs",
        "params",
        "db.params",
        "return_value",
        "vars",
        "body",
        "data",
        "query_string",
        "email",
    }
)
# Breadcrumb data kept: how an outbound call went, not what it carried.
BREADCRUMB_DATA_KEYS = frozenset({"url", "method", "status_code", "reason", "http.method", "http.response.status_code"})
# Event fields that are ours, not data (the release is a commit's 40 hex digits,
# which would read as a DRF token); breadcrumbs are scrubbed apart.
UNSCRUBBED_EVENT_KEYS = frozenset({"breadcrumbs", "release", "dist", "event_id", "timestamp"})
SECRET_PATTERNS = [
    # "Token 0123...", "Bearer eyJ...", "Basic dXNl...": an Authorization value anywhere in a text.
    (re.compile(r"(?i)\b(token|bearer|basic)(\s+|\s*[:=]\s*)[\w.~+/=-]{8,}"), rf"\1\2{FILTERED}"),
    # api_key=..., token=..., password=... in query strings and settings dumps.
    (re.compile(r"(?i)\b([\w-]*(?:key|token|secret|password|passwd|signature|sig))=[^&\s\"',;]+"), rf"\1={FILTERED}"),
    # Provider API keys: OpenAI/Anthropic sk-..., GitHub, Slack, AWS access key ids.
    (
        re.compile(r"\b(?:sk|pk|rk)-[\w-]{8,}|\bgh[pousr]_\w{20,}|\bxox[abprs]-[\w-]{10,}|\bAKIA[0-9A-Z]{16}\b"),
        FILTERED,
    ),
    # A DRF token (40 hex digits) on its own.
    (re.compile(r"\b[0-9a-fA-F]{40}\b"), FILTERED),
    # JWTs.
    (re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]*"), FILTERED),
    # user:password@ in URLs.
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@"), f"{FILTERED}@"),
    # Email addresses.
    (re.compile(r"[\w.%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), FILTERED),
]


def start(dsn: str, environment: str) -> None:
    """Report errors of this process to Sentry at ``dsn``, scrubbed as the module says."""
    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        integrations=[DjangoIntegration(), CeleryIntegration()],
        send_default_pii=False,
        include_local_variables=False,
        max_request_body_size="never",
        before_send=before_send,
        before_send_transaction=before_send_transaction,
        before_breadcrumb=before_breadcrumb,
    )


def before_send(event: Any, hint: dict[str, Any]) -> Any:
    return scrub_event(label_step(event))


def before_send_transaction(event: Any, hint: dict[str, Any]) -> Any:
    return scrub_event(event)


def before_breadcrumb(crumb: Any, hint: dict[str, Any] | None) -> Any:
    record = (hint or {}).get("log_record")
    if isinstance(record, logging.LogRecord) and record.args:
        # The template is code; the arguments are data.
        crumb["message"] = str(record.msg)
    return scrub_breadcrumb(crumb)


def label_step(event: Any) -> Any:
    """Tag an event made inside a step with its run_id, step_id and skill."""
    fields = telemetry.step_fields()
    if fields:
        event.setdefault("tags", {}).update({name: str(value) for name, value in fields.items()})
    return event


def scrub_event(event: Any) -> Any:
    """``event`` without data or secrets: messages, local variables, user fields but the id; text scrubbed."""
    for container in ("exception", "threads"):
        for value in (event.get(container) or {}).get("values") or []:
            if container == "exception" and value.get("value"):
                value["value"] = FILTERED
            for frame in (value.get("stacktrace") or {}).get("frames") or []:
                frame.pop("vars", None)
    if event.get("logentry"):
        event["logentry"] = _scrub_logentry(event["logentry"])
    if "user" in event:
        event["user"] = {key: value for key, value in (event["user"] or {}).items() if key == "id"}
    crumbs = (event.get("breadcrumbs") or {}).get("values")
    if crumbs:
        event["breadcrumbs"]["values"] = [scrub_breadcrumb(crumb) for crumb in crumbs]
    return {key: value if key in UNSCRUBBED_EVENT_KEYS else scrub_value(value) for key, value in event.items()}


def scrub_breadcrumb(crumb: Any) -> Any:
    if crumb.get("message"):
        crumb["message"] = scrub_text(str(crumb["message"]))
    data = crumb.get("data") or {}
    crumb["data"] = {key: scrub_value(value) for key, value in data.items() if key in BREADCRUMB_DATA_KEYS}
    return crumb


def scrub_value(value: Any) -> Any:
    """``value`` with the values of FILTERED_KEYS replaced and every text scrubbed, at any depth."""
    if isinstance(value, dict):
        return {key: FILTERED if _filtered_key(key) else scrub_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(item) for item in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


def scrub_text(text: str) -> str:
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _scrub_logentry(logentry: dict[str, Any]) -> dict[str, Any]:
    message = str(logentry.get("message") or "")
    if logentry.get("params"):
        return {"message": message}  # the template is code; the arguments are data
    return {"message": scrub_text(message)}


def _filtered_key(key: Any) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in FILTERED_KEYS
