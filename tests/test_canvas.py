"""The canvas builder, tested on the signature structure it returns.

No worker and no database: ``build`` is a pure function of the spec and the
step options (pytest-django blocks database access in these tests).
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from celery import signature

from orchestration.canvas import (
    COLLECT_TASK,
    FINISH_TASK,
    PASS_ON_TASK,
    STEP_TASK,
    SWITCH_TASK,
    StepOptions,
    build,
    build_node,
    final_steps,
    replacement,
)
from orchestration.spec import ROOT, plan

ECHO = {"skill": "echo"}


def options_for(spec: dict[str, Any]) -> dict[str, StepOptions]:
    """Step options by path, numbered 1, 2, ... in spec order (as services does with row ids)."""
    return {p.path: StepOptions.for_step(p, n, f"task-{n}") for n, p in enumerate(plan(spec), start=1)}


def node(spec: dict[str, Any]) -> Any:
    return build_node(spec, ROOT, options_for(spec))


def shape(sig: Any) -> Any:
    """A signature as nested tuples: a step is its step id, other tasks their name."""
    if sig.task == STEP_TASK:
        return sig.kwargs["step_id"]
    if sig.task in ("celery.chain", "celery.group"):
        return (sig.task.removeprefix("celery."), [shape(t) for t in sig.tasks])
    if sig.task == "celery.chord":
        return ("chord", [shape(t) for t in sig.tasks], shape(sig.body))
    if sig.task == SWITCH_TASK:
        cases = {value: shape(signature(route["canvas"])) for value, route in sig.kwargs["cases"].items()}
        default = sig.kwargs["default"]
        return ("switch", cases, shape(signature(default["canvas"])) if default else None)
    return sig.task


def steps_in(sig: Any) -> list[Any]:
    """Every step signature in the canvas, depth first."""
    if sig.task == STEP_TASK:
        return [sig]
    if sig.task in ("celery.chain", "celery.group", "celery.chord"):
        found = [s for t in sig.tasks for s in steps_in(t)]
        return found + steps_in(sig.body) if sig.task == "celery.chord" else found
    if sig.task == SWITCH_TASK:
        routes = [*sig.kwargs["cases"].values(), *([sig.kwargs["default"]] if sig.kwargs["default"] else [])]
        return [s for route in routes for s in steps_in(signature(route["canvas"]))]
    return []


def bare_nested_groups(sig: Any) -> list[Any]:
    """Groups that are direct members of a group or a chord header: Celery flattens those."""
    if sig.task not in ("celery.chain", "celery.group", "celery.chord"):
        return []
    found = []
    if sig.task != "celery.chain":
        found = [t for t in sig.tasks if t.task == "celery.group"]
    found += [g for t in sig.tasks for g in bare_nested_groups(t)]
    return found + bare_nested_groups(sig.body) if sig.task == "celery.chord" else found


def test_a_step_becomes_a_run_step_signature_with_its_own_limits_and_retry_policy():
    sig = node({"skill": "flaky", "soft_time_limit": 2, "time_limit": 3, "ttl": 30, "retries": 2})

    assert sig.task == STEP_TASK
    assert sig.args == ()
    assert sig.kwargs == {"step_id": 1, "retry": {"max": 2, "backoff": 0.2, "backoff_max": 2}}
    assert sig.options == {
        "task_id": "task-1",
        "queue": "default",
        "soft_time_limit": 2.0,
        "time_limit": 3.0,
        "argsrepr": "(the step's input)",
        "kwargsrepr": "{'step_id': 1}",
        "expires": 30.0,
    }


def test_a_steps_message_names_its_step_but_does_not_repeat_its_input():
    """Logs, task events and Flower show the arguments' repr: no user content there, and no repr to build."""
    sig = node({"skill": "echo", "args": {"value": "jane@example.com"}})

    assert sig.options["argsrepr"] == "(the step's input)"
    assert sig.options["kwargsrepr"] == "{'step_id': 1}"


def test_a_step_without_ttl_has_no_expiry():
    sig = node({"skill": "echo"})

    assert "expires" not in sig.options
    assert sig.options["soft_time_limit"] == 5.0
    assert sig.options["time_limit"] == 10.0


def test_a_step_is_not_immutable_so_it_receives_the_upstream_output():
    assert not node(ECHO).immutable


def test_a_chain_maps_to_a_celery_chain_in_order():
    assert shape(node({"chain": [ECHO, ECHO, ECHO]})) == ("chain", [1, 2, 3])


def test_a_group_maps_to_a_celery_group():
    assert shape(node({"group": [ECHO, ECHO, ECHO]})) == ("group", [1, 2, 3])


def test_a_chord_maps_to_a_celery_chord_with_its_header_and_body():
    sig = node({"chord": {"header": [ECHO, ECHO], "body": ECHO}})

    assert shape(sig) == ("chord", [1, 2], 3)


def test_a_chord_inside_a_group_inside_a_chain_keeps_its_nesting():
    spec = {"chain": [ECHO, {"group": [ECHO, {"chord": {"header": [ECHO, ECHO], "body": ECHO}}]}]}

    assert shape(node(spec)) == ("chain", [1, ("group", [2, ("chord", [3, 4], 5)])])


