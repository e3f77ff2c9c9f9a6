"""The one-statement claim and store (orchestration/transitions_pg.py) leave what the ORM's transitions leave.

Each scenario runs twice on PostgreSQL, on two runs alike: once as the service
runs it (the one statement where it applies), once with the one-statement
path turned off (the ORM's transitions alone); the rows and events must be the
same. SQLite has no such path: it always takes the ORM's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orchestration import services, transitions, transitions_pg
from orchestration.models import Message, Run, RunEvent, Step, StepStatus

from .factories import RunFactory, StepFactory

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the one-statement path is PostgreSQL's"),
]

Steps = dict[str, Step]


def claim(steps: Steps, key: str, delivery: str) -> Any:
    return transitions.claim_step(steps[key].pk, delivery).outcome


def store(steps: Steps, key: str, delivery: str, output: Any, last: bool = False, cached: bool = False) -> bool:
    ref = transitions.StepRef.load(steps[key].pk)
    return transitions.succeed_step(ref, output, delivery, finishes_run=last, cached=cached)


def run_through(steps: Steps, cached: bool = False) -> list[Any]:
    return [
        claim(steps, "a", "d1"),
        store(steps, "a", "d1", {"x": 1}),
        claim(steps, "b", "d2"),
        store(steps, "b", "d2", {"reply": "hello"}, last=True, cached=cached),
    ]


def ended_meanwhile(steps: Steps) -> list[Any]:
    outcome = claim(steps, "a", "d1")
    transitions.fail_run(steps["a"].run_id, "stopped elsewhere")
    return [outcome, store(steps, "a", "d1", "late", last=True)]


SCENARIOS: dict[str, Callable[[Steps], list[Any]]] = {
    "the first claim starts the run": lambda steps: [claim(steps, "a", "d1")],
    "a later claim": lambda steps: [claim(steps, "a", "d1"), store(steps, "a", "d1", 1), claim(steps, "b", "d2")],
    "a middle store": lambda steps: [claim(steps, "a", "d1"), store(steps, "a", "d1", {"x": 1})],
    "a cached store": lambda steps: [claim(steps, "a", "d1"), store(steps, "a", "d1", [1, "two"], cached=True)],
    "the last store ends the run": run_through,
    "the last store from the cache": lambda steps: run_through(steps, cached=True),
    "a store by another delivery": lambda steps: [
        claim(steps, "a", "d1"),
        store(steps, "a", "d2", "stolen", last=True),
    ],
    "a second claim": lambda steps: [claim(steps, "a", "d1"), claim(steps, "a", "d2")],
    "the last store of a run that ended": ended_meanwhile,
}


def a_run() -> Steps:
    run = RunFactory.create()
    return {key: StepFactory.create(run=run, key=key) for key in ("a", "b", "never-run")}


STEP_FIELDS = ("key", "status", "output", "error", "attempts", "redeliveries", "delivery", "cached", "wait")
STEP_TIMES = ("started_at", "finished_at", "lease_until")


def snapshot(run: Run) -> dict[str, Any]:
    """The run's rows as a path leaves them, without what differs between two runs (ids, times: only whether set)."""
    run.refresh_from_db()
    keys = dict(Step.objects.filter(run=run).values_list("pk", "key"))
    steps = Step.objects.filter(run=run).order_by("key").values_list(*STEP_FIELDS, *STEP_TIMES)
    events = RunEvent.objects.filter(run=run).order_by("seq").values_list("seq", "type", "step_id", "data")
    return {
        "run": (run.status, run.output, run.error, run.last_event_seq, run.started_at is None, run.finished_at is None),
        "steps": [(*row[: len(STEP_FIELDS)], *(time is None for time in row[len(STEP_FIELDS) :])) for row in steps],
        "events": [(seq, type, keys.get(step_id), data) for seq, type, step_id, data in events],
        "messages": list(Message.objects.filter(run=run).values_list("role", "content")),
    }


@pytest.fixture
def orm_only(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    def turn_off() -> None:
        for name in ("claim", "store", "store_last"):
            monkeypatch.setattr(transitions_pg, name, lambda *args, **kwargs: None)

    return turn_off


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_both_paths_leave_the_same_rows_and_events(scenario, orm_only):
    fast, orm = a_run(), a_run()
    with CaptureQueriesContext(connection) as queries:
        fast_outcomes = SCENARIOS[scenario](fast)
    orm_only()
    orm_outcomes = SCENARIOS[scenario](orm)

    assert fast_outcomes == orm_outcomes
    assert snapshot(fast["a"].run) == snapshot(orm["a"].run)
    assert any("WITH run_lock AS" in query["sql"] for query in queries.captured_queries)


def test_the_statements_name_no_status_but_through_the_models_choices():
    for sql in (transitions_pg.CLAIM, transitions_pg.STORE, transitions_pg.STORE_LAST):
        for status in StepStatus.values:
            assert f"'{status}'" not in sql


def test_a_runs_creation_stores_what_the_orms_stores(user):
    """transitions_pg.insert_run and the ORM's inserts leave the same rows (but ids, task ids and times)."""
    conversation = RunFactory.create(owner=user).conversation
    spec = {"chain": [{"skill": "echo", "args": {"x": "é", "n": [1, None]}}, {"skill": "echo", "retries": 2}]}
    ours, theirs = (
        services.prepare_run(owner=user, conversation=conversation, spec=spec, input={"q": "hello"}, deadline=60)
        for _ in range(2)
    )

    services.insert_run(ours)
    theirs.run.last_event_seq = 1  # as insert_run sets it, for either way
    queued = RunEvent(seq=1, type="run.queued", data={"steps": 2})
    transitions._insert_run(theirs.run, theirs.steps, [queued], None)  # the ORM's way, as on SQLite

    assert row_of(ours.run) == row_of(theirs.run)
    assert [row_of(step) for step in ours.steps] == [row_of(step) for step in theirs.steps]
    assert events_of(ours.run) == events_of(theirs.run) == [(1, "run.queued", {"steps": 2})]


def row_of(instance: Any) -> dict[str, Any]:
    """The instance's stored row but what differs between two inserts (ids, task ids, times)."""
    differ = {"id", "run", "run_id", "task_id", "created_at", "deadline", "trace_id"}
    stored = type(instance).objects.filter(pk=instance.pk).values().get()
    return {name: value for name, value in stored.items() if name not in differ}


def events_of(run: Run) -> list[tuple[int, str, Any]]:
    return list(RunEvent.objects.filter(run=run).order_by("seq").values_list("seq", "type", "data"))
