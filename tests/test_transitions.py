"""orchestration.transitions: the rows and events a step's claim and store leave, the queries they make, their locks."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orchestration import broker, events, services, tasks, transitions
from orchestration.models import Message, Run, RunEvent, RunStatus, Step, StepStatus, WebhookDelivery

from .factories import ConversationFactory, RunFactory, StepFactory

pytestmark = pytest.mark.django_db

# A claim, and a store, through the ORM: the step and its run locked (one
# SELECT), the step updated, the events inserted and the run updated (its last
# event's seq). On PostgreSQL the common case is one statement (transitions_pg).
TRANSITION_QUERIES = 1 if connection.vendor == "postgresql" else 4


def statements(queries: CaptureQueriesContext) -> list[str]:
    """The block's SQL, without the transaction's own statements (SQLite's BEGIN, a COMMIT)."""
    return [q["sql"] for q in queries.captured_queries if q["sql"] not in ("BEGIN", "COMMIT")]


def events_of(run: Run) -> list[tuple[int, str, int | None, dict[str, Any]]]:
    rows = RunEvent.objects.filter(run=run).order_by("id").values_list("seq", "type", "step_id", "data")
    return [(seq, type, step_id, data) for seq, type, step_id, data in rows]


def chain_of_two(**run_fields: Any) -> tuple[Run, Step, Step]:
    run = RunFactory.create(**run_fields)
    first, last = StepFactory.create(run=run, key="a"), StepFactory.create(run=run, key="b")
    return run, first, last


def test_claiming_a_queued_runs_first_step_starts_the_run():
    run, first, _ = chain_of_two()

    with CaptureQueriesContext(connection) as queries:
        claim = transitions.claim_step(first.pk, "delivery-1")

    assert len(statements(queries)) == TRANSITION_QUERIES
    assert claim.outcome is transitions.ClaimOutcome.RUN
    assert (claim.step.pk, claim.step.skill, claim.step.attempts, claim.step.status) == (first.pk, "echo", 1, "running")
    conversation = claim.step.run.conversation
    assert conversation is not None
    assert conversation.pk == run.conversation_id
    first.refresh_from_db()
    run.refresh_from_db()
    assert (first.status, first.delivery, first.attempts) == (StepStatus.RUNNING, "delivery-1", 1)
    assert first.started_at is not None
    assert first.lease_until is not None
    assert first.lease_until > first.started_at
    assert run.status == RunStatus.RUNNING
    assert run.started_at is not None
    assert events_of(run) == [
        (1, "run.running", None, {}),
        (2, "step.running", first.pk, {"attempt": 1, "redelivered": False}),
    ]
    assert run.last_event_seq == 2


def test_a_claimed_step_carries_its_conversations_state():
    run, first, _ = chain_of_two()
    assert run.conversation is not None
    run.conversation.state = {"tier": "gold"}
    run.conversation.save()

    claim = transitions.claim_step(first.pk, "delivery-1")

    claimed = claim.step.run.conversation
    assert claimed is not None
    assert claimed.state == {"tier": "gold"}
    assert claim.step.args == {}


def test_claiming_a_later_step_of_a_running_run_writes_one_event():
    run, first, last = chain_of_two()
    transitions.claim_step(first.pk, "d1")
    transitions.succeed_step(transitions.StepRef.load(first.pk), {"x": 1}, "d1")

    with CaptureQueriesContext(connection) as queries:
        claim = transitions.claim_step(last.pk, "d2")

    assert len(statements(queries)) == TRANSITION_QUERIES
    assert claim.outcome is transitions.ClaimOutcome.RUN
    assert [(seq, type) for seq, type, *_ in events_of(run)][-1] == (4, "step.running")


def test_a_second_message_for_a_claimed_step_is_a_duplicate():
    _, first, _ = chain_of_two()
    transitions.claim_step(first.pk, "d1")

    assert transitions.claim_step(first.pk, "d2").outcome is transitions.ClaimOutcome.DUPLICATE
    first.refresh_from_db()
    assert (first.delivery, first.attempts) == ("d1", 1)


def test_a_step_of_a_cancelled_run_is_not_claimed():
    run, first, _ = chain_of_two(status=RunStatus.CANCELLED)

    assert transitions.claim_step(first.pk, "d1").outcome is transitions.ClaimOutcome.RUN_ENDED
    first.refresh_from_db()
    assert first.status == StepStatus.PENDING
    assert not RunEvent.objects.filter(run=run).exists()


def test_storing_a_middle_steps_output_leaves_the_run_running():
    run, first, _ = chain_of_two()
    transitions.claim_step(first.pk, "d1")
    ref = transitions.StepRef.load(first.pk)

    with CaptureQueriesContext(connection) as queries:
        assert transitions.succeed_step(ref, {"answer": 42}, "d1")

    assert len(statements(queries)) == TRANSITION_QUERIES
    first.refresh_from_db()
    run.refresh_from_db()
    assert (first.status, first.output, first.error, first.cached) == (StepStatus.SUCCEEDED, {"answer": 42}, "", False)
    assert first.finished_at is not None
    assert run.status == RunStatus.RUNNING
    assert events_of(run)[-1] == (3, "step.succeeded", first.pk, {})


def test_storing_the_last_steps_output_ends_the_run_with_its_reply(django_capture_on_commit_callbacks):
    run, first, last = chain_of_two()
    pending = StepFactory.create(run=run, key="never-run")
    transitions.claim_step(first.pk, "d1")
    transitions.succeed_step(transitions.StepRef.load(first.pk), "one", "d1")
    transitions.claim_step(last.pk, "d2")
    ref = transitions.StepRef.load(last.pk)

    with django_capture_on_commit_callbacks(execute=True):
        assert transitions.succeed_step(ref, {"reply": "hello"}, "d2", finishes_run=True)

    run.refresh_from_db()
    pending.refresh_from_db()
    assert (run.status, run.output, run.error) == (RunStatus.SUCCEEDED, {"reply": "hello"}, "")
    assert run.finished_at is not None
    assert (pending.status, pending.error) == (StepStatus.CANCELLED, "not run: the run succeeded")
    assert [(seq, type) for seq, type, *_ in events_of(run)][-2:] == [(5, "step.succeeded"), (6, "run.succeeded")]
    assert list(Message.objects.filter(run=run).values_list("role", "content")) == [("assistant", "hello")]


def test_storing_the_last_steps_output_releases_the_run_held_behind_the_run(
    monkeypatch, django_capture_on_commit_callbacks
):
    run, first, _ = chain_of_two()
    new = services.prepare_run(owner=run.owner, conversation=run.conversation, spec={"skill": "echo"})
    held = services.insert_run(new, waiting_for=run.pk)  # as double-texting's enqueue does
    published: list[int] = []
    monkeypatch.setattr(broker, "republish", lambda to_publish: published.append(to_publish.pk))
    transitions.claim_step(first.pk, "d1")
    ref = transitions.StepRef.load(first.pk)

    with django_capture_on_commit_callbacks(execute=True):
        assert transitions.succeed_step(ref, "out", "d1", finishes_run=True)

    held.refresh_from_db()
    assert held.waiting_for_id is None
    assert held.republished_at is not None
    assert events_of(held)[-1][1:] == ("run.released", None, {"after": run.pk})
    assert published == [held.pk]


def test_the_last_step_of_a_run_that_ended_meanwhile_is_stored_but_leaves_the_run_as_it_is():
    run, first, _ = chain_of_two()
    transitions.claim_step(first.pk, "d1")
    transitions.fail_run(run.pk, "stopped elsewhere")

    # The step's output is kept (it ran, and held the step); the run stays failed.
    assert transitions.succeed_step(transitions.StepRef.load(first.pk), "late", "d1", finishes_run=True) is True
    first.refresh_from_db()
    run.refresh_from_db()
    assert (first.status, first.output) == (StepStatus.SUCCEEDED, "late")
    assert (run.status, run.output) == (RunStatus.FAILED, None)
    assert not Message.objects.filter(run=run).exists()
    assert [type for _, type, *_ in events_of(run)].count("run.succeeded") == 0


def test_a_delivery_that_does_not_hold_the_step_stores_nothing():
    run, first, _ = chain_of_two()
    transitions.claim_step(first.pk, "d1")
    before = events_of(run)

    assert transitions.succeed_step(transitions.StepRef.load(first.pk), "stolen", "d2") is False
    assert transitions.succeed_step(transitions.StepRef.load(first.pk), "stolen", "d2", finishes_run=True) is False

    first.refresh_from_db()
    assert (first.status, first.output) == (StepStatus.RUNNING, None)
    assert events_of(run) == before


def test_a_run_with_a_webhook_ends_with_its_delivery_stored():
    run, first, _ = chain_of_two(webhook_url="https://hooks.example.com/agentsite")
    transitions.claim_step(first.pk, "d1")

    assert transitions.succeed_step(transitions.StepRef.load(first.pk), "done", "d1", finishes_run=True)

    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    delivery = WebhookDelivery.objects.get(run=run)
    assert delivery.event_id == f"{run.pk}-{run.last_event_seq}"


def test_a_step_stored_from_the_cache_says_so_in_its_row_and_event():
    run, first, _ = chain_of_two()
    transitions.claim_step(first.pk, "d1")
    ref = transitions.StepRef.load(first.pk)

    assert transitions.succeed_step(ref, {"answer": 42}, "d1", cached=True)

    first.refresh_from_db()
    assert (first.status, first.output, first.cached) == (StepStatus.SUCCEEDED, {"answer": 42}, True)
    assert events_of(run)[-1] == (3, "step.succeeded", first.pk, {"cached": True})


def test_the_last_step_stored_from_the_cache_ends_the_run_and_says_so():
    run, first, last = chain_of_two()
    transitions.claim_step(first.pk, "d1")
    transitions.succeed_step(transitions.StepRef.load(first.pk), "one", "d1")
    transitions.claim_step(last.pk, "d2")
    ref = transitions.StepRef.load(last.pk)

    assert transitions.succeed_step(ref, {"reply": "hello"}, "d2", finishes_run=True, cached=True)

    first.refresh_from_db()
    last.refresh_from_db()
    run.refresh_from_db()
    assert (first.cached, last.cached) == (False, True)
    assert (run.status, run.output) == (RunStatus.SUCCEEDED, {"reply": "hello"})
    assert events_of(run)[-2:] == [
        (5, "step.succeeded", last.pk, {"cached": True}),
        (6, "run.succeeded", None, {}),
    ]


def test_a_run_with_a_webhook_stores_a_cached_step_alike():
    run, first, _ = chain_of_two(webhook_url="https://hooks.example.com/agentsite")
    transitions.claim_step(first.pk, "d1")

    assert transitions.succeed_step(transitions.StepRef.load(first.pk), "done", "d1", finishes_run=True, cached=True)

    first.refresh_from_db()
    assert first.cached is True
    assert RunEvent.objects.get(run=run, type="step.succeeded").data == {"cached": True}


@pytest.mark.parametrize("conversation", [True, False], ids=["of a conversation", "on its own"])
def test_a_claimed_step_is_its_row_as_the_orm_reads_it(conversation):
    """Every field of the claimed step, and all the task reads off it, without a query."""
    _, first, _ = chain_of_two(**({} if conversation else {"conversation": None}))
    claim = transitions.claim_step(first.pk, "delivery-1")
    stored = Step.objects.select_related("run__conversation").get(pk=first.pk)

    with CaptureQueriesContext(connection) as queries:
        claimed = {field.attname: getattr(claim.step, field.attname) for field in Step._meta.concrete_fields}
        context = tasks.skill_context(claim.step)
        ref = transitions.StepRef.of(claim.step)
        run = (claim.step.run.pk, claim.step.run.status, claim.step.run.conversation_id)

    assert not queries.captured_queries
    assert run == (stored.run.pk, stored.run.status, stored.run.conversation_id)
    assert claimed == {field.attname: getattr(stored, field.attname) for field in Step._meta.concrete_fields}
    assert context == replace(tasks.skill_context(stored), started=context.started)
    assert ref == transitions.StepRef.of(stored)


def heard_within(announcements: Any, seconds: float) -> list[bytes]:
    """The announcements published on the subscription within ``seconds`` (the publisher is a thread)."""
    deadline = time.monotonic() + seconds
    heard = []
    while (left := deadline - time.monotonic()) > 0:
        if (message := announcements.get_message(timeout=left)) is not None:
            heard.append(message["data"])
    return heard


def test_a_transition_announces_its_last_event_once(django_capture_on_commit_callbacks):
    """A stream reads every event after its last one on any announcement: one per transition tells it all."""
    run, first, _ = chain_of_two()
    announcements, watch = events._subscribe(run.pk)  # as a stream does: only watched runs are announced
    time.sleep(events.WATCH_GRACE)  # by now every process's copy of the watched runs has this one
    try:
        with django_capture_on_commit_callbacks(execute=True):
            transitions.claim_step(first.pk, "delivery-1")  # run.running and step.running
        heard = heard_within(announcements, seconds=1.0)
    finally:
        announcements.close()
        events._unwatch(watch)

    assert heard == [b"2"]


def cancelled_meanwhile(run: Run, transition: Any) -> list[Any]:
    """Run ``transition`` while another session, as a cancel does, holds the run's lock; what it returned.

    The other session locks the run's row, waits until the transition has
    started (and waits for the run, if it locks the run first), then updates
    the run's steps and ends the run. A transition that locked a step first
    and then the run deadlocks with it: PostgreSQL aborts one of the two.
    """
    import psycopg

    outcome: list[Any] = []

    def transition_then_close() -> None:
        try:
            outcome.append(transition())
        except Exception as exc:  # noqa: BLE001 - a deadlock, surfaced by the caller's assert
            outcome.append(exc)
        finally:
            connection.close()

    ender = psycopg.connect(**connection.get_connection_params())
    try:
        with ender.transaction():
            ender.execute("SET LOCAL lock_timeout = '3s'")
            ender.execute("SELECT id FROM orchestration_run WHERE id = %s FOR UPDATE", [run.pk])
            thread = threading.Thread(target=transition_then_close)
            thread.start()
            time.sleep(0.5)  # the transition waits for the run by now
            ender.execute("UPDATE orchestration_step SET status = 'cancelled' WHERE run_id = %s", [run.pk])
            ender.execute("UPDATE orchestration_run SET status = 'cancelled' WHERE id = %s", [run.pk])
        thread.join(10)
    finally:
        ender.close()
    return outcome


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's row locks")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("held", [False, True])
def test_a_step_transition_locks_its_run_before_the_step(held):
    """As whatever ends a run does (its row, then its steps): the other order deadlocked with it.

    The step is claimed (or, ``held``, its output stored) while a cancel holds
    the run; the transition then finds the run ended and changes nothing.
    """
    run, first, _ = chain_of_two()
    if held:
        Step.objects.filter(pk=first.pk).update(status=StepStatus.RUNNING, delivery="d")
        Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)

    def transition() -> Any:
        if held:
            return transitions.succeed_step(transitions.StepRef.load(first.pk), {"x": 1}, "d")
        return transitions.claim_step(first.pk, "d").outcome

    assert cancelled_meanwhile(run, transition) == [False if held else transitions.ClaimOutcome.RUN_ENDED]
    assert set(Step.objects.filter(run=run).values_list("status", flat=True)) == {StepStatus.CANCELLED}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's row locks")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", ["retry", "skip", "fail", "wait", "release"])
