"""Request rates: per user, per anonymous client, and for starting runs (docs/api.md, "Limits and throttling").

DRF's throttles count in the default cache (Redis), shared by every web process. While
Redis cannot be reached they let requests through: a Redis outage is not an API outage
(docs/operations.md, "Request limits and throttling").
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError
from rest_framework.request import Request
from rest_framework.throttling import AnonRateThrottle, SimpleRateThrottle, UserRateThrottle

log = logging.getLogger(__name__)


class FailOpenThrottle(SimpleRateThrottle):
    def allow_request(self, request: Request, view: Any) -> bool:
        try:
            return super().allow_request(request, view)
        except RedisError as exc:
            log.warning("throttle %s not applied: the cache is unavailable: %s", self.scope, exc)
            return True


class AnonThrottle(FailOpenThrottle, AnonRateThrottle):
    """Anonymous clients, by address (THROTTLE_ANON_RATE)."""


class UserThrottle(FailOpenThrottle, UserRateThrottle):
    """Each authenticated user, over the whole API (THROTTLE_USER_RATE)."""


class RunCreationThrottle(FailOpenThrottle, UserRateThrottle):
    """Each user's requests that start a run (THROTTLE_RUN_CREATE_RATE), on top of the user rate."""

    scope = "run_create"
