"""agentsite.outbound: skills and webhooks cannot be pointed at the service's own network (SSRF)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from agentsite import outbound
from orchestration.models import Conversation, Run

Route = Callable[[BaseHTTPRequestHandler], None]


class Site:
    """A real HTTP server on 127.0.0.1 that answers each path with its route and records every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[dict[str, Any]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                # Read the body first: a reply sent over an unread body ends in a reset, not the reply.
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                site.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                site.routes.get(self.path, not_found)(self)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a dripping route may outlive its test
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        return [request["path"] for request in self.requests]


@pytest.fixture
def site() -> Iterator[Site]:
    yield from _serve()


@pytest.fixture
def other_site() -> Iterator[Site]:
    yield from _serve()


def _serve() -> Iterator[Site]:
    site = Site()
    site.thread.start()
    yield site
    site.server.shutdown()
    site.server.server_close()


@pytest.fixture
def private_refused(settings: Any) -> Any:
    """Production's policy (pyproject.toml lets the other tests call loopback)."""
    settings.OUTBOUND_ALLOW_PRIVATE = False
    return settings


@pytest.fixture
def private_allowed(settings: Any) -> Any:
    settings.OUTBOUND_ALLOW_PRIVATE = True
    return settings


def answer(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    return route


def redirect(location: str, status: int = 302) -> Route:
    return answer(status, headers={"Location": location})


def not_found(handler: BaseHTTPRequestHandler) -> None:
    answer(404, b"no such page")(handler)


def chunked(chunks: Iterator[bytes], pause: float = 0) -> Route:
    """Answers 200 with a body of unknown length, one chunk at a time."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.protocol_version = "HTTP/1.1"
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for chunk in chunks:
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                handler.wfile.flush()
                time.sleep(pause)
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading: that is the point

    return route


def fake_dns(monkeypatch: Any, answers: dict[str, list[str]]) -> list[str]:
    """Resolve the names in ``answers`` to their addresses (a DNS server's answer); returns the names asked."""
    asked: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return real_getaddrinfo(host, port, *args, **kwargs)
        asked.append(host)
        return [
            (socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
            for address in answers[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


# --- The address policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "2002:7f00:1::1",
        "64:ff9b::a00:1",
    ],
)
def test_internal_addresses_are_not_public(address):
    assert not outbound.is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "2002:808:808::1"])
def test_internet_addresses_are_public(address):
    assert outbound.is_public(ipaddress.ip_address(address))


# --- Probes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:{port}/", "resolves to 127.0.0.1, which is not a public address"),
        ("http://localhost:{port}/", "which is not a public address"),
        ("http://[::1]:{port}/", "resolves to ::1, which is not a public address"),
        ("http://[::ffff:127.0.0.1]:{port}/", "resolves to ::ffff:127.0.0.1, which is not a public address"),
        ("http://2130706433:{port}/", "'2130706433' resolves to 127.0.0.1, which is not a public address"),
        ("http://0x7f000001:{port}/", "'0x7f000001' resolves to 127.0.0.1, which is not a public address"),
        ("http://0x7f.1:{port}/", "resolves to 127.0.0.1, which is not a public address"),
        ("http://127.1:{port}/", "'127.1' resolves to 127.0.0.1, which is not a public address"),
        ("http://0177.0.0.1:{port}/", "not a valid URL"),
        ("http://0.0.0.0:{port}/", "resolves to 0.0.0.0, which is not a public address"),
        ("http://169.254.169.254/latest/meta-data/", "resolves to 169.254.169.254, which is not a public address"),
        ("http://[fe80::1]/", "resolves to fe80::1, which is not a public address"),
        ("http://[fd00::1]/", "resolves to fd00::1, which is not a public address"),
        ("http://10.0.0.1/", "resolves to 10.0.0.1, which is not a public address"),
        ("http://100.64.0.1/", "resolves to 100.64.0.1, which is not a public address"),
        ("file:///etc/passwd", "only http and https URLs are allowed, not 'file'"),
        ("gopher://127.0.0.1:{port}/", "only http and https URLs are allowed, not 'gopher'"),
        ("ftp://example.com/", "only http and https URLs are allowed, not 'ftp'"),
        ("http://user:pw@127.0.0.1:{port}/", "the URL must not carry credentials"),
        ("http:///nohost", "the URL has no host"),
    ],
)
def test_a_probe_of_the_internal_network_is_refused_before_connecting(private_refused, site, url, why):
    site.routes["/"] = answer(200, b"internal")

    with pytest.raises(outbound.UnsafeURL) as refused:
        outbound.fetch(url.format(port=site.port), timeout=2)

    assert why in str(refused.value)
    assert site.requests == []


def test_a_host_with_any_private_address_is_refused(private_refused, monkeypatch):
    fake_dns(monkeypatch, {"split.example": ["93.184.215.14", "10.0.0.7"]})

    with pytest.raises(outbound.UnsafeURL, match=r"'split.example' resolves to 10.0.0.7, which is not a public"):
        outbound.check_url("https://split.example/")


@pytest.mark.django_db
def test_a_webhook_to_a_numeric_loopback_host_is_a_400_naming_the_webhook(api, user, private_refused):
    conversation = Conversation.objects.create(owner=user)

    response = api.post(
        f"/api/conversations/{conversation.pk}/runs/",
        {"spec": {"skill": "echo"}, "webhook": "http://2130706433/hook"},
        format="json",
    )

    assert response.status_code == 400
    assert "resolves to 127.0.0.1, which is not a public address" in response.json()["webhook"][0]
    assert not Run.objects.exists()


