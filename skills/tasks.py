"""The step runtime: the one Celery task that executes any step.

Thin by design: claim the step by id, call its skill, persist the outcome
through ``orchestration.state``, return the output to the canvas. The step's
span and log lines are labelled with its run, id and skill
(``agentsite.telemetry.bind_step``). Failures
that the task cannot see itself (the hard time limit kills the process, the
queue TTL expires) reach ``StepTask.on_failure`` and ``signals.py`` in the
worker's main process.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # not in the stubs
from billiard.exceptions import WorkerLostError
from celery import Task, shared_task
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_postrun, task_prerun, worker_process_init
from celery.worker.request import Request
from django.conf import settings
from django.db import InterfaceError, OperationalError
from kombu.exceptions import OperationalError as BrokerUnavailable

from agentsite import telemetry
from agentsite.celery import DELIVERY_HEADER
from orchestration import state
from orchestration.models import Step, StepStatus
from orchestration.state import ClaimOutcome

from . import breakers, budget, cache
from .registry import SkillContext, SkillError, Wait, registry

log = logging.getLogger(__name__)


class StepHalted(Exception):
    """The step ended the run (or found it ended): stop this canvas branch."""


# The database is unreachable (restarting, failing over): retry the task.
DATABASE_DOWN = (OperationalError, InterfaceError)
# Seconds before a copy of a running step's own message asks again (state.ClaimOutcome.BUSY).
BUSY_RECHECK = 1.0
# Held while a step's output is stored: Celery's stop, and billiard's soft time limit.
HELD_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# What the worker's main process sends a step's pool process instead of
# SIGTERM when it cancels the step (StepRequest.cancel): finish it, then exit.
FINISH_THEN_EXIT = signal.SIGUSR2


class StepRequest(Request):
    """A step message as the worker's main process sees it.

    When the pool process running a step is gone before the step finished,
    the step is released, so the message may run it again when it comes
    back: a running step is otherwise claimed by no message
    (orchestration.state.claim_step). That is the case when the process
    died (SIGKILL, out of memory: Celery requeues the message, and the
    release counts toward STEP_MAX_REDELIVERIES) and when Celery stopped it
    because the broker connection was lost (the broker hands the message
    back, or lost it and the sweeper resumes the run).
    """

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        """Celery cancels a running acks-late task when the broker connection drops (and on a cold shutdown).

        A step is not stopped there: its pool process finishes it (output
        stored, next step sent) and then exits (``finish_step_then_exit``).
        Stopped mid-skill, a step whose skill had applied its effect but not
        returned yet would run, and apply it, again; and the claim already
        keeps the message's returning copy from running it twice. (In a pool
        process SIGTERM is billiard's ``_shutdown_cleanup``: a SystemExit
        raised once the call in progress returns, so an effect whose commit
        was under way when the signal came is applied, then the step stops.)
        """
        super().cancel(pool, signal=signal or FINISH_THEN_EXIT, emit_retry=emit_retry)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        self._release_if_gone(exc_info.exception)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _release_if_gone(self, exc: BaseException) -> None:
        step_id = (self.kwargs or {}).get("step_id")
        delivery = self.request_dict.get(DELIVERY_HEADER)
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        cancelled = getattr(self, "_already_cancelled", False)  # by Celery, on a lost broker connection
        revoked = getattr(self, "_already_revoked", False)
        # SystemExit and KeyboardInterrupt are how billiard reports a child that exited.
        lost = isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)) and not (cancelled or revoked)
        if step_id is None or not delivery or not (cancelled or lost):
            return
        try:
            state.release_lost_step(step_id, delivery, counted=lost)
        except DATABASE_DOWN as exc:
            # The returning message finds the step still running and asks again
            # (BUSY) until the step's lease has run out, then takes it over.
            log.warning("step %s: not released after its worker process was gone: %r", step_id, exc)


class StepTask(Task):
    Request = "skills.tasks:StepRequest"
    # Expected outcomes: recorded, not logged as worker errors.
    throws = (StepHalted,)

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        step_id = kwargs.get("step_id")
        if step_id is None or isinstance(exc, StepHalted):
            return
        if isinstance(exc, TimeLimitExceeded):
            limit = exc.args[0] if exc.args else "?"
            error = f"killed at the hard time limit ({limit}s){budget.past_deadline(kwargs)}"
            state.fail_step(step_id, error, StepStatus.TIMED_OUT, task_id=task_id)
        elif isinstance(exc, (BrokerUnavailable, *DATABASE_DOWN)):
            # Outcome not recorded, or next step not sent: the sweeper resumes the run.
            log.warning("step %s: left for the sweeper after %r", step_id, exc)
        else:
            state.fail_step(step_id, f"internal error: {exc!r}", task_id=task_id)


@shared_task(bind=True, base=StepTask, name="agentsite.run_step", acks_late=True, max_retries=None)
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
    """Run one step; with ``finishes_run`` (the spec's last step) its output ends the run too.

    ``deadline`` is the run's (skills/budget.py): the step gets only what is left of it.

    After a database outage the task retries as the same delivery
    (``_headers``); ``done`` then carries a skill output still to store
    (and whether it came from the skill result cache).
    """
    telemetry.bind_step(step_id=step_id)
    delivery = delivery_of(self.request)
    try:
        if done is not None:
            return _store(state.StepRef.load(step_id), delivery, _output(done), finishes_run, done.get("cached", False))
        return _run(self, upstream, step_id, delivery, retry, finishes_run, resuming=outages > 0)
    except DATABASE_DOWN as exc:
        _retry_later(self, exc, outages)
        raise  # not reached: _retry_later raises


def _run(
    task: Task, upstream: Any, step_id: int, delivery: str, retry: dict[str, float], finishes_run: bool, resuming: bool
) -> Any:
    claim = state.claim_step(step_id, delivery, resuming)
    step = claim.step
    telemetry.bind_step(run_id=step.run_id, skill=step.skill)
    if claim.outcome is ClaimOutcome.BUSY:
        # The same delivery: it is this message again.
        raise task.retry(countdown=BUSY_RECHECK, max_retries=None, headers=_headers(task, delivery))
    if claim.outcome is not ClaimOutcome.RUN:
        return _not_run(claim)
    skill = registry.get(step.skill)
    if skill is None:
        state.fail_step(step.pk, f'skill "{step.skill}" is not registered on this worker')
        raise StepHalted(step.skill)
    time_left = budget.StepBudget.at_start(_kwargs(task), task.request.timelimit)
    if time_left.fail_if_spent(step.pk):
        raise StepHalted(f"step {step.key}: no time left of its run's deadline")
    try:
        with time_left.enforced():
            output, cached = cache.call(skill, _context(step, time_left.deadline), upstream, call=breakers.call)
    except Exception as exc:  # noqa: BLE001 - every skill failure is recorded
        return _handle_failure(task, step, delivery, exc, retry, finishes_run)
    try:
        with _terminated_only_after():
            return _store(state.StepRef.of(step), delivery, output, finishes_run, cached)
    except DATABASE_DOWN as exc:
        # The skill's work is done: retry storing its output, never the skill.
        _retry_later(task, exc, _kwargs(task).get("outages", 0), done=_done(output, cached))
        raise  # not reached: _retry_later raises


class _PoolProcess:
    """This pool process: whether a step runs in it, and whether it is to exit once the step is done."""

    in_step = False
    exit_after_step = False


@worker_process_init.connect
def listen_for_finish_then_exit(**kwargs: Any) -> None:
    signal.signal(FINISH_THEN_EXIT, finish_step_then_exit)


def finish_step_then_exit(signum: int, frame: Any) -> None:
    """FINISH_THEN_EXIT: exit now if no step runs here, else once it is done (``leave_step``)."""
    if not _PoolProcess.in_step:
        _exit_as_terminated()
    _PoolProcess.exit_after_step = True


@task_prerun.connect
def enter_step(sender: Task | None = None, **kwargs: Any) -> None:
    if _is_step(sender):
        _PoolProcess.in_step = True


@task_postrun.connect
def leave_step(sender: Task | None = None, **kwargs: Any) -> None:
    """After a step's task: its outcome is stored and its successor sent."""
    if not _is_step(sender):
        return
    _PoolProcess.in_step = False
    if _PoolProcess.exit_after_step:
        _exit_as_terminated()


def _is_step(task: Task | None) -> bool:
    return getattr(task, "name", None) == "agentsite.run_step"


def _exit_as_terminated() -> None:
    """End this process as Celery's SIGTERM would have: the worker's main process expects that."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)


@contextmanager
def _terminated_only_after() -> Iterator[None]:
    """Hold SIGTERM back until the block is done, then act on it; ignore a soft time limit meanwhile.

    Celery stops running steps with SIGTERM when the broker connection is
    lost (CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS). A step
    stopped after its skill returned but before its output was committed
    would run its skill, and apply its effect, again. For the same reason a
    soft time limit (SIGUSR1) that falls due while the output is stored does
    not cut the store short: the limit is the skill's, and the skill is done.
    The hard time limit still ends the process. Python handlers, not a
    signal mask: a mask holds only for this thread, and the kernel hands a
    process's signal to any thread that does not block it (the event
    publisher's, the span exporter's), whose default action ends the process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (not the prefork pool)
        return
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in HELD_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if signal.SIGTERM in held:
            _exit_as_terminated()