def test_a_chord_header_may_hold_chains_and_chords():
    inner = {"chord": {"header": [ECHO, ECHO], "body": ECHO}}
    spec = {"chord": {"header": [{"chain": [ECHO, ECHO]}, inner, ECHO], "body": ECHO}}

    assert shape(node(spec)) == ("chord", [("chain", [1, 2]), ("chord", [3, 4], 5), 6], 7)


@pytest.mark.parametrize(
    "spec",
    [
        {"group": [ECHO, {"group": [ECHO, ECHO]}]},
        {"chord": {"header": [ECHO, {"group": [ECHO, ECHO]}], "body": ECHO}},
        {"chain": [ECHO, {"group": [ECHO, {"group": [ECHO, ECHO]}]}]},
    ],
)
def test_a_group_inside_a_group_or_chord_header_is_not_left_for_celery_to_flatten(spec):
    assert bare_nested_groups(node(spec)) == []


def test_nesting_goes_to_any_depth():
    spec: dict[str, Any] = ECHO
    for kind in ("chain", "group", "chain", "group", "chain", "group"):
        spec = {kind: [ECHO, spec]}

    expected: Any = 7
    for n, kind in enumerate(("chain", "group", "chain", "group", "chain", "group")):
        expected = (kind, [6 - n, expected])
    assert shape(node(spec)) == expected


def test_a_group_followed_by_a_step_in_a_chain_becomes_a_chord_as_celery_does():
    # Celery upgrades "group | task" to a chord: the step still receives the
    # list of the group's outputs.
    spec = {"chain": [{"group": [ECHO, ECHO]}, ECHO]}

    assert shape(node(spec)) == ("chord", [1, 2], 3)


def test_a_one_member_group_becomes_a_chord_whose_body_collects_the_output_into_a_list():
    sig = node({"group": [ECHO]})

    assert shape(sig) == ("chord", [1], COLLECT_TASK)
    assert sig.body.options["queue"] == "default"


def test_a_one_member_group_nested_in_a_chain_still_collects():
    spec = {"chain": [ECHO, {"group": [{"chain": [ECHO, ECHO]}]}]}

    assert shape(node(spec)) == ("chain", [1, ("chord", [("chain", [2, 3])], COLLECT_TASK)])


def test_every_step_gets_the_options_of_its_own_path():
    spec = {
        "chain": [
            {"skill": "sleep", "soft_time_limit": 1, "time_limit": 2},
            {"chord": {"header": [{"skill": "echo", "ttl": 5}, {"skill": "flaky"}], "body": {"skill": "echo"}}},
        ]
    }

    limits = [
        (s.kwargs["step_id"], s.options["task_id"], s.options["time_limit"], s.options.get("expires"))
        for s in steps_in(node(spec))
    ]

    assert limits == [
        (1, "task-1", 2.0, None),
        (2, "task-2", 10.0, 5.0),
        (3, "task-3", 10.0, None),
        (4, "task-4", 10.0, None),
    ]


def test_the_last_step_of_a_chain_finishes_the_run():
    sig: Any = build({"chain": [ECHO, ECHO]}, options_for({"chain": [ECHO, ECHO]}), run_id=42)

    assert shape(sig) == ("chain", [1, 2])
    assert [s.kwargs.get("finishes_run", False) for s in sig.tasks] == [False, True]


def test_a_single_step_finishes_the_run_itself():
    sig: Any = build(ECHO, options_for(ECHO), run_id=1)

    assert shape(sig) == 1
    assert sig.kwargs["finishes_run"] is True


def test_build_of_a_group_hands_the_list_of_outputs_to_finish_run():
    spec = {"group": [ECHO, ECHO]}

    sig: Any = build(spec, options_for(spec), run_id=3)

    assert shape(sig) == ("chord", [1, 2], FINISH_TASK)
    assert sig.body.kwargs == {"run_id": 3}
    assert sig.body.options == {"queue": "default"}
    assert not any(s.kwargs.get("finishes_run") for s in steps_in(sig))


def test_the_body_of_a_chord_finishes_the_run():
    spec = {"chord": {"header": [ECHO, ECHO], "body": ECHO}}

    sig: Any = build(spec, options_for(spec), run_id=3)

    assert shape(sig) == ("chord", [1, 2], 3)
    assert [s.kwargs.get("finishes_run", False) for s in steps_in(sig)] == [False, False, True]


def test_a_chain_that_ends_with_a_group_is_finished_by_finish_run():
    spec = {"chain": [ECHO, {"group": [ECHO, ECHO]}]}

    sig: Any = build(spec, options_for(spec), run_id=7)

    assert shape(sig) == ("chain", [1, ("chord", [2, 3], FINISH_TASK)])
    assert not any(s.kwargs.get("finishes_run") for s in steps_in(sig))


def test_the_canvas_survives_a_json_round_trip():
    spec = {"chain": [ECHO, {"group": [ECHO]}, {"chord": {"header": [ECHO, {"group": [ECHO, ECHO]}], "body": ECHO}}]}
    sig: Any = build(spec, options_for(spec), run_id=9)

    again = signature(json.loads(json.dumps(sig)))

    assert shape(again) == shape(sig)
    assert [s.options for s in steps_in(again)] == [s.options for s in steps_in(sig)]


