"""A django-celery-results backend whose chord fan-in counts each task once.

django-celery-results decrements a counter each time a header task reports.
A header task that runs twice (a redelivery after a lost worker, or a step
that replays its stored output) decrements it twice, so the counter reaches
zero early and the chord body never runs (django-celery-results #177, PR
#397). Here the counter row is only a lock: under it we ask whether every
header result is ready, and the one that sees them all ready fires the body
and deletes the row, so a late or repeated report finds no row and does
nothing.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.canvas import maybe_signature
from celery.result import GroupResult
from django.db import router, transaction
from django_celery_results.backends.database import DatabaseBackend, trigger_callback
from django_celery_results.models import ChordCounter, TaskResult  # type: ignore[attr-defined]


class ChordSafeDatabaseBackend(DatabaseBackend):
    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        group_id = request.group
        if not group_id or not request.id:
            return
        with transaction.atomic(using=router.db_for_write(ChordCounter)):
            counter = ChordCounter.objects.select_for_update().filter(group_id=group_id).first()
            if counter is None:
                return  # the body was already fired, or this is not our chord
            header = counter.group_result(app=self.app)
            if not _all_ready(header):
                return
            counter.delete()
        trigger_callback(app=self.app, callback=maybe_signature(request.chord, app=self.app), group_result=header)


def _leaf_ids(result: Any) -> list[str]:
    if isinstance(result, GroupResult):
        return [task_id for child in result.results or [] for task_id in _leaf_ids(child)]
    return [result.id]


def _all_ready(header: GroupResult) -> bool:
    """One query: have all header tasks stored a final state?"""
    ids = _leaf_ids(header)
    ready = TaskResult.objects.filter(task_id__in=ids, status__in=states.READY_STATES).count()
    return ready == len(ids)
