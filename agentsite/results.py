"""A django-celery-results backend whose chord fan-in counts each task once.

django-celery-results decrements a counter each time a header task reports.
A header task that runs twice (a redelivery after a lost worker, or a step
that replays its stored output) decrements it twice, so the counter reaches
zero early and the chord body never runs (django-celery-results #177, PR
#397). Here the counter row is only a lock: under it we ask whether every
header result is ready, and the one that sees them all ready fires the body
and deletes the row, so a late or repeated report finds no row and does
nothing. A report that finds the header not yet complete (read without the
lock) does not take it.

It also survives a database outage: a result it cannot store is logged and
dropped (see ``_store_result``), and it stores a canvas task's success only
where a chord reads it (see ``mark_as_done``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult
from django.db import InterfaceError, OperationalError, router, transaction
from django_celery_results.backends.database import DatabaseBackend, trigger_callback
from django_celery_results.models import ChordCounter, TaskResult  # type: ignore[attr-defined]

log = logging.getLogger(__name__)


# The tasks of a run's canvas: each step's outcome is in our own tables.
CANVAS_TASKS = frozenset({"agentsite.run_step", "agentsite.finish_run", "agentsite.collect", "agentsite.pass_on"})


class ChordSafeDatabaseBackend(DatabaseBackend):
    @property
    def TaskModel(self) -> type:
        """The model DatabaseBackend stores results with: ours upserts (orchestration.models)."""
        from orchestration.models import StoredTaskResult  # the app registry is ready by then

        return StoredTaskResult

    def mark_as_done(
        self, task_id: str, result: Any, request: Any = None, store_result: bool = True, state: str = states.SUCCESS
    ) -> None:
        """Record a success; a canvas task's result row only when a chord waits for it.

        Only a chord reads a canvas task's result (its header members', when
        it joins them); the step's output is in its Step row. Skipping the
        others' rows saves a write per task (measured in
        docs/performance.md). Failures and other tasks are stored as before.
        """
        if request is not None and getattr(request, "task", None) in CANVAS_TASKS and not request.chord:
            store_result = False
        super().mark_as_done(task_id, result, request, store_result, state)

    def _store_result(self, task_id: str, result: Any, status: str, *args: Any, **kwargs: Any) -> Any:
        """Store a task result; while the database is down, log and drop it.

        The worker's main process stores results too (an expired or revoked
        task, a hard time limit); an exception there stops the worker for
        good. Our own tables say what happened to a step, and the sweeper
        resumes runs left behind, so a lost result row is only a lost row.
        """
        try:
            return super()._store_result(task_id, result, status, *args, **kwargs)
        except (OperationalError, InterfaceError) as exc:
            log.warning("result of task %s (%s) not stored, the database is unavailable: %s", task_id, status, exc)
            return result

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        group_id = request.group
        if not group_id or not request.id:
            return
        if not self._header_ready(group_id):
            return  # the common case: a later member's report fires the body
        with transaction.atomic(using=router.db_for_write(ChordCounter)):
            counter = ChordCounter.objects.select_for_update().filter(group_id=group_id).first()
            if counter is None:
                return  # the body was already fired, or this is not our chord
            header = counter.group_result(app=self.app)
            header_states = _states(_leaf_ids(header))
            if not all(s in states.READY_STATES for s in header_states.values()):
                return
            counter.delete()
        callback = maybe_signature(request.chord, app=self.app)
        failed = [task_id for task_id, s in header_states.items() if s != states.SUCCESS]
        if failed:
            # Expected: the failing step already failed its run. Record the
            # body as failed without the traceback trigger_callback would log.
            log.info("chord %s not run: header task %s did not succeed", group_id, failed[0])
            try:
                raise ChordError(f"header task {failed[0]} did not succeed")
            except ChordError as exc:  # chord_error_from_stack reads the current stack
                self.chord_error_from_stack(callback, exc)
            return
        trigger_callback(app=self.app, callback=callback, group_result=header)

    def _header_ready(self, group_id: str) -> bool:
        """Whether the chord's header tasks all finished, read without a lock or a transaction.

        The member whose result completes the header sees them all ready (its
        own result is stored before it reports), so only the last reports take
        the counter row's lock; the others cost two reads.
        """
        counter = ChordCounter.objects.filter(group_id=group_id).first()
        if counter is None:
            return False
        return all(s in states.READY_STATES for s in _states(_leaf_ids(counter.group_result(app=self.app))).values())


def _leaf_ids(result: Any) -> list[str]:
    if isinstance(result, GroupResult):
        return [task_id for child in result.results or [] for task_id in _leaf_ids(child)]
    return [result.id]


def _states(task_ids: list[str]) -> dict[str, str]:
    """One query: each header task's stored state (PENDING when none yet)."""
    stored = dict(TaskResult.objects.filter(task_id__in=task_ids).values_list("task_id", "status"))
    return {task_id: stored.get(task_id, states.PENDING) for task_id in task_ids}
