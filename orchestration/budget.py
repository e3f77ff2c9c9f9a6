"""A run's deadline as the time budget of its steps (docs/spec.md, "Time limits and ttl").

Every step message carries its run's deadline (run_step's ``deadline`` kwarg).
At publish its limits and expiry are capped by what remains (``cap_step_message``);
at start a step with less left than its soft limit gets a timer (``StepBudget``).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from .canvas import STEP_TASK

KWARG = "deadline"
# Seconds between a budget-capped soft limit and the hard one: Celery's pool checks limits once a second.
HARD_GRACE = 2.0
# Celery and billiard read a limit of 0 as "no limit": a spent budget publishes this instead
# (the message expires at the deadline anyway).
MIN_LIMIT = 0.1
# capped_headers rounds a capped limit to hundredths of a second (up by at most half of one).
CAP_ROUNDING = 0.01
# The soft limit Celery's pool enforces (billiard sends it to the pool process).
POOL_SOFT_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True)
class Deadline:
    """A run's deadline as its steps carry it."""

    at: float  # Unix seconds
    seconds: float  # the run's whole allowance, for messages

    @classmethod
    def of_run(cls, created_at: datetime, deadline: datetime) -> Deadline:
        return cls(at=deadline.timestamp(), seconds=round((deadline - created_at).total_seconds(), 1))

    @classmethod
    def of_kwargs(cls, kwargs: Any) -> Deadline | None:
        """The deadline in a step message's kwargs; None when it has none (or a malformed one)."""
        value = kwargs.get(KWARG) if isinstance(kwargs, dict) else None
        if not isinstance(value, dict):
            return None
        try:
            return cls(at=float(value["at"]), seconds=float(value["seconds"]))
        except (KeyError, TypeError, ValueError):
            return None

    def as_kwarg(self) -> dict[str, float]:
        return {"at": self.at, "seconds": self.seconds}

    def as_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.at, tz=UTC)

    def left(self, now: float | None = None) -> float:
        """Seconds that remain (negative once past)."""
        return self.at - (time.time() if now is None else now)

    def spent_error(self) -> str:
        return f"no time left of the run's {self.seconds:g}s deadline"

    def cut_error(self, elapsed: float) -> str:
        return f"timed out after {round(elapsed, 1):g}s: the run's {self.seconds:g}s deadline was reached"


# --- At publish -------------------------------------------------------------------


def cap_step_message(
    sender: str | None = None, headers: dict[str, Any] | None = None, body: Any = None, **_: Any
) -> None:
    """Cap a step message's time limits and expiry by what remains of its run's deadline."""
    if sender != STEP_TASK or headers is None or not isinstance(body, tuple | list) or len(body) < 2:
        return
    deadline = Deadline.of_kwargs(body[1])
    if deadline is not None:
        headers.update(capped_headers(headers, deadline, time.time()))


def capped_headers(headers: dict[str, Any], deadline: Deadline, now: float) -> dict[str, Any]:
    """The ``timelimit`` and ``expires`` headers of a step message published at ``now``, capped by ``deadline``."""
    left = max(deadline.left(max(now, _timestamp(headers.get("eta")) or now)), MIN_LIMIT)
    hard, soft = headers.get("timelimit") or (None, None)
    expires = _timestamp(headers.get("expires"))
    at = deadline.at if expires is None else min(expires, deadline.at)
    return {
        "timelimit": [_capped(hard, round(left + HARD_GRACE, 2)), _capped(soft, round(left, 2))],
        "expires": datetime.fromtimestamp(at, tz=UTC).isoformat(),
    }


def _capped(limit: float | None, cap: float) -> float:
    return cap if not limit else min(float(limit), cap)


def _timestamp(iso: Any) -> float | None:
    """Unix seconds of an ISO 8601 header (Celery writes eta and expires so); naive means UTC, as Celery's."""
    if not isinstance(iso, str) or not iso:
        return None
    moment = datetime.fromisoformat(iso)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# --- At start ---------------------------------------------------------------------


