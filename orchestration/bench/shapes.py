"""The benchmark's workflow shapes, as agentsite specs of ``echo`` steps.

``raw.canvas(name)`` builds the same shape as a plain Celery canvas.
"""

from __future__ import annotations

from typing import Any

ECHO = {"skill": "echo"}
SHAPES: dict[str, dict[str, Any]] = {
    "single": ECHO,
    "chain3": {"chain": [ECHO, ECHO, ECHO]},
    "group10": {"group": [ECHO] * 10},
    "chord10": {"chord": {"header": [ECHO] * 10, "body": ECHO}},
}


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]
