"""Runs end to end: specs become canvases that a real prefork worker executes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from agentsite.celery import app
from orchestration.models import Run, RunEvent, Step
from orchestration.services import start_run

from .conftest import WORKER_LOG, wait_for_run

pytestmark = pytest.mark.worker

ECHO = {"skill": "echo"}


def echo(value: Any, id: str | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"skill": "echo", "args": {"value": value}}
    if id:
        step["id"] = id
    return step


def sleep(seconds: float, id: str, shield: bool = False, **options: Any) -> dict[str, Any]:
    """A sleep step; with ``shield`` it sleeps through its soft time limit."""
    return {"skill": "sleep", "id": id, "args": {"seconds": seconds, "shield": shield}, **options}


def run(user: Any, spec: Any, input: Any = None, timeout: float = 20) -> Run:
    return wait_for_run(start_run(owner=user, spec=spec, input=input), timeout)


def steps(run: Run) -> dict[str, Step]:
    return {s.key: s for s in run.steps.all()}


def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s; see {WORKER_LOG}")
        time.sleep(0.05)


def assert_never_ran(step: Step) -> None:
    assert step.status == "cancelled"
    assert step.attempts == 0
    assert step.started_at is None
    assert step.output is None


# --- Data passing -----------------------------------------------------------


def test_a_chain_gives_the_run_input_to_the_first_step_and_each_output_to_the_next(worker, user):
    r = run(user, {"chain": [{"skill": "echo", "id": "a"}, echo({"n": 2}, "b"), {"skill": "echo", "id": "c"}]}, "in")

    assert r.status == "succeeded"
    assert r.output == {"n": 2}
    assert {k: s.output for k, s in steps(r).items()} == {"a": "in", "b": {"n": 2}, "c": {"n": 2}}


def test_a_groups_output_is_the_list_of_its_members_outputs(worker, user):
    r = run(user, {"group": [echo(1), ECHO, echo([3])]}, "in")

    assert r.status == "succeeded"
    assert r.output == [1, "in", [3]]


def test_a_chord_body_receives_the_list_of_all_header_outputs(worker, user):
    spec = {"chord": {"header": [echo(1), echo(2), echo(3), ECHO], "body": {"skill": "echo", "id": "body"}}}

    r = run(user, spec, "in")

    assert r.status == "succeeded"
    assert steps(r)["body"].output == [1, 2, 3, "in"]
    assert r.output == [1, 2, 3, "in"]


def test_a_chord_header_may_hold_a_chain(worker, user):
    spec = {"chord": {"header": [{"chain": [echo("a"), {"skill": "echo", "id": "then"}]}, echo("b")], "body": ECHO}}

    r = run(user, spec)

    assert r.status == "succeeded"
    assert steps(r)["then"].output == "a"
    assert r.output == ["a", "b"]


def test_a_chord_header_may_hold_a_chain_and_a_group(worker, user):
    spec = {
        "chord": {
            "header": [{"chain": [echo("a"), ECHO]}, {"group": [echo("b"), echo("c"), echo("d")]}],
            "body": ECHO,
        }
    }

    r = run(user, spec)

    assert r.status == "succeeded"
    assert r.output == ["a", ["b", "c", "d"]]  # observed: ["a", "d", "c", "b"]


def test_a_group_inside_a_group_outputs_its_own_list(worker, user):
    r = run(user, {"group": [echo("a"), {"group": [echo("b"), echo("c")]}]})

    assert r.status == "succeeded"
    assert r.output == ["a", ["b", "c"]]  # observed: ["a", "c", "b"]


def test_a_group_may_hold_a_chord_and_a_chain_ending_in_a_group(worker, user):
    spec = {
        "group": [
            {"chord": {"header": [echo("a"), echo("b")], "body": ECHO}},
            {"chain": [echo("c"), {"group": [echo("d"), echo("e")]}]},
        ]
    }

    assert run(user, spec).output == [["a", "b"], ["d", "e"]]


def test_a_chain_may_hold_a_chord(worker, user):
    spec = {"chain": [echo(0), {"chord": {"header": [ECHO, echo(2)], "body": {"skill": "echo", "id": "body"}}}, ECHO]}

    r = run(user, spec)

    assert r.status == "succeeded"
    assert steps(r)["body"].output == [0, 2]
    assert r.output == [0, 2]


def test_a_group_of_one_still_outputs_a_list(worker, user):
    assert run(user, {"group": [echo(1)]}).output == [1]
    assert run(user, {"chain": [echo(1), {"group": [ECHO]}, ECHO]}).output == [1]


def test_a_chord_may_be_in_the_header_of_a_chord(worker, user):
    inner = {"chord": {"header": [echo("a"), echo("b")], "body": {"skill": "echo", "id": "inner"}}}
    spec = {"chord": {"header": [inner, echo("c")], "body": {"skill": "echo", "id": "outer"}}}

    r = run(user, spec)

    assert r.status == "succeeded"
    assert steps(r)["inner"].output == ["a", "b"]
    assert r.output == [["a", "b"], "c"]


def test_a_group_may_follow_a_group_in_a_chain(worker, user):
    spec = {"chain": [{"group": [echo(1), echo(2)]}, {"group": [ECHO, ECHO]}]}

    assert run(user, spec).output == [[1, 2], [1, 2]]


def test_a_retried_header_step_still_fans_in_once(worker, user):
    spec = {
        "chord": {
            "header": [{"skill": "flaky", "id": "flaky", "args": {"failures": 1}, "retries": 1}, echo(2)],
            "body": {"skill": "echo", "id": "body"},
        }
    }

    r = run(user, spec, "in")

    assert r.status == "succeeded"
    assert r.output == ["in", 2]
    assert (steps(r)["flaky"].attempts, steps(r)["body"].attempts) == (2, 1)


def test_a_failing_header_step_fails_the_run_and_the_body_never_runs(worker, user):
    spec = {
        "chord": {
            "header": [echo(1), {"skill": "fail", "id": "broken", "args": {"message": "no"}}],
            "body": {"skill": "echo", "id": "body"},
        }
    }

    r = run(user, spec)

    assert r.status == "failed"
    assert r.error == "step broken failed: no"
    assert_never_ran(steps(r)["body"])


def test_an_optional_failing_header_step_gives_the_body_null_in_its_place(worker, user):
    spec = {"chord": {"header": [echo(1), {"skill": "fail", "optional": True}], "body": ECHO}}

    r = run(user, spec)

    assert r.status == "succeeded"
    assert r.steps.get(path="spec.chord.header[1]").status == "skipped"
    assert r.output == [1, None]


# --- Time limits ------------------------------------------------------------


def test_a_soft_time_limit_times_the_step_out_and_fails_the_run(worker, user):
    spec = {"chain": [sleep(10, "slow", soft_time_limit=0.5, time_limit=5), {"skill": "echo", "id": "after"}]}

    r = run(user, spec)

    slow = steps(r)["slow"]
    assert r.status == "failed"
    assert slow.status == "timed_out"
    assert slow.error == "timed out after 0.5s (soft limit)"
    assert r.error == "step slow timed out: timed out after 0.5s (soft limit)"
    assert slow.finished_at is not None
    assert_never_ran(steps(r)["after"])


def test_an_optional_step_that_times_out_is_skipped_and_the_run_goes_on(worker, user):
    spec = {
        "chain": [
            sleep(10, "slow", soft_time_limit=0.5, time_limit=5, optional=True),
            {"skill": "echo", "id": "after"},
            echo("done"),
        ]
    }

    r = run(user, spec)

    slow, after = steps(r)["slow"], steps(r)["after"]
    assert r.status == "succeeded"
    assert (slow.status, slow.output) == ("skipped", None)
    assert "soft limit" in slow.error
    assert (after.status, after.attempts, after.output) == ("succeeded", 1, None)
    assert r.output == "done"


def test_a_hard_time_limit_kills_the_step_and_fails_the_run(worker, user):
    spec = {
        "chain": [
            sleep(30, "stuck", shield=True, soft_time_limit=1, time_limit=2),
            {"skill": "echo", "id": "after"},
        ]
    }
    started = time.monotonic()

    r = run(user, spec)

    stuck = steps(r)["stuck"]
    assert r.status == "failed"
    assert time.monotonic() - started < 15
    assert stuck.status == "timed_out"
    assert stuck.error.startswith("killed at the hard time limit")
    assert r.error.startswith("step stuck timed out: killed at the hard time limit")
    assert_never_ran(steps(r)["after"])


# --- Failures, optional steps, retries ----------------------------------------


def test_a_failing_step_fails_the_run_with_the_skills_message(worker, user):
    spec = {
        "chain": [
            {"skill": "echo", "id": "before"},
            {"skill": "fail", "id": "broken", "args": {"message": "the tool said no"}},
            {"skill": "echo", "id": "after"},
            {"group": [{"skill": "echo", "id": "later"}, ECHO]},
        ]
    }

    r = run(user, spec)

    by_key = steps(r)
    assert r.status == "failed"
    assert r.error == "step broken failed: the tool said no"
    assert by_key["before"].status == "succeeded"
    assert (by_key["broken"].status, by_key["broken"].error, by_key["broken"].attempts) == (
        "failed",
        "the tool said no",
        1,
    )
    assert_never_ran(by_key["after"])
    assert_never_ran(by_key["later"])


def test_an_optional_failing_step_in_a_group_yields_null_in_its_place(worker, user):
    spec = {"group": [echo(1), {"skill": "fail", "id": "broken", "optional": True}, echo(3)]}

    r = run(user, spec)

    broken = steps(r)["broken"]
    assert r.status == "succeeded"
    assert r.output == [1, None, 3]
    assert (broken.status, broken.output, broken.error) == ("skipped", None, "failed on purpose")


def test_a_flaky_step_is_retried_to_success_and_its_attempts_recorded(worker, user):
    r = run(user, {"skill": "flaky", "id": "flaky", "args": {"failures": 2}, "retries": 2}, "in")

    flaky = steps(r)["flaky"]
    assert r.status == "succeeded"
    assert r.output == "in"
    assert (flaky.status, flaky.attempts, flaky.output) == ("succeeded", 3, "in")
    assert flaky.started_at is not None
    assert flaky.finished_at is not None
    assert flaky.duration_ms is not None
    assert flaky.duration_ms >= 0
    retried = RunEvent.objects.filter(step=flaky, type="step.retrying")
    assert [e.data["error"] for e in retried] == [
        "flaky: attempt 1 of 2 planned failures",
        "flaky: attempt 2 of 2 planned failures",
    ]


def test_a_flaky_step_with_more_failures_than_retries_fails_the_run(worker, user):
    r = run(user, {"chain": [{"skill": "flaky", "id": "flaky", "args": {"failures": 3}, "retries": 1}, ECHO]})

    flaky = steps(r)["flaky"]
    assert r.status == "failed"
    assert (flaky.status, flaky.attempts) == ("failed", 2)
    assert flaky.error == "flaky: attempt 2 of 3 planned failures"
    assert r.error == "step flaky failed: flaky: attempt 2 of 3 planned failures"
    assert_never_ran(steps(r)["spec.chain[1]"])


@pytest.mark.parametrize(("transient", "attempts"), [(True, 3), (False, 1)])
def test_a_skill_error_a_retry_cannot_help_is_not_retried(worker, user, transient, attempts):
    r = run(user, {"skill": "fail", "id": "f", "args": {"message": "bad", "transient": transient}, "retries": 2})

    f = steps(r)["f"]
    assert r.status == "failed"
    assert (f.status, f.attempts, f.error) == ("failed", attempts, "bad")


def test_a_skill_error_keeps_its_transience_through_pickling():
    import pickle

    from skills.support.llm import LLMError

    error = pickle.loads(pickle.dumps(LLMError("the LLM answered HTTP 400", transient=False)))

    assert (type(error), str(error), error.transient) == (LLMError, "the LLM answered HTTP 400", False)


# --- Queue TTL --------------------------------------------------------------


def test_a_step_that_waits_in_the_queue_past_its_ttl_expires_and_fails_the_run(worker, user):
    # Every worker process busy long enough that they are all busy at once,
    # even when a loaded machine starts them a few seconds apart (or the pool
    # is still replacing a process an earlier test's hard time limit killed).
    blockers = start_run(owner=user, spec={"group": [sleep(8, f"busy-{n}") for n in range(worker.concurrency)]})
    wait_until(lambda: blockers.steps.filter(status="running").count() == worker.concurrency, timeout=20)

    r = run(user, {"chain": [{"skill": "echo", "id": "late", "ttl": 0.3}, {"skill": "echo", "id": "after"}]})

    late = steps(r)["late"]
    assert r.status == "failed"
    assert late.status == "failed"
    assert late.error.startswith("expired")
    assert late.attempts == 0
    assert r.error.startswith("step late failed: expired")
    assert_never_ran(steps(r)["after"])
    assert wait_for_run(blockers).status == "succeeded"


def test_a_step_revoked_and_terminated_from_outside_fails_the_run(worker, user):
    started = start_run(owner=user, spec={"chain": [sleep(10, "long"), {"skill": "echo", "id": "after"}]})
    long = started.steps.get(key="long")
    wait_until(lambda: Step.objects.get(pk=long.pk).status == "running")

    app.control.revoke(str(long.task_id), terminate=True)  # what Flower's "terminate" does

    r = wait_for_run(started, timeout=10)
    assert r.status == "failed"
    assert steps(r)["long"].status == "failed"
    assert steps(r)["long"].error == "revoked and terminated outside agentsite"
    assert_never_ran(steps(r)["after"])


# --- Bookkeeping ------------------------------------------------------------


def test_every_step_records_attempts_and_timings(worker, user):
    spec = {"chain": [ECHO, {"group": [sleep(0.2, "nap"), ECHO]}, {"chord": {"header": [ECHO], "body": ECHO}}]}

    r = run(user, spec)

    assert r.status == "succeeded"
    assert r.started_at is not None
    assert r.finished_at is not None
    assert r.created_at <= r.started_at <= r.finished_at
    for step in r.steps.all():
        assert step.status == "succeeded", step.key
        assert step.attempts == 1, step.key
        assert step.started_at is not None, step.key
        assert step.finished_at is not None, step.key
        assert r.started_at <= step.started_at <= step.finished_at <= r.finished_at, step.key
    assert (steps(r)["nap"].duration_ms or 0) >= 200


def test_each_step_writes_its_transitions_as_events(worker, user):
    r = run(user, {"chain": [{"skill": "echo", "id": "a"}, {"skill": "echo", "id": "b"}]})

    step_events = [(e.step.key, e.type) for e in r.events.select_related("step") if e.step is not None]
    assert step_events == [
        ("a", "step.running"),
        ("a", "step.succeeded"),
        ("b", "step.running"),
        ("b", "step.succeeded"),
    ]
    types = [e.type for e in r.events.all()]
    assert types[0] == "run.queued"
    assert types[-1] == "run.succeeded"
    assert types.count("run.running") == 1


def test_a_failed_run_ends_its_events_with_the_step_failure_then_the_run_failure(worker, user):
    r = run(user, {"chain": [ECHO, {"skill": "fail", "id": "broken", "args": {"message": "no"}}]})

    events = list(r.events.all())
    assert [e.type for e in events[-2:]] == ["step.failed", "run.failed"]
    assert events[-2].data == {"error": "no"}
    assert events[-1].data == {"error": "step broken failed: no"}


def test_events_follow_the_runs_transitions_in_order(worker, user):
    r = run(user, {"skill": "echo"})

    assert [e.type for e in r.events.all()] == [
        "run.queued",
        "run.running",
        "step.running",
        "step.succeeded",
        "run.succeeded",
    ]