def test_the_builder_does_no_io(monkeypatch):
    # No database (pytest-django blocks it here), no broker, no registry
    # lookup (the skill below is not registered).
    def no_network(*args: Any) -> None:
        raise AssertionError("the canvas builder opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    spec = {"chain": [{"skill": "not-registered"}, {"group": [{"skill": "not-registered"}]}]}
    options = {
        path: StepOptions(n, f"t{n}", "q", 1, 2, None, 0, 1, 1)
        for n, path in enumerate(("spec.chain[0]", "spec.chain[1].group[0]"), start=1)
    }

    sig: Any = build(spec, options, run_id=5)

    assert shape(sig) == ("chain", [1, ("chord", [2], ("chain", [COLLECT_TASK, FINISH_TASK]))])  # ends with a group


def test_the_builder_needs_no_database():
    from django.contrib.auth.models import User

    with pytest.raises(RuntimeError, match="Database access not allowed"):
        User.objects.exists()
    assert shape(node(ECHO)) == 1


SWITCH = {
    "switch": {
        "on": "ticket.route",
        "cases": {"billing": ECHO, "faq": {"chain": [ECHO, ECHO]}},
        "default": {"group": [ECHO, ECHO]},
    }
}


def test_a_switch_is_one_task_carrying_each_cases_canvas_and_step_ids():
    sig: Any = node({"chain": [ECHO, SWITCH, ECHO]})

    assert shape(sig) == (
        "chain",
        [1, ("switch", {"billing": 2, "faq": ("chain", [3, 4])}, ("group", [5, 6])), 7],
    )
    switch = sig.tasks[1]
    assert switch.options == {"queue": "default"}
    assert (switch.kwargs["switch"], switch.kwargs["on"]) == ("spec.chain[1]", "ticket.route")
    routes = {value: (r["path"], r["steps"]) for value, r in switch.kwargs["cases"].items()}
    assert routes == {
        "billing": ("spec.chain[1].switch.cases.billing", [2]),
        "faq": ("spec.chain[1].switch.cases.faq", [3, 4]),
    }
    assert (switch.kwargs["default"]["path"], switch.kwargs["default"]["steps"]) == (
        "spec.chain[1].switch.default",
        [5, 6],
    )


def test_a_switch_in_a_chord_header_is_a_member_like_any_node():
    spec = {"chord": {"header": [SWITCH, ECHO], "body": ECHO}}

    assert shape(node(spec)) == (
        "chord",
        [("switch", {"billing": 1, "faq": ("chain", [2, 3])}, ("group", [4, 5])), 6],
        7,
    )


def test_when_the_spec_ends_with_a_switch_the_last_step_of_each_case_finishes_the_run():
    spec = {"chain": [ECHO, {"switch": {"on": "route", "cases": {"a": ECHO, "b": {"chain": [ECHO, ECHO]}}}}]}

    sig: Any = build(spec, options_for(spec), run_id=4)

    assert shape(sig) == ("chain", [1, ("switch", {"a": 2, "b": ("chain", [3, 4])}, None)])
    assert [s.kwargs.get("finishes_run", False) for s in steps_in(sig)] == [False, True, False, True]
    assert final_steps(spec, "spec") == {"spec.chain[1].switch.cases.a", "spec.chain[1].switch.cases.b.chain[1]"}


def test_a_switch_with_a_case_ending_in_a_group_is_finished_by_finish_run():
    sig: Any = build(SWITCH, options_for(SWITCH), run_id=8)

    assert shape(sig) == (
        "chain",
        [("switch", {"billing": 1, "faq": ("chain", [2, 3])}, ("group", [4, 5])), FINISH_TASK],
    )
    assert not any(s.kwargs.get("finishes_run") for s in steps_in(sig))


def test_a_switch_survives_a_json_round_trip():
    sig: Any = build({"chain": [ECHO, SWITCH]}, options_for({"chain": [ECHO, SWITCH]}), run_id=9)

    again = signature(json.loads(json.dumps(sig)))

    assert shape(again) == shape(sig)
    assert [s.options for s in steps_in(again)] == [s.options for s in steps_in(sig)]


def test_the_chosen_case_is_given_the_switchs_input():
    case = signature(json.loads(json.dumps(node({"chain": [ECHO, ECHO]}))))

    given: Any = replacement(case, {"route": "faq"}, joined=False)

    assert shape(given) == ("chain", [1, 2])
    assert [tuple(t.args) for t in given.tasks] == [({"route": "faq"},), ()]


def test_a_case_in_a_group_ends_with_pass_on_to_carry_the_switchs_task_id():
    case = signature(json.loads(json.dumps(node({"group": [ECHO, ECHO]}))))

    given: Any = replacement(case, "in", joined=True)

    assert shape(given) == ("chord", [1, 2], PASS_ON_TASK)
    assert [t.args for t in given.tasks] == [("in",), ("in",)]
    assert "task_id" not in given.body.options
