"""A step's life in the worker around its task: a lost pool process, a lost broker connection, a revoke.

docs/design.md, "A step in the worker", says why; the handlers are connected in ``orchestration.apps``.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # not in the stubs
from billiard.exceptions import WorkerLostError
from celery import Task
from celery.worker.request import Request
from django.db import InterfaceError, OperationalError

from agentsite import telemetry

from . import budget, transitions
from .broker import DELIVERY_HEADER
from .canvas import STEP_TASK
from .models import Step, StepStatus

log = logging.getLogger(__name__)

# The database is unreachable (restarting, failing over).
DATABASE_DOWN = (OperationalError, InterfaceError)
# Held while a step's output is stored: Celery's stop, and billiard's soft time limit.
HELD_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# What the worker's main process sends a step's pool process instead of
# SIGTERM when it cancels the step (StepRequest.cancel): finish it, then exit.
FINISH_THEN_EXIT = signal.SIGUSR2


def delivery_of(request: Any) -> str:
    """The delivery id of the message being run (DELIVERY_HEADER; else its task id).

    Read off the request, not ``request.headers`` (celery#4875: that is a header named "headers" when one is sent).
    """
    return getattr(request, DELIVERY_HEADER, None) or str(request.id)


class StepRequest(Request):
    """A step message as the worker's main process sees it: a step whose pool process is gone is released."""

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        """Celery cancels running tasks when the broker connection drops: the step finishes, then its process exits."""
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
            transitions.release_lost_step(step_id, delivery, counted=lost)
        except DATABASE_DOWN as exc:
            # The returning message finds the step still running and asks again
            # (BUSY) until the step's lease has run out, then takes it over.
            log.warning("step %s: not released after its worker process was gone: %r", step_id, exc)


class _PoolProcess:
    """This pool process: whether a step runs in it, and whether it is to exit once the step is done."""

    in_step = False
    exit_after_step = False


def listen_for_finish_then_exit(**kwargs: Any) -> None:
    """worker_process_init."""
    signal.signal(FINISH_THEN_EXIT, finish_step_then_exit)


def finish_step_then_exit(signum: int, frame: Any) -> None:
    """FINISH_THEN_EXIT: exit now if no step runs here, else once it is done (``leave_step``)."""
    if not _PoolProcess.in_step:
        _exit_as_terminated()
    _PoolProcess.exit_after_step = True


def enter_step(sender: Task | None = None, **kwargs: Any) -> None:
    """task_prerun."""
    if _is_step(sender):
        _PoolProcess.in_step = True


def leave_step(sender: Task | None = None, **kwargs: Any) -> None:
    """task_postrun: the step's outcome is stored and its successor sent; its log labels end."""
    if not _is_step(sender):
        return
    telemetry.unbind_step()
    _PoolProcess.in_step = False
    if _PoolProcess.exit_after_step:
        _exit_as_terminated()


def _is_step(task: Task | None) -> bool:
    return getattr(task, "name", None) == STEP_TASK


def _exit_as_terminated() -> None:
    """End this process as Celery's SIGTERM would have: the worker's main process expects that."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)


@contextmanager
def terminated_only_after() -> Iterator[None]:
    """Hold SIGTERM back until the block is done, then act on it; ignore a soft time limit meanwhile.

    For storing a skill's output: stopped before the commit, the step would run its skill again.
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


def fail_revoked_step(sender: Any = None, request: Any = None, expired: bool = False, **kwargs: Any) -> None:
    """task_revoked: a step that expired in the queue (its ttl, or its run's deadline) or was revoked fails its run.

    A step already final (e.g. cancelled with its run) is left as it is.
    """
    if getattr(sender, "name", None) != STEP_TASK:
        return
    step_id = (request.kwargs or {}).get("step_id")
    if step_id is None:
        return
    if expired and (error := budget.expired_error(request.kwargs)):
        transitions.fail_step(step_id, error, StepStatus.TIMED_OUT, task_id=request.id)
        return
    if expired:
        ttl = Step.objects.filter(pk=step_id).values_list("ttl", flat=True).first() or 0
        error = f"expired: waited in the queue longer than its ttl ({ttl:g}s)"
    else:
        error = "revoked" + (" and terminated" if kwargs.get("terminated") else "") + " outside agentsite"
    transitions.fail_step(step_id, error, task_id=request.id)
