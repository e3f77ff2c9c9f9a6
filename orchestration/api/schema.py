"""The OpenAPI schema, with the error answers each operation can give.

drf-spectacular documents only the success codes; a client (and the fuzz
test, tests/test_fuzz_api.py) also needs the 4xx an operation answers, each
a JSON body that says what is wrong.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular import openapi
from drf_spectacular.utils import OpenApiResponse

from .serializers import ErrorSerializer

DETAIL = ErrorSerializer


def field_errors(description: str) -> OpenApiResponse:
    """An error body keyed by what is wrong: ``{"spec": ["..."]}``, or a ``detail``."""
    body = {"type": "object", "additionalProperties": {}, "description": "Each field in error with its messages."}
    return OpenApiResponse(response=body, description=description)


FIELD_ERRORS = field_errors("The request is invalid; the body names what is wrong.")


class AutoSchema(openapi.AutoSchema):
    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        for code, body in self._error_bodies().items():
            if code not in responses:
                responses[code] = self._get_response_for_code(body, code, direction=direction)
        return responses

    def _error_bodies(self) -> dict[str, Any]:
        """The 4xx this operation can answer, by code."""
        errors: dict[str, Any] = {"401": DETAIL, "403": DETAIL, "429": DETAIL}  # 429: throttled
        if self._validates_input():
            errors["400"] = FIELD_ERRORS
        if self._takes_a_body():
            errors["413"] = DETAIL  # a body over REQUEST_MAX_BYTES (agentsite/limits.py)
            errors["415"] = DETAIL  # a Content-Type no parser reads
        if "{" in self.path or self._is_paginated():
            errors["404"] = DETAIL  # no such object (or not the user's), or no such page
        return errors

    def _validates_input(self) -> bool:
        """A body, a filter or a declared query parameter: input that can be refused."""
        if self._takes_a_body():
            return True
        declared = [p for p in self.get_override_parameters() if getattr(p, "location", "") != "path"]
        return bool(declared or (self._is_list_view() and self._get_filter_parameters()))

    def _takes_a_body(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None

    def _is_paginated(self) -> bool:
        return self.method == "GET" and self._is_list_view() and self._get_paginator() is not None
