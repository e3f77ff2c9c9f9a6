"""The workflow spec: validation and planning (the grammar: docs/spec.md, "Grammar").

``plan(spec)`` checks the whole tree and returns one ``PlannedStep`` per step, in
spec order, with the skill's defaults filled in. Every SpecError names its place:
``spec.chain[1].chord.header[0].skill: unknown skill "serch"`` (docs/spec.md, "Limits and errors").
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from skills.registry import Skill, registry

ROOT = "spec"
COMPOSITES = ("chain", "group", "chord", "switch")
STEP_KEYS = frozenset({"skill", "args", "soft_time_limit", "time_limit", "ttl", "retries", "optional", "id"})
MAX_RETRIES = 10
# Longest ttl (and any duration) a spec may give: a week. Time limits have
# their own, lower, per-skill maxima.
MAX_SECONDS = 7 * 24 * 3600
STEP_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
SWITCH_KEYS = frozenset({"on", "cases", "default"})
# A case's value that reads well after a dot in a path (spec...cases.billing); any other is quoted.
PLAIN_CASE = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_CASE_LENGTH = 100
# Step.key and Step.path are this long at most: a step without an id is keyed by its path.
MAX_KEY_LENGTH = 200
MAX_PATH_LENGTH = 500


class SpecError(ValueError):
    """The spec is invalid at ``path``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class PlannedStep:
    path: str
    key: str
    skill: str
    args: dict[str, Any]
    soft_time_limit: float
    time_limit: float
    ttl: float | None
    retries: int
    backoff: float
    backoff_max: float
    optional: bool
    queue: str


def plan(spec: Any) -> list[PlannedStep]:
    """Validate ``spec`` and return its steps in order; raise SpecError."""
    steps: list[PlannedStep] = []
    _walk(spec, ROOT, 1, steps)
    seen: set[str] = set()
    for step in steps:
        if step.key in seen:
            raise SpecError(f"{step.path}.id", f'duplicate step id "{step.key}"')
        seen.add(step.key)
    return steps


def first_skill(node: Any) -> str | None:
    """The skill of the step that runs before any other in ``node`` (a chain's first, however nested), if one does."""
    if isinstance(node, dict) and isinstance(node.get("skill"), str):
        return str(node["skill"])
    if isinstance(node, dict) and isinstance(node.get("chain"), list) and node["chain"]:
        return first_skill(node["chain"][0])
    return None  # a group's or chord's members start together: none of them runs first


def node_kind(node: Any, path: str) -> str:
    """Which kind of node this is: "step" or one of COMPOSITES."""
    if not isinstance(node, dict):
        raise SpecError(path, f"expected an object, got {_json_type(node)}")
    if "skill" in node:
        return "step"
    kinds = [k for k in COMPOSITES if k in node]
    if len(kinds) != 1 or len(node) != 1:
        raise SpecError(path, 'expected a step ("skill") or exactly one of "chain", "group", "chord", "switch"')
    return kinds[0]


def _walk(node: Any, path: str, depth: int, steps: list[PlannedStep]) -> None:
    if depth > settings.SPEC_MAX_DEPTH:
        raise SpecError(path, f"nested deeper than {settings.SPEC_MAX_DEPTH} levels")
    kind = node_kind(node, path)
    if kind == "step":
        steps.append(_plan_step(node, path))
        if len(steps) > settings.SPEC_MAX_STEPS:
            raise SpecError(path, f"more than {settings.SPEC_MAX_STEPS} steps")
        return
    for child_path, child in children(node, path):
        _walk(child, child_path, depth + 1, steps)


def step_paths(node: Any, path: str) -> list[str]:
    """The paths of the steps in a (validated) node, in spec order."""
    if node_kind(node, path) == "step":
        return [path]
    return [found for child_path, child in children(node, path) for found in step_paths(child, child_path)]


def children(node: dict[str, Any], path: str) -> list[tuple[str, Any]]:
    """The (path, node) pairs directly under a composite node, in order (a switch: its cases, then default)."""
    if "switch" in node:
        return [(case.path, case.node) for case in switch_cases(node, path)]
    if "chord" in node:
        chord = node["chord"]
        where = f"{path}.chord"
        if not isinstance(chord, dict) or set(chord) != {"header", "body"}:
            raise SpecError(where, 'expected an object with "header" and "body"')
        header = _members(chord["header"], f"{where}.header")
        return [*header, (f"{where}.body", chord["body"])]
    kind = "chain" if "chain" in node else "group"
    return _members(node[kind], f"{path}.{kind}")


@dataclass(frozen=True)
class Case:
    """One way out of a switch: ``value`` (None for the default), its node and that node's path."""

    value: str | None
    node: Any
    path: str


def switch_cases(node: dict[str, Any], path: str) -> list[Case]:
    """A switch node's cases in spec order, then its default (if any); raise SpecError if malformed."""
    switch = node["switch"]
    where = f"{path}.switch"
    if not isinstance(switch, dict) or not {"on", "cases"} <= set(switch):
        raise SpecError(where, 'expected an object with "on", "cases" and optionally "default"')
    unknown = sorted(set(switch) - SWITCH_KEYS)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}", 'unknown switch field (expected "on", "cases", "default")')
    _check_field(switch["on"], f"{where}.on")
    cases = switch["cases"]
    if not isinstance(cases, dict):
        raise SpecError(f"{where}.cases", f"expected an object of value: node, got {_json_type(cases)}")
    if not cases:
        raise SpecError(f"{where}.cases", "must not be empty")
    for value in cases:
        _check_case_value(value, f"{where}.cases")
    found = [Case(value, case, case_path(where, value)) for value, case in cases.items()]
    if "default" in switch:
        found.append(Case(None, switch["default"], f"{where}.default"))
    return found


