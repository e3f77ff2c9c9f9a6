"""Many chords at once: fan-in holds up under concurrent workers.

Written for SQLite (plain SQLite with django-db results fails a chord of 10
with "database is locked"); it must pass on PostgreSQL too.
"""

from __future__ import annotations

import pytest

from orchestration.services import start_run

from .conftest import WORKER_LOG, wait_for_run

pytestmark = pytest.mark.worker

CHORDS = 20
HEADER = 10


def chord_spec(n: int) -> dict:
    header = [{"skill": "echo", "args": {"value": f"{n}-{i}"}} for i in range(HEADER)]
    return {"chord": {"header": header, "body": {"skill": "echo", "id": "body"}}}


def test_twenty_concurrent_chords_of_ten_all_fan_in(worker, user):
    runs = [start_run(owner=user, spec=chord_spec(n)) for n in range(CHORDS)]

    runs = [wait_for_run(run, timeout=90) for run in runs]

    assert [run.status for run in runs] == ["succeeded"] * CHORDS, [run.error for run in runs]
    for n, run in enumerate(runs):
        expected = [f"{n}-{i}" for i in range(HEADER)]
        body = run.steps.get(key="body")
        assert body.output == expected
        assert body.attempts == 1
        assert run.output == expected
        assert set(run.steps.values_list("attempts", flat=True)) == {1}
    log = WORKER_LOG.read_text(errors="replace")
    assert "database is locked" not in log
    assert "OperationalError" not in log