@dataclass(frozen=True)
class StepBudget:
    """What remains of the run's deadline as one delivery of a step starts."""

    deadline: Deadline | None
    left: float | None  # seconds, when the step started
    published_soft: float | None  # the soft limit Celery's pool enforces for this message

    @classmethod
    def at_start(cls, kwargs: Any, timelimit: Any) -> StepBudget:
        deadline = Deadline.of_kwargs(kwargs)
        soft = timelimit[1] if isinstance(timelimit, list | tuple) and len(timelimit) == 2 else None
        return cls(deadline, None if deadline is None else deadline.left(), soft or None)

    def spent_error(self) -> str | None:
        """Why the step may not start (no time is left of its run's deadline); None if it may."""
        if self.deadline is None or self.left is None or self.left > 0:
            return None
        return self.deadline.spent_error()

    @contextmanager
    def enforced(self) -> Iterator[None]:
        """Run the skill within what is left: with less left than the message's soft limit, a timer raises
        DeadlineReached (a SoftTimeLimitExceeded) at the deadline, and the pool's own soft limit signal
        is ignored until the next task starts (``restore_pool_soft_limit``).
        """
        if self.deadline is None or self.left is None or not self._is_shorter():
            yield
            return
        with _timer(self.left, self.deadline):
            yield

    def _is_shorter(self) -> bool:
        """Whether less is left than the soft limit the pool enforces for this message, or as much within
        CAP_ROUNDING: then the timer cuts the step, and its error names the deadline.
        """
        assert self.left is not None
        return self.published_soft is None or self.left < self.published_soft + CAP_ROUNDING


class DeadlineReached(SoftTimeLimitExceeded):
    """A soft time limit set by the run's deadline; its message says so."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "the run's deadline was reached"


def timeout_error(exc: BaseException) -> str | None:
    """The error of a soft timeout the run's deadline caused; None for the step's own soft limit."""
    return str(exc) if isinstance(exc, DeadlineReached) else None


class _PoolSoftLimit:
    """The pool's soft limit handler, while set aside for the budget's timer."""

    handler: Any = None


@contextmanager
def _timer(seconds: float, deadline: Deadline) -> Iterator[None]:
    """Raise DeadlineReached in this (the pool process's main) thread after ``seconds``."""
    if threading.current_thread() is not threading.main_thread():
        yield  # a thread pool: signals go to the main thread; the published limits still hold
        return
    started = time.monotonic()

    def cut(signum: int, frame: Any) -> None:
        raise DeadlineReached(deadline.cut_error(time.monotonic() - started))

    if _PoolSoftLimit.handler is None:
        _PoolSoftLimit.handler = signal.signal(POOL_SOFT_SIGNAL, signal.SIG_IGN)
    previous = signal.signal(signal.SIGALRM, cut)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def restore_pool_soft_limit(**_: Any) -> None:
    """The next task gets the pool's soft limit back (at its start, not as the step's task ends)."""
    if _PoolSoftLimit.handler is not None:
        signal.signal(POOL_SOFT_SIGNAL, _PoolSoftLimit.handler)
        _PoolSoftLimit.handler = None


def past_deadline(kwargs: Any) -> str:
    """What to add to a step's error when its run's deadline had passed (its hard limit was the budget's)."""
    deadline = Deadline.of_kwargs(kwargs)
    if deadline is None or deadline.left() > 0:
        return ""
    return f", past the run's {deadline.seconds:g}s deadline"


# --- Queue expiry -----------------------------------------------------------------


def expired_error(kwargs: Any) -> str | None:
    """The error of a step message that expired in the queue because its run's deadline passed; else None."""
    deadline = Deadline.of_kwargs(kwargs)
    if deadline is None or deadline.left() > 0:
        return None
    return deadline.spent_error()
