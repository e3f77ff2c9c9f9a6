"""Every Celery task of the service: the step runtime, a canvas's helpers, the sweeper and webhooks.

``run_step`` is thin: claim the step by id, call its skill, persist the outcome, return the output.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from celery import Task, shared_task, signature
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TimeLimitExceeded
from django.conf import settings
from kombu.exceptions import OperationalError as BrokerUnavailable

from agentsite import telemetry
from skills import breakers, cache
from skills.registry import SkillContext, SkillError, Wait, registry

from . import budget, canvas, routing, services, transitions, webhooks
from .broker import DELIVERY_HEADER
from .models import Message, Step, StepStatus
from .transitions import ClaimOutcome, StepRef
from .worker import DATABASE_DOWN, delivery_of, terminated_only_after

log = logging.getLogger(__name__)

# Seconds before a copy of a running step's own message asks again (ClaimOutcome.BUSY).
BUSY_RECHECK = 1.0


class StepHalted(Exception):
    """The step ended the run (or found it ended): stop this canvas branch."""


class StepTask(Task):
    Request = "orchestration.worker:StepRequest"
    # Expected outcomes: recorded, not logged as worker errors.
    throws = (StepHalted,)

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A hard time limit, or a bug: the step fails (a database or broker outage is the sweeper's)."""
        step_id = kwargs.get("step_id")
        if step_id is None or isinstance(exc, StepHalted):
            return
        if isinstance(exc, TimeLimitExceeded):
            limit = exc.args[0] if exc.args else "?"
            error = f"killed at the hard time limit ({limit}s){budget.past_deadline(kwargs)}"
            transitions.fail_step(step_id, error, StepStatus.TIMED_OUT, task_id=task_id)
        elif isinstance(exc, (BrokerUnavailable, *DATABASE_DOWN)):
            log.warning("step %s: left for the sweeper after %r", step_id, exc)
        else:
            transitions.fail_step(step_id, f"internal error: {exc!r}", task_id=task_id)


@shared_task(bind=True, base=StepTask, name=canvas.STEP_TASK, acks_late=True, max_retries=None)
def run_step(
    self: Task,
    upstream: Any,
    *,
    step_id: int,
    retry: dict[str, float],
    done: dict[str, Any] | None = None,
    outages: int = 0,
    finishes_run: bool = False,
    deadline: dict[str, float] | None = None,
) -> Any:
    """Run one step on ``upstream``; with ``finishes_run`` (the spec's last step) its output ends the run too.

    After a database outage it retries as the same delivery, ``done`` carrying a skill output still to store.
    """
    telemetry.bind_step(step_id=step_id)
    delivery = delivery_of(self.request)
    try:
        if done is not None:
            return _store(StepRef.load(step_id), delivery, _output(done), finishes_run, done.get("cached", False))
        return _run(self, upstream, step_id, delivery, retry, finishes_run, resuming=outages > 0)
    except DATABASE_DOWN as exc:
        _retry_later(self, exc, outages)
        raise  # not reached: _retry_later raises


def _run(
    task: Task, upstream: Any, step_id: int, delivery: str, retry: dict[str, float], finishes_run: bool, resuming: bool
) -> Any:
    claim = transitions.claim_step(step_id, delivery, resuming)
    step = claim.step
    telemetry.bind_step(run_id=step.run_id, skill=step.skill)
    if claim.outcome is ClaimOutcome.BUSY:  # the same delivery: it is this message again
        raise task.retry(countdown=BUSY_RECHECK, max_retries=None, headers=_headers(task, delivery))
    if claim.outcome is not ClaimOutcome.RUN:
        return _not_run(claim)
    skill = registry.get(step.skill)
    if skill is None:
        transitions.fail_step(step.pk, f'skill "{step.skill}" is not registered on this worker')
        raise StepHalted(step.skill)
    time_left = budget.StepBudget.at_start(_kwargs(task), task.request.timelimit)
    if spent := time_left.spent_error():
        transitions.fail_step(step.pk, spent, StepStatus.TIMED_OUT)
        raise StepHalted(f"step {step.key}: {spent}")
    try:
        with time_left.enforced():
            output, cached = cache.call(skill, skill_context(step, time_left.deadline), upstream, call=breakers.call)
    except Exception as exc:  # noqa: BLE001 - every skill failure is recorded
        return _handle_failure(task, step, delivery, exc, retry, finishes_run)
    try:
        with terminated_only_after():
            return _store(StepRef.of(step), delivery, output, finishes_run, cached)
    except DATABASE_DOWN as exc:
        # The skill's work is done: retry storing its output, never the skill.
        _retry_later(task, exc, _kwargs(task).get("outages", 0), done=_done(output, cached))
        raise  # not reached: _retry_later raises


def _store(step: StepRef, delivery: str, output: Any, finishes_run: bool, cached: bool = False) -> Any:
    if isinstance(output, Wait):  # the step waits: nothing to pass on, and no worker held meanwhile
        if not transitions.wait_step(step, delivery, output.record()):
            raise Ignore()
        raise StepHalted(f"step {step.id} waits for input")
    if not transitions.succeed_step(step, output, delivery, finishes_run, cached):
        raise Ignore()  # the run ended, or the sweeper gave the step to another message
    return output