def _store(step: state.StepRef, delivery: str, output: Any, finishes_run: bool, cached: bool = False) -> Any:
    if isinstance(output, Wait):  # the step waits: nothing to pass on, and no worker held meanwhile
        if not state.wait_step(step, delivery, output.record()):
            raise Ignore()
        raise StepHalted(f"step {step.id} waits for input")
    if not state.succeed_step(step, output, delivery, finishes_run, cached):
        raise Ignore()  # the run ended, or the sweeper gave the step to another message
    return output


def _done(output: Any, cached: bool) -> dict[str, Any]:
    """A skill's outcome still to store, as a retry's JSON kwargs carry it."""
    return {"wait": output.record()} if isinstance(output, Wait) else {"output": output, "cached": cached}


def _output(done: dict[str, Any]) -> Any:
    return Wait.of(done["wait"]) if "wait" in done else done["output"]


def _retry_later(task: Task, exc: Exception, outages: int, done: dict[str, Any] | None = None) -> None:
    """Retry as the same delivery after a database outage, with backoff; raises.

    Once STEP_DB_RETRIES are spent it re-raises ``exc``: the sweeper resumes
    the run when the database is back.
    """
    if outages >= settings.STEP_DB_RETRIES:
        raise exc
    kwargs = {**_kwargs(task), "outages": outages + 1}
    if done is not None:
        kwargs["done"] = done
    log.warning("step %s: database unavailable (%r); retry %s", kwargs.get("step_id"), exc, outages + 1)
    countdown = backoff(outages + 1, 1, settings.STEP_DB_BACKOFF_MAX)
    raise task.retry(kwargs=kwargs, countdown=countdown, exc=exc, headers=_headers(task, delivery_of(task.request)))


