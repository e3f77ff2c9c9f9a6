from __future__ import annotations

from django.apps import AppConfig


class SkillsConfig(AppConfig):
    name = "skills"

    def ready(self) -> None:
        # Importing the modules registers their skills and the step task.
        from . import builtin, signals, tasks  # noqa: F401
