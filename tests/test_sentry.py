"""Sentry reports say what failed and where, never what users wrote or any secret (agentsite/sentry.py)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest
from sentry_sdk.consts import DEFAULT_OPTIONS
from sentry_sdk.utils import event_from_exception

from agentsite import sentry, telemetry
from orchestration.models import Run

from .conftest import Worker, wait_for_run, wait_until, worker_instead
from .factories import ConversationFactory, token_for
from .sentry_receiver import SentryReceiver

PROMPT = "canary-prompt: the launch code is zebra-1492"
API_KEY = "sk-canary-0123456789abcdef"
EMAIL = "canary.person@example.org"
BEARER = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5hcnkifQ.c2lnbmF0dXJl"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # as DRF makes them
CANARIES = ("zebra-1492", "canary-prompt", API_KEY, EMAIL, "canary.person", BEARER, TOKEN)


def leaked(text: str, *more_canaries: str) -> list[str]:
    return [canary for canary in (*CANARIES, *more_canaries) if canary in text]


@pytest.fixture
def reporting_worker(worker: Worker, sentry_receiver: SentryReceiver) -> Iterator[Worker]:
    """A worker that reports to the receiver takes the default queue from the session's for one test.

    The session's worker runs without Sentry: with it, the tests that kill
    pool processes failed now and then (a redelivered step ended as if
    revoked), and those must stay exact.
    """
    env = {"SENTRY_DSN": sentry_receiver.dsn, "SENTRY_ENVIRONMENT": "test"}
    with worker_instead(worker, "sentry", env) as reporting:
        yield reporting


def test_a_failing_step_is_reported_with_its_step_and_skill_and_without_data(
    reporting_worker, sentry_receiver, api, user
):
    conversation = ConversationFactory.create(owner=user)
    # The skill chokes on its argument: the exception's message, the step's input
    # (the message content) and its arguments all carry the canaries.
    seconds = f"{PROMPT} Token {token_for(user)} Bearer {BEARER} {API_KEY} {EMAIL}"
    spec = {"chain": [{"skill": "echo"}, {"skill": "sleep", "id": "choke", "args": {"seconds": seconds}}]}

    response = api.post(
        f"/api/conversations/{conversation.pk}/messages/", {"content": PROMPT, "spec": spec}, format="json"
    )
    run = wait_for_run(Run.objects.get(pk=response.json()["run"]["id"]))

    assert run.status == "failed"
    assert PROMPT in run.error  # the step's own record keeps the message; Sentry does not get it
    step = run.steps.get(key="choke")
    [report] = wait_until(lambda: [e for e in sentry_receiver.events() if e.tags.get("run_id") == str(run.pk)])
    assert report.exception_types() == ["ValueError"]
    assert report.tags["step_id"] == str(step.pk)
    assert report.tags["skill"] == "sleep"
    assert report.event["logger"] == "orchestration.tasks"
    assert report.event["environment"] == "test"
    frames = report.event["exception"]["values"][0]["stacktrace"]["frames"]
    assert any(frame["function"] == "sleep" and frame["module"] == "skills.builtin" for frame in frames)
    assert leaked(report.raw.decode("utf-8", "replace"), token_for(user)) == []


def test_exception_messages_and_local_variables_are_removed():
    prompt = PROMPT  # a local variable of this frame, captured below with include_local_variables
    try:
        raise ValueError(f"could not use {prompt} for {EMAIL}")
    except ValueError:
        event, _ = event_from_exception(
            sys.exc_info(), client_options={**DEFAULT_OPTIONS, "include_local_variables": True}
        )

    scrubbed = sentry.before_send(event, {})

    [exception] = scrubbed["exception"]["values"]
    assert exception["type"] == "ValueError"
    assert exception["value"] == "[Filtered]"
    assert all("vars" not in frame for frame in exception["stacktrace"]["frames"])
    assert leaked(str(scrubbed)) == []


def test_a_request_keeps_its_method_and_path_but_not_credentials_cookies_body_or_query():
    event = {
        "request": {
            "method": "POST",
            "url": "http://testserver/api/conversations/1/messages/",
            "query_string": f"email={EMAIL}",
            "headers": {
                "Authorization": f"Token {TOKEN}",
                "Cookie": "sessionid=abc123",
                "X-Api-Key": API_KEY,
                "Content-Type": "application/json",
            },
            "cookies": {"sessionid": "abc123"},
            "data": {"content": PROMPT},
        }
    }

    request = sentry.before_send(event, {})["request"]

    assert request["method"] == "POST"
    assert request["url"] == "http://testserver/api/conversations/1/messages/"
    assert request["headers"]["Content-Type"] == "application/json"
    assert {request["headers"][name] for name in ("Authorization", "Cookie", "X-Api-Key")} == {"[Filtered]"}
    assert request["cookies"] == request["data"] == request["query_string"] == "[Filtered]"
    assert leaked(str(request)) == []


def test_a_log_breadcrumb_keeps_the_template_not_the_arguments():
    record = logging.LogRecord(
        "orchestration.tasks", logging.INFO, __file__, 1, "step %s answered %r", (7, {"content": PROMPT}), None
    )
    crumb = {"type": "log", "message": record.getMessage(), "data": {"run_id": 3, "input": PROMPT}}

    scrubbed = sentry.before_breadcrumb(crumb, {"log_record": record})

    assert scrubbed["message"] == "step %s answered %r"
    assert scrubbed["data"] == {}


def test_a_log_event_keeps_its_template_and_release_and_loses_task_data():
    event = {
        "logentry": {"message": "task %s failed: %s", "params": ["x", PROMPT], "formatted": f"task x failed: {PROMPT}"},
        "extra": {"data": {"args": [PROMPT], "return_value": EMAIL}, "celery-job": {"task_name": "agentsite.run_step"}},
        "contexts": {"trace": {"data": {"prompt": PROMPT}}},
        "user": {"id": "5", "email": EMAIL, "ip_address": "10.0.0.1"},
        "release": "23a923e0c1c4e8bd5e3c9a07d1b2f6a1f7e9d0c4",
    }

    scrubbed = sentry.before_send(event, {})

    assert scrubbed["logentry"] == {"message": "task %s failed: %s"}
    assert scrubbed["extra"]["celery-job"] == {"task_name": "agentsite.run_step"}
    assert scrubbed["user"] == {"id": "5"}
    assert scrubbed["release"] == "23a923e0c1c4e8bd5e3c9a07d1b2f6a1f7e9d0c4"
    assert leaked(str(scrubbed)) == []


def test_an_http_breadcrumb_keeps_the_call_without_its_credentials():
    crumb = {
        "type": "http",
        "category": "httplib",
        "data": {
            "url": f"https://ci:hunter2@api.example.com/v1?api_key={API_KEY}",
            "http.method": "GET",
            "http.response.status_code": 500,
            "headers": {"Authorization": f"Bearer {BEARER}"},
        },
    }

    data = sentry.before_breadcrumb(crumb, {})["data"]

    assert data == {
        "url": "https://[Filtered]@api.example.com/v1?api_key=[Filtered]",
        "http.method": "GET",
        "http.response.status_code": 500,
    }


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        (f"Authorization: Token {TOKEN}", "Authorization: Token [Filtered]"),
        (f"Bearer {BEARER} refused", "Bearer [Filtered] refused"),
        (f"openai said no to {API_KEY}", "openai said no to [Filtered]"),
        (f"the token is {TOKEN}", "the token is [Filtered]"),
        (f"mail {EMAIL} failed", "mail [Filtered] failed"),
        ("redis://default:s3cret@cache:6379/0", "redis://[Filtered]@cache:6379/0"),
        ("GET /v1?access_token=abc&page=2", "GET /v1?access_token=[Filtered]&page=2"),
        ("step 12 of run 3 timed out", "step 12 of run 3 timed out"),
    ],
)
def test_texts_lose_tokens_keys_and_email_addresses(text, scrubbed):
    assert sentry.scrub_text(text) == scrubbed


def test_an_event_made_inside_a_step_is_tagged_with_the_step():
    telemetry.bind_step(run_id=3, step_id=12, skill="echo")
    try:
        event = sentry.before_send({"tags": {"celery_task_id": "abc"}}, {})
    finally:
        telemetry.unbind_step()

    assert event["tags"] == {"celery_task_id": "abc", "run_id": "3", "step_id": "12", "skill": "echo"}