def _not_run(claim: state.Claim) -> Any:
    """A message that does not run the skill.

    A redelivered or re-published step that already finished passes its
    stored output on (the last step ended its run when it finished, in the
    same transaction); a duplicate is dropped without a trace; a step of a
    run that ended is cancelled (if it was still waiting) and its branch stops.
    """
    step = claim.step
    if claim.outcome is ClaimOutcome.STORED:
        return step.output
    if claim.outcome is ClaimOutcome.DUPLICATE:
        raise Ignore()
    if claim.outcome is ClaimOutcome.RUN_ENDED and step.status in state.UNFINISHED_STEP_STATUSES:
        state.cancel_step(state.StepRef.of(step), f"not run: the run {step.run.status}")
    raise StepHalted(f"step {step.key}: {claim.outcome.value}")


def _handle_failure(
    task: Task, step: Step, delivery: str, exc: Exception, retry: dict[str, float], finishes_run: bool
) -> Any:
    timed_out = isinstance(exc, SoftTimeLimitExceeded)
    own_timeout = f"timed out after {step.soft_time_limit:g}s (soft limit)"
    error = (budget.timeout_error(exc) or own_timeout) if timed_out else _message(exc)
    # An open circuit fails (or skips) its step at once: a retry would find it open too.
    if step.attempts <= retry["max"] and _may_retry(exc):
        countdown = backoff(step.attempts, retry["backoff"], retry["backoff_max"])
        state.retry_step(state.StepRef.of(step), error, countdown, timed_out)
        # A new delivery: if this message is redelivered too, only one of them runs.
        kwargs = {k: v for k, v in _kwargs(task).items() if k not in ("done", "outages")}
        headers = _headers(task, uuid.uuid4().hex)
        raise task.retry(kwargs=kwargs, countdown=countdown, exc=exc, headers=headers)
    if not isinstance(exc, SkillError | SoftTimeLimitExceeded | breakers.CircuitOpen):
        # Not an outcome the skill chose but a bug or an outage: its traceback
        # goes to the log, and so to Sentry (agentsite/sentry.py scrubs it).
        log.error("step %s: skill %s raised %s", step.pk, step.skill, type(exc).__name__, exc_info=exc)
    if step.optional:
        fallback = _fallback(step.skill)
        if not state.skip_step(state.StepRef.of(step), error, delivery, finishes_run, timed_out, output=fallback):
            raise Ignore()
        return fallback
    state.fail_step(step.pk, error, StepStatus.TIMED_OUT if timed_out else StepStatus.FAILED)
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


