"""Template context for every page."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest


def flower(request: HttpRequest) -> dict[str, str]:
    """FLOWER_URL, for the admin's link to Flower."""
    return {"flower_url": settings.FLOWER_URL}
