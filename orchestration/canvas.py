"""The canvas builder: a validated spec tree in, a Celery signature out (pure: no database, broker or registry).

Each step is a signature of the step task with its own limits, ttl, queue, task id and
retry policy; composites map onto Celery's chain, group and chord; a switch is one task
that replaces itself with its chosen case. See docs/spec.md, "Data passing".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast

from celery import chain, chord, group
from celery.canvas import Signature, _chain, maybe_signature

from .spec import ROOT, Case, PlannedStep, children, node_kind, step_paths, switch_cases

STEP_TASK = "agentsite.run_step"
SWITCH_TASK = "agentsite.switch"
FINISH_TASK = "agentsite.finish_run"
COLLECT_TASK = "agentsite.collect"
PASS_ON_TASK = "agentsite.pass_on"
CONTROL_QUEUE = "default"


@dataclass(frozen=True)
class StepOptions:
    """What one step's signature needs, keyed by the step's spec path."""

    step_id: int
    task_id: str
    queue: str
    soft_time_limit: float
    time_limit: float
    ttl: float | None
    retries: int
    backoff: float
    backoff_max: float
    # The run's deadline as run_step's ``deadline`` kwarg (orchestration/budget.py); None: not capped.
    deadline: Mapping[str, float] | None = None

    @classmethod
    def for_step(
        cls, planned: PlannedStep, step_id: int, task_id: str, deadline: Mapping[str, float] | None = None
    ) -> StepOptions:
        return cls(
            step_id=step_id,
            task_id=task_id,
            queue=planned.queue,
            soft_time_limit=planned.soft_time_limit,
            time_limit=planned.time_limit,
            ttl=planned.ttl,
            retries=planned.retries,
            backoff=planned.backoff,
            backoff_max=planned.backoff_max,
            deadline=deadline,
        )


def build(spec: dict[str, Any], steps: Mapping[str, StepOptions], run_id: int) -> Signature:
    """The run's whole canvas, to be published with the run's input as its one argument.

    Its final step ends the run (``finishes_run``), or ``finish_run`` follows a spec that may end with a group.
    """
    final = final_steps(spec, ROOT)
    canvas = build_node(spec, ROOT, steps, final)
    if final:
        return canvas
    return chain(canvas, Signature(FINISH_TASK, kwargs={"run_id": run_id}, options={"queue": CONTROL_QUEUE}))


def final_steps(node: dict[str, Any], path: str) -> frozenset[str]:
    """The paths of the steps one of which gives the node its output; empty when it may be a group's list.

    One path, unless the node ends with a switch: then the last step of whichever case runs.
    """
    kind = node_kind(node, path)
    if kind == "step":
        return frozenset({path})
    if kind == "group":
        return frozenset()
    if kind == "switch":
        ends = [final_steps(case.node, case.path) for case in switch_cases(node, path)]
        return frozenset().union(*ends) if all(ends) else frozenset()
    last_path, last = children(node, path)[-1]  # a chain's last node, a chord's body
    return final_steps(last, last_path)


def build_node(
    node: dict[str, Any], path: str, steps: Mapping[str, StepOptions], final: Collection[str] = ()
) -> Signature:
    """The node's canvas; a step whose path is in ``final`` finishes the run."""
    kind = node_kind(node, path)
    if kind == "step":
        return step_signature(steps[path], finishes_run=path in final)
    if kind == "switch":
        return switch_signature(node, path, steps, final)
    members = [build_node(child, child_path, steps, final) for child_path, child in children(node, path)]
    if kind == "chain":
        return chain(*members)
    if kind == "group":
        return _group([_keep_list(m) for m in members])
    *header, body = members
    return chord([_keep_list(m) for m in header], body)


def switch_signature(
    node: dict[str, Any], path: str, steps: Mapping[str, StepOptions], final: Collection[str] = ()
) -> Signature:
    """The switch task, with each case's canvas and the ids of its steps (to skip those of the cases not taken)."""
    cases = switch_cases(node, path)
    kwargs = {
        "switch": path,
        "on": node["switch"]["on"],
        "cases": {case.value: _route(case, steps, final) for case in cases if case.value is not None},
        "default": next((_route(case, steps, final) for case in cases if case.value is None), None),
    }
    return Signature(SWITCH_TASK, kwargs=kwargs, options={"queue": CONTROL_QUEUE})


def _route(case: Case, steps: Mapping[str, StepOptions], final: Collection[str]) -> dict[str, Any]:
    return {
        "path": case.path,
        "canvas": build_node(case.node, case.path, steps, final),
        "steps": [steps[p].step_id for p in step_paths(case.node, case.path)],
    }


def replacement(case: Signature, upstream: Any, joined: bool) -> Signature:
    """What a switch task is replaced with: its chosen ``case``, given the switch's input.

    ``joined`` (the switch is in a group or chord header): the case ends with ``pass_on``, to take the switch's task id.
    """
    given = with_input(case, upstream)
    if not joined:
        return given
    return chain(given, Signature(PASS_ON_TASK, options={"queue": CONTROL_QUEUE}))


def with_input(sig: Signature, upstream: Any) -> Signature:
    """``sig`` with ``upstream`` given to its first task(s), as ``apply_async(args=(upstream,))`` would.

    For a switch's chosen case, which ``Task.replace`` publishes with no arguments (a chain from its dict keeps none).
    """
    if isinstance(sig, _chain):
        first, *rest = sig.tasks
        return chain(with_input(_signature(first), upstream), *rest)
    if isinstance(sig, chord):
        return chord([with_input(_signature(t), upstream) for t in sig.tasks], sig.body)
    if isinstance(sig, group):
        return group([with_input(_signature(t), upstream) for t in sig.tasks])
    return sig.clone(args=(upstream,))


def _signature(member: Any) -> Signature:
    return cast(Signature, maybe_signature(member))


def step_signature(options: StepOptions, finishes_run: bool = False) -> Signature:
    retry = {"max": options.retries, "backoff": options.backoff, "backoff_max": options.backoff_max}
    call_options: dict[str, Any] = {
        "task_id": options.task_id,
        "queue": options.queue,
        "soft_time_limit": options.soft_time_limit,
        "time_limit": options.time_limit,
        # What logs, task events and Flower show for the arguments: no repr to build, no personal data shown.
        "argsrepr": "(the step's input)",
        "kwargsrepr": f"{{'step_id': {options.step_id}}}",
    }
    if options.ttl is not None:
        call_options["expires"] = options.ttl
    kwargs: dict[str, Any] = {"step_id": options.step_id, "retry": retry}
    if finishes_run:
        kwargs["finishes_run"] = True
    if options.deadline is not None:
        kwargs["deadline"] = dict(options.deadline)
    return Signature(STEP_TASK, kwargs=kwargs, options=call_options)


def _group(members: list[Signature]) -> Signature:
    if len(members) == 1:
        # Celery unrolls a one-task group into the task itself, which would
        # pass on the bare output; a chord keeps the output a list.
        return _collected(members)
    return group(members)


def _keep_list(member: Signature) -> Signature:
    """A group directly inside a group or chord header, as one member: a chord with a collect body.

    Celery would merge it into its parent, reversing its members (docs/design.md, "Changes from the shared contract").
    """
    return _collected(member.tasks) if isinstance(member, group) else member


def _collected(members: Any) -> Signature:
    return chord(list(members), Signature(COLLECT_TASK, options={"queue": CONTROL_QUEUE}))
