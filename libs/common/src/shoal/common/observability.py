"""Structured JSON logs and OpenTelemetry tracing, with W3C trace context in NATS headers.

Example::

    setup_logging(settings)
    setup_tracing("gateway", settings)
    headers = inject_trace({})              # add traceparent of the current span
    with start_span("session.apply", headers): ...   # continue a trace from a message
"""

from __future__ import annotations

import logging
import random
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import msgspec
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from shoal.common.settings import CommonSettings

_encoder = msgspec.json.Encoder()
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, service, trace id, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


def setup_logging(settings: CommonSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter(settings.service_name))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("uvicorn.access", "aiobotocore", "botocore", "nats.aio.client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_tracing(service: str, settings: CommonSettings) -> TracerProvider:
    """Install a tracer provider once per process; spans are exported only when
    ``SHOAL_OTEL_EXPORTER`` asks. Later calls (tests build several apps) reuse the first."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    # With no exporter nothing would ever read a span: sample none. Trace context still flows
    # (a non-recording span keeps the caller's trace id, and a new one gets its own for logs),
    # and recording every span cost most of a request's CPU in the command-path benchmark.
    global _recording
    _recording = settings.otel_exporter != "none"
    sampler = None if _recording else ALWAYS_OFF
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"shoal-{service}"}), sampler=sampler
    )
    if settings.otel_exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif settings.otel_exporter == "otlp":
        # OTLP over HTTP/protobuf; endpoint, headers and timeouts from the standard
        # OTEL_EXPORTER_OTLP_* variables (default http://localhost:4318).
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    if _recording:
        _instrument_clients()
    return provider


def _instrument_clients() -> None:
    """Client spans for SQL (SQLAlchemy: each statement sent through asyncpg) and S3 (each API
    call: botocore for sync clients, aiobotocore for the aioboto3 clients the object store
    uses; aiobotocore overrides the call botocore's instrumentation wraps); only when spans are
    exported."""
    from opentelemetry.instrumentation.botocore import (
        AiobotocoreInstrumentor,
        BotocoreInstrumentor,
    )
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    # The instrumentation declares sqlalchemy < 2.1 and would silently do nothing on our 2.1;
    # what it wraps (create_async_engine, engine events) is unchanged in 2.1, and
    # tests/test_telemetry.py checks its spans arrive.
    SQLAlchemyInstrumentor().instrument(skip_dep_check=True)
    BotocoreInstrumentor().instrument()  # type: ignore[no-untyped-call]  # untyped __init__
    AiobotocoreInstrumentor().instrument()  # type: ignore[no-untyped-call]


def inject_trace(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's ``traceparent`` to outgoing NATS headers."""
    propagate.inject(headers)
    return headers


def trace_carrier(traceparent: str | None, tracestate: str | None) -> dict[str, str]:
    """A stored W3C trace context as message headers (empty when there is none)."""
    headers = {"traceparent": traceparent, "tracestate": tracestate}
    return {k: v for k, v in headers.items() if v}


def recording() -> bool:
    """Whether spans are recorded (an exporter is set): a span that only marks a moment, with
    nothing inside to carry the context to, is worth making only then."""
    return _recording


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_id_of(headers: Mapping[str, str]) -> str | None:
    """The trace id (32 hex digits) of the ``traceparent`` in ``headers``; None when there is
    none or it is malformed."""
    match = _TRACEPARENT.fullmatch(headers.get("traceparent") or "")
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


# One tracer for the process (a proxy until setup_tracing installs the provider): getting one
# per span cost more than the span itself.
_TRACER = trace.get_tracer("shoal")
# False once setup_tracing saw no exporter: nothing would ever read a span.
_recording = True
# Trace and span ids are not secrets: the SDK's own RandomIdGenerator uses random too.
_ids = random.Random()  # noqa: S311


@contextmanager
def start_span(
    name: str, headers: Mapping[str, str] | None = None, **attributes: Any
) -> Iterator[trace.Span]:
    """A span that continues the trace carried in ``headers`` (if any).

    Without an exporter no span is made at all: the caller's trace context becomes the current
    one as it came (a new trace id when there is none), so logs carry the trace id and
    ``inject_trace`` passes it on. The SDK's non-recording spans cost ~10% of the gateway's and
    the session service's CPU per prompt in the command-path benchmark.
    """
    if _recording:
        ctx = propagate.extract(headers) if headers else None
        with _TRACER.start_as_current_span(name, context=ctx, attributes=attributes) as span:
            yield span
        return
    if headers and "traceparent" in headers:
        ctx = propagate.extract(headers)
    else:
        ctx = trace.set_span_in_context(_new_trace())
    token = context.attach(ctx)
    try:
        yield trace.get_current_span(ctx)
    finally:
        context.detach(token)


def _new_trace() -> trace.Span:
    return trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=_ids.getrandbits(128) or 1,
            span_id=_ids.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
        )
    )
