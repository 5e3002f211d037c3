"""Trace context without an exporter: no span is made, the caller's trace still flows."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from shoal.common import observability
from shoal.common.observability import inject_trace, start_span

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@pytest.fixture(params=[False, True], ids=["no-exporter", "recording"])
def recording(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(observability, "_recording", request.param)
    return bool(request.param)


def current_trace_id() -> str:
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


@pytest.mark.usefixtures("recording")
def test_a_callers_trace_is_continued_and_passed_on() -> None:
    with start_span("work", {"traceparent": PARENT}, attribute="x") as span:
        span.set_attribute("more", 1)  # a no-op on a non-recording span, never an error
        assert current_trace_id() == TRACE_ID
        outgoing = inject_trace({})
    assert outgoing["traceparent"].split("-")[1] == TRACE_ID
    assert not trace.get_current_span().get_span_context().is_valid  # detached on exit


def test_without_a_caller_a_new_trace_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observability, "_recording", False)
    with start_span("work", {}):
        first = current_trace_id()
        outgoing = inject_trace({})
    with start_span("work"):
        second = current_trace_id()
    assert int(first, 16) != 0
    assert int(second, 16) != 0
    assert first != second
    assert outgoing["traceparent"].split("-")[1] == first
