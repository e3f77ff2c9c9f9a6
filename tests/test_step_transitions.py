"""A step's claim and store: the rows and events they leave, and what they cost.

The common cases skip the ORM: on PostgreSQL one statement each
(orchestration.state_pg), on SQLite a few plain statements in one transaction
(orchestration.state_sqlite); every other case takes the ORM's transactions.
All must leave the same rows and events, so each test checks them on either
database, and that the common cases made no ORM query (on PostgreSQL: exactly
one query).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orchestration import events, services, state, state_sqlite
from orchestration.models import Message, Run, RunEvent, RunStatus, Step, StepStatus, WebhookDelivery
from skills import tasks

from .factories import RunFactory, StepFactory

pytestmark = pytest.mark.django_db


@contextlib.contextmanager
def without_the_orm() -> Iterator[None]:
    """The block's queries are the fast path's own: one on PostgreSQL, and none the ORM wrote (it quotes names)."""
    with CaptureQueriesContext(connection) as queries:
        yield
    statements = [q["sql"] for q in queries.captured_queries]
    assert statements
    assert not [sql for sql in statements if '"orchestration_' in sql], statements
    if connection.vendor == "postgresql":
        assert len(statements) == 1, statements


def events_of(run: Run) -> list[tuple[int, str, int | None, dict[str, Any]]]:
    rows = RunEvent.objects.filter(run=run).order_by("id").values_list("seq", "type", "step_id", "data")
    return [(seq, type, step_id, data) for seq, type, step_id, data in rows]


def chain_of_two(**run_fields: Any) -> tuple[Run, Step, Step]:
    run = RunFactory.create(**run_fields)
    first, last = StepFactory.create(run=run, key="a"), StepFactory.create(run=run, key="b")
    return run, first, last


def test_claiming_a_queued_runs_first_step_starts_the_run():
    run, first, _ = chain_of_two()

    with without_the_orm():
        claim = state.claim_step(first.pk, "delivery-1")

    assert claim.outcome is state.ClaimOutcome.RUN
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

    claim = state.claim_step(first.pk, "delivery-1")

    claimed = claim.step.run.conversation
    assert claimed is not None
    assert claimed.state == {"tier": "gold"}
    assert claim.step.args == {}


def test_claiming_a_later_step_of_a_running_run_writes_one_event():
    run, first, last = chain_of_two()
    state.claim_step(first.pk, "d1")
    state.succeed_step(state.StepRef.load(first.pk), {"x": 1}, "d1")

    with without_the_orm():
        claim = state.claim_step(last.pk, "d2")

    assert claim.outcome is state.ClaimOutcome.RUN
    assert [(seq, type) for seq, type, *_ in events_of(run)][-1] == (4, "step.running")


def test_a_second_message_for_a_claimed_step_is_a_duplicate():
    _, first, _ = chain_of_two()
    state.claim_step(first.pk, "d1")

    assert state.claim_step(first.pk, "d2").outcome is state.ClaimOutcome.DUPLICATE
    first.refresh_from_db()
    assert (first.delivery, first.attempts) == ("d1", 1)


def test_a_step_of_a_cancelled_run_is_not_claimed():
    run, first, _ = chain_of_two(status=RunStatus.CANCELLED)

    assert state.claim_step(first.pk, "d1").outcome is state.ClaimOutcome.RUN_ENDED
    first.refresh_from_db()
    assert first.status == StepStatus.PENDING
    assert not RunEvent.objects.filter(run=run).exists()


def test_storing_a_middle_steps_output_leaves_the_run_running():
    run, first, _ = chain_of_two()
    state.claim_step(first.pk, "d1")
    ref = state.StepRef.load(first.pk)

    with without_the_orm():
        assert state.succeed_step(ref, {"answer": 42}, "d1")

    first.refresh_from_db()
    run.refresh_from_db()
    assert (first.status, first.output, first.error, first.cached) == (StepStatus.SUCCEEDED, {"answer": 42}, "", False)
    assert first.finished_at is not None
    assert run.status == RunStatus.RUNNING
    assert events_of(run)[-1] == (3, "step.succeeded", first.pk, {})


def test_storing_the_last_steps_output_ends_the_run_with_its_reply(django_capture_on_commit_callbacks):
    run, first, last = chain_of_two()
    pending = StepFactory.create(run=run, key="never-run")
    state.claim_step(first.pk, "d1")
    state.succeed_step(state.StepRef.load(first.pk), "one", "d1")
    state.claim_step(last.pk, "d2")
    ref = state.StepRef.load(last.pk)

    # With what runs on commit: a run nothing is held behind is not looked up again.
    with without_the_orm(), django_capture_on_commit_callbacks(execute=True):
        assert state.succeed_step(ref, {"reply": "hello"}, "d2", finishes_run=True)

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
    held = RunFactory.create(owner=run.owner, conversation=run.conversation, waiting_for=run)
    state.hold_behind(held.pk, run.pk)  # as double-texting's enqueue does
    published: list[int] = []
    monkeypatch.setattr(services, "publish", lambda to_publish: published.append(to_publish.pk))
    state.claim_step(first.pk, "d1")
    ref = state.StepRef.load(first.pk)

    with django_capture_on_commit_callbacks(execute=True), without_the_orm():
        assert state.succeed_step(ref, "out", "d1", finishes_run=True)

    held.refresh_from_db()
    assert held.waiting_for_id is None
    assert held.republished_at is not None
    assert events_of(held)[-1][1:] == ("run.released", None, {"after": run.pk})
    assert published == [held.pk]


def test_the_last_step_of_a_run_that_ended_meanwhile_is_stored_but_leaves_the_run_as_it_is():
    run, first, _ = chain_of_two()
    state.claim_step(first.pk, "d1")
    state.fail_run(run.pk, "stopped elsewhere")

    # The step's output is kept (it ran, and held the step); the run stays failed.
    assert state.succeed_step(state.StepRef.load(first.pk), "late", "d1", finishes_run=True) is True
    first.refresh_from_db()
    run.refresh_from_db()
    assert (first.status, first.output) == (StepStatus.SUCCEEDED, "late")
    assert (run.status, run.output) == (RunStatus.FAILED, None)
    assert not Message.objects.filter(run=run).exists()
    assert [type for _, type, *_ in events_of(run)].count("run.succeeded") == 0


def test_a_delivery_that_does_not_hold_the_step_stores_nothing():
    run, first, _ = chain_of_two()
    state.claim_step(first.pk, "d1")
    before = events_of(run)

    assert state.succeed_step(state.StepRef.load(first.pk), "stolen", "d2") is False
    assert state.succeed_step(state.StepRef.load(first.pk), "stolen", "d2", finishes_run=True) is False

    first.refresh_from_db()
    assert (first.status, first.output) == (StepStatus.RUNNING, None)
    assert events_of(run) == before


def test_a_run_with_a_webhook_ends_with_its_delivery_stored():
    run, first, _ = chain_of_two(webhook_url="https://hooks.example.com/agentsite")
    state.claim_step(first.pk, "d1")

    assert state.succeed_step(state.StepRef.load(first.pk), "done", "d1", finishes_run=True)

    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    delivery = WebhookDelivery.objects.get(run=run)
    assert delivery.event_id == f"{run.pk}-{run.last_event_seq}"


def test_a_step_stored_from_the_cache_says_so_in_its_row_and_event():
    run, first, _ = chain_of_two()
    state.claim_step(first.pk, "d1")
    ref = state.StepRef.load(first.pk)

    with without_the_orm():
        assert state.succeed_step(ref, {"answer": 42}, "d1", cached=True)

    first.refresh_from_db()
    assert (first.status, first.output, first.cached) == (StepStatus.SUCCEEDED, {"answer": 42}, True)
    assert events_of(run)[-1] == (3, "step.succeeded", first.pk, {"cached": True})


def test_the_last_step_stored_from_the_cache_ends_the_run_and_says_so():
    run, first, last = chain_of_two()
    state.claim_step(first.pk, "d1")
    state.succeed_step(state.StepRef.load(first.pk), "one", "d1")
    state.claim_step(last.pk, "d2")
    ref = state.StepRef.load(last.pk)

    with without_the_orm():
        assert state.succeed_step(ref, {"reply": "hello"}, "d2", finishes_run=True, cached=True)

    first.refresh_from_db()
    last.refresh_from_db()
    run.refresh_from_db()
    assert (first.cached, last.cached) == (False, True)
    assert (run.status, run.output) == (RunStatus.SUCCEEDED, {"reply": "hello"})
    assert events_of(run)[-2:] == [
        (5, "step.succeeded", last.pk, {"cached": True}),
        (6, "run.succeeded", None, {}),
    ]


def test_a_run_with_a_webhook_stores_a_cached_step_the_general_way_alike():
    run, first, _ = chain_of_two(webhook_url="https://hooks.example.com/agentsite")
    state.claim_step(first.pk, "d1")

    assert state.succeed_step(state.StepRef.load(first.pk), "done", "d1", finishes_run=True, cached=True)

    first.refresh_from_db()
    assert first.cached is True
    assert RunEvent.objects.get(run=run, type="step.succeeded").data == {"cached": True}


@pytest.mark.parametrize("conversation", [True, False], ids=["of a conversation", "on its own"])
def test_a_claimed_step_is_its_row_as_the_orm_reads_it(conversation):
    """Every field of the step the fast claim builds, and all the task reads off it, without a query."""
    _, first, _ = chain_of_two(**({} if conversation else {"conversation": None}))
    claim = state.claim_step(first.pk, "delivery-1")
    stored = Step.objects.select_related("run__conversation").get(pk=first.pk)

    with CaptureQueriesContext(connection) as queries:
        claimed = {field.attname: getattr(claim.step, field.attname) for field in Step._meta.concrete_fields}
        context = tasks._context(claim.step)
        ref = state.StepRef.of(claim.step)
        run = (claim.step.run.pk, claim.step.run.status, claim.step.run.conversation_id)

    assert not queries.captured_queries
    assert run == (stored.run.pk, stored.run.status, stored.run.conversation_id)
    assert claimed == {field.attname: getattr(stored, field.attname) for field in Step._meta.concrete_fields}
    assert context == replace(tasks._context(stored), started=context.started)
    assert ref == state.StepRef.of(stored)


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
            state.claim_step(first.pk, "delivery-1")  # run.running and step.running
        heard = heard_within(announcements, seconds=1.0)
    finally:
        announcements.close()
        events._unwatch(watch)

    assert heard == [b"2"]


@pytest.mark.skipif(connection.vendor != "sqlite", reason="PostgreSQL claims in one statement")
def test_a_claim_changes_nothing_if_another_claimed_the_step_after_it_was_read():
    """SQLite reads the step before taking the write lock; under the lock it finds another delivery holds it."""
    run, first, _ = chain_of_two()
    others: list[state.Claim] = []
    asked: list[bool] = []

    def another_claims_first(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql == state_sqlite._RUN_STATE and not asked:  # the lock is taken: the read is done
            asked.append(True)
            others.append(state.claim_step(first.pk, "other"))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(another_claims_first):
        claim = state.claim_step(first.pk, "late")

    assert [other.outcome for other in others] == [state.ClaimOutcome.RUN]
    assert claim.outcome is state.ClaimOutcome.DUPLICATE
    first.refresh_from_db()
    assert (first.delivery, first.attempts) == ("other", 1)
    assert [type for _, type, *_ in events_of(run)] == ["run.running", "step.running"]


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

    The step is claimed (or, ``held``, its output stored) in one statement
    while a cancel holds the run; the transition then finds the run ended
    and leaves it to the general way.
    """
    from django.utils import timezone

    from orchestration import state_pg

    run, first, _ = chain_of_two()
    if held:
        Step.objects.filter(pk=first.pk).update(status=StepStatus.RUNNING, delivery="d")
        Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)

    def transition() -> Any:
        if held:
            return state_pg.store(first.pk, run.pk, {"x": 1}, "d", timezone.now(), finishes_run=False)
        return state_pg.claim(first.pk, "d", timezone.now())

    assert cancelled_meanwhile(run, transition) == [None]
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
    ref = state.StepRef.of(first)
    transitions = {
        "retry": lambda: state.retry_step(ref, "boom", countdown=1.0),
        "skip": lambda: state.skip_step(ref, "boom", "d"),
        "fail": lambda: state.fail_step(first.pk, "boom"),
        "wait": lambda: state.wait_step(ref, "d", {"prompt": "?", "timeout": 60}),
        "release": lambda: state.release_lost_step(first.pk, "d"),
    }

    outcome = cancelled_meanwhile(run, transitions[name])

    assert outcome in ([None], [False])  # it found the step cancelled, and changed nothing
    assert set(Step.objects.filter(run=run).values_list("status", flat=True)) == {StepStatus.CANCELLED}
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED
