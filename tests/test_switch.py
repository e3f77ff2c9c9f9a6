"""The switch node: a run routes its data to one case, end to end on a real worker.

Also the pure routing rules (orchestration/routing.py): how a field is found and compared.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from orchestration import broker
from orchestration.models import Run
from orchestration.routing import Choice, choose, field_value, unmatched_error, value_text
from orchestration.services import start_run, sweep

from .conftest import wait_for_run, wait_until
from .test_cancel_replay import active_task_ids, effect_rows
from .test_delivery import effect, running_attempt
from .test_saga import reserve, reserved, rolled_back


def echo(id: str, value: Any = None) -> dict[str, Any]:
    step: dict[str, Any] = {"skill": "echo", "id": id}
    if value is not None:
        step["args"] = {"value": value}
    return step


def switch(on: str, cases: dict[str, Any], default: Any = None) -> dict[str, Any]:
    node: dict[str, Any] = {"on": on, "cases": cases}
    if default is not None:
        node["default"] = default
    return {"switch": node}


ROUTES = switch(
    "route",
    {"billing": echo("billing", "to billing"), "faq": {"chain": [echo("faq1"), echo("faq2", "to faq")]}},
    default=echo("other", "to default"),
)


def run(user: Any, spec: Any, input: Any = None) -> Run:
    return wait_for_run(start_run(owner=user, spec=spec, input=input))


def statuses(run: Run) -> dict[str, str]:
    return {s.key: s.status for s in run.steps.all()}


def events(run: Run, type: str) -> list[dict[str, Any]]:
    return [e.data for e in run.events.filter(type=type).order_by("seq")]


# --- routing rules (pure) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "on", "found"),
    [
        ({"route": "faq"}, "route", (True, "faq")),
        ({"ticket": {"route": "faq"}}, "ticket.route", (True, "faq")),
        ({"items": [{"kind": "a"}, {"kind": "b"}]}, "items.1.kind", (True, "b")),
        ([{"route": "x"}], "0.route", (True, "x")),
        ({"route": None}, "route", (True, None)),
        ({"route": "faq"}, "intent", (False, None)),
        ({"items": [1]}, "items.1", (False, None)),
        ({"items": [1]}, "items.x", (False, None)),
        ("text", "route", (False, None)),
        (None, "route", (False, None)),
    ],
)
def test_a_field_is_found_by_its_dotted_path(data, on, found):
    assert field_value(data, on) == found


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("billing", "billing"),
        (1, "1"),
        (True, "true"),
        (None, "null"),
        (1.5, "1.5"),
        ({"b": 1, "a": 2}, '{"a":2,"b":1}'),
    ],
)
def test_values_compare_as_their_json_text(value, text):
    assert value_text(value) == text


def test_a_number_or_boolean_matches_the_case_of_its_text():
    assert choose({"n": 1}, "n", ["1", "2"]) == Choice(value="1", case="1")
    assert choose({"ok": True}, "ok", ["true"]) == Choice(value="true", case="true")
    assert choose({"n": "1"}, "n", ["1"]) == Choice(value="1", case="1")
    assert choose({"n": 3}, "n", ["1"]) == Choice(value="3", case=None)
    assert choose({}, "n", ["1"]) == Choice(value=None, case=None)


def test_the_unmatched_error_names_the_switch_the_field_and_the_value():
    error = unmatched_error("spec.chain[1]", "route", Choice("refund", None), ["billing", "faq"])

    assert error == 'switch spec.chain[1]: no case for route="refund" and no default (cases: "billing", "faq")'
    missing = unmatched_error("spec", "route", Choice(None, None), ["billing"])
    assert missing == 'switch spec: its input has no field "route", and the switch has no default (cases: "billing")'


# --- runs on a real worker ------------------------------------------------------------


@pytest.mark.worker
def test_it_routes_to_the_case_named_by_the_field_and_skips_the_others(worker, user):
    finished = run(user, {"chain": [echo("start"), ROUTES]}, input={"route": "billing"})

    assert (finished.status, finished.output) == ("succeeded", "to billing")
    assert statuses(finished) == {
        "start": "succeeded",
        "billing": "succeeded",
        "faq1": "skipped",
        "faq2": "skipped",
        "other": "skipped",
    }
    skipped = finished.steps.get(key="faq1")
    assert skipped.error == "not routed: route=billing"
    assert skipped.attempts == 0
    assert events(finished, "switch.routed") == [
        {
            "switch": "spec.chain[1]",
            "field": "route",
            "value": "billing",
            "case": "billing",
            "path": "spec.chain[1].switch.cases.billing",
        }
    ]
    types = list(finished.events.order_by("seq").values_list("type", flat=True))
    assert types.count("step.skipped") == 3
    assert types.index("switch.routed") < types.index("step.skipped") < types.index("run.succeeded")


@pytest.mark.worker
def test_a_case_that_is_a_chain_runs_in_order_and_ends_the_run(worker, user):
    finished = run(user, ROUTES, input={"route": "faq"})

    assert (finished.status, finished.output) == ("succeeded", "to faq")
    steps = {s.key: s for s in finished.steps.all()}
    assert steps["faq1"].output == {"route": "faq"}  # the case gets the switch's input
    assert {k: steps[k].status for k in ("billing", "other")} == {"billing": "skipped", "other": "skipped"}


@pytest.mark.worker
def test_an_unmatched_value_takes_the_default(worker, user):
    finished = run(user, ROUTES, input={"route": "refund"})

    assert (finished.status, finished.output) == ("succeeded", "to default")
    assert finished.steps.get(key="billing").error == "not routed: route=refund"
    assert events(finished, "switch.routed")[0]["case"] is None
    assert events(finished, "switch.routed")[0]["path"] == "spec.switch.default"


@pytest.mark.worker
def test_a_number_routes_to_the_case_of_its_text(worker, user):
    spec = switch("order.items", {"1": echo("one", "single"), "2": echo("two", "pair")})

    finished = run(user, spec, input={"order": {"items": 2}})

    assert (finished.status, finished.output) == ("succeeded", "pair")


@pytest.mark.worker
def test_without_a_default_an_unmatched_value_fails_the_run_with_a_clear_error(worker, user):
    spec = {"chain": [echo("start"), switch("route", {"billing": echo("billing"), "faq": echo("faq")}), echo("after")]}

    finished = run(user, spec, input={"route": "refund"})

    assert finished.status == "failed"
    assert finished.error == (
        'switch spec.chain[1]: no case for route="refund" and no default (cases: "billing", "faq")'
    )
    assert statuses(finished) == {
        "start": "succeeded",
        "billing": "cancelled",
        "faq": "cancelled",
        "after": "cancelled",
    }
    assert events(finished, "switch.unmatched") == [{"switch": "spec.chain[1]", "field": "route", "value": "refund"}]


@pytest.mark.worker
def test_a_missing_field_without_a_default_fails_the_run(worker, user):
    finished = run(user, switch("route", {"billing": echo("billing")}), input={"intent": "billing"})

    assert finished.status == "failed"
    assert 'its input has no field "route"' in finished.error


@pytest.mark.worker
def test_a_chain_goes_on_after_the_switch_with_the_cases_output(worker, user):
    spec = {"chain": [echo("start"), ROUTES, {"skill": "echo", "id": "after"}]}

    finished = run(user, spec, input={"route": "faq"})

    assert (finished.status, finished.output) == ("succeeded", "to faq")
    assert finished.steps.get(key="after").output == "to faq"
    assert statuses(finished)["after"] == "succeeded"


@pytest.mark.worker
def test_a_nested_switch_routes_twice(worker, user):
    inner = switch("ticket.urgency", {"high": echo("urgent", "page someone"), "low": echo("calm", "later")})
    spec = switch("ticket.route", {"billing": inner, "faq": echo("faq", "faq")})

    finished = run(user, spec, input={"ticket": {"route": "billing", "urgency": "high"}})

    assert (finished.status, finished.output) == ("succeeded", "page someone")
    assert statuses(finished) == {"urgent": "succeeded", "calm": "skipped", "faq": "skipped"}
    routed = events(finished, "switch.routed")
    assert [(e["switch"], e["case"]) for e in routed] == [("spec", "billing"), ("spec.switch.cases.billing", "high")]
    assert finished.steps.get(key="calm").error == "not routed: ticket.urgency=high"


@pytest.mark.worker
def test_a_switch_in_a_chord_header_joins_the_chord_with_its_cases_output(worker, user):
    routed = switch("route", {"billing": {"chain": [echo("b1"), echo("b2", "billed")]}, "faq": echo("faq", "faq")})
    spec = {"chord": {"header": [routed, echo("side", "side")], "body": {"skill": "echo", "id": "body"}}}

    finished = run(user, spec, input={"route": "billing"})

    assert (finished.status, finished.output) == ("succeeded", ["billed", "side"])
    assert statuses(finished) == {
        "b1": "succeeded",
        "b2": "succeeded",
        "faq": "skipped",
        "side": "succeeded",
        "body": "succeeded",
    }


@pytest.mark.worker
def test_a_switch_whose_case_is_a_group_ends_the_run_with_the_groups_list(worker, user):
    spec = switch("route", {"both": {"group": [echo("x", 1), echo("y", 2)]}, "one": echo("one", 0)})

    finished = run(user, spec, input={"route": "both"})

    assert (finished.status, finished.output) == ("succeeded", [1, 2])
    assert statuses(finished)["one"] == "skipped"


@pytest.mark.worker
def test_a_waiting_step_in_a_routed_case_resumes_to_success(worker, user, api):
    ask = {"skill": "ask_human", "id": "ask", "args": {"prompt": "Refund?"}}
    spec = {
        "chain": [
            effect("a"),
            switch("route", {"complaint": {"chain": [ask, echo("after-ask")]}, "faq": echo("faq", "faq")}),
            {"skill": "echo", "id": "last"},
        ]
    }
    started = start_run(owner=user, spec=spec, input={"route": "complaint"})
    wait_until(lambda: Run.objects.filter(pk=started.pk, status="waiting").exists())

    response = api.post(f"/api/runs/{started.pk}/resume/", {"payload": {"approved": True}}, format="json")

    assert response.status_code == 202, response.data
    finished = wait_for_run(started)
    assert (finished.status, finished.output) == ("succeeded", {"approved": True})
    assert statuses(finished) == {
        "a": "succeeded",
        "ask": "succeeded",
        "after-ask": "succeeded",
        "faq": "skipped",
        "last": "succeeded",
    }
    assert effect_rows(finished, "a") == 1  # passed on when the canvas was published again
    assert len(events(finished, "switch.routed")) == 1  # routed again on resume, recorded once


@pytest.mark.worker
def test_a_waiting_last_step_of_a_case_ends_the_run_when_resumed(worker, user, api):
    ask = {"skill": "ask_human", "id": "ask", "args": {"prompt": "Refund?"}}
    started = start_run(
        owner=user, spec=switch("route", {"complaint": ask, "faq": echo("faq")}), input={"route": "complaint"}
    )
    wait_until(lambda: Run.objects.filter(pk=started.pk, status="waiting").exists())

    response = api.post(f"/api/runs/{started.pk}/resume/", {"payload": "approved"}, format="json")

    assert response.status_code == 202, response.data
    assert response.data["status"] == "succeeded"
    started.refresh_from_db()
    assert started.output == "approved"


@pytest.mark.worker
def test_a_failed_run_that_routed_replays_into_the_same_case(worker, user, api):
    failing_until = time.time() + 2
    flaky = {"skill": "flaky", "id": "flaky", "args": {"until": failing_until}}
    spec = {"chain": [effect("a"), switch("route", {"billing": {"chain": [effect("b"), flaky]}, "faq": effect("faq")})]}
    failed = run(user, spec, input={"route": "billing"})
    assert failed.status == "failed"
    assert statuses(failed) == {"a": "succeeded", "b": "succeeded", "flaky": "failed", "faq": "skipped"}
    time.sleep(max(0, failing_until - time.time()))

    response = api.post(f"/api/runs/{failed.pk}/retry/")

    assert response.status_code == 202, response.data
    finished = wait_for_run(failed)
    assert (finished.status, finished.output) == ("succeeded", {"route": "billing"})
    assert statuses(finished) == {"a": "succeeded", "b": "succeeded", "flaky": "succeeded", "faq": "skipped"}
    assert (effect_rows(finished, "a"), effect_rows(finished, "b"), effect_rows(finished, "faq")) == (1, 1, 0)
    assert len(events(finished, "switch.routed")) == 1


@pytest.mark.worker
def test_cancel_while_in_a_case_stops_the_run(worker, user, api):
    spec = {"chain": [switch("route", {"slow": effect("slow", seconds=60), "fast": effect("fast")}), effect("after")]}
    started = start_run(owner=user, spec=spec, input={"route": "slow"})
    slow = running_attempt(started, "slow", 1)
    began = time.monotonic()

    response = api.post(f"/api/runs/{started.pk}/cancel/")

    assert response.status_code == 202, response.data
    finished = wait_for_run(started)
    assert finished.status == "cancelled"
    assert statuses(finished) == {"slow": "cancelled", "fast": "skipped", "after": "cancelled"}
    # The case's step kept its own task id through the replace: the revoke terminated it.
    wait_until(lambda: str(slow.task_id) not in active_task_ids(), timeout=5)
    assert time.monotonic() - began < 5
    assert effect_rows(finished, "slow") == 0


@pytest.mark.worker
def test_a_failure_in_a_routed_case_compensates_only_what_ran(worker, user):
    fail = {"skill": "fail", "id": "boom", "args": {"message": "payment declined"}}
    spec = switch("route", {"book": {"chain": [reserve("hotel"), fail]}, "skip": reserve("car")})

    finished = rolled_back(start_run(owner=user, spec=spec, input={"route": "book"}))

    assert (finished.status, finished.compensation) == ("failed", "done")
    assert reserved(finished) == set()
    assert statuses(finished) == {
        "hotel": "compensated",
        "boom": "failed",
        "car": "skipped",
        "compensate/hotel": "succeeded",
    }


@pytest.mark.worker
def test_a_switch_in_a_group_whose_case_is_a_group_keeps_each_list(worker, user):
    routed = switch("route", {"both": {"group": [echo("x", 1), echo("y", 2)]}, "one": echo("one", 0)})
    spec = {"chain": [{"group": [routed, echo("side", "side")]}, {"skill": "echo", "id": "after"}]}

    finished = run(user, spec, input={"route": "both"})

    assert (finished.status, finished.output) == ("succeeded", [[1, 2], "side"])
    assert statuses(finished) == {
        "x": "succeeded",
        "y": "succeeded",
        "one": "skipped",
        "side": "succeeded",
        "after": "succeeded",
    }


@pytest.mark.worker
def test_the_sweeper_publishes_a_lost_run_with_a_switch_that_then_routes(worker, user, settings, monkeypatch):
    settings.RUN_STALL_AFTER = 1
    monkeypatch.setattr(broker, "publish_run", lambda *args: None)  # the publish is lost
    spec = {"chain": [effect("a"), switch("route", {"b": effect("b"), "c": effect("c")}), effect("after")]}
    started = start_run(owner=user, spec=spec, input={"route": "c"})
    monkeypatch.undo()
    time.sleep(1.1)

    assert sweep().resumed == [started.pk]

    finished = wait_for_run(started)
    assert (finished.status, finished.output) == ("succeeded", {"route": "c"})
    assert statuses(finished) == {"a": "succeeded", "b": "skipped", "c": "succeeded", "after": "succeeded"}
    assert (effect_rows(finished, "b"), effect_rows(finished, "c")) == (0, 1)
