"""Properties of the spec validator and the canvas builder, on generated specs.

Hypothesis builds spec trees (chains, groups and chords of steps with random
args, limits, retries and ids), valid ones, ones with one fault planted at a
known place, and JSON junk. A valid spec plans and builds a canvas with each
step once; a faulty one raises SpecError at the fault's path; junk does one
or the other; nothing else ever raises. No database, no broker.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import signature
from django.conf import settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orchestration.canvas import FINISH_TASK, STEP_TASK, StepOptions, build
from orchestration.spec import MAX_RETRIES, MAX_SECONDS, ROOT, SpecError, plan
from skills.registry import registry

# The same 300 examples each run (derandomize): a CI failure is the code's, not a new draw's.
EXAMPLES = hypothesis_settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
SKILLS = {skill.name: skill for skill in registry}
SPEC_WORDS = ["chain", "group", "chord", "header", "body", "skill", "args", "id", "ttl", "retries"]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=8,
)
# Not starting "spec": such an id could equal another step's key, its path ("spec.chord.body").
step_ids = st.from_regex(r"\A[A-Za-z0-9_.:-]{1,100}\Z").filter(lambda key: not key.startswith(ROOT))


def seconds_between(low: float, high: float) -> Any:
    """Whole or fractional seconds s, low < s <= high."""
    whole = st.integers(int(low) + 1, int(high)) if int(low) + 1 <= high else st.nothing()
    return whole | st.floats(low, high, exclude_min=True)


@st.composite
def limits(draw: Any, name: str) -> dict[str, float]:
    """Time limits the skill accepts: soft < hard, each within the skill's maximum, or left to its default."""
    skill = SKILLS[name]
    hard = draw(st.none() | seconds_between(skill.soft_time_limit, skill.max_time_limit))
    below = min(hard or skill.time_limit, skill.max_soft_time_limit)
    soft = draw(st.none() | seconds_between(0, below).filter(lambda s: s < (hard or skill.time_limit)))
    chosen = {"time_limit": hard, "soft_time_limit": soft}
    return {field: value for field, value in chosen.items() if value is not None}


@st.composite
def valid_steps(draw: Any) -> dict[str, Any]:
    name = draw(st.sampled_from(sorted(SKILLS)))
    step: dict[str, Any] = {"skill": name, **draw(limits(name))}
    optional_fields = {
        "args": st.dictionaries(st.text(max_size=10), json_values, max_size=3),
        "ttl": st.none() | st.integers(1, MAX_SECONDS) | st.floats(0.001, MAX_SECONDS),
        "retries": st.integers(0, MAX_RETRIES),
        "optional": st.booleans(),
        "id": step_ids,
    }
    for field, values in optional_fields.items():
        if draw(st.booleans()):
            step[field] = draw(values)
    return step


def composites(members: Any) -> Any:
    lists = st.lists(members, min_size=1, max_size=4)
    return (
        st.builds(lambda nodes: {"chain": nodes}, lists)
        | st.builds(lambda nodes: {"group": nodes}, lists)
        | st.builds(lambda header, body: {"chord": {"header": header, "body": body}}, lists, members)
    )


spec_trees = st.recursive(valid_steps(), composites, max_leaves=12)


def nodes_of(node: dict[str, Any], path: str = ROOT, where: tuple[Any, ...] = ()) -> list[tuple[str, tuple[Any, ...]]]:
    """Every node of a generated tree as (spec path, keys that reach it), in the validator's order."""
    members: list[tuple[str, tuple[Any, ...]]]
    if "chord" in node:
        members = [(f".chord.header[{i}]", ("chord", "header", i)) for i in range(len(node["chord"]["header"]))]
        members.append((".chord.body", ("chord", "body")))
    elif "skill" in node:
        members = []
    else:
        kind = "chain" if "chain" in node else "group"
        members = [(f".{kind}[{i}]", (kind, i)) for i in range(len(node[kind]))]
    found = [(path, where)]
    for suffix, keys in members:
        found += nodes_of(node_at(node, keys), path + suffix, where + keys)
    return found


