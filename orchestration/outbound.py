"""Outbound HTTP that cannot be pointed at the service's own network (SSRF).

A URL given by a user (a webhook) is resolved once; every address it
resolves to must be public (not loopback, private, link-local, multicast,
reserved), unless OUTBOUND_ALLOW_PRIVATE says otherwise (development, tests).
The request then connects to the address that was checked, so a DNS answer
that changes in between (rebinding) cannot redirect it; the URL's host is
still sent as Host and as the TLS server name, so certificates are verified
as usual. Redirects are not followed, and time and response size are capped.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import httpx
from django.conf import settings

ALLOWED_SCHEMES = ("http", "https")
RESPONSE_LIMIT = 64 * 1024  # bytes of a response kept (for the delivery record)


class UnsafeURL(ValueError):
    """The URL may not be called; the message says why."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: str


def check_url(url: str) -> list[str]:
    """The addresses ``url`` may be called at; raises UnsafeURL if none or any is not allowed."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise UnsafeURL(f"only http and https URLs are allowed, not {parsed.scheme or 'none'!r}")
    if not parsed.host:
        raise UnsafeURL("the URL has no host")
    if parsed.userinfo:
        raise UnsafeURL("the URL must not carry credentials")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"the host {parsed.host!r} does not resolve: {exc.strerror}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if not _allowed(ipaddress.ip_address(address)):
            raise UnsafeURL(f"the host {parsed.host!r} resolves to {address}, which is not a public address")
    return addresses


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_global or settings.OUTBOUND_ALLOW_PRIVATE


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Reply:
    """POST ``body`` to ``url`` at an address ``check_url`` allowed.

    Raises UnsafeURL, or httpx.HTTPError when the call fails (connect,
    timeout, protocol).
    """
    address = check_url(url)[0]
    target = httpx.URL(url)
    pinned = target.copy_with(host=address)
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    request_headers = {**headers, "Host": target.netloc.decode("ascii")}
    with (
        httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
        client.stream("POST", pinned, content=body, headers=request_headers, extensions=extensions) as response,
    ):
        kept = b""
        for chunk in response.iter_bytes():
            kept += chunk[: RESPONSE_LIMIT - len(kept)]
            if len(kept) >= RESPONSE_LIMIT:
                break
        return Reply(status=response.status_code, body=kept.decode("utf-8", "replace"))