def _not_run(claim: transitions.Claim) -> Any:
    """A finished step passes its output on; a duplicate is dropped; a step of a run that ended stops its branch."""
    step = claim.step
    if claim.outcome is ClaimOutcome.STORED:
        return step.output
    if claim.outcome is ClaimOutcome.DUPLICATE:
        raise Ignore()
    if claim.outcome is ClaimOutcome.RUN_ENDED and step.status in transitions.UNFINISHED_STEP_STATUSES:
        transitions.cancel_step(StepRef.of(step), f"not run: the run {step.run.status}")
    raise StepHalted(f"step {step.key}: {claim.outcome.value}")


def _handle_failure(
    task: Task, step: Step, delivery: str, exc: Exception, retry: dict[str, float], finishes_run: bool
) -> Any:
    """The skill raised: retry with backoff, else skip an optional step, else fail the step and its run."""
    timed_out = isinstance(exc, SoftTimeLimitExceeded)
    own_timeout = f"timed out after {step.soft_time_limit:g}s (soft limit)"
    error = (budget.timeout_error(exc) or own_timeout) if timed_out else _message(exc)
    if step.attempts <= retry["max"] and _may_retry(exc):
        countdown = backoff(step.attempts, retry["backoff"], retry["backoff_max"])
        transitions.retry_step(StepRef.of(step), error, countdown, timed_out)
        # A new delivery: if this message is redelivered too, only one of them runs.
        kwargs = {k: v for k, v in _kwargs(task).items() if k not in ("done", "outages")}
        raise task.retry(kwargs=kwargs, countdown=countdown, exc=exc, headers=_headers(task, uuid.uuid4().hex))
    if not isinstance(exc, SkillError | SoftTimeLimitExceeded | breakers.CircuitOpen):
        # A bug or an outage, not an outcome the skill chose: its traceback goes to the log (and Sentry).
        log.error("step %s: skill %s raised %s", step.pk, step.skill, type(exc).__name__, exc_info=exc)
    if step.optional:
        fallback = _fallback(step.skill)
        if not transitions.skip_step(StepRef.of(step), error, delivery, finishes_run, timed_out, output=fallback):
            raise Ignore()
        return fallback
    transitions.fail_step(step.pk, error, StepStatus.TIMED_OUT if timed_out else StepStatus.FAILED)
    raise StepHalted(error) from exc


def _may_retry(exc: Exception) -> bool:
    """An open circuit would be open on a retry too; a non-transient SkillError would fail the same way."""
    if isinstance(exc, breakers.CircuitOpen):
        return False
    return not (isinstance(exc, SkillError) and not exc.transient)


def _fallback(name: str) -> Any:
    skill = registry.get(name)
    return skill.fallback if skill is not None else None


