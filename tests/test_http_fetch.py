"""http_fetch: a GET through the SSRF guard, capped in size and time; refusals fail at once, outages are retried."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from orchestration.services import start_run
from skills.registry import SkillContext, SkillError
from skills.support.web import http_fetch

from .conftest import wait_for_run, worker_instead
from .test_outbound import Route, Site, _serve, answer, chunked

PAGE = "Refunds reach your card within 5 business days. Café ☕".encode()
ORDER = {"id": 1042, "status": "shipped", "payments": [101.5, 101.5]}


@pytest.fixture
def site() -> Iterator[Site]:
    """A real HTTP server on 127.0.0.1 (tests run with OUTBOUND_ALLOW_PRIVATE=1, pyproject.toml)."""
    served = _serve()
    site = next(served)
    site.routes = {
        "/page": answer(200, PAGE, {"Content-Type": "text/plain; charset=utf-8"}),
        "/order.json": answer(200, json.dumps(ORDER).encode(), {"Content-Type": "application/json"}),
        "/broken.json": answer(200, b'{"id": 10', {"Content-Type": "application/json"}),
        "/big": chunked(iter([b"a" * 1000] * 50)),
        "/image": answer(200, b"\x89PNG\r\n", {"Content-Type": "image/png"}),
        "/slow": slow(3),
        "/down": answer(500, b"oops", {"Content-Type": "text/plain"}),
        "/busy": answer(503, b"later", {"Content-Type": "text/plain"}),
    }
    yield site
    next(served, None)


def slow(seconds: float) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        with contextlib.suppress(OSError):  # the client gave up: that is the point
            answer(200, b"late", {"Content-Type": "text/plain"})(handler)

    return route


def context(soft_time_limit: float | None = None, **args: Any) -> SkillContext:
    return SkillContext(
        run_id=1,
        step_id=1,
        step_key="fetch",
        conversation_id=None,
        state={},
        args=args,
        attempt=1,
        soft_time_limit=soft_time_limit,
    )


def failure(call: Any) -> SkillError:
    with pytest.raises(SkillError) as caught:
        call()
    return caught.value


# --- The function -----------------------------------------------------------------


def test_it_adds_the_page_as_text(site):
    output = http_fetch(context(url=site.url("/page")), {"content": "refund?"})

    assert output == {
        "content": "refund?",
        "fetched": {
            "url": site.url("/page"),
            "status": 200,
            "content_type": "text/plain; charset=utf-8",
            "text": PAGE.decode(),
            "bytes": len(PAGE),
            "truncated": False,
        },
    }


def test_it_parses_json_from_the_tickets_url_into_the_key_asked(site):
    output = http_fetch(context(into="order"), {"content": "x", "url": site.url("/order.json")})

    assert output["order"]["json"] == ORDER
    assert "text" not in output["order"]


def test_json_that_does_not_parse_is_given_as_text(site):
    output = http_fetch(context(url=site.url("/broken.json")), {"content": "x"})

    assert output["fetched"]["text"] == '{"id": 10'


def test_a_body_past_max_bytes_is_cut_there(site):
    output = http_fetch(context(url=site.url("/big"), max_bytes=10), {"content": "x"})

    assert output["fetched"]["text"] == "a" * 10
    assert (output["fetched"]["bytes"], output["fetched"]["truncated"]) == (10, True)


def test_a_body_of_exactly_max_bytes_is_whole(site):
    output = http_fetch(context(url=site.url("/page"), max_bytes=len(PAGE)), {"content": "x"})

    assert (output["fetched"]["bytes"], output["fetched"]["truncated"]) == (len(PAGE), False)


def test_max_bytes_is_capped_by_the_setting(site, settings):
    settings.OUTBOUND_MAX_BYTES = 100

    output = http_fetch(context(url=site.url("/big"), max_bytes=10_000), {"content": "x"})

    assert (output["fetched"]["bytes"], output["fetched"]["truncated"]) == (100, True)


def test_a_slow_site_is_given_up_before_the_soft_limit_and_may_be_retried(site):
    started = time.monotonic()

    error = failure(lambda: http_fetch(context(soft_time_limit=2, url=site.url("/slow")), {"content": "x"}))

    assert time.monotonic() - started < 2
    assert error.transient is True
    assert str(error) == f"http_fetch: {site.url('/slow')} did not answer within 1.0s"


@pytest.mark.parametrize(("path", "transient"), [("/down", True), ("/busy", True), ("/missing", False)])
def test_an_error_status_fails_and_says_which(site, path, transient):
    error = failure(lambda: http_fetch(context(url=site.url(path)), {"content": "x"}))

    assert error.transient is transient
    status = {"/down": "500 Internal Server Error", "/busy": "503 Service Unavailable", "/missing": "404 Not Found"}
    assert str(error) == f"http_fetch: {site.url(path)} answered HTTP {status[path]}"


def test_a_private_address_is_refused(site, settings):
    settings.OUTBOUND_ALLOW_PRIVATE = False

    error = failure(lambda: http_fetch(context(url=site.url("/page")), {"content": "x"}))

    assert error.transient is False
    assert "http_fetch: refused" in str(error)
    assert "resolves to 127.0.0.1, which is not a public address" in str(error)
    assert site.requests == []


@pytest.mark.parametrize(
    ("args", "ticket", "message"),
    [
        ({"url": "file:///etc/passwd"}, {}, "http_fetch: refused file:///etc/passwd: only http and https URLs"),
        ({"url": "http://user:pw@example.com/"}, {}, "the URL must not carry credentials"),
        ({}, {}, "http_fetch: no URL to fetch (args.url or the ticket's url)"),
        ({}, {"url": 42}, "http_fetch: no URL to fetch"),
        ({"url": "http://127.0.0.1/", "max_bytes": 0}, {}, "http_fetch: args.max_bytes must be a positive integer"),
        ({"url": "http://127.0.0.1/", "into": ""}, {}, "http_fetch: args.into must be the name of a ticket key"),
    ],
)
def test_bad_arguments_are_named(args, ticket, message):
    error = failure(lambda: http_fetch(context(**args), {"content": "x", **ticket}))

    assert error.transient is False
    assert message in str(error)


def test_a_body_that_is_not_text_is_refused(site):
    error = failure(lambda: http_fetch(context(url=site.url("/image")), {"content": "x"}))

    assert (str(error), error.transient) == (f"http_fetch: {site.url('/image')} is image/png, not text", False)


# --- Through a worker -------------------------------------------------------------


@pytest.mark.worker
def test_it_runs_as_a_step(worker, user, site):
    spec = {"skill": "http_fetch", "args": {"url": site.url("/order.json"), "into": "order"}}

    run = wait_for_run(start_run(owner=user, spec=spec, input={"content": "where is order 1042?"}))

    assert run.status == "succeeded", run.error
    output: dict[str, Any] = run.output or {}
    assert output["order"]["json"] == ORDER
    assert output["content"] == "where is order 1042?"


@pytest.mark.worker
def test_a_server_error_is_retried_then_fails_the_run(worker, user, site):
    spec = {"skill": "http_fetch", "retries": 1, "args": {"url": site.url("/down")}}

    run = wait_for_run(start_run(owner=user, spec=spec, input={"content": "x"}))

    assert run.status == "failed"
    assert "answered HTTP 500 Internal Server Error" in run.error
    assert run.steps.get().attempts == 2
    assert site.paths() == ["/down", "/down"]


@pytest.mark.worker
def test_a_timeout_is_retried(worker, user, site):
    spec = {
        "skill": "http_fetch",
        "soft_time_limit": 2,
        "time_limit": 4,
        "retries": 1,
        "args": {"url": site.url("/slow")},
    }

    run = wait_for_run(start_run(owner=user, spec=spec, input={"content": "x"}))

    assert run.status == "failed"
    assert "did not answer within" in run.error
    assert run.steps.get().attempts == 2


@pytest.mark.worker
def test_a_missing_page_fails_at_once(worker, user, site):
    spec = {"skill": "http_fetch", "retries": 2, "args": {"url": site.url("/missing")}}

    run = wait_for_run(start_run(owner=user, spec=spec, input={"content": "x"}))

    assert run.status == "failed"
    assert "answered HTTP 404 Not Found" in run.error
    assert run.steps.get().attempts == 1


@pytest.mark.worker
def test_a_worker_that_refuses_private_addresses_refuses_the_fetch(worker, user, site):
    spec = {"skill": "http_fetch", "retries": 2, "args": {"url": site.url("/page")}}

    with worker_instead(worker, "no-private", {"OUTBOUND_ALLOW_PRIVATE": "0"}):
        run = wait_for_run(start_run(owner=user, spec=spec, input={"content": "x"}))

    assert run.status == "failed"
    assert "is not a public address" in run.error
    assert run.steps.get().attempts == 1
    assert site.requests == []
