"""A request whose body is larger than REQUEST_MAX_BYTES is answered 413 unread.

Django refuses such a body itself (DATA_UPLOAD_MAX_MEMORY_SIZE, which settings
set to the same value) when DRF reads it as JSON or a form, but as a
SuspiciousOperation: an HTML 400 page that does not say what is wrong. A
multipart body's files are not counted there at all. The declared length is
what a WSGI server lets Django read, so checking it covers every parser.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


class RequestBodyLimitMiddleware:
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
