"""Chord fan-in counts each header task once, even when a task reports twice.

django-celery-results decrements a counter per report, so a header task that
reports twice (a redelivery, or a step replaying its stored output) makes the
counter reach zero before the other header tasks finished, and the body never
runs (django-celery-results #177). ``ChordSafeDatabaseBackend`` fires the body
when every header result is ready, exactly once.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from celery import states
from celery.app.task import Context
from celery.canvas import Signature
from celery.result import AsyncResult, GroupResult
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_celery_results.models import ChordCounter, TaskResult  # type: ignore[attr-defined]

from agentsite.celery import app
from orchestration import canvas
from orchestration.broker import DELIVERY_HEADER
from orchestration.models import Run, Step, StoredTaskResult
from orchestration.results import ChordSafeDatabaseBackend, fire_body
from orchestration.services import start_run
from orchestration.spec import plan

from .conftest import wait_for_run, wait_until

BODY = Signature("agentsite.collect", options={"task_id": "the-body"})


class Chord:
    """A chord header of ``size`` tasks registered with the real backend, as Celery does on apply."""

    def __init__(self, size: int) -> None:
        self.group_id = str(uuid.uuid4())
        self.task_ids = [str(uuid.uuid4()) for _ in range(size)]
        header: list[Any] = [AsyncResult(task_id, app=app) for task_id in self.task_ids]
        app.backend.apply_chord((self.group_id, header), BODY)

    def request(self, task_id: str) -> Context:
        return Context(id=task_id, group=self.group_id, chord=dict(BODY), task="agentsite.run_step")

    def finish(self, n: int, state: str = states.SUCCESS) -> None:
        """Header task ``n`` stores its result and reports to the chord."""
        task_id = self.task_ids[n]
        if state == states.SUCCESS:
            app.backend.mark_as_done(task_id, f"out-{n}", request=self.request(task_id))
        else:
            app.backend.mark_as_failure(task_id, RuntimeError("boom"), request=self.request(task_id))


@pytest.fixture
def fired(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The calls that would enqueue a chord body."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("orchestration.results.fire_body", lambda **kw: calls.append(kw))
    return calls


def test_the_app_uses_the_chord_safe_backend():
    assert isinstance(app.backend, ChordSafeDatabaseBackend)


@pytest.mark.django_db
def test_a_header_task_reporting_twice_does_not_fire_the_body_early(fired):
    chord = Chord(3)

    chord.finish(0)
    chord.finish(0)
    chord.finish(0)
    chord.finish(1)

    assert fired == []
    assert ChordCounter.objects.filter(group_id=chord.group_id).exists()


@pytest.mark.django_db
def test_the_body_fires_once_when_every_header_task_is_done(fired):
    chord = Chord(3)
    chord.finish(0)
    chord.finish(0)
    chord.finish(1)

    chord.finish(2)

    assert len(fired) == 1
    assert fired[0]["callback"]["options"]["task_id"] == "the-body"
    assert isinstance(fired[0]["group_result"], GroupResult)
    assert fired[0]["group_result"].id == chord.group_id
    assert [r.id for r in fired[0]["group_result"].results or []] == chord.task_ids
    assert not ChordCounter.objects.filter(group_id=chord.group_id).exists()


@pytest.mark.django_db
def test_a_late_repeated_report_does_not_fire_the_body_again(fired):
    chord = Chord(2)
    chord.finish(0)
    chord.finish(1)

    chord.finish(1)
    chord.finish(0)

    assert len(fired) == 1


@pytest.mark.django_db
def test_a_failed_header_task_counts_as_done_and_fails_the_body_unrun(fired):
    chord = Chord(2)
    chord.finish(0, states.FAILURE)
    assert ChordCounter.objects.filter(group_id=chord.group_id).exists()

    chord.finish(1)

    assert fired == []
    assert not ChordCounter.objects.filter(group_id=chord.group_id).exists()
    assert TaskResult.objects.get(task_id="the-body").status == states.FAILURE


@pytest.mark.django_db
def test_a_retrying_header_task_is_not_done(fired):
    chord = Chord(2)
    chord.finish(0)
    app.backend.mark_as_retry(chord.task_ids[1], RuntimeError("again"), request=chord.request(chord.task_ids[1]))
    app.backend.on_chord_part_return(chord.request(chord.task_ids[0]), states.SUCCESS, "out-0")

    assert fired == []


@pytest.mark.django_db
def test_a_report_for_an_unknown_group_or_a_task_outside_a_group_is_ignored(fired):
    app.backend.on_chord_part_return(Context(id="x", group="no-such-group", chord=dict(BODY)), states.SUCCESS, 1)
    app.backend.on_chord_part_return(Context(id="x", group=None, chord=dict(BODY)), states.SUCCESS, 1)

    assert fired == []


@pytest.mark.django_db
def test_after_its_first_report_here_a_chords_header_is_not_read_again(fired):
    """The header never changes: each process reads it once per chord, then only the members' states."""
    chord = Chord(3)
    chord.finish(0)

    with CaptureQueriesContext(connection) as queries:
        chord.finish(1)

    statements = [query["sql"] for query in queries.captured_queries]
    assert statements
    assert not [sql for sql in statements if "chordcounter" in sql]
    chord.finish(2)
    assert len(fired) == 1


