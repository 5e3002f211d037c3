"""Telemetry that ships: a service started with ``SHOAL_OTEL_EXPORTER=otlp`` exports its spans
over OTLP/HTTP to a receiver (a stub HTTP server here), its SQL statements among them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _otlp import OtlpReceiver, ReceivedSpan, wait_for_spans

from shoal.devtools.embedded import free_port


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def _is_sql(span: ReceivedSpan) -> bool:
    """A client span of the SQLAlchemy instrumentation (either semantic-convention version)."""
    system = span.attributes.get("db.system") or span.attributes.get("db.system.name")
    return system == "postgresql"


async def test_a_service_with_the_otlp_exporter_starts_and_exports(
    otlp_receiver: OtlpReceiver,
    nats_url: str,
    database_url: str,
    subject_prefix: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SHOAL_NATS_URL": nats_url,
        "SHOAL_DATABASE_URL": database_url,
        "SHOAL_SUBJECT_PREFIX": subject_prefix,
        "SHOAL_HTTP_PORT": str(port),
        "SHOAL_OTEL_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    log = (tmp_path / "keys.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shoal.common.cli",
        "run",
        "keys",
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(30):
                while True:
                    assert process.returncode is None, (tmp_path / "keys.log").read_text()
                    try:
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
            assert (await http.get("/healthz")).status_code == 200

        def healthz_and_sql(spans: list[ReceivedSpan]) -> bool:
            return any(s.name == "GET /healthz" for s in spans) and any(_is_sql(s) for s in spans)

        spans = await asyncio.to_thread(wait_for_spans, otlp_receiver, healthz_and_sql, 30)
        assert {s.service for s in spans} == {"shoal-keys"}
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await process.wait()