def node_at(tree: Any, keys: tuple[Any, ...]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


def with_node(tree: Any, keys: tuple[Any, ...], replacement: Any) -> Any:
    """A copy of ``tree`` with the node that ``keys`` reach replaced."""
    if not keys:
        return replacement
    copy = json.loads(json.dumps(tree))
    node_at(copy, keys[:-1])[keys[-1]] = replacement
    return copy


def fits_the_limits(spec: dict[str, Any]) -> bool:
    """Within the depth limit, and no step id given twice."""
    nodes = [node_at(spec, keys) for _, keys in nodes_of(spec)]
    ids = [node["id"] for node in nodes if "id" in node]
    deepest = max(path.count("[") + path.count(".body") for path, _ in nodes_of(spec)) + 1
    return deepest <= settings.SPEC_MAX_DEPTH and len(ids) == len(set(ids))


# A fault and where the validator must say it is, relative to the node's path.
FAULTS: list[tuple[Any, str]] = [
    (42, ""),
    ("echo", ""),
    (None, ""),
    ([{"skill": "echo"}], ""),
    ({}, ""),
    ({"chain": [{"skill": "echo"}], "group": [{"skill": "echo"}]}, ""),
    ({"chain": []}, ".chain"),
    ({"group": {"skill": "echo"}}, ".group"),
    ({"chord": {"header": [{"skill": "echo"}]}}, ".chord"),
    ({"chord": [{"skill": "echo"}]}, ".chord"),
    ({"skill": "serch"}, ".skill"),
    ({"skill": ["echo"]}, ".skill"),
    ({"skill": "echo", "args": [1]}, ".args"),
    ({"skill": "echo", "args": "x"}, ".args"),
    ({"skill": "echo", "soft_time_limit": 10, "time_limit": 5}, ".soft_time_limit"),
    ({"skill": "echo", "soft_time_limit": 6, "time_limit": 6}, ".soft_time_limit"),
    ({"skill": "echo", "soft_time_limit": 65, "time_limit": 68}, ".soft_time_limit"),
    ({"skill": "echo", "time_limit": 71}, ".time_limit"),
    ({"skill": "fail", "time_limit": 11}, ".time_limit"),
    ({"skill": "echo", "time_limit": True}, ".time_limit"),
    ({"skill": "echo", "soft_time_limit": 0}, ".soft_time_limit"),
    ({"skill": "echo", "ttl": 0}, ".ttl"),
    ({"skill": "echo", "ttl": -1}, ".ttl"),
    ({"skill": "echo", "ttl": "60"}, ".ttl"),
    ({"skill": "echo", "ttl": MAX_SECONDS + 1}, ".ttl"),
    ({"skill": "echo", "retries": -1}, ".retries"),
    ({"skill": "echo", "retries": MAX_RETRIES + 1}, ".retries"),
    ({"skill": "echo", "retries": 1.5}, ".retries"),
    ({"skill": "echo", "retries": True}, ".retries"),
    ({"skill": "echo", "retries": None}, ".retries"),
    ({"skill": "echo", "optional": "yes"}, ".optional"),
    ({"skill": "echo", "id": ""}, ".id"),
    ({"skill": "echo", "id": "has space"}, ".id"),
    ({"skill": "echo", "id": "x" * 101}, ".id"),
    ({"skill": "echo", "id": 7}, ".id"),
    ({"skill": "echo", "timeout": 5}, ".timeout"),
]


@st.composite
def faulty_specs(draw: Any) -> tuple[Any, str]:
    """A spec within the limits with one fault planted, and the path the validator must name."""
    tree = draw(spec_trees.filter(fits_the_limits))
    path, keys = draw(st.sampled_from(nodes_of(tree)))
    fault, where = draw(st.sampled_from(FAULTS))
    return with_node(tree, keys, fault), path + where


# Junk: JSON of any shape, mixing the spec's own words, faulty nodes and plain steps.
junk = st.recursive(
    json_scalars | st.sampled_from([fault for fault, _ in FAULTS]) | st.sampled_from([{"skill": s} for s in SKILLS]),
    lambda inner: (
        composites(inner)
        | st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(SPEC_WORDS) | st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


def planned_canvas(spec: Any) -> Any:
    steps = plan(spec)
    options = {step.path: StepOptions.for_step(step, n, f"task-{n}") for n, step in enumerate(steps, start=1)}
    return steps, build(spec, options, run_id=1)


def signatures_in(sig: Any) -> list[Any]:
    """Every task signature in the canvas (not the chains, groups and chords holding them)."""
    if sig.task not in ("celery.chain", "celery.group", "celery.chord"):
        return [sig]
    found = [s for member in sig.tasks for s in signatures_in(member)]
    return found + signatures_in(sig.body) if sig.task == "celery.chord" else found


def step_signatures(sig: Any) -> list[Any]:
    return [s for s in signatures_in(sig) if s.task == STEP_TASK]


def assert_names_its_place(error: SpecError) -> None:
    assert error.path == ROOT or error.path.startswith((f"{ROOT}.", f"{ROOT}["))
    assert error.message
    assert str(error) == f"{error.path}: {error.message}"


@EXAMPLES
@given(spec_trees)
def test_a_spec_within_the_limits_plans_and_builds_a_canvas_with_each_step_once(spec):
    if not fits_the_limits(spec):
        with pytest.raises(SpecError, match=r"nested deeper than|duplicate step id") as refused:
            plan(spec)
        assert_names_its_place(refused.value)
        return

    steps, canvas = planned_canvas(spec)
    built = step_signatures(signature(json.loads(json.dumps(canvas))))  # as the broker carries it

    assert sorted(sig.kwargs["step_id"] for sig in built) == list(range(1, len(steps) + 1))
    assert len(steps) == sum(1 for _, keys in nodes_of(spec) if "skill" in node_at(spec, keys))
    for sig in built:
        step = steps[sig.kwargs["step_id"] - 1]
        assert sig.options["soft_time_limit"] == step.soft_time_limit < sig.options["time_limit"] == step.time_limit
        assert sig.kwargs["retry"]["max"] == step.retries
    # The run is ended by its last step, or (when the spec ends with a group) by finish_run.
    finishing_steps = sum(1 for sig in built if sig.kwargs.get("finishes_run"))
    finish_tasks = sum(1 for sig in signatures_in(canvas) if sig.task == FINISH_TASK)
    assert (finishing_steps, finish_tasks) in ((1, 0), (0, 1))


@EXAMPLES
@given(faulty_specs())
def test_a_spec_with_one_fault_raises_a_spec_error_at_that_place(case):
    spec, where = case
    with pytest.raises(SpecError) as refused:
        plan(spec)

    assert_names_its_place(refused.value)
    assert refused.value.path == where, str(refused.value)


@EXAMPLES
@given(junk)
def test_junk_either_plans_and_builds_or_raises_a_spec_error_and_nothing_else(junk):
    try:
        steps, canvas = planned_canvas(junk)
    except SpecError as error:
        assert_names_its_place(error)
    else:
        assert steps
        assert len(step_signatures(canvas)) == len(steps)
