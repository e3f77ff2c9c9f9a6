"""The skill registry: ``@skill`` declares a function ``(ctx, input) -> output`` and how the engine schedules it.

Inputs and outputs cross the broker as JSON, so both must be JSON values.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class SkillError(Exception):
    """A skill failed in an expected way; the message is shown to users.

    ``transient=False``: a retry cannot help (bad input), so the step fails at once even if retries are declared.
    """

    def __init__(self, message: str = "", *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> Any:
        # Keeps ``transient`` when the exception is pickled (a retry carries it).
        return (_skill_error, (type(self), str(self), self.transient))


def _skill_error(cls: type[SkillError], message: str, transient: bool) -> SkillError:
    error = cls.__new__(cls)
    SkillError.__init__(error, message, transient=transient)
    return error


NO_DEFAULT: Any = object()


@dataclass(frozen=True)
class Breaker:
    """A skill's circuit breaker: open after ``fail_max`` consecutive failed attempts, for ``reset_timeout`` seconds."""

    fail_max: int = 5
    reset_timeout: float = 30

    def check(self, skill: str) -> str | None:
        """What is wrong with this declaration, or None."""
        if self.fail_max < 1 or self.reset_timeout <= 0:
            return f"skill {skill}: a breaker needs fail_max >= 1 and reset_timeout > 0"
        return None


class ConversationAccess(Protocol):
    """What the engine lets a step's skill do with its run's conversation."""

    def remember(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the conversation's state, at once (not with the step's output)."""

    def recent_messages(self, limit: int) -> list[tuple[str, str]]:
        """The conversation's last ``limit`` messages as (role, content), oldest first."""
        ...


# Seconds an outbound call of a skill leaves before its step's soft limit (SkillContext.time_for_call).
CALL_MARGIN = 1.0


@dataclass(frozen=True)
class Wait:
    """What a skill returns to wait for input (a human, an external event): ``return ctx.wait(...)``.

    Output: the payload it is resumed with (over ``base`` when both are objects); after ``timeout``, ``default``.
    """

    prompt: str
    timeout: float | None = None
    default: Any = NO_DEFAULT
    base: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """As JSON: what the step keeps (Step.wait) and a retry carries."""
        wait: dict[str, Any] = {"prompt": self.prompt, "timeout": self.timeout}
        if self.default is not NO_DEFAULT:
            wait["default"] = self.default
        if self.base is not None:
            wait["base"] = self.base
        return wait

    @classmethod
    def of(cls, record: dict[str, Any]) -> Wait:
        return cls(record["prompt"], record["timeout"], record.get("default", NO_DEFAULT), record.get("base"))