# --- The address connected to ---------------------------------------------------------


def test_the_call_goes_to_the_address_checked_with_the_urls_host(private_allowed, site, monkeypatch):
    asked = fake_dns(monkeypatch, {"service.example": ["127.0.0.1"]})
    site.routes["/hello"] = answer(200, b"hello")

    response = outbound.fetch(f"http://service.example:{site.port}/hello")

    assert (response.status_code, response.text) == (200, "hello")
    assert str(response.url) == f"http://service.example:{site.port}/hello"
    assert site.requests[0]["headers"]["Host"] == f"service.example:{site.port}"
    assert asked == ["service.example"]  # resolved once: a second answer could not move the call


# --- Redirects --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "internal",
    [
        "http://127.0.0.1:{port}/internal",
        "http://2130706433:{port}/internal",
        "http://[::ffff:127.0.0.1]:{port}/internal",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
    ],
)
def test_a_redirect_from_an_allowed_server_to_the_internal_network_is_refused(private_allowed, site, internal):
    def public_server_redirecting_inward(handler: BaseHTTPRequestHandler) -> None:
        # The first hop stood for a public server; from here on, production's policy.
        private_allowed.OUTBOUND_ALLOW_PRIVATE = False
        redirect(internal.format(port=site.port))(handler)

    site.routes["/start"] = public_server_redirecting_inward
    site.routes["/internal"] = answer(200, b"internal secrets")

    with pytest.raises(outbound.UnsafeURL, match=r"not a public address|only http and https"):
        outbound.fetch(site.url("/start"), timeout=2)

    assert site.paths() == ["/start"]


def test_redirects_are_followed_when_each_is_allowed(private_allowed, site):
    site.routes["/a"] = redirect("/b", 301)
    site.routes["/b"] = redirect(site.url("/c"), 307)
    site.routes["/c"] = answer(200, b"done")

    response = outbound.fetch(site.url("/a"))

    assert (response.status_code, response.text, str(response.url)) == (200, "done", site.url("/c"))
    assert site.paths() == ["/a", "/b", "/c"]


def test_redirects_past_the_cap_are_not_followed(private_allowed, site):
    site.routes["/loop"] = redirect("/loop")

    with pytest.raises(outbound.TooManyRedirects, match="more than 3 redirects"):
        outbound.fetch(site.url("/loop"), max_redirects=3)

    assert site.paths() == ["/loop"] * 4


def test_a_redirect_to_another_origin_does_not_carry_credentials(private_allowed, site, other_site):
    site.routes["/here"] = redirect("/still-here")
    site.routes["/still-here"] = redirect(other_site.url("/there"))
    other_site.routes["/there"] = answer(200, b"ok")
    headers = {"Authorization": "Bearer secret", "Cookie": "a=b", "Accept": "text/plain"}

    outbound.fetch(site.url("/here"), headers=headers)

    assert site.requests[1]["headers"]["Authorization"] == "Bearer secret"
    sent_there = other_site.requests[0]["headers"]
    assert "Authorization" not in sent_there
    assert "Cookie" not in sent_there
    assert sent_there["Accept"] == "text/plain"


def test_a_webhook_post_does_not_follow_a_redirect(private_allowed, site):
    site.routes["/hook"] = redirect("/elsewhere", 307)

    reply = outbound.post(site.url("/hook"), b"{}", {}, timeout=2)

    assert reply.status == 307
    assert site.paths() == ["/hook"]


# --- Size and time caps ---------------------------------------------------------------


def test_a_response_declared_larger_than_the_cap_is_refused(private_allowed, site):
    site.routes["/big"] = answer(200, b"x" * 5000)

    with pytest.raises(outbound.ResponseTooLarge, match="the response is 5000 bytes, more than the 1000 allowed"):
        outbound.fetch(site.url("/big"), max_bytes=1000)


def test_reading_stops_once_an_undeclared_body_passes_the_cap(private_allowed, site):
    sent: list[int] = []

    def endless() -> Iterator[bytes]:
        while len(sent) < 10_000:
            sent.append(1)
            yield b"y" * 1024

    site.routes["/stream"] = chunked(endless())

    with pytest.raises(outbound.ResponseTooLarge, match="more than the 4096 bytes allowed"):
        outbound.fetch(site.url("/stream"), max_bytes=4096)

    assert len(sent) < 10_000


def test_a_webhook_reply_keeps_only_the_start_of_a_large_body(private_allowed, site):
    site.routes["/hook"] = answer(200, b"z" * (outbound.RESPONSE_LIMIT + 5000))

    reply = outbound.post(site.url("/hook"), b"{}", {}, timeout=2)

    assert (reply.status, len(reply.body)) == (200, outbound.RESPONSE_LIMIT)


def test_a_dripping_response_is_cut_at_the_time_limit(private_allowed, site):
    site.routes["/drip"] = chunked(iter([b"."] * 100), pause=0.1)
    started = time.monotonic()

    with pytest.raises(outbound.DeadlineExceeded, match="took longer than its time limit"):
        outbound.fetch(site.url("/drip"), timeout=0.5)

    assert time.monotonic() - started < 2


def test_a_server_that_does_not_answer_times_out(private_allowed, site):
    site.routes["/silent"] = lambda handler: time.sleep(3)
    started = time.monotonic()

    with pytest.raises(httpx.TimeoutException):
        outbound.fetch(site.url("/silent"), timeout=0.5)

    assert time.monotonic() - started < 2
