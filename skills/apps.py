from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks
from django.core.exceptions import ImproperlyConfigured


class SkillsConfig(AppConfig):
    name = "skills"

    def ready(self) -> None:
        # Importing the modules registers their skills and the step task.
        from . import builtin, signals, tasks  # noqa: F401
        from .support import escalation, intent, knowledge, orders, pii, quality, reply, sentiment, sql, web  # noqa: F401

        checks.register(check_compensations)


def check_compensations(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check`` (and every management command that runs checks): each declared compensating skill exists."""
    from .registry import registry

    try:
        registry.check_compensations()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="skills.E001")]
    return []
