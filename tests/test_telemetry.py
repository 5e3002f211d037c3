"""Telemetry that ships: a service started with ``SHOAL_OTEL_EXPORTER=otlp`` exports its spans
over OTLP/HTTP to a receiver (a stub HTTP server here)."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from shoal.devtools.embedded import free_port


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


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


async def test_a_service_with_the_otlp_exporter_starts_and_exports(
    otlp_receiver: OtlpReceiver, nats_url: str, subject_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SHOAL_NATS_URL": nats_url,
        "SHOAL_SUBJECT_PREFIX": subject_prefix,
        "SHOAL_HTTP_PORT": str(port),
        "SHOAL_OTEL_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    log = (tmp_path / "eventbus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shoal.common.cli",
        "run",
        "eventbus",
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(30):
                while True:
                    assert process.returncode is None, (tmp_path / "eventbus.log").read_text()
                    try:
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
            assert (await http.get("/healthz")).status_code == 200
        names: set[str] = set()
        async with asyncio.timeout(30):
            while "GET /healthz" not in names:
                export = await asyncio.to_thread(otlp_receiver.exports.get, timeout=30)
                for resource_spans in export.resource_spans:
                    attributes = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    assert attributes["service.name"] == "shoal-eventbus"
                    names |= {s.name for scope in resource_spans.scope_spans for s in scope.spans}
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await process.wait()