@dataclass(frozen=True)
class SkillContext:
    """What a skill knows about the step it runs in, and what it may ask of the engine."""

    run_id: int
    step_id: int
    step_key: str
    conversation_id: int | None
    state: dict[str, Any]
    args: dict[str, Any]
    attempt: int
    # When the run must have ended; None: no deadline known.
    deadline: datetime | None = None
    # The step's soft time limit (seconds) and when its skill was called (time.monotonic()).
    soft_time_limit: float | None = None
    started: float = field(default_factory=time.monotonic)
    skill: str = ""
    # The run's conversation as the engine lets the skill use it; None outside a conversation.
    conversation: ConversationAccess | None = field(default=None, repr=False, compare=False)

    @property
    def log(self) -> logging.Logger:
        """The skill's logger (``skills.run.<skill>``); its lines carry the run, step and skill ids."""
        return logging.getLogger(f"skills.run.{self.skill or 'unknown'}")

    def remaining(self) -> float | None:
        """Seconds left of the run's deadline (0 once past); None without one.

        A skill that calls out (a model, a fetch) can pass it on as its timeout.
        """
        if self.deadline is None:
            return None
        return max(0.0, self.deadline.timestamp() - time.time())

    def time_for_call(self, cap: float, margin: float = CALL_MARGIN) -> float:
        """Seconds an outbound call may take (0 when none is left): at most ``cap``.

        It ends ``margin`` seconds before the step's soft time limit and the run's deadline.
        """
        left = [cap]
        if self.soft_time_limit is not None:
            left.append(self.soft_time_limit - (time.monotonic() - self.started) - margin)
        if (remaining := self.remaining()) is not None:
            left.append(remaining - margin)
        return max(0.0, min(left))

    def remember(self, **values: Any) -> None:
        """Merge ``values`` (JSON) into the conversation's state, which later steps and runs see as ``ctx.state``.

        Stored at once, not with the step's output. No-op outside a conversation.
        """
        if self.conversation is not None:
            self.conversation.remember(values)

    def recent_messages(self, limit: int) -> list[tuple[str, str]]:
        """The conversation's last ``limit`` messages as (role, content), oldest first; none outside one."""
        return self.conversation.recent_messages(limit) if self.conversation is not None else []

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and redeliveries: use it for external calls."""
        return f"{self.run_id}:{self.step_key}"

    def wait(
        self, prompt: str, timeout: float | None = None, default: Any = NO_DEFAULT, base: dict[str, Any] | None = None
    ) -> Wait:
        """A request to wait for input, for the skill to return (see Wait); ``default`` needs a ``timeout``."""
        if not isinstance(prompt, str) or not prompt:
            raise SkillError("wait: the prompt must be a non-empty string")
        if timeout is not None and (
            isinstance(timeout, bool) or not (isinstance(timeout, int | float) and timeout > 0)
        ):
            raise SkillError(f"wait: the timeout must be a positive number of seconds, not {timeout!r}")
        if default is not NO_DEFAULT and timeout is None:
            raise SkillError("wait: a default is taken when the wait times out, so it needs a timeout")
        if base is not None and not isinstance(base, dict):
            raise SkillError(f"wait: the base must be an object, not {type(base).__name__}")
        return Wait(prompt, None if timeout is None else float(timeout), default, base)


SkillFunc = Callable[[SkillContext, Any], Any]


@dataclass(frozen=True)
class Skill:
    name: str
    func: SkillFunc = field(repr=False)
    description: str
    soft_time_limit: float
    time_limit: float
    max_soft_time_limit: float
    max_time_limit: float
    retries: int
    backoff: float
    backoff_max: float
    queue: str
    optional: bool
    # Seconds a successful output is reused for the same input and args; None: never.
    cache_ttl: float | None = None
    breaker: Breaker | None = None
    fallback: Any = None  # the output of a skipped (optional) step of this skill
    # The skill that undoes a successful step of this one when its run fails (saga); None: nothing to undo.
    compensate: str | None = None
    # Applied to a new message's input at intake when a run starts with this skill, so
    # what the skill would remove (personal data) is never stored; None: nothing.
    intake: Callable[[Any], Any] | None = field(default=None, repr=False)

    def check(self) -> None:
        """Refuse a declaration whose limits contradict each other."""
        if not 0 < self.soft_time_limit < self.time_limit:
            raise ImproperlyConfigured(f"skill {self.name}: need 0 < soft_time_limit < time_limit")
        if self.soft_time_limit > self.max_soft_time_limit or self.time_limit > self.max_time_limit:
            raise ImproperlyConfigured(f"skill {self.name}: default limits exceed its maxima")
        if self.max_time_limit > settings.STEP_MAX_TIME_LIMIT:
            raise ImproperlyConfigured(
                f"skill {self.name}: max_time_limit exceeds STEP_MAX_TIME_LIMIT={settings.STEP_MAX_TIME_LIMIT}"
            )
        if self.retries < 0 or self.backoff < 0:
            raise ImproperlyConfigured(f"skill {self.name}: retries and backoff must not be negative")
        if self.cache_ttl is not None and not self.cache_ttl > 0:
            raise ImproperlyConfigured(f"skill {self.name}: cache_ttl must be a positive number of seconds (or None)")
        if self.compensate is not None and (not isinstance(self.compensate, str) or self.compensate == self.name):
            raise ImproperlyConfigured(f"skill {self.name}: compensate must name another skill")
        if self.breaker is not None and (problem := self.breaker.check(self.name)):
            raise ImproperlyConfigured(problem)
        try:
            json.dumps(self.fallback)
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"skill {self.name}: fallback must be a JSON value ({exc})") from exc


class Registry:
    def __init__(self) -> None:
        self._skills: dict[str, Skill] = {}

    def register(self, skill: Skill) -> None:
        if skill.name in self._skills:
            raise ImproperlyConfigured(f"skill {skill.name} is registered twice")
        skill.check()
        self._skills[skill.name] = skill

    def get(self, name: str) -> Skill | None:
        return self._skills.get(name)

    def __iter__(self) -> Iterator[Skill]:
        return iter(sorted(self._skills.values(), key=lambda s: s.name))

    def compensation_of(self, skill_name: str) -> Skill | None:
        """The skill that compensates a step of ``skill_name``; None if it declares none (or is unknown).

        Raises ImproperlyConfigured naming both when the declared compensating skill is not registered.
        """
        declared = self._skills.get(skill_name)
        if declared is None or declared.compensate is None:
            return None
        compensating = self._skills.get(declared.compensate)
        if compensating is None:
            raise ImproperlyConfigured(
                f'skill {skill_name}: its compensating skill "{declared.compensate}" is not registered'
            )
        return compensating

    def check_compensations(self) -> None:
        """Every declared compensating skill is registered (else ImproperlyConfigured)."""
        for name in self._skills:
            self.compensation_of(name)

    def queues(self) -> list[str]:
        return sorted({s.queue for s in self._skills.values()})


registry = Registry()


def skill(
    name: str | None = None,
    *,
    description: str = "",
    soft_time_limit: float = 30,
    time_limit: float = 40,
    max_soft_time_limit: float | None = None,
    max_time_limit: float | None = None,
    retries: int = 0,
    backoff: float = 1.0,
    backoff_max: float = 60,
    queue: str = "default",
    optional: bool = False,
    cache_ttl: float | None = None,
    breaker: Breaker | None = None,
    fallback: Any = None,
    compensate: str | None = None,
    intake: Callable[[Any], Any] | None = None,
) -> Callable[[SkillFunc], SkillFunc]:
    """Register a function as a skill; the maxima default to the limits, the description to the docstring.

    What each argument does: docs/skills.md, "Choosing the declaration".
    """

    def register(func: SkillFunc) -> SkillFunc:
        registry.register(
            Skill(
                name=name or func.__name__,
                func=func,
                description=description or (func.__doc__ or "").strip(),
                soft_time_limit=soft_time_limit,
                time_limit=time_limit,
                max_soft_time_limit=max_soft_time_limit or soft_time_limit,
                max_time_limit=max_time_limit or time_limit,
                retries=retries,
                backoff=backoff,
                backoff_max=min(backoff_max, settings.STEP_MAX_BACKOFF),
                queue=queue,
                optional=optional,
                cache_ttl=cache_ttl,
                breaker=breaker,
                fallback=fallback,
                compensate=compensate,
                intake=intake,
            )
        )
        return func

    return register
