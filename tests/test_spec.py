"""The spec validator: ``plan(spec)`` returns the steps, or says where the spec is wrong."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings

from orchestration.spec import MAX_SECONDS, SpecError, plan
from skills.registry import registry

ECHO = {"skill": "echo"}


def error_of(spec: Any) -> str:
    with pytest.raises(SpecError) as info:
        plan(spec)
    assert str(info.value) == f"{info.value.path}: {info.value.message}"
    return str(info.value)


def nested(levels: int, leaf: dict[str, Any]) -> dict[str, Any]:
    """``leaf`` inside ``levels`` one-member chains."""
    spec = leaf
    for _ in range(levels):
        spec = {"chain": [spec]}
    return spec


def test_it_fills_in_the_skill_defaults_from_the_registry():
    [step] = plan({"skill": "flaky"})
    flaky = registry.get("flaky")

    assert flaky is not None
    assert step.skill == "flaky"
    assert step.args == {}
    assert step.soft_time_limit == flaky.soft_time_limit
    assert step.time_limit == flaky.time_limit
    assert step.ttl is None
    assert step.retries == flaky.retries == 3
    assert step.backoff == flaky.backoff
    assert step.backoff_max == flaky.backoff_max
    assert step.optional is flaky.optional is False
    assert step.queue == flaky.queue


def test_the_spec_overrides_the_defaults():
    [step] = plan(
        {
            "skill": "sleep",
            "args": {"seconds": 1},
            "soft_time_limit": 1,
            "time_limit": 2.5,
            "ttl": 7,
            "retries": 2,
            "optional": True,
        }
    )

    assert step.args == {"seconds": 1}
    assert (step.soft_time_limit, step.time_limit, step.ttl) == (1.0, 2.5, 7.0)
    assert isinstance(step.soft_time_limit, float)
    assert step.retries == 2
    assert step.optional is True


def test_it_lists_steps_in_spec_order_with_their_paths():
    spec = {
        "chain": [
            ECHO,
            {"group": [ECHO, {"chain": [ECHO, ECHO]}]},
            {"chord": {"header": [ECHO, ECHO], "body": ECHO}},
        ]
    }

    assert [s.path for s in plan(spec)] == [
        "spec.chain[0]",
        "spec.chain[1].group[0]",
        "spec.chain[1].group[1].chain[0]",
        "spec.chain[1].group[1].chain[1]",
        "spec.chain[2].chord.header[0]",
        "spec.chain[2].chord.header[1]",
        "spec.chain[2].chord.body",
    ]


def test_a_single_step_spec_is_at_the_root():
    [step] = plan(ECHO)

    assert (step.path, step.key) == ("spec", "spec")


def test_a_step_key_is_its_id_or_else_its_path():
    steps = plan({"chain": [{"skill": "echo", "id": "fetch-1.a:b_c"}, ECHO]})

    assert [s.key for s in steps] == ["fetch-1.a:b_c", "spec.chain[1]"]


def test_a_spec_of_the_maximum_size_and_depth_is_accepted():
    assert len(plan({"group": [ECHO] * settings.SPEC_MAX_STEPS})) == settings.SPEC_MAX_STEPS
    assert len(plan(nested(settings.SPEC_MAX_DEPTH - 1, ECHO))) == 1


def test_it_rejects_an_unknown_skill_naming_its_place():
    spec = {"chain": [ECHO, {"chord": {"header": [{"skill": "no-such-skill"}], "body": ECHO}}]}

    assert error_of(spec) == 'spec.chain[1].chord.header[0].skill: unknown skill "no-such-skill"'


def test_it_suggests_a_close_skill_name():
    assert error_of({"skill": "ecko"}) == 'spec.skill: unknown skill "ecko" (did you mean "echo"?)'


def test_it_rejects_more_than_the_maximum_number_of_steps():
    limit = settings.SPEC_MAX_STEPS

    assert error_of({"group": [ECHO] * (limit + 1)}) == f"spec.group[{limit}]: more than {limit} steps"


def test_it_rejects_nesting_deeper_than_the_maximum():
    depth = settings.SPEC_MAX_DEPTH
    path = "spec" + ".chain[0]" * depth

    assert error_of(nested(depth, ECHO)) == f"{path}: nested deeper than {depth} levels"


def test_it_rejects_duplicate_step_ids():
    spec = {"group": [{"skill": "echo", "id": "a"}, ECHO, {"skill": "echo", "id": "a"}]}

    assert error_of(spec) == 'spec.group[2].id: duplicate step id "a"'


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"chain": []}, "spec.chain: must not be empty"),
        ({"group": []}, "spec.group: must not be empty"),
        ({"chord": {"header": [], "body": ECHO}}, "spec.chord.header: must not be empty"),
        ({"chain": [ECHO, {"group": []}]}, "spec.chain[1].group: must not be empty"),
    ],
)
def test_it_rejects_empty_composites(spec, error):
    assert error_of(spec) == error


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (None, "spec: expected an object, got null"),
        ([ECHO], "spec: expected an object, got a list"),
        ({"chain": [ECHO, "echo"]}, "spec.chain[1]: expected an object, got a string"),
        ({}, 'spec: expected a step ("skill") or exactly one of "chain", "group", "chord", "switch"'),
        ({"pipeline": [ECHO]}, 'spec: expected a step ("skill") or exactly one of "chain", "group", "chord", "switch"'),
        (
            {"chain": [ECHO], "group": [ECHO]},
            'spec: expected a step ("skill") or exactly one of "chain", "group", "chord", "switch"',
        ),
        (
            {"chain": [ECHO], "id": "x"},
            'spec: expected a step ("skill") or exactly one of "chain", "group", "chord", "switch"',
        ),
        ({"chain": ECHO}, "spec.chain: expected a list of nodes, got an object"),
        ({"group": "echo"}, "spec.group: expected a list of nodes, got a string"),
        ({"chord": [ECHO]}, 'spec.chord: expected an object with "header" and "body"'),
        ({"chord": {"header": [ECHO]}}, 'spec.chord: expected an object with "header" and "body"'),
        (
            {"chord": {"header": [ECHO], "body": ECHO, "extra": 1}},
            'spec.chord: expected an object with "header" and "body"',
        ),
        ({"chord": {"header": ECHO, "body": ECHO}}, "spec.chord.header: expected a list of nodes, got an object"),
        ({"chord": {"header": [ECHO], "body": [ECHO]}}, "spec.chord.body: expected an object, got a list"),
        ({"chord": {"header": [ECHO], "body": {"skill": "nope"}}}, 'spec.chord.body.skill: unknown skill "nope"'),
    ],
)
def test_it_rejects_malformed_nodes(spec, error):
    assert error_of(spec) == error


@pytest.mark.parametrize(
    ("step", "error"),
    [
        ({"skill": 5}, "spec.skill: expected a skill name, got a number"),
        ({"skill": None}, "spec.skill: expected a skill name, got null"),
        ({"skill": "echo", "timeout": 3}, "spec.timeout: unknown step field"),
        ({"skill": "echo", "args": [1]}, "spec.args: must be a JSON object, got a list"),
        ({"skill": "echo", "args": "x"}, "spec.args: must be a JSON object, got a string"),
        ({"skill": "echo", "args": None}, "spec.args: must be a JSON object, got null"),
    ],
)
def test_it_rejects_malformed_steps(step, error):
    assert error_of(step) == error


@pytest.mark.parametrize(
    ("limits", "error"),
    [
        ({"soft_time_limit": 10, "time_limit": 10}, "spec.soft_time_limit: must be less than time_limit (10 >= 10)"),
        ({"soft_time_limit": 3, "time_limit": 2.5}, "spec.soft_time_limit: must be less than time_limit (3 >= 2.5)"),
        # A soft limit above the skill's default hard limit (10) needs a hard one too.
        ({"soft_time_limit": 20}, "spec.soft_time_limit: must be less than time_limit (20 >= 10)"),
        ({"time_limit": 71}, "spec.time_limit: 71s exceeds the maximum of skill echo (70s)"),
        (
            {"soft_time_limit": 61, "time_limit": 70},
            "spec.soft_time_limit: 61s exceeds the maximum of skill echo (60s)",
        ),
    ],
)
def test_it_rejects_time_limits_out_of_order_or_above_the_skill_maximum(limits, error):
    assert error_of({"skill": "echo", **limits}) == error


def test_the_maximum_is_the_skills_own():
    assert (
        error_of({"skill": "fail", "time_limit": 11}) == "spec.time_limit: 11s exceeds the maximum of skill fail (10s)"
    )
    assert plan({"skill": "sleep", "soft_time_limit": 600, "time_limit": 660})[0].time_limit == 660


@pytest.mark.parametrize("field", ["soft_time_limit", "time_limit", "ttl"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [(0, "0"), (-1, "-1"), ("5", '"5"'), ([], "[]"), (True, "true"), (False, "false"), (MAX_SECONDS + 1, "604801")],
)
def test_it_rejects_seconds_that_are_not_a_positive_number_up_to_a_week(field, value, shown):
    expected = f"spec.{field}: must be seconds, 0 < s <= {MAX_SECONDS}, got {shown}"

    assert error_of({"skill": "echo", field: value}) == expected


def test_a_ttl_may_be_up_to_a_week():
    assert MAX_SECONDS == 7 * 24 * 3600
    assert plan({"skill": "echo", "ttl": MAX_SECONDS})[0].ttl == MAX_SECONDS


@pytest.mark.parametrize("field", ["soft_time_limit", "time_limit"])
def test_it_rejects_a_null_time_limit(field):
    expected = f"spec.{field}: must be seconds, 0 < s <= {MAX_SECONDS}, got null"

    assert error_of({"skill": "echo", field: None}) == expected


def test_a_null_ttl_means_no_ttl():
    assert plan({"skill": "echo", "ttl": None})[0].ttl is None


@pytest.mark.parametrize(
    ("value", "shown"), [(-1, "-1"), (11, "11"), (1.5, "1.5"), ("2", '"2"'), (True, "true"), (None, "null")]
)
def test_it_rejects_retries_that_are_not_an_integer_from_0_to_10(value, shown):
    expected = f"spec.retries: must be an integer from 0 to 10, got {shown}"

    assert error_of({"skill": "echo", "retries": value}) == expected


@pytest.mark.parametrize("value", [0, 10])
def test_it_accepts_retries_from_0_to_10(value):
    assert plan({"skill": "echo", "retries": value})[0].retries == value


@pytest.mark.parametrize(("value", "shown"), [("yes", '"yes"'), (1, "1"), (0, "0"), (None, "null")])
def test_it_rejects_optional_that_is_not_a_boolean(value, shown):
    assert error_of({"skill": "echo", "optional": value}) == f"spec.optional: must be true or false, got {shown}"


def test_a_long_value_is_cut_short_in_the_error():
    message = error_of({"skill": "echo", "retries": "x" * 500})

    assert message.startswith('spec.retries: must be an integer from 0 to 10, got "xxx')
    assert len(message) < 200


@pytest.mark.parametrize("value", ["", "has space", "a/b", "x" * 101, 5, None])
def test_it_rejects_malformed_step_ids(value):
    assert error_of({"skill": "echo", "id": value}) == (
        "spec.id: must be 1-100 characters of letters, digits, and _ . : -"
    )


def test_errors_name_their_place_deep_in_the_tree():
    spec = {
        "chain": [ECHO, {"group": [ECHO, {"chord": {"header": [ECHO, {"skill": "echo", "args": 1}], "body": ECHO}}]}]
    }

    assert error_of(spec) == "spec.chain[1].group[1].chord.header[1].args: must be a JSON object, got a number"


# --- switch ----------------------------------------------------------------------------


def switch(cases: Any, on: Any = "route", **more: Any) -> dict[str, Any]:
    return {"switch": {"on": on, "cases": cases, **more}}


def test_a_switch_plans_the_steps_of_every_case_then_its_default():
    spec = {"chain": [ECHO, switch({"billing": ECHO, "a b": {"chain": [ECHO, ECHO]}}, default=ECHO)]}

    assert [s.path for s in plan(spec)] == [
        "spec.chain[0]",
        "spec.chain[1].switch.cases.billing",
        'spec.chain[1].switch.cases["a b"].chain[0]',
        'spec.chain[1].switch.cases["a b"].chain[1]',
        "spec.chain[1].switch.default",
    ]


def test_a_switch_may_be_nested_and_read_a_dotted_path():
    inner = switch({"high": ECHO, "low": ECHO}, on="ticket.urgency")

    assert [s.path for s in plan(switch({"1": inner}, on="items.0.n"))] == [
        "spec.switch.cases.1.switch.cases.high",
        "spec.switch.cases.1.switch.cases.low",
    ]


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"switch": []}, 'spec.switch: expected an object with "on", "cases" and optionally "default"'),
        ({"switch": {"on": "route"}}, 'spec.switch: expected an object with "on", "cases" and optionally "default"'),
        (
            {"switch": {"cases": {"a": ECHO}}},
            'spec.switch: expected an object with "on", "cases" and optionally "default"',
        ),
        (
            switch({"a": ECHO}, otherwise=ECHO),
            'spec.switch.otherwise: unknown switch field (expected "on", "cases", "default")',
        ),
        (switch({"a": ECHO}, on=""), 'spec.switch.on: expected a field path such as "route" or "ticket.route", got ""'),
        (switch({"a": ECHO}, on=3), 'spec.switch.on: expected a field path such as "route" or "ticket.route", got 3'),
        (switch({"a": ECHO}, on="a..b"), 'spec.switch.on: a field path has no empty segment, got "a..b"'),
        (switch([ECHO]), "spec.switch.cases: expected an object of value: node, got a list"),
        (switch({}), "spec.switch.cases: must not be empty"),
        (switch({"": ECHO}), "spec.switch.cases: a case's value must not be empty"),
        (switch({"a": "echo"}), "spec.switch.cases.a: expected an object, got a string"),
        (switch({"a": ECHO}, default=[ECHO]), "spec.switch.default: expected an object, got a list"),
        (switch({"a": {"skill": "serch"}}), 'spec.switch.cases.a.skill: unknown skill "serch"'),
        (
            {"chain": [ECHO, ECHO, switch({"a": ECHO}, default={"skill": "nope"})]},
            'spec.chain[2].switch.default.skill: unknown skill "nope"',
        ),
    ],
)
def test_it_rejects_malformed_switches(spec, error):
    assert error_of(spec) == error


def test_it_rejects_a_case_value_longer_than_100_characters():
    assert error_of(switch({"x" * 101: ECHO})).startswith("spec.switch.cases: a case's value is at most 100 characters")


def test_step_ids_are_unique_across_all_cases():
    spec = switch({"a": {"skill": "echo", "id": "reply"}}, default={"skill": "echo", "id": "reply"})

    assert error_of(spec) == 'spec.switch.default.id: duplicate step id "reply"'


def test_the_step_limit_counts_the_steps_of_every_case():
    half = settings.SPEC_MAX_STEPS // 2
    spec = switch({"a": {"group": [ECHO] * half}, "b": {"group": [ECHO] * half}}, default=ECHO)

    assert error_of(spec) == f"spec.switch.default: more than {settings.SPEC_MAX_STEPS} steps"


def test_the_depth_limit_counts_a_switch_as_a_level():
    depth = settings.SPEC_MAX_DEPTH
    spec = nested(depth - 1, switch({"a": ECHO}))
    path = "spec" + ".chain[0]" * (depth - 1) + ".switch.cases.a"

    assert error_of(spec) == f"{path}: nested deeper than {depth} levels"


def test_a_step_whose_path_is_too_long_for_a_key_needs_an_id():
    value = "v" * 100
    spec = switch({value: switch({value: ECHO})})

    assert error_of(spec).endswith('a step whose path is longer than 200 characters needs an "id"')
    assert len(plan(switch({value: switch({value: {"skill": "echo", "id": "deep"}})}))) == 1
