"""agentsite/telemetry.py: when tracing is on, the web entry point, the step's log labels."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from django.conf import settings
from opentelemetry.instrumentation.django import DjangoInstrumentor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pythonjsonlogger.json import JsonFormatter

from agentsite import telemetry

from .conftest import wait_until


@pytest.mark.parametrize(
    ("environ", "enabled"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,otlp_proto_http"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ],
)
def test_tracing_is_on_only_where_the_environment_names_an_otlp_exporter(environ, enabled):
    assert telemetry.tracing_enabled(environ) is enabled


def test_the_web_entry_point_instruments_nothing_when_tracing_is_off(monkeypatch):
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)

    telemetry.start_web_tracing()

    assert not DjangoInstrumentor().is_instrumented_by_opentelemetry
    assert telemetry.current_trace_id() == ""


WEB_REQUEST = """
import io, wsgiref.util
from agentsite import telemetry, wsgi
for path in ("/healthz", "/api/"):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "HTTP_HOST": "127.0.0.1", "wsgi.input": io.BytesIO()}
    wsgiref.util.setup_testing_defaults(environ)
    wsgi.application(environ, lambda status, headers: print(path, status))
telemetry.stop_tracing()
"""


def test_the_web_entry_point_exports_request_spans_over_otlp_when_configured(otlp_receiver):
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint, "OTEL_SERVICE_NAME": "agentsite-web-check"}
    result = subprocess.run(
        [sys.executable, "-c", WEB_REQUEST], env=env, cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["/healthz 200 OK", "/api/ 401 Unauthorized"]
    spans = wait_until(lambda: [s for s in otlp_receiver.spans() if s.service == "agentsite-web-check"])
    assert [s.name for s in spans] == ["GET api/"]  # probes are left out


@pytest.fixture
def span() -> Iterator[object]:
    provider = telemetry.tracer_provider(InMemorySpanExporter(), batch=False)
    with provider.get_tracer("test").start_as_current_span("step") as current:
        yield current
    provider.shutdown()


@pytest.fixture
def labelled() -> Iterator[None]:
    telemetry.bind_step(step_id=12)
    telemetry.bind_step(run_id=5, skill="echo")
    yield
    telemetry.unbind_step()


def record(message: str) -> logging.LogRecord:
    made = logging.LogRecord("skills.demo", logging.INFO, __file__, 1, message, None, None)
    telemetry.StepLogFilter().filter(made)
    return made


def as_json(made: logging.LogRecord) -> dict[str, object]:
    return json.loads(JsonFormatter("%(levelname)s %(name)s %(message)s").format(made))


def test_a_record_inside_a_step_carries_its_run_step_skill_and_trace(span, labelled):
    line = as_json(record("calling the tool"))

    trace_id = format(span.get_span_context().trace_id, "032x")
    assert line == {
        "levelname": "INFO",
        "name": "skills.demo",
        "message": "calling the tool",
        "step_id": 12,
        "run_id": 5,
        "skill": "echo",
        "trace_id": trace_id,
    }
    assert telemetry.current_trace_id() == trace_id


def test_the_steps_span_carries_its_run_step_and_skill(span, labelled):
    assert {k: v for k, v in span.attributes.items() if k.startswith("agentsite.")} == {
        "agentsite.step_id": 12,
        "agentsite.run_id": 5,
        "agentsite.skill": "echo",
    }


def test_a_text_line_ends_with_the_steps_labels(labelled):
    assert telemetry.TextFormatter().format(record("calling the tool")) == (
        "calling the tool [run_id=5 step_id=12 skill=echo]"
    )


def test_records_outside_a_step_and_a_trace_carry_no_labels():
    assert as_json(record("idle")) == {"levelname": "INFO", "name": "skills.demo", "message": "idle"}
    assert telemetry.TextFormatter().format(record("idle")) == "idle"


def test_the_labels_end_with_the_task(labelled):
    telemetry.unbind_step()

    assert telemetry.step_fields() == {}
