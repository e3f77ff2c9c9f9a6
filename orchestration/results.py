"""A django-celery-results backend whose chord fan-in counts each header task once.

The counter row is only a token: the report whose delete removed it fires the body.
A result the database refuses is logged and dropped. See docs/design.md, "Changes
from the shared contract" (Chord-safe result backend), and docs/operations.md, "Queues".
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, cast

from celery import states
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult
from django.db import InterfaceError, OperationalError, connections, router
from django_celery_results.backends.database import DatabaseBackend, trigger_callback
from django_celery_results.models import ChordCounter, TaskResult  # type: ignore[attr-defined]

from .canvas import COLLECT_TASK, FINISH_TASK, PASS_ON_TASK, STEP_TASK
from .models import StoredTaskResult

log = logging.getLogger(__name__)


# The tasks of a run's canvas: each step's outcome is in our own tables.
CANVAS_TASKS = frozenset({STEP_TASK, FINISH_TASK, COLLECT_TASK, PASS_ON_TASK})


class ChordSafeDatabaseBackend(DatabaseBackend):
    TaskModel = StoredTaskResult  # stored by upsert (orchestration.models)

    def mark_as_done(
        self, task_id: str, result: Any, request: Any = None, store_result: bool = True, state: str = states.SUCCESS
    ) -> None:
        """Record a success; a canvas task's result row only when a chord joins it (a header member).

        A step's output is in its Step row; failures, and tasks outside a run's canvas, are always stored.
        """
        if request is not None and getattr(request, "task", None) in CANVAS_TASKS and not request.chord:
            store_result = False
        super().mark_as_done(task_id, result, request, store_result, state)

    def _store_result(self, task_id: str, result: Any, status: str, *args: Any, **kwargs: Any) -> Any:
        """Store a task result; while the database is down, log and drop it (never raise).

        An exception in the worker's main process would stop the worker; the steps' state is in our own tables.
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
        header_ids = _header_ids(group_id, self.app)
        if header_ids is None:
            return  # not our chord, or its body was fired
        header_states = _states(header_ids)
        if not _all_ready(header_states):
            return  # the common case: a later member's report fires the body
        header = _take_counter(group_id, self.app)
        if header is None:
            return  # another report that saw them all ready took it
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
        fire_body(app=self.app, callback=callback, group_result=header)


def fire_body(app: Any, callback: Any, group_result: GroupResult) -> None:
    """Send the chord's body its header's results, in order, read in one query; every member succeeded.

    A header with a group in it (its result is a nested list) is left to django-celery-results' trigger_callback.
    """
    members = group_result.results or []
    if any(isinstance(member, GroupResult) for member in members):
        trigger_callback(app=app, callback=callback, group_result=group_result)
        return
    ids = [member.id for member in members]
    rows = _query(
        f"SELECT task_id, content_encoding, result FROM {_RESULTS} WHERE task_id IN ({_placeholders(ids)})", ids
    )
    backend = app.backend
    results = {task_id: backend.decode_content(_Encoded(encoding), result) for task_id, encoding, result in rows}
    try:
        callback.delay([results[task_id] for task_id in ids])
    except Exception as exc:  # as trigger_callback: the body fails, the worker goes on
        log.exception("chord %s: its body was not sent", group_result.id)
        backend.chord_error_from_stack(callback, exc=ChordError(f"Callback error: {exc!r}"))


class _Encoded:
    """What decode_content reads of a result row."""

    def __init__(self, content_encoding: str) -> None:
        self.content_encoding = content_encoding


# The header task ids of chords this process saw a member of, the newest last.
_headers: OrderedDict[str, tuple[str, ...]] = OrderedDict()
HEADERS_KEPT = 1024


def _header_ids(group_id: str, app: Any) -> list[str] | None:
    """The chord's header task ids; None if it has no counter (not our chord, or its body was fired).

    Read once per process and chord (a header never changes); a missing counter is not remembered.
    """
    ids = _headers.get(group_id)
    if ids is None:
        rows = _query(f"SELECT sub_tasks FROM {_COUNTERS} WHERE group_id = %s", [group_id])
        if not rows:
            return None
        ids = _headers[group_id] = tuple(_leaf_ids(_group_result(group_id, rows[0][0], app)))
        if len(_headers) > HEADERS_KEPT:
            _headers.popitem(last=False)
    return list(ids)


def _take_counter(group_id: str, app: Any) -> GroupResult | None:
    """Delete the chord's counter in one statement: its header if this call deleted it, else None.

    Of reports that all saw the header ready at once, only one deletes the row; that one fires the body.
    """
    rows = _query(f"DELETE FROM {_COUNTERS} WHERE group_id = %s RETURNING sub_tasks", [group_id])
    return _group_result(group_id, rows[0][0], app) if rows else None


def _group_result(group_id: str, sub_tasks: str, app: Any) -> GroupResult:
    return cast(GroupResult, ChordCounter(group_id=group_id, sub_tasks=sub_tasks).group_result(app=app))


def _all_ready(header_states: dict[str, str]) -> bool:
    return all(s in states.READY_STATES for s in header_states.values())


def _leaf_ids(result: Any) -> list[str]:
    if isinstance(result, GroupResult):
        return [task_id for child in result.results or [] for task_id in _leaf_ids(child)]
    return [result.id]


def _states(task_ids: list[str]) -> dict[str, str]:
    """One query: each header task's stored state (PENDING when none yet)."""
    stored = dict(
        _query(f"SELECT task_id, status FROM {_RESULTS} WHERE task_id IN ({_placeholders(task_ids)})", task_ids)
    )
    return {task_id: stored.get(task_id, states.PENDING) for task_id in task_ids}


# The chord's reads and writes are SQL of our own (docs/performance.md, "A chord member's report, in SQL of its own").
_COUNTERS = ChordCounter._meta.db_table
_RESULTS = TaskResult._meta.db_table


def _query(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    with connections[router.db_for_write(TaskResult)].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _placeholders(values: list[Any]) -> str:
    return ", ".join(["%s"] * len(values))
