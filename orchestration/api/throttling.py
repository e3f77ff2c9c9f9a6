"""Request rates: per user, per anonymous client, and for starting runs.

DRF's throttles keep each client's recent request times in the default cache,
which is Redis, so every web process counts into the same list. The rates
(settings.THROTTLE_RATES) come from THROTTLE_*_RATE; a refused request gets
429 with Retry-After.

When Redis cannot be reached the request is let through: a throttle must not
turn a Redis outage into an API outage, since runs are still accepted then
and published once the broker is back.
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
