"""One trace from the REST request through every step, and the step's log labels, on a real worker.

The test process traces the request in memory (Django and Celery instrumented
with an in-memory exporter); the session's worker exports its spans over
OTLP/HTTP to a receiver in this process (tests/otlp.py) and logs JSON to
WORKER_LOG (tests/conftest.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from agentsite import telemetry
from orchestration.models import Run, RunStatus

from .conftest import WORKER_LOG, wait_for_run, wait_until
from .factories import ConversationFactory

pytestmark = pytest.mark.worker

CHORD = {
    "chord": {
        "header": [{"skill": "echo", "id": name, "args": {"value": name}} for name in ("a", "b", "c")],
        "body": {"skill": "echo", "id": "join"},
    }
}
# Each step after the first is published by the step before it (Celery's chain).
CHAIN = {"chain": [{"skill": "echo", "id": name} for name in ("a", "b", "c")]}


@pytest.fixture
def traced() -> Iterator[InMemorySpanExporter]:
    """This process traces its requests and publishes, into memory."""
    exporter = InMemorySpanExporter()
    provider = telemetry.tracer_provider(exporter, batch=False)
    telemetry.instrument_web(provider)
    yield exporter
    telemetry.uninstrument()
    provider.shutdown()


@pytest.fixture
def conversation(user):
    return ConversationFactory(owner=user)


def post_run(api: Any, conversation: Any, spec: dict[str, Any]) -> tuple[Run, dict[str, Any]]:
    response = api.post(f"/api/conversations/{conversation.pk}/runs/", {"spec": spec}, format="json")
    assert response.status_code == 202, response.content
    run = wait_for_run(Run.objects.get(pk=response.json()["id"]))
    assert run.status == RunStatus.SUCCEEDED, run.error
    return run, response.json()


def step_spans(otlp_receiver: Any, run: Run, count: int) -> list[Any]:
    def received() -> list[Any]:
        spans = [s for s in otlp_receiver.spans() if s.attributes.get("agentsite.run_id") == run.pk]
        return spans if len(spans) == count else []

    return wait_until(received)


@pytest.mark.parametrize("spec", [CHORD, CHAIN], ids=["chord", "chain"])
def test_one_trace_spans_the_request_and_every_step(traced, worker, otlp_receiver, api, conversation, spec):
    run, answer = post_run(api, conversation, spec)

    (request,) = [s for s in traced.get_finished_spans() if s.kind == SpanKind.SERVER]
    trace_id = format(request.context.trace_id, "032x")
    assert run.trace_id == trace_id
    assert answer["trace_id"] == trace_id
    steps = step_spans(otlp_receiver, run, run.steps.count())
    assert {s.trace_id for s in steps} == {trace_id}
    assert {(s.attributes["agentsite.step_id"], s.attributes["agentsite.skill"]) for s in steps} == {
        (pk, "echo") for pk in run.steps.values_list("pk", flat=True)
    }

    # One tree: every span but the request's has its parent in the trace (a
    # chord's header steps were published here, its body by the last header
    # step; a chain's first step here, each next one by the step before).
    def whole_trace() -> dict[str, str]:
        local = {format(s.context.span_id, "016x"): s.parent for s in traced.get_finished_spans()}
        parents = {k: format(p.span_id, "016x") if p else "" for k, p in local.items()}
        parents |= {s.span_id: s.parent_span_id for s in otlp_receiver.spans() if s.trace_id == trace_id}
        return parents if all(p in parents for p in parents.values() if p) else {}

    parents = wait_until(whole_trace)
    assert [span for span, parent in parents.items() if not parent] == [format(request.context.span_id, "016x")]


def test_a_run_started_outside_a_trace_has_no_trace_id_and_its_steps_run(worker, otlp_receiver, api, conversation):
    run, answer = post_run(api, conversation, CHORD)

    assert run.trace_id == answer["trace_id"] == ""
    # Each header step starts a trace of its own: nothing is left over from an earlier task.
    body = run.steps.get(key="join")
    header = [s for s in step_spans(otlp_receiver, run, 4) if s.attributes["agentsite.step_id"] != body.pk]
    assert [s.parent_span_id for s in header] == ["", "", ""]
    assert len({s.trace_id for s in header}) == 3


def test_a_steps_log_lines_carry_its_run_step_skill_and_trace(traced, worker, api, conversation):
    run, _ = post_run(api, conversation, {"skill": "echo"})
    step = run.steps.get()

    def outcome_line() -> dict[str, Any] | None:
        for line in WORKER_LOG.read_text().splitlines():
            if str(step.task_id) in line and "succeeded" in line:
                return json.loads(line)
        return None

    line = wait_until(outcome_line)
    assert line["level"] == "INFO"
    assert (line["run_id"], line["step_id"], line["skill"], line["trace_id"]) == (run.pk, step.pk, "echo", run.trace_id)
    assert len(run.trace_id) == 32