def test_a_transition_through_the_orm_locks_its_run_before_the_step_too(name):
    """A retry, a skip, a failure, a wait or a lost worker's release while a cancel holds the run: no deadlock."""
    run, first, _ = chain_of_two()
    Step.objects.filter(pk=first.pk).update(status=StepStatus.RUNNING, delivery="d")
    Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    first.refresh_from_db()
    ref = transitions.StepRef.of(first)
    attempts = {
        "retry": lambda: transitions.retry_step(ref, "boom", countdown=1.0),
        "skip": lambda: transitions.skip_step(ref, "boom", "d"),
        "fail": lambda: transitions.fail_step(first.pk, "boom"),
        "wait": lambda: transitions.wait_step(ref, "d", {"prompt": "?", "timeout": 60}),
        "release": lambda: transitions.release_lost_step(first.pk, "d"),
    }

    outcome = cancelled_meanwhile(run, attempts[name])

    assert outcome in ([None], [False])  # it found the step cancelled, and changed nothing
    assert set(Step.objects.filter(run=run).values_list("status", flat=True)) == {StepStatus.CANCELLED}
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED


def test_a_run_goes_in_with_its_steps_and_first_event_in_one_transaction(user):
    """Three INSERTs in one transaction; on PostgreSQL one statement (transitions_pg)."""
    conversation = ConversationFactory.create(owner=user)
    new = services.prepare_run(owner=user, conversation=conversation, spec={"chain": [{"skill": "echo"}] * 3})

    with CaptureQueriesContext(connection) as queries:
        run = services.insert_run(new)

    inserts = [sql.strip().split(" (")[0] for sql in statements(queries)]
    tables = [Run._meta.db_table, Step._meta.db_table, RunEvent._meta.db_table]
    if connection.vendor == "postgresql":
        assert inserts == ["WITH run_ AS"]
    else:
        assert inserts == [f"INSERT INTO {connection.ops.quote_name(t)}" for t in tables]
    assert list(run.events.values_list("seq", "type", "data")) == [(1, "run.queued", {"steps": 3})]
    assert Run.objects.get(pk=run.pk).last_event_seq == 1
    assert [(step.pk, step.run_id) for step in new.steps] == list(run.steps.order_by("id").values_list("pk", "run_id"))


def test_a_held_run_goes_in_with_its_enqueued_event_and_its_predecessor_told(user):
    ahead = RunFactory.create(owner=user)
    new = services.prepare_run(owner=user, conversation=ahead.conversation, spec={"skill": "echo"})

    held = services.insert_run(new, waiting_for=ahead.pk)

    held.refresh_from_db()
    assert (held.status, held.waiting_for_id, held.last_event_seq) == (RunStatus.QUEUED, ahead.pk, 2)
    assert [(seq, type, data) for seq, type, _, data in events_of(held)] == [
        (1, "run.queued", {"steps": 1}),
        (2, "run.enqueued", {"waiting_for": ahead.pk}),
    ]
    assert Run.objects.get(pk=ahead.pk).followed is True
