"""Tracing (OpenTelemetry) and structured logs (docs/operations.md, "Tracing and logs").

Tracing is on only where the standard ``OTEL_*`` environment names an OTLP exporter; then a run's request
and all its steps are one trace. Log records made inside a step carry ``run_id``, ``step_id`` and ``skill``
(``bind_step``), and those made inside a span ``trace_id``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

# Requests that would only fill the traces: probes and static files.
DEFAULT_EXCLUDED_URLS = "/healthz,/readyz,/static/"
# OTEL_TRACES_EXPORTER values that mean OTLP (the SDK's entry point names).
OTLP_EXPORTERS = {"otlp", "otlp_proto_http"}
# What a step's log records (and its span, prefixed "agentsite.") are labelled with.
STEP_FIELDS = ("run_id", "step_id", "skill")

_step_fields: ContextVar[dict[str, Any] | None] = ContextVar("agentsite_step_fields", default=None)
# The SDK is imported only when tracing starts: with tracing off, processes never load it.
_provider: TracerProvider | None = None


def tracing_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for OTLP trace export (else tracing is off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()}
    if exporters:
        return bool(exporters & OTLP_EXPORTERS)
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def tracer_provider(exporter: SpanExporter, batch: bool = True) -> TracerProvider:
    """A TracerProvider named by OTEL_SERVICE_NAME (default "agentsite") that sends spans to ``exporter``."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or "agentsite"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return provider


def start_web_tracing() -> None:
    """Trace requests and the tasks they publish, if the environment says so. Before the WSGI app loads."""
    provider = _start_provider()
    if provider is not None:
        instrument_web(provider)


def start_worker_tracing() -> None:
    """Trace the tasks this pool process runs and publishes, if the environment says so.

    Call it in each prefork pool process (worker_process_init): the span exporter's thread would not survive a fork.
    """
    provider = _start_provider()
    if provider is not None:
        instrument_celery(provider)


def stop_tracing() -> None:
    """Send the spans still buffered (a pool process exits through os._exit, skipping atexit)."""
    if _provider is not None:
        _provider.shutdown()


def _start_provider() -> TracerProvider | None:
    global _provider
    if _provider is not None or not tracing_enabled():
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") != "http/protobuf":
        log.warning("tracing: only OTLP over http/protobuf is supported; OTEL_EXPORTER_OTLP_PROTOCOL ignored")
    _provider = tracer_provider(OTLPSpanExporter())
    trace.set_tracer_provider(_provider)
    return _provider


def instrument_web(provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    excluded = os.environ.get("OTEL_PYTHON_DJANGO_EXCLUDED_URLS", DEFAULT_EXCLUDED_URLS)
    DjangoInstrumentor().instrument(tracer_provider=provider, excluded_urls=excluded)
    instrument_celery(provider)  # the web publishes runs' first steps


def instrument_celery(provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument(tracer_provider=provider)


def uninstrument() -> None:
    """Undo instrument_web / instrument_celery (tests)."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    for instrumentor in (DjangoInstrumentor(), CeleryInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def current_trace_id() -> str:
    """The current trace's id in 32 hex digits, or "" outside a trace (tracing off)."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


# --- The step's labels -------------------------------------------------------------


def bind_step(**fields: Any) -> None:
    """Label this step's log records and its span (``agentsite.<field>``) with ``fields``.

    The labels last until ``unbind_step`` (at task_postrun), so Celery's line about the step's outcome has them too.
    """
    _step_fields.set({**(_step_fields.get() or {}), **fields})
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"agentsite.{name}": value for name, value in fields.items()})


def unbind_step() -> None:
    _step_fields.set(None)


def step_fields() -> dict[str, Any]:
    return dict(_step_fields.get() or {})


class StepLogFilter(logging.Filter):
    """Adds the step's labels and the current trace id to every record that has them."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _step_fields.get()
        if fields:
            record.__dict__.update(fields)
        trace_id = current_trace_id()
        if trace_id:
            record.trace_id = trace_id
        return True


class TextFormatter(logging.Formatter):
    """The message, then the record's step labels and trace id when it has them."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        labels = [f"{name}={value}" for name in (*STEP_FIELDS, "trace_id") if (value := getattr(record, name, None))]
        text = super().formatMessage(record)
        return f"{text} [{' '.join(labels)}]" if labels else text
