"""Saga compensation: a failed run undoes its compensable steps, last completed first."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from django.utils import timezone

from orchestration import transitions
from orchestration.models import Run, Step
from orchestration.services import start_run
from skills.models import Reservation
from skills.registry import Registry, Skill, registry

from .conftest import wait_for_run, wait_until


def reserve(id: str, **args: Any) -> dict[str, Any]:
    return {"skill": "reserve", "id": id, "args": args}


FAIL = {"skill": "fail", "id": "boom", "args": {"message": "payment declined"}}


def rolled_back(run: Run) -> Run:
    """The run once it failed and its rollback ended (fails the test otherwise)."""
    run = wait_for_run(run)
    wait_until(lambda: Run.objects.filter(pk=run.pk, compensation__in=("done", "failed")).exists())
    run.refresh_from_db()
    return run


def reserved(run: Run) -> set[str]:
    return {key.split(":", 1)[1] for key in Reservation.objects.filter(run_id=run.pk).values_list("key", flat=True)}


def event_types(run: Run) -> list[str]:
    return list(run.events.order_by("seq").values_list("type", flat=True))


@pytest.mark.worker
def test_a_failed_run_compensates_its_steps_last_completed_first(worker, user, api):
    spec = {"chain": [reserve("a"), {"skill": "echo", "id": "plain"}, reserve("b"), FAIL]}
    run = start_run(owner=user, spec=spec, input={"trip": 1})

    run = rolled_back(run)

    assert (run.status, run.compensation) == ("failed", "done")
    assert reserved(run) == set()
    steps = {s.key: s for s in run.steps.all()}
    assert {k: s.status for k, s in steps.items()} == {
        "a": "compensated",
        "plain": "succeeded",  # echo declares no compensation: untouched
        "b": "compensated",
        "boom": "failed",
        "compensate/b": "succeeded",
        "compensate/a": "succeeded",
    }
    undo_b, undo_a = steps["compensate/b"], steps["compensate/a"]
    assert (undo_b.compensates_id, undo_a.compensates_id) == (steps["b"].pk, steps["a"].pk)
    assert (undo_b.skill, undo_b.path, undo_a.path) == ("release", "compensation.1", "compensation.2")
    assert undo_b.finished_at is not None
    assert undo_a.started_at is not None
    assert undo_b.finished_at <= undo_a.started_at  # b completed last: undone first
    assert undo_a.output == {"released": f"{run.pk}:a"}
    types = event_types(run)
    assert types.index("run.failed") < types.index("run.compensating") < types.index("run.compensated")
    compensated = list(run.events.filter(type="step.compensated").order_by("seq").values_list("step__key", flat=True))
    assert compensated == ["b", "a"]

    detail = api.get(f"/api/runs/{run.pk}/").data
    assert (detail["status"], detail["compensation"]) == ("failed", "done")
    shown = {s["key"]: (s["status"], s["compensates"]) for s in detail["steps"]}
    assert shown["a"] == ("compensated", None)
    assert shown["compensate/a"] == ("succeeded", steps["a"].pk)


@pytest.mark.worker
def test_a_failing_compensation_is_recorded_and_the_others_still_run(worker, user, api):
    spec = {"chain": [reserve("a"), reserve("b", fail_release=True), FAIL]}
    run = rolled_back(start_run(owner=user, spec=spec, input=None))

    assert (run.status, run.compensation) == ("failed", "failed")
    steps = {s.key: s for s in run.steps.all()}
    assert (steps["b"].status, steps["compensate/b"].status) == ("succeeded", "failed")
    assert "failing on purpose" in steps["compensate/b"].error
    assert (steps["a"].status, steps["compensate/a"].status) == ("compensated", "succeeded")
    assert reserved(run) == {"b"}  # b's reservation is still held, and the run says so
    failed = run.events.get(type="run.compensation_failed")
    assert failed.data["failed"] == {"compensate/b": steps["compensate/b"].error}
    assert run.events.get(type="step.compensation_failed").step_id == steps["b"].pk
    assert "run.compensated" not in event_types(run)
    assert api.get(f"/api/runs/{run.pk}/").data["compensation"] == "failed"
    page = Client()
    page.force_login(user)
    assert "Rollback" in page.get(f"/runs/{run.pk}/").content.decode()


@pytest.mark.worker
def test_a_successful_run_compensates_nothing(worker, user):
    run = wait_for_run(start_run(owner=user, spec={"chain": [reserve("a"), {"skill": "echo"}]}, input=None))

    assert (run.status, run.compensation) == ("succeeded", "")
    assert reserved(run) == {"a"}
    assert not Step.objects.filter(run=run, compensates__isnull=False).exists()


@pytest.mark.worker
def test_a_failed_run_without_compensable_steps_has_no_rollback(worker, user):
    run = wait_for_run(start_run(owner=user, spec={"chain": [{"skill": "echo"}, FAIL]}, input=None))

    assert (run.status, run.compensation) == ("failed", "")
    assert "run.compensating" not in event_types(run)


@pytest.mark.worker
def test_a_cancelled_run_is_not_compensated(worker, user, api):
    run = start_run(owner=user, spec={"chain": [reserve("a"), {"skill": "sleep", "args": {"seconds": 10}}]}, input=None)
    wait_until(lambda: Reservation.objects.filter(run_id=run.pk).exists())

    assert api.post(f"/api/runs/{run.pk}/cancel/").status_code == 202
    run = wait_for_run(run)

    assert (run.status, run.compensation) == ("cancelled", "")
    assert reserved(run) == {"a"}


@pytest.mark.django_db
def test_a_run_being_rolled_back_is_not_replayed(user, api):
    run = start_run(owner=user, spec={"chain": [reserve("a"), FAIL]}, input=None)  # never published: no commit
    Run.objects.filter(pk=run.pk).update(status="failed", compensation="running")

    response = api.post(f"/api/runs/{run.pk}/retry/")

    assert response.status_code == 409
    assert "rolled back" in str(response.data)


def book_flight() -> Skill:
    """A skill whose declared compensating skill, cancel_flight, is registered nowhere."""
    return Skill(
        name="book_flight",
        func=lambda ctx, input: input,
        description="",
        soft_time_limit=1,
        time_limit=2,
        max_soft_time_limit=1,
        max_time_limit=2,
        retries=0,
        backoff=1,
        backoff_max=1,
        queue="default",
        optional=False,
        compensate="cancel_flight",
    )


def test_a_missing_compensating_skill_is_named():
    fresh = Registry()
    fresh.register(book_flight())

    with pytest.raises(ImproperlyConfigured, match='compensating skill "cancel_flight" is not registered'):
        fresh.check_compensations()


def test_the_builtin_compensations_are_registered():
    from skills.apps import check_compensations

    assert check_compensations() == []
    assert registry.compensation_of("reserve").name == "release"  # type: ignore[union-attr]
    assert registry.compensation_of("echo") is None


@pytest.mark.django_db
def test_the_skill_list_names_each_compensation(api):
    skills = {s["name"]: s for s in api.get("/api/skills/").data}

    assert (skills["reserve"]["compensate"], skills["echo"]["compensate"]) == ("release", None)


@pytest.mark.worker
def test_a_replayed_run_that_fails_again_is_rolled_back_again(worker, user, api):
    run = rolled_back(start_run(owner=user, spec={"chain": [reserve("a"), FAIL]}, input=None))

    assert api.post(f"/api/runs/{run.pk}/retry/").status_code == 202
    run = rolled_back(run)

    assert (run.status, run.replays, run.compensation) == ("failed", 1, "done")
    steps = {s.key: s for s in run.steps.all()}
    assert steps["a"].status == "compensated"  # run again by the replay, then undone again
    assert (steps["compensate/a"].status, steps["compensate/a@replay1"].status) == ("succeeded", "succeeded")
    assert steps["compensate/a@replay1"].path == "compensation@replay1.1"
    assert reserved(run) == set()
    assert event_types(run).count("run.compensated") == 2


@pytest.mark.django_db
def test_a_missing_compensating_skill_fails_its_compensation_visibly(user, monkeypatch):
    orphan = book_flight()
    monkeypatch.setitem(registry._skills, "book_flight", orphan)
    run = start_run(owner=user, spec={"chain": [{"skill": "book_flight", "id": "fly"}, FAIL]}, input=None)
    run.steps.filter(key="fly").update(status="succeeded", output={"booking": 1}, finished_at=timezone.now())

    assert transitions.fail_run(run.pk, "step boom failed: payment declined")

    run.refresh_from_db()
    undo = run.steps.get(key="compensate/fly")
    assert (run.status, run.compensation) == ("failed", "failed")
    assert (undo.skill, undo.status) == ("cancel_flight", "failed")
    assert undo.error == 'skill book_flight: its compensating skill "cancel_flight" is not registered'
    assert run.steps.get(key="fly").status == "succeeded"
    assert run.events.get(type="run.compensation_failed").data["failed"] == {"compensate/fly": undo.error}