def _check_field(on: Any, path: str) -> None:
    """A switch's ``on`` is a non-empty dotted path ("ticket.route", "items.0.kind")."""
    if not isinstance(on, str) or not on:
        raise SpecError(path, f'expected a field path such as "route" or "ticket.route", got {_json(on)}')
    if "" in on.split("."):
        raise SpecError(path, f"a field path has no empty segment, got {_json(on)}")


def case_path(switch_path: str, value: str) -> str:
    """The path of a switch's case: ``...switch.cases.billing``, or ``...switch.cases["a b"]``."""
    return f"{switch_path}.cases.{value}" if PLAIN_CASE.match(value) else f"{switch_path}.cases[{json.dumps(value)}]"


def _check_case_value(value: str, path: str) -> None:
    if not value:
        raise SpecError(path, "a case's value must not be empty")
    if len(value) > MAX_CASE_LENGTH:
        raise SpecError(path, f"a case's value is at most {MAX_CASE_LENGTH} characters, got {_json(value)}")


def _members(items: Any, path: str) -> list[tuple[str, Any]]:
    if not isinstance(items, list):
        raise SpecError(path, f"expected a list of nodes, got {_json_type(items)}")
    if not items:
        raise SpecError(path, "must not be empty")
    return [(f"{path}[{i}]", item) for i, item in enumerate(items)]


def _plan_step(node: dict[str, Any], path: str) -> PlannedStep:
    unknown = sorted(set(node) - STEP_KEYS)
    if unknown:
        raise SpecError(f"{path}.{unknown[0]}", "unknown step field")
    skill = _skill(node["skill"], f"{path}.skill")
    args = node.get("args", {})
    if not isinstance(args, dict):
        raise SpecError(f"{path}.args", f"must be a JSON object, got {_json_type(args)}")
    soft = _seconds(node, "soft_time_limit", path, skill.soft_time_limit)
    hard = _seconds(node, "time_limit", path, skill.time_limit)
    _check_limits(skill, soft, hard, path)
    return PlannedStep(
        path=path,
        key=_step_key(node, path),
        skill=skill.name,
        args=args,
        soft_time_limit=soft,
        time_limit=hard,
        ttl=_seconds(node, "ttl", path, None),
        retries=_retries(node, path, skill.retries),
        backoff=skill.backoff,
        backoff_max=skill.backoff_max,
        optional=_optional(node, path, skill.optional),
        queue=skill.queue,
    )


def _skill(name: Any, path: str) -> Skill:
    if not isinstance(name, str):
        raise SpecError(path, f"expected a skill name, got {_json_type(name)}")
    skill = registry.get(name)
    if skill is None:
        known = [s.name for s in registry]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise SpecError(path, f'unknown skill "{name}"{hint}')
    return skill


def _check_limits(skill: Skill, soft: float, hard: float, path: str) -> None:
    if soft >= hard:
        raise SpecError(f"{path}.soft_time_limit", f"must be less than time_limit ({soft:g} >= {hard:g})")
    if soft > skill.max_soft_time_limit:
        raise SpecError(
            f"{path}.soft_time_limit",
            f"{soft:g}s exceeds the maximum of skill {skill.name} ({skill.max_soft_time_limit:g}s)",
        )
    if hard > skill.max_time_limit:
        raise SpecError(
            f"{path}.time_limit", f"{hard:g}s exceeds the maximum of skill {skill.name} ({skill.max_time_limit:g}s)"
        )


def _seconds(node: dict[str, Any], field: str, path: str, default: float | None) -> Any:
    if field not in node:
        return default
    value = node[field]
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_SECONDS:
        raise SpecError(f"{path}.{field}", f"must be seconds, 0 < s <= {MAX_SECONDS}, got {_json(value)}")
    return float(value)


def _retries(node: dict[str, Any], path: str, default: int) -> int:
    value = node.get("retries", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise SpecError(f"{path}.retries", f"must be an integer from 0 to {MAX_RETRIES}, got {_json(value)}")
    return value


def _optional(node: dict[str, Any], path: str, default: bool) -> bool:
    value = node.get("optional", default)
    if not isinstance(value, bool):
        raise SpecError(f"{path}.optional", f"must be true or false, got {_json(value)}")
    return value


def _step_key(node: dict[str, Any], path: str) -> str:
    if len(path) > MAX_PATH_LENGTH:
        raise SpecError(path[:100] + "...", f"the path of this step is longer than {MAX_PATH_LENGTH} characters")
    if "id" not in node:
        if len(path) > MAX_KEY_LENGTH:
            raise SpecError(path, f'a step whose path is longer than {MAX_KEY_LENGTH} characters needs an "id"')
        return path
    value = node["id"]
    if not isinstance(value, str) or not STEP_ID.match(value):
        raise SpecError(f"{path}.id", "must be 1-100 characters of letters, digits, and _ . : -")
    return value


def _json(value: Any) -> str:
    return json.dumps(value)[:100]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
