"""Every API error is JSON that says what is wrong."""

from __future__ import annotations

import logging
from typing import Any

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

log = logging.getLogger(__name__)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, (OperationalError, InterfaceError)):
        # The database is down or restarting: a clear, retryable answer, not a 500.
        log.warning("database unavailable: %s", exc)
        body = {"detail": "the database is unavailable; try again shortly"}
        return Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "5"})
    return drf_exception_handler(exc, context)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Django's 404 when no route matched (an unknown path, an id like ``/api/runs/2.5e-3/``).

    JSON under /api/, the HTML page elsewhere.
    """
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "no API resource at this URL"}, status=404)
    return defaults.page_not_found(request, exception)
