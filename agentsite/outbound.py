"""Outbound HTTP that cannot be pointed at the service's own network (SSRF).

Skills fetch URLs with ``fetch``; webhooks POST with ``post``. Every URL, each redirect's too, must be
http or https without credentials and resolve to public addresses only, and the request goes to the
address checked; time and body size are capped (docs/operations.md, "Outbound calls").
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from django.conf import settings

ALLOWED_SCHEMES = ("http", "https")
RESPONSE_LIMIT = 64 * 1024  # bytes of a webhook's response kept (for the delivery record)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Not sent on to another origin by a redirect.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
TRANSFER_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
# What inet_aton may read as an IPv4 address: decimal, octal or hex parts.
NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundError(Exception):
    """An outbound call was refused or cut short; the message says why."""


class UnsafeURL(OutboundError, ValueError):
    """The URL may not be called; the message says why."""


class TooManyRedirects(OutboundError):
    pass


class ResponseTooLarge(OutboundError):
    pass


class DeadlineExceeded(OutboundError):
    pass


@dataclass(frozen=True)
class Reply:
    status: int
    body: str


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is on the public internet, and so may be called."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None and not is_public(embedded):
            return False
    # is_global is False for private, loopback, link-local, shared (100.64/10) and
    # unspecified addresses, but True for multicast and some reserved ones (::/8).
    return address.is_global and not (address.is_multicast or address.is_reserved)


def check_url(url: str) -> list[str]:
    """The addresses ``url`` may be called at; raises UnsafeURL if none or any is not allowed."""
    return _checked_addresses(_parse(url))


def fetch(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
    max_bytes: int | None = None,
    max_redirects: int | None = None,
    truncate: bool = False,
) -> httpx.Response:
    """GET ``url`` and the redirects that pass the same checks, all within ``timeout``; the response (any status), read.

    Unset limits are OUTBOUND_*'s; ``truncate`` cuts a body past ``max_bytes``. Raises OutboundError or httpx.HTTPError.
    """
    limit = settings.OUTBOUND_MAX_BYTES if max_bytes is None else max_bytes
    redirects = settings.OUTBOUND_MAX_REDIRECTS if max_redirects is None else max_redirects
    deadline = _deadline(settings.OUTBOUND_TIMEOUT if timeout is None else timeout)
    target = _parse(url)
    request_headers = dict(headers or {})
    with _client() as client:
        for _ in range(redirects + 1):
            response = _exchange(client, "GET", target, None, request_headers, deadline, limit, cut=truncate)
            location = response.headers.get("location")
            if response.status_code not in REDIRECT_STATUSES or not location:
                return response
            following = _parse(str(target.join(location)))
            if _origin(following) != _origin(target):
                request_headers = {k: v for k, v in request_headers.items() if k.lower() not in CREDENTIAL_HEADERS}
            target = following
    raise TooManyRedirects(f"more than {redirects} redirects, last to {str(target)!r}")


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Reply:
    """POST ``body`` to ``url`` at an address ``check_url`` allowed, no redirects; the first RESPONSE_LIMIT bytes.

    Raises UnsafeURL or DeadlineExceeded (OutboundError), or httpx.HTTPError when the call fails.
    """
    with _client() as client:
        response = _exchange(client, "POST", _parse(url), body, headers, _deadline(timeout), RESPONSE_LIMIT, cut=True)
    return Reply(status=response.status_code, body=response.content.decode("utf-8", "replace"))


def _parse(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from exc
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise UnsafeURL(f"only http and https URLs are allowed, not {parsed.scheme or 'none'!r}")
    if not parsed.host:
        raise UnsafeURL("the URL has no host")
    if parsed.userinfo:
        raise UnsafeURL("the URL must not carry credentials")
    return parsed


def _checked_addresses(target: httpx.URL) -> list[str]:
    addresses = _resolve(target.host, _port(target))
    for address in addresses:
        if not _allowed(ipaddress.ip_address(address)):
            raise UnsafeURL(f"the host {target.host!r} resolves to {address}, which is not a public address")
    return addresses


def _resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` denotes: a numeric IPv4 host in any notation is its own, else DNS's."""
    if NUMERIC_HOST.fullmatch(host):
        try:
            return [socket.inet_ntoa(socket.inet_aton(host))]
        except OSError:
            pass  # not a number after all (say, "cafe.be"): a name
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"the host {host!r} does not resolve: {exc.strerror}") from exc
    except UnicodeError as exc:
        # IDNA encoding, before any lookup: a label empty or over 63 characters.
        raise UnsafeURL(f"the host {host!r} is not a valid host name") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _allowed(address: IPAddress) -> bool:
    return settings.OUTBOUND_ALLOW_PRIVATE or is_public(address)


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return (url.scheme, url.host, _port(url))


def _client() -> httpx.Client:
    return httpx.Client(follow_redirects=False, trust_env=False)


def _deadline(timeout: float) -> float:
    return time.monotonic() + timeout


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the call took longer than its time limit")
    return left


def _exchange(
    client: httpx.Client,
    method: str,
    target: httpx.URL,
    body: bytes | None,
    headers: Mapping[str, str],
    deadline: float,
    max_bytes: int,
    cut: bool,
) -> httpx.Response:
    """One request to the checked address of ``target``; its response with the body read (see _read)."""
    pinned = target.copy_with(host=_checked_addresses(target)[0])
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    # Identity: a compressed body could grow far past max_bytes in one decoded chunk.
    request_headers = {"Accept-Encoding": "identity", **headers, "Host": target.netloc.decode("ascii")}
    with client.stream(
        method, pinned, content=body, headers=request_headers, extensions=extensions, timeout=_time_left(deadline)
    ) as response:
        content = _read(response, deadline, max_bytes, cut)
    # The body is decoded and may be cut: headers that describe it as sent would lie.
    kept_headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in TRANSFER_HEADERS]
    return httpx.Response(
        response.status_code,
        headers=kept_headers,
        content=content,
        request=httpx.Request(method, target),
    )


def _read(response: httpx.Response, deadline: float, max_bytes: int, cut: bool) -> bytes:
    """The body, read until ``max_bytes`` (then cut, or ResponseTooLarge) or the deadline (DeadlineExceeded)."""
    declared = response.headers.get("content-length", "")
    if not cut and declared.isdigit() and int(declared) > max_bytes:
        raise ResponseTooLarge(f"the response is {declared} bytes, more than the {max_bytes} allowed")
    kept = bytearray()
    for chunk in response.iter_bytes():
        kept += chunk
        if len(kept) > max_bytes:
            if cut:
                return bytes(kept[:max_bytes])
            raise ResponseTooLarge(f"the response is more than the {max_bytes} bytes allowed")
        _time_left(deadline)
    return bytes(kept)
