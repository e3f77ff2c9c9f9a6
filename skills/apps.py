from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from agentsite import metrics

from .breakers import BreakerCollector
from .registry import registry


class SkillsConfig(AppConfig):
    name = "skills"

    def ready(self) -> None:
        # Importing the modules registers their skills.
        from . import builtin  # noqa: F401
        from .support import escalation, intent, knowledge, orders, pii, quality, reply, sentiment, sql, web  # noqa: F401

        checks.register(check_compensations)
        # GET /metrics reads the circuit breakers' state from Redis at each scrape.
        metrics.read_at_scrape(lambda: BreakerCollector(registry))


def check_compensations(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check``: each declared compensating skill is registered (skills.E001)."""
    try:
        registry.check_compensations()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="skills.E001")]
    return []