def _context(step: Step, deadline: budget.Deadline | None = None) -> SkillContext:
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
    )


def delivery_of(request: Any) -> str:
    """The delivery id of the message being run (DELIVERY_HEADER; else its task id).

    Read off the request, where Celery puts every message header, not off
    ``request.headers``: that is a header literally named "headers" when a
    message has one (celery#4875; Sentry's Celery integration adds it, with
    the headers given at publish, before ours was set).
    """
    return getattr(request, DELIVERY_HEADER, None) or str(request.id)


def _headers(task: Task, delivery: str) -> dict[str, Any]:
    """Headers for a retry of this step's message as ``delivery``."""
    return {**(task.request.headers or {}), DELIVERY_HEADER: delivery}


def _kwargs(task: Task) -> dict[str, Any]:
    return dict(task.request.kwargs or {})


def _message(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


@shared_task(
    name="agentsite.finish_run",
    acks_late=True,
    soft_time_limit=30,
    time_limit=60,
    autoretry_for=DATABASE_DOWN,
    retry_backoff=1,
    retry_backoff_max=settings.STEP_DB_BACKOFF_MAX,
    max_retries=settings.STEP_DB_RETRIES,
)
def finish_run(output: Any, *, run_id: int) -> None:
    """The canvas's last link: the run succeeded with the spec's output."""
    state.succeed_run(run_id, output)


@shared_task(name="agentsite.collect", acks_late=True, soft_time_limit=30, time_limit=60)
def collect(outputs: list[Any]) -> list[Any]:
    """A chord body that passes its header's outputs on as one list.

    The canvas uses it where Celery would otherwise unroll a one-member group
    or merge a group into its parent group (orchestration/canvas.py).
    """
    return outputs


@shared_task(name="agentsite.pass_on", acks_late=True, soft_time_limit=30, time_limit=60)
def pass_on(output: Any) -> Any:
    """Returns its input: ends a switch's chosen case where a group or chord waits for the switch's task id.

    (orchestration.canvas.replacement says why.)
    """
    return output
