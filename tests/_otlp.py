"""An OTLP/HTTP trace receiver for the tests: a stub collector on a free port."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: every POST to /v1/traces, decoded, lands in ``exports``."""

    def __init__(self) -> None:
        self.exports: queue.Queue[ExportTraceServiceRequest] = queue.Queue()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    receiver.exports.put(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    attributes: dict[str, str]


def received_spans(export: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """The spans of one export, each with its resource's ``service.name``."""
    spans = []
    for resource_spans in export.resource_spans:
        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                attributes = {a.key: a.value.string_value for a in span.attributes}
                spans.append(
                    ReceivedSpan(
                        resource["service.name"], span.name, span.trace_id.hex(), attributes
                    )
                )
    return spans


def wait_for_spans(
    receiver: OtlpReceiver, done: Callable[[list[ReceivedSpan]], bool], within: float
) -> list[ReceivedSpan]:
    """Every span received until ``done`` says they are enough (blocking: run in a thread)."""
    import time

    deadline = time.monotonic() + within
    spans: list[ReceivedSpan] = []
    while not done(spans):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"spans received so far: {sorted({(s.service, s.name) for s in spans})}"
            )
        try:
            spans += received_spans(receiver.exports.get(timeout=remaining))
        except queue.Empty:
            continue
    return spans
