"""A request whose body is larger than REQUEST_MAX_BYTES is answered 413 unread.

The check is on the declared length, which covers every parser; why Django's own check is not enough:
docs/operations.md, "Request limits and throttling".
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


class RequestBodyLimitMiddleware:
    """Answers 413 (JSON ``detail`` and ``limit``) when the declared body length exceeds REQUEST_MAX_BYTES."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        size = declared_length(request)
        limit = settings.REQUEST_MAX_BYTES
        if size > limit:
            detail = f"the request body is {size} bytes; the limit is {limit} bytes"
            return JsonResponse({"detail": detail, "limit": limit}, status=413)
        return self.get_response(request)


def declared_length(request: HttpRequest) -> int:
    """The body's Content-Length; 0 when absent or not a number (Django then reads nothing)."""
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0