@pytest.mark.django_db
def test_the_last_report_reads_the_states_then_takes_the_counter_with_one_delete(fired, django_assert_num_queries):
    chord = Chord(2)
    chord.finish(0)
    app.backend.store_result(chord.task_ids[1], "out-1", states.SUCCESS)

    with django_assert_num_queries(2) as queries:
        app.backend.on_chord_part_return(chord.request(chord.task_ids[1]), states.SUCCESS, "out-1")

    assert queries.captured_queries[1]["sql"].startswith("DELETE")
    assert len(fired) == 1
    assert [r.id for r in fired[0]["group_result"].results or []] == chord.task_ids


class RecordedBody:
    """A chord body that records what it is sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def delay(self, *args: Any) -> None:
        self.sent.append(args)


@pytest.mark.django_db
def test_the_body_is_sent_the_header_results_in_header_order_read_in_one_query(django_assert_num_queries):
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for n, task_id in reversed(list(enumerate(ids))):  # stored in another order
        app.backend.store_result(task_id, {"n": n}, states.SUCCESS)
    header = GroupResult(str(uuid.uuid4()), [AsyncResult(task_id, app=app) for task_id in ids], app=app)
    body = RecordedBody()

    with django_assert_num_queries(1):
        fire_body(app=app, callback=body, group_result=header)

    assert body.sent == [([{"n": 0}, {"n": 1}, {"n": 2}],)]


@pytest.mark.django_db
def test_the_body_of_a_header_with_nested_groups_waits_for_every_leaf(fired):
    group_id, inner_id = str(uuid.uuid4()), str(uuid.uuid4())
    leaves = [str(uuid.uuid4()) for _ in range(3)]
    inner = GroupResult(inner_id, [AsyncResult(t, app=app) for t in leaves[1:]], app=app)
    app.backend.apply_chord((group_id, [AsyncResult(leaves[0], app=app), inner]), BODY)

    def finish(task_id: str) -> None:
        app.backend.mark_as_done(task_id, task_id, request=Context(id=task_id, group=group_id, chord=dict(BODY)))

    finish(leaves[0])
    finish(leaves[1])
    assert fired == []
    finish(leaves[2])

    assert len(fired) == 1


@pytest.mark.django_db(transaction=True)
def test_header_tasks_reporting_at_the_same_time_fire_the_body_exactly_once(fired):
    chord = Chord(8)
    for n, task_id in enumerate(chord.task_ids):
        app.backend.store_result(task_id, n, states.SUCCESS)
    start = threading.Barrier(len(chord.task_ids) * 2)
    errors: list[BaseException] = []

    def report(task_id: str) -> None:
        try:
            start.wait()
            app.backend.on_chord_part_return(chord.request(task_id), states.SUCCESS, None)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=report, args=(t,)) for t in chord.task_ids * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert len(fired) == 1


# --- End to end, with the real worker -----------------------------------------


def step_options(run: Run) -> dict[str, canvas.StepOptions]:
    """The options ``services.start_run`` gave each step of ``run``."""
    rows = {step.path: step for step in run.steps.all()}
    return {p.path: canvas.StepOptions.for_step(p, rows[p.path].pk, str(rows[p.path].task_id)) for p in plan(run.spec)}


def redeliver(step: Step, upstream: Any, **options: Any) -> Any:
    """Deliver the message that ran the step again (same task id and delivery
    header, as after its worker died before acknowledging it) and return what
    the task returned this time.

    The worker stores a step's result only when a chord waits for it, so a
    step outside one is sent as a member of a chord that does not exist (no
    counter row: nothing fires) to have its result stored and read here.
    """
    before = TaskResult.objects.filter(task_id=str(step.task_id)).values_list("date_done", flat=True).first()
    if "chord" not in options:
        options.update(chord=Signature(canvas.COLLECT_TASK), group_id=f"no-such-chord-{step.pk}")
    signature = canvas.step_signature(step_options(step.run)[step.path])
    signature.apply_async(args=(upstream,), headers={DELIVERY_HEADER: step.delivery}, **options)
    result = wait_until(
        lambda: TaskResult.objects.filter(
            task_id=str(step.task_id), status__in=states.READY_STATES, **({"date_done__gt": before} if before else {})
        ).first()
    )
    assert result.status == states.SUCCESS, result.traceback
    return json.loads(result.result)


def test_a_redelivered_step_that_succeeded_returns_its_stored_output_without_running_again(worker, user):
    run = wait_for_run(
        start_run(owner=user, spec={"chain": [{"skill": "echo", "id": "a"}, {"skill": "echo"}]}, input=1)
    )
    step = run.steps.get(key="a")
    events = run.events.count()

    assert redeliver(step, upstream="something else") == 1

    step.refresh_from_db()
    assert (step.status, step.output, step.attempts) == ("succeeded", 1, 1)
    assert run.events.count() == events


def test_a_redelivered_header_step_does_not_fire_the_chord_body_early(worker, user):
    spec = {
        "chord": {
            "header": [
                {"skill": "echo", "id": "fast", "args": {"value": "f"}},
                {"skill": "sleep", "id": "slow", "args": {"seconds": 1.5}},
            ],
            "body": {"skill": "echo", "id": "body"},
        }
    }
    run = start_run(owner=user, spec=spec, input="in")
    fast = wait_until(lambda: run.steps.filter(key="fast", status="succeeded").first())
    # The other member runs: it may start after the fast one ended on a busy machine (CI, 2026-12-01).
    wait_until(lambda: run.steps.filter(key="slow", status="running").exists())
    counter = ChordCounter.objects.get(sub_tasks__contains=str(fast.task_id))
    # The message Celery sent for the header step: its chord's group and body.
    header_chord: Any = canvas.build(spec, step_options(run), run.pk)

    assert redeliver(fast, "in", group_id=counter.group_id, chord=header_chord.body) == "f"

    assert run.steps.get(key="slow").status == "running"
    assert run.steps.get(key="body").status == "pending"
    assert ChordCounter.objects.filter(group_id=counter.group_id).exists()
    run = wait_for_run(run)
    assert run.status == "succeeded"
    assert run.output == ["f", "in"]
    assert {s.key: s.attempts for s in run.steps.all()} == {"fast": 1, "slow": 1, "body": 1}
    assert run.steps.get(key="body").output == ["f", "in"]


def test_a_chord_run_fans_in_once(worker, user):
    spec = {"chord": {"header": [{"skill": "echo", "args": {"value": n}} for n in range(6)], "body": {"skill": "echo"}}}

    run = wait_for_run(start_run(owner=user, spec=spec))

    assert run.status == "succeeded"
    assert run.output == list(range(6))
    body = run.steps.get(path="spec.chord.body")
    assert body.attempts == 1
    assert list(run.events.filter(step=body).values_list("type", flat=True)) == ["step.running", "step.succeeded"]
    first = run.steps.get(path="spec.chord.header[0]")
    assert not ChordCounter.objects.filter(sub_tasks__contains=str(first.task_id)).exists()


def test_only_the_results_a_chord_reads_are_stored_and_the_last_step_ends_the_run(worker, user):
    header = [{"skill": "echo", "id": "h1"}, {"skill": "echo", "id": "h2"}]
    body = {"skill": "echo", "id": "b"}
    spec = {"chain": [{"skill": "echo", "id": "a"}, {"chord": {"header": header, "body": body}}]}

    run = wait_for_run(start_run(owner=user, spec=spec, input="in"))

    assert (run.status, run.output) == ("succeeded", ["in", "in"])
    task_ids = {s.key: str(s.task_id) for s in run.steps.all()}
    stored = set(TaskResult.objects.filter(task_id__in=task_ids.values()).values_list("task_id", flat=True))
    assert stored == {task_ids["h1"], task_ids["h2"]}
    # The body step ended the run in its own transaction (test_canvas: no finish_run task follows it).
    assert list(run.events.values_list("type", flat=True))[-2:] == ["step.succeeded", "run.succeeded"]


@pytest.mark.django_db(transaction=True)
def test_a_result_stored_twice_is_one_row_with_the_latest_outcome():
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, None, states.RETRY, traceback="first try failed")
    times = TaskResult.objects.filter(task_id=task_id).values_list("date_created", "date_done")
    created, first_done = times.get()

    statements: list[tuple[str, bool]] = []

    def note(execute: Any, sql: str, *args: Any) -> Any:
        statements.append((sql.split(" (")[0], connection.in_atomic_block))
        return execute(sql, *args)

    with connection.execute_wrapper(note):
        app.backend.store_result(task_id, {"answer": 42}, states.SUCCESS)

    # One statement, not in a transaction of its own (BEGIN and COMMIT: two round trips more per chord member).
    assert statements == [(f"INSERT INTO {connection.ops.quote_name(TaskResult._meta.db_table)}", False)]
    row = TaskResult.objects.get(task_id=task_id)
    assert (row.status, json.loads(row.result), row.traceback) == (states.SUCCESS, {"answer": 42}, None)
    assert times.get()[0] == created
    assert times.get()[1] >= first_done


@pytest.mark.django_db
def test_the_upsert_stores_what_django_celery_results_stores():
    """StoredTaskResult's one statement and the library's SELECT then INSERT or UPDATE leave the same rows."""
    first: dict[str, Any] = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "result": '{"answer": 42}',
        "status": states.RETRY,
        "traceback": "first try failed",
        "meta": '{"children": []}',
        "task_name": "agentsite.run_step",
        "task_args": "()",
        "task_kwargs": "{}",
        "worker": "worker@host",
    }
    second = {**first, "status": states.SUCCESS, "result": '"done"', "traceback": None}
    for manager, task_id in ((StoredTaskResult.objects, "upserted"), (TaskResult.objects, "by-the-library")):
        manager.store_result(task_id=task_id, **first)
        manager.store_result(task_id=task_id, **second)

    differ = {"id", "task_id", "date_created", "date_done", "date_started"}
    upserted, by_the_library = (
        {k: v for k, v in TaskResult.objects.filter(task_id=task_id).values().get().items() if k not in differ}
        for task_id in ("upserted", "by-the-library")
    )
    assert upserted == by_the_library
    assert upserted["status"] == states.SUCCESS