def backoff(attempt: int, factor: float, maximum: float) -> float:
    """Exponential backoff with jitter: about factor * 2**(attempt-1), capped."""
    return min(maximum, factor * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _retry_later(task: Task, exc: Exception, outages: int, done: dict[str, Any] | None = None) -> None:
    """Retry as the same delivery after a database outage, with backoff; past STEP_DB_RETRIES, re-raise."""
    if outages >= settings.STEP_DB_RETRIES:
        raise exc
    kwargs = {**_kwargs(task), "outages": outages + 1}
    if done is not None:
        kwargs["done"] = done
    log.warning("step %s: database unavailable (%r); retry %s", kwargs.get("step_id"), exc, outages + 1)
    countdown = backoff(outages + 1, 1, settings.STEP_DB_BACKOFF_MAX)
    raise task.retry(kwargs=kwargs, countdown=countdown, exc=exc, headers=_headers(task, delivery_of(task.request)))


def _done(output: Any, cached: bool) -> dict[str, Any]:
    """A skill's outcome still to store, as a retry's JSON kwargs carry it."""
    return {"wait": output.record()} if isinstance(output, Wait) else {"output": output, "cached": cached}


def _output(done: dict[str, Any]) -> Any:
    return Wait.of(done["wait"]) if "wait" in done else done["output"]


def _headers(task: Task, delivery: str) -> dict[str, Any]:
    """Headers for a retry of this step's message as ``delivery``."""
    return {**(task.request.headers or {}), DELIVERY_HEADER: delivery}


def _kwargs(task: Task) -> dict[str, Any]:
    return dict(task.request.kwargs or {})


def _message(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


# --- What a skill gets --------------------------------------------------------------


def skill_context(step: Step, deadline: budget.Deadline | None = None) -> SkillContext:
    """The context of a claimed step's skill (the step comes with its run and the run's conversation)."""
    conversation = step.run.conversation
    return SkillContext(
        run_id=step.run_id,
        step_id=step.pk,
        step_key=step.key,
        conversation_id=conversation.pk if conversation else None,
        state=dict(conversation.state) if conversation else {},
        args=step.args,
        attempt=step.attempts,
        deadline=deadline.as_datetime() if deadline else None,
        soft_time_limit=step.soft_time_limit,
        skill=step.skill,
        conversation=StepConversation(conversation.pk, step.run_id, step.pk) if conversation else None,
    )


@dataclass(frozen=True)
class StepConversation:
    """A step's run's conversation as its skill may use it (skills.registry.ConversationAccess)."""

    conversation_id: int
    run_id: int
    step_id: int

    def remember(self, values: dict[str, Any]) -> None:
        transitions.update_conversation_state(self.conversation_id, self.run_id, self.step_id, values)

    def recent_messages(self, limit: int) -> list[tuple[str, str]]:
        latest = Message.objects.filter(conversation_id=self.conversation_id).order_by("-id")[:limit]
        return [(role, content) for role, content in reversed(latest.values_list("role", "content"))]


# --- A canvas's helpers ---------------------------------------------------------------


@shared_task(
    name=canvas.FINISH_TASK,
    acks_late=True,
    soft_time_limit=30,
    time_limit=60,
    autoretry_for=DATABASE_DOWN,
    retry_backoff=1,
    retry_backoff_max=settings.STEP_DB_BACKOFF_MAX,
    max_retries=settings.STEP_DB_RETRIES,
)
def finish_run(output: Any, *, run_id: int) -> None:
    """The canvas's last link after a final group: the run succeeded with the spec's output."""
    transitions.succeed_run(run_id, output)


@shared_task(name=canvas.COLLECT_TASK, acks_late=True, soft_time_limit=30, time_limit=60)
def collect(outputs: list[Any]) -> list[Any]:
    """A chord body that passes its header's outputs on as one list (canvas._collected says where)."""
    return outputs


@shared_task(name=canvas.PASS_ON_TASK, acks_late=True, soft_time_limit=30, time_limit=60)
def pass_on(output: Any) -> Any:
    """Returns its input: ends a switch's chosen case where a group or chord waits for the switch's task id."""
    return output


class SwitchTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A bug (or a database outage beyond its retries): the run fails rather than waiting for nothing."""
        routes = [*kwargs.get("cases", {}).values(), kwargs.get("default")]
        steps = [step for route in routes if route for step in route["steps"]]
        if steps:
            run_id = transitions.run_of_step(steps[0])
            transitions.fail_run(run_id, f"switch {kwargs.get('switch')}: internal error: {exc!r}")


@shared_task(
    bind=True,
    base=SwitchTask,
    name=canvas.SWITCH_TASK,
    acks_late=True,
    soft_time_limit=30,
    time_limit=60,
    autoretry_for=DATABASE_DOWN,
    retry_backoff=1,
    retry_backoff_max=settings.STEP_DB_BACKOFF_MAX,
    max_retries=settings.STEP_DB_RETRIES,
)
def switch(
    self: Task, upstream: Any, *, switch: str, on: str, cases: dict[str, Any], default: dict[str, Any] | None
) -> Any:
    """A switch node: replaced by the canvas of the case its input's field ``on`` names; the others are skipped.

    ``cases`` and ``default`` are routes: ``path``, prebuilt ``canvas``, ``steps`` ids. No route: the run fails.
    """
    choice = routing.choose(upstream, on, cases)
    route = default if choice.case is None else cases[choice.case]
    routes = [*cases.values(), *([default] if default is not None else [])]
    run_id = transitions.run_of_step(routes[0]["steps"][0])
    if route is None:
        error = routing.unmatched_error(switch, on, choice, cases)
        transitions.fail_unrouted(run_id, switch, on, choice.value, error)
        raise Ignore()
    untaken = [step for other in routes if other is not route for step in other["steps"]]
    if not transitions.route_switch(run_id, switch, on, choice.value, choice.case, route["path"], untaken):
        raise Ignore()
    case = signature(route["canvas"], app=self.app)
    return self.replace(canvas.replacement(case, upstream, joined=bool(self.request.group)))


# --- The sweeper and webhooks ----------------------------------------------------------


@shared_task(name="agentsite.sweep", acks_late=True, soft_time_limit=120, time_limit=150)
def sweep() -> dict[str, Any]:
    """Fail overdue runs, time out waits, resume stalled runs, release lost held ones, forget expired keys."""
    report = services.sweep()
    if report.expired or report.resumed or report.webhooks_resumed or report.released:
        log.warning(
            "sweep: expired runs %s, resumed runs %s, resent webhooks %s, released held runs %s",
            report.expired,
            report.resumed,
            report.webhooks_resumed,
            report.released,
        )
    if report.waits_timed_out:
        log.info("sweep: waits timed out in runs %s", report.waits_timed_out)
    return asdict(report)


@shared_task(
    name=webhooks.DELIVER_TASK,
    acks_late=True,
    soft_time_limit=60,
    time_limit=90,
    autoretry_for=DATABASE_DOWN,
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=20,
)
def deliver_webhook(delivery_id: int) -> None:
    """One attempt to POST a run's completion event (orchestration.webhooks)."""
    webhooks.deliver(delivery_id)
